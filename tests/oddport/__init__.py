"""A deliberately different DPSOM port, for testing that the parity harness names each difference.

It is written the way a typical public PyTorch port would be (its own module and parameter names,
``nn.Sequential`` stacks, torch's Adam), and differs from the original in five declared ways only:

1. diagonal Gaussian posterior (``fc_mu`` / ``fc_logvar``), diagonal closed-form KL;
2. BatchNorm *before* the LeakyReLU in every block (BN itself a frozen affine map, eval mode);
3. one fresh ``torch.optim.Adam`` per phase (torch's epsilon placement, per-parameter step counts);
4. linear decoder logits (no LeakyReLU on the final Dense(784));
5. LR staircase ``0.99 ** floor(step / 5000)`` instead of the effective 1000.

Nothing here imports the harness or ``ports.dpsom``.
"""

"""PyTorch ports, faithful by default to the original TF behaviour as executed."""

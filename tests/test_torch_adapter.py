"""The table-driven torch adapter (harness/adapters/torch.py) on a hand-made module: transforms
(slices, permutations, NHWC rows), partial mappings, strict loading, injected dropout masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from harness.adapters.torch import TorchPortAdapter
from harness.transplant import Row, TransplantError, canonical_to_torch, torch_to_canonical


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mu = nn.Linear(4, 3)  # the first 3 columns of a canonical head kernel (4, 5)
        self.conv = nn.Conv2d(2, 3, 3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.mu(x))


TABLE = (
    Row("head.kernel", "mu.weight", "slice(1,0:3)|transpose"),
    Row("head.bias", "mu.bias", "slice(0,0:3)"),
    Row("conv.kernel", "conv.weight", "permute(3,2,0,1)"),
    Row("conv.bias", "conv.bias", "identity"),
)


class Adapter(TorchPortAdapter):
    def forward(self, batch):
        with self.noise_scope():
            return {"out": self.numpy(self.module(self.t(batch["x"])))}


def _pair():
    torch.manual_seed(0)
    net = Net()
    return Adapter(net, TABLE, dtype="float32"), Adapter(Net(), TABLE, dtype="float64")


def test_slice_and_permutation_rows_and_partial_mapping():
    a, _ = _pair()
    assert a.absent == {f"head.{k}{s}" for k in ("kernel", "bias") for s in ("", "/adam_m", "/adam_v")}  # slots too
    rng = np.random.default_rng(0)
    w = {"head.kernel": rng.standard_normal((4, 5)).astype(np.float32), "head.bias": rng.standard_normal(5).astype(np.float32),
         "conv.kernel": rng.standard_normal((3, 3, 2, 3)).astype(np.float32), "conv.bias": rng.standard_normal(3).astype(np.float32)}
    a.set_weights(w)
    np.testing.assert_array_equal(a.module.mu.weight.detach().numpy(), w["head.kernel"][:, :3].T)  # the slice, transposed
    np.testing.assert_array_equal(a.module.mu.bias.detach().numpy(), w["head.bias"][:3])
    np.testing.assert_array_equal(a.module.conv.weight.detach().numpy(), np.transpose(w["conv.kernel"], (3, 2, 0, 1)))
    got = a.get_weights()
    assert list(got) == ["conv.kernel", "conv.bias"]  # partially mapped names are not read back
    assert got["conv.kernel"].tobytes() == w["conv.kernel"].tobytes()


def test_rows_hwc_to_chw_is_the_nchw_flatten_of_a_dense_kernel():
    h, wd, c, out = 2, 3, 4, 5
    kernel = np.arange(h * wd * c * out, dtype=np.float32).reshape(h * wd * c, out)  # rows in NHWC-flatten order
    x = np.random.default_rng(1).standard_normal((h, wd, c)).astype(np.float32)
    torch_rows = canonical_to_torch(kernel, f"rows_hwc_to_chw({h},{wd},{c})")
    # the same layer, fed the NCHW flatten of the same activation, gives the same output
    np.testing.assert_allclose(x.reshape(-1) @ kernel, np.transpose(x, (2, 0, 1)).reshape(-1) @ torch_rows, rtol=1e-6)
    assert torch_to_canonical(torch_rows, f"rows_hwc_to_chw({h},{wd},{c})").tobytes() == kernel.tobytes()


def test_strict_loading_names_every_problem_and_writes_nothing():
    a, _ = _pair()
    before = {k: v.clone() for k, v in a.module.state_dict().items()}
    with pytest.raises(TransplantError) as err:
        a.set_weights({"conv.kernel": np.zeros((3, 3, 3, 3), np.float32), "extra.kernel": np.zeros(1, np.float32)})
    for fragment in ("conv.bias", "extra.kernel", "conv.kernel: got (3, 3, 3, 3), expected (3, 3, 2, 3)"):
        assert fragment in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in a.module.state_dict().items())
    with pytest.raises(TransplantError, match=r"torch keys the module does not have: \['mu.weigth'\]"):
        Adapter(Net(), (Row("head.kernel", "mu.weigth", "transpose"),))
    with pytest.raises(ValueError, match="unknown transform 'tranpose'"):
        canonical_to_torch(np.zeros((2, 2)), "tranpose")


def test_dropout_masks_are_injected_the_same_in_both_dtype_copies():
    a, b = _pair()
    b.module.load_state_dict(a.module.state_dict())
    x = {"x": np.random.default_rng(2).standard_normal((64, 4)).astype(np.float32)}
    out32, out64 = a.forward(x)["out"], b.forward(x)["out"]
    dropped32, dropped64 = out32 == 0, out64 == 0
    assert 0.3 < dropped32.mean() < 0.7  # p = 0.5 fires
    assert np.array_equal(dropped32, dropped64)  # the same mask in float32 and float64
    np.testing.assert_allclose(out32, out64, rtol=1e-5, atol=1e-6)
    assert np.array_equal(a.forward(x)["out"], out32)  # each public call restarts the mask stream

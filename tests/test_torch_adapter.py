"""The table-driven torch adapter (harness/adapters/torch.py) on a hand-made module: transforms
(slices, permutations, NHWC rows), partial mappings, strict loading, injected dropout masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from harness.adapters.torch import TorchPortAdapter
from harness.transplant import Row, TransplantError, canonical_shape, canonical_to_torch, torch_to_canonical


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


@pytest.mark.parametrize("shape, transform", [((5150, 2000), "transpose"), ((256, 128, 5, 5), "conv"), ((128, 256, 5, 5), "conv_transpose"),
                                               ((256, 128, 5, 5), "permute(3,2,0,1)"), ((7 * 7 * 256, 300), "rows_hwc_to_chw(7,7,256)"),
                                               ((784, 500), "identity"), ((300, 7 * 7 * 256), "rows_hwc_to_chw(7,7,256)|transpose")])
def test_canonical_shape_is_the_shape_of_the_inverse_without_allocating_it(shape, transform):
    import tracemalloc

    expected = torch_to_canonical(np.zeros(shape, np.float32), transform).shape
    tracemalloc.start()
    try:
        got = canonical_shape(shape, transform)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == expected
    # parsing the ops takes a few kB; the smallest tensor here is 1.5 MB in float32, the largest 41 MB
    assert peak < 64 * 1024, f"{transform}: {peak} B allocated for a shape"


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


def test_layout_changes_are_views_copied_once_into_the_parameters_dtype():
    """canonical_to_torch gives views (no transposed copy of a 0.25 GB kernel on the way to the float64
    twin); set_weights and apply_gradients copy them once, into the parameter's layout and dtype."""
    rng = np.random.default_rng(3)
    kernel = rng.standard_normal((3, 3, 2, 3)).astype(np.float32)
    view = canonical_to_torch(kernel, "permute(3,2,0,1)")
    assert np.shares_memory(view, kernel) and not view.flags.c_contiguous
    back = torch_to_canonical(np.ascontiguousarray(view), "permute(3,2,0,1)")
    assert back.flags.c_contiguous and back.tobytes() == kernel.tobytes()
    _, b = _pair()  # float64
    w = {"head.kernel": rng.standard_normal((4, 5)).astype(np.float32), "head.bias": rng.standard_normal(5).astype(np.float32),
         "conv.kernel": kernel, "conv.bias": rng.standard_normal(3).astype(np.float32)}
    b.set_weights(w)
    assert b.module.mu.weight.is_contiguous() and b.module.mu.weight.dtype == torch.float64
    assert np.array_equal(b.module.mu.weight.detach().numpy(), w["head.kernel"][:, :3].T.astype(np.float64))
    held = b.get_weights()  # snapshots: copied once, whether the layout changed (conv) or not (bias)
    assert not any(np.shares_memory(held[k], t.detach().numpy()) for k in held for t in b.module.parameters())
    assert held["conv.kernel"].flags.c_contiguous and np.array_equal(held["conv.kernel"], kernel.astype(np.float64))
    grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in w.items()}
    seen = {}
    b.optimizer_step = lambda phase, lr: seen.update({k: p.grad.clone() for k, p in b.module.named_parameters() if p.grad is not None})
    readonly = {k: v.copy() for k, v in grads.items()}
    for v in readonly.values():
        v.flags.writeable = False  # a memory-mapped spill is read-only: read, never written, and no warning
    b.apply_gradients("vae", readonly, 1e-3)
    assert seen["mu.weight"].is_contiguous() and seen["mu.weight"].dtype == torch.float64
    assert np.array_equal(seen["mu.weight"].numpy(), grads["head.kernel"][:, :3].T.astype(np.float64))
    assert np.array_equal(seen["conv.weight"].numpy(), np.transpose(grads["conv.kernel"], (3, 2, 0, 1)).astype(np.float64))
    assert all(p.grad is None for p in b.module.parameters())  # applied, not kept
    with pytest.raises(TransplantError, match=r"apply_gradients: conv.kernel -> conv.weight \(permute\(3,2,0,1\)\) gives "
                                              r"\(3, 3, 3, 3\), the parameter is \(3, 2, 3, 3\)"):
        b.apply_gradients("vae", {"conv.kernel": np.zeros((3, 3, 3, 3), np.float32)}, 1e-3)  # 3 input channels, not 2
    with pytest.raises(TransplantError):  # a bad shape anywhere: no gradient is left on any parameter
        b.apply_gradients("vae", {**grads, "conv.kernel": np.zeros((3, 3, 3, 3), np.float32)}, 1e-3)
    assert all(p.grad is None for p in b.module.parameters())


class WithAdam(Adapter):
    """Adapter with a torch Adam whose state it reads and writes."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.opt = torch.optim.Adam(self.module.parameters(), lr=0.1)

    def optimizer_for(self, phase):
        return self.opt

    def _write_optimizer(self, phase, scalars, slots) -> None:
        for name, p in self.module.named_parameters():
            if name in slots:
                self.opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": self.t(slots[name]["adam_m"]),
                                     "exp_avg_sq": self.t(slots[name]["adam_v"])}


def test_optimizer_state_items_streams_the_snapshot_and_a_spilled_state_loads_slot_by_slot():
    from harness.memory import Spill

    torch.manual_seed(0)
    a = WithAdam(Net(), TABLE, dtype="float32")
    a.module.conv.weight.sum().backward()
    a.opt.step()
    whole = a.optimizer_state()
    items = a.optimizer_state_items()
    first = next(items)
    assert first[0] == "optim.global_step"  # scalars first
    rest = dict([first, *items])
    assert list(rest) == list(whole) and all(np.array_equal(rest[k], whole[k]) for k in whole)
    live = a.opt.state[a.module.conv.weight]["exp_avg"].numpy()
    assert not np.shares_memory(rest["conv.kernel/adam_m"], live)  # each a snapshot: the next step leaves it as it is
    assert np.array_equal(rest["conv.kernel/adam_m"], np.transpose(live, (2, 3, 1, 0)))
    spill = Spill()  # loaded back from disk (each slot read when the optimizer takes it) and from the dict
    try:
        spill.put("o", a.optimizer_state_items())
        for source in (spill.get("o", copy=True), spill.get("o"), whole):
            c = WithAdam(Net(), TABLE, dtype="float32")
            c.set_optimizer_state(source)
            again = c.optimizer_state()
            assert all(np.array_equal(again[k], whole[k]) for k in whole if k.endswith(("adam_m", "adam_v")))
            assert not any(np.shares_memory(st["exp_avg"].numpy(), np.asarray(v)) for st in c.opt.state.values()
                           for v in whole.values())  # its own memory, not the caller's arrays
    finally:
        spill.close()

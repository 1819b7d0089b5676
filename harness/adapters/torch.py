"""Any ``nn.Module`` plus a mapping table, driven as a :class:`harness.protocols.PortSide`.

The table (harness/transplant.py) maps canonical names onto the module's ``state_dict`` keys with a
layout transform; from it this base derives canonical weights (strict set, round trip), gradients,
the optimizer state (torch ``Adam``'s ``exp_avg`` / ``exp_avg_sq`` / ``step`` by default), the
isolated optimizer update and a checkpoint. Our DPSOM port goes through it exactly as a user's port
does (harness/adapters/dpsom.py; docs/bring-your-own-port.md has the template).

A subclass provides what only it knows: ``forward(batch)`` (canonical tensor names), ``losses``,
``loss_tensor(loss, batch)`` (for gradients), ``optimizer_step(phase, lr_feed)`` and
``learning_rate_at``, and ``optimizer_for(phase)``; optionally ``forward_isolated`` and
``bn_modules`` (for the BatchNorm detector's trace).

Partial mappings: a canonical name whose row holds only a slice of it (``slice(...)``), or whose
``torch_key`` is empty, is in ``absent``: set_weights writes what maps, get_weights / gradients /
optimizer state leave it out, and the engine reports it STRUCTURAL. A port's own randomness
(``nn.Dropout``) is injected: every dropout mask is drawn from numpy PCG64 keyed by the noise seed,
the module's name and its call index within one public call, so the float32 and float64 copies of a
port see the same masks and its float32 vs float64 floor stays a rounding floor.
"""

from __future__ import annotations

import contextlib
import os
import warnings
import zlib
from typing import Any
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from harness.memory import as_zero_view
from harness.protocols import Batch, Unsupported
from harness.transplant import Row, TransplantError, canonical_shape, canonical_to_torch, check_weights, load_table, torch_to_canonical


def _own(canonical: np.ndarray, live: np.ndarray) -> np.ndarray:
    """A snapshot of a live tensor's canonical value: copied where it still shares the tensor's memory (no
    layout change), else the transform's copy itself (one copy of a 0.5 GB float64 slot, not two)."""
    return canonical.copy() if np.may_share_memory(canonical, live) else canonical


class _Deferred:
    """One optimizer slot handed to ``_write_optimizer``, in torch layout: its ``shape`` known up front (for
    the strict checks), its values read from ``state`` only by ``np.asarray()`` / ``np.array()``, each time
    a new writable array of its own (a zero view, :mod:`harness.memory`, becomes zeros) that the optimizer
    copies and drops. From a spilled state (memory maps opened per access) no slot stays resident beside
    the live ones: conv DPSOM float64, 1 GiB."""

    def __init__(self, state: Mapping[str, Any], name: str, transform: str) -> None:
        self._state, self._name, self._transform = state, name, transform
        self._fresh = getattr(state, "fresh", False)  # a spill read into new memory at each access: used as it is
        header = state.mapped() if self._fresh else state  # a memory map's pages stay unread
        view = canonical_to_torch(np.asarray(header[name]), transform)
        self.shape, self.dtype, self.ndim = view.shape, view.dtype, view.ndim

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        value = np.asarray(self._state[self._name])
        if not (self._fresh and value.flags.writeable):
            value = np.array(value)
        return canonical_to_torch(value, self._transform).astype(dtype or value.dtype, copy=False)


class TorchPortAdapter:
    """Table-driven base; see the module docstring for what a subclass adds."""

    name = "torch-port"

    def __init__(self, module: Any, table: Sequence[Row] | str, config: Any = None, dtype: str = "float32", device: str = "cpu",
                 noise_seed: int = 0) -> None:
        import torch

        self._torch = torch
        self.config, self.dtype, self.device = config, dtype, torch.device(device)
        self._tdtype = getattr(torch, dtype)
        self.module = module.to(device=self.device, dtype=self._tdtype)
        self.table = tuple(load_table(table) if isinstance(table, (str, os.PathLike)) else table)
        state = self.module.state_dict(keep_vars=True)
        unknown = sorted(r.torch_key for r in self.table if r.torch_key and r.torch_key not in state)
        if unknown:
            raise TransplantError(f"{type(self).__name__}: mapping table names torch keys the module does not have: {unknown}; "
                                  f"module keys: {sorted(state)}")
        self._tensors = state
        by_name: dict[str, list[Row]] = {}
        for r in self.table:
            by_name.setdefault(r.canonical, []).append(r)
        self._rows = by_name
        partial = {k for k, rows in by_name.items() if any(r.partial or not r.torch_key for r in rows)}
        self.absent = frozenset(partial | {f"{k}/{slot}" for k in partial for slot in ("adam_m", "adam_v")})  # and their Adam slots
        self._noise_seed, self._calls = noise_seed, {}
        for mod_name, m in self.module.named_modules():
            if isinstance(m, torch.nn.Dropout):
                m.register_forward_hook(self._dropout_hook(mod_name))

    # --- conversions ----------------------------------------------------------------------------
    def t(self, a: Any):
        """numpy -> contiguous tensor on this side's device; floats in this side's dtype (one copy at most)."""
        a = np.asarray(a)
        t = self._torch.as_tensor(a, device=self.device)
        if a.dtype.kind == "f" and t.dtype != self._tdtype:
            return t.to(self._tdtype, memory_format=self._torch.contiguous_format)
        return t.contiguous()  # (``to`` with an unchanged dtype returns a strided tensor as it is)

    def _host(self, a: np.ndarray):
        """A CPU tensor over ``a``'s own memory, any strides, for ``copy_`` to read (a read-only memory map
        too: nothing writes to it, so torch's warning about writing to one does not apply)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
            return self._torch.from_numpy(np.asarray(a))

    @staticmethod
    def numpy(t: Any) -> np.ndarray:
        return t.detach().cpu().numpy()

    def _full_rows(self) -> Iterator[Row]:
        return (rows[0] for name, rows in self._rows.items() if name not in self.absent)

    # --- weights --------------------------------------------------------------------------------
    def canonical_shapes(self) -> dict[str, tuple[int, ...]]:
        return {r.canonical: canonical_shape(tuple(self._tensors[r.torch_key].shape), r.torch_transform) for r in self._full_rows()}

    def get_weights(self) -> dict[str, np.ndarray]:
        out = {}
        for r in self._full_rows():
            live = self.numpy(self._tensors[r.torch_key])
            out[r.canonical] = _own(torch_to_canonical(live, r.torch_transform), live)
        return out

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Strict over the mapped names; partially mapped names get the part that maps."""
        given = {k: v for k, v in weights.items() if k not in self.absent}  # partially mapped: optional, checked below
        check_weights(given, self.canonical_shapes(), where=f"{self.name}.set_weights")
        values = self._torch_layout(weights, self._tensors, "set_weights: nothing loaded;", "the module holds")
        with self._torch.no_grad():
            for key, v in values:
                self._tensors[key].copy_(self._host(v))  # one pass: layout, dtype and device

    def _torch_layout(self, values: Mapping[str, Any], targets: Mapping[str, Any], where: str, holds: str) -> list[tuple[str, np.ndarray]]:
        """(torch key, value in torch layout: a view) of every mapped name of ``values`` whose torch key is
        in ``targets``, every shape checked against the target's before the caller writes anything."""
        out = []
        for name, rows in self._rows.items():
            for r in rows:
                if name in values and r.torch_key in targets:
                    v, shape = canonical_to_torch(np.asarray(values[name]), r.torch_transform), tuple(targets[r.torch_key].shape)
                    if tuple(v.shape) != shape:
                        raise TransplantError(f"{self.name}.{where} {name} -> {r.torch_key} ({r.torch_transform}) gives {v.shape}, {holds} {shape}")
                    out.append((r.torch_key, v))
        return out

    # --- gradients and the isolated optimizer update ------------------------------------------
    def loss_tensor(self, loss: str, batch: Batch):
        raise Unsupported(f"{type(self).__name__} does not provide loss_tensor()")

    def applied_gradients(self) -> dict[str, np.ndarray]:
        """The ``.grad`` now on the parameters, canonical; none (and partially mapped ones) absent."""
        params = dict(self.module.named_parameters())
        return {r.canonical: torch_to_canonical(self.numpy(params[r.torch_key].grad), r.torch_transform)
                for r in self._full_rows() if r.torch_key in params and params[r.torch_key].grad is not None}

    def gradients(self, loss: str, batch: Batch) -> dict[str, np.ndarray]:
        """d loss / d weight, canonical; weights without gradient (and partially mapped ones) absent."""
        params = dict(self.module.named_parameters())
        with self.noise_scope():
            for p in params.values():
                p.grad = None
            self.loss_tensor(loss, batch).backward()
        out, rows = {}, list(self._full_rows())
        last = {r.torch_key: i for i, r in enumerate(rows)}
        for i, r in enumerate(rows):  # each .grad dropped once converted: never a parameter's grad twice in memory
            p = params.get(r.torch_key)
            if p is not None and p.grad is not None:
                out[r.canonical] = torch_to_canonical(self.numpy(p.grad), r.torch_transform)
                if last[r.torch_key] == i:
                    p.grad = None
        for p in params.values():
            p.grad = None
        return out

    def optimizer_step(self, phase: str, lr_feed: float) -> dict[str, Any]:
        """Apply the ``.grad`` now on the parameters with ``phase``'s optimizer; ``{"lr", "global_step"}``."""
        raise Unsupported(f"{type(self).__name__} does not provide optimizer_step()")

    def set_compiled(self, on: bool) -> None:
        """The protocol's optional switch to a compiled training step (the timing tier's fast mode): the
        ``compiled`` attribute of the adapter's ``trainer`` where it has one (the suite's ports), else
        :class:`Unsupported`."""
        trainer = getattr(self, "trainer", None)
        if not hasattr(trainer, "compiled"):
            raise Unsupported(f"{type(self).__name__} does not provide set_compiled() (no trainer with a 'compiled' switch)")
        trainer.compiled = on

    def apply_gradients(self, phase: str, gradients: Mapping[str, np.ndarray], lr_feed: float) -> dict[str, Any]:
        params = dict(self.module.named_parameters())
        for p in params.values():
            p.grad = None
        for key, g in self._torch_layout(gradients, params, "apply_gradients:", "the parameter is"):  # none set on a bad shape
            params[key].grad = self._torch.empty_like(params[key]).copy_(self._host(g))  # one copy, as set_weights
        try:
            return self.optimizer_step(phase, lr_feed)
        finally:
            for p in params.values():  # applied: not kept on the parameters (a copy of every weight)
                p.grad = None

    # --- optimizer state (canonical) -------------------------------------------------------------
    def optimizer_for(self, phase: str | None):
        """The torch optimizer ``phase`` steps with (None: none yet)."""
        raise Unsupported(f"{type(self).__name__} does not provide optimizer_for()")

    global_step = 0

    def _read_optimizer(self, phase: str | None) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
        """(scalars, {torch_key: {slot: array}}) of torch ``Adam``. β powers in TF1's convention (the
        power the *next* step uses: β after 0 steps, β^(t+1) after t); a parameter without state yet
        (never had a gradient) has zero moments, which is what torch's Adam starts it from."""
        opt = self.optimizer_for(phase)
        if opt is None:
            return {"optim.global_step": np.int64(self.global_step)}, {}
        names = {id(p): k for k, p in self.module.named_parameters()}
        slots, step = {}, 0
        for group in opt.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                st = opt.state.get(p, {})
                if "exp_avg" in st:
                    slots[names[id(p)]] = {"adam_m": self.numpy(st["exp_avg"]), "adam_v": self.numpy(st["exp_avg_sq"])}
                    step = max(step, int(st["step"]))  # one shared step count in practice; never below any
                else:
                    zero = np.zeros(tuple(p.shape), self.numpy(p).dtype)
                    slots[names[id(p)]] = {"adam_m": zero, "adam_v": zero.copy()}
        return ({"optim.global_step": np.int64(self.global_step), "optim.beta1_power": np.float32(b1) ** (step + 1),
                 "optim.beta2_power": np.float32(b2) ** (step + 1)}, slots)

    def _write_optimizer(self, phase: str | None, scalars: Mapping[str, Any], slots: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        raise Unsupported(f"{type(self).__name__} cannot set its optimizer state")

    def optimizer_state(self, phase: str | None = None) -> dict[str, Any]:
        """A snapshot: a slot whose canonical layout is a view of what ``_read_optimizer`` gave (the
        optimizer's live tensor) is copied, so later steps do not change it; an all-zero one (before
        the first step) is a read-only zero-strided view instead (conv DPSOM: 0.5 GiB not copied)."""
        return dict(self.optimizer_state_items(phase))

    def optimizer_state_items(self, phase: str | None = None) -> Iterator[tuple[str, Any]]:
        """:meth:`optimizer_state` one entry at a time, scalars first, each slot's snapshot copied as it is
        yielded (the protocol's streaming form: nothing may step the optimizer until the last one)."""
        scalars, slots = self._read_optimizer(phase)
        yield from scalars.items()
        for r in self._full_rows():
            for slot, value in slots.get(r.torch_key, {}).items():
                yield f"{r.canonical}/{slot}", _own(as_zero_view(torch_to_canonical(value, r.torch_transform)), value)

    def set_optimizer_state(self, state: Mapping[str, Any], phase: str | None = None) -> None:
        scalars, slots, unknown = {}, {}, []
        for name in state:  # a value is read when the optimizer takes it (a spilled state: one slot in memory at a time)
            if name.startswith("optim."):
                scalars[name] = state[name]
                continue
            canonical, _, slot = name.rpartition("/")
            if canonical not in self._rows:
                unknown.append(name)
                continue
            for r in self._rows[canonical]:  # a partially mapped weight gets the part of its slot that maps
                if r.torch_key:
                    slots.setdefault(r.torch_key, {})[slot] = _Deferred(state, name, r.torch_transform)
        if unknown:
            raise TransplantError(f"{self.name}.set_optimizer_state: nothing loaded; unexpected: {sorted(unknown)}")
        self._write_optimizer(phase, scalars, slots)

    # --- injected randomness ----------------------------------------------------------------------
    @contextlib.contextmanager
    def noise_scope(self) -> Iterator[None]:
        """One public call: dropout call indices restart, so both dtype copies draw the same masks."""
        self._calls = {}
        yield

    def _dropout_hook(self, mod_name: str):
        def hook(module, args, output):
            if not module.training or module.p == 0:
                return output
            index = self._calls[mod_name] = self._calls.get(mod_name, -1) + 1
            rng = np.random.Generator(np.random.PCG64([self._noise_seed, zlib.crc32(mod_name.encode()), index]))
            keep = rng.random(tuple(args[0].shape)) >= module.p
            return args[0] * self.t(keep) / (1.0 - module.p)
        return hook

    # --- BatchNorm trace (harness/bn_detector.py) --------------------------------------------------
    def bn_modules(self) -> dict[str, Any]:
        """``{canonical BN name: module}``; the default finds none (the detector then says so)."""
        return {}

    def trace(self, batch: Batch, step: tuple[str, float] | None = None) -> dict[str, np.ndarray]:
        """Forward tensors + ``<bn>.input`` (NHWC) of one run; with ``step`` the run inside that step."""
        seen: dict[str, np.ndarray] = {}

        def keep(name: str):
            def hook(module, args, output) -> None:
                for key, t in ((f"{name}.input", args[0]), (name, output)):
                    t = t.detach()
                    seen.setdefault(key, self.numpy(t.permute(0, 2, 3, 1) if t.dim() == 4 else t).copy())
            return hook

        hooks = [m.register_forward_hook(keep(n)) for n, m in self.bn_modules().items()]
        try:
            if step is None:
                out = self.forward(batch)
                return {**out, **{k: v for k, v in seen.items() if k not in out}}
            self.step(step[0], batch, step[1])
            return seen
        finally:
            for h in hooks:
                h.remove()

    # --- checkpoint -------------------------------------------------------------------------------
    def save_checkpoint(self, path: str) -> str:
        """The module's state_dict (torch.save, loadable with ``weights_only=True``), atomically."""
        tmp = f"{path}.tmp"
        self._torch.save(self.module.state_dict(), tmp)
        os.replace(tmp, path)
        return path

    def forward_isolated(self, batch: Batch, teacher: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise Unsupported(f"{type(self).__name__} cannot feed its layers another side's inputs")

    # --- the port's own initialisers (harness/tier_init.py) ---------------------------------------
    def fresh_module(self) -> Any:
        """A new instance of the port's module, initialised by the port's own code (its constructor),
        drawing from torch's global generator. There is no generic way: ``reset_parameters()`` runs
        torch's defaults, which a port that re-initialises after construction (Keras' Glorot-uniform on
        an ``nn.Linear``) does not use; a subclass that can build its module says how."""
        raise Unsupported(f"{type(self).__name__} does not provide fresh_module() (a new module from the port's own initialisers)")

    _initial_draws = 0

    def initial_weights(self) -> dict[str, np.ndarray]:
        """A fresh module's weights, canonical (:meth:`fresh_module`). Draw k uses torch's generator
        seeded from (noise seed, k) inside ``fork_rng``: every call a new, independent, reproducible
        draw, and torch's global stream is left as it was."""
        torch = self._torch
        self._initial_draws += 1
        seed = int(np.random.SeedSequence([self._noise_seed, 0x1417, self._initial_draws]).generate_state(1)[0])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = self.fresh_module()
        state = module.state_dict()
        del module
        return {r.canonical: torch_to_canonical(self.numpy(state[r.torch_key]), r.torch_transform) for r in self._full_rows()}

    def prepare_data(self, raw: Mapping[str, np.ndarray], validation: bool = False) -> dict[str, np.ndarray]:
        """The port's own data path (data tier); a port that has none to offer raises Unsupported."""
        raise Unsupported(f"{type(self).__name__} does not provide prepare_data() (its own data path)")

    def profile_step(self, phase: str, batch: Batch, lr_feed: float) -> dict[str, Any]:
        """One :meth:`step` under ``torch.profiler``, op times per canonical layer of the mapping table
        (``harness.timing.profile_step``: a range around each mapped module, backward by sequence number)."""
        from harness.timing import profile_step

        return profile_step(self, lambda: self.step(phase, batch, lr_feed), str(self.device))

    # --- optional: own training loop and evaluation (harness/tier_ownloop.py, harness/tier_eval.py) ---
    def fit_records(self, data: Mapping[str, np.ndarray], eps: Any = None, epochs: tuple[int, int] | None = None) -> list[dict[str, Any]]:
        raise Unsupported(f"{type(self).__name__} does not run its own training loop for the harness (fit_records)")

    def evaluate_assignments(self, data: Mapping[str, np.ndarray], eps: Any = None) -> dict[str, Any]:
        raise Unsupported(f"{type(self).__name__} does not run its own evaluation for the harness (evaluate_assignments)")

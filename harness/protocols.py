"""The two sides the engine drives, as typed protocols: every method the engine calls, nothing else.

A *batch* is a mapping of named arrays whose first axis is the sample axis (DPSOM: ``x`` [B, 28,
28, 1], ``eps`` [B, D], ``p`` [B, K]); the engine splits it in two for the reference's noise floor
and never looks inside. All weights, gradients, optimizer state and forward tensors are keyed by
canonical name in the canonical (TF) layout (DESIGN.md). Phases are the spec's phase names.

``ReferenceSide`` is what the reference implements (and what the original code, wrapped, would);
``PortSide`` adds what the engine needs to isolate a port's layers and its optimizer. A port that
cannot support a method raises :class:`Unsupported`; the engine then reports the section as
skipped with that reason instead of failing the run. ``docs/interface.md``'s method table is
generated from these classes (``python -m harness.protocols``) and a test keeps the two in step.
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol, runtime_checkable
from collections.abc import Iterator, Mapping

import numpy as np

Batch = Mapping[str, np.ndarray]
Arrays = dict[str, np.ndarray]


class Unsupported(NotImplementedError):
    """A side does not provide this capability (e.g. a user's port without isolated layers)."""


@runtime_checkable
class ReferenceSide(Protocol):
    """What the engine calls on the reference (T0–T4, BatchNorm detector, dumps)."""

    name: str
    config: Any

    def get_weights(self) -> Arrays:
        """Every weight of the mapping table, canonical names and layout (BN statistics included)."""

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Strict: every missing / unexpected / mis-shaped name listed, nothing written."""

    def forward(self, batch: Batch) -> Arrays:
        """Every named intermediate of one forward pass, canonical layout, in execution order."""

    def losses(self, batch: Batch) -> dict[str, float]:
        """Every loss term (canonical names) on the batch."""

    def gradients(self, loss: str, batch: Batch) -> Arrays:
        """d loss / d weight for the weights that receive a gradient (the others absent)."""

    def step(self, phase: str, batch: Batch, lr_feed: float, return_gradients: bool = False) -> dict[str, Any]:
        """One optimizer step of ``phase``: the phase's loss terms before the update, ``lr`` (effective),
        ``global_step`` after it; with ``return_gradients`` also ``gradients``, the ones applied."""

    def optimizer_state(self, phase: str | None = None) -> dict[str, Any]:
        """Optimizer state in canonical names (``<weight>/adam_m``, ``optim.global_step`` ...) of the
        optimizer ``phase`` uses (a side with one shared optimizer ignores ``phase``)."""

    def set_optimizer_state(self, state: Mapping[str, Any], phase: str | None = None) -> None:
        """Strict like :meth:`set_weights`."""

    def optimizer_constants(self, phase: str | None = None) -> dict[str, Any]:
        """The optimizer's constants as the side's optimizer object holds them (T0)."""

    def learning_rate_at(self, phase: str, lr_feed: float, global_step: int) -> float:
        """The effective learning rate a step of ``phase`` fed ``lr_feed`` uses at ``global_step``."""

    def trace(self, batch: Batch, step: tuple[str, float] | None = None) -> Arrays:
        """Forward tensors plus ``<bn>.input`` for every BatchNorm, from ONE run (training mode);
        with ``step=(phase, lr_feed)`` that run is the forward inside the optimizer step, which is taken."""

    def save_checkpoint(self, path: str) -> str:
        """Write a checkpoint in the original code's format and names; returns what to read it back from."""

    def initial_weights(self) -> Arrays:
        """Optional: a fresh draw of every weight from the side's OWN initialisers, canonical names and
        layout; each call a new, independent draw; the side's current weights are left untouched.

        The native-initialiser tier (harness/tier_init.py) draws it many times and tests it against
        the spec's distributions; a side without it raises :class:`Unsupported` (SKIPPED)."""

    def prepare_data(self, raw: Mapping[str, np.ndarray], validation: bool = False) -> Arrays:
        """Optional (data tier): the side's own data path on raw arrays, as its model is fed them.

        ``raw``: ``x_train``, ``y_train``, ``x_test``, ``y_test`` as distributed (uint8 images,
        integer labels; MNIST's 60k/10k or any smaller set of that form). Returns, by canonical name:
        ``data.x_train``/``data.y_train`` (the training set, in the side's order), ``data.x_val``/
        ``data.y_val`` (the stream logged during training), ``data.x_eval``/``data.y_eval`` (the final
        evaluation set), each image array in the dtype the model is fed; and the batch order as
        index rows, row i = the indices of batch i, a short batch padded with -1:
        ``data.train_batches`` (into ``data.x_train``, the batches the training loop takes in its
        first two epochs) and ``data.eval_batches`` (into ``data.x_eval``, the evaluation's batches).
        A loader that cannot yield indices runs over ``arange(n)`` in their place (e.g. a
        ``DataLoader`` over a ``TensorDataset`` of indices with the port's own sampler).
        ``validation``: the original's switch that makes a split held out of the training pool the
        logged stream and the evaluation set (a model without one ignores it)."""

    # --- optional: the side's own training loop and evaluation (own-loop T4, evaluation tier) ---
    def fit_records(self, data: Mapping[str, np.ndarray], eps: Any = None, epochs: tuple[int, int] | None = None) -> list[dict[str, Any]]:
        """Optional (else :class:`Unsupported`). Run the side's OWN training loop over its config's
        whole schedule on ``data`` (the spec's named arrays) from the current weights; ``eps(shape)``
        gives the noise of each forward the loop makes, in the order it makes them. Returns one
        record per optimizer step: ``phase``, ``epoch``, ``global_step`` (after it), ``lr_feed``,
        ``lr`` (effective), ``p`` / ``p_step`` (the per-epoch target the step used and the global
        step it was computed at; None where the phase has none) and every loss term of the phase.

        ``epochs=(start, stop)``: only epochs start..stop-1 of the schedule, from the current weights
        and optimizer state (none past its end: ``[]``); what the run matrix checkpoints between, so
        an interrupted run resumes. A loop that carries state beyond weights and optimizer from one
        epoch to the next raises :class:`Unsupported` for it (the matrix then runs it whole)."""
        raise Unsupported(f"{type(self).__name__} does not provide fit_records()")

    def profile_step(self, phase: str, batch: Batch, lr_feed: float) -> dict[str, Any]:
        """Optional (else :class:`Unsupported`). One :meth:`step` under the framework's own profiler,
        its op times summed per canonical layer (``layers``: forward / backward, CPU / device ms), per
        top-level name, in all (``total``) and not attributed to a layer (``unattributed``): the layout of
        ``harness.timing.attribute``. The step is taken (the side's weights move)."""
        raise Unsupported(f"{type(self).__name__} does not provide profile_step()")

    def evaluate_assignments(self, data: Mapping[str, np.ndarray], eps: Any = None) -> dict[str, Any]:
        """Optional (else :class:`Unsupported`). The side's OWN evaluation from the current weights,
        ``eps(shape)`` feeding its noise: ``assignments`` (int array, per evaluated input, in order),
        ``labels`` (their ground truth), ``metrics`` ({name: float}), ``assign_from`` (what the
        assignment is computed from, e.g. "z sample" / "mu"), ``nmi_average`` (the NMI averaging) and,
        optionally, ``distances`` ([N, K]: what each assignment is the argmin of, to tell rounding ties)."""
        raise Unsupported(f"{type(self).__name__} does not provide evaluate_assignments()")


@runtime_checkable
class PortSide(ReferenceSide, Protocol):
    """A port: the reference's methods plus the two the engine uses to isolate layers and the optimizer."""

    dtype: str
    absent: frozenset[str]  # canonical names the port has no counterpart for (partial mapping)

    def forward_isolated(self, batch: Batch, teacher: Mapping[str, np.ndarray]) -> Arrays:
        """Every named tensor, each layer fed the ``teacher``'s (the reference's) input to it."""

    def apply_gradients(self, phase: str, gradients: Mapping[str, np.ndarray], lr_feed: float) -> dict[str, Any]:
        """One optimizer update of ``phase`` from given canonical gradients; returns ``lr``, ``global_step``."""

    def set_compiled(self, on: bool) -> None:
        """Optional (else :class:`Unsupported`): take every later training step compiled (``torch.compile``)
        or eager again. The timing tier's fast mode; its drift from the exact mode is measured there, and
        no parity tier runs compiled."""
        raise Unsupported(f"{type(self).__name__} does not provide set_compiled()")

    def optimizer_state_items(self, phase: str | None = None) -> Iterator[tuple[str, Any]]:
        """Optional: :meth:`optimizer_state`'s entries one at a time, each value made as it is yielded.

        The engine writes each entry to disk before it takes the next and changes nothing on the side
        meanwhile, so the snapshot is never whole in memory (the conv DPSOM's float64 Adam slots: 1 GiB
        beside the live ones). A side without it: :meth:`optimizer_state`'s items."""
        return iter(self.optimizer_state(phase).items())


def methods(protocol: type) -> dict[str, str]:
    """``{method: one-line signature + first docstring line}`` of a protocol, its own and inherited."""
    out = {}
    for klass in reversed(protocol.__mro__):
        if klass in (object, Protocol, Any) or not getattr(klass, "_is_protocol", False):
            continue
        for name, fn in vars(klass).items():
            if callable(fn) and not name.startswith("_"):
                doc = (inspect.getdoc(fn) or "").split("\n\n")[0].replace("\n", " ")
                sig = str(inspect.signature(fn)).replace("'", "").replace("self, ", "").replace("(self)", "()").replace("|", "\\|")
                out[name] = f"`{name}{sig}` | {doc}"
    return out


def table() -> str:
    """The Markdown method table of docs/interface.md."""
    rows = ["| side | method | what |", "|---|---|---|"]
    ref = methods(ReferenceSide)
    rows += [f"| both | {v} |" for v in ref.values()]
    rows += [f"| port | {v} |" for k, v in methods(PortSide).items() if k not in ref]
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())

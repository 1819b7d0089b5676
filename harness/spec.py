"""The model spec: everything the engine knows about a model, in one object, and the registry.

A model is added by one new module ``harness/models/<name>.py`` defining ``SPEC`` (an instance of a
:class:`ModelSpec` subclass); the registry finds it by listing that package, so no engine file
changes. The spec builds both sides, draws the injected inputs, names the phases with their loss
and learning rate, each loss's batch reduction, the regime probes, the initialiser rule per
weight, the original-checkpoint reader and the model-specific part of the config as executed.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable, Mapping

import numpy as np

from harness.protocols import Arrays, Batch, PortSide, ReferenceSide, Unsupported


@dataclass(frozen=True)
class Phase:
    name: str
    loss: str  # the loss this phase's optimizer step minimises
    lr_feed: float  # the learning rate fed in the quick tier's one step


@dataclass(frozen=True)
class Probe:
    """A regime the default inputs never reach: T2 forward again with the weights transformed."""

    name: str
    weights: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
    why: str


@dataclass(frozen=True)
class T4Step:
    index: int
    phase: str
    lr_feed: float
    batch: int  # batch index within the epoch
    epoch_start: bool


@dataclass(frozen=True)
class ConfigCase:
    """One entry of a model's config matrix (harness/tier_matrix.py): the quick tier again with
    ``overrides`` (``key=value`` strings, as ``--config`` takes them) on both sides. ``why``: what
    it exercises that the defaults hide; ``original``: where the original code itself misbehaves
    under these values and the overrides carry a declared correction, what it does (reported)."""

    overrides: Mapping[str, str]
    why: str
    original: str = ""

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.overrides.items()) or "defaults"


class ModelSpec:
    """Base of every model spec; subclasses fill in the class attributes and methods."""

    name: str = ""
    variants: tuple[str, ...] = ()
    default_variants: tuple[str, ...] = ()  # what `nox -s parity` runs with no --variant
    phases: tuple[Phase, ...] = ()
    reductions: Mapping[str, str] = {}  # loss name -> "mean" | "sum" over the batch
    has_batchnorm: bool = False
    activation_slope_names: tuple[str, ...] = ()  # config fields holding activation slopes (diagnoses)
    reported_metrics: tuple[str, ...] = ("nmi", "purity")  # what the original reports (harness.metrics keys), T5 tables

    # --- config ---------------------------------------------------------------------------
    def get_config(self, variant: str, overrides: Mapping[str, str] | None = None) -> Any:
        """The variant's frozen config with ``key=value`` overrides (strings, coerced) applied."""
        raise NotImplementedError

    def replace_config(self, cfg: Any, overrides: Mapping[str, str]) -> Any:
        """``cfg`` with ``key=value`` overrides (strings, coerced) applied; unknown keys are an error."""
        raise NotImplementedError

    def config_dict(self, cfg: Any) -> dict[str, Any]:
        raise NotImplementedError

    def variant_of(self, cfg: Any) -> str:
        """The mapping-table variant ("dense" / "conv") a config builds."""
        raise NotImplementedError

    # --- sides ----------------------------------------------------------------------------
    def make_reference(self, cfg: Any, dtype: str = "float32") -> ReferenceSide:
        raise NotImplementedError

    def make_evaluation_reference(self, cfg: Any, dtype: str = "float64") -> ReferenceSide:
        """A reference that is only evaluated (weights set, forward, losses, gradients), never stepped
        nor asked for its optimizer state: the quick tier's float64 reference. A spec may build it
        without optimizer state (memory); by default it is :meth:`make_reference`."""
        return self.make_reference(cfg, dtype)

    def make_port(self, cfg: Any, dtype: str = "float32", device: str = "cpu") -> PortSide:
        raise NotImplementedError

    # --- injected inputs ------------------------------------------------------------------
    def load_data(self, cfg: Any, dataset: str | None, n: int) -> tuple[np.ndarray, str]:
        """``n`` training inputs as the original preprocesses them, and the data set's name."""
        raise NotImplementedError

    def draw_weights(self, shapes: Mapping[str, tuple[int, ...]], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Initial weights from the harness's stream, the original's initialiser per weight (default:
        Keras' by role, harness/init.py; a model with other rules overrides this)."""
        from harness.init import draw_weights

        return draw_weights(shapes, rng)

    def draw_inputs(self, cfg: Any, rng: np.random.Generator, x: np.ndarray) -> Batch:
        """The named batch of the quick tier: ``x`` plus every random quantity, from ``rng``."""
        raise NotImplementedError

    # --- what each side executes ------------------------------------------------------------
    def executed(self, side: ReferenceSide, batch: Batch) -> dict[str, Any]:
        """Model-specific T0 entries (e.g. the posterior's form), measured from the side's output."""
        return {}

    def constants(self, cfg: Any) -> dict[str, float]:
        """Named constants of the config that a difference may equal (diagnoses): n_pixels, slopes ..."""
        return {}

    def is_activation(self, name: str) -> bool:
        """Whether forward tensor ``name`` is an activation output (kink-flip explanation)."""
        return False

    # --- checkpoints and tables ---------------------------------------------------------------
    def read_original_checkpoint(self, path: str, cfg: Any, shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
        """Canonical weights from a checkpoint in the original code's names and format; every missing
        variable (and, given the canonical ``shapes``, every mis-shaped one) named in one error
        (``harness.transplant.TransplantError``), nothing returned; non-weight variables ignored."""
        raise NotImplementedError

    def check_original_checkpoint(self, path: str, cfg: Any, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
        """What :meth:`read_original_checkpoint` checks, before anything is read or built on it; returns
        the checkpoint's variables it ignores. Default: reads it (a spec can check names alone)."""
        self.read_original_checkpoint(path, cfg, shapes)
        return []

    def table_path(self, cfg: Any) -> Path:
        raise NotImplementedError

    def deviations_path(self) -> Path:
        return Path(__file__).resolve().parent / "deviations" / f"{self.name}.csv"

    # --- regimes and T4 -----------------------------------------------------------------------
    probes: tuple[Probe, ...] = ()

    def t4_plan(self, cfg: Any, steps: int, epoch_steps: int) -> list[T4Step]:
        raise NotImplementedError

    def t4_batches(self, cfg: Any, st: T4Step, rng: np.random.Generator, x_train: np.ndarray,
                   sides: Mapping[str, ReferenceSide], state: dict[str, Any]) -> dict[str, Batch]:
        """Per side label, the batch of T4 step ``st`` (each side's own model-dependent quantities,
        e.g. DPSOM's target distribution from that side's q); ``state`` persists across steps."""
        raise NotImplementedError

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)

    # --- native initialisers (harness/tier_init.py) ------------------------------------------------
    def initialisers(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        """Per canonical weight, the original's initial distribution (a :class:`harness.init.Initialiser`):
        the SAME rule table :meth:`draw_weights` draws from (default: Keras' by role, harness/init.py;
        a model that overrides :meth:`draw_weights` with other rules overrides this too)."""
        from harness.init import initialisers

        return initialisers(dict(shapes))

    # --- data tier (harness/tier_data.py) ----------------------------------------------------
    def make_data_reference(self, cfg: Any) -> ReferenceSide:
        """A reference asked only for its own data path (``prepare_data``): a spec may build it without
        the model or its framework; by default :meth:`make_reference`."""
        return self.make_reference(cfg)

    def data_rule(self, raw: Mapping[str, np.ndarray], cfg: Any, validation: bool) -> Arrays:
        """The original's data rule, written out independently of both sides: what ``prepare_data``
        (harness/protocols.py) must return for ``raw``, by the same names. Default: none (the data
        tier then reports its rule sections SKIPPED)."""
        raise Unsupported(f"the {self.name or type(self).__name__} spec states no data rule (data_rule)")

    # --- own-loop T4 and evaluation tier (harness/tier_ownloop.py, harness/tier_eval.py) ------------
    def ownloop_overrides(self, cfg: Any) -> dict[str, str]:
        """Config overrides that shrink each side's OWN schedule to a few steps per phase (every phase
        and stage present, a per-epoch quantity recomputed at least once, the LR decay reached)."""
        raise NotImplementedError(f"{self.name}: no reduced own-loop schedule")

    def ownloop_data(self, cfg: Any, dataset: str | None) -> tuple[dict[str, np.ndarray], str]:
        """The named arrays the sides' ``fit_records`` / ``evaluate_assignments`` take for the reduced
        run (sized from ``cfg``), and the data set's name."""
        raise NotImplementedError(f"{self.name}: no own-loop data")

    def evaluation_data(self, cfg: Any, dataset: str | None) -> tuple[dict[str, np.ndarray], str]:
        """The whole evaluation set as the original evaluates it (``evaluate_assignments``' data for
        the evaluation tier's ``full=True``), and the data set's name."""
        raise NotImplementedError(f"{self.name}: no evaluation data")

    # --- whole schedules (harness/matrix.py) --------------------------------
    def schedules(self, cfg: Any) -> dict[str, dict[str, str]]:
        """Named training schedules: config overrides per name (``original``: none; a reduced one sized
        for a CPU). None by default."""
        raise NotImplementedError(f"{self.name}: no named schedules")

    def schedule_data(self, cfg: Any, dataset: str | None, rng: np.random.Generator,
                      limit: int | None = None) -> tuple[dict[str, np.ndarray], str]:
        """What each side's ``fit_records`` takes for a whole schedule: the training data as the
        original uses it (its first ``limit`` examples only, if given: a CPU-sized run) and every
        random quantity of the run, drawn from ``rng``; and the data's name."""
        raise NotImplementedError(f"{self.name}: no schedule data")

    def final_evaluation(self, side: Any, cfg: Any, data: Mapping[str, np.ndarray], records: list[dict[str, Any]],
                         eps: Any) -> dict[str, Any]:
        """What a side reports at the end of a whole schedule, as the original reports it: by default
        its own ``evaluate_assignments`` on the schedule's data (``eps`` feeding its noise); a model
        adds its own metrics to ``metrics`` here. ``records``: the side's ``fit_records``."""
        return side.evaluate_assignments(data, eps)

    # --- config matrix ------------------------------------------------------------------------
    def config_matrix(self, variant: str) -> tuple[ConfigCase, ...]:
        """Non-default configs the quick tier runs again on both sides (harness/tier_matrix.py), so a
        bug that shows only off the defaults (a constant hard-coded to its default value, a grid
        assumed square, a batch assumed even) is seen. None by default."""
        return ()


def models() -> dict[str, ModelSpec]:
    """Every model spec under ``harness/models/`` (one module each, defining ``SPEC``)."""
    import harness.models as package

    out = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"harness.models.{info.name}")
        spec = getattr(module, "SPEC", None)
        if isinstance(spec, ModelSpec):
            out[spec.name] = spec
    return out


def get_spec(name: str) -> ModelSpec:
    known = models()
    if name not in known:
        raise KeyError(f"unknown model {name!r}; known: {sorted(known)}")
    return known[name]

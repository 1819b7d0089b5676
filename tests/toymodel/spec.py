"""The toy's model spec: everything the engine knows about the toy, from this file alone.

Batch: ``x`` [B, d] (synthetic, a fixed PCG64 stream of its own) and ``c`` [B, latent], each
sample's assigned centre: ``n_centres`` centres and one assignment per sample drawn from the run's
stream. Two phases on one SGD with momentum: "pretrain" (loss.recon, a batch mean) and "cluster"
(loss.cluster, a batch SUM: the batch-split floor must add the halves, not average them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from harness.protocols import Batch, ReferenceSide
from harness.spec import ModelSpec, Phase, T4Step

HERE = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    d: int = 6
    hidden: int = 5
    latent: int = 3
    n_centres: int = 3
    batch_size: int = 8
    momentum: float = 0.9


def _coerce(cfg: ToyConfig, overrides: Mapping[str, Any]) -> dict[str, Any]:
    types = {f.name: f.type for f in dataclasses.fields(cfg)}
    unknown = sorted(set(overrides) - set(types))
    if unknown:
        raise KeyError(f"unknown config keys {unknown}; known: {sorted(types)}")
    return {k: {"int": int, "float": float}[types[k]](v) for k, v in overrides.items()}


class ToySpec(ModelSpec):
    name = "toy"
    variants = default_variants = ("tiny",)
    phases = (Phase("pretrain", "loss.recon", 1e-3), Phase("cluster", "loss.cluster", 1e-2))
    reductions = {"loss.recon": "mean", "loss.cluster": "sum"}
    has_batchnorm = False

    def get_config(self, variant: str, overrides: Mapping[str, str] | None = None) -> ToyConfig:
        if variant not in self.variants:
            raise KeyError(f"unknown variant {variant!r}; known: {self.variants}")
        return self.replace_config(ToyConfig(), overrides or {})

    def replace_config(self, cfg: ToyConfig, overrides: Mapping[str, str]) -> ToyConfig:
        return dataclasses.replace(cfg, **_coerce(cfg, overrides))

    def config_dict(self, cfg: ToyConfig) -> dict[str, Any]:
        return dataclasses.asdict(cfg)

    def variant_of(self, cfg: ToyConfig) -> str:
        return "tiny"

    def make_reference(self, cfg: ToyConfig, dtype: str = "float32") -> ReferenceSide:
        from .reference import NumpyReference

        return NumpyReference(cfg, dtype)

    def make_port(self, cfg: ToyConfig, dtype: str = "float32", device: str = "cpu"):
        from .port import ToyPort

        return ToyPort(cfg, dtype, device)

    def load_data(self, cfg: ToyConfig, dataset: str | None, n: int) -> tuple[np.ndarray, str]:
        """Three Gaussian blobs in d dimensions, from a stream of its own (the same for every seed)."""
        rng = np.random.Generator(np.random.PCG64(1234))
        means = rng.normal(0.0, 1.0, (3, cfg.d))
        return (means[rng.integers(3, size=n)] + 0.3 * rng.standard_normal((n, cfg.d))).astype(np.float32), "synthetic-blobs"

    def draw_weights(self, shapes: Mapping[str, tuple[int, ...]], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Kernels Glorot-uniform, biases N(0, 0.1) (non-zero, so a bias mapping is exercised)."""
        out = {}
        for name, shape in shapes.items():
            if name.endswith(".kernel"):
                limit = np.sqrt(6.0 / sum(shape))
                out[name] = rng.uniform(-limit, limit, shape).astype(np.float32)
            else:
                out[name] = rng.normal(0.0, 0.1, shape).astype(np.float32)
        return out

    def _centre_rows(self, cfg: ToyConfig, rng: np.random.Generator, n: int) -> np.ndarray:
        centres = rng.normal(0.0, 1.0, (cfg.n_centres, cfg.latent))
        return centres[rng.integers(cfg.n_centres, size=n)].astype(np.float32)

    def draw_inputs(self, cfg: ToyConfig, rng: np.random.Generator, x: np.ndarray) -> Batch:
        return {"x": x, "c": self._centre_rows(cfg, rng, len(x))}

    def constants(self, cfg: ToyConfig) -> dict[str, float]:
        return {"batch_size": float(cfg.batch_size), "d": float(cfg.d), "latent": float(cfg.latent)}

    def read_original_checkpoint(self, path: str, cfg: ToyConfig) -> dict[str, np.ndarray]:
        with np.load(path) as f:
            return {k: f[k] for k in f.files}

    def table_path(self, cfg: ToyConfig) -> Path:
        return HERE / "table.csv"

    def deviations_path(self) -> Path:
        return HERE / "deviations.csv"

    # --- T4 ---------------------------------------------------------------------------------------
    def t4_plan(self, cfg: ToyConfig, steps: int, epoch_steps: int) -> list[T4Step]:
        """The first half pretraining, the rest clustering (at least one step each)."""
        n_pre = max(1, steps // 2)
        return [T4Step(i, ph.name, ph.lr_feed, i % epoch_steps, i % epoch_steps == 0)
                for i in range(max(steps, n_pre + 1)) for ph in [self.phases[0] if i < n_pre else self.phases[1]]]

    def t4_batches(self, cfg: ToyConfig, st: T4Step, rng: np.random.Generator, x_train: np.ndarray,
                   sides: Mapping[str, ReferenceSide], state: dict[str, Any]) -> dict[str, Batch]:
        """Each training example keeps one centre row for the whole run (drawn at the first step)."""
        if "c" not in state:
            state["c"] = self._centre_rows(cfg, rng, len(x_train))
        rows = slice(st.batch * cfg.batch_size, (st.batch + 1) * cfg.batch_size)
        return {k: {"x": x_train[rows], "c": state["c"][rows]} for k in sides}


TOY = ToySpec()

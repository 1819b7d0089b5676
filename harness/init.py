"""Initial weights drawn once with numpy PCG64 and fed to both sides (DESIGN.md, Randomness).

The distributions are the original's Keras initialisers, chosen by the canonical name's role
(:data:`RULES`, one table read by both the harness's draw and the native-initialiser tier,
harness/tier_init.py): kernels Glorot-uniform ``U(-l, l)``, ``l = sqrt(6 / (fan_in + fan_out))``
with Keras' fan rule (receptive field x the last two axes, so Conv2DTranspose's swapped axes give
the same sum); biases, BN beta and moving mean 0; BN gamma and moving variance 1; SOM embeddings a
normal with sd 0.05 re-drawn beyond 2 sd (``TruncatedNormal(stddev=0.05)``). Only the shapes come
from the side.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np

EMBEDDING_STDDEV = 0.05
TRUNCATION_SDS = 2.0  # TF's truncated_normal: a draw beyond 2 sd is drawn again

# (canonical-name pattern, Keras initialiser): the first matching pattern decides
RULES: tuple[tuple[str, str], ...] = (
    ("*.kernel", "glorot_uniform"),
    ("*.bias", "zeros"), ("*.beta", "zeros"), ("*.moving_mean", "zeros"),
    ("*.gamma", "ones"), ("*.moving_variance", "ones"),
    ("som.embeddings", "truncated_normal"),
)


def glorot_limit(shape: tuple[int, ...]) -> float:
    """Keras' Glorot-uniform bound: receptive field x the last two axes as fan in / fan out."""
    receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    fan_in, fan_out = receptive * shape[-2], receptive * shape[-1]
    return float(np.sqrt(6.0 / (fan_in + fan_out)))


@dataclass(frozen=True)
class Initialiser:
    """One weight's initial distribution: ``kind`` "uniform" (``U(-scale, scale)``), "truncated_normal"
    (``N(0, scale^2)`` re-drawn beyond ``TRUNCATION_SDS`` sd) or "constant" (every element ``scale``);
    ``keras`` names it as Keras does."""

    kind: str
    scale: float
    keras: str

    @property
    def bound(self) -> float:
        """The support's bound: every |w| <= bound (the constant itself for a constant)."""
        return self.scale * TRUNCATION_SDS if self.kind == "truncated_normal" else abs(self.scale)

    def draw(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        if self.kind == "uniform":
            return rng.uniform(-self.scale, self.scale, size=shape)
        if self.kind == "constant":
            return np.full(shape, self.scale)
        out = rng.normal(0.0, self.scale, size=shape)
        bad = np.abs(out) > TRUNCATION_SDS * self.scale
        while bad.any():
            out[bad] = rng.normal(0.0, self.scale, size=int(bad.sum()))
            bad = np.abs(out) > TRUNCATION_SDS * self.scale
        return out


def initialiser(name: str, shape: tuple[int, ...]) -> Initialiser:
    """The Keras initialiser of canonical weight ``name`` (by :data:`RULES`), its parameters from ``shape``."""
    rule = next((r for pattern, r in RULES if fnmatch.fnmatchcase(name, pattern)), None)
    if rule == "glorot_uniform":
        return Initialiser("uniform", glorot_limit(tuple(shape)), "glorot_uniform")
    if rule in ("zeros", "ones"):
        return Initialiser("constant", 0.0 if rule == "zeros" else 1.0, rule)
    if rule == "truncated_normal":
        return Initialiser("truncated_normal", EMBEDDING_STDDEV, f"TruncatedNormal(stddev={EMBEDDING_STDDEV})")
    raise KeyError(f"{name}: no initialiser known for this weight (expected *.kernel, *.bias, BN or som.embeddings)")


def initialisers(shapes: dict[str, tuple[int, ...]]) -> dict[str, Initialiser]:
    """:func:`initialiser` of every name, in the given order."""
    return {name: initialiser(name, tuple(shape)) for name, shape in shapes.items()}


def draw_weights(shapes: dict[str, tuple[int, ...]], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One float32 array per canonical name, in the given (table) order."""
    return {name: np.asarray(init.draw(rng, tuple(shapes[name])), np.float32) for name, init in initialisers(shapes).items()}

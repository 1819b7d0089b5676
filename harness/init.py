"""Initial weights drawn once with numpy PCG64 and fed to both sides (DESIGN.md, Randomness).

The distributions are the original's Keras initialisers, chosen by the canonical name's role:
kernels Glorot-uniform ``U(-l, l)``, ``l = sqrt(6 / (fan_in + fan_out))`` with Keras' fan rule
(receptive field x the last two axes, so Conv2DTranspose's swapped axes give the same sum); biases,
BN beta and moving mean 0; BN gamma and moving variance 1; SOM embeddings a normal with sd 0.05
re-drawn beyond 2 sd (``TruncatedNormal(stddev=0.05)``). Only the shapes come from the side.
"""

from __future__ import annotations

import numpy as np

EMBEDDING_STDDEV = 0.05


def _glorot(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    fan_in, fan_out = receptive * shape[-2], receptive * shape[-1]
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape)


def _truncated_normal(rng: np.random.Generator, shape: tuple[int, ...], sd: float) -> np.ndarray:
    out = rng.normal(0.0, sd, size=shape)
    bad = np.abs(out) > 2 * sd
    while bad.any():
        out[bad] = rng.normal(0.0, sd, size=int(bad.sum()))
        bad = np.abs(out) > 2 * sd
    return out


def draw_weights(shapes: dict[str, tuple[int, ...]], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One float32 array per canonical name, in the given (table) order."""
    out = {}
    for name, shape in shapes.items():
        role = name.rsplit(".", 1)[-1]
        if role == "kernel":
            value = _glorot(rng, tuple(shape))
        elif role in ("bias", "beta", "moving_mean"):
            value = np.zeros(shape)
        elif role in ("gamma", "moving_variance"):
            value = np.ones(shape)
        elif name == "som.embeddings":
            value = _truncated_normal(rng, tuple(shape), EMBEDDING_STDDEV)
        else:
            raise KeyError(f"{name}: no initialiser known for this weight (expected *.kernel, *.bias, BN or som.embeddings)")
        out[name] = np.asarray(value, np.float32)
    return out

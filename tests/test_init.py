"""Harness-drawn initial weights follow the original's Keras initialisers."""

from __future__ import annotations

import numpy as np
import pytest

from harness.init import draw_weights


def test_keras_initialisers_by_role():
    shapes = {"encoder.fc1.kernel": (784, 500), "encoder.conv1.kernel": (3, 3, 1, 32), "decoder.deconv1.kernel": (3, 3, 128, 256),
              "encoder.fc1.bias": (500,), "encoder.bn1.gamma": (500,), "encoder.bn1.beta": (500,),
              "encoder.bn1.moving_mean": (500,), "encoder.bn1.moving_variance": (500,), "som.embeddings": (8, 8, 100)}
    w = draw_weights(shapes, np.random.Generator(np.random.PCG64(0)))
    assert list(w) == list(shapes) and all(v.dtype == np.float32 and v.shape == shapes[k] for k, v in w.items())
    # Glorot-uniform: limit sqrt(6 / (fan_in + fan_out)); 784x500 -> 0.0683; 3x3x1x32 -> sqrt(6/297) = 0.1421
    for name, limit in (("encoder.fc1.kernel", np.sqrt(6 / 1284)), ("encoder.conv1.kernel", np.sqrt(6 / (9 * 33))),
                        ("decoder.deconv1.kernel", np.sqrt(6 / (9 * 384)))):
        k = w[name]
        assert np.abs(k).max() <= limit and np.abs(k).max() > 0.95 * limit
        assert abs(k.std() - limit / np.sqrt(3)) < 0.05 * limit  # U(-l, l) has sd l/sqrt(3)
    assert not w["encoder.fc1.bias"].any() and not w["encoder.bn1.beta"].any() and not w["encoder.bn1.moving_mean"].any()
    assert (w["encoder.bn1.gamma"] == 1).all() and (w["encoder.bn1.moving_variance"] == 1).all()
    e = w["som.embeddings"]
    # TruncatedNormal(0.05) cut at 2 sd: |x| <= 0.1 and sd = 0.05 x 0.8796 (the truncated normal's factor)
    assert np.abs(e).max() <= 0.1 and abs(e.std() - 0.05 * 0.8796) < 0.002


def test_same_seed_same_draws_and_unknown_role_is_named():
    shapes = {"encoder.fc1.kernel": (4, 3), "som.embeddings": (2, 2, 3)}
    a = draw_weights(shapes, np.random.Generator(np.random.PCG64(1)))
    b = draw_weights(shapes, np.random.Generator(np.random.PCG64(1)))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(KeyError, match="posterior.scale"):
        draw_weights({"posterior.scale": (3,)}, np.random.Generator(np.random.PCG64(0)))

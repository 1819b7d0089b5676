"""Loss terms of the DEKM TF reference, the original's Keras expressions (specs/dekm.md §4).

Reproduces ``DEKM.py`` / ``DEKM_dense.py`` of github spdj2271/DEKM (HEAD e58f506; paper arXiv
2109.15149). Both terms are Keras ``losses.mse`` (mean over the last axis, per sample):

* ``loss.recon`` (the original's ``loss_train_base``, through ``compile``/``fit``):
  ``mse(flatten(x), output[:, d:])`` per sample, then ``fit``'s SUM_OVER_BATCH_SIZE reduction
  (sum / B) = the mean over all B·P elements;
* ``loss.cluster`` (the clustering phase's ``GradientTape``): ``mse(t, h V)`` per sample,
  (1/d)·‖h_b V − t_b‖²; the original differentiates this VECTOR, i.e. its batch SUM, which is
  what :func:`cluster_loss` returns. V (d×d) and t ([B, d]) are constants.
"""

from __future__ import annotations

from reference_tf import require_tensorflow

tf = require_tensorflow()


def _flatten(x):
    return tf.reshape(x, [tf.shape(x)[0], -1])


def recon_loss_vector(x, output, hidden_units: int):
    """Per sample ``losses.mse(Flatten(x), output[:, d:])`` (x cast to the output's dtype, as
    Keras' mse casts y_true)."""
    recon = output[:, hidden_units:]
    return tf.keras.losses.mse(tf.cast(_flatten(x), recon.dtype), recon)


def make_fit_loss(hidden_units: int):
    """The original's ``loss_train_base(y_true, y_pred)`` for ``model.compile(loss=...)`` (fit
    wraps it with SUM_OVER_BATCH_SIZE)."""

    def loss_train_base(y_true, y_pred):
        return recon_loss_vector(y_true, y_pred, hidden_units)

    return loss_train_base


def recon_loss(x, output, hidden_units: int):
    """``loss.recon``: the per-sample mse reduced as ``fit`` does (sum over the batch / B); equal
    to the mean over all B·P elements."""
    per = recon_loss_vector(x, output, hidden_units)
    return tf.reduce_sum(per) / tf.cast(tf.size(per), per.dtype)


def cluster_loss_vector(h, V, t):
    """Per sample ``losses.mse(t, tf.matmul(h, V))`` = (1/d)·‖h_b V − t_b‖² (shape [B])."""
    return tf.keras.losses.mse(t, tf.matmul(h, V))


def cluster_loss(h, V, t):
    """``loss.cluster``: the batch SUM of :func:`cluster_loss_vector` (what ``tape.gradient`` of
    the vector differentiates)."""
    return tf.reduce_sum(cluster_loss_vector(h, V, t))

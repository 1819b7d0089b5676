"""Training of the DEKM TF reference: the original's two phases, eager + ``GradientTape``.

Reproduces the ``__main__`` schedule of ``DEKM.py`` / ``DEKM_dense.py`` of github spdj2271/DEKM
(HEAD e58f506, algorithm of d126375; paper arXiv 2109.15149), written from specs/dekm.md §4, §5:

1. Pretraining: ``model.compile(optimizer='adam', loss=loss_train_base)`` and ``model.fit`` on
   ``Dataset.from_tensor_slices((x, x)).shuffle(8000).batch(256)`` for ``pretrain_epochs`` epochs
   (mean reconstruction MSE); ``save_weights('weight_base_<ds>.h5')``.
2. Clustering: a NEW model loading those weights and a NEW ``Adam()``; for ``ite`` in
   ``range(max_iter)``: every ``update_interval`` steps (step 0 included) a refit (one forward over
   all N, k-means with ``n_init`` 100 then ``int(2 * n_iter_)``, Hungarian relabelling and
   ``n_changed``, S_w, its ascending eigenvectors V, the targets); stop before training when
   ``n_changed <= tol * N``; batch ``index*B : min((index+1)*B, N)`` in fixed order, one Adam step
   on the ``GradientTape`` gradient of the per-sample loss VECTOR (= its batch sum); pointer
   ``index + 1`` if ``(index+1)*B <= N`` else 0, carried across refits.

Deviations (injection points and bookkeeping; no update rule changes):

* ``pretrain_orders`` replays given per-epoch index orders with the same mean step per batch
  (``Trainer.step('pretrain')``, equal to ``fit``'s update) instead of the native ``fit``;
  ``kmeans_inits`` replaces the unseeded k-means++ by given candidate centres (best inertia kept).
* The h5 round trip goes through a temporary directory; no ``weight_final_*.h5`` is written unless
  ``out_dir`` is given to :func:`main`.
* An empty batch (N a multiple of the batch size; the original then takes a zero-gradient Adam
  step, §8.3) is refused with a ValueError.
* Metrics are computed at every refit (as the original) only when ``y`` is given.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from reference_tf import require_tensorflow
from reference_tf.dekm.config import DEKMConfig, get_config, parse_flag, parse_overrides
from reference_tf.dekm.evaluate import get_acc_nmi
from reference_tf.dekm.losses import cluster_loss, cluster_loss_vector, make_fit_loss, recon_loss
from reference_tf.dekm.model import DEKM, refuse_deviations
from reference_tf.dekm.optim import PHASES, make_optimizer, optimizer_state, set_optimizer_state

tf = require_tensorflow()

PHASE_LOSS = {"pretrain": "loss.recon", "cluster": "loss.cluster"}


class Trainer:
    """Per-phase steps of the original on a :class:`DEKM` (one fresh Keras Adam per phase)."""

    def __init__(self, config: DEKMConfig, model: DEKM | None = None, dtype: str = "float32"):
        refuse_deviations(config, "reference_tf DEKM Trainer")
        if model is not None and model.config != config:
            raise ValueError("Trainer config and model config differ")
        self.config = config
        self.dtype = model.dtype if model is not None else dtype
        self.model = model if model is not None else DEKM(config, dtype=self.dtype)
        self.optimizers: dict = {}  # phase -> Keras Adam, created (fresh, built) when first needed

    # ------------------------------------------------------------------------------------------
    def optimizer(self, phase: str):
        """The phase's optimizer, created fresh and built on the model's variables on first use."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
        if phase not in self.optimizers:
            self.optimizers[phase] = make_optimizer(self.config, self.model)
        return self.optimizers[phase]

    def _constants(self, V, t):
        if V is None or t is None:
            raise ValueError("the cluster phase needs V [d, d] and the targets t [B, d]")
        V = np.real(np.asarray(V))  # TF drops the imaginary part of a complex eig output
        if V.ndim == 3:  # the harness batch repeats V per sample
            V = V[0]
        t = np.real(np.asarray(t))
        return tf.constant(V, dtype=self.dtype), tf.constant(t, dtype=self.dtype)

    def _loss(self, phase: str, x, V=None, t=None):
        """(scalar loss, value to differentiate) from one forward of the original's model."""
        d = self.config.hidden_units
        if phase == "pretrain":
            loss = recon_loss(x, self.model(x, training=True), d)  # fit's train_step: training=True
            return loss, loss
        if phase == "cluster":
            Vt, tt = self._constants(V, t)
            h = self.model(x)[:, :d]  # the original calls model(x) without `training`
            vec = cluster_loss_vector(h, Vt, tt)
            return tf.reduce_sum(vec), vec
        raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")

    def compute_terms(self, phase: str, x, V=None, t=None) -> dict:
        """``{'loss.recon'}`` (pretrain) or ``{'loss.cluster'}`` (cluster, the batch SUM) as floats."""
        loss, _ = self._loss(phase, x, V, t)
        return {PHASE_LOSS[phase]: float(loss)}

    def optimizer_state(self, phase: str) -> dict:
        """The phase optimizer's state (created fresh if the phase has not stepped: zeros, 0)."""
        return optimizer_state(self.optimizer(phase), self.model)

    def set_optimizer_state(self, phase: str, state: dict) -> None:
        """Strict write of the phase optimizer's state (see :func:`optim.set_optimizer_state`)."""
        set_optimizer_state(self.optimizer(phase), self.model, state)

    def step(self, phase: str, x, lr_feed: float = 1e-3, V=None, t=None, return_gradients: bool = False) -> dict:
        """One Adam step of ``phase``: the loss of the forward the gradient comes from (before the
        update), ``lr`` and ``global_step`` (the phase optimizer's iterations after the step);
        ``return_gradients``: also ``gradients``, {canonical name: the gradient applied}."""
        if len(x) == 0:
            raise ValueError(f"empty batch in phase {phase!r} (the original would take a zero-gradient Adam step)")
        opt = self.optimizer(phase)
        if float(opt.learning_rate.numpy()) != np.float32(lr_feed):
            opt.learning_rate = lr_feed
        variables = self.model.keras.trainable_variables
        with tf.GradientTape() as tape:
            loss, target = self._loss(phase, x, V, t)
        grads = tape.gradient(target, variables)  # cluster: gradient of the per-sample vector
        grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads, variables)]
        opt.apply_gradients(zip(grads, variables))
        out = {PHASE_LOSS[phase]: float(loss), "lr": float(lr_feed), "global_step": int(opt.iterations.numpy())}
        if return_gradients:
            key = {id(v): k for k, v in self.model.variables().items()}
            out["gradients"] = {key[id(v)]: g.numpy() for v, g in zip(variables, grads)}
        return out

    def gradients(self, loss_name: str, x, V=None, t=None) -> dict:
        """``d loss / d weight`` by canonical name (cluster: the per-sample vector's gradient, i.e.
        of the batch sum; the decoder's are zeros, as TF returns them)."""
        phase = {v: k for k, v in PHASE_LOSS.items()}.get(loss_name)
        if phase is None:
            raise KeyError(f"unknown loss {loss_name!r}; known: {sorted(PHASE_LOSS.values())}")
        named = self.model.variables()
        with tf.GradientTape() as tape:
            _, target = self._loss(phase, x, V, t)
        grads = tape.gradient(target, list(named.values()))
        return {k: (np.zeros(v.shape, v.dtype.as_numpy_dtype) if g is None else g.numpy())
                for (k, v), g in zip(named.items(), grads)}

    def embed_all(self, x) -> np.ndarray:
        """H [N, d]: the embedding slice of ONE ``model(x)`` call on all N (float32 for the
        original's model, whatever x's dtype)."""
        return np.asarray(self.model(x)[:, : self.config.hidden_units].numpy())


# ---------------------------------------------------------------------------------------------
# refit: k-means, relabelling, S_w, V, targets (numpy, as the original)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Refit:
    labels: np.ndarray  # [N] the raw k-means labels (the new assignment)
    centres: np.ndarray  # [K, d] k-means centres (float32 for float32 H)
    n_iter: int  # n_iter_ of the kept run
    n_changed: int  # points whose label changed after the Hungarian relabelling of the old labels
    S_w: np.ndarray  # [d, d] within-cluster scatter, not normalised
    eigvals: np.ndarray  # [d] ascending (real part)
    V: np.ndarray  # [d, d] eigenvectors (columns) in that order (real part)
    targets: np.ndarray  # [N, d] H V with the last column replaced by (U V)[labels, -1]


def _kmeans(H, n_clusters: int, n_init: int, inits):
    from sklearn.cluster import KMeans

    if inits is None:
        return KMeans(n_clusters=n_clusters, n_init=n_init).fit(H)
    best = None
    for c in inits:
        km = KMeans(n_clusters=n_clusters, init=np.asarray(c), n_init=1).fit(H)
        if best is None or km.inertia_ < best.inertia_:
            best = km
    if best is None:
        raise ValueError("kmeans inits: an empty list of candidate centres")
    return best


def refit(H, assignment_old, n_clusters: int, n_init: int, inits=None) -> Refit:
    """One refit of the original's clustering loop on the embeddings ``H`` [N, d] (§4.2, §5.3)."""
    from scipy.optimize import linear_sum_assignment

    H = np.asarray(H)
    km = _kmeans(H, n_clusters, n_init, inits)
    U = km.cluster_centers_
    new = np.asarray(km.labels_)
    old = np.array(assignment_old)  # a copy: the original renames its old assignment in place
    w = np.zeros((n_clusters, n_clusters), dtype=np.int64)
    for i in range(len(new)):
        w[new[i], old[i]] += 1  # an old label -1 (refit 0) counts in column K-1
    ind = linear_sum_assignment(-w)
    renamed = np.array(old)
    for i in range(n_clusters):
        renamed[old == ind[1][i]] = i
    n_changed = int(np.sum(new != renamed))
    scatter = []
    for k in range(n_clusters):
        diff = H[new == k] - U[k]
        scatter.append(np.matmul(diff.T, diff))
    S_w = np.sum(np.array(scatter), 0)
    evals, evecs = np.linalg.eig(S_w)
    order = np.argsort(evals)
    eigvals, V = np.real(evals[order]), np.real(evecs[:, order])
    targets = np.matmul(H, V)
    targets[:, -1] = np.matmul(U, V)[new, -1]
    return Refit(labels=new, centres=U, n_iter=int(km.n_iter_), n_changed=n_changed, S_w=S_w, eigvals=eigvals,
                 V=V, targets=targets)


# ---------------------------------------------------------------------------------------------
# the whole schedule
# ---------------------------------------------------------------------------------------------
class _BatchLoss(tf.keras.metrics.Metric):
    """The loss of the batch ``fit`` just trained on (from the same forward), not a running mean."""

    def __init__(self, hidden_units: int, name: str = "batch_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.hidden_units = hidden_units
        self.value = self.add_weight(name="value", initializer="zeros")

    def update_state(self, y_true, y_pred, sample_weight=None):
        self.value.assign(tf.cast(recon_loss(y_true, y_pred, self.hidden_units), self.value.dtype))

    def result(self):
        return tf.identity(self.value)


class _Recorder(tf.keras.callbacks.Callback):
    def __init__(self, records: list, on_step, lr: float):
        super().__init__()
        self.records, self.on_step, self.lr, self.epoch = records, on_step, lr, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        rec = {"phase": "pretrain", "epoch": self.epoch, "global_step": int(self.model.optimizer.iterations.numpy()),
               "lr": self.lr, "loss.recon": float(logs["batch_loss"])}
        self.records.append(rec)
        if self.on_step is not None:
            self.on_step(rec)


def _pretrain_native(trainer: Trainer, x, records: list, on_step) -> None:
    cfg = trainer.config
    model = trainer.model
    opt = make_optimizer(cfg)  # compile(optimizer='adam'): the same class and defaults
    model.keras.compile(optimizer=opt, loss=make_fit_loss(cfg.hidden_units), metrics=[_BatchLoss(cfg.hidden_units)])
    ds = tf.data.Dataset.from_tensor_slices((x, x)).shuffle(cfg.shuffle_buffer).batch(cfg.pretrain_batch_size)
    model.keras.fit(ds, epochs=cfg.pretrain_epochs, verbose=0, callbacks=[_Recorder(records, on_step, cfg.learning_rate)])
    trainer.optimizers["pretrain"] = opt


def _pretrain_replay(trainer: Trainer, x, orders, records: list, on_step) -> None:
    cfg = trainer.config
    n, B = len(x), cfg.pretrain_batch_size
    if len(orders) < cfg.pretrain_epochs:
        raise ValueError(f"pretrain_orders: {len(orders)} epochs given, pretrain_epochs={cfg.pretrain_epochs}")
    for epoch in range(cfg.pretrain_epochs):
        order = np.asarray(orders[epoch])
        if order.ndim != 1 or len(order) != n or order.dtype.kind not in "iu" or (n and (order.min() < 0 or order.max() >= n)):
            raise ValueError(f"pretrain_orders[{epoch}] must be {n} integer indices in [0, {n}), got {order.dtype} {order.shape}")
        for b in range(0, n, B):
            res = trainer.step("pretrain", x[order[b:b + B]], lr_feed=cfg.learning_rate)
            rec = {"phase": "pretrain", "epoch": epoch, **res}
            records.append(rec)
            if on_step is not None:
                on_step(rec)


def cluster_batch(index: int, n: int, batch_size: int) -> tuple[np.ndarray, int]:
    """The original's clustering batch at pointer ``index`` (``arange(N)[index*B : min((index+1)*B, N)]``)
    and its pointer update (``index + 1 if (index+1)*B <= N else 0``)."""
    return np.arange(n)[index * batch_size: min((index + 1) * batch_size, n)], (index + 1 if (index + 1) * batch_size <= n else 0)


def fit(trainer: Trainer, x, y, pretrain_orders=None, kmeans_inits: Callable | None = None,
        on_step: Callable | None = None) -> list[dict]:
    """The original's whole run; one record per optimizer step and a last ``{'phase': 'stop', ...}``.

    ``pretrain_orders``: per-epoch index arrays (None: the native tf.data shuffle + ``fit``);
    ``kmeans_inits(refit_index, n_init, H)``: candidate initial centres (None: unseeded k-means++);
    ``on_step(record)``: called after every step record. The clustering phase runs on a NEW model
    (``trainer.model`` is replaced) loaded from the pretrained weights through an h5 file, with a
    fresh Adam."""
    cfg = trainer.config
    records: list[dict] = []
    if cfg.pretrain_epochs > 0:
        if pretrain_orders is None:
            _pretrain_native(trainer, x, records, on_step)
        else:
            _pretrain_replay(trainer, x, pretrain_orders, records, on_step)

    # a NEW model loaded from the saved pretrained weights (fresh Adam for the clustering phase)
    with tempfile.TemporaryDirectory() as tmp:
        path = trainer.model.save_checkpoint(os.path.join(tmp, f"weight_base_{cfg.ds_name}.h5"))
        model = DEKM(cfg, dtype=trainer.dtype)
        model.load_checkpoint(path)
    trainer.model = model
    trainer.optimizers.pop("cluster", None)

    n, B, K = len(x), cfg.batch_size, cfg.n_clusters
    assignment = np.full(n, -1, dtype=np.int64)
    n_init, index, n_refits = cfg.kmeans_n_init, 0, 0
    current: Refit | None = None
    acc = nmi = None
    reason = "max_iter"
    for ite in range(cfg.max_iter):
        if ite % cfg.update_interval == 0:
            H = trainer.embed_all(x)
            inits = None if kmeans_inits is None else kmeans_inits(n_refits, n_init, H)
            current = refit(H, assignment, K, n_init, inits)
            n_refits += 1
            n_init = int(current.n_iter * 2)
            assignment = current.labels
            if y is not None:
                acc, nmi = get_acc_nmi(y, assignment)
        if current.n_changed <= cfg.tol * n:
            reason = "tol"
            break
        idx, next_index = cluster_batch(index, n, B)
        if len(idx) == 0:
            raise ValueError(f"step {ite}: empty batch (N={n} is a multiple of batch_size={B}); the original "
                             "would take a zero-gradient Adam step here (specs/dekm.md §8.3)")
        res = trainer.step("cluster", x[idx], lr_feed=cfg.learning_rate, V=current.V, t=current.targets[idx])
        rec = {"phase": "cluster", "refit": n_refits - 1, **res, "n_changed": current.n_changed}
        records.append(rec)
        if on_step is not None:
            on_step(rec)
        index = next_index
    labels = assignment if current is not None else None
    records.append({"phase": "stop", "reason": reason, "labels": labels, "acc": acc, "nmi": nmi, "refits": n_refits})
    if on_step is not None:
        on_step(records[-1])
    return records


# ---------------------------------------------------------------------------------------------
# python -m reference_tf.dekm.train
# ---------------------------------------------------------------------------------------------
RUN_KEYS = ("data_dir", "out_dir", "n", "overwrite")
FINAL_WEIGHTS = "weight_final_l2_{ds}.h5"  # the original's file name, in out_dir
# The errors a command line can provoke (bad keys or values, missing data, an out_dir in use, a
# diverged model): reported on one line, exit status 2.
USER_ERRORS = (KeyError, ValueError, OSError, FloatingPointError)


def main(argv: list[str] | None = None) -> int:
    """``python -m reference_tf.dekm.train [variant] [key=value ...] [data_dir=...] [out_dir=...]
    [overwrite=false] [n=...]``: the native run of the original on MNIST (or ``synthetic`` for a
    data-free smoke run). An expected error (:data:`USER_ERRORS`) is printed as one ``error: ...`` line
    on stderr and exits with status 2."""
    try:
        return _run(list(sys.argv[1:] if argv is None else argv))
    except USER_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
        raise SystemExit(2) from None


def check_out_dir(out_dir: str, ds_name: str, overwrite: bool) -> None:
    """Refuse, before any work, an ``out_dir`` holding another run's final weights or summary unless
    ``overwrite``: the run's end would silently replace them."""
    taken = [f for f in (FINAL_WEIGHTS.format(ds=ds_name), "summary.json") if os.path.exists(os.path.join(out_dir, f))]
    if taken and not overwrite:
        raise FileExistsError(f"{out_dir} holds another run's results ({', '.join(taken)}); pass overwrite=true to replace them")


def _run(args: list[str]) -> int:
    variant = args.pop(0) if args and "=" not in args[0] else "conv"
    overrides = parse_overrides(args)
    run = {k: overrides.pop(k) for k in RUN_KEYS if k in overrides}
    overwrite = parse_flag("overwrite", run.get("overwrite", "false"))
    try:
        cfg = get_config(variant, **overrides)
    except KeyError as err:
        raise KeyError(f"{err.args[0]}; run-level keys: {list(RUN_KEYS)}") from None
    if "out_dir" in run:
        check_out_dir(run["out_dir"], cfg.ds_name, overwrite)
    from reference_tf.dekm.data import get_xy

    if cfg.ds_name.lower() == "synthetic":
        rng = np.random.default_rng(0)
        n = int(run.get("n", 200))
        y = rng.integers(0, cfg.n_clusters, n)
        x = rng.normal(0.3, 0.05, (n, *cfg.input_shape)) + (y / cfg.n_clusters).reshape(-1, *[1] * len(cfg.input_shape))
    else:
        x, y = get_xy(cfg.ds_name, data_dir=run.get("data_dir"), flatten=not cfg.convolution)
        if "n" in run:
            x, y = x[: int(run["n"])], y[: int(run["n"])]
    t0 = time.time()
    trainer = Trainer(cfg)
    records = fit(trainer, x, y)
    stop = records[-1]
    summary = {k: stop[k] for k in ("reason", "acc", "nmi", "refits")}
    summary.update(steps=len(records) - 1, seconds=round(time.time() - t0, 1), config=cfg.to_dict())
    if "out_dir" in run:
        bad = [k for k, v in trainer.model.variables().items() if not np.isfinite(v.numpy()).all()]
        if bad:
            raise FloatingPointError(f"final weights not written to {run['out_dir']}: non-finite {bad[0]} (all non-finite: {bad})")
        os.makedirs(run["out_dir"], exist_ok=True)
        trainer.model.save_checkpoint(os.path.join(run["out_dir"], FINAL_WEIGHTS.format(ds=cfg.ds_name)))
        with open(os.path.join(run["out_dir"], "summary.json"), "w") as f:
            json.dump(summary, f, indent=1, sort_keys=True)
    print(json.dumps({k: summary[k] for k in ("reason", "acc", "nmi", "refits", "steps", "seconds")}))
    return 0


__all__ = ["PHASE_LOSS", "Refit", "Trainer", "cluster_loss", "fit", "main", "refit"]

if __name__ == "__main__":
    raise SystemExit(main())

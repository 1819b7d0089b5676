"""DEKM's model spec: what the engine needs to know about DEKM, and nothing the engine knows.

Sides: ``reference_tf.dekm`` (tf.keras, eager + GradientTape, as the original) and ``ports.dekm``
through harness/adapters/dekm.py. Batch: ``x`` [B, H, W, C] (conv) or [B, d_in] (dense) as the
original preprocesses it (x / 255), ``V`` [B, d, d] (the rotation: one orthogonal matrix repeated
per sample, so the engine's batch split keeps it) and ``t`` [B, d] (the targets), all from the run's
PCG64 stream after the initial weights. Two phases with two fresh Keras Adams (specs/dekm.md §5):
pretraining minimises ``loss.recon`` (a batch MEAN, through ``fit``), the clustering phase
``loss.cluster`` (the per-sample vector, i.e. a batch SUM). No BatchNorm, no dropout.

T4 (harness-driven): pretraining steps, then clustering steps with a k-means refit at the first and
every ``interval``-th one: each side's own H over the run's training slice, k-means from the same
harness-drawn k-means++ candidates (drawn on the reference's H), the original's Hungarian
``n_changed``, S_w, V and the targets; each side steps on its OWN targets (as real training does),
and the refit's labels, centres, S_w, eigenvalues and v (the eigenvector of the largest eigenvalue,
up to sign: the loss depends on V only through v, §4.3) are compared per refit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from collections.abc import Mapping

import numpy as np

from harness.protocols import Batch, PortSide, ReferenceSide
from harness.spec import ModelSpec, Phase, Probe, T4Step

T4_MAX_N_INIT = 20  # T4's k-means candidates per refit: the original's rule (100, then 2 n_iter_), capped for time


def keras_initialiser(name: str, shape: tuple[int, ...], convolution: bool):
    """The original's initialiser of canonical weight ``name`` (specs/dekm.md §1.2, §3): 'uniform' =
    U(-0.05, 0.05) on the conv encoder's kernels and on every dense-model kernel, Keras'
    Glorot-uniform on the conv model's ``embedding`` and ``decoder.*`` kernels, zeros for biases."""
    from harness.init import Initialiser, glorot_limit

    if name.endswith(".bias"):
        return Initialiser("constant", 0.0, "zeros")
    if not convolution or name.startswith("encoder."):
        return Initialiser("uniform", 0.05, "RandomUniform(-0.05, 0.05) ('uniform')")
    return Initialiser("uniform", glorot_limit(tuple(shape)), "glorot_uniform")


def orthogonal(rng: np.random.Generator, d: int) -> np.ndarray:
    """A random d x d orthogonal matrix (QR of a Gaussian, columns sign-fixed: Haar)."""
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


def top_eigenvector(v: np.ndarray) -> np.ndarray:
    """V's last column (the largest eigenvalue's), its sign fixed so its largest |entry| is positive."""
    col = np.asarray(v, np.float64)[:, -1]
    return (col * np.sign(col[np.argmax(np.abs(col))])).astype(np.float32)


def _nonzero_biases(w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every bias set to a fixed non-zero pattern (±0.05 scale): the original's zero biases leave a
    wrong bias mapping (transposed, dropped, NCHW-ordered) invisible in T2."""
    out = dict(w)
    for k, v in w.items():
        if k.endswith(".bias"):
            out[k] = (0.05 * np.sin(np.arange(v.size) * 1.7 + len(k))).astype(np.float32).reshape(v.shape)
    return out


class DEKMSpec(ModelSpec):
    name = "dekm"
    variants = ("conv", "dense", "conv-usps", "conv-coil20", "conv-frgc", "dense-reuters", "tiny-conv", "tiny-dense")
    default_variants = ("conv", "dense")
    phases = (Phase("pretrain", "loss.recon", 1e-3), Phase("cluster", "loss.cluster", 1e-3))
    reductions = {"loss.recon": "mean", "loss.cluster": "sum"}
    has_batchnorm = False
    reported_metrics = ("acc", "nmi_arithmetic")  # get_acc_nmi: Hungarian ACC, sklearn's default (arithmetic) NMI
    probes = (Probe("non-zero biases", _nonzero_biases,
                    "the original initialises every bias to zero, so a bias mapped wrongly is invisible at initialisation"),)

    # --- config ----------------------------------------------------------------------------------
    def get_config(self, variant: str, overrides: Mapping[str, str] | None = None) -> Any:
        from ports.dekm.config import get_config

        return get_config(variant, **dict(overrides or {}))

    def replace_config(self, cfg: Any, overrides: Mapping[str, str]) -> Any:
        from ports.dekm.config import replace

        return replace(cfg, **dict(overrides))

    def config_dict(self, cfg: Any) -> dict[str, Any]:
        return cfg.to_dict()

    def variant_of(self, cfg: Any) -> str:
        return "conv" if cfg.convolution else "dense"

    # --- sides -----------------------------------------------------------------------------------
    def make_reference(self, cfg: Any, dtype: str = "float32") -> ReferenceSide:
        from harness.adapters.dekm import TFReferenceDEKM

        return TFReferenceDEKM(cfg, dtype)

    def make_port(self, cfg: Any, dtype: str = "float32", device: str = "cpu") -> PortSide:
        from harness.adapters.dekm import TorchDEKM

        return TorchDEKM(cfg, dtype, device)

    # --- injected inputs -------------------------------------------------------------------------
    def load_data(self, cfg: Any, dataset: str | None, n: int) -> tuple[np.ndarray, str]:
        """``n`` inputs as the original preprocesses them (x / 255, train then test), in the variant's
        geometry: MNIST (else the embedded digits) as is for 28 x 28 x 1 and 784; for the geometries
        whose data sets are not shipped (USPS 16 x 16, FRGC 32 x 32 x 3, REUTERS 2000) the same
        images resized / tiled into that shape, named so in the report (the tiers compare the two
        sides on the same inputs; the data sets' own loaders are tested in each side's suite)."""
        from harness.data import all_images_dekm, offline_raw

        raw = offline_raw(dataset)
        x, _ = all_images_dekm(raw)
        x = x[:n]
        shape = tuple(cfg.input_shape)
        if shape == (28, 28, 1):
            return x, raw.name
        if shape == (784,):
            return x.reshape(len(x), 784), raw.name
        if len(shape) == 3:
            h, _, c = shape
            import torch
            import torch.nn.functional as F

            small = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(h, h), mode="bilinear", align_corners=False)
            y = small.permute(0, 2, 3, 1).numpy()
            y = np.concatenate([y * (0.6 + 0.2 * i) for i in range(c)], axis=3)
            return np.ascontiguousarray(y, np.float32), f"{raw.name} resized to {h}x{h}x{c} ({cfg.ds_name} geometry)"
        d = shape[0]
        flat = np.tile(x.reshape(len(x), -1), (1, -(-d // 784)))[:, :d]
        flat = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
        return flat.astype(np.float32), f"{raw.name} tiled to {d} dims, rows L2-normalised ({cfg.ds_name} geometry)"

    def draw_weights(self, shapes: Mapping[str, tuple[int, ...]], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """The original's initialisers (:func:`keras_initialiser`), one float32 array per name, in order."""
        convolution = any(".conv" in k for k in shapes)
        return {k: np.asarray(init.draw(rng, tuple(shapes[k])), np.float32) for k, init in self._rules(shapes, convolution).items()}

    def initialisers(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        return self._rules(shapes, any(".conv" in k for k in shapes))

    @staticmethod
    def _rules(shapes: Mapping[str, tuple[int, ...]], convolution: bool) -> dict[str, Any]:
        return {k: keras_initialiser(k, tuple(s), convolution) for k, s in shapes.items()}

    def draw_inputs(self, cfg: Any, rng: np.random.Generator, x: np.ndarray) -> Batch:
        """One rotation V and targets t of the embedding's scale at initialisation (|h| ~ 0.1-1)."""
        B, d = len(x), cfg.hidden_units
        V = orthogonal(rng, d)
        t = (0.5 * rng.standard_normal((B, d))).astype(np.float32)
        return {"x": x, "V": np.repeat(V[None], B, axis=0), "t": t}

    # --- what each side executes -----------------------------------------------------------------
    def executed(self, side: ReferenceSide, batch: Batch) -> dict[str, Any]:
        """Each loss's batch reduction, measured: the loss on the batch twice over vs on the batch
        (x 2: a sum; x 1: a mean); and each kernel's initial distribution from the side's own
        initialisers (:meth:`init_label` of one draw; SKIPPED-free: a side without them says so)."""
        twice = {k: np.concatenate([v, v]) for k, v in batch.items()}
        one, two = side.losses(batch), side.losses(twice)
        out: dict[str, Any] = {f"reduction.{k}": {1: "mean", 2: "sum"}.get(round(two[k] / one[k]), f"x{two[k] / one[k]:.3g}")
                               for k in self.reductions if one.get(k)}
        try:
            drawn = side.initial_weights()
        except NotImplementedError as err:
            return {**out, "init": f"not measured ({err})"}
        out.update({f"init.{k}": init_label(k, v) for k, v in drawn.items()})
        return out

    def constants(self, cfg: Any) -> dict[str, float]:
        return {"batch_size": float(cfg.batch_size), "n_pixels": float(cfg.n_pixels), "hidden_units": float(cfg.hidden_units),
                "adam.beta1": float(np.float32(cfg.beta_1)), "adam.beta2": float(np.float32(cfg.beta_2))}

    def is_activation(self, name: str) -> bool:
        leaf = name.rsplit(".", 1)[-1]
        return leaf.rstrip("0123456789") in ("fc", "conv", "deconv") and name != "decoder.deconv3"

    # --- checkpoints and tables ------------------------------------------------------------------
    def read_original_checkpoint(self, path: str, cfg: Any) -> dict[str, np.ndarray]:
        from harness.keras_h5 import read_keras_h5

        return read_keras_h5(path, self.table_path(cfg))

    def table_path(self, cfg: Any) -> Path:
        return Path(__file__).resolve().parents[1] / "tables" / f"dekm_{self.variant_of(cfg)}.csv"

    # --- T4 --------------------------------------------------------------------------------------
    def t4_plan(self, cfg: Any, steps: int, epoch_steps: int) -> list[T4Step]:
        """~30 % pretraining steps (in-order batches of the training slice), then clustering steps;
        ``epoch_start`` marks a refit: the first clustering step and every ``interval``-th after it,
        ``interval`` = the config's ``update_interval``, shortened so that at least two refits fall
        inside the run. ``batch`` is the clustering pointer (the original's rule, carried across refits)."""
        n_pre = max(1, round(0.3 * steps))
        n_cl = max(2, steps - n_pre)
        interval = max(1, min(cfg.update_interval, (n_cl - 1) // 2 or 1))
        out = [T4Step(i, "pretrain", cfg.learning_rate, i % epoch_steps, False) for i in range(n_pre)]
        index, n = 0, epoch_steps * cfg.batch_size
        for k in range(n_cl):
            out.append(T4Step(n_pre + k, "cluster", cfg.learning_rate, index, k % interval == 0))
            index = index + 1 if (index + 2) * cfg.batch_size <= n else 0
        return out

    def t4_batches(self, cfg: Any, st: T4Step, rng: np.random.Generator, x_train: np.ndarray,
                   sides: Mapping[str, ReferenceSide], state: dict[str, Any]) -> dict[str, Batch]:
        """Pretraining: the in-order batch. Clustering: at a refit, every side's own refit from its
        own H (harness-side, :func:`refit`) from the same candidates; each side's targets for the
        batch; the refit's quantities left in ``state["compare"]`` for the engine to judge."""
        B, d = cfg.batch_size, cfg.hidden_units
        rows = slice(st.batch * B, (st.batch + 1) * B)
        if st.phase == "pretrain":
            return {k: {"x": x_train[rows], "V": np.repeat(np.eye(d, dtype=np.float32)[None], B, 0),
                        "t": np.zeros((B, d), np.float32)} for k in sides}
        if st.epoch_start:
            H = {k: embed_all(s, x_train, B) for k, s in sides.items()}
            n_init = state.get("n_init", min(cfg.kmeans_n_init, T4_MAX_N_INIT))
            inits = kmeans_candidates(H["tf"], cfg.n_clusters, rng.integers(0, 2**31 - 1, size=n_init))
            old = state.get("labels", {k: np.full(len(x_train), -1) for k in sides})
            state["refits"] = {k: refit(H[k], old[k], cfg.n_clusters, inits) for k in sides}
            state["labels"] = {k: r["labels"] for k, r in state["refits"].items()}
            state["n_init"] = min(int(2 * state["refits"]["tf"]["n_iter"]), T4_MAX_N_INIT)
            state["compare"] = {k: {"refit.H": H[k], **_aligned(r, state["refits"]["tf"], cfg.n_clusters),
                                    **{f"refit.{n}": np.asarray(v) for n, v in r.items() if n not in ("targets", "V", "labels", "centres")},
                                    "refit.v": top_eigenvector(r["V"])} for k, r in state["refits"].items()}
        return {k: {"x": x_train[rows], "V": np.repeat(r["V"][None], len(x_train[rows]), 0), "t": r["targets"][rows]}
                for k, r in state["refits"].items()}

    # --- data tier ----------------------------------------------------------------------------------
    def make_data_reference(self, cfg: Any) -> ReferenceSide:
        """The reference's data path needs no model: the adapter is built without one."""
        from harness.adapters.dekm import TFReferenceDEKM

        side = TFReferenceDEKM.__new__(TFReferenceDEKM)
        side.name, side.config = "tf-reference (data path)", cfg
        return side

    def data_rule(self, raw: Mapping[str, np.ndarray], cfg: Any, validation: bool) -> dict[str, np.ndarray]:
        """specs/dekm.md §2, §5.3 written out once more (no validation split: ``validation`` changes
        nothing): train then test, ``/ 255`` in float64, fed as float32, NHWC (784 columns for the
        dense model); scored on every input; clustering batches ``i·B : min((i+1)·B, N)`` in order, the
        partial last one kept, then from 0 again (two passes); the refit's one forward over all N.
        The pretraining order is injected (a windowed shuffle, T4 / own loop), not compared here."""
        x = np.concatenate([raw["x_train"], raw["x_test"]]).astype(np.float64) / 255.0
        x = (x.reshape(len(x), -1) if not cfg.convolution else x.reshape(len(x), *x.shape[1:], 1)).astype(np.float32)
        y = np.concatenate([raw["y_train"], raw["y_test"]]).astype(np.int64)
        n, B = len(x), cfg.batch_size
        starts = np.arange(0, n, B)
        rows = np.full((2 * len(starts), B), -1, np.int64)
        for i, s in enumerate(np.concatenate([starts, starts])):
            rows[i, : min(B, n - s)] = np.arange(s, min(s + B, n))
        return {"data.x_train": x, "data.y_train": y, "data.x_eval": x, "data.y_eval": y, "data.train_batches": rows,
                "data.eval_batches": np.arange(n, dtype=np.int64)[None]}

    # --- own-loop T4 and evaluation tier -----------------------------------------------------------
    def ownloop_overrides(self, cfg: Any) -> dict[str, str]:
        """Two pretraining epochs and a clustering loop that refits every 3 steps, with a stop
        tolerance (30 % of N) that the tiny data meets within the 18-step cap on the faithful pair, so
        the records hold the refit cadence, the carried batch pointer (N is not a multiple of the
        batch: a partial batch, then the pointer back at 0) and the step where the stop rule fires."""
        return {"pretrain_epochs": "2", "pretrain_batch_size": str(OWNLOOP_BATCH), "batch_size": str(OWNLOOP_BATCH),
                "update_interval": "3", "max_iter": "18", "kmeans_n_init": str(OWNLOOP_CANDIDATES), "tol": "0.3"}

    def ownloop_data(self, cfg: Any, dataset: str | None) -> tuple[dict[str, np.ndarray], str]:
        """``x`` / ``y``: ``OWNLOOP_BATCHES`` batches plus 5 inputs, and :meth:`injected` for them."""
        from harness.data import all_images_dekm, offline_raw

        n = OWNLOOP_BATCHES * cfg.batch_size + 5
        x, name = self.load_data(cfg, dataset, n)
        _, y = all_images_dekm(offline_raw(dataset))
        return {"x": x, "y": y[:n], **self.injected(cfg, n, OWNLOOP_CANDIDATES, np.random.Generator(np.random.PCG64(2021)))}, name

    @staticmethod
    def injected(cfg: Any, n: int, candidates: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """The randomness of one run, drawn once for both sides: ``pretrain_orders`` [epochs, n] (the
        original's windowed shuffle, :func:`windowed_shuffle`, one per pretraining epoch) and
        ``kmeans_seeds`` [refits, candidates] (each refit's k-means++ seeds, :func:`kmeans_candidates`;
        a refit uses its first n_init, so ``candidates`` caps the original's n_init rule)."""
        orders = np.stack([windowed_shuffle(n, cfg.shuffle_buffer, rng) for _ in range(cfg.pretrain_epochs)])
        seeds = rng.integers(0, 2**31 - 1, size=(cfg.max_iter // cfg.update_interval + 1, candidates))
        return {"pretrain_orders": orders, "kmeans_seeds": seeds}

    def evaluation_data(self, cfg: Any, dataset: str | None) -> tuple[dict[str, np.ndarray], str]:
        """Every input, as the original scores (transductive: MNIST train + test), with one refit's candidates."""
        from harness.data import all_images_dekm, offline_raw

        raw = offline_raw(dataset)
        x, y = all_images_dekm(raw)
        x = x.reshape(len(x), *cfg.input_shape) if tuple(cfg.input_shape) == (784,) else self.load_data(cfg, dataset, len(x))[0]
        seeds = np.random.Generator(np.random.PCG64(2021)).integers(0, 2**31 - 1, size=(1, OWNLOOP_CANDIDATES))
        return {"x": x, "y": y, "kmeans_seeds": seeds}, raw.name

    # --- whole schedules (harness/matrix.py) ---------------------------------------------------
    def schedules(self, cfg: Any) -> dict[str, dict[str, str]]:
        """``original``: 200 pretraining epochs, at most 14 000 clustering steps (specs/dekm.md §5.1);
        ``reduced``: 5 pretraining epochs and at most 800 clustering steps (20 refits conv, 80 dense):
        minutes per side on a laptop CPU. Both keep the original's cadence, stop rule and n_init rule
        (the injected candidates cap n_init at ``SCHEDULE_CANDIDATES``)."""
        return {"original": {}, "reduced": {"pretrain_epochs": "5", "max_iter": "800"}}

    def schedule_data(self, cfg: Any, dataset: str | None, rng: np.random.Generator,
                      limit: int | None = None) -> tuple[dict[str, np.ndarray], str]:
        """Every input (MNIST: train + test, x / 255) in one order drawn from ``rng`` (the original's
        ``get_xy`` shuffle; the first ``limit`` of that order if given), and :meth:`injected` for the run."""
        from harness.data import all_images_dekm, offline_raw

        raw = offline_raw(dataset)
        _, y = all_images_dekm(raw)
        x, _ = self.load_data(cfg, dataset, len(y))
        perm = rng.permutation(len(y))[:limit]
        return {"x": x[perm], "y": y[perm], **self.injected(cfg, len(perm), SCHEDULE_CANDIDATES, rng)}, raw.name

    def final_evaluation(self, side: Any, cfg: Any, data: Mapping[str, np.ndarray], records: list[dict[str, Any]],
                         eps: Any) -> dict[str, Any]:
        """The original reports the labels of its last refit (the loop's ``stop`` record), scored on
        every input: the side's own ``acc`` / ``nmi`` (``get_acc_nmi``) and the field's metrics."""
        from harness.metrics import cluster_metrics

        last, y = records[-1], np.asarray(data["y"]).astype(np.int64)
        labels = np.asarray(last["labels"]).astype(np.int64)
        return {"assignments": labels, "labels": y, "nmi_average": "arithmetic", "assign_from": "the last refit's k-means labels",
                "metrics": {**cluster_metrics(y, labels), "acc_original": float(last["acc"]), "nmi_original": float(last["nmi"])}}


OWNLOOP_BATCH, OWNLOOP_BATCHES, OWNLOOP_CANDIDATES, SCHEDULE_CANDIDATES = 16, 3, 4, 20


def windowed_shuffle(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """One epoch of ``tf.data`` ``shuffle(buffer)`` on ``arange(n)``, emulated: a buffer of the first
    ``buffer`` indices; each output is a uniformly chosen slot, refilled with the next index while the
    input lasts (so position p holds an index <= p + buffer - 1, specs/dekm.md §7)."""
    buf, out, nxt = list(range(min(buffer, n))), [], min(buffer, n)
    while buf:
        j = int(rng.integers(len(buf)))
        out.append(buf[j])
        if nxt < n:
            buf[j], nxt = nxt, nxt + 1
        else:
            buf[j] = buf[-1]
            buf.pop()
    return np.asarray(out, np.int64)


def _aligned(r: Mapping[str, Any], ref: Mapping[str, Any], k: int) -> dict[str, np.ndarray]:
    """``r``'s labels and centres renamed to best match ``ref``'s (Hungarian on the co-occurrences):
    k-means' cluster ids are arbitrary, so a side whose candidates converge to the same partition under
    other ids agrees."""
    from scipy.optimize import linear_sum_assignment

    w = np.zeros((k, k), np.int64)
    np.add.at(w, (r["labels"], ref["labels"]), 1)
    rows, cols = linear_sum_assignment(-w)
    rename = np.empty(k, np.int64)
    rename[rows] = cols
    centres = np.empty_like(r["centres"])
    centres[rename] = r["centres"]
    return {"refit.labels": rename[r["labels"]], "refit.centres": centres}


# --- the harness's own refit (specs/dekm.md §4.2, §5.3, §7), independent of both sides ----------------
def embed_all(side: ReferenceSide, x: np.ndarray, batch: int) -> np.ndarray:
    """H: the side's ``embedding`` over all of ``x`` (in chunks of ``batch`` through ``forward``)."""
    return np.concatenate([np.asarray(side.forward({"x": x[i:i + batch]})["embedding"], np.float32) for i in range(0, len(x), batch)])


def kmeans_candidates(H: np.ndarray, k: int, seeds) -> list[np.ndarray]:
    """One k-means++ initial-centre set (scikit-learn's ``kmeans_plusplus``) per seed: the original's
    initialisation, its randomness fixed (both sides draw with the same seeds on their own H)."""
    from sklearn.cluster import kmeans_plusplus

    return [kmeans_plusplus(np.asarray(H), k, random_state=int(s))[0] for s in seeds]


def refit(H: np.ndarray, old: np.ndarray, k: int, inits: list[np.ndarray]) -> dict[str, Any]:
    """k-means from each candidate (Lloyd, one run each, the lowest inertia kept, the first on ties),
    the original's Hungarian ``n_changed`` against ``old`` (its -1 labels land in column K-1), S_w,
    its eigenpairs ascending (``eig``, real part, as the original) and the targets."""
    from scipy.optimize import linear_sum_assignment
    from sklearn.cluster import KMeans

    best = None
    for c in inits:
        km = KMeans(k, init=c, n_init=1).fit(H)
        if best is None or km.inertia_ < best.inertia_:
            best = km
    labels, U = best.labels_, best.cluster_centers_.astype(np.float32)
    w = np.zeros((k, k), np.int64)
    np.add.at(w, (labels, old), 1)
    _, col = linear_sum_assignment(-w)
    renamed = np.array(old)
    for i in range(k):
        renamed[np.asarray(old) == col[i]] = i
    S = sum((H[labels == i] - U[i]).T @ (H[labels == i] - U[i]) for i in range(k)).astype(np.float32)
    vals, vecs = np.linalg.eig(S)
    order = np.argsort(vals)
    vals, V = np.real(vals[order]).astype(np.float32), np.real(vecs[:, order]).astype(np.float32)
    targets = H @ V
    targets[:, -1] = (U @ V)[labels, -1]
    return {"labels": labels.astype(np.int64), "centres": U, "n_iter": int(best.n_iter_),
            "n_changed": int(np.sum(labels != renamed)), "S_w": S, "eigvals": vals, "V": V, "targets": targets.astype(np.float32)}


def init_label(name: str, w: np.ndarray) -> str:
    """One draw of a weight named by the distribution it fits: zeros, U(0, 1), U(±0.05) (Keras
    'uniform'), Glorot-uniform or torch's default (kaiming a=√5: U(±1/√fan_in)) by its largest |w|."""
    from harness.init import glorot_limit

    w = np.asarray(w, np.float64)
    if not np.any(w):
        return "zeros"
    if w.min() >= 0:
        return f"U(0, {np.ceil(w.max() * 10) / 10:g})"
    shape = tuple(w.shape)
    if len(shape) < 2:
        return "non-zero"
    receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    candidates = {"U(-0.05, 0.05)": 0.05, "glorot_uniform": glorot_limit(shape), "torch default (kaiming_uniform a=√5)": 1 / np.sqrt(receptive * shape[-2])}
    m = np.abs(w).max()
    label, bound = min(candidates.items(), key=lambda kv: abs(np.log(m / kv[1])))
    return "U(-0.05, 0.05)" if abs(bound - 0.05) < 1e-3 * 0.05 else label


SPEC = DEKMSpec()

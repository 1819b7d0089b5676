"""DPSOM's model spec: what the engine needs to know about DPSOM, and nothing the engine knows.

Sides: ``reference_tf.dpsom`` (tf.compat.v1 graph + TFP) and ``ports.dpsom`` through
harness/adapters/dpsom.py. Batch: ``x`` [B, 28, 28, 1] (the original's preprocessing), ``eps``
[B, D] and a target distribution ``p`` [B, K] (DEC's formula on Dirichlet soft assignments), all
from the run's PCG64 stream after the initial weights. Three phases share one Adam (specs/dpsom.md
§6); every loss is a batch mean.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from collections.abc import Mapping

import numpy as np

from harness.protocols import Batch, PortSide, ReferenceSide
from harness.spec import ConfigCase, ModelSpec, Phase, Probe, T4Step

FAR_SOM = 300.0  # embeddings scale of the far-SOM probe (z_dist ~ 1e2-1e4 at initialisation)
SOM_INIT_LRS = (0.9, 0.3, 0.1, 0.01)


def topographic_error(distances: np.ndarray, som_dim: tuple[int, int]) -> float:
    """Share of inputs whose nearest and second-nearest nodes (by ``distances`` [N, K], node k at row
    k // columns, column k % columns) are not 4-neighbours on the torus DPSOM's L_SOM wraps around."""
    rows, cols = som_dim
    order = np.argsort(np.asarray(distances), axis=1, kind="stable")[:, :2]
    (r1, c1), (r2, c2) = divmod(order[:, 0], cols), divmod(order[:, 1], cols)
    dr, dc = np.abs(r1 - r2), np.abs(c1 - c2)
    dr, dc = np.minimum(dr, rows - dr), np.minimum(dc, cols - dc)
    return float(np.mean(dr + dc != 1))


def target_distribution(q: np.ndarray) -> np.ndarray:
    """DEC's p = (q² / Σ_i q) normalised per row, in float64 (harness-side; each side's own p is
    tested in its own suite)."""
    w = np.asarray(q, np.float64) ** 2 / np.asarray(q, np.float64).sum(0)
    return (w / w.sum(1, keepdims=True)).astype(np.float32)


class DPSOMSpec(ModelSpec):
    name = "dpsom"
    variants = ("dense", "conv", "tiny-dense", "tiny-conv", "dense-fmnist", "conv-fmnist")
    default_variants = ("dense", "conv")
    phases = (Phase("vae", "loss.elbo", 1e-3), Phase("som_init", "loss.som_init", 0.9), Phase("joint", "loss.total", 1e-3))
    reductions = {k: "mean" for k in ("loss.elbo.nll", "loss.elbo.kl", "loss.elbo", "loss.kl_pq", "loss.som", "loss.total",
                                      "loss.som_init.commit", "loss.som_init.som", "loss.som_init")}
    has_batchnorm = True
    probes = (Probe("SOM far from z", lambda w: {**w, "som.embeddings": w["som.embeddings"] * np.float32(FAR_SOM)},
                    "at initialisation every z_dist is small and q's Keras epsilon (1e-7) is invisible next to t ~ 1; "
                    "trained models live where t ~ 1e-6 and the epsilon matters"),)

    def get_config(self, variant: str, overrides: Mapping[str, str] | None = None) -> Any:
        from ports.dpsom.config import get_config

        return get_config(variant, **dict(overrides or {}))

    def replace_config(self, cfg: Any, overrides: Mapping[str, str]) -> Any:
        from ports.dpsom.config import replace

        return replace(cfg, **dict(overrides))

    def config_dict(self, cfg: Any) -> dict[str, Any]:
        return cfg.to_dict()

    def variant_of(self, cfg: Any) -> str:
        return "conv" if cfg.convolution else "dense"

    def make_reference(self, cfg: Any, dtype: str = "float32") -> ReferenceSide:
        from harness.adapters.dpsom import TFReferenceDPSOM

        return TFReferenceDPSOM(cfg, dtype)

    def make_evaluation_reference(self, cfg: Any, dtype: str = "float64") -> ReferenceSide:
        """The reference without its Adam slots initialised (2 x the weights less memory)."""
        from harness.adapters.dpsom import TFReferenceDPSOM

        return TFReferenceDPSOM(cfg, dtype, optimizer_slots=False)

    def make_port(self, cfg: Any, dtype: str = "float32", device: str = "cpu") -> PortSide:
        from harness.adapters.dpsom import TorchDPSOM

        return TorchDPSOM(cfg, dtype, device)

    def load_data(self, cfg: Any, dataset: str | None, n: int) -> tuple[np.ndarray, str]:
        """The first ``n`` training images as the original preprocesses them (MNIST if found offline,
        else the embedded 'digits')."""
        from harness.data import dpsom_splits, offline_raw

        raw = offline_raw(dataset)
        return dpsom_splits(raw, validation=False).x_train[:n], raw.name

    def draw_inputs(self, cfg: Any, rng: np.random.Generator, x: np.ndarray) -> Batch:
        B = len(x)
        eps = rng.standard_normal((B, cfg.latent_dim)).astype(np.float32)
        p = target_distribution(rng.dirichlet(np.ones(cfg.n_nodes), size=B))
        return {"x": x, "eps": eps, "p": p}

    def executed(self, side: ReferenceSide, batch: Batch) -> dict[str, Any]:
        L = np.asarray(side.forward(batch)["posterior.scale_tril"])
        return {"posterior": "full covariance (lower-triangular scale)" if np.any(np.tril(L, -1)) else "diagonal"}

    def constants(self, cfg: Any) -> dict[str, float]:
        return {"leaky_relu_slope": float(np.float32(cfg.leaky_relu_slope)), "n_pixels": float(np.prod(cfg.image_shape)),
                "latent_dim": float(cfg.latent_dim), "n_nodes": float(cfg.n_nodes), "batch_size": float(cfg.batch_size),
                "adam.beta1": float(np.float32(0.9)), "adam.beta2": float(np.float32(0.999))}

    def is_activation(self, name: str) -> bool:
        leaf = name.rsplit(".", 1)[-1]
        return leaf.rstrip("0123456789") in ("fc", "conv", "deconv")

    def read_original_checkpoint(self, path: str, cfg: Any, shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
        from harness.transplant import read_original_checkpoint

        return read_original_checkpoint(path, "dpsom", self.variant_of(cfg), shapes)

    def check_original_checkpoint(self, path: str, cfg: Any, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
        from harness.transplant import check_original_checkpoint

        return check_original_checkpoint(path, "dpsom", self.variant_of(cfg), shapes)

    def table_path(self, cfg: Any) -> Path:
        return Path(__file__).resolve().parents[1] / "tables" / f"dpsom_{self.variant_of(cfg)}.csv"

    # --- T4 --------------------------------------------------------------------------------------
    def t4_plan(self, cfg: Any, steps: int, epoch_steps: int) -> list[T4Step]:
        """``steps`` steps in the original's shape: ~30 % VAE, ~10 % per SOM-init LR stage, the rest
        joint (at least one step each); p recomputed at the start of every joint epoch."""
        n_vae = max(1, round(0.3 * steps))
        n_som = [max(1, round(0.1 * steps)) for _ in SOM_INIT_LRS]
        n_joint = max(1, steps - n_vae - sum(n_som))
        segments = [("vae", cfg.learning_rate_pretrain, n_vae)] + [("som_init", lr, n) for lr, n in zip(SOM_INIT_LRS, n_som)]
        segments.append(("joint", cfg.learning_rate, n_joint))
        out, i = [], 0
        for phase, lr, n in segments:
            for k in range(n):
                out.append(T4Step(i, phase, lr, i % epoch_steps, phase == "joint" and (k == 0 or i % epoch_steps == 0)))
                i += 1
        return out

    def t4_batches(self, cfg: Any, st: T4Step, rng: np.random.Generator, x_train: np.ndarray,
                   sides: Mapping[str, ReferenceSide], state: dict[str, Any]) -> dict[str, Batch]:
        """One ε per step; at the start of a joint epoch one ε per training example for the soft
        assignments q, and each side's p from its OWN q (as real training does). Outside the joint
        phase p is uniform (it only enters the reported kl_pq / total there)."""
        B, D = cfg.batch_size, cfg.latent_dim
        eps = rng.standard_normal((B, D)).astype(np.float32)
        if st.epoch_start:
            eps_q = rng.standard_normal((len(x_train), D)).astype(np.float32)
            state["p"] = {k: target_distribution(np.concatenate([s.forward({"x": x_train[i:i + B], "eps": eps_q[i:i + B]})["som.q"]
                                                                 for i in range(0, len(x_train), B)])) for k, s in sides.items()}
        rows = slice(st.batch * B, (st.batch + 1) * B)
        uniform = np.full((B, cfg.n_nodes), 1.0 / cfg.n_nodes, np.float32)
        return {k: {"x": x_train[rows], "eps": eps, "p": state["p"][k][rows] if st.phase == "joint" else uniform} for k in sides}

    # --- data tier ---------------------------------------------------------------------------------
    def make_data_reference(self, cfg: Any) -> ReferenceSide:
        """The TF reference's data path alone: ``reference_tf.dpsom.data`` needs no TensorFlow."""
        from harness.adapters.dpsom import TFReferenceDPSOMData

        return TFReferenceDPSOMData(cfg)

    def data_rule(self, raw: Mapping[str, np.ndarray], cfg: Any, validation: bool) -> dict[str, np.ndarray]:
        """specs/dpsom.md §2 written out once more, by indices (neither side's code):

        * every image divided by its own maximum pixel in float64, fed as float32, NHWC;
        * the pool split by the indices ``train_test_split(arange(n), test_size=0.15,
          random_state=42)`` gives (train first, the held-out 15 % second), labels alongside;
        * ``validation=False``: logged stream = evaluation set = the test set; ``True``: the split;
        * batches in order, no shuffling, ``n // batch_size`` full ones, the remainder dropped; the
          training loop's two first epochs are the same batches twice (one pass per epoch)."""
        from sklearn.model_selection import train_test_split

        def fed(images: np.ndarray) -> np.ndarray:
            x = np.asarray(images).astype(np.float64)
            x /= x.max(axis=(1, 2), keepdims=True)
            return x.astype(np.float32)[..., None]

        def in_order(n: int) -> np.ndarray:
            B = cfg.batch_size
            return np.arange(n // B * B, dtype=np.int64).reshape(-1, B)

        pool_x, pool_y = np.asarray(raw["x_train"]), np.asarray(raw["y_train"])
        train, held = train_test_split(np.arange(len(pool_x)), test_size=0.15, random_state=42)
        if validation:
            x_eval, y_eval = fed(pool_x[held]), pool_y[held]
        else:
            x_eval, y_eval = fed(raw["x_test"]), np.asarray(raw["y_test"])
        epoch = in_order(len(train))
        return {"data.x_train": fed(pool_x[train]), "data.y_train": pool_y[train], "data.x_val": x_eval, "data.y_val": y_eval,
                "data.x_eval": x_eval, "data.y_eval": y_eval, "data.train_batches": np.concatenate([epoch, epoch]),
                "data.eval_batches": in_order(len(x_eval))}

    # --- own-loop T4 and evaluation tier -----------------------------------------------------------
    def ownloop_overrides(self, cfg: Any) -> dict[str, str]:
        """One epoch of VAE pretraining, one per SOM-init LR stage, two joint epochs (p recomputed at
        the second one's start); ``OWNLOOP_BATCHES`` batches of at most ``OWNLOOP_BATCH`` images per
        epoch; the LR decays every ``OWNLOOP_DECAY_STEPS`` global steps so every phase sees a decay."""
        return {"batch_size": str(min(cfg.batch_size, OWNLOOP_BATCH)), "epochs_pretrain": "1", "som_init_epochs_per_stage": "1",
                "num_epochs": "2", "decay_steps": str(OWNLOOP_DECAY_STEPS)}

    def ownloop_data(self, cfg: Any, dataset: str | None) -> tuple[dict[str, np.ndarray], str]:
        """``x_train``: ``OWNLOOP_BATCHES`` full batches plus 2 images the original's loop drops (a
        port that keeps a partial batch takes an extra step); ``x_eval`` / ``y_eval`` (and ``x_val``,
        the original's logged stream = the test set): 2 full batches plus 3 leftover images, which
        the original's evaluation skips."""
        from harness.data import dpsom_splits, offline_raw

        B = cfg.batch_size
        raw = offline_raw(dataset)
        d = dpsom_splits(raw, validation=False)
        n_train, n_eval = OWNLOOP_BATCHES * B + 2, 2 * B + 3
        if len(d.x_train) < n_train or len(d.x_eval) < n_eval:
            raise ValueError(f"{raw.name}: {len(d.x_train)} training / {len(d.x_eval)} test images; the own-loop run needs "
                             f"{n_train} / {n_eval} (batch_size {B})")
        # copies: the slices alone stay in memory, not the whole preprocessed data set behind them
        return {"x_train": d.x_train[:n_train].copy(), "x_val": d.x_eval[:n_eval].copy(), "x_eval": d.x_eval[:n_eval].copy(),
                "y_eval": d.y_eval[:n_eval]}, raw.name

    def evaluation_data(self, cfg: Any, dataset: str | None) -> tuple[dict[str, np.ndarray], str]:
        """The original's final evaluation set (the test set; 33 full batches of 300 are evaluated on MNIST)."""
        from harness.data import dpsom_splits, offline_raw

        raw = offline_raw(dataset)
        d = dpsom_splits(raw, validation=cfg.validation)
        return {"x_eval": d.x_eval, "y_eval": d.y_eval}, raw.name


    # --- whole schedules (harness/matrix.py) --------------------------------
    def schedules(self, cfg: Any) -> dict[str, dict[str, str]]:
        """``original``: 15 VAE epochs, 4 x 5 SOM-initialisation epochs, 300 joint epochs (specs/dpsom.md
        §6.3); ``reduced``: 3 VAE epochs, the same four 5-epoch SOM-initialisation stages, 5 joint
        epochs (4 760 steps on MNIST: minutes per side on a laptop CPU). Both keep batch 300, the LR
        decay every 1000 global steps and the per-epoch target distribution."""
        return {"original": {}, "reduced": {"epochs_pretrain": "3", "som_init_epochs_per_stage": "5", "num_epochs": "5"}}

    def schedule_data(self, cfg: Any, dataset: str | None, rng: np.random.Generator,
                      limit: int | None = None) -> tuple[dict[str, np.ndarray], str]:
        """The original's training array (MNIST: the 51 000-image pool split, in its order; DPSOM never
        shuffles; its first ``limit`` images if given) and its whole final evaluation set; the noise
        of every forward is the run's own stream (``eps``), so ``rng`` is not drawn from."""
        from harness.data import dpsom_splits, offline_raw

        raw = offline_raw(dataset)
        d = dpsom_splits(raw, validation=cfg.validation)
        x_train = d.x_train[:limit].copy() if limit else d.x_train
        if len(x_train) < cfg.batch_size:
            raise ValueError(f"{raw.name}: {len(x_train)} training images, fewer than one batch ({cfg.batch_size})")
        return {"x_train": x_train, "x_eval": d.x_eval, "y_eval": d.y_eval}, raw.name

    def final_evaluation(self, side: Any, cfg: Any, data: Mapping[str, np.ndarray], records: list[dict[str, Any]],
                         eps: Any) -> dict[str, Any]:
        """The side's own evaluation (BMU of a sampled z for every full batch of the evaluation set) plus
        the two DPSOM-only metrics: the topographic error on the toroidal grid (share of inputs whose
        two nearest nodes are not neighbours: the SOM's own order) and the reconstruction NLL (the
        ELBO's Bernoulli term, nats per image, averaged over the same batches); and where the side can
        decode (``decode(z)``), the SOM's prototypes decoded (``prototypes`` [K, H, W, C])."""
        ev = side.evaluate_assignments(data, eps)
        ev["metrics"] = {**ev["metrics"], "topographic_error": topographic_error(ev["distances"], cfg.som_dim)}
        B, K = cfg.batch_size, cfg.som_dim[0] * cfg.som_dim[1]
        x, nll = np.asarray(data["x_eval"]), []
        p = np.full((B, K), 1.0 / K, np.float32)  # loss.elbo.nll does not read p
        for start in range(0, len(x) - B + 1, B):
            nll.append(side.losses({"x": x[start : start + B], "eps": eps((B, cfg.latent_dim)), "p": p})["loss.elbo.nll"])
        ev["metrics"]["reconstruction_nll"] = float(np.mean(nll))
        if hasattr(side, "decode"):  # optional: the SOM's prototypes as images, for the T5 figure
            ev["prototypes"] = side.decode(side.get_weights()["som.embeddings"].reshape(K, cfg.latent_dim))
        return ev

    # --- config matrix ------------------------------------------------------------------------------
    def config_matrix(self, variant: str) -> tuple[ConfigCase, ...]:
        """Every value below differs from its default in every variant (batch 7 is odd and neither 300
        nor the tiny variants' 5; the tiny grids are 3x3, the full ones 8x8). The conv variant's
        quick tier costs minutes per config, so the matrix is declared for the dense variants only."""
        if self.get_config(variant).convolution:
            return ()
        original = ("the original cannot run a {0} grid: it locates node k at row k // {1}, column k % {2} and its "
                    "loss_som flattens neighbours as row * {1} + column, addressing nodes outside the grid "
                    "(tf.gather_nd: InvalidArgumentError on CPU, zeros on GPU, so loss_som = inf); both sides run "
                    "the declared correction som_index=row_major")
        return (
            ConfigCase({"prior_var": "2"}, "prior std 2: the KL's 1/s^2 and 2D ln s terms, invisible at s = 1"),
            ConfigCase({"alpha": "3.5"}, "Student-t degrees of freedom 3.5: q's exponent (alpha+1)/2 and d/alpha"),
            ConfigCase({"batch_size": "7"}, "an odd batch: batch means and the reference's uneven batch split (3 + 4)"),
            ConfigCase({"som_dim": "3,4", "som_index": "row_major"}, "a 3x4 SOM (wider than tall): row/column roles",
                       original.format("3x4", 3, 4)),
            ConfigCase({"som_dim": "4,3", "som_index": "row_major"}, "a 4x3 SOM (taller than wide): row/column roles",
                       original.format("4x3", 4, 3)),
        )


OWNLOOP_BATCH, OWNLOOP_BATCHES, OWNLOOP_DECAY_STEPS = 16, 3, 2


SPEC = DPSOMSpec()

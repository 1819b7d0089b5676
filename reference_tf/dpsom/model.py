"""DPSOM, TensorFlow reference: the original graph as executed, with canonical names around it.

Reproduces ``DPSOM_model.py`` of github ratschlab/dpsom (commit 8e3cddc "New HP setting", the
DPSOM state of HEAD eb41e7d), as driven by its ``DPSOM.py``; paper: Manduchi et al., "DPSOM: Deep
Probabilistic Clustering with Self-Organizing Maps", arXiv 1910.01590. Written from
specs/dpsom.md (§1–§8, §14, Appendix B) and docs/dpsom-interface.md; the bit-identity claims below
were checked by running the original code separately (it is not part of this repository).

What is reproduced: a ``tf.compat.v1`` graph in its own ``tf.Graph`` with graph-level seed 2020,
the original's variable scopes and Keras layers (so every variable, BN moving statistics and Adam
slots included, carries the original checkpoint name and a checkpoint written by ``DPSOM.py``
restores), Keras' learning phase never set (BatchNormalization is a frozen affine map, Dropout is
inert), ``tfp.layers.MultivariateNormalTriL`` posterior (FillScaleTriL, softplus(diag) + 1e-5),
``tfp.layers.IndependentBernoulli`` decoder (the dense decoder's logits pass through LeakyReLU),
the ``is_training`` switch of the decoder input and its fed ``reconstruction_e/decoder/z_e``
placeholder, and one shared Adam with one global step (see optim.py).

Deliberate deviations (none changes a formula; see also losses.py for the q evaluation order):

* **Injectable ε.** ``eps = placeholder_with_default(<native draw>)`` and the sample is
  ``z = posterior.bijector.forward(eps)`` (= mu + scale_tril @ eps, TFP's own sampling transform);
  the original samples inside the MVN layer (whose tensor value is here its mean, unused, so that
  no second sampler exists). Unfed, ε is drawn exactly as TFP does it for the original: one
  stateful standard-normal op of shape [D, B], transposed, once per ``session.run``.
* **Same random streams as the original.** TF (>= 2.x) gives every seeded random op the graph
  seed plus a per-graph counter, in creation order. The reference creates the same random ops in
  the same order (v1 Glorot-uniform initialisers, truncated-normal embeddings, the ε op) and takes
  the seeds of the original's never-executed Dropout ops, so with the default seed 2020 the initial
  weights, the native ε of every ``session.run`` and hence every loss are bit-identical to the
  original graph (checked for dense and conv against the original model run in a separate
  process under TF 2.21 + TFP 0.25: initial weights, native ε, all loss terms, 7 steps across
  the three phases, final weights and Adam slots, evaluation BMUs).
* **Explicit Keras layer names**, equal to the auto-generated ones of the original graph, so names
  do not depend on other layers created in the process.
* **TF2 behaviour is left on** (no ``disable_v2_behavior``: it is process-global). The graph
  therefore uses resource variables for ``embeddings`` / ``global_step`` (original: ref variables)
  and control-flow-v2 ``If`` ops for ``tf.cond`` and Keras' ``smart_cond`` (original:
  Switch/Merge). Values, gradients and checkpoint names are the same.
* The SOM embeddings are read once per ``session.run`` (one read op shared by all consumers), so
  every loss term fetched together with a train op sees the pre-update values. (The original's
  ref variable is read separately by each consumer; ``loss_a`` fetched in the same run as a joint
  train op -- which the original never does -- may then see updated embeddings.)
* No summary ops are built (TensorBoard scalars are written by train.py from fetched values).
* **SOM index** (config ``som_index``). ``"original"`` (default) locates node k as the original
  does (row k // som_dim[0], column k % som_dim[1], wraps as branches with the left one to column
  som_dim[0] - 1, loss_som's flat neighbour row * som_dim[0] + column): right on square grids only,
  so the config refuses any other grid with it, saying why (on a non-square grid the original reads
  outside the grid: InvalidArgumentError on CPU, zeros on GPU). ``"row_major"`` is the declared
  correction that runs any grid, on both sides (losses.grid_neighbours / neighbour_table).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections import Counter

import numpy as np

from reference_tf import require_tensorflow
from reference_tf.dpsom import losses as L
from reference_tf.dpsom import optim
from reference_tf.dpsom.config import EMBEDDING_INIT_STDDEV, DPSOMConfig

tf = require_tensorflow()
import tensorflow_probability as tfp  # noqa: E402

tfd = tfp.distributions
layers_v1 = tf.compat.v1.keras.layers  # the original's ``tf.keras`` with ``tf = tensorflow.compat.v1``
layers_v2 = tf.keras.layers  # the original's ``from tensorflow.keras.layers import ...``

WRITE_CHUNK_BYTES = 64 << 20  # set_weights / set_optimizer_state: fed values per session.run (see _write)

LOSS_KEYS = (
    "loss.elbo.nll", "loss.elbo.kl", "loss.elbo", "loss.kl_pq", "loss.som", "loss.total",
    "loss.som_init.commit", "loss.som_init.som", "loss.som_init",
)


def _table(config: DPSOMConfig):
    from harness.transplant import load_table

    return load_table("dpsom", "conv" if config.convolution else "dense")


@contextlib.contextmanager
def _densify_quietly():
    """Silence TF's "Converting sparse IndexedSlices ... of unknown shape" while building gradients.

    The original's SOM loss gathers rows of q_ng^T with ``gather_nd``; TF turns that gradient
    into a dense [K, B] tensor (B dynamic) and warns. Reproducing the original's gradient (and its
    float summation order) needs exactly that path; the tensor is small (K x batch).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Converting sparse IndexedSlices", category=UserWarning)
        yield


class _LayerNames:
    """Keras' per-graph auto names: ``dense``, ``dense_1``, ... (spelt out explicitly)."""

    def __init__(self):
        self._count = Counter()

    def __call__(self, prefix: str) -> str:
        n = self._count[prefix]
        self._count[prefix] += 1
        return prefix if n == 0 else f"{prefix}_{n}"


class DPSOM:
    """The original DPSOM graph with a numpy-in / numpy-out API keyed by canonical names.

    ``forward``, ``losses`` and ``gradients`` evaluate one ``session.run`` each with the decoder
    fed the sample (``is_training = True``, ``z_e`` placeholder fed zeros, as ``DPSOM.py`` does).
    """

    def __init__(self, config: DPSOMConfig, seed: int | None = None, dtype: str = "float32", optimizer_slots: bool = True):
        """``dtype="float64"`` builds the same graph in double precision (Keras floatx, placeholders,
        ε, embeddings): the harness's rounding-free comparison. float32 is the original.
        ``optimizer_slots=False`` leaves the Adam m/v variables uninitialised (no memory: 2 x the
        weights), for a model that is only evaluated: no train op may run and the optimizer state
        cannot be read or written. The graph, and every other variable, is the same."""
        deviations = {k: getattr(config, k) for k, v in (("bn_mode", "frozen_affine"), ("bn_order", "after_activation"),
                      ("dropout_active", False)) if getattr(config, k) != v}
        if deviations:
            raise NotImplementedError(
                f"{deviations}: the TF reference reproduces the original as executed (BatchNormalization "
                "a frozen affine map after LeakyReLU, dropout never firing); these are port-only deviations"
            )
        self.config = config
        self.seed = config.random_seed if seed is None else int(seed)
        self.dtype = tf.as_dtype(dtype)
        self.graph = tf.Graph()
        floatx = tf.keras.backend.floatx()
        try:
            tf.keras.backend.set_floatx(dtype)
            with self.graph.as_default():
                tf.compat.v1.set_random_seed(self.seed)
                self._build()
        finally:
            tf.keras.backend.set_floatx(floatx)
        self.session = tf.compat.v1.Session(graph=self.graph)
        if optimizer_slots:
            self.session.run(self._init_op)
        else:
            slots = {v for k, v in self._optim_vars.items() if k.endswith(("/adam_m", "/adam_v"))}
            with self.graph.as_default():
                init = tf.compat.v1.variables_initializer([var for name, var in self._vars.items() if name not in slots])
            self.session.run(init)

    # ------------------------------------------------------------------------------------------
    # graph construction, in the original's order (DPSOM.__init__ touches its lazy properties)
    # ------------------------------------------------------------------------------------------
    def _build(self) -> None:
        cfg = self.config
        vs = tf.compat.v1.variable_scope
        D, (R, C) = cfg.latent_dim, cfg.som_dim
        act = tf.nn.leaky_relu
        if cfg.leaky_relu_slope != 0.2:  # declared deviation from the original's default slope
            slope = cfg.leaky_relu_slope
            act = lambda t: tf.nn.leaky_relu(t, alpha=slope)  # noqa: E731
        name = _LayerNames()
        t: dict = {}  # canonical name -> tensor, execution order

        def glorot():
            # The original runs with TF2 behaviour disabled, where Keras resolves "glorot_uniform" to
            # the v1 initializer (a stateful RandomUniform op seeded from the graph). With TF2 on,
            # Keras would pick its v2 initializer, which ignores the graph seed.
            return tf.compat.v1.glorot_uniform_initializer()

        def skip_dropout_seed():
            # The original's Dropout builds its (never executed) random op inside a v1 cond in the
            # main graph, which takes one op seed from the graph's counter. Our cond is a v2
            # function graph with its own counter, so take that seed here to keep every later
            # random op on the original's seed.
            tf.compat.v1.random.get_seed(None)

        def bn(h):
            # Called without `training`, as the original: Keras' learning phase decides (never fed).
            return layers_v2.BatchNormalization(epsilon=cfg.bn_epsilon, name=name("batch_normalization"))(h)

        # DPSOM.py creates the learning-rate placeholder before the model.
        self.lr_feed = tf.compat.v1.placeholder_with_default(np.float32(cfg.learning_rate), [], name="lr_feed")
        with vs("is_training"):
            self.is_training = tf.compat.v1.placeholder(tf.bool, shape=[], name="is_training")
        with vs("inputs"):
            self.x = tf.compat.v1.placeholder(self.dtype, shape=[None, *cfg.image_shape], name="x")
        with vs("batch_size"):
            batch_size = tf.shape(self.x)[0]
        with vs("embeddings"):
            self.embeddings = tf.compat.v1.get_variable(
                "embeddings", [R, C, D],
                initializer=tf.compat.v1.truncated_normal_initializer(stddev=EMBEDDING_INIT_STDDEV), dtype=self.dtype,
            )
            emb = tf.identity(self.embeddings, name="value")  # one read shared by every consumer
        with vs("global_step"):
            self.global_step = tf.compat.v1.Variable(0, trainable=False, name="global_step")

        # --- encoder and posterior (scope z_e/encoder) ---
        with vs("z_e"), vs("encoder"):
            if not cfg.convolution:
                h = tf.reshape(self.x, (-1, cfg.n_pixels))
                for i, width in enumerate(cfg.dense_enc_dims, start=1):
                    h = layers_v1.Dense(width, activation=act, kernel_initializer=glorot(), name=name("dense"))(h)
                    t[f"encoder.fc{i}"] = h
                    h = layers_v1.Dropout(rate=cfg.dropout, name=name("dropout"))(h)
                    skip_dropout_seed()
                    h = bn(h)
                    t[f"encoder.bn{i}"] = h
            else:
                h = tf.cast(self.x, self.dtype) - 0.5
                t["encoder.input"] = h
                for i, channels in enumerate(cfg.conv_channels, start=1):
                    h = layers_v2.Conv2D(channels, (3, 3), activation=act, padding="same", kernel_initializer=glorot(),
                                         name=name("conv2d"))(h)
                    t[f"encoder.conv{i}"] = h
                    h = bn(h)
                    t[f"encoder.bn{i}"] = h
                    if i <= 2:
                        h = layers_v2.MaxPooling2D(pool_size=(2, 2), name=name("max_pooling2d"))(h)
                        t[f"encoder.pool{i}"] = h
                h = tf.reshape(h, [-1, int(np.prod(cfg.conv_feature_shape))])
                t["encoder.flatten"] = h
            assert tfp.layers.MultivariateNormalTriL.params_size(D) == cfg.head_dim
            head = layers_v2.Dense(cfg.head_dim, activation=None, kernel_initializer=glorot(), name=name("dense"))(h)
            t["posterior.head"] = head
            self.posterior = tfp.layers.MultivariateNormalTriL(
                D, convert_to_tensor_fn=tfd.Distribution.mean, name="multivariate_normal_tri_l"
            )(head)
            t["posterior.mu"] = self.posterior.loc
            t["posterior.scale_tril"] = self.posterior.scale.to_dense()
            # Native ε exactly as TFP draws it for MultivariateNormalTriL.sample() with seed=None:
            # one stateful standard-normal op (next graph op seed) of shape [D, B] (a Sample over
            # the event dim of a batch-[B] Normal), transposed to [B, D].
            self._eps_draw = tf.random.normal(tf.stack([D, batch_size]), dtype=self.dtype)
            native_eps = tf.transpose(self._eps_draw, name="eps_native")
            self._batch_size = batch_size
            self.eps = tf.compat.v1.placeholder_with_default(native_eps, shape=[None, D], name="eps")
            z = self.posterior.bijector.forward(self.eps)  # = mu + scale_tril @ eps
        with vs("sample_z_e"):
            z = tf.identity(z, name="z_e")
            t["z"] = z

        # --- SOM: distances, BMU and its neighbourhood ---
        with vs("z_dist_flat"):
            z_dist = L.z_dist_flat(z, emb, cfg.som_dim)
        with vs("k"):
            k = tf.argmin(z_dist, axis=-1, name="k")
        # node k's grid row and column, and its torus neighbours', as the config's som_index says
        # ("original": row k // som_dim[0], column k % som_dim[1], wraps as branches; see losses.py)
        nodes = L.grid_neighbours(k, cfg.som_dim, cfg.som_index, where=tf.where)
        with vs("z_q"):
            z_q = tf.gather_nd(emb, tf.stack(nodes[0], axis=1), name="z_q")
        with vs("z_q_neighbors"):
            z_q_neighbours = tf.stack([z_q] + [tf.gather_nd(emb, tf.stack(rc, axis=1)) for rc in nodes[1:]], axis=1)

        # --- decoder (scope reconstruction_e/decoder) ---
        with vs("reconstruction_e"), vs("decoder", reuse=tf.compat.v1.AUTO_REUSE):
            self.z_fed = tf.compat.v1.placeholder(self.dtype, shape=[None, D], name="z_e")
            h = tf.compat.v1.cond(self.is_training, lambda: z, lambda: self.z_fed)
            if not cfg.convolution:
                for i, width in enumerate(reversed(cfg.dense_enc_dims), start=1):
                    h = layers_v1.Dense(width, activation=act, kernel_initializer=glorot(), name=name("dense"))(h)
                    t[f"decoder.fc{i}"] = h
                    h = bn(h)
                    t[f"decoder.bn{i}"] = h
                logits = layers_v1.Dense(cfg.n_pixels, activation=act, kernel_initializer=glorot(), name=name("dense"))(h)
            else:
                fh, fw, fc = cfg.conv_feature_shape
                h = layers_v2.Dense(fh * fw * fc, activation=act, kernel_initializer=glorot(), name=name("dense"))(h)
                t["decoder.fc1"] = h
                h = tf.reshape(h, [-1, fh, fw, fc])
                c1, c2, c3 = cfg.conv_channels[2], cfg.conv_channels[1], cfg.conv_channels[0]
                for i, channels in ((1, c1), (2, c2), (3, c3)):
                    h = layers_v2.Conv2DTranspose(
                        channels, (3, 3), activation=act, padding="same", kernel_initializer=glorot(),
                        name=name("conv2d_transpose"),
                    )(h)
                    t[f"decoder.deconv{i}"] = h
                    h = bn(h)
                    t[f"decoder.bn{i}"] = h
                    if i >= 2:
                        h = layers_v2.UpSampling2D((2, 2), name=name("up_sampling2d"))(h)
                        t[f"decoder.up{i - 1}"] = h
                h = layers_v2.Conv2D(cfg.image_shape[-1], (3, 3), activation=None, padding="same",
                                     kernel_initializer=glorot(), name=name("conv2d"))(h)
                logits = tf.reshape(h, [-1, cfg.n_pixels])
            self.x_distribution = tfp.layers.IndependentBernoulli(
                list(cfg.image_shape), tfd.Bernoulli.logits, name="independent_bernoulli"
            )(logits)
            t["decoder.logits"] = tf.convert_to_tensor(self.x_distribution)
        t["som.z_dist"] = z_dist
        t["som.k"] = k

        # --- losses ---
        with vs("loss_reconstruction_ze"):
            nll = L.elbo_nll(self.x_distribution, self.x)
            kl = L.elbo_kl(self.posterior, cfg.prior_var, D)
            elbo = L.elbo(nll, kl, cfg.prior)
        with vs("p"):
            self.p = tf.compat.v1.placeholder(self.dtype, shape=(None, cfg.n_nodes), name="p")
        with vs("q"):
            q = L.student_t_q(z_dist, cfg.alpha, cfg.q_epsilon)
        with vs("loss_commit"):
            kl_pq = L.kl_pq(self.p, q)
        with vs("loss_commit_s"):
            commit_s = L.som_init_commit(z, z_q)
        with vs("loss_som_s"):
            som_s = L.som_init_som(z, z_q_neighbours)
        with vs("loss_som"):
            with vs("q_ng"):
                q_ng = L.student_t_q(L.z_dist_flat(tf.stop_gradient(z), emb, cfg.som_dim), cfg.alpha, cfg.q_epsilon)
            som = L.loss_som(q, q_ng, cfg.som_dim, cfg.som_index)
        with vs("loss"):
            total = L.total(elbo, kl_pq, som, cfg.theta, cfg.gamma, cfg.beta)
        with vs("loss_a"):
            som_init = L.som_init(som_s, commit_s)
        t["som.q"] = q

        # forward dict in execution order (som.* last, as the contract lists them)
        order = [key for key in t if not key.startswith("som.")] + ["som.z_dist", "som.q", "som.k"]
        self.forward_tensors = {key: t[key] for key in order}
        self.loss_tensors = {
            "loss.elbo.nll": nll, "loss.elbo.kl": kl, "loss.elbo": elbo, "loss.kl_pq": kl_pq,
            "loss.som": som, "loss.total": total, "loss.som_init.commit": commit_s,
            "loss.som_init.som": som_s, "loss.som_init": som_init,
        }

        with vs("optimize"), _densify_quietly():
            self.optim = optim.build(self.loss_tensors, self.global_step, self.lr_feed, cfg)

        # --- extras (after every random op): evaluation by the mean, weight exchange, saver ---
        with tf.compat.v1.name_scope("evaluation"):
            self.k_mean = tf.argmin(L.z_dist_flat(self.posterior.loc, emb, cfg.som_dim), axis=-1)
        self._index_variables()
        with tf.compat.v1.name_scope("applied_gradients"), _densify_quietly():
            canonical_of = {var_name: c for c, var_name in self._weight_rows.items()}
            self.applied_gradients = {
                phase: {canonical_of[v.op.name]: tf.convert_to_tensor(g) for g, v in gvs}
                for phase, gvs in self.optim.grads_and_vars.items()
            }
        with tf.compat.v1.name_scope("assign"):
            self._assign = {}
            for var_name, var in self._vars.items():
                ph = tf.compat.v1.placeholder(var.dtype.base_dtype, var.shape)
                self._assign[var_name] = (ph, var.assign(ph, read_value=False))
        self._saver = tf.compat.v1.train.Saver(var_list=dict(self._vars), max_to_keep=None)
        self._init_op = tf.compat.v1.global_variables_initializer()
        self._grad_cache: dict = {}
        self._finite_ops: dict | None = None  # built on first use by nonfinite_variables()

    def _index_variables(self) -> None:
        cfg = self.config
        self._vars = {v.op.name: v for v in tf.compat.v1.global_variables()}
        self.update_ops = tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS)
        table = _table(cfg)
        self._weight_rows = {row.canonical: row.tf_variable for row in table}
        weight_vars = {n for n in self._vars if not (n.startswith("optimize/") or n.startswith("global_step/"))}
        listed = set(self._weight_rows.values())
        if weight_vars != listed:
            raise RuntimeError(
                f"graph variables and the transplant table disagree: not in table "
                f"{sorted(weight_vars - listed)}, not in graph {sorted(listed - weight_vars)}"
            )
        trainable = {v.op.name for v in tf.compat.v1.trainable_variables()}
        opt = self.optim.optimizer
        self._optim_vars = {"optim.global_step": self.global_step.op.name}
        beta1_power, beta2_power = opt._get_beta_accumulators()  # noqa: SLF001 (TF1 Adam API)
        self._optim_vars["optim.beta1_power"] = beta1_power.op.name
        self._optim_vars["optim.beta2_power"] = beta2_power.op.name
        self._trainable_canonical = []
        for canonical, var_name in self._weight_rows.items():
            if var_name in trainable:
                self._trainable_canonical.append(canonical)
                var = self._vars[var_name]
                self._optim_vars[f"{canonical}/adam_m"] = opt.get_slot(var, "m").op.name
                self._optim_vars[f"{canonical}/adam_v"] = opt.get_slot(var, "v").op.name

    # ------------------------------------------------------------------------------------------
    # feeding
    # ------------------------------------------------------------------------------------------
    def _feed(self, x, eps=None, p=None, lr_feed=None, need_p=False) -> dict:
        cfg = self.config
        x = np.asarray(x, dtype=self.dtype.as_numpy_dtype)
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(cfg.image_shape):
            raise ValueError(f"x: expected float32 [B, {', '.join(map(str, cfg.image_shape))}], got {x.shape}")
        batch = x.shape[0]
        feed = {self.x: x, self.is_training: True, self.z_fed: np.zeros((batch, cfg.latent_dim), self.dtype.as_numpy_dtype)}
        if eps is not None:
            eps = np.asarray(eps, dtype=self.dtype.as_numpy_dtype)
            if eps.shape != (batch, cfg.latent_dim):
                raise ValueError(f"eps: expected [{batch}, {cfg.latent_dim}], got {eps.shape}")
            feed[self.eps] = eps
        if need_p:
            if p is None:
                p = np.full((batch, cfg.n_nodes), 1.0 / cfg.n_nodes, self.dtype.as_numpy_dtype)
            p = np.asarray(p, dtype=self.dtype.as_numpy_dtype)
            if p.shape != (batch, cfg.n_nodes):
                raise ValueError(f"p: expected [{batch}, {cfg.n_nodes}], got {p.shape}")
            feed[self.p] = p
        if lr_feed is not None:
            feed[self.lr_feed] = np.float32(lr_feed)
        return feed

    def skip_native_eps(self, batch: int, count: int = 1) -> None:
        """Advance the native ε stream as ``count`` runs on ``batch`` images would, computing nothing
        else (replays the RNG use of the original's logging runs, see train.py)."""
        for _ in range(count):
            self.session.run(self._eps_draw.op, {self._batch_size: batch})

    # ------------------------------------------------------------------------------------------
    # evaluation
    # ------------------------------------------------------------------------------------------
    def forward(self, x, eps=None) -> dict:
        """All named intermediates of one forward pass (NHWC), in execution order."""
        return self.session.run(self.forward_tensors, self._feed(x, eps))

    def losses(self, x, eps=None, p=None) -> dict:
        """Every loss term of one ``session.run`` as Python floats (p defaults to uniform 1/K)."""
        values = self.session.run(self.loss_tensors, self._feed(x, eps, p, need_p=True))
        return {key: float(values[key]) for key in LOSS_KEYS}

    def gradients(self, loss_name: str, x, eps=None, p=None) -> dict:
        """``d loss / d weight`` for the trainable weights that receive a gradient (others absent)."""
        if loss_name not in self.loss_tensors:
            raise KeyError(f"unknown loss {loss_name!r}; known: {list(LOSS_KEYS)}")
        if loss_name not in self._grad_cache:
            with self.graph.as_default():
                variables = [self._vars[self._weight_rows[c]] for c in self._trainable_canonical]
                with _densify_quietly():
                    grads = tf.gradients(self.loss_tensors[loss_name], variables)
                self._grad_cache[loss_name] = {
                    c: tf.convert_to_tensor(g) for c, g in zip(self._trainable_canonical, grads) if g is not None
                }
        return self.session.run(self._grad_cache[loss_name], self._feed(x, eps, p, need_p=True))

    # ------------------------------------------------------------------------------------------
    # weights and optimiser state (canonical names, TF layout)
    # ------------------------------------------------------------------------------------------
    def _read(self, names: dict) -> dict:
        values = self.session.run({key: self._vars[var_name] for key, var_name in names.items()})
        return {key: np.asarray(value) for key, value in values.items()}

    def _write(self, names: dict, given: dict, where: str) -> None:
        from harness.transplant import check_weights

        shapes = {key: tuple(self._vars[var_name].shape.as_list()) for key, var_name in names.items()}
        check_weights(given, shapes, where=where)
        # Assigned in runs of at most WRITE_CHUNK_BYTES fed: an assign holds the fed value and the
        # variable's buffer at once, so one run of everything would hold the whole state twice
        # (conv: the posterior head's Adam slots, 0.5 GiB, measured at the peak of the quick tier).
        feed, ops, size = {}, [], 0
        for key, var_name in names.items():
            ph, op = self._assign[var_name]
            value = np.asarray(given[key], dtype=ph.dtype.as_numpy_dtype)
            if ops and size + value.nbytes > WRITE_CHUNK_BYTES:
                self.session.run(ops, feed)
                feed, ops, size = {}, [], 0
            feed[ph], size = value, size + value.nbytes
            ops.append(op)
        self.session.run(ops, feed)

    def get_weights(self) -> dict:
        """Every weight of the transplant table (BN moving statistics included), canonical layout."""
        return self._read(self._weight_rows)

    def set_weights(self, weights: dict) -> None:
        """Strict: every missing / unexpected / mis-shaped name is listed and nothing is written."""
        self._write(self._weight_rows, weights, "reference_tf DPSOM.set_weights")

    def learning_rate_at(self, lr_feed: float, global_step: int) -> float:
        """The effective LR the train ops would use at ``global_step`` (the variable is restored)."""
        name = self._optim_vars["optim.global_step"]
        ph, op = self._assign[name]
        saved = self.session.run(self._vars[name])
        try:
            self.session.run(op, {ph: np.asarray(global_step, ph.dtype.as_numpy_dtype)})
            return float(self.session.run(self.optim.lr, {self.lr_feed: lr_feed}))
        finally:
            self.session.run(op, {ph: saved})

    def get_optimizer_state(self) -> dict:
        """``optim.global_step``, ``optim.beta1_power``, ``optim.beta2_power``, ``<canonical>/adam_m|v``."""
        return self._read(self._optim_vars)

    def set_optimizer_state(self, state: dict) -> None:
        """Strict like :meth:`set_weights`."""
        self._write(self._optim_vars, state, "reference_tf DPSOM.set_optimizer_state")

    def param_count(self) -> int:
        """Number of trainable parameters (BN moving statistics excluded)."""
        with self.graph.as_default():
            return int(sum(np.prod(v.shape.as_list()) for v in tf.compat.v1.trainable_variables()))

    def variable_shapes(self) -> dict:
        """``{original checkpoint / TF variable name: shape}`` of every global variable."""
        return {name: tuple(var.shape.as_list()) for name, var in self._vars.items()}

    # ------------------------------------------------------------------------------------------
    # checkpoints (original variable names)
    # ------------------------------------------------------------------------------------------
    def save(self, path: str) -> str:
        """Write a TF checkpoint with the original names; returns its prefix."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with self.graph.as_default():  # Saver checks for eager mode outside the graph context
            return self._saver.save(self.session, path, write_meta_graph=False)

    def restore(self, path: str) -> None:
        """Restore a checkpoint written by :meth:`save` or by the original ``DPSOM.py``.

        Strict: every graph variable must be in the checkpoint and vice versa, with its shape, all
        checked before anything is assigned. Slots saved as ``<var>/Adam`` (without the ``optimize/``
        scope) are accepted as well.
        """
        in_ckpt = dict(tf.train.list_variables(path))
        var_list, missing = {}, []
        for var_name, var in self._vars.items():
            candidates = [var_name]
            if var_name.startswith("optimize/") and var_name.rsplit("/", 1)[-1] in ("Adam", "Adam_1"):
                candidates.append(var_name[len("optimize/"):])
            found = next((c for c in candidates if c in in_ckpt), None)
            if found is None:
                missing.append(var_name)
            else:
                var_list[found] = var
        unexpected = sorted(set(in_ckpt) - set(var_list))
        if missing or unexpected:
            raise ValueError(f"checkpoint {path}: nothing restored; missing {sorted(missing)}; unexpected {unexpected}")
        # Every shape before any assign: the Saver's grouped assigns could otherwise leave the variables
        # before a mis-shaped one restored and the rest not.
        misshaped = [f"{found}: expected shape {tuple(var.shape.as_list())}, found {tuple(in_ckpt[found])}"
                     for found, var in var_list.items() if tuple(in_ckpt[found]) != tuple(var.shape.as_list())]
        if misshaped:
            raise ValueError(f"checkpoint {path}: nothing restored; wrong shape: {'; '.join(misshaped)}")
        with self.graph.as_default():
            saver = self._saver if all(k == v.op.name for k, v in var_list.items()) else tf.compat.v1.train.Saver(var_list)
            saver.restore(self.session, path)

    def nonfinite_variables(self) -> list[str]:
        """Names of the float variables holding a NaN or inf, from one ``session.run`` of in-graph checks
        (nothing copied out of the session): a checkpoint must never store such a state."""
        if self._finite_ops is None:
            with self.graph.as_default(), tf.compat.v1.name_scope("finite"):
                self._finite_ops = {n: tf.reduce_all(tf.math.is_finite(v)) for n, v in self._vars.items()
                                    if v.dtype.base_dtype.is_floating}
        finite = self.session.run(self._finite_ops)
        return sorted(n for n, ok in finite.items() if not ok)

    def restore_weights(self, path: str) -> None:
        """Restore only the weights (the table's variables, BN moving statistics included) from a
        checkpoint written by the original ``DPSOM.py``, by TF's own name matching (the original's
        ``saver.restore``), not through the table's ``original_checkpoint`` column; optimizer slots,
        ``global_step`` and any other variable of the checkpoint are ignored, the optimizer state is
        left as it is. Strict: every missing or mis-shaped weight is named and nothing is restored."""
        in_ckpt = dict(tf.train.list_variables(path))
        names = list(self._weight_rows.values())
        missing = sorted(n for n in names if n not in in_ckpt)
        misshaped = [f"{n} {tuple(in_ckpt[n])} (graph {tuple(self._vars[n].shape.as_list())})" for n in names
                     if n in in_ckpt and tuple(in_ckpt[n]) != tuple(self._vars[n].shape.as_list())]
        if missing or misshaped:
            raise ValueError(f"checkpoint {path}: nothing restored; missing {missing}; wrong shape {misshaped}")
        with self.graph.as_default():
            tf.compat.v1.train.Saver({n: self._vars[n] for n in names}).restore(self.session, path)

    # ------------------------------------------------------------------------------------------
    # sessions
    # ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def fresh_session(self):
        """A new ``Session`` on this graph holding the current variable values.

        Every random op restarts its stream in a new session, as when the original evaluates
        after ``saver.restore`` in a new ``tf.Session``.
        """
        values = self._read({n: n for n in self._vars})
        session = tf.compat.v1.Session(graph=self.graph)
        try:
            session.run(self._init_op)
            feed = {self._assign[n][0]: values[n] for n in self._vars}
            session.run([self._assign[n][1] for n in self._vars], feed)
            yield session
        finally:
            session.close()

    def close(self) -> None:
        self.session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

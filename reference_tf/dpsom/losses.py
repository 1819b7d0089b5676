"""DPSOM loss terms of the TF reference: one small pure function per term.

Reproduces the loss graph of ``DPSOM_model.py`` (github ratschlab/dpsom, commit 8e3cddc, HEAD
eb41e7d; paper: Manduchi et al., "DPSOM: Deep Probabilistic Clustering with Self-Organizing Maps",
arXiv 1910.01590). Names follow the original code (``loss_reconstruction_ze``, ``loss_commit``,
``loss_som``, ``loss_commit_s``, ``loss_som_s``, ``loss_a``); the paper's names are in the
docstrings. Notation: B batch, K = rows*cols SOM nodes, D latent size, sg = stop-gradient.

:func:`student_t_q` evaluates ``epsilon + 1 / (1 + d/alpha) ** ((alpha+1)/2)`` in the original's
order (power, then reciprocal, then epsilon); docs/dpsom-interface.md writes the reciprocal first,
which is the same formula but not the same float32 rounding (q differs by up to ~6e-7 relative).
With the original's order this reference reproduces the original graph bit for bit.

Everything here is TensorFlow except :func:`target_distribution`, which the original computes in
numpy.
"""

from __future__ import annotations

import numpy as np

from reference_tf import require_tensorflow

tf = require_tensorflow()
import tensorflow_probability as tfp  # noqa: E402

tfd = tfp.distributions


# --- ELBO (code: loss_reconstruction_ze) --------------------------------------------------------
def elbo_nll(x_distribution, x):
    """Bernoulli reconstruction term (``log_lik_loss``).

    ``NLL = -(1/B) sum_i log p(x_i | z_i) = -(1/B) sum_i sum_pixels [x log s(l) + (1-x) log(1-s(l))]``
    with continuous targets x in [0, 1]; summed over the pixels (the decoder distribution is an
    ``Independent`` Bernoulli over [28, 28, 1]), averaged over the batch.
    """
    return -tf.reduce_mean(x_distribution.log_prob(x))


def elbo_kl(posterior, prior_var, latent_dim):
    """Analytic KL(q(z|x) || p(z)) averaged over the batch (``kl_loss``).

    ``p(z) = N(0, diag(prior_var * 1)^2)``: ``prior_var`` scales the *standard deviation*.
    Per example ``KL_i = 1/2 [ ||L_i||_F^2/s^2 + ||mu_i||^2/s^2 - D + 2 D ln s - 2 sum_d ln L_i,dd ]``,
    evaluated by TFP; reduction: mean over B.
    """
    dtype = posterior.dtype  # float32 in the original; float64 in the harness's double-precision build
    prior = tfd.MultivariateNormalDiag(
        loc=tf.zeros(latent_dim, dtype=dtype), scale_diag=tf.ones(latent_dim, dtype=dtype) * prior_var
    )
    return tf.reduce_mean(posterior.kl_divergence(prior))


def elbo(nll, kl, prior):
    """``L_ELBO = NLL + prior * KL`` (code ``loss_rec``; ``prior`` weighs the KL, default 0.5)."""
    return nll + prior * kl


# --- SOM geometry ------------------------------------------------------------------------------
def z_dist_flat(z, embeddings, som_dim):
    """Squared distances ``d_ij = sum_d (z_id - m_jd)^2``, shape [B, K].

    ``embeddings`` is [rows, cols, D]; z is broadcast against the grid ([B, rows, cols, D]), summed
    over D, then flattened row-major (node j = r * cols + c).
    """
    diff = tf.math.squared_difference(z[:, None, None, :], embeddings[None])
    return tf.reshape(tf.reduce_sum(diff, axis=-1), [-1, som_dim[0] * som_dim[1]])


def grid_neighbours(k, som_dim, som_index="row_major", where=np.where):
    """Grid (row, column) of node ``k`` and of its 4 torus neighbours: [(self), up, down, right, left].

    ``k`` holds flat node indices (a numpy array, or an integer tensor with ``where=tf.where``).
    ``som_index`` (config ``som_index``): ``"row_major"``, node k at row k // C, column k % C of the
    (R, C) = ``som_dim`` grid, neighbours (r +- 1) mod R and (c +- 1) mod C; ``"original"``, as the
    original code computes them: row k // som_dim[0], column k % som_dim[1], the wraps written as
    branches (up past the last row -> 0, down past 0 -> R - 1, right past the last column -> 0, left
    past 0 -> column som_dim[0] - 1). The two agree on square grids; elsewhere "original" leaves the
    grid (tests/test_tier_matrix.py tabulates where).
    """
    rows, cols = som_dim
    if som_index == "row_major":
        r, c = k // cols, k % cols
        return [(r, c), ((r + 1) % rows, c), ((r - 1) % rows, c), (r, (c + 1) % cols), (r, (c - 1) % cols)]
    if som_index != "original":
        raise ValueError(f"som_index={som_index!r}; expected 'original' or 'row_major'")
    r, c = k // rows, k % cols
    zero = k * 0
    up = where(r < rows - 1, r + 1, zero)
    down = where(r > 0, r - 1, zero + (rows - 1))
    right = where(c < cols - 1, c + 1, zero)
    left = where(c > 0, c - 1, zero + (rows - 1))  # the original wraps left to som_dim[0] - 1, not som_dim[1] - 1
    return [(r, c), (up, c), (down, c), (r, right), (r, left)]


def flat_node(row, col, som_dim, som_index="row_major"):
    """Flat index of grid node (row, col): ``row * C + col``; the original's loss_som uses ``row * som_dim[0] + col``."""
    return row * (som_dim[1] if som_index == "row_major" else som_dim[0]) + col


def neighbour_table(som_dim, som_index="row_major"):
    """Flat indices of the 4 torus neighbours of every node, shape [K, 4] (int32), as ``loss_som``
    gathers them: columns up, down, right, left (:func:`grid_neighbours`, flattened by
    :func:`flat_node`); the node itself is not included. Under ``"original"`` on a non-square grid
    some entries are >= K (outside q_ng): the original's loss_som cannot run there.
    """
    k = np.arange(som_dim[0] * som_dim[1])
    pairs = grid_neighbours(k, som_dim, som_index)[1:]
    return np.stack([flat_node(r, c, som_dim, som_index) for r, c in pairs], axis=1).astype(np.int32)


# --- Soft assignments (paper: Student-t kernel) -----------------------------------------------
def student_t_q(z_dist, alpha, epsilon):
    """Soft assignments ``q_ij`` [B, K] (code ``q``; ``q_ng`` when fed sg(z) distances).

    ``t_ij = epsilon + 1 / (1 + d_ij/alpha) ** ((alpha+1)/2)`` (epsilon = 1e-7, Keras' epsilon,
    added *before* normalising), ``q_ij = t_ij / sum_j' t_ij'``. alpha is the degrees of freedom.
    Evaluation order as the original: power, reciprocal, + epsilon, normalise.
    """
    t = epsilon + 1.0 / (1.0 + z_dist / alpha) ** ((alpha + 1.0) / 2.0)
    return t / tf.reduce_sum(t, axis=1, keepdims=True)


def target_distribution(q):
    """DEC target distribution, numpy, as the original (``DPSOM.target_distribution``).

    ``f_j = sum_i q_ij`` over the whole set passed in; ``p_ij = (q_ij^2 / f_j) / sum_j' (q_ij'^2 / f_j')``.
    Keeps q's dtype (float32 when q comes from the graph).
    """
    q = np.asarray(q)
    p = q**2 / q.sum(axis=0)
    return p / p.sum(axis=1, keepdims=True)


# --- Clustering losses ----------------------------------------------------------------------
def kl_pq(p, q):
    """Clustering KL (code ``loss_commit``; paper: KL(P||Q) "CAH" term).

    ``L_KL = (1/B) sum_i sum_j p_ij log(p_ij / q_ij)``: sum over K, mean over B; p is a fed constant,
    no clipping. Gradient reaches the encoder (through z) and the embeddings.
    """
    return tf.reduce_mean(tf.reduce_sum(p * tf.math.log(p / q), axis=1))


def loss_som(q, q_ng, som_dim, som_index="row_major"):
    """SOM neighbourhood loss (code ``loss_som``; paper "S-SOM").

    ``L_SOM = -(1/B) sum_i sum_j sg(q_ij) sum_{e in N(j)} log q_ng,ie`` with N(j) the 4 torus
    neighbours (:func:`neighbour_table`), ``q_ng`` computed from sg(z); no epsilon in the log.
    Neighbour logs are summed first (up, down, right, left), weighted, summed over K, averaged over
    B. Gradient reaches the embeddings only.
    """
    table = neighbour_table(som_dim, som_index)  # [K, 4]
    # q_ng[:, up(j)] etc., gathered as the original does (rows of q_ng^T via gather_nd): its
    # IndexedSlices gradient fixes the order in which the 4 neighbour terms are summed.
    q_t = tf.transpose(q_ng)  # [K, B]
    cols = [tf.transpose(tf.gather_nd(q_t, table[:, n : n + 1])) for n in range(4)]  # each [B, K]
    q_neighbours = tf.reduce_sum(tf.math.log(tf.stack(cols, axis=2)), axis=-1)  # [B, K]
    q_n = tf.reduce_sum(tf.math.multiply(q_neighbours, tf.stop_gradient(q)), axis=-1)
    return -tf.reduce_mean(q_n)


# --- SOM initialisation (code loss_a; classic SOM, phase 2 only) ------------------------------
def som_init_commit(z, z_q):
    """``loss_commit_s = mean_{i,d} (sg(z_id) - m_{k_i,d})^2`` (mean over B*D; gradient to m only)."""
    return tf.reduce_mean(tf.math.squared_difference(tf.stop_gradient(z), z_q))


def som_init_som(z, z_q_neighbours):
    """``loss_som_s = mean_{i,n,d} (sg(z_id) - m_{n(k_i),d})^2`` over n in {self, up, down, right,
    left} (mean over B*5*D; gradient to m only). ``z_q_neighbours`` is [B, 5, D]."""
    return tf.reduce_mean(tf.math.squared_difference(tf.stop_gradient(z)[:, None, :], z_q_neighbours))


def som_init(som_s, commit_s):
    """``L_a = loss_som_s + loss_commit_s`` (code ``loss_a``)."""
    return som_s + commit_s


# --- Joint objective ---------------------------------------------------------------------------
def total(elbo_value, kl_pq_value, som_value, theta, gamma, beta):
    """``L = theta * L_ELBO + gamma * L_KL + beta * L_SOM`` (code ``loss``)."""
    return theta * elbo_value + gamma * kl_pq_value + beta * som_value

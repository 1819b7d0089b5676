"""The config matrix (harness/tier_matrix.py) and the SOM index on non-square grids.

Hand tables: the 4 torus neighbours of every node of a 3x4 and a 4x3 grid, written out by hand
from the row-major layout (node k = r * C + c), checked against each side's own index code; the
original's formula (row k // som_dim[0], column k % som_dim[1], flat row * som_dim[0] + column,
left wrap to som_dim[0] - 1) is checked against hand-computed entries showing where it leaves the
grid. Then the matrix itself on the tiny dense variant: the faithful pair PASSes every config, and
two planted bugs that only show off the defaults are caught where expected.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ports.dpsom.config import get_config

# Node k of a 3-row x 4-column grid is r * 4 + c:    0  1  2  3
#                                                     4  5  6  7
#                                                     8  9 10 11
# Columns: up (r + 1), down (r - 1), right (c + 1), left (c - 1), all mod the grid (a torus).
HAND_3x4 = [
    [4, 8, 1, 3], [5, 9, 2, 0], [6, 10, 3, 1], [7, 11, 0, 2],
    [8, 0, 5, 7], [9, 1, 6, 4], [10, 2, 7, 5], [11, 3, 4, 6],
    [0, 4, 9, 11], [1, 5, 10, 8], [2, 6, 11, 9], [3, 7, 8, 10],
]
# Node k of a 4-row x 3-column grid is r * 3 + c:    0  1  2
#                                                     3  4  5
#                                                     6  7  8
#                                                     9 10 11
HAND_4x3 = [
    [3, 9, 1, 2], [4, 10, 2, 0], [5, 11, 0, 1],
    [6, 0, 4, 5], [7, 1, 5, 3], [8, 2, 3, 4],
    [9, 3, 7, 8], [10, 4, 8, 6], [11, 5, 6, 7],
    [0, 6, 10, 11], [1, 7, 11, 9], [2, 8, 9, 10],
]
HAND = {(3, 4): HAND_3x4, (4, 3): HAND_4x3}


# --- the port's index code (no TensorFlow needed) --------------------------------------------------
@pytest.mark.parametrize("som_dim", list(HAND))
def test_port_neighbour_nodes_match_the_hand_table(som_dim):
    from ports.dpsom.losses import neighbour_nodes

    k = torch.arange(som_dim[0] * som_dim[1])
    got = neighbour_nodes(k, som_dim)
    assert got[:, 0].tolist() == k.tolist()  # the node itself first (loss_som_s's 5 = self + 4)
    assert got[:, 1:].tolist() == HAND[som_dim]


@pytest.mark.parametrize("som_dim", list(HAND))
def test_port_loss_som_neighbour_maps_match_the_hand_table(som_dim):
    """``_neighbour_maps`` (torch.roll on the grid) fed each node's own index returns, at node j,
    the index of j's up / down / right / left neighbour."""
    from ports.dpsom.losses import _neighbour_maps

    K = som_dim[0] * som_dim[1]
    ids = torch.arange(K, dtype=torch.float64).reshape(1, K)
    got = torch.stack([m[0] for m in _neighbour_maps(ids, som_dim)], dim=1).long()
    assert got.tolist() == HAND[som_dim]


def test_non_square_grid_needs_the_declared_fix():
    with pytest.raises(ValueError, match=r"som_dim=\(3, 4\) with som_index='original'.*som_index=row_major"):
        get_config("tiny-dense", som_dim="3,4")
    with pytest.raises(ValueError, match=r"som_index='rowmajor'; expected one of"):
        get_config("tiny-dense", som_index="rowmajor")
    assert get_config("tiny-dense", som_dim="4,3", som_index="row_major").n_nodes == 12


def test_dpsom_matrix_is_declared_off_every_default():
    from harness.models.dpsom import SPEC

    for variant in ("dense", "tiny-dense"):
        base = SPEC.get_config(variant)
        cases = SPEC.config_matrix(variant)
        assert {c.label for c in cases} == {"prior_var=2", "alpha=3.5", "batch_size=7", "som_dim=3,4 som_index=row_major",
                                            "som_dim=4,3 som_index=row_major"}
        for case in cases:
            cfg = SPEC.get_config(variant, case.overrides)
            changed = {k for k in case.overrides if getattr(cfg, k) != getattr(base, k)}
            assert changed == set(case.overrides), (variant, case.label)  # every override leaves its default
            assert bool(case.original) == ("som_index" in case.overrides), case.label  # the fix is declared, and said
    assert SPEC.get_config("tiny-dense", {"batch_size": "7"}).batch_size % 2 == 1
    assert SPEC.config_matrix("conv") == ()  # the conv quick tier costs minutes per config


# --- the reference's index code and the original's formula (TensorFlow) ---------------------------
@pytest.mark.tf
@pytest.mark.parametrize("som_dim", list(HAND))
def test_reference_neighbour_tables_match_the_hand_table(som_dim):
    pytest.importorskip("tensorflow")
    from reference_tf.dpsom.losses import flat_node, grid_neighbours, neighbour_table

    assert neighbour_table(som_dim, "row_major").tolist() == HAND[som_dim]  # loss_som's gather
    k = np.arange(som_dim[0] * som_dim[1])
    nodes = grid_neighbours(k, som_dim, "row_major")  # z_q and z_q_neighbours' (row, column) pairs
    assert flat_node(*nodes[0], som_dim).tolist() == k.tolist()
    assert np.stack([flat_node(r, c, som_dim) for r, c in nodes[1:]], 1).tolist() == HAND[som_dim]


@pytest.mark.tf
def test_the_original_index_leaves_non_square_grids():
    """Entries of the original's formula computed by hand: where it is wrong, and outside the grid."""
    pytest.importorskip("tensorflow")
    from reference_tf.dpsom.losses import grid_neighbours, neighbour_table

    t34, t43 = neighbour_table((3, 4), "original"), neighbour_table((4, 3), "original")
    # 3x4, node 0 = (0, 0): left wraps to column som_dim[0] - 1 = 2 (node 2), not column 3 (node 3)
    assert t34[0, 3] == 2 and HAND_3x4[0][3] == 3
    # 3x4, node 10: row 10 // 3 = 3 (a 4th row), column 10 % 4 = 2; right = (3, 3) -> 3 * 3 + 3 = 12: not a node
    assert t34[10, 2] == 12 and t34.max() == 12
    # 4x3, node 8: row 8 // 4 = 2, column 8 % 3 = 2; up = (3, 2) -> 3 * 4 + 2 = 14: not a node
    assert t43[8, 0] == 14 and t43.max() == 14
    # z_q: 4x3 node 3 is located at (3 // 4, 3 % 3) = (0, 0), node 0's embedding (row-major: (1, 0))
    (r, c), *_ = grid_neighbours(np.array([3]), (4, 3), "original")
    assert (r[0], c[0]) == (0, 0)
    # 3x4 node 9 at (9 // 3, 9 % 4) = (3, 1): row 3 of a 3-row grid
    (r, c), *_ = grid_neighbours(np.array([9]), (3, 4), "original")
    assert (r[0], c[0]) == (3, 1)
    # every non-square grid of at least 2 x 2 up to 9 x 9 leaves the grid in loss_som; squares agree exactly
    for rows in range(1, 10):
        for cols in range(1, 10):
            orig = neighbour_table((rows, cols), "original")
            if rows == cols:
                assert np.array_equal(orig, neighbour_table((rows, cols), "row_major")), (rows, cols)
            elif min(rows, cols) >= 2:
                assert orig.max() >= rows * cols, (rows, cols)


# --- the matrix on tiny-dense ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiers():
    return {}  # config label -> QuickTier with the reference's values cached, shared by the tests below


def _cases(*labels):
    from harness.models.dpsom import SPEC

    cases = {c.label: c for c in SPEC.config_matrix("tiny-dense")}
    return [cases[label] for label in labels]


def _matrix(tiers, cases, make_port=None, reports=None):
    from harness import tier_matrix
    from harness.models.dpsom import SPEC

    return tier_matrix.run(SPEC, "tiny-dense", dataset="digits", cases=cases, make_port=make_port, registry={}, tiers=tiers,
                           reports=reports)


# One quick tier on tiny-dense costs ~30 s of CPU on this 2-core machine (TF graphs for both precisions
# dominate; measured: the five configs in 2 min 41 s CPU): the new code path (a non-square grid)
# runs by default, the other configs are marked slow (CI runs them all).
_slow = pytest.mark.slow
CASE_LABELS = [pytest.param("prior_var=2", marks=_slow), pytest.param("alpha=3.5", marks=_slow),
               pytest.param("batch_size=7", marks=_slow), "som_dim=3,4 som_index=row_major",
               pytest.param("som_dim=4,3 som_index=row_major", marks=_slow)]


@pytest.mark.tf
@pytest.mark.parametrize("label", CASE_LABELS)
def test_faithful_pair_passes_every_config(tiers, label):
    pytest.importorskip("tensorflow")
    reports = {}
    sections = _matrix(tiers, _cases(label), reports=reports)
    (row,) = sections["M summary"]
    assert row.verdict == "PASS", row.note
    assert list(sections) == ["M summary"]  # nothing but PASS rows below it
    assert reports[label]["config"]["som_index"] == ("row_major" if "som_index" in label else "original")
    if "som_dim" in label:
        assert "original misbehaves here: the original cannot run a" in row.note
        assert reports[label]["config"]["som_dim"] == tuple(int(v) for v in label.split()[0].split("=")[1].split(","))


def _prior_std_ignored(mp: pytest.MonkeyPatch) -> None:
    """A port whose KL always uses the standard normal prior (prior_var read but never passed on)."""
    import ports.dpsom.losses as losses

    kl = losses.kl_posterior_prior
    mp.setattr(losses, "kl_posterior_prior", lambda mu, tril_stats, prior_std: kl(mu, tril_stats, 1.0))


@pytest.mark.tf
def test_prior_std_ignored_fails_only_off_the_default(tiers, monkeypatch):
    pytest.importorskip("tensorflow")
    from harness.spec import ConfigCase

    _prior_std_ignored(monkeypatch)
    sections = _matrix(tiers, [ConfigCase({}, "the defaults"), *_cases("prior_var=2")])
    default, off = sections["M summary"]
    assert default.verdict == "PASS", default.note  # invisible at prior_var = 1
    assert off.verdict == "FAIL" and "first divergence T3 losses: loss.elbo.kl (FAIL)" in off.note, off.note
    losses = {r.name: r for r in sections["M prior_var=2: T3 losses"]}
    assert set(losses) == {"loss.elbo.kl", "loss.elbo", "loss.total"}  # the KL and the sums that contain it
    assert "constant ratio B/A" in losses["loss.elbo.kl"].note  # the engine's diagnosis: a formula or constant differs
    # closed form (specs/dpsom.md §4): KL_s = ½ [T/s² − D + 2D ln s − 2 Σ ln L_dd] with T = ‖L‖_F² + ‖μ‖², so
    # KL_2 − KL_1 = mean_i(−3 T_i / 8) + D ln 2, from this config's posterior (T2 PASSes: either side's will do)
    tier = tiers["prior_var=2"]
    out = tier.spec.make_port(tier.config, "float64")
    out.set_weights(tier.weights0)
    fwd = out.forward(tier.batch)
    T = (fwd["posterior.scale_tril"].astype(np.float64) ** 2).sum((1, 2)) + (fwd["posterior.mu"].astype(np.float64) ** 2).sum(1)
    expected = abs(np.mean(-3 * T / 8) + tier.config.latent_dim * np.log(2))
    assert losses["loss.elbo.kl"].max_abs == pytest.approx(expected, rel=1e-5)  # float32 losses: ~1e-7 relative


def _original_loss_som_index(mp: pytest.MonkeyPatch) -> None:
    """A port that transcribes the original's loss_som index (row k // som_dim[0], flat row * som_dim[0] + column)."""
    import ports.dpsom.losses as losses

    def neighbour_maps(values, som_dim):
        rows, cols = som_dim
        k = torch.arange(rows * cols)
        r, c = k // rows, k % cols
        up = torch.where(r < rows - 1, r + 1, 0)
        down = torch.where(r > 0, r - 1, rows - 1)
        right = torch.where(c < cols - 1, c + 1, 0)
        left = torch.where(c > 0, c - 1, rows - 1)
        at_up, at_down = values[:, up * rows + c], values[:, down * rows + c]
        at_right, at_left = values[:, r * rows + right], values[:, r * rows + left]  # 3x4: node 10's right is 12
        return at_up, at_down, at_right, at_left

    mp.setattr(losses, "_neighbour_maps", neighbour_maps)


@pytest.mark.tf
def test_port_raising_on_a_non_square_grid_is_a_fail_row(tiers, monkeypatch):
    pytest.importorskip("tensorflow")
    from harness.spec import ConfigCase

    _original_loss_som_index(monkeypatch)
    sections = _matrix(tiers, [ConfigCase({}, "the defaults"), *_cases("som_dim=3,4 som_index=row_major")])
    default, off = sections["M summary"]
    assert default.verdict == "PASS", default.note  # on a square grid the original's index is the right one
    assert off.verdict == "FAIL", off.note
    (row,) = sections["M som_dim=3,4 som_index=row_major: T3 port raised"]
    assert row.name == "losses" and row.verdict == "FAIL"
    assert row.note.startswith("IndexError: index 12 is out of bounds"), row.note
    assert "[raised in neighbour_maps, test_tier_matrix.py:" in row.note


@pytest.mark.tf
def test_port_whose_forward_raises_is_a_fail_row_not_a_crash(tiers):
    pytest.importorskip("tensorflow")
    from harness.adapters.dpsom import TorchDPSOM
    from harness.spec import ConfigCase

    class Broken(TorchDPSOM):
        def forward(self, batch):
            raise RuntimeError("forward is not implemented for this grid")

    reports = {}
    sections = _matrix(tiers, [ConfigCase({}, "the defaults")], make_port=lambda cfg, dtype: Broken(cfg, dtype), reports=reports)
    (summary,) = sections["M summary"]
    assert summary.verdict == "FAIL"
    raised = {k: v for k, v in sections.items() if k.endswith("port raised")}
    assert len(raised) == 1, list(sections)
    (row,) = next(iter(raised.values()))
    # named after the harness's call (T0's BatchNorm detector traces the port first), the frame it came from
    assert next(iter(raised)) == "M defaults: T0 port raised" and row.name == "trace"
    assert row.note.startswith("RuntimeError: forward is not implemented for this grid [raised in forward, test_tier_matrix.py:")
    assert reports["defaults"]["verdict"] == "FAIL"


def test_a_config_that_cannot_be_built_is_a_fail_row():
    from harness import tier_matrix
    from harness.models.dpsom import SPEC
    from harness.spec import ConfigCase

    sections = tier_matrix.run(SPEC, "tiny-dense", dataset="digits", cases=[ConfigCase({"som_dim": "3,4"}, "no fix")])
    (row,) = sections["M summary"]
    assert row.verdict == "FAIL" and "ValueError" in row.note and "som_index=row_major" in row.note
    assert sections["M som_dim=3,4: config"][0].name == "config"


def test_cli_lists_the_matrix(capsys):
    from harness import tier_matrix

    assert tier_matrix.main(["--variant", "dense", "--list"]) == 0
    out = capsys.readouterr().out
    assert "prior_var=2" in out and "original misbehaves here: the original cannot run a 3x4 grid" in out
    with pytest.raises(SystemExit):
        tier_matrix.main(["--variant", "dense", "--case", "prior_var=3"])
    assert "not in the dpsom/dense matrix" in capsys.readouterr().err

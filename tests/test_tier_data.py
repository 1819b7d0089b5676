"""The data tier (harness/tier_data.py): each side's own data path on the same raw arrays.

The faithful pair runs once on the dense variant with the data set the tier finds (real MNIST with
PARITY_DATA_DIR=/work/shared/data, else the embedded 'digits'; the test asserts which and the
sizes that follow). Planted bugs run on 'tiny-dense' (batch size 5) with 'digits', where every
set has a remainder batch, and each must be flagged FAIL at the expected row with its diagnosis
while the sections it does not touch stay PASS. None of this needs TensorFlow: the reference's
data path (reference_tf/dpsom/data.py) is numpy + scikit-learn; one tf-marked test checks that
the full TF side returns the same arrays.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from sklearn.model_selection import train_test_split

from harness import tier_data
from harness.adapters.dpsom import TFReferenceDPSOMData, TorchDPSOM
from harness.adapters.torch import TorchPortAdapter
from harness.models.dpsom import SPEC, DPSOMSpec
from harness.protocols import Unsupported
from harness.spec import ModelSpec
from harness.tier_data import PAD, RAW_SECTION, batch_rows, explain, run

REPO = Path(__file__).resolve().parents[1]
REF_PORT, REF_RULE, PORT_RULE = tier_data.SECTIONS
NAMES = ["data.x_train", "data.y_train", "data.x_val", "data.y_val", "data.x_eval", "data.y_eval",
         "data.train_batches", "data.eval_batches"]


def _rows(report: dict, section: str) -> dict:
    return {r.name: r for r in report[section]}


def _not_pass(report: dict, section: str) -> list:
    return [r for r in report[section] if r.verdict != "PASS"]


# --- the faithful pair ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dense_report() -> dict:
    return run(SPEC, "dense")  # ~12 s on 2 cores with MNIST (70k images, both sides and the rule, twice)


def test_faithful_pair_is_bit_exact_everywhere(dense_report):
    sections = [tier_data.section_name(b, v) for v in (False, True) for b in tier_data.SECTIONS]
    assert list(dense_report) == [RAW_SECTION, *sections[:3], *sections[3:]]
    for s in sections:
        assert [r.name for r in dense_report[s]] == NAMES, s
        assert all(r.verdict == "PASS" and r.note == "bit-exact" for r in dense_report[s]), _not_pass(dense_report, s)
    assert tier_data.verdict(dense_report) == "PASS"


def test_faithful_pair_sizes_follow_the_original(dense_report, record_property):
    """MNIST: 51 000 / 9 000 split, 170 batches per epoch (2 epochs = 340 rows), 33 test batches, 30
    val batches; 'digits' (1 498 pool / 299 test, batch 300): 1 273 train = 4 batches, no eval batch."""
    raw = _rows(dense_report, RAW_SECTION)
    dataset = raw["raw.x_train"].note.split(":")[0]
    record_property("data_set", dataset)  # which data set the faithful pair ran on (junit XML)
    shape = lambda section, name: _rows(dense_report, section)[name].shape  # noqa: E731
    val_section = tier_data.section_name(REF_PORT, True)
    if dataset == "MNIST":
        assert all(r.verdict == "PASS" and "matches the pinned hash" in r.note for r in raw.values())
        assert raw["raw.x_train"].shape == (60_000, 28, 28)
        expected = {"data.x_train": (51_000, 28, 28, 1), "data.x_eval": (10_000, 28, 28, 1), "data.train_batches": (340, 300),
                    "data.eval_batches": (33, 300)}
        expected_val = {"data.x_val": (9_000, 28, 28, 1), "data.eval_batches": (30, 300)}
    else:
        assert dataset == "digits"
        expected = {"data.x_train": (1_273, 28, 28, 1), "data.x_eval": (299, 28, 28, 1), "data.train_batches": (8, 300),
                    "data.eval_batches": (0, 300)}
        expected_val = {"data.x_val": (225, 28, 28, 1), "data.eval_batches": (0, 300)}
    for name, want in expected.items():
        assert shape(REF_PORT, name) == want, name
    for name, want in expected_val.items():
        assert shape(val_section, name) == want, name


# --- the rule, against hand derivations --------------------------------------------------------------

@pytest.mark.parametrize("n", [20, 1_498, 60_000])
def test_split_rule_is_the_seed_42_permutation(n):
    """train_test_split(random_state=42, test_size=0.15) = RandomState(42).permutation(n): held-out
    first ceil(0.15 n) indices, the training set the rest (60 000 -> 51 000 / 9 000)."""
    train, held = train_test_split(np.arange(n), test_size=0.15, random_state=42)
    perm = np.random.RandomState(42).permutation(n)
    n_held = math.ceil(0.15 * n)
    assert held.tolist() == perm[:n_held].tolist() and train.tolist() == perm[n_held:].tolist()
    if n == 60_000:
        assert (len(train), len(held)) == (51_000, 9_000)


def _hand_raw() -> dict:
    """20 pool images + 7 test images, image i brightest pixel 100 + i at (i, i), a 7 at (0, 1)."""
    x = np.zeros((27, 28, 28), np.uint8)
    for i in range(27):
        x[i, i, i] = 100 + i
        x[i, 0, 1] = 7
    y = np.arange(27) % 10
    return {"x_train": x[:20], "y_train": y[:20], "x_test": x[20:], "y_test": y[20:]}


def test_rule_hand_case():
    raw, cfg = _hand_raw(), SPEC.get_config("tiny-dense")  # batch size 5
    out = SPEC.data_rule(raw, cfg, validation=False)
    train, held = train_test_split(np.arange(20), test_size=0.15, random_state=42)  # 17 / 3
    assert out["data.y_train"].tolist() == (np.arange(20) % 10)[train].tolist()
    i = int(train[0])
    img = out["data.x_train"][0, :, :, 0]
    assert out["data.x_train"].dtype == np.float32 and out["data.x_train"].shape == (17, 28, 28, 1)
    assert img[i, i] == 1.0 and img[0, 1] == np.float32(7 / (100 + i)) and np.count_nonzero(img) == 2
    assert out["data.x_eval"].shape == (7, 28, 28, 1) and out["data.y_eval"].tolist() == [0, 1, 2, 3, 4, 5, 6]
    rows = np.arange(15).reshape(3, 5)  # 17 // 5 = 3 batches, 2 images never fed
    assert out["data.train_batches"].tolist() == np.concatenate([rows, rows]).tolist()
    assert out["data.eval_batches"].tolist() == [[0, 1, 2, 3, 4]]  # 7 test images: one batch, 2 unused
    val = SPEC.data_rule(raw, cfg, validation=True)
    assert val["data.y_val"].tolist() == (np.arange(20) % 10)[held].tolist() and val["data.eval_batches"].shape == (0, 5)
    assert val["data.x_train"].tobytes() == out["data.x_train"].tobytes()


def test_each_side_on_the_hand_case_equals_the_rule():
    raw, cfg = _hand_raw(), SPEC.get_config("tiny-dense")
    want = SPEC.data_rule(raw, cfg, validation=True)
    for side in (TFReferenceDPSOMData(cfg), TorchDPSOM(cfg)):
        got = side.prepare_data(raw, validation=True)
        assert [r.verdict for r in tier_data.compare_arrays(want, got)] == ["PASS"] * len(NAMES), side.name


# --- helpers ------------------------------------------------------------------------------------------

def test_batch_rows_pads_a_short_batch():
    assert batch_rows([np.arange(3), np.arange(3, 5)], 3).tolist() == [[0, 1, 2], [3, 4, PAD]]
    assert batch_rows([], 4).shape == (0, 4)
    assert batch_rows([np.arange(5)], 3).shape == (1, 5)  # a batch longer than batch_size widens, not truncates


def test_explain_names_the_shape_of_a_difference():
    a = np.arange(12.0, dtype=np.float32).reshape(4, 3) + 1
    assert "the same rows in another order" in explain(a, a[[2, 0, 3, 1]])
    assert "the same values in another arrangement" in explain(np.arange(6), np.arange(6)[::-1])
    assert "5 rows on side B vs 4 on side A" in explain(a, np.concatenate([a, a[:1]]))
    scaled = a * np.array([[1.0], [0.5], [0.25], [1.0]], np.float32)
    assert "each sample scaled by its own factor" in explain(a, scaled) and "2 of 4 samples differ" in explain(a, scaled)
    assert "one constant ratio B/A = 0.5" in explain(a, a / 2)
    other = a.copy()
    other[1] += 100
    assert "3 of 4 rows of side B occur on side A" in explain(a, other)
    assert "5 of 6 elements of side B occur on side A, in another arrangement" in explain(np.arange(6), np.array([5, 4, 3, 2, 1, 9]))


def test_reference_data_generator_is_endless_and_drops_the_remainder():
    from reference_tf.dpsom.data import batches

    gen = batches(np.arange(11), 4)
    assert [next(gen).tolist() for _ in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]
    with pytest.raises(ValueError, match="no full batch: 3 samples < batch_size 4"):
        next(batches(np.arange(3), 4))


def test_data_only_reference_has_no_model():
    side = TFReferenceDPSOMData(SPEC.get_config("tiny-dense"))
    with pytest.raises(Unsupported, match="data tier only"):
        side.forward({})
    assert not hasattr(side, "no_such_attribute")


def test_reference_data_path_needs_no_tensorflow():
    code = ("import sys, numpy as np\n"
            "from harness.models.dpsom import SPEC\n"
            "from harness.tier_data import load_raw\n"
            "cfg = SPEC.get_config('tiny-dense')\n"
            "raw = load_raw('digits')\n"
            "out = SPEC.make_data_reference(cfg).prepare_data({k: getattr(raw, k) for k in ('x_train', 'y_train', 'x_test', 'y_test')})\n"
            "assert out['data.x_train'].dtype == np.float32\n"
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.tf
def test_full_tf_reference_returns_the_data_only_sides_arrays():
    from harness.adapters.dpsom import TFReferenceDPSOM

    cfg = SPEC.get_config("tiny-dense")
    raw = _hand_raw()
    full = TFReferenceDPSOM(cfg)
    try:
        got = full.prepare_data(raw, validation=False)
    finally:
        full.close()
    want = TFReferenceDPSOMData(cfg).prepare_data(raw, validation=False)
    assert [r.verdict for r in tier_data.compare_arrays(want, got)] == ["PASS"] * len(NAMES)


# --- planted bugs ---------------------------------------------------------------------------------------

def _divide_by_255(mp: pytest.MonkeyPatch, module: str = "ports.dpsom.data") -> None:
    import importlib

    mod = importlib.import_module(module)
    mp.setattr(mod, "scale_per_image", lambda images: (np.asarray(images, np.float32) / 255.0)[..., None])  # ToTensor()-style


def _loader_batches(shuffle: bool, drop_last: bool):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    def batches(x, batch_size):  # the port's per-epoch iterator as a torch DataLoader
        loader = DataLoader(TensorDataset(torch.from_numpy(np.asarray(x))), batch_size=batch_size, shuffle=shuffle,
                            drop_last=drop_last, generator=torch.Generator().manual_seed(0))
        for i, (b,) in enumerate(loader):
            yield i, b.numpy()

    return batches


def _shuffled_loader(mp: pytest.MonkeyPatch) -> None:
    import ports.dpsom.train as ptrain

    mp.setattr(ptrain, "_batches", _loader_batches(shuffle=True, drop_last=True))


def _remainder_kept_in_training(mp: pytest.MonkeyPatch) -> None:
    import ports.dpsom.train as ptrain

    mp.setattr(ptrain, "_batches", _loader_batches(shuffle=False, drop_last=False))  # DataLoader's default drop_last


def _remainder_kept_in_evaluation(mp: pytest.MonkeyPatch) -> None:
    import ports.dpsom.data as pdata

    def batches(x, batch_size):  # range(ceil(n / B)): the last, short batch evaluated too
        for i in range(-(-len(x) // batch_size)):
            yield x[i * batch_size : (i + 1) * batch_size]

    mp.setattr(pdata, "batches", batches)


def _split_seed_0(mp: pytest.MonkeyPatch) -> None:
    import ports.dpsom.data as pdata

    mp.setattr(pdata, "SPLIT_SEED", 0)


@dataclass(frozen=True)
class Planted:
    name: str
    patch: Callable[[pytest.MonkeyPatch], None]
    fails: dict  # section -> (first non-PASS row, expected substring of its note)
    failing: dict = field(default_factory=dict)  # section -> every row that must FAIL (the rest PASS)


PORT_BUGS = [
    Planted("/255 instead of the per-image max", _divide_by_255,
            {REF_PORT: ("data.x_train", "each sample scaled by its own factor"),
             PORT_RULE: ("data.x_train", "each sample scaled by its own factor")},
            {REF_PORT: {"data.x_train", "data.x_val", "data.x_eval"}}),
    Planted("DataLoader(shuffle=True) in the training loop", _shuffled_loader,
            {REF_PORT: ("data.train_batches", "in another arrangement: a shuffle"),
             PORT_RULE: ("data.train_batches", "in another arrangement: a shuffle")},
            {REF_PORT: {"data.train_batches"}}),
    Planted("train_test_split(random_state=0)", _split_seed_0,
            {REF_PORT: ("data.x_train", "another selection of samples"),
             PORT_RULE: ("data.x_train", "another selection of samples")},
            {REF_PORT: {"data.x_train", "data.y_train"}}),  # validation=False: the val/eval stream is the test set
    Planted("remainder batch kept in training (drop_last=False)", _remainder_kept_in_training,
            {REF_PORT: ("data.train_batches", "510 rows on side B vs 508 on side A"),
             PORT_RULE: ("data.train_batches", "508 rows on side B vs 510 on side A")},
            {REF_PORT: {"data.train_batches"}}),
    Planted("remainder batch kept in evaluation", _remainder_kept_in_evaluation,
            {REF_PORT: ("data.eval_batches", "60 rows on side B vs 59 on side A"),
             PORT_RULE: ("data.eval_batches", "59 rows on side B vs 60 on side A")},
            {REF_PORT: {"data.eval_batches"}}),
]


def _tiny(**kw) -> dict:
    return run(SPEC, "tiny-dense", dataset="digits", **kw)


def test_faithful_tiny_pair_passes():
    report = _tiny()
    assert tier_data.verdict(report) == "PASS", [(s, _not_pass(report, s)) for s in report if _not_pass(report, s)]
    assert _rows(report, REF_PORT)["data.eval_batches"].shape == (59, 5)  # 299 test images: 59 batches, 4 unused


@pytest.mark.parametrize("bug", PORT_BUGS, ids=[b.name for b in PORT_BUGS])
def test_planted_port_bug_is_flagged_at_its_row(monkeypatch, bug):
    bug.patch(monkeypatch)
    report = _tiny(validations=(False,))
    for section, (row, note) in bug.fails.items():
        first = _not_pass(report, section)[0]
        assert (first.name, first.verdict) == (row, "FAIL"), first
        assert note in first.note, first.note
    for section, names in bug.failing.items():
        assert {r.name for r in _not_pass(report, section)} == names
        assert all(r.verdict == "FAIL" for r in _not_pass(report, section))
    assert not _not_pass(report, REF_RULE) and not _not_pass(report, RAW_SECTION)  # the reference and the input untouched
    assert tier_data.verdict(report) == "FAIL"


def test_split_seed_shows_in_the_validation_stream_too(monkeypatch):
    _split_seed_0(monkeypatch)
    report = _tiny(validations=(True,))
    section = tier_data.section_name(REF_PORT, True)
    assert {r.name for r in _not_pass(report, section)} == {"data.x_train", "data.y_train", "data.x_val", "data.y_val",
                                                             "data.x_eval", "data.y_eval"}


def test_planted_reference_bug_is_attributed_to_the_reference(monkeypatch):
    _divide_by_255(monkeypatch, "reference_tf.dpsom.data")
    report = _tiny(validations=(False,))
    first = _not_pass(report, REF_RULE)[0]
    assert (first.name, first.verdict) == ("data.x_train", "FAIL") and "each sample scaled by its own factor" in first.note
    assert not _not_pass(report, PORT_RULE)
    assert _not_pass(report, REF_PORT)[0].name == "data.x_train"


def test_a_side_writing_into_its_input_is_flagged(monkeypatch):
    prepare = TorchDPSOM.prepare_data

    def threshold_in_place(self, raw, validation=False):
        raw["x_train"][raw["x_train"] < 30] = 0  # "denoise" in place: the caller's array changes
        return prepare(self, raw, validation)

    monkeypatch.setattr(TorchDPSOM, "prepare_data", threshold_in_place)
    report = _tiny(validations=(False,))
    row = _rows(report, RAW_SECTION)["raw.x_train"]
    assert row.verdict == "FAIL" and row.note.startswith("modified in place by port's prepare_data")
    assert all(r.verdict == "PASS" for r in report[RAW_SECTION] if r.name != "raw.x_train")


def test_port_without_the_capability_is_skipped():
    class NoDataPath(TorchDPSOM):
        prepare_data = TorchPortAdapter.prepare_data  # the base's default

    report = _tiny(make_port=lambda cfg, dtype: NoDataPath(cfg, dtype), validations=(False,))
    for section in (REF_PORT, PORT_RULE):
        [row] = report[section]
        assert (row.name, row.verdict) == ("prepare_data", "SKIPPED") and "does not provide prepare_data()" in row.note
    assert [r.verdict for r in report[REF_RULE]] == ["PASS"] * len(NAMES)
    assert tier_data.verdict(report) == "PASS"


def test_spec_without_a_rule_is_skipped():
    class NoRule(DPSOMSpec):
        data_rule = ModelSpec.data_rule

    report = run(NoRule(), "tiny-dense", dataset="digits", validations=(False,))
    for section in (REF_RULE, PORT_RULE):
        [row] = report[section]
        assert (row.name, row.verdict) == ("data_rule", "SKIPPED") and "states no data rule" in row.note
    assert all(r.verdict == "PASS" for r in report[REF_PORT])


def test_a_side_that_raises_is_a_named_fail(monkeypatch):
    import ports.dpsom.data as pdata

    def broken(raw, validation=False):
        raise KeyError("x_train")

    monkeypatch.setattr(pdata, "dpsom_data", broken)
    report = _tiny(validations=(False,))
    [row] = report[REF_PORT]
    assert (row.name, row.verdict) == ("prepare_data", "FAIL") and "port: KeyError" in row.note


# --- CLI ------------------------------------------------------------------------------------------------

def test_cli_prints_sections_and_exit_status(capsys, monkeypatch):
    args = ["--model", "dpsom", "--variant", "tiny-dense", "--dataset", "digits"]
    assert tier_data.main(args) == 0
    out = capsys.readouterr().out
    assert "== D data: reference vs port (validation=True)" in out and "verdict: PASS" in out
    _divide_by_255(monkeypatch)
    assert tier_data.main(args) == 1
    assert "verdict: FAIL" in capsys.readouterr().out
    for bad, message in ((["--model", "dpsom", "--config", "batch_size"], "expected KEY=VALUE"),
                         (["--model", "nosuch"], "unknown model 'nosuch'"), (["--model", "dpsom", "--variant", "big"], "dpsom has dense")):
        with pytest.raises(SystemExit) as done:
            tier_data.main(bad)
        assert done.value.code == 2 and message in capsys.readouterr().err, bad


@pytest.mark.parametrize("dataset", ["digits", "MNIST"])
def test_reference_train_main_gets_the_arrays_it_got_before(dataset):
    """reference_tf.dpsom.train.main used to feed harness.data.dpsom_splits (float32); it now holds the
    reference's own float64 arrays, which the placeholder casts to float32: the same bytes fed."""
    from harness.data import DataNotFoundError, dpsom_splits
    from harness.data import load_raw as harness_load
    from reference_tf.dpsom.data import load_dpsom_data

    try:
        before = [dpsom_splits(harness_load(dataset, download=False), v) for v in (False, True)]
    except DataNotFoundError:
        pytest.skip(f"{dataset} not found offline (set PARITY_DATA_DIR)")
    for validation, want in zip((False, True), before):
        got = load_dpsom_data(dataset, None, validation)
        assert got.x_train.dtype == np.float64 and (got.val_set, got.eval_set) == (want.val_set, want.eval_set)
        for key in ("x_train", "y_train", "x_val", "y_val", "x_eval", "y_eval"):
            a, b = np.asarray(getattr(got, key)), getattr(want, key)
            a = a.astype(np.float32) if a.dtype.kind == "f" else a
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), (validation, key)


def test_data_modules_mirror_each_other_name_for_name():
    """ports/dpsom and reference_tf/dpsom hold the same files; their data.py the same public names,
    except the port's file-reading tables (the reference reads through harness.data.load_raw)."""
    import ports.dpsom.data as pdata
    import reference_tf.dpsom.data as rdata

    files = lambda package: sorted(p.name for p in (REPO / package / "dpsom").glob("*.py"))  # noqa: E731
    assert files("ports") == files("reference_tf")
    public = lambda m: {k for k, v in vars(m).items() if not k.startswith("_") and not isinstance(v, type(m))  # noqa: E731
                        and getattr(v, "__module__", m.__name__) == m.__name__}  # defined there (functions, classes, constants)
    assert public(rdata) <= public(pdata)
    assert public(pdata) - public(rdata) == {"IDX_FILES", "NPZ_KEYS", "LAYOUTS"}

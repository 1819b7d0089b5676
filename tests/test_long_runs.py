"""Long training runs keep work safe, on both sides of DPSOM (and DEKM's CLIs where they apply).

Each test plants the bad input a user or a diverging run produces (a typo in ``resume=``, a fresh run
pointed at a finished run's directory, an inf weight at the end of an epoch, a truncated or
mis-shaped checkpoint, a batch larger than the data) and checks what is on disk and in the model
afterwards, byte for byte and tensor for tensor.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ports.dpsom import train as port
from ports.dpsom.config import RUN_KEYS, get_config, parse_flag

N_TRAIN = 12  # tiny-dense: batch 5 -> 2 steps per epoch, 6 epochs (1 VAE, 4 SOM-init, 1 joint)


def _x(n: int = N_TRAIN, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 28, 28, 1), dtype=np.float32)


def _trainer(seed: int) -> port.Trainer:
    torch.manual_seed(seed)
    return port.Trainer(get_config("tiny-dense"))


def _snapshot(trainer: port.Trainer) -> dict[str, torch.Tensor]:
    """Every tensor a load may touch: weights, optimizer slots and counters, generator state."""
    state = {f"model.{k}": v.clone() for k, v in trainer.model.state_dict().items()}
    state.update({f"optimizer.{k}": torch.as_tensor(np.asarray(v)).clone() for k, v in trainer.optimizer.state_dict().items()})
    state["generator"] = trainer.generator.get_state()
    return state


def _assert_unchanged(before: dict[str, torch.Tensor], trainer: port.Trainer) -> None:
    after = _snapshot(trainer)
    assert list(after) == list(before)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [], f"a failed load changed {changed}"


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished port run's directory (checkpoint.pt after all 6 epochs); tests copy it before writing."""
    out = tmp_path_factory.mktemp("port-run")
    port.fit(_trainer(2), _x(), out, progress=False)
    return out


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- flags and the CLI (port) --------------------------------------------------------------------------


def test_flags_accept_only_true_false_values():
    for text, value in (("true", True), ("TRUE", True), ("1", True), ("Yes", True), ("false", False), ("0", False), ("NO", False)):
        assert parse_flag("resume", text) is value
    for typo in ("ture", "", "flase", "2", "on"):
        with pytest.raises(ValueError, match=rf"resume={typo!r}: expected true or false \(or 1/0, yes/no; any case\)"):
            parse_flag("resume", typo)


def test_port_cli_resume_typo_is_an_error_and_the_checkpoint_is_untouched(finished_run, tmp_path, capsys):
    run = _copy_run(finished_run, tmp_path / "run")
    before = (run / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit) as exit_:
        port.main(["variant=tiny-dense", f"out_dir={run}", "resume=ture", f"data_dir={tmp_path / 'no-data'}",
                   f"results_dir={tmp_path / 'results'}"])
    assert exit_.value.code == 2
    assert "resume='ture': expected true or false (or 1/0, yes/no; any case)" in _error_line(capsys)
    assert (run / "checkpoint.pt").read_bytes() == before


def test_port_cli_unknown_key_is_one_line_naming_it(capsys):
    with pytest.raises(SystemExit) as exit_:
        port.main(["variant=tiny-dense", "bogus=1"])
    assert exit_.value.code == 2
    line = _error_line(capsys)
    assert "['bogus']" in line and "run-level keys" in line and "overwrite" in line


@pytest.fixture
def tiny_data(monkeypatch):
    """The CLI's data loader replaced by 40 synthetic images (34 train, 10 eval); torch's global
    switches that ``main`` sets (seed, deterministic algorithms) restored afterwards."""
    import ports.dpsom.data as data

    x = _x(40, seed=3)
    fake = SimpleNamespace(x_train=x[:34], y_train=np.arange(34) % 4, x_val=x[30:], y_val=np.arange(10) % 4, x_eval=x[30:],
                           y_eval=np.arange(10) % 4, val_set="test", eval_set="test", source="synthetic (tests)")
    monkeypatch.setattr(data, "load_dpsom_data", lambda *args, **kwargs: fake)
    deterministic, rng = torch.are_deterministic_algorithms_enabled(), torch.get_rng_state()
    yield fake
    torch.use_deterministic_algorithms(deterministic)
    torch.set_rng_state(rng)


def test_port_cli_takes_the_reference_run_keys_and_refuses_to_start_over_a_run(tiny_data, tmp_path, capsys):
    run, results = tmp_path / "run", tmp_path / "results"
    keys = ["variant=tiny-dense", f"out_dir={run}", f"results_dir={results}", "progress=false", "data_dir=unused"]
    first = port.main(keys)
    assert first["metrics"]["n_evaluated"] == 10
    assert (results / "dpsom-tiny-dense-MNIST-torch-seed2020.json").exists()
    before = (run / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:  # a second fresh run in the same directory
        port.main(keys)
    assert exit_.value.code == 2
    line = _error_line(capsys)
    assert str(run) in line and "resume=true" in line and "overwrite=true" in line
    assert (run / "checkpoint.pt").read_bytes() == before
    port.main([*keys, "resume=true"])  # finished: nothing re-run, same checkpoint
    assert (run / "checkpoint.pt").read_bytes() == before
    port.main([*keys, "overwrite=true", "random_seed=7"])
    assert torch.load(run / "checkpoint.pt", weights_only=True)["config"]["random_seed"] == 7
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        port.main([*keys[:1], f"out_dir={tmp_path / 'big'}", f"results_dir={results}", "progress=false", "batch_size=35"])
    assert exit_.value.code == 2
    assert "batch_size=35 is larger than the 34 training examples" in _error_line(capsys)


def test_both_clis_accept_the_same_run_keys():
    pytest.importorskip("tensorflow_probability", reason="TensorFlow + TFP not installed")
    from reference_tf.dpsom import train as ref

    assert set(RUN_KEYS) == {"variant", "data_dir", "out_dir", "resume", "overwrite", "results_dir", "progress"}
    assert ref.RUN_KEYS == port.RUN_KEYS == RUN_KEYS


# --- fit (port) ----------------------------------------------------------------------------------------


def test_port_resume_without_a_checkpoint_is_an_error(tmp_path):
    trainer = _trainer(4)
    before = _snapshot(trainer)
    with pytest.raises(FileNotFoundError, match=r"resume=True but there is no checkpoint .*empty.checkpoint\.pt"):
        port.fit(trainer, _x(), tmp_path / "empty", resume=True, progress=False)
    _assert_unchanged(before, trainer)
    assert not (tmp_path / "empty" / "checkpoint.pt").exists()


def test_port_fresh_run_over_a_checkpoint_needs_overwrite(finished_run, tmp_path):
    run = _copy_run(finished_run, tmp_path / "run")
    before = (run / "checkpoint.pt").read_bytes()
    with pytest.raises(FileExistsError, match=rf"{run} holds another run's checkpoint.*resume=true.*overwrite=true"):
        port.fit(_trainer(5), _x(), run, progress=False)
    assert (run / "checkpoint.pt").read_bytes() == before
    history = port.fit(_trainer(5), _x(), run, progress=False, overwrite=True)
    assert len(history) == 12 and (run / "checkpoint.pt").read_bytes() != before


def test_port_start_at_and_resume_together_are_an_error(finished_run, tmp_path):
    """Both say where a run starts (the caller's restored state, the checkpoint's): one or the other."""
    trainer = _trainer(6)
    before = _snapshot(trainer)
    with pytest.raises(ValueError, match="start_at and resume=True both say where to start"):
        port.fit(trainer, _x(), _copy_run(finished_run, tmp_path / "run"), resume=True, start_at=2, progress=False)
    _assert_unchanged(before, trainer)


def test_port_batch_larger_than_the_data_is_an_error():
    with pytest.raises(ValueError, match=r"batch_size=5 is larger than the 4 training examples"):
        port.fit(_trainer(0), _x(4), None, progress=False)


def test_port_inf_weight_is_never_checkpointed(tmp_path):
    """A step whose loss was finite (it is computed before the update) leaves an inf weight at the end
    of epoch 1: the checkpoint after it is refused, the one after epoch 0 stays, and it is finite."""
    trainer, kept = _trainer(6), {}

    def plant(record):
        if record["epoch"] == 1 and record["global_step"] == 3:
            kept["bytes"] = (tmp_path / "checkpoint.pt").read_bytes()
        if record["epoch"] == 1 and record["global_step"] == 4:  # the epoch's last step
            with torch.no_grad():
                trainer.model.encoder.fc2.weight[0, 0] = float("inf")

    with pytest.raises(port.NonFiniteCheckpointError, match=r"checkpoint\.pt not written after 2 epochs.*non-finite model\.encoder\.fc2\.weight"):
        port.fit(trainer, _x(), tmp_path, on_step=plant, progress=False)
    assert (tmp_path / "checkpoint.pt").read_bytes() == kept["bytes"]
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert payload["epochs_done"] == 1
    assert all(torch.isfinite(v).all() for v in payload["model"].values())
    assert port.fit(_trainer(7), _x(), tmp_path, resume=True, progress=False)[0]["epoch"] == 1


def test_port_checkpoint_loads_with_weights_only(finished_run):
    payload = torch.load(finished_run / "checkpoint.pt", weights_only=True)
    scalars = {k: v for k, v in payload["optimizer"].items() if not isinstance(v, torch.Tensor)}
    assert {k: type(v) for k, v in scalars.items()} == {"optim.global_step": int, "optim.beta1_power": float, "optim.beta2_power": float}
    assert payload["generator"].dtype == torch.uint8 and isinstance(payload["epochs_done"], int)


EXECUTED: list[str] = []


def _record_execution() -> str:
    EXECUTED.append("ran")
    return "payload"


class _CodeOnLoad:
    """Unpickling this calls a function: what a malicious checkpoint would do."""

    def __reduce__(self):
        return (_record_execution, ())


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _edit(change):
    def apply(path: Path) -> None:
        payload = torch.load(path, weights_only=True)
        change(payload)
        torch.save(payload, path)

    return apply


def _last(keys) -> str:
    return list(keys)[-1]


CORRUPTIONS = {
    # the last optimizer slot mis-shaped: before, every weight was loaded and then the optimizer refused
    "optimizer slot shape": (_edit(lambda p: p["optimizer"].__setitem__(_last(p["optimizer"]), torch.zeros(3))),
                             r"optimizer\.som\.embeddings/adam_v: expected shape \(3, 3, 7\), found \(3,\)"),
    "model tensor shape": (_edit(lambda p: p["model"].__setitem__("encoder.fc3.weight", torch.zeros(37, 12))),
                           r"model\.encoder\.fc3\.weight: expected shape \(37, 11\), found \(37, 12\)"),
    "missing tensor": (_edit(lambda p: p["model"].pop("som.embeddings")), r"model: missing \['som\.embeddings'\]"),
    "non-finite tensor": (_edit(lambda p: p["model"]["encoder.fc1.bias"].__setitem__(0, float("nan"))),
                          r"model: non-finite \['encoder\.fc1\.bias'\]"),
    "non-finite slot": (_edit(lambda p: p["optimizer"]["encoder.fc1.weight/adam_v"].fill_(float("inf"))),
                        r"optimizer: non-finite \['encoder\.fc1\.weight/adam_v'\]"),
    "truncated file": (_truncate, r"not a readable checkpoint"),
    "code in the file": (lambda path: torch.save({**torch.load(path, weights_only=True), "extra": _CodeOnLoad()}, path),
                         r"not a readable checkpoint \(torch\.load weights_only=True"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_port_bad_checkpoint_loads_nothing(finished_run, tmp_path, corruption):
    run = _copy_run(finished_run, tmp_path / "run")
    damage, message = CORRUPTIONS[corruption]
    damage(run / "checkpoint.pt")
    EXECUTED.clear()
    trainer = _trainer(11)
    port.fit(trainer, _x(6), None, progress=False)  # some optimizer state to lose
    before = _snapshot(trainer)
    with pytest.raises(port.CheckpointError, match=rf"{run / 'checkpoint.pt'}: .*{message}"):
        port.fit(trainer, _x(), run, resume=True, progress=False)
    _assert_unchanged(before, trainer)
    assert EXECUTED == []


# --- the TF reference ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ref():
    pytest.importorskip("tensorflow_probability", reason="TensorFlow + TFP not installed (reference_tf needs them)")
    from reference_tf.dpsom import train as ref_train

    trainer = ref_train.Trainer(get_config("tiny-dense"))
    yield SimpleNamespace(train=ref_train, trainer=trainer)
    trainer.model.close()


def _ref_data(n: int = N_TRAIN):
    x = _x(n)
    return SimpleNamespace(x_train=x, x_val=x, x_eval=x, y_eval=np.arange(n) % 4)


def _ref_snapshot(model) -> dict[str, np.ndarray]:
    return {**model.get_weights(), **model.get_optimizer_state()}


def _ref_assert_unchanged(before: dict[str, np.ndarray], model) -> None:
    after = _ref_snapshot(model)
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    assert changed == [], f"a failed restore changed {changed}"


def _files(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file() and "tensorboard" not in f.parts}


@pytest.fixture(scope="module")
def ref_run(ref, tmp_path_factory) -> Path:
    """A reference run stopped after 2 of 6 epochs (state.json, checkpoints/epoch-0001, -0002)."""
    out = tmp_path_factory.mktemp("ref-run") / "run"
    ref.trainer.fit(_ref_data(), out_dir=out, progress=False, stop_after=2)
    return out



@pytest.mark.tf
def test_ref_state_names_its_checkpoint_relative_so_a_moved_run_resumes(ref, ref_run, tmp_path):
    state = json.loads((ref_run / "state.json").read_text())
    assert state["checkpoint"] == "checkpoints/epoch-0002"
    moved = shutil.copytree(ref_run, tmp_path / "elsewhere")
    shutil.rmtree(tmp_path / "elsewhere" / "tensorboard")
    result = ref.trainer.fit(_ref_data(), out_dir=moved, resume=True, progress=False, stop_after=3)
    assert (result["epochs_done"], result["global_step"]) == (3, 6)
    assert json.loads((moved / "state.json").read_text())["checkpoint"] == "checkpoints/epoch-0003"


@pytest.mark.tf
def test_ref_cli_resume_typo_and_fresh_run_over_a_run_are_errors(ref, ref_run, tmp_path, capsys):
    before = _files(ref_run)
    base = ["variant=tiny-dense", f"out_dir={ref_run}", f"data_dir={tmp_path / 'no-data'}", f"results_dir={tmp_path}"]
    with pytest.raises(SystemExit) as exit_:
        ref.train.main([*base, "resume=ture"])
    assert exit_.value.code == 2
    assert "resume='ture': expected true or false (or 1/0, yes/no; any case)" in _error_line(capsys)
    with pytest.raises(SystemExit) as exit_:
        ref.train.main(base)
    assert exit_.value.code == 2
    line = _error_line(capsys)
    assert str(ref_run) in line and "resume=true" in line and "overwrite=true" in line
    with pytest.raises(SystemExit) as exit_:
        ref.train.main([*base[:1], "overwrite=maybe"])
    assert "overwrite='maybe'" in _error_line(capsys)
    with pytest.raises(FileExistsError, match="resume=true.*overwrite=true"):
        ref.trainer.fit(_ref_data(), out_dir=ref_run, progress=False)
    assert _files(ref_run) == before


@pytest.mark.tf
def test_ref_overwrite_replaces_an_old_run_and_pruning_keeps_the_new_ones(ref, tmp_path):
    """An old run's checkpoints numbered past the new run's (epoch-0009, -0010) used to sort after
    the new run's own and made pruning delete the checkpoint state.json had just named."""
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    for n in (8, 9, 10):
        for suffix in ("index", "data-00000-of-00001"):
            (ckpts / f"epoch-{n:04d}.{suffix}").write_bytes(b"old run")
    (ckpts.parent / "state.json").write_text(json.dumps({"epochs_done": 10, "checkpoint": "checkpoints/epoch-0010"}))
    with pytest.raises(FileExistsError):
        ref.trainer.fit(_ref_data(), out_dir=ckpts.parent, progress=False, stop_after=1)
    ref.trainer.fit(_ref_data(), out_dir=ckpts.parent, progress=False, stop_after=1, overwrite=True, keep_checkpoints=3)
    assert json.loads((ckpts.parent / "state.json").read_text())["checkpoint"] == "checkpoints/epoch-0001"
    assert sorted(f.name for f in ckpts.glob("epoch-*")) == ["epoch-0001.data-00000-of-00001", "epoch-0001.index"]


@pytest.mark.tf
def test_ref_prune_orders_epochs_by_number(ref, tmp_path):
    for n in (9998, 9999, 10000):
        (tmp_path / f"epoch-{n:04d}.index").write_bytes(b"")
    (tmp_path / "epoch-notes.txt").write_bytes(b"not a checkpoint")
    ref.train._prune(tmp_path, 1, 10000)  # noqa: SLF001
    assert sorted(f.name for f in tmp_path.iterdir()) == ["epoch-10000.index", "epoch-notes.txt"]


@pytest.mark.tf
def test_ref_resume_and_batch_size_errors(ref, tmp_path):
    with pytest.raises(FileNotFoundError, match="resume=True but there is no .*state.json"):
        ref.trainer.fit(_ref_data(), out_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="start_at and resume=True both say where to start"):
        ref.trainer.fit(_ref_data(), out_dir=tmp_path, resume=True, start_at=2, progress=False)
    with pytest.raises(ValueError, match=r"batch_size=5 is larger than the 4 training examples"):
        ref.trainer.fit(_ref_data(4), out_dir=None, progress=False)


@pytest.mark.tf
def test_ref_inf_weight_is_never_checkpointed(ref, tmp_path):
    m = ref.trainer.model

    def plant(record):  # through the raw assign op: set_weights itself refuses non-finite values
        if record["epoch"] == 1 and record["global_step"] % 2 == 0:  # epoch 1's last step (2 per epoch)
            kernel = m.get_weights()["encoder.fc2.kernel"].copy()
            kernel[0, 0] = np.inf
            placeholder, assign = m._assign["z_e/encoder/dense_1/kernel"]  # noqa: SLF001
            m.session.run(assign, {placeholder: kernel})

    out = tmp_path / "run"
    with pytest.raises(ref.train.NonFiniteCheckpointError,
                       match=r"epoch-0002 not written .*non-finite z_e/encoder/dense_1/kernel.*kept: .*epoch-0001"):
        ref.trainer.fit(_ref_data(), out_dir=out, progress=False, on_step=plant)
    assert json.loads((out / "state.json").read_text())["checkpoint"] == "checkpoints/epoch-0001"
    assert not list((out / "checkpoints").glob("epoch-0002*"))
    ref.train.check_checkpoint_finite(str(out / "checkpoints" / "epoch-0001"))  # raises on a NaN/inf tensor


def _rewrite_checkpoint(prefix: str, change) -> None:
    """Rewrite a TF checkpoint in place with ``change(values)`` applied (values: name -> array)."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(prefix)
    values = {n: reader.get_tensor(n) for n in sorted(reader.get_variable_to_shape_map())}
    change(values)
    names = sorted(values)
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(values[n]) for n in names])


def _set(name, value_of):
    return lambda values: values.__setitem__(name, value_of(values[name]))


REF_CORRUPTIONS = {
    "shape": (_set("z_e/encoder/dense_2/kernel", lambda v: np.zeros((11, 36), v.dtype)),
              r"z_e/encoder/dense_2/kernel: expected shape \(11, 37\), found \(11, 36\)"),
    "non-finite": (_set("embeddings/embeddings", lambda v: np.full_like(v, np.nan)), r"non-finite \['embeddings/embeddings'\]"),
    "non-finite slot": (_set("optimize/z_e/encoder/dense/kernel/Adam_1", lambda v: np.full_like(v, np.inf)),
                        r"non-finite \['optimize/z_e/encoder/dense/kernel/Adam_1'\]"),
}


@pytest.mark.tf
@pytest.mark.parametrize("corruption", [*REF_CORRUPTIONS, "truncated"])
def test_ref_bad_checkpoint_restores_nothing(ref, ref_run, tmp_path, corruption):
    run = shutil.copytree(ref_run, tmp_path / "run")
    prefix = str(run / "checkpoints" / "epoch-0002")
    if corruption == "truncated":
        data = Path(prefix + ".data-00000-of-00001")
        data.write_bytes(data.read_bytes()[:100])
        message = "not readable"
    else:
        change, message = REF_CORRUPTIONS[corruption]
        _rewrite_checkpoint(prefix, change)
    before = _ref_snapshot(ref.trainer.model)
    with pytest.raises(ref.train.CheckpointError, match=rf"checkpoint {prefix}: .*{message}"):
        ref.trainer.fit(_ref_data(), out_dir=run, resume=True, progress=False, stop_after=3)
    _ref_assert_unchanged(before, ref.trainer.model)


# --- DEKM CLIs -----------------------------------------------------------------------------------------


def test_dekm_port_cli_errors_are_one_line_and_out_is_not_overwritten(tmp_path, capsys):
    from ports.dekm import train as dekm

    with pytest.raises(SystemExit) as exit_:
        dekm.main(["--variant", "tiny-dense", "bogus=1"])
    assert exit_.value.code == 2
    assert "['bogus']" in _error_line(capsys)
    out = tmp_path / "result.json"
    out.write_text("earlier results")
    with pytest.raises(SystemExit) as exit_:
        dekm.main(["--variant", "tiny-dense", "--data-dir", str(tmp_path / "no-data"), "--out", str(out)])
    assert exit_.value.code == 2
    line = _error_line(capsys)
    assert str(out) in line and "--overwrite" in line
    assert out.read_text() == "earlier results"


@pytest.mark.tf
def test_dekm_reference_cli_never_writes_non_finite_final_weights(tmp_path, capsys, monkeypatch):
    pytest.importorskip("tensorflow_probability", reason="TensorFlow + TFP not installed")
    from reference_tf.dekm import train as dekm_ref

    def diverged(trainer, x, y):  # the run's end with an inf weight, without running the schedule
        kernel = trainer.model.variables()["encoder.fc1.kernel"]
        kernel.assign(np.full(kernel.shape, np.inf, kernel.dtype.as_numpy_dtype))
        return [{"phase": "stop", "reason": "max_iter", "labels": None, "acc": 0.0, "nmi": 0.0, "refits": 1}]

    monkeypatch.setattr(dekm_ref, "fit", diverged)
    with pytest.raises(SystemExit) as exit_:
        dekm_ref.main(["tiny-dense", "ds_name=synthetic", "n=20", f"out_dir={tmp_path / 'out'}"])
    assert exit_.value.code == 2
    assert "non-finite encoder.fc1.kernel" in _error_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.tf
def test_dekm_reference_cli_errors_are_one_line_and_out_dir_is_not_overwritten(tmp_path, capsys):
    pytest.importorskip("tensorflow_probability", reason="TensorFlow + TFP not installed")
    from reference_tf.dekm import train as dekm_ref

    with pytest.raises(SystemExit) as exit_:
        dekm_ref.main(["tiny-dense", "bogus=1"])
    assert exit_.value.code == 2
    assert "['bogus']" in _error_line(capsys)
    (tmp_path / "summary.json").write_text("earlier results")
    with pytest.raises(SystemExit) as exit_:
        dekm_ref.main(["tiny-dense", f"out_dir={tmp_path}", f"data_dir={tmp_path / 'no-data'}"])
    assert exit_.value.code == 2
    line = _error_line(capsys)
    assert str(tmp_path) in line and "overwrite=true" in line
    with pytest.raises(SystemExit):
        dekm_ref.main(["tiny-dense", f"out_dir={tmp_path}", "overwrite=ture"])
    assert "overwrite='ture'" in _error_line(capsys)
    assert (tmp_path / "summary.json").read_text() == "earlier results"

"""T6 timing tier (harness/timing.py) and the torch ports' device path, on CPU with tiny variants.

What needs a GPU (CUDA events, TF32 effects, the GEMM peak of a real device) cannot run here; what
is tested is every code path up to it: devices passed through (the ``meta`` device, on which any
CPU tensor mixed into a step is an error, as it would be on CUDA), the FLOP rule and its closed form,
interleaving, statistics, the result schema, the no-GPU error and the README table.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed: the timing tier times torch ports")

from harness import timing  # noqa: E402
from harness.spec import get_spec  # noqa: E402

CPU = timing.host_tag("cpu")  # the device part of a CPU result's file name, with this host's ISA (cpu-avx2, cpu-avx512, ...)


def _batch(model: str, variant: str, seed: int = 0):
    spec = get_spec(model)
    cfg = spec.get_config(variant)
    rng = np.random.default_rng(seed)
    shape = cfg.image_shape if model == "dpsom" else cfg.input_shape
    return spec, cfg, spec.draw_inputs(cfg, rng, rng.random((cfg.batch_size, *shape), dtype=np.float32))


# --- device pass-through ---------------------------------------------------------------------------
def _reaches_host_copy(fn) -> None:
    """``fn`` runs on meta tensors up to the first copy to the host (the step's loss values), and fails
    there, not earlier on a tensor left on the CPU (a device mismatch, what CUDA would raise too)."""
    with pytest.raises((NotImplementedError, RuntimeError)) as info:
        fn()
    message = str(info.value)
    assert "meta" in message and "expected device" not in message and "same device" not in message, message


@pytest.mark.parametrize("model, variant, overrides", [("dpsom", "tiny-dense", {"dropout_active": "True"}), ("dpsom", "tiny-conv", {}),
                                                       ("dekm", "tiny-dense", {}), ("dekm", "tiny-conv", {})])
def test_port_step_keeps_every_tensor_on_its_device(model, variant, overrides):
    spec, _, batch = _batch(model, variant)
    cfg = spec.get_config(variant, overrides)
    port = spec.make_port(cfg, "float32", "meta")
    assert port.device == torch.device("meta")
    for phase in spec.phases:
        _reaches_host_copy(lambda phase=phase: port.step(phase.name, batch, phase.lr_feed))  # forward, backward, update on meta
    assert {p.device.type for p in port.module.parameters()} == {"meta"}
    opt = port.trainer.optimizer if model == "dpsom" else port.trainer.optimizer("pretrain")
    state = opt._adam.state if model == "dpsom" else opt.state  # noqa: SLF001
    devices = {v.device.type for st in state.values() for k, v in st.items() if k != "step" or model == "dpsom"}
    assert devices == {"meta"}, devices  # DPSOM's fused Adam keeps its step count on the device too


def test_dpsom_trainer_and_evaluation_move_numpy_inputs_to_the_device():
    """The own loop and the evaluation take numpy arrays: they must land on the model's device, and the
    noise drawn without injected ε must come from a generator on that device."""
    from ports.dpsom.evaluate import assign_clusters
    from ports.dpsom.model import DPSOM
    from ports.dpsom.train import Trainer

    cfg = get_spec("dpsom").get_config("tiny-dense", {"dropout_active": "True"})
    trainer = Trainer(cfg, DPSOM(cfg).to("meta"))
    x = np.random.default_rng(0).random((cfg.batch_size, *cfg.image_shape), dtype=np.float32)
    for eps in (np.zeros((cfg.batch_size, cfg.latent_dim), np.float32), None):
        _reaches_host_copy(lambda eps=eps: trainer.step("vae", x, 1e-3, eps=eps))
    _reaches_host_copy(lambda: trainer.q_all(x))
    _reaches_host_copy(lambda: assign_clusters(trainer.model, x, cfg))
    assert Trainer(cfg).generator.device == torch.device("cpu")


def test_cpu_port_explicit_device():
    """device="cpu" spelled out: the step runs and leaves parameters and optimizer slots on the CPU."""
    spec, cfg, batch = _batch("dpsom", "tiny-dense")
    port = spec.make_port(cfg, "float32", "cpu")
    record = port.step("vae", batch, 1e-3)
    assert np.isfinite(record["loss.elbo"])
    assert {p.device.type for p in port.module.parameters()} == {"cpu"}
    assert {t.device.type for st in port.trainer.optimizer._adam.state.values() for t in st.values()} == {"cpu"}  # noqa: SLF001


# --- FLOPs --------------------------------------------------------------------------------------------
def test_flop_counter_rule_for_linear():
    """The rule FlopCounterMode applies: 2·B·in·out for the forward GEMM, as much again per gradient
    GEMM it computes: grad_weight always, grad_input only where the input needs a gradient."""
    from torch.utils.flop_counter import FlopCounterMode

    B, n_in, n_out = 5, 13, 11
    layer = torch.nn.Linear(n_in, n_out)
    for needs_grad, factor in ((True, 3), (False, 2)):
        x = torch.randn(B, n_in, requires_grad=needs_grad)
        with FlopCounterMode(display=False) as counter:
            layer(x).sum().backward()
        assert counter.get_total_flops() == factor * 2 * B * n_in * n_out


def _linear_step_flops(B: int, dims: list[tuple[int, int]]) -> int:
    """Closed form for a stack of Linear layers fed data (no input gradient): 3 GEMMs of 2·B·in·out each
    per layer (forward, grad_input, grad_weight), minus the first layer's grad_input."""
    return 3 * 2 * B * sum(i * o for i, o in dims) - 2 * B * dims[0][0] * dims[0][1]


def test_flops_of_dense_tiny_steps_match_the_closed_form():
    spec, cfg, batch = _batch("dekm", "tiny-dense")
    f = cfg.filters
    dims = [(784, f[0]), (f[0], f[1]), (f[1], f[2]), (f[2], cfg.hidden_units),  # encoder + embedding
            (cfg.hidden_units, f[2]), (f[2], f[1]), (f[1], f[0]), (f[0], 784)]  # decoder
    B = cfg.batch_size
    counted = timing.count_flops(spec.make_port(cfg, "float32", "meta"), "loss.recon", batch)
    assert counted["flops"] == _linear_step_flops(B, dims) == 2 * B * (3 * sum(i * o for i, o in dims) - 784 * f[0])
    assert set(counted["by_op"]) == {"aten.addmm", "aten.mm"}
    # clustering step: encoder + embedding, then h·V (d x d), whose gradient flows to h only
    d = cfg.hidden_units
    cluster = timing.count_flops(spec.make_port(cfg, "float32", "meta"), "loss.cluster", batch)
    assert cluster["flops"] == _linear_step_flops(B, dims[:4]) + 2 * 2 * B * d * d

    spec, cfg, batch = _batch("dpsom", "tiny-dense")
    e, D, B = cfg.dense_enc_dims, cfg.latent_dim, cfg.batch_size
    head = D + D * (D + 1) // 2
    enc = [(784, e[0]), (e[0], e[1]), (e[1], e[2]), (e[2], head)]
    dec = [(D, e[2]), (e[2], e[1]), (e[1], e[0]), (e[0], 784)]
    meta = spec.make_port(cfg, "float32", "meta")
    # z = mu + L·eps: a bmm of 2·B·D² forward; its gradient to L (eps is data) is the posterior node's packed
    # element-wise product g_z,i·eps_j (model._TriLGaussian), which FlopCounterMode, counting matmuls, leaves out
    assert timing.count_flops(meta, "loss.elbo", batch)["flops"] == _linear_step_flops(B, enc + dec) + 2 * B * D * D
    # SOM initialisation: the encoder runs without gradient (L_a stops it at z): forward only
    assert timing.count_flops(meta, "loss.som_init", batch)["flops"] == 2 * B * sum(i * o for i, o in enc) + 2 * B * D * D


# --- interleaving and statistics -------------------------------------------------------------------------
def test_paired_ratio_cancels_a_drift_that_both_medians_see():
    """Arm A takes 0.8 x arm B in every round while the machine slows down 3x over the run: the paired
    ratio is 0.8 with a tight interval, the ratio of medians too here, but the per-arm IQRs are wide."""
    drift = np.linspace(1.0, 3.0, 21)
    b = 0.5 * drift
    a = 0.8 * b
    got = timing.paired_ratio(a, b)
    assert got["median"] == pytest.approx(0.8) and got["ci"] == pytest.approx([0.8, 0.8]) and got["n"] == 21
    noisy = timing.paired_ratio(a * np.random.default_rng(0).uniform(0.9, 1.1, 21), b)
    assert noisy["ci"][0] < noisy["median"] < noisy["ci"][1] and 0.7 < noisy["ci"][0] and noisy["ci"][1] < 0.9
    failed = timing.paired_ratio(np.r_[a[:20], np.nan], b)  # a failed round is left out
    assert failed["n"] == 20 and failed["median"] == pytest.approx(0.8)
    one = timing.paired_ratio([1.0], [2.0])  # one round: a ratio, no interval
    assert one["median"] == 0.5 and np.isnan(one["ci"]).all()



def test_arms_alternate_after_their_warmup():
    calls: list[str] = []

    def run_one(label: str) -> float:
        calls.append(label)
        return 1.0

    order, seconds = timing.run_interleaved(["A", "B"], repeats=4, warmup=2, run_one=run_one)
    assert calls == ["A", "A", "B", "B"] + ["A", "B"] * 4
    assert order == ["A", "B"] * 4 == timing.interleave(["A", "B"], 4)
    assert {k: len(v) for k, v in seconds.items()} == {"A": 4, "B": 4}


def test_median_and_iqr_of_known_timings():
    fake = {"A": iter([9.0, 5.0, 1.0, 4.0, 2.0, 3.0]), "B": iter([0.0, 10.0, 40.0, 20.0, 30.0, 1000.0])}  # first: warm-up
    _, seconds = timing.run_interleaved(["A", "B"], repeats=5, warmup=1, run_one=lambda label: next(fake[label]))
    assert seconds == {"A": [5.0, 1.0, 4.0, 2.0, 3.0], "B": [10.0, 40.0, 20.0, 30.0, 1000.0]}
    a, b = timing.summarise(seconds["A"]), timing.summarise(seconds["B"])
    assert (a["median_s"], a["q1_s"], a["q3_s"], a["iqr_s"], a["n"]) == (3.0, 2.0, 4.0, 2.0, 5)
    assert (b["median_s"], b["iqr_s"], b["min_s"], b["max_s"]) == (30.0, 20.0, 10.0, 1000.0)  # the outlier moves neither
    assert timing.summarise([1.0, 2.0, 3.0, 4.0])["median_s"] == 2.5


def _switches(state: dict) -> dict:
    """torch's switches as the suite sets them (legacy spelling; see ``preserved_torch_state``)."""
    return {k: v for k, v in state.items() if not k.startswith("fp32_precision")}


def test_settings_key_and_readback():
    before = _switches(timing.torch_state())
    with timing.preserved_torch_state():
        exact, fast = (timing.Settings.for_mode(m, "cpu", threads=1) for m in ("exact", "fast"))
        assert "tf32_0" in exact.key and "deterministic_1" in exact.key and "threads_1" in exact.key
        assert "tf32_1" in fast.key and "cudnn_benchmark_1" in fast.key and "deterministic_0" in fast.key
        got = timing.apply(fast)
        assert (got["tf32_matmul"], got["cudnn_benchmark"], got["deterministic"], got["threads"]) == (True, True, False, 1)
        assert got["fp32_precision_matmul"] in ("tf32", None)
    assert _switches(timing.torch_state()) == before
    with pytest.raises(KeyError, match="unknown mode"):
        timing.Settings.for_mode("turbo", "cpu")


# --- the tier end to end, its files and the README ------------------------------------------------------------
@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    out = tmp_path_factory.mktemp("timing")
    before = _switches(timing.torch_state())
    docs = timing.run("dekm", "tiny-dense", "cpu", ("exact", "fast"), repeats=3, warmup=1, threads=1, gemm_n=64, profile=True, out=out)
    assert _switches(timing.torch_state()) == before  # the arms' settings do not leak into the rest of the process
    return out, docs


def test_result_files_and_schema(stored):
    out, docs = stored
    assert sorted(p.name for p in out.iterdir()) == [f"dekm-tiny-dense-{CPU}-exact.json", f"dekm-tiny-dense-{CPU}-fast.json"]
    spec = get_spec("dekm")
    for doc in docs:
        on_disk = json.loads((out / f"dekm-tiny-dense-{CPU}-{doc['mode']}.json").read_text())
        assert on_disk["key"] == doc["key"] and on_disk["schema"] == timing.SCHEMA
        for field in ("model", "variant", "device", "mode", "framework", "settings", "applied", "environment", "peak", "arms",
                      "warmup", "repeats", "batch_size", "data", "seed", "flops_method", "clock", "phases"):
            assert field in on_disk, field
        env = on_disk["environment"]
        for field in ("device_name", "driver", "cuda_runtime", "version.torch", "git_commit", "cpu", "cpu_isa"):
            assert field in env, field
        assert CPU == "cpu-" + env["cpu_isa"].lower() and env["cpu_isa"] in env["device_name"]
        s = on_disk["settings"]
        assert {k: s[k] for k in ("tf32", "cudnn_benchmark", "deterministic", "compiled")} == timing.MODES[doc["mode"]]
        assert on_disk["compiled"] is (doc["mode"] == "fast")  # the DEKM port's trainer compiles its step
        assert (s["threads"], on_disk["applied"]["threads"], on_disk["applied"]["tf32_matmul"]) == (1, 1, s["tf32"])
        assert on_disk["clock"] == "time.perf_counter" and on_disk["peak"]["flops_per_s"] > 0
        assert on_disk["phase_order"] == [p.name for p in spec.phases] and sorted(on_disk["phases"]) == sorted(on_disk["phase_order"])
        for phase in on_disk["phases"].values():
            assert set(timing.PHASE_FIELDS) <= set(phase)
            assert phase["n"] == len(phase["seconds"]) == 3 and phase["finite"]
            assert phase["q1_s"] <= phase["median_s"] <= phase["q3_s"] and phase["flops"] > 0
            assert phase["pct_of_floor"] == pytest.approx(100 * phase["flops"] / on_disk["peak"]["flops_per_s"] / phase["median_s"])
            assert list(phase["ratio_to"]) == [m for m in ("exact", "fast") if m != doc["mode"]]
    assert docs[0]["phases"]["pretrain"]["flops"] == docs[1]["phases"]["pretrain"]["flops"]
    layers = docs[0]["profile"]["pretrain"]["layers"]
    assert {"encoder.fc1", "embedding", "decoder.out"} <= set(layers)  # canonical names, from the mapping table
    assert layers["encoder.fc1"]["forward_cpu_ms"] > 0 and layers["encoder.fc1"]["backward_cpu_ms"] > 0
    assert set(docs[0]["profile"]["pretrain"]["top_level"]) == {"encoder", "embedding", "decoder"}


def test_fast_mode_records_its_drift_from_exact(stored):
    """Both arms took the same steps from the same weights on the same batch; the fast arm's document
    says how far it went from the exact one, phase by phase (the compiler's kernels: not bit-exact)."""
    _, docs = stored
    exact, fast = docs
    assert "drift_from_exact" not in exact
    drift = fast["drift_from_exact"]
    assert drift["steps_per_phase"] == {"pretrain": 5, "cluster": 5}  # warm-up 1 + 3 timed + 1 profiled
    n = len(get_spec("dekm").make_port(get_spec("dekm").get_config("tiny-dense"), "float32").get_weights())
    for phase in ("pretrain", "cluster"):
        w = drift["weights_after"][phase]
        assert w == fast["phases"][phase]["weights_vs_exact"] and w["tensors"] == n and 0 <= w["bit_identical"] <= n
        # measured here: max_rel 1.4e-7 (about one float32 ulp of the largest weight) after the cluster phase
        assert 0 <= w["max_rel"] < 1e-5 and w["max_abs"] >= 0 and w["max_rel_tensor"]
    # the arms compared are the two modes, not one arm with itself: the compiler's kernels moved some floats
    # (measured here: 3 of 16 tensors bit-identical after the cluster phase)
    assert drift["weights_after"]["cluster"]["bit_identical"] < n and drift["weights_after"]["cluster"]["max_abs"] > 0
    assert set(drift["last_losses"]) == {"pretrain", "cluster"}
    assert set(drift["last_losses"]["pretrain"]) == {"loss.recon"}  # loss terms only: no lr, no global step
    for phase, terms in drift["last_losses"].items():
        record = fast["phases"][phase]["last_record"]
        assert terms and all(d == record[k] - exact["phases"][phase]["last_record"][k] for k, d in terms.items())
        # measured here: loss.recon -7.5e-9, loss.cluster -1.2e-7 (absolute) at the last step
        assert all(abs(d) <= 1e-5 * max(1.0, abs(record[k])) for k, d in terms.items())


def test_weight_drift_against_hand_computed_values():
    exact = {"a": np.array([1.0, -2.0], np.float32), "b": np.array([4.0], np.float32)}
    fast = {"a": np.array([1.0, -2.5], np.float32), "b": np.array([4.0], np.float32)}
    assert timing.weight_drift(exact, fast) == {"tensors": 2, "bit_identical": 1, "max_abs": 0.5, "max_abs_tensor": "a",
                                                "max_rel": 0.25, "max_rel_tensor": "a"}
    assert timing.weight_drift(exact, dict(exact)) | {"max_abs_tensor": None, "max_rel_tensor": None} == {
        "tensors": 2, "bit_identical": 2, "max_abs": 0.0, "max_abs_tensor": None, "max_rel": 0.0, "max_rel_tensor": None}


def test_drift_from_exact_needs_the_same_steps():
    w = {"tensors": 1, "bit_identical": 0, "max_abs": 0.5, "max_abs_tensor": "a", "max_rel": 0.25, "max_rel_tensor": "a"}
    record = {"loss.x": 3.0, "lr": 0.1, "global_step": 2}
    phases = {"exact": {"p": {"steps_taken": 4, "last_record": record}},
              "fast": {"p": {"steps_taken": 4, "last_record": {**record, "loss.x": 3.25}, "weights_vs_exact": w}}}
    assert timing.drift_from_exact(["exact", "fast"], phases) == {
        "fast": {"weights_after": {"p": w}, "last_losses": {"p": {"loss.x": 0.25}}, "steps_per_phase": {"p": 4}}}
    phases["fast"]["p"]["steps_taken"] = 5  # one arm took a profiled step the other could not: nothing compared
    assert "different number of steps" in timing.drift_from_exact(["exact", "fast"], phases)["fast"]["not_measured"]
    phases["fast"]["p"] = {"error": "RuntimeError: out of memory"}
    assert "failed in fast p" in timing.drift_from_exact(["exact", "fast"], phases)["fast"]["not_measured"]
    assert timing.drift_from_exact(["fast"], {"fast": phases["fast"]}) == {}  # no exact arm: nothing to measure from


def test_set_compiled_says_why_a_port_cannot_compile():
    class NoTrainer:
        pass

    assert timing.set_compiled(NoTrainer(), False) is False  # exact: eager, whatever the port offers
    assert timing.set_compiled(NoTrainer(), True).startswith("unsupported: ")
    port = get_spec("dekm").make_port(get_spec("dekm").get_config("tiny-dense"), "float32")
    assert timing.set_compiled(port, True) is True and port.trainer.compiled
    assert timing.set_compiled(port, False) is False and not port.trainer.compiled


def test_a_failing_step_is_recorded_not_retried(monkeypatch, tmp_path):
    """An arm whose step raises (out of memory, a kernel that exact mode refuses) leaves that phase's
    rotation with the error recorded; the other phases and the table go on."""
    from harness.adapters.dekm import TorchDEKM

    step, calls = TorchDEKM.step, []

    def flaky(self, phase, batch, lr_feed, return_gradients=False):
        calls.append(phase)
        if phase == "cluster":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        return step(self, phase, batch, lr_feed, return_gradients)

    monkeypatch.setattr(TorchDEKM, "step", flaky)
    (doc,) = timing.run("dekm", "tiny-dense", "cpu", ("exact",), repeats=3, warmup=1, threads=1, gemm_n=64, out=tmp_path)
    assert calls.count("cluster") == 1 and calls.count("pretrain") == 4
    assert doc["phases"]["cluster"]["error"] == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert doc["phases"]["pretrain"]["n"] == 3
    assert "| cluster | failed: RuntimeError: CUDA out of memory" in timing.markdown(tmp_path)


def test_no_gpu_is_one_clear_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the no-GPU error cannot be provoked")
    code = timing.main(["--model", "dekm", "--variant", "tiny-dense", "--device", "cuda", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: --device cuda: no CUDA GPU"), err
    assert not list(tmp_path.iterdir())


def test_readme_timing_table(stored, tmp_path):
    from harness.readme import ROOT, render

    assert "No T6 timings stored" in timing.markdown(tmp_path / "timing")
    readme = (ROOT / "README.md").read_text()
    empty = render(readme, tmp_path)
    section = empty.split("<!-- timing:begin -->")[1].split("<!-- timing:end -->")[0]
    assert "No T6 timings stored" in section and "python -m harness.timing" in section
    out, docs = stored
    (tmp_path / "timing").mkdir()
    for p in out.iterdir():
        (tmp_path / "timing" / p.name).write_text(p.read_text())
    section = render(readme, tmp_path).split("<!-- timing:begin -->")[1].split("<!-- timing:end -->")[0]
    rows = [line for line in section.splitlines() if line.startswith("| dekm / tiny-dense")]
    assert len(rows) == 5  # two arms x two phases, and the fast arm's drift from exact
    assert any("exact (`cpu-exact-tf32_0" in r and "| pretrain |" in r for r in rows)
    drift = next(r for r in rows if "| fast | True |" in r)
    assert "| 5, 5 |" in drift and "loss.recon " in drift and "loss.cluster " in drift and f" of {docs[1]['drift_from_exact']['weights_after']['cluster']['tensors']} |" in drift
    assert section.index("Port modes against the parity-exact one") < section.index("Every arm:")
    assert f"`dekm-tiny-dense-{CPU}-fast.json`" in section


def test_competing_processes_really_compete_and_are_gone_afterwards():
    """``--compete N``: the competitors burn CPU while the block runs (their CPU seconds, read back by
    ``os.wait4``, near their wall time: a spin loop on its own core) and are reaped on leaving it."""
    import os
    import time

    with timing.competing(2) as stats:
        time.sleep(1.0)
        assert stats == []  # filled on exit
    assert len(stats) == 2
    for s in stats:
        assert s["wall_s"] >= 1.0
        # 2 spinners + this sleeping process on >= 2 cores: each gets most of one. 0.3 of a core is far
        # below the ~0.9-1.0 measured here (2 cores, idle) and far above an idle process's ~0.
        assert s["cpu_s"] > 0.3 * s["wall_s"], s
        with pytest.raises(ProcessLookupError):
            os.kill(s["pid"], 0)  # killed and reaped: no process left behind
    with pytest.raises(ValueError, match="--compete -1"):
        with timing.competing(-1):
            pass


def test_competition_is_in_the_key_the_file_name_and_the_table(tmp_path):
    (doc,) = timing.run("dekm", "tiny-dense", "cpu", ("exact",), repeats=2, warmup=1, threads=1, gemm_n=64, out=tmp_path, compete=1)
    assert doc["key"].endswith("-compete_1") and doc["settings"]["competing"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [f"dekm-tiny-dense-{CPU}-exact-compete1.json"]
    assert len(doc["competitors"]) == 1 and doc["competitors"][0]["cpu_s"] > 0
    assert len(doc["load_average_before"]) == 3
    assert "1 competing CPU-bound process(es) running throughout" in timing.markdown(tmp_path)
    assert timing.Settings.for_mode("exact", "cpu", 1).key.endswith("omp_" + doc["settings"]["omp_wait_policy"])  # quiet: no suffix


def test_port_against_the_reference_in_one_run(tmp_path):
    """``--reference``: the TF reference is an arm of the same interleaved run; the summary table gives
    port / TF per phase from the two arms' own medians."""
    pytest.importorskip("tensorflow", reason="TensorFlow not installed: no reference arm")
    exact, ref = timing.run("dpsom", "tiny-dense", "cpu", ("exact",), reference=True, repeats=3, warmup=1, threads=1, gemm_n=64,
                            out=tmp_path, profile=True)
    assert (exact["framework"], ref["framework"], ref["mode"]) == ("torch", "tensorflow", timing.REFERENCE)
    # TF's kernel library: reference_tf's pin (Eigen) whatever TF would pick on this CPU by itself, unless
    # the user set TF_ENABLE_ONEDNN_OPTS=1 for the whole run
    on = os.environ["TF_ENABLE_ONEDNN_OPTS"].lower() in ("1", "true")
    assert ref["environment"]["tf.onednn"] is on and ref["settings"]["onednn"] is on and f"-onednn_{int(on)}-" in ref["key"]
    tags = {False: "", True: "-tfonednn"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"dpsom-tiny-dense-{CPU}-{arm}{tags[on]}.json" for arm in ("exact", "reference")]
    # the same run as if TF had run the other library: stored apart, a row of its own in the summary
    for doc in (exact, ref):
        twin = {**doc, "environment": {**doc["environment"], "tf.onednn": not on}}
        timing.write_json(timing.result_path(tmp_path, twin), twin)
    assert all((tmp_path / f"dpsom-tiny-dense-{CPU}-{arm}{tags[not on]}.json").is_file() for arm in ("exact", "reference"))
    table = timing.markdown(tmp_path)
    for phase in exact["phase_order"]:
        port_s, ref_s = exact["phases"][phase]["median_s"], ref["phases"][phase]["median_s"]
        assert exact["phases"][phase]["ratio_to"]["reference"] == pytest.approx(port_s / ref_s)
        paired = np.median(np.asarray(exact["phases"][phase]["seconds"]) / np.asarray(ref["phases"][phase]["seconds"]))
        for kernels in ("Eigen", "oneDNN"):
            row = (f"| dpsom / tiny-dense | cpu {timing.cpu_isa()} | exact | 0 | {kernels} | {phase} | {1e3 * ref_s:.4g} | {1e3 * port_s:.4g} | "
                   f"**{port_s / ref_s:.2f}** | {paired:.2f} [")
            assert table.count(row) == 1, (kernels, phase)

    # --profile: both arms by their own profiler, on the same canonical layer names (the mapping table)
    for doc in (exact, ref):
        vae = doc["profile"]["vae"]["layers"]
        assert {"encoder.fc1", "posterior.head", "decoder.fc1"} <= set(vae), (doc["mode"], sorted(vae))
        assert vae["encoder.fc1"]["forward_cpu_ms"] > 0 and vae["encoder.fc1"]["backward_cpu_ms"] > 0, doc["mode"]
    prof = ref["profile"]
    # the original's L_a stops the gradient at z: its SOM-initialisation step runs the encoder forward and no encoder gradient op
    som_init = prof["som_init"]["layers"]
    assert som_init["encoder.fc1"]["forward_cpu_ms"] > 0
    assert all(row["backward_cpu_ms"] == 0 for name, row in som_init.items() if name.startswith(("encoder.", "posterior."))), som_init
    for phase in ref["phase_order"]:
        p = prof[phase]
        in_layers = sum(v for row in p["layers"].values() for v in row.values())
        assert p["optimizer"]["cpu_ms"] > 0 and p["unattributed"]["cpu_ms"] >= 0
        assert p["total"]["cpu_ms"] == pytest.approx(in_layers + p["optimizer"]["cpu_ms"] + p["unattributed"]["cpu_ms"])


def test_graph_ops_are_attributed_by_name_scope():
    """Hand-made node stats (device, node name, µs) -> per-layer ms: the longest scope wins
    (``dense`` vs ``dense_1``), the gradient scope is the backward, the optimizer's update ops are
    summed apart, a GPU's op is device time, a node in no layer's scope is unattributed."""
    from harness.transplant import Row

    table = [Row("encoder.fc1.kernel", "", "", "z_e/encoder/dense/kernel"), Row("encoder.fc1.bias", "", "", "z_e/encoder/dense/bias"),
             Row("encoder.fc2.kernel", "", "", "z_e/encoder/dense_1/kernel"), Row("som.embeddings", "", "", "embeddings/embeddings")]
    scopes = timing.graph_scopes(table)
    assert scopes == {"z_e/encoder/dense": "encoder.fc1", "z_e/encoder/dense_1": "encoder.fc2", "embeddings": "som"}
    cpu, gpu = "/job:localhost/replica:0/task:0/device:CPU:0", "/job:localhost/replica:0/task:0/device:GPU:0"
    got = timing.attribute_graph_ops([
        (cpu, "z_e/encoder/dense/MatMul", 100.0),
        (cpu, "z_e/encoder/dense_1/MatMul", 200.0),
        (gpu, "z_e/encoder/dense_1/BiasAdd", 50.0),
        (cpu, "optimize/gradients_1/z_e/encoder/dense_1/MatMul_grad/MatMul", 400.0),
        (cpu, "gradients/z_e/encoder/dense/MatMul_grad/MatMul_1", 10.0),
        (cpu, "optimize/Adam_1/update_z_e/encoder/dense/kernel/ResourceApplyAdam", 7.0),
        (cpu, "loss_som/q_ng/SquaredDifference", 3.0),
        (cpu, "z_e/encoder/densefoo/MatMul", 1.0),  # not in the scope "z_e/encoder/dense/"
    ], scopes)
    assert got["layers"] == {
        "encoder.fc1": {"forward_cpu_ms": 0.1, "forward_device_ms": 0.0, "backward_cpu_ms": 0.01, "backward_device_ms": 0.0},
        "encoder.fc2": {"forward_cpu_ms": 0.2, "forward_device_ms": 0.05, "backward_cpu_ms": 0.4, "backward_device_ms": 0.0}}
    assert got["top_level"] == {"encoder": {"forward_cpu_ms": pytest.approx(0.3), "forward_device_ms": 0.05,
                                            "backward_cpu_ms": pytest.approx(0.41), "backward_device_ms": 0.0}}
    assert got["optimizer"] == {"cpu_ms": 0.007, "device_ms": 0.0}
    assert got["total"] == {"cpu_ms": pytest.approx(0.721), "device_ms": 0.05}
    assert got["unattributed"]["cpu_ms"] == pytest.approx(0.004) and got["unattributed"]["device_ms"] == 0.0

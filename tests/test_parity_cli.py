"""The parity CLI's contract with the stored results and with a user's port (TF-free parts)."""

from __future__ import annotations

import pytest

from harness.parity import STORED, load_factory, main, run_name
from harness.spec import get_spec, models


def test_models_come_from_the_registry():
    assert {"dpsom", "dekm"} <= set(models()) and get_spec("dpsom").default_variants == ("dense", "conv")
    assert get_spec("dekm").default_variants == ("conv", "dense")
    with pytest.raises(KeyError, match="unknown model 'tdpsom'; known: .*dekm.*dpsom"):
        get_spec("tdpsom")


def test_a_run_is_named_after_everything_that_makes_it_differ():
    assert run_name("dpsom", "dense", "MNIST", 0, {}, {}, None) == "dpsom-dense-MNIST-seed0"
    name = run_name("dpsom", "conv", "digits", 3, {"prior_var": "2"}, {"bn_mode": "batch_stats"}, "my.port:make")
    assert name == "dpsom-conv-digits-seed3-prior_var=2-port.bn_mode=batch_stats-adapter=my.port.make"
    assert STORED.as_posix() == "results/parity"  # only --update-stored writes there; the default is runs/parity


@pytest.mark.parametrize("extra", [["--config", "prior_var=2"], ["--port", "bn_mode=batch_stats"], ["--port-adapter", "a.b:c"],
                                   ["--init", "native"]])
def test_update_stored_refuses_anything_but_the_faithful_default(extra):
    with pytest.raises(SystemExit, match="--update-stored: the stored results are the faithful port's default run"):
        main(["--variant", "tiny-dense", "--update-stored", *extra])


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit, match=r"--variant \['dens'\]: not a variant of dpsom"):
        main(["--model", "dpsom", "--variant", "dens"])
    with pytest.raises(SystemExit, match="not of the form key=value"):
        main(["--config", "prior_var"])
    with pytest.raises(SystemExit, match="--port-adapter 'tests.oddport.adapter': expected 'pkg.module:factory'"):
        main(["--port-adapter", "tests.oddport.adapter"])
    with pytest.raises(ValueError, match="cannot import 'no_such_module'"):
        load_factory("no_such_module:factory")
    with pytest.raises(ValueError, match="has no 'nope'"):
        load_factory("tests.oddport.adapter:nope")


def test_tiers_are_chosen_by_name_and_all_means_every_one():
    from harness.parity import DEFAULT_TIERS, PIPELINE, parse_tiers

    assert DEFAULT_TIERS == ("quick", "D", "I") and set(PIPELINE) == {"D", "I", "E", "L", "M"}
    assert parse_tiers("quick, D") == ("quick", "D")
    assert parse_tiers("all") == ("quick", "4", *PIPELINE)
    with pytest.raises(Exception, match=r"unknown tier \['T9'\]; known: quick, 4, D"):
        parse_tiers("quick,T9")


def test_a_pipeline_tier_writes_its_own_report(tmp_path, capsys):
    """The data tier through the CLI on the embedded digits: one JSON named like the quick tier's runs."""
    import json

    assert main(["--variant", "tiny-dense", "--tier", "D", "--data", "digits", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "dpsom-tiny-dense-digits-seed0-D.json").read_text())
    assert doc["tier"] == "D" and doc["verdict"] == "PASS" and doc["data"] == "digits"
    assert doc["sections"]["D data: reference vs port"] and all(r["verdict"] == "PASS" for r in doc["sections"]["D data: reference vs port"])
    assert "tier D (data" in capsys.readouterr().out

"""The parity CLI's contract with the stored results and with a user's port (TF-free parts)."""

from __future__ import annotations

import pytest

from harness.parity import STORED, load_factory, main, run_name
from harness.spec import get_spec, models


def test_models_come_from_the_registry():
    assert "dpsom" in models() and get_spec("dpsom").default_variants == ("dense", "conv")
    with pytest.raises(KeyError, match="unknown model 'dekm'; known: .*dpsom"):
        get_spec("dekm")


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
        main(["--variant", "dens"])
    with pytest.raises(SystemExit, match="not of the form key=value"):
        main(["--config", "prior_var"])
    with pytest.raises(SystemExit, match="expected 'pkg.module:factory'"):
        load_factory("tests.oddport.adapter")
    with pytest.raises(SystemExit, match="cannot import 'no_such_module'"):
        load_factory("no_such_module:factory")
    with pytest.raises(SystemExit, match="has no 'nope'"):
        load_factory("tests.oddport.adapter:nope")

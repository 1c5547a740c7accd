import subprocess
import sys

import pytest

from mlcd_train import cli


def test_help_lists_every_stage(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.STAGES:
        assert f"  {name} " in out


def test_unknown_subcommand_fails(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown subcommand" in capsys.readouterr().err


def test_every_stage_module_is_importable_and_has_main():
    import importlib

    for module, _ in cli.STAGES.values():
        mod = importlib.import_module(module)
        assert callable(getattr(mod, "main", None)), f"{module} has no main()"


def test_a_stage_that_cannot_be_imported_is_an_import_error(monkeypatch):
    # every stage ships with the package: a missing module is a broken install, reported as such
    monkeypatch.setitem(cli.STAGES, "ghost", ("mlcd_train.no_such_stage", "a stage that is not there"))
    with pytest.raises(ModuleNotFoundError, match="mlcd_train.no_such_stage"):
        cli.run_stage("ghost", [])


def test_console_script_runs_as_module():
    r = subprocess.run([sys.executable, "-m", "mlcd_train", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "subcommands" in r.stdout

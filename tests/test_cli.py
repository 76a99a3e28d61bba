"""The `ray-codistill` command as a user runs it: exit codes and messages.

The refusals run the command's `main` in this process (the fast tier: torch and Ray are imported
once, not per test); one test runs it as `python -m ray_codistill.cli`, the way the console
script does, exit status and all."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from unittest import mock

import pytest

from conftest import CONFIGS, ROOT
from ray_codistill import cli


def _cli(*args: str) -> subprocess.CompletedProcess:
    """`ray-codistill ARGS` in this process: its exit status (argparse's too) and its output. The
    environment is restored after (`run` sets the console's variables, `console.quiet_ray`)."""
    out, err = io.StringIO(), io.StringIO()
    ray_before = _ray_up()  # the session's Ray may be up already (the full suite): only a new start counts
    with mock.patch.dict(os.environ), redirect_stdout(out), redirect_stderr(err):
        try:
            code = cli.main(list(args))
        except SystemExit as e:  # argparse's usage errors
            code = e.code
    assert ray_before or not _ray_up(), "a refusal started Ray: it belongs in _process (ray tier)"
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def _ray_up() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _process(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ray_codistill.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("override, key", [
    ("codistill.distance=l1", "codistill.distance"),
    ("no_such_key=1", "no_such_key"),
    ("optim.lr=-1", "optim.lr"),
])
def test_bad_config_exits_2_naming_the_key(override, key, tmp_path):
    out = _cli("run", str(CONFIGS / "smoke.yaml"), "--set", override, "--storage", str(tmp_path))
    assert out.returncode == 2, out.stderr
    assert f"config error: {key}:" in out.stderr
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_missing_data_root_is_a_config_error(tmp_path):
    out = _cli("run", str(CONFIGS / "smoke.yaml"), "--storage", str(tmp_path), "--set", "data.name=imagefolder",
               "--set", f"data.root={tmp_path / 'no-images'}")
    assert out.returncode == 2 and "data.root" in out.stderr


@pytest.mark.ray  # the folder is made (and refused) after Ray has started: a local Ray, in a subprocess
def test_unwritable_storage_is_a_config_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = _process("run", str(CONFIGS / "smoke.yaml"), "--storage", str(blocker / "results"))
    assert out.returncode == 2 and "storage_path" in out.stderr


def test_unreachable_address_fails_fast_and_writes_nothing(tmp_path):
    out = _process("run", str(CONFIGS / "smoke.yaml"), "--storage", str(tmp_path), "--address", "127.0.0.1:1",
                   timeout=60)
    assert out.returncode == 1 and "cannot reach a Ray cluster at '127.0.0.1:1'" in out.stderr
    assert not any(tmp_path.iterdir())


def test_resume_of_an_unknown_experiment_is_a_config_error(tmp_path):
    out = _cli("run", "--resume", "never-ran", "--storage", str(tmp_path))
    assert out.returncode == 2 and "no experiment to resume" in out.stderr
    out = _cli("run")
    assert out.returncode == 2 and "--resume" in out.stderr


def test_report_of_nothing_fails_clearly(tmp_path):
    out = _cli("report", str(tmp_path))
    assert out.returncode == 1 and "error" in out.stderr


@pytest.mark.parametrize("extra, says", [(["--replicas", "1", "2"], "replicas"),
                                         (["--replicas", "2", "--samples", "2"], "--samples")])
def test_a_bad_replicas_study_is_refused_before_it_starts(extra, says, tmp_path):
    out = _cli("tune", str(CONFIGS / "smoke.yaml"), "--space", str(ROOT / "tuning" / "spaces" / "replicas.yaml"),
               "--storage", str(tmp_path), *extra)
    assert out.returncode == 2 and says in out.stderr, out.stderr
    assert not any(tmp_path.iterdir())

"""Jobs on a real `ray start --head` cluster on loopback, token authentication on (Ray's default).

The head runs with `--block` in its own process group and a temp dir of its own, so stopping it
kills only its processes (never `ray stop`, which would also end the test session's Ray).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT
from live import ENDLESS, wait_for

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not 10002 <= port <= 19999:  # Ray's worker port range: a dashboard there stops `ray start`
            return port


def _start_head() -> tuple[subprocess.Popen, dict, str]:
    ports = {name: _free_port() for name in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                             "dashboard-agent-grpc-port", "metrics-export-port",
                                             "runtime-env-agent-port", "ray-client-server-port",
                                             "node-manager-port", "object-manager-port")}
    temp_dir = tempfile.mkdtemp(prefix="rch", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=2",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}",
           *[f"--{k}={v}" for k, v in ports.items()]]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    return proc, {"gcs": f"127.0.0.1:{ports['port']}", "dashboard": f"http://127.0.0.1:{ports['dashboard-port']}",
                  "metrics": f"http://127.0.0.1:{ports['metrics-export-port']}/metrics", "env": env}, temp_dir


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # --block: the head takes its Ray processes down with it
        proc.wait(timeout=5)  # a graceful stop takes it about 30 s; nothing here needs one
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    subprocess.run(["pkill", "-9", "-f", temp_dir], check=False)  # anything left of this head only


@pytest.fixture(scope="module")
def head():
    for attempt in range(2):  # a port picked free can be taken before Ray binds it: one retry
        proc, info, temp_dir = _start_head()
        try:
            _wait_for_jobs_api(info["dashboard"], proc)
            break
        except RuntimeError as err:
            _stop_head(proc, temp_dir)
            if attempt:
                raise err
    try:
        yield info
    finally:
        _stop_head(proc, temp_dir)


def _client(dashboard: str):
    from ray.job_submission import JobSubmissionClient
    return JobSubmissionClient(dashboard)


def _wait_for_jobs_api(dashboard: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    os.environ["RAY_AUTH_MODE"] = "token"  # this process is a client of the head too
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited: {proc.stdout.read()}")
        try:
            _client(dashboard).list_jobs()
            return
        except Exception:
            time.sleep(1)
    raise RuntimeError("the head's job API did not come up")


def _wait(client, job_id: str, timeout_s: float = 300):
    from ray.job_submission import JobStatus
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {status} after {timeout_s}s:\n{client.get_job_logs(job_id)}")


def _cli_at(head: dict, *args: str) -> subprocess.CompletedProcess:
    """`ray-codistill ARGS --address <head>` in its own process, a client with the head's token."""
    return subprocess.run([sys.executable, "-m", "ray_codistill.cli", *args, "--address", head["gcs"]], cwd=ROOT,
                          env=head["env"], capture_output=True, text=True, timeout=60)


def test_compare_job_succeeds_and_is_queryable(head, tmp_path):
    from ray.job_submission import JobStatus
    client = _client(head["dashboard"])
    storage = tmp_path / "results"
    # the job trains until this test stops it: every look at it below waits on an event
    job = client.submit_job(
        entrypoint=f"{sys.executable} jobs/compare.py configs/smoke.yaml --methods codistill --seeds 0 "
                   f"--set steps={ENDLESS} --set log_every=50 --storage {storage}",
        runtime_env={"working_dir": str(ROOT)},
    )
    running = lambda: client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED)  # noqa: E731

    def training():
        # while the job trains, its broker answers `ray-codistill stats --address` like any client's
        out = _cli_at(head, "stats", "smoke-codistill-s0", "--json")
        stats = json.loads(out.stdout) if out.returncode == 0 else None
        return stats if stats and all(r["step"] > 0 for r in stats["replicas"].values()) else None

    def exported():
        # the broker's figures reach Prometheus through the node's metrics agent
        try:
            text = urllib.request.urlopen(head["metrics"], timeout=5).read().decode()
        except OSError:
            return None
        return text if "ray_codistill_teacher_hit_rate{" in text else None

    stats = wait_for("the job's replicas training", training, alive=running)
    metrics_text = wait_for("the broker's gauges on the metrics endpoint", exported, alive=running)
    stop = _cli_at(head, "stop", "smoke-codistill-s0")
    assert stop.returncode == 0, stop.stderr
    status = _wait(client, job)
    logs = client.get_job_logs(job)
    assert 'experiment="smoke-codistill-s0"' in metrics_text
    assert status == JobStatus.SUCCEEDED, logs
    assert stats["experiment"] == "smoke-codistill-s0"
    assert f"results: {storage / 'smoke'}" in logs
    summary = json.loads((storage / "smoke" / "smoke-codistill-s0" / "summary.json").read_text())
    assert summary["status"] == "stopped" and 0 < summary["replicas"][0]["steps"] < ENDLESS
    assert (storage / "smoke" / "comparison.parquet").is_file()


def test_bad_config_job_fails_with_the_error_in_its_logs(head, tmp_path):
    from ray.job_submission import JobStatus
    client = _client(head["dashboard"])
    job = client.submit_job(
        entrypoint=f"{sys.executable} jobs/run.py configs/smoke.yaml --set codistill.distance=l1 "
                   f"--storage {tmp_path}",
        runtime_env={"working_dir": str(ROOT)},
    )
    assert _wait(client, job, timeout_s=120) == JobStatus.FAILED
    assert "config error: codistill.distance: got 'l1', allowed values: kl, mse" in client.get_job_logs(job)

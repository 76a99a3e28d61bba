"""Attaching to Ray: a given address, RAY_ADDRESS, or a local instance; unreachable fails fast.

`ray.init` retries an unreachable address for minutes; a plain TCP connect first turns that into
a one-line error in seconds.
"""

from __future__ import annotations

import json
import os
import socket

import ray

from ray_codistill.errors import ClusterError


def _check_reachable(address: str, timeout_s: float) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", "ray://...", "local": left to Ray
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ClusterError(f"cannot reach a Ray cluster at {address!r}: {err.strerror or err}") from err


def _forwarded_env() -> dict:
    """The console settings (console.CLUSTER_ENV) for an existing cluster's processes, which do not
    inherit this process's environment. Keys a Ray job's own runtime env sets already are left to
    it (Ray refuses to merge the same key twice)."""
    from ray_codistill.console import cluster_env
    env = cluster_env()
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    taken = ((job.get("runtime_env") or {}).get("env_vars") or {})
    return {k: v for k, v in env.items() if k not in taken}


def connect(address: str | None = None, start_local: bool = True, timeout_s: float = 5.0) -> None:
    """Attach this process to Ray once. Without an address (and no RAY_ADDRESS) a local instance
    is started (`start_local`) or the one already running on this machine is joined ("auto").

    A local instance inherits this process's environment (the console settings among it); an
    existing cluster gets them through the job's runtime environment."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or (None if start_local else "auto")
    if address:
        _check_reachable(address, timeout_s)
    env = _forwarded_env() if address and start_local else {}
    try:
        ray.init(address=address, configure_logging=False,
                 **({"runtime_env": {"env_vars": env}} if env else {}),
                 **({} if start_local else {"log_to_driver": False, "logging_level": "ERROR"}))
    except Exception as err:  # ConnectionError, auth failures, no local cluster for "auto"
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ClusterError(f"cannot attach to a Ray cluster at {address or 'a new local instance'!r}: "
                           f"{detail}") from err

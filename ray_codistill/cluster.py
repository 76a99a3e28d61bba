"""Attaching to Ray: a given address, RAY_ADDRESS, or a local instance; unreachable fails fast.

`ray.init` retries an unreachable address for minutes; a plain TCP connect first turns that into
a one-line error in seconds.
"""

from __future__ import annotations

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


def connect(address: str | None = None, start_local: bool = True, timeout_s: float = 5.0) -> None:
    """Attach this process to Ray once. Without an address (and no RAY_ADDRESS) a local instance
    is started (`start_local`) or the one already running on this machine is joined ("auto")."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or (None if start_local else "auto")
    if address:
        _check_reachable(address, timeout_s)
    try:
        ray.init(address=address, configure_logging=False,
                 **({} if start_local else {"log_to_driver": False, "logging_level": "ERROR"}))
    except Exception as err:  # ConnectionError, auth failures, no local cluster for "auto"
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ClusterError(f"cannot attach to a Ray cluster at {address or 'a new local instance'!r}: "
                           f"{detail}") from err

"""The Linux side of the emulated cluster: network namespaces, the veth links between them and
their shaping (`tc ... tbf`, rate only), the slots that let several clusters share a machine, and
clearing what a crashed run left. Nothing here knows about Ray (that is `emulated.cluster`).

Names of one cluster in slot k: namespace `rcd<k>-br` (the bridge), `rcd<k>-n<i>` (node i),
temp dirs `/tmp/rcd<k>n<i>`, the claim `/tmp/rcd-emulated/slot<k>.json` with the owner's pid.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

PREFIX = "rcd"
MAX_SLOTS = 8
IFNAME = "rcd0"  # the node end of every veth: one GLOO_SOCKET_IFNAME for all nodes
STATE_DIR = Path("/tmp/rcd-emulated")  # slot<k>.json: owner pid and what to clean


class EmulatedClusterError(RuntimeError):
    pass


def available() -> tuple[bool, str]:
    """Whether this process can build an emulated cluster, and if not, why."""
    if sys.platform != "linux":
        return False, f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return False, "network namespaces, veth pairs and tc need root (this process is not root)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"`{tool}` (iproute2) is not installed"
    probe = f"{PREFIX}-probe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return False, f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return True, ""


def sh(*cmd: str, ns: str | None = None, check: bool = True, timeout: float = 30) -> str:
    full = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
    out = subprocess.run(full, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise EmulatedClusterError(f"{' '.join(full)} failed: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _namespaces() -> list[str]:
    out = sh("ip", "netns", "list", check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def kill_namespace_processes(ns: str, sig: int = signal.SIGKILL) -> int:
    """Signal every process whose network namespace is `ns` (all of them belong to this cluster)."""
    pids = [int(p) for p in sh("ip", "netns", "pids", ns, check=False).split() if p.isdigit()]
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return len(pids)


def wait_namespace_empty(ns: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not sh("ip", "netns", "pids", ns, check=False).split():
            return
        kill_namespace_processes(ns)
        time.sleep(0.2)


def _slot_namespaces(slot: int) -> list[str]:
    return [ns for ns in _namespaces() if re.fullmatch(rf"{PREFIX}{slot}-(br|n\d+)", ns)]


def clear_slot(slot: int) -> None:
    """Kill what runs in a slot's namespaces, delete them and its temp dirs."""
    namespaces = _slot_namespaces(slot)
    for ns in namespaces:  # nodes first: the bridge namespace runs nothing
        kill_namespace_processes(ns)
    for ns in namespaces:
        wait_namespace_empty(ns)
        sh("ip", "netns", "del", ns, check=False)
    for path in Path("/tmp").glob(f"{PREFIX}{slot}n*"):  # the nodes' temp dirs and their logs
        if not re.fullmatch(rf"{PREFIX}{slot}n\d+(\.log)?", path.name):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    (STATE_DIR / f"slot{slot}.json").unlink(missing_ok=True)


def _slot_owner(slot: int) -> int | None:
    path = STATE_DIR / f"slot{slot}.json"
    try:
        return int(json.loads(path.read_text())["owner"])
    except (OSError, ValueError, KeyError):
        return None


def clear_leftovers() -> list[int]:
    """Clear every slot whose owner process is gone (a crashed run); returns the slots cleared."""
    cleared = []
    for slot in range(MAX_SLOTS):
        owner = _slot_owner(slot)
        if (_slot_namespaces(slot) or owner is not None) and (owner is None or not _pid_alive(owner)):
            clear_slot(slot)
            cleared.append(slot)
    return cleared


def claim_slot() -> int:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    for slot in range(MAX_SLOTS):
        path = STATE_DIR / f"slot{slot}.json"
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # atomic: two runs never share a slot
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"owner": os.getpid()}, f)
        return slot
    raise EmulatedClusterError(f"all {MAX_SLOTS} emulated-cluster slots are in use ({STATE_DIR})")


def burst_bytes(rate_mbit: float) -> int:
    # tbf needs at least rate / HZ per tick plus a packet; 10 ms of traffic, not less than 64 KiB
    return max(64 * 1024, int(rate_mbit * 1e6 / 8 * 0.01))

"""The local Flower processes that ``flwr run`` leaves behind, found and stopped by PID.

``flwr run`` (simulation) starts a background ``flower-superlink`` for this project's
``FLWR_HOME``, with a ``flower-superexec`` that starts one ``flwr-simulation`` process per
run (the ServerApp, and Ray with the ClientApps). They outlive the CLI. ``flwr stop``
marks a run stopped in the SuperLink, but its ``flwr-simulation`` process can go on
training, so an interrupted run is also ended here. Processes of other projects (another
``FLWR_HOME``) are never touched, but a run is refused while one of them holds the local
SuperLink's port (:func:`check_local_superlink_port`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from common.runtime import configure_environment, project_root

log = logging.getLogger(__name__)

_ACTIVE_STATES = ("pending", "starting", "running")


def project_processes(name: str) -> Iterator[Path]:
    """Yield the /proc entries of this project's running processes with ``name`` in their command line."""
    flwr_home = configure_environment()["FLWR_HOME"]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if name in cmdline and f"FLWR_HOME={flwr_home}".encode() in environ and _running(proc):
            yield proc


def stop_local_superlink(*, only_stale: bool = False) -> int:
    """Stop the background SuperLink that ``flwr run`` started for this project's FLWR_HOME.

    With ``only_stale``, stop it only if files it has open under FLWR_HOME were deleted,
    as when the checkout was removed and cloned again while the SuperLink kept running.
    Such a SuperLink still accepts runs but never finishes them. Waits up to 10 s for the
    processes to exit and returns how many were signalled.
    """
    flwr_home = configure_environment()["FLWR_HOME"]
    signalled = []
    for proc in project_processes("flower-superlink"):
        if only_stale and not _holds_deleted_files(proc, flwr_home):
            continue
        os.kill(int(proc.name), signal.SIGTERM)
        signalled.append(proc)
    _wait_for_exit(signalled, 10)
    return len(signalled)


def check_local_superlink_port() -> None:
    """Raise RuntimeError when the local SuperLink's port is in use, but not by this project.

    ``flwr run`` connects to whatever listens on 127.0.0.1 at its local SuperLink port
    (39091 unless ``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` sets another). A SuperLink left
    by another checkout would get this project's runs and run them with its own code and
    environment, without an error. So a port in use while this project runs no
    SuperLink is rejected.
    """
    port = int(os.environ.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "39091"))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        if probe.connect_ex(("127.0.0.1", port)) != 0:
            return  # free: `flwr run` starts this project's SuperLink there
    if any(True for _ in project_processes("flower-superlink")):
        return
    flwr_home = configure_environment()["FLWR_HOME"]
    raise RuntimeError(
        f"127.0.0.1:{port}, where `flwr run` looks for its local SuperLink, is held by a process "
        f"that is not this project's SuperLink (FLWR_HOME {flwr_home}), for example one that "
        "another checkout started. `flwr run` would send this run to it, with that checkout's "
        "code. Stop it (`pgrep -af flower-superlink` lists the candidates) and try again."
    )


def stop_idle_superlink(env: dict[str, str] | None = None) -> bool:
    """Stop this project's SuperLink unless a run on it is pending, starting or running.

    Returns whether it was stopped. Left running, it keeps its ports and a few hundred
    MB until the machine restarts; the next ``flwr run`` starts a new one.
    """
    if not any(True for _ in project_processes("flower-superlink")):
        return False
    command = [str(Path(sys.executable).with_name("flwr")), "ls", "--format", "json"]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, env=env, cwd=project_root(), timeout=60
        )
        active = active_runs(result.stdout)
    except (subprocess.TimeoutExpired, ValueError) as error:
        log.warning("left the local SuperLink running: could not list its runs (%s)", error)
        return False
    if active:
        log.info("left the local SuperLink running: runs %s are active", ", ".join(active))
        return False
    return stop_local_superlink() > 0


def active_runs(ls_json: str) -> list[str]:
    """Return the ids of the runs that ``flwr ls --format json`` lists as not finished.

    Raises ValueError when the output is not the JSON of a successful listing.
    """
    try:
        listing = json.loads(ls_json)
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid flwr ls output, expected JSON: {ls_json[-300:]!r}") from error
    if not isinstance(listing, dict) or not listing.get("success"):
        raise ValueError(f"flwr ls failed: {ls_json[-300:]!r}")
    return [
        str(run["run-id"]) for run in listing.get("runs", [])
        if str(run.get("status", "")).split(":")[0] in _ACTIVE_STATES
    ]


def end_simulations(*, since: float, grace: float = 20.0) -> int:
    """End this project's ``flwr-simulation`` processes started at or after ``since`` (epoch s).

    Each gets SIGINT first, so that Python unwinds and shuts Ray down with it; then
    SIGTERM after ``grace`` seconds, and SIGKILL 10 s later. Returns how many there were.
    """
    found = [proc for proc in project_processes("flwr-simulation") if _started_at(proc) >= since - 1.0]
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        left = [proc for proc in found if _running(proc)]
        if not left:
            break
        for proc in left:
            try:
                os.kill(int(proc.name), sig)
            except ProcessLookupError:
                pass
        _wait_for_exit(left, wait)
    if found:
        log.info("ended %d Flower simulation process(es) of the stopped run", len(found))
    return len(found)


def _wait_for_exit(procs: list[Path], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while any(_running(proc) for proc in procs) and time.monotonic() < deadline:
        time.sleep(0.1)


def _running(proc: Path) -> bool:
    """Return whether process ``proc`` (a /proc entry) exists and is not a zombie."""
    try:
        stat = (proc / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _started_at(proc: Path) -> float:
    """Return when process ``proc`` started, in seconds since the epoch (0 if unknown)."""
    try:
        ticks = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, ValueError, IndexError, StopIteration):
        return 0.0
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _holds_deleted_files(proc: Path, folder: str) -> bool:
    """Return whether process ``proc`` (a /proc entry) has a deleted file under ``folder`` open."""
    try:
        targets = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
    except OSError:
        return False
    return any(target.startswith(folder) and target.endswith(" (deleted)") for target in targets)

"""Run the Flower apps as real processes: one SuperLink and K SuperNodes on 127.0.0.1.

The launcher starts a SuperLink, one SuperNode per site (each with its own data folder
and its own site folder, where the site keeps its privacy ledger), then ``flwr run`` of
this project against that SuperLink. It is the single-machine form of a real
deployment: every process is a separate program talking over loopback, with TLS and
SuperNode authentication when asked for.

Every wait is bounded and every process is stopped, so a dead or slow one cannot hang
the caller:

- every port is picked free by binding ``127.0.0.1:0`` and every wait has a deadline;
- each process runs in its own session and writes its own log in the work folder;
- on any exit (success, error, timeout, KeyboardInterrupt, SIGTERM) every started process
  is stopped, in the order of :data:`STOP_SERVER`'s note: SIGTERM to its process group and
  to the descendants that left the group (Flower starts ``flower-superexec`` in a session
  of its own), SIGKILL after a grace period, and each process's exit status is logged.

Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from common import atomic
from common.config import RunConfig
from common.results import ROUNDS_FILE, STATUS_FAILED, STATUS_FILE, STATUS_REFUSED
from common.runtime import configure_environment, project_root
from simulations.certs import TlsFiles, generate_node_key, generate_tls
from simulations.flower_run import _ROUND_LINE, _strip_ansi, resolve_paths, write_run_config

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
CONNECTION = "dpfedseg-deploy"  # the [superlink.<name>] entry in the deploy FLWR_HOME
READY_TIMEOUT = 60.0  # seconds for a SuperLink or SuperNode to open its port
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL
REGISTER_TIMEOUT = 60.0  # seconds for one `flwr supernode register` call
POLL_INTERVAL = 0.5  # seconds between checks of logs, processes and the deadline
RUN_TIMEOUT_GRACE = 300.0  # seconds added to the rounds' timeouts for the default deadline
TAIL_LINES = 40
SUMMARY_FILE = "deploy.json"
RUN_CONFIG_FILE = "run_config.toml"

STOP_LOG_STREAM, STOP_SERVER, STOP_SITE = 0, 1, 2
"""Stop ranks: ``flwr run`` (a log stream), then the SuperLink with its ServerApp, then SuperNodes.

The SuperLink and its ServerApp must stop before any SuperNode. A SuperNode that leaves
first deregisters at once, so the server would record the round in progress as failed
for that site and could finish the run. ``flwr run --stream`` goes first because the
SuperLink waits for its open log-stream connection before it exits; stopping the stream
leaves the run itself untouched.
"""

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "PYTHONUNBUFFERED": "1",
}


# ----- sites ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteSpec:
    """One hospital: its id, its data, and its own folder (privacy ledger, local state)."""

    site: int
    data_dir: Path
    site_dir: Path
    manifest: Path | None = None
    cache_dir: Path | None = None

    def node_config(self) -> str:
        """Return the ``--node-config`` string that :func:`client.site.resolve_site` reads.

        Paths are TOML literal strings (single quotes, no escapes), so a path may contain
        spaces or backslashes but no single quote.
        """
        values = {
            "data-dir": self.data_dir,
            "site-dir": self.site_dir,
            "manifest": self.manifest,
            "cache-dir": self.cache_dir,
        }
        parts = [f"site={self.site}"]
        for key, path in values.items():
            if path is None:
                continue
            if "'" in str(path):
                raise ValueError(
                    f"site {self.site}: {key} {str(path)!r} contains a single quote, which "
                    "a SuperNode's --node-config cannot carry; rename or link the folder"
                )
            parts.append(f"{key}='{path}'")
        return " ".join(parts)


def plan_sites(
    num_sites: int | None,
    *,
    workdir: Path,
    data_dir: Path | None = None,
    manifest: Path | None = None,
    site_data: Sequence[Path] = (),
    site_dirs: Sequence[Path] = (),
    cache_dir: Path | None = None,
) -> list[SiteSpec]:
    """Return one :class:`SiteSpec` per site, with absolute paths.

    Two layouts: one ``data_dir`` split by a sites ``manifest`` (from ``dpfedseg sites``),
    or one folder per site in ``site_data`` whose whole content is that site's shard.
    Site ``k`` keeps its ledger in ``site_dirs[k]``, by default ``<workdir>/sites/site-k``.
    """
    num_sites = _count_sites(num_sites, site_data, data_dir, manifest)
    if site_dirs and len(site_dirs) != num_sites:
        raise ValueError(f"got {len(site_dirs)} site folders for {num_sites} sites; give one per site")
    specs = []
    for site in range(num_sites):
        own_data = site_data[site] if site_data else data_dir
        assert own_data is not None  # _count_sites guarantees one of the two layouts
        site_dir = site_dirs[site] if site_dirs else workdir / "sites" / f"site-{site}"
        specs.append(
            SiteSpec(
                site=site,
                data_dir=_existing_dir(own_data, f"data folder of site {site}"),
                site_dir=site_dir.expanduser().resolve(),
                manifest=_existing_file(manifest, "manifest") if manifest else None,
                cache_dir=cache_dir.expanduser().resolve() if cache_dir else None,
            )
        )
    return specs


def _count_sites(num_sites, site_data, data_dir, manifest) -> int:
    if site_data:
        if data_dir is not None or manifest is not None:
            raise ValueError(
                "give either one data folder per site (--site-data) or one data folder with a "
                "manifest (--data, --manifest), not both"
            )
        if num_sites is not None and num_sites != len(site_data):
            raise ValueError(f"--sites {num_sites} but {len(site_data)} --site-data folders; give one per site")
        return len(site_data)
    if num_sites is None or num_sites < 1:
        raise ValueError(f"the number of sites must be at least 1; got {num_sites!r}")
    if data_dir is None:
        raise ValueError("no data: give --data DIR (with --manifest for several sites) or --site-data DIR per site")
    if manifest is None and num_sites > 1:
        raise ValueError(
            f"{num_sites} sites on one data folder without a manifest would all train on the "
            "same images; make a manifest with `dpfedseg sites` and pass --manifest, or give "
            "one --site-data folder per site"
        )
    return num_sites


def _existing_dir(path: Path, description: str) -> Path:
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"{description} {path} not found or not a folder")
    return path


def _existing_file(path: Path, description: str) -> Path:
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{description} {path} not found")
    return path


# ----- processes --------------------------------------------------------------------------


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port that is free on ``host`` now (the OS picks it for port 0).

    NOTE: another program can take the port between this call and the server's bind; the
    server then exits and :meth:`ManagedProcess.wait_for_port` reports it with its log.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    """Return whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class ProcessId:
    """A pid plus its start time (clock ticks since boot), so a reused pid is not mistaken."""

    pid: int
    start_ticks: int


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """Return (state, ppid, start ticks) of ``pid`` from /proc, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[19])


def is_alive(process_id: ProcessId) -> bool:
    """Return whether the process still runs (a zombie or a reused pid counts as gone)."""
    stat = _proc_stat(process_id.pid)
    return stat is not None and stat[0] not in ("Z", "X") and stat[2] == process_id.start_ticks


def descendants(pid: int) -> list[ProcessId]:
    """Return every live descendant of ``pid`` (children, grandchildren, ...) from /proc."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _proc_stat(int(entry.name))
        if stat is None or stat[0] in ("Z", "X"):
            continue
        children.setdefault(stat[1], []).append(int(entry.name))
        starts[int(entry.name)] = stat[2]
    found, stack = [], list(children.get(pid, []))
    while stack:
        child = stack.pop()
        found.append(ProcessId(child, starts[child]))
        stack.extend(children.get(child, []))
    return found


class ManagedProcess:
    """One started program: its command, log file, port, and everything it spawned."""

    def __init__(
        self,
        name: str,
        command: list[str],
        *,
        log_path: Path,
        env: dict,
        cwd: Path,
        port: int | None = None,
        stop_rank: int = STOP_SERVER,
    ):
        self.name = name
        self.command = command
        self.log_path = log_path
        self.port = port
        self.stopped_by_launcher = False
        self.stop_rank = stop_rank
        self.seen: set[ProcessId] = set()
        _keep_previous(log_path)
        with open(log_path, "wb") as sink:
            self.popen = subprocess.Popen(
                command, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, cwd=cwd, start_new_session=True,
            )
        stat = _proc_stat(self.popen.pid)
        self.seen.add(ProcessId(self.popen.pid, stat[2] if stat else -1))
        where = f" on {LOOPBACK}:{port}" if port else ""
        log.info("started %s%s: pid %d, log %s", name, where, self.popen.pid, log_path)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def record_descendants(self) -> None:
        """Remember the live descendants, so they are stopped even after the parent dies."""
        if self.popen.poll() is None:
            self.seen.update(descendants(self.pid))

    def alive(self) -> list[ProcessId]:
        """Return this process and the descendants ever seen that still run."""
        self.popen.poll()  # reap the direct child so it does not linger as a zombie
        return sorted((p for p in self.seen if is_alive(p)), key=lambda p: p.pid)

    def wait_for_port(self, timeout: float = READY_TIMEOUT) -> None:
        """Block until the process accepts connections on its port; raise when it exits or times out."""
        if self.port is None:
            raise ValueError(f"{self.name} was started without a port to wait for")
        deadline = time.monotonic() + timeout
        while not port_open(self.port):
            if self.popen.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with status {self.popen.returncode} before opening "
                    f"port {self.port}; log {self.log_path}:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name} did not open port {self.port} within {timeout:.0f} s; "
                    f"log {self.log_path}:\n{self.tail()}"
                )
            time.sleep(0.1)

    def stop(self, grace: float = STOP_GRACE) -> None:
        """Send SIGTERM to the process, its group and its descendants; SIGKILL what is left after ``grace`` s.

        Descendants that left the group get SIGTERM at the same moment as the leader, so a
        ServerApp under a SuperLink stops as soon as the SuperLink does, not after it.
        """
        self.record_descendants()
        running = self.popen.poll() is None
        # Decided before any signal: the leader can exit through its descendants' SIGTERM
        # before it gets its own (seen with the SuperLink), and that exit is still a stop.
        self.stopped_by_launcher = running
        # No poll() until the group got its signal: an exited leader stays unreaped, so its
        # pid, which is also the group id, cannot be reused by another process meanwhile.
        for process_id in [p for p in self.seen if is_alive(p)]:
            if process_id.pid != self.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process_id.pid, signal.SIGTERM)
        if running:
            _signal_group(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM for %.0f s; sending SIGKILL", self.name, self.pid, grace)
                _signal_group(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=grace)
        _stop_strays(self.alive(), grace)

    def tail(self, lines: int = TAIL_LINES) -> str:
        """Return the last ``lines`` lines of the log, colour codes removed."""
        return tail_file(self.log_path, lines)

    def describe_exit(self) -> str:
        """Return e.g. ``'exited 0'``, ``'stopped by SIGTERM'`` or ``'died by SIGKILL'``."""
        code = self.popen.poll()
        if code is None:
            return "still running"
        if code < 0:
            verb = "stopped" if self.stopped_by_launcher else "died"
            return f"{verb} by {signal.Signals(-code).name}"
        return f"exited {code} after SIGTERM" if self.stopped_by_launcher else f"exited {code}"


def _keep_previous(log_path: Path) -> None:
    """Rename an existing log to ``<name>.1`` so each deployment's log starts empty."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if log_path.exists():
        os.replace(log_path, log_path.with_name(log_path.name + ".1"))


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass


def _stop_strays(strays: list[ProcessId], grace: float) -> None:
    """SIGTERM, then SIGKILL, processes that outlived their group's leader."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        for process_id in strays:
            if is_alive(process_id):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process_id.pid, signum)
        deadline = time.monotonic() + grace
        while any(is_alive(p) for p in strays) and time.monotonic() < deadline:
            time.sleep(0.1)
        strays = [p for p in strays if is_alive(p)]
        if not strays:
            return
    log.error("processes still alive after SIGKILL: %s", ", ".join(str(p.pid) for p in strays))


def tail_file(path: Path, lines: int = TAIL_LINES) -> str:
    """Return the last ``lines`` lines of a text file ('' when it does not exist)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 200 * lines))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(_strip_ansi(line) for line in text.splitlines()[-lines:])


class ProcessGroup:
    """The processes of one deployment; ``close`` stops them by stop rank, then start order."""

    def __init__(self, *, env: dict, cwd: Path, log_dir: Path):
        self.env, self.cwd, self.log_dir = env, cwd, log_dir
        self.processes: list[ManagedProcess] = []

    def start(
        self, name: str, command: list[str], *, port: int | None = None, stop_rank: int = STOP_SERVER
    ) -> ManagedProcess:
        process = ManagedProcess(
            name, command, log_path=self.log_dir / f"{name}.log", env=self.env, cwd=self.cwd, port=port,
            stop_rank=stop_rank,
        )
        self.processes.append(process)
        return process

    def record_descendants(self) -> None:
        for process in self.processes:
            process.record_descendants()

    def close(self) -> None:
        for process in sorted(self.processes, key=lambda p: p.stop_rank):  # sorted() is stable
            try:
                process.stop()
            except Exception:  # noqa: BLE001 - one failed stop must not leave the others running
                log.exception("stopping %s (pid %d) failed", process.name, process.pid)
        for process in self.processes:
            log.info("%s (pid %d) %s", process.name, process.pid, process.describe_exit())

    def alive(self) -> list[ProcessId]:
        """Return every started process or seen descendant that still runs."""
        return [p for process in self.processes for p in process.alive()]


# ----- commands ---------------------------------------------------------------------------


def superlink_command(
    *, port: int, database: Path, tls: TlsFiles | None = None, supernode_auth: bool = False
) -> list[str]:
    """Return the ``flower-superlink`` command line for one Runtime API port on loopback.

    In Flower 1.42 one HTTP port serves the Fleet, Control and ServerAppIo APIs.
    """
    command = [tool_path("flower-superlink")]
    command += _superlink_security(tls, supernode_auth)
    command += [
        "--host", LOOPBACK,
        "--port", str(port),
        "--disable-runtime-dependency-installation",
        "--database", str(database),
    ]
    return command


def _superlink_security(tls: TlsFiles | None, supernode_auth: bool) -> list[str]:
    if tls is None:
        if supernode_auth:
            raise ValueError("SuperNode authentication needs TLS; add --tls")
        return ["--insecure"]
    flags = [
        "--ssl-ca-certfile", str(tls.ca_cert),
        "--ssl-certfile", str(tls.server_cert),
        "--ssl-keyfile", str(tls.server_key),
    ]
    return flags + (["--enable-supernode-auth"] if supernode_auth else [])


def supernode_command(
    site: SiteSpec,
    *,
    superlink_port: int,
    port: int,
    ca_cert: Path | None = None,
    auth_key: Path | None = None,
) -> list[str]:
    """Return the ``flower-supernode`` command line of one site.

    ``port`` is the SuperNode's own ClientAppIo port, distinct per SuperNode on a host.
    """
    command = [tool_path("flower-supernode")]
    command += ["--root-certificates", str(ca_cert)] if ca_cert else ["--insecure"]
    if auth_key is not None:
        command += ["--auth-supernode-private-key", str(auth_key)]
    command += [
        "--superlink", f"{LOOPBACK}:{superlink_port}",
        "--host", LOOPBACK,
        "--port", str(port),
        "--node-config", site.node_config(),
    ]
    return command


def write_flwr_config(flwr_home: Path, *, port: int, ca_cert: Path | None = None) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with the deployment's SuperLink as the default connection."""
    if ca_cert is not None and "'" in str(ca_cert):
        raise ValueError(f"certificate path {ca_cert} contains a single quote; use another folder")
    security = f"root-certificates = '{ca_cert}'" if ca_cert else "insecure = true"
    text = (
        "[superlink]\n"
        f'default = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f'address = "{LOOPBACK}:{port}"\n'
        f"{security}\n"
    )
    path = flwr_home / "config.toml"
    atomic.write_text(path, text)
    return path


def flwr_run_command(config_file: Path, *, app_dir: Path | None = None) -> list[str]:
    """Return the ``flwr run`` command that submits the app (default: this project's) to the deployment."""
    app = app_dir or project_root()
    return [tool_path("flwr"), "run", str(app), CONNECTION, "--stream", "--run-config", str(config_file)]


def tool_path(name: str) -> str:
    """Return the path of a Flower console script installed beside this Python."""
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            raise FileNotFoundError(f"{name} not found beside {sys.executable} or on PATH; install flwr")
        return found
    return str(path)


def deploy_environment(flwr_home: Path) -> dict[str, str]:
    """Return the environment of every deployment process: offline Flower, own FLWR_HOME."""
    configure_environment()
    env = dict(os.environ)
    env.update(FLOWER_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    # The SuperLink and SuperNodes start `flower-superexec` by name, so this environment's
    # scripts must be on PATH even when the venv is not activated (as in CI).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


# ----- the deployment ---------------------------------------------------------------------


class Deadline:
    """A point in time ``seconds`` from now that bounds every wait of one deployment."""

    def __init__(self, seconds: float):
        if seconds <= 0:
            raise ValueError(f"the deployment timeout must be positive seconds; got {seconds!r}")
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def expired(self) -> bool:
        return time.monotonic() > self.end

    def cap(self, seconds: float) -> float:
        """Return ``seconds`` or the time left, whichever is shorter; raise when none is left."""
        left = self.end - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"the deployment timed out after {self.seconds:.0f} s before the run started")
        return min(seconds, left)


@dataclass
class DeployResult:
    """Outcome of a deployment: run folder, work folder, status, and how each process ended."""

    run_dir: Path
    workdir: Path
    status: dict
    processes: list[dict] = field(default_factory=list)
    seen: list[ProcessId] = field(default_factory=list)  # started processes and their descendants


def run_deployment(
    config: RunConfig,
    sites: Sequence[SiteSpec],
    *,
    workdir: Path,
    tls: bool = False,
    supernode_auth: bool = False,
    timeout: float | None = None,
    on_line: Callable[[str], None] | None = None,
    after_start: Callable[[ProcessGroup], None] | None = None,
    app_dir: Path | None = None,
) -> DeployResult:
    """Run ``config`` on one SuperLink and one SuperNode per site; stop every process after.

    ``timeout`` bounds the whole deployment in seconds (default: two round timeouts per
    round plus 300 s). ``on_line`` gets every line of ``flwr run``'s output, and
    ``after_start`` the process group once ``flwr run`` started (tests use it to kill a
    SuperNode). ``app_dir`` is the Flower app to run (default: this project).

    Raises RuntimeError with the tail of the relevant log when the SuperLink dies, every
    SuperNode dies, the deadline passes, the run does not complete, or no site trained.
    """
    if not sites:
        raise ValueError("a deployment needs at least one site")
    if supernode_auth and not tls:
        raise ValueError("SuperNode authentication needs TLS; set tls=True (--tls)")
    workdir = Path(workdir).expanduser().resolve()
    config = resolve_paths(config.replace(num_sites=len(sites)))
    if timeout is None:
        timeout = config.num_server_rounds * 2 * config.round_timeout + RUN_TIMEOUT_GRACE
    deadline = Deadline(timeout)
    flwr_home = workdir / "flwr"
    flwr_home.mkdir(parents=True, exist_ok=True)
    env = deploy_environment(flwr_home)
    group = ProcessGroup(env=env, cwd=workdir, log_dir=workdir / "logs")
    status: dict = {}
    try:
        with _signal_handlers(_raise_interrupt, (signal.SIGTERM,)):
            status = _deploy(
                config, sites, group, workdir, env, tls=tls, supernode_auth=supernode_auth,
                deadline=deadline, on_line=on_line, after_start=after_start,
                app_dir=Path(app_dir or project_root()),
            )
    finally:
        with _signal_handlers(_log_still_stopping, (signal.SIGINT, signal.SIGTERM)):
            group.close()
        processes = _process_summary(group)
        atomic.write_json(
            workdir / SUMMARY_FILE,
            {"run_dir": config.output_dir, "tls": tls, "supernode_auth": supernode_auth,
             "sites": [_site_summary(s) for s in sites], "processes": processes, "status": status},
        )
        left = group.alive()
        if left:
            log.error("processes left running: %s", ", ".join(str(p.pid) for p in left))
    log.info("results in %s; process logs and %s in %s", config.output_dir, SUMMARY_FILE, workdir)
    seen = sorted({p for process in group.processes for p in process.seen}, key=lambda p: p.pid)
    return DeployResult(Path(config.output_dir), workdir, status, processes, seen)


def _deploy(config, sites, group, workdir, env, *, tls, supernode_auth, deadline, on_line, after_start, app_dir) -> dict:
    tls_files = generate_tls(workdir / "certs") if tls else None
    if tls_files is not None:
        log.info("TLS: CA certificate %s, server certificate %s", tls_files.ca_cert, tls_files.server_cert)
    superlink = start_superlink(
        group, workdir, tls_files=tls_files, supernode_auth=supernode_auth,
        timeout=deadline.cap(READY_TIMEOUT),
    )
    ca_cert = tls_files.ca_cert if tls_files else None
    supernodes = []
    for site in sites:
        key = None
        if supernode_auth:
            key = register_supernode(f"site-{site.site}", group, timeout=deadline.cap(REGISTER_TIMEOUT))
        supernodes.append(
            start_supernode(group, site, superlink_port=superlink.port, ca_cert=ca_cert, auth_key=key)
        )
    for node in supernodes:
        node.wait_for_port(deadline.cap(READY_TIMEOUT))

    config_file = workdir / RUN_CONFIG_FILE
    write_run_config(config, config_file)
    started_ns = time.time_ns()
    run = group.start("flwr-run", flwr_run_command(config_file, app_dir=app_dir), stop_rank=STOP_LOG_STREAM)
    if after_start is not None:
        after_start(group)
    _follow_run(run, superlink, supernodes, group, deadline, on_line)
    return _read_status(Path(config.output_dir), run, superlink, since_ns=started_ns)


def start_superlink(
    group: ProcessGroup,
    workdir: Path,
    *,
    tls_files: TlsFiles | None = None,
    supernode_auth: bool = False,
    timeout: float = READY_TIMEOUT,
) -> ManagedProcess:
    """Start a SuperLink with a fresh database on a free port and make it the default connection.

    Returns once the port accepts connections. The connection is written to the group's
    ``FLWR_HOME`` so that ``flwr`` commands run with the group's environment reach it.
    """
    database = workdir / "state.db"
    _remove_database(database)
    port = free_port()
    command = superlink_command(port=port, database=database, tls=tls_files, supernode_auth=supernode_auth)
    superlink = group.start("superlink", command, port=port)
    superlink.wait_for_port(timeout)
    ca_cert = tls_files.ca_cert if tls_files else None
    write_flwr_config(Path(group.env["FLWR_HOME"]), port=port, ca_cert=ca_cert)
    return superlink


def register_supernode(name: str, group: ProcessGroup, *, timeout: float = REGISTER_TIMEOUT) -> Path:
    """Create the key pair ``keys/<name>`` and register its public key; return the private key.

    Runs ``flwr supernode register`` against the group's default connection, the way an
    operator registers a hospital's public key with a SuperLink started with
    ``--enable-supernode-auth``.
    """
    keys = generate_node_key(group.cwd / "keys", name)
    command = [tool_path("flwr"), "supernode", "register", str(keys.public_key), CONNECTION,
               "--name", name, "--format", "json"]
    try:
        done = subprocess.run(
            command, env=group.env, cwd=group.cwd, capture_output=True, text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"registering {name}'s public key timed out after {timeout:.0f} s") from None
    if done.returncode != 0:
        raise RuntimeError(
            f"registering {name}'s public key {keys.public_key} failed "
            f"(exit {done.returncode}):\n{_strip_ansi(done.stdout + done.stderr)[-3000:]}"
        )
    log.info("registered %s's public key %s", name, keys.public_key)
    return keys.private_key


def start_supernode(
    group: ProcessGroup,
    site: SiteSpec,
    *,
    superlink_port: int,
    ca_cert: Path | None = None,
    auth_key: Path | None = None,
) -> ManagedProcess:
    """Start the SuperNode of ``site`` on a free port (call ``wait_for_port`` on the result)."""
    site.site_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = supernode_command(site, superlink_port=superlink_port, port=port, ca_cert=ca_cert, auth_key=auth_key)
    return group.start(f"supernode-{site.site}", command, port=port, stop_rank=STOP_SITE)


def _follow_run(run, superlink, supernodes, group, deadline, on_line) -> None:
    """Stream ``flwr run``'s log until it exits; raise on a dead SuperLink or the deadline."""
    offset = 0
    warned: set[str] = set()
    while True:
        finished = run.returncode is not None
        offset = _read_new_lines(run.log_path, offset, on_line)
        if finished:
            return
        group.record_descendants()
        if superlink.returncode is not None:
            raise RuntimeError(
                f"the SuperLink exited ({superlink.describe_exit()}) during the run; "
                f"log {superlink.log_path}:\n{superlink.tail()}"
            )
        for node in supernodes:
            if node.returncode is not None and node.name not in warned:
                warned.add(node.name)
                log.warning(
                    "%s (pid %d) %s during the run; the run goes on with the other sites. "
                    "Last lines of %s:\n%s", node.name, node.pid, node.describe_exit(), node.log_path, node.tail(10),
                )
        if len(warned) == len(supernodes):
            raise RuntimeError(f"every SuperNode exited; the run cannot go on. See the logs in {run.log_path.parent}")
        if deadline.expired():
            raise RuntimeError(
                f"the deployment timed out after {deadline.seconds:.0f} s; log {run.log_path}:\n{run.tail()}"
            )
        time.sleep(POLL_INTERVAL)


def _read_new_lines(path: Path, offset: int, on_line) -> int:
    """Log round lines and pass every complete line after byte ``offset``; return the new offset."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except OSError:
        return offset
    end = data.rfind(b"\n") + 1
    for raw in data[:end].decode("utf-8", errors="replace").splitlines():
        line = _strip_ansi(raw)
        match = _ROUND_LINE.search(line)
        if match:
            log.info("%s", match.group(1))
        if on_line is not None:
            on_line(line)
    return offset + end


def _read_status(run_dir: Path, run: ManagedProcess, superlink: ManagedProcess, *, since_ns: int) -> dict:
    """Return the run's ``status.json``; raise unless this run wrote it and marked it complete."""
    status_file = run_dir / STATUS_FILE
    try:
        status = json.loads(status_file.read_text())
        fresh = status_file.stat().st_mtime_ns >= since_ns
    except (OSError, ValueError):
        status, fresh = {}, False
    if run.returncode != 0 or not fresh or not status.get("complete"):
        written = "" if fresh or not status else " (left by an earlier run)"
        raise RuntimeError(
            f"the run did not complete (flwr run {run.describe_exit()}, status "
            f"{status or 'missing'}{written} in {status_file}); log {run.log_path}:\n{run.tail()}\n"
            f"--- last lines of {superlink.log_path} ---\n{superlink.tail(15)}"
        )
    _report_sites(run_dir)
    return status


def _report_sites(run_dir: Path) -> None:
    """Log each site's round outcomes; raise when no site trained in any round of the run."""
    try:
        with open(run_dir / ROUNDS_FILE, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except OSError:
        rows = []
    by_site: dict[str, list[dict]] = {}
    for row in rows:
        by_site.setdefault(row["site"], []).append(row)
    for site, site_rows in sorted(by_site.items(), key=lambda item: int(item[0])):
        counts = Counter(row["status"] for row in site_rows)
        summary = ", ".join(f"{status} {count}" for status, count in sorted(counts.items()))
        problems = [row for row in site_rows if row["status"] in (STATUS_FAILED, STATUS_REFUSED)]
        if problems:
            last = problems[-1]
            log.warning("site %s: %s; round %s: %s", site, summary, last["server_round"], last["reason"][-300:])
        else:
            log.info("site %s: %s", site, summary)
    if rows and all(row["status"] == STATUS_FAILED for row in rows):
        raise RuntimeError(
            f"the run finished but no site trained in any round; first error: {rows[0]['reason'][-500:]} "
            f"(see {run_dir / ROUNDS_FILE} and the supernode logs)"
        )


def _remove_database(path: Path) -> None:
    # A fresh SuperLink state per deployment: old runs and node registrations do not carry
    # over. Resuming needs only the run folder and the sites' ledgers.
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            Path(f"{path}{suffix}").unlink()


@contextlib.contextmanager
def _signal_handlers(handler: Callable, signums: Sequence[int]) -> Iterator[None]:
    """Install ``handler`` for ``signums`` and restore the previous handlers on exit.

    Python accepts signal handlers only in the main thread, so elsewhere nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum in signums}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _raise_interrupt(signum, frame) -> None:
    # SIGTERM becomes KeyboardInterrupt, so ``finally`` stops the processes on ``kill`` too.
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _log_still_stopping(signum, frame) -> None:
    # A second Ctrl-C or SIGTERM must not cut the cleanup short and leave processes running.
    log.warning("%s received while stopping the deployment's processes; still stopping", signal.Signals(signum).name)


def _process_summary(group: ProcessGroup) -> list[dict]:
    return [
        {"name": p.name, "pid": p.pid, "port": p.port, "exit": p.describe_exit(),
         "returncode": p.returncode, "log": str(p.log_path), "command": p.command}
        for p in group.processes
    ]


def _site_summary(site: SiteSpec) -> dict:
    return {"site": site.site, "data_dir": str(site.data_dir), "site_dir": str(site.site_dir),
            "manifest": str(site.manifest or ""), "node_config": site.node_config()}

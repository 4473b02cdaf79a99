"""Run one federated job through Flower's simulation engine (``flwr run .``).

The run config is written to a TOML file in the run folder and passed with ``-c``, so
every value reaches the apps exactly as resolved here. Paths are made absolute first:
Flower runs a copy of the app from ``FLWR_HOME``, where relative paths would point
elsewhere.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

from common.config import RunConfig
from common.results import STATUS_FILE
from common.runtime import configure_environment, project_root, state_dir
from simulations.flower_processes import check_local_superlink_port, end_simulations, stop_local_superlink

log = logging.getLogger(__name__)

RUN_CONFIG_FILE = "run_config.toml"
LOG_FILE = "flower.log"
_ROUND_LINE = re.compile(r"server\.federation: (round \d+/\d+:.*|run finished.*|resuming.*)")
_RESULT_TIMEOUT_GRACE = 300  # seconds added to the rounds' timeouts before a run is killed


def resolve_paths(config: RunConfig) -> RunConfig:
    """Return ``config`` with every path absolute and the cache folder filled in."""

    def absolute(value: str) -> str:
        return str(Path(value).expanduser().resolve()) if value else ""

    return config.replace(
        output_dir=absolute(config.output_dir),
        data_dir=absolute(config.data_dir),
        manifest=absolute(config.manifest),
        cache_dir=absolute(config.cache_dir) or str((state_dir() / "cache").resolve()),
        site_dir=absolute(config.site_dir),
        init_weights=absolute(config.init_weights),
    )


def write_run_config(config: RunConfig, path: Path) -> None:
    """Write ``config`` as the TOML override file that ``flwr run -c FILE`` reads."""
    from common import atomic

    lines = []
    for key, value in config.to_run_config().items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            text = '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
        lines.append(f"{key} = {text}")
    atomic.write_text(path, "\n".join(lines) + "\n")


def run_federated(
    config: RunConfig,
    *,
    num_sites: int,
    log_file: Path | None = None,
    timeout: float | None = None,
    on_line: Callable[[str], None] | None = None,
) -> Path:
    """Run ``config`` with ``num_sites`` simulated sites; return the run folder.

    Blocks until the run ends, logs each round's summary line, and raises RuntimeError
    with the tail of Flower's output when the run fails or does not complete.
    """
    flwr_home = configure_environment()["FLWR_HOME"]
    stale = stop_local_superlink(only_stale=True)
    if stale:
        log.warning(
            "stopped %d local SuperLink process(es) whose files under %s had been deleted; "
            "`flwr run` starts a new one", stale, flwr_home,
        )
    check_local_superlink_port()
    env = dict(os.environ)
    # `flwr run` launches `flower-superlink` by name: put this environment's scripts first.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    config = resolve_paths(config.replace(num_sites=num_sites))
    folder = Path(config.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    config_file = folder / RUN_CONFIG_FILE
    write_run_config(config, config_file)
    log_file = log_file or folder / LOG_FILE
    command = [
        str(Path(sys.executable).with_name("flwr")),
        "run",
        str(project_root()),
        "--stream",
        "--run-config",
        str(config_file),
        "--federation-config",
        f"num-supernodes={num_sites} client-resources-num-cpus=1",
    ]
    if timeout is None:
        timeout = config.num_server_rounds * 2 * config.round_timeout + _RESULT_TIMEOUT_GRACE
    log.info("starting Flower simulation: %d sites, %d rounds -> %s", num_sites, config.num_server_rounds, folder)
    tail = _stream(command, env, log_file, timeout, on_line)
    status_file = folder / STATUS_FILE
    status = status_file.read_text() if status_file.exists() else ""
    if '"complete": true' not in status:
        raise RuntimeError(
            f"Flower run in {folder} did not complete (status: {status.strip() or 'missing'}); "
            f"full log: {log_file}\n--- last lines ---\n" + "\n".join(tail)
        )
    return folder


def _stream(command, env, log_file: Path, timeout: float, on_line) -> list[str]:
    """Follow ``flwr run --stream``; on timeout or Ctrl-C stop the run at the SuperLink too.

    Killing the ``flwr`` CLI only ends the log stream: the run itself lives in the
    SuperLink, so it is stopped with ``flwr stop RUN_ID``, and its simulation process
    (which ``flwr stop`` leaves running) is ended.
    """
    tail: deque[str] = deque(maxlen=40)
    started = time.monotonic()
    started_wall = time.time()
    run_id = None
    with open(log_file, "a", encoding="utf-8") as sink:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=project_root(),
            start_new_session=True,
        )
        assert process.stdout is not None
        lines: queue.Queue[str | None] = queue.Queue()
        reader = threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True)
        reader.start()
        try:
            while True:
                if time.monotonic() - started > timeout:
                    raise TimeoutError
                try:
                    line = lines.get(timeout=1.0)
                except queue.Empty:
                    continue
                if line is None:
                    break
                sink.write(line)
                clean = _strip_ansi(line.rstrip("\n"))
                tail.append(clean)
                run_id = run_id or _run_id(clean)
                match = _ROUND_LINE.search(clean)
                if match:
                    log.info("%s", match.group(1))
                if on_line is not None:
                    on_line(clean)
            process.wait()
            process.stdout.close()
        except BaseException as error:
            # Whatever ends the stream (timeout, Ctrl-C, a callback) also ends the run.
            os.killpg(process.pid, signal.SIGTERM)
            process.wait()
            process.stdout.close()
            if run_id is not None:
                stop_run(run_id, env)
            # `flwr stop` only marks the run stopped: its ServerApp would go on training.
            end_simulations(since=started_wall)
            if isinstance(error, TimeoutError):
                raise RuntimeError(
                    f"Flower run timed out after {timeout:.0f} s; log: {log_file}"
                ) from None
            raise
    return list(tail)


def _pump(stream, lines: "queue.Queue[str | None]") -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def stop_run(run_id: int, env: dict[str, str] | None = None) -> bool:
    """Ask the local SuperLink to stop run ``run_id``; return whether it accepted."""
    command = [str(Path(sys.executable).with_name("flwr")), "stop", str(run_id)]
    result = subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=project_root(), timeout=60
    )
    if result.returncode != 0:
        log.warning("could not stop Flower run %d: %s", run_id, result.stdout[-500:] + result.stderr[-500:])
        return False
    log.info("stopped Flower run %d", run_id)
    return True


def _run_id(line: str) -> int | None:
    match = re.search(r"run_id `(\d+)`", line)
    return int(match.group(1)) if match else None


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)

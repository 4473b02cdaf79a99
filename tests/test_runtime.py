"""Process hygiene: one log line per Flower message, project-local Flower/Ray state."""

import subprocess
import sys
import textwrap

import pytest

from common.runtime import project_root


def _run(code: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLWR_", "RAY_", "DPFEDSEG_"))}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=120, env=env, cwd=project_root(),
    )


def test_flower_lines_print_once_after_opacus_import():
    result = _run(
        """
        import logging
        import opacus  # installs a root handler
        from flwr.common.logger import log
        from common.runtime import setup_logging
        setup_logging()
        log(logging.INFO, "marker-line-42")
        logging.getLogger("dpfedseg.test").info("own-line-43")
        """
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert output.count("marker-line-42") == 1, output
    assert output.count("own-line-43") == 1, output


def test_warnings_are_logged_not_silenced():
    result = _run(
        """
        import warnings
        from common.runtime import setup_logging
        setup_logging()
        warnings.warn("visible-warning-7")
        """
    )
    assert "visible-warning-7" in result.stderr


def test_environment_is_project_local_and_offline(tmp_path):
    result = _run(
        """
        import json, os
        from common.runtime import configure_environment
        print(json.dumps(configure_environment()))
        """,
        {"DPFEDSEG_STATE": str(tmp_path / "state")},
    )
    import json

    values = json.loads(result.stdout)
    assert values["FLWR_HOME"] == str(tmp_path / "state" / "flwr")
    assert values["FLWR_TELEMETRY_ENABLED"] == "0"
    assert values["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert values["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert (tmp_path / "state" / "flwr").is_dir()


def test_cli_help_lists_every_subcommand():
    result = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "--help"],
        capture_output=True, text=True, timeout=60, cwd=project_root(),
    )
    assert result.returncode == 0
    for name in ("data", "sites", "privacy", "compare", "report", "deploy"):
        assert f"    {name} " in result.stdout, result.stdout


def test_stale_local_superlink_stopped():
    """A SuperLink stand-in with a deleted open file under FLWR_HOME is stopped, a live one is not."""
    import os
    import time

    from common.runtime import configure_environment
    from simulations.flower_processes import stop_local_superlink

    flwr_home = configure_environment()["FLWR_HOME"]
    os.makedirs(flwr_home, exist_ok=True)
    # The process name carries "flower-superlink" as the real one's command line does.
    code = "import sys, time; handle = open(sys.argv[1], 'w'); time.sleep(60)"
    env = {**os.environ, "FLWR_HOME": flwr_home}
    processes, files = [], []
    for name in ("stale", "live"):
        state = os.path.join(flwr_home, f"test-{name}-{os.getpid()}.db")
        files.append(state)
        processes.append(subprocess.Popen([sys.executable, "-c", code, state, "flower-superlink"], env=env))
    try:
        deadline = time.monotonic() + 10
        while not all(os.path.exists(f) for f in files) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # let both processes reach their sleep with the file open
        os.unlink(files[0])
        assert stop_local_superlink(only_stale=True) == 1
        assert processes[0].wait(timeout=10) == -15
        assert processes[1].poll() is None
    finally:
        for process in processes:
            process.kill()
            process.wait()
        for state in files:
            if os.path.exists(state):
                os.unlink(state)


def _stand_in(name: str, flwr_home: str, code: str) -> subprocess.Popen:
    """Start a Python process whose command line carries ``name``, with this project's FLWR_HOME."""
    import os

    return subprocess.Popen([sys.executable, "-c", code, name], env={**os.environ, "FLWR_HOME": flwr_home})


def test_interrupted_run_simulation_ended():
    """The simulation process of a stopped run gets SIGINT; one started before the run is left alone."""
    import signal
    import time

    from common.runtime import configure_environment
    from simulations.flower_processes import end_simulations

    flwr_home = configure_environment()["FLWR_HOME"]
    # Exits with status 3 on SIGINT, as Python unwinding a KeyboardInterrupt would.
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGINT, lambda *_: sys.exit(3))\n"
        "time.sleep(60)\n"
    )
    older = _stand_in("flwr-simulation", flwr_home, code)
    time.sleep(1.5)
    since = time.time()
    ours = _stand_in("flwr-simulation", flwr_home, code)
    try:
        time.sleep(0.5)  # let it install its handler
        assert end_simulations(since=since, grace=10) == 1
        assert ours.wait(timeout=10) == 3
        assert older.poll() is None
    finally:
        for process in (older, ours):
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
            process.wait()


@pytest.mark.parametrize(
    "listing, active",
    [
        ('{"success": true, "runs": []}', []),
        ('{"success": true, "runs": [{"run-id": 7, "status": "finished:completed"}, '
         '{"run-id": 8, "status": "running"}, {"run-id": 9, "status": "pending"}]}', ["8", "9"]),
        ('{"success": true, "runs": [{"run-id": 7, "status": "finished:stopped"}]}', []),
    ],
)
def test_active_runs_from_flwr_ls(listing, active):
    from simulations.flower_processes import active_runs

    assert active_runs(listing) == active


@pytest.mark.parametrize("output", ["", "Error: no SuperLink", '{"success": false, "error-message": "x"}'])
def test_active_runs_rejects_failed_listing(output):
    from simulations.flower_processes import active_runs

    with pytest.raises(ValueError, match="flwr ls"):
        active_runs(output)


def test_foreign_local_superlink_port_refused(tmp_path, monkeypatch):
    """A local SuperLink port held by no SuperLink of this project stops the run before `flwr run`."""
    import socket
    import time

    from simulations.flower_processes import check_local_superlink_port, project_processes

    flwr_home = str(tmp_path / "flwr")
    monkeypatch.setenv("FLWR_HOME", flwr_home)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        monkeypatch.setenv("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", str(port))
        with pytest.raises(RuntimeError, match=f"127.0.0.1:{port}, where `flwr run` looks"):
            check_local_superlink_port()
        ours = _stand_in("flower-superlink", flwr_home, "import time; time.sleep(60)")
        try:
            deadline = time.monotonic() + 10
            while not any(True for _ in project_processes("flower-superlink")) and time.monotonic() < deadline:
                time.sleep(0.05)  # until the child has exec'd with its own command line
            check_local_superlink_port()  # this project's SuperLink listens there
        finally:
            ours.kill()
            ours.wait()
    check_local_superlink_port()  # free port

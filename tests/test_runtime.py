"""Process hygiene: one log line per Flower message, project-local Flower/Ray state."""

import subprocess
import sys
import textwrap

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

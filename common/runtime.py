"""Process hygiene shared by every entry point: logging and the Flower/Ray environment.

Flower and Ray write state (``FLWR_HOME``, Ray's session folders) and phone home
(telemetry, update checks) unless configured otherwise. A SuperLink also installs an app's
dependencies into a fresh environment per run unless that is turned off. Every entry
point calls :func:`configure_environment` before Flower is imported.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_FLOWER_LOGGERS = ("flwr",)


def project_root() -> Path:
    """Return the folder holding the Flower app's ``pyproject.toml`` (the repository)."""
    return Path(__file__).resolve().parents[1]


def state_dir() -> Path:
    """Return the project-local folder for Flower and Ray state (``DPFEDSEG_STATE`` overrides)."""
    override = os.environ.get("DPFEDSEG_STATE")
    return Path(override) if override else project_root() / ".dpfedseg"


def configure_environment() -> dict[str, str]:
    """Set Flower and Ray variables to project-local, offline values and return them.

    Values already set by the user are kept. ``RAY_TMPDIR`` must stay short because Ray puts
    Unix sockets under it (limit about 107 characters), so it falls back to ``/tmp`` when the
    project path is too long.
    """
    root = state_dir()
    ray_tmp = root / "ray"
    if len(str(ray_tmp)) > 40:
        ray_tmp = Path("/tmp") / f"dpfedseg-ray-{os.getuid()}"
    defaults = {
        "FLWR_HOME": str(root / "flwr"),
        "RAY_TMPDIR": str(ray_tmp),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DEDUP_LOGS": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    for key in ("FLWR_HOME", "RAY_TMPDIR"):
        Path(os.environ[key]).mkdir(parents=True, exist_ok=True)
    return {key: os.environ[key] for key in defaults}


def setup_logging(level: int | str = logging.INFO) -> None:
    """Configure the root logger once, route warnings into it and stop Flower double-printing.

    ``import opacus`` installs a root handler, and Flower's ``flwr`` logger has its own
    handler and propagates, so each Flower line would print twice. Flower keeps its
    handler; propagation to the root stops. Python warnings are logged, never silenced.
    """
    root = logging.getLogger()
    if not any(getattr(h, "_dpfedseg", False) for h in root.handlers):
        # Replace only plain stream handlers (Opacus calls logging.basicConfig at import);
        # subclasses such as pytest's capture handlers stay.
        for handler in list(root.handlers):
            if type(handler) is logging.StreamHandler:
                root.removeHandler(handler)
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler._dpfedseg = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    for name in _FLOWER_LOGGERS:
        logging.getLogger(name).propagate = False
    # Flower's HTTP transport logs every request at INFO (several per second).
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.captureWarnings(True)

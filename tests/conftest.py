"""Shared fixtures: the real RSNA folders beside the repository, skipped when absent."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.runtime import configure_environment, project_root

SHARED_DATA = project_root().parent / "shared" / "data"
RSNA_SAMPLE = SHARED_DATA / "rsna-sample"
RSNA_METADATA = SHARED_DATA / "rsna-metadata"

configure_environment()


@pytest.fixture(scope="session")
def rsna_sample() -> Path:
    """The 16 real RSNA DICOMs with their labels (skips when the folder is missing)."""
    if not (RSNA_SAMPLE / "stage_2_train_labels.csv").is_file():
        pytest.skip(f"real RSNA sample not found at {RSNA_SAMPLE}")
    return RSNA_SAMPLE


@pytest.fixture(scope="session")
def rsna_metadata() -> Path:
    """Labels and headers of all 26,684 RSNA training images (skips when missing)."""
    if not (RSNA_METADATA / "stage_2_train_labels.csv").is_file():
        pytest.skip(f"real RSNA metadata not found at {RSNA_METADATA}")
    return RSNA_METADATA


@pytest.fixture(scope="session", autouse=True)
def stop_superlink_after_tests():
    """Stop the background SuperLink that the Flower tests' `flwr run` calls started."""
    yield
    from simulations.flower_processes import stop_idle_superlink

    stop_idle_superlink()

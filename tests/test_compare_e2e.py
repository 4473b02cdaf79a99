"""A shrunk comparison end to end through Flower on the 16 real RSNA DICOMs, with a resume.

One module fixture runs RS and AC on 2 sites (32 px, ResNet18 U-Net, 2 rounds). The
comparison is interrupted as Ctrl-C would stop it, right after the RS run finished;
rerunning it must skip RS and run AC. The tests then check every output file of that one
comparison. Resuming an unfinished run from its checkpoint is covered in test_compare.py.
"""

from __future__ import annotations

import json
import logging

import pandas as pd
import pytest

from common import results
from common.config import RunConfig
from simulations import compare, summary
from simulations.compare import CompareSpec

pytestmark = pytest.mark.slow

ROUNDS = 2
SITES = 2
FIGURES = (
    "accuracy_comparison.png",
    "privacy_comparison.png",
    "per_site_dice.png",
    "communication.png",
    "round_time.png",
)


class _InterruptBeforeSecondRun:
    """The Flower runner, stopped by KeyboardInterrupt when the AC run is about to start."""

    def __init__(self):
        from simulations.flower_run import run_federated

        self.run_federated = run_federated
        self.methods = []

    def __call__(self, config, **kwargs):
        self.methods.append(config.method)
        if config.method == "automatic":
            raise KeyboardInterrupt
        return self.run_federated(config, **kwargs)


@pytest.fixture(scope="module")
def comparison(rsna_sample, tmp_path_factory):
    """Run the shrunk comparison, interrupt AC after round 1, resume; return what happened."""
    outputs = tmp_path_factory.mktemp("compare") / "outputs"
    spec = CompareSpec(
        base=RunConfig(
            encoder="resnet18",
            image_size=32,
            num_sites=SITES,
            num_server_rounds=ROUNDS,
            batch_size=2,
            learning_rate=0.05,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            target_epsilon=50.0,
            round_timeout=300,
        ),
        data_dir=rsna_sample,
        outputs=outputs,
        methods=("rs", "automatic"),
        setups=("iid",),
        seeds=(0,),
        site_options={"min_site_size": 8},
        run_timeout=400,
    )
    first = _InterruptBeforeSecondRun()
    with pytest.raises(KeyboardInterrupt):
        compare.run_comparison(spec, runner=first)
    rs_folder = outputs / "rs_training" / "iid-seed0"
    ac_folder = outputs / "automatic_clipping" / "iid-seed0"
    interrupted = {
        "methods": first.methods,
        "rs_mtime": (rs_folder / results.ROUNDS_FILE).stat().st_mtime_ns,
        "ac_exists": ac_folder.exists(),
    }
    handler = _ListHandler()
    logger = logging.getLogger("simulations.compare")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        written = compare.run_comparison(spec)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return {
        "spec": spec,
        "outputs": outputs,
        "written": written,
        "interrupted": interrupted,
        "log": "\n".join(handler.messages),
        "rs": rs_folder,
        "ac": ac_folder,
    }


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_interrupt_stopped_before_second_run(comparison):
    assert comparison["interrupted"]["methods"] == ["rs", "automatic"]
    assert comparison["interrupted"]["ac_exists"] is False


def test_rerun_skips_finished_run(comparison):
    assert "rs_training/iid-seed0 finished earlier: skipped" in comparison["log"]
    assert "automatic_clipping/iid-seed0: starting" in comparison["log"]
    mtime = (comparison["rs"] / results.ROUNDS_FILE).stat().st_mtime_ns
    assert mtime == comparison["interrupted"]["rs_mtime"]


@pytest.mark.parametrize("method_folder", ["rs_training", "automatic_clipping"])
def test_run_folder_files(comparison, method_folder):
    folder = comparison["outputs"] / method_folder / "iid-seed0"
    status = json.loads((folder / results.STATUS_FILE).read_text())
    assert status["complete"] is True
    assert status["last_round"] == ROUNDS
    for name in (results.CONFIG_FILE, results.CHECKPOINT_FILE, results.FINAL_MODEL_FILE):
        assert (folder / name).stat().st_size > 0
    for site in range(SITES):
        ledger = json.loads((folder / results.LEDGER_DIR / f"site-{site}.json").read_text())
        assert ledger["site"] == site
        assert len(ledger["entries"]) >= 1
    config = json.loads((folder / results.CONFIG_FILE).read_text())
    assert config["method"] == ("rs" if method_folder == "rs_training" else "automatic")


@pytest.mark.parametrize("method_folder", ["rs_training", "automatic_clipping"])
def test_rounds_have_per_site_rows(comparison, method_folder):
    rounds = pd.read_csv(comparison["outputs"] / method_folder / "iid-seed0" / results.ROUNDS_FILE)
    assert tuple(rounds.columns) == results.ROUND_COLUMNS
    assert len(rounds) == ROUNDS * SITES
    for server_round in range(1, ROUNDS + 1):
        sites = rounds[rounds["server_round"] == server_round]["site"]
        assert sorted(sites) == list(range(SITES))
    assert (rounds["status"] == results.STATUS_OK).all()
    assert rounds["val_dice"].between(0, 1).all()
    assert (rounds["upload_bytes"] > 0).all()


def test_matched_noise_gives_equal_epsilon(comparison):
    keys = ["server_round", "site"]
    rs = pd.read_csv(comparison["rs"] / results.ROUNDS_FILE).set_index(keys).sort_index()
    ac = pd.read_csv(comparison["ac"] / results.ROUNDS_FILE).set_index(keys).sort_index()
    for column in ("noise_multiplier", "sample_rate", "steps", "epsilon", "epsilon_server"):
        assert rs[column].tolist() == pytest.approx(ac[column].tolist(), rel=1e-9), column
    assert (rs["epsilon"] > 0).all()


def test_comparison_outputs(comparison):
    from PIL import Image

    folder = comparison["outputs"] / summary.COMPARISON_DIR
    names = {path.name for path in comparison["written"]}
    assert names == {*FIGURES, summary.SUMMARY_CSV, summary.SUMMARY_MD}
    for name in FIGURES:
        with Image.open(folder / name) as image:
            image.verify()
        with Image.open(folder / name) as image:
            assert image.format == "PNG"
            assert image.width > 0
            assert image.height > 0
    assert (comparison["outputs"] / summary.MANIFEST_DIR / "iid-seed0.csv").is_file()
    plan = json.loads((folder / summary.PLAN_FILE).read_text())
    assert [r["state"] for r in plan["runs"]] == ["complete", "complete"]


def test_summary_table(comparison):
    folder = comparison["outputs"] / summary.COMPARISON_DIR
    table = pd.read_csv(folder / summary.SUMMARY_CSV)
    assert table["method"].tolist() == ["rs", "automatic"]
    for column in ("val_dice_mean", "val_dice_ci95", "test_dice_mean", "test_dice_positive_mean",
                   "test_fpr_mean", "epsilon_site_0", "epsilon_site_1", "epsilon_max",
                   "accountant", "delta", "upload_bytes_total_mean", "wall_seconds_mean"):
        assert column in table.columns, column
    assert table["seeds"].tolist() == [1, 1]
    assert table["epsilon_site_0"].iloc[0] == pytest.approx(table["epsilon_site_0"].iloc[1])
    assert table["epsilon_site_1"].iloc[0] == pytest.approx(table["epsilon_site_1"].iloc[1])
    text = (folder / summary.SUMMARY_MD).read_text()
    assert '"RS gives stronger privacy than AC": refuted' in text
    assert "undecided: too few seeds (n=1" in text


def test_report_command_rebuilds(comparison):
    from simulations.cli import main

    folder = comparison["outputs"] / summary.COMPARISON_DIR
    before = (folder / summary.SUMMARY_CSV).read_text()
    (folder / summary.SUMMARY_CSV).unlink()
    (folder / FIGURES[0]).unlink()
    assert main(["report", str(comparison["outputs"])]) == 0
    assert (folder / summary.SUMMARY_CSV).read_text() == before
    assert (folder / FIGURES[0]).stat().st_size > 0

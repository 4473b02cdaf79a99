"""Plan, privacy matching, resume decisions and progress of the comparison driver."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from test_report import write_run

from common import results
from common.atomic import write_csv, write_json
from common.config import RunConfig
from simulations import compare
from simulations.cli import build_parser
from simulations.cmd_compare import build_spec
from simulations.compare import CompareSpec, PlannedRun
from simulations.presets import DEMO, PAPER, get_preset


def _spec(tmp_path, **changes):
    values = dict(
        base=RunConfig(num_sites=2, batch_size=2, noise_multiplier=1.3),
        data_dir=tmp_path / "data",
        outputs=tmp_path / "out",
        site_options={"min_site_size": 4},
    )
    values.update(changes)
    return CompareSpec(**values)


def test_plan_orders_methods_within_seed(tmp_path):
    spec = _spec(tmp_path, methods=("rs", "automatic", "none"), setups=("iid", "label-skew"),
                 seeds=(0, 1))
    labels = [run.label() for run in compare.plan_runs(spec)]
    assert labels == [
        "rs_training/iid-seed0",
        "automatic_clipping/iid-seed0",
        "non_private/iid-seed0",
        "rs_training/iid-seed1",
        "automatic_clipping/iid-seed1",
        "non_private/iid-seed1",
        "rs_training/label-skew-seed0",
        "automatic_clipping/label-skew-seed0",
        "non_private/label-skew-seed0",
        "rs_training/label-skew-seed1",
        "automatic_clipping/label-skew-seed1",
        "non_private/label-skew-seed1",
    ]


def test_plan_sweep_runs_non_private_once(tmp_path):
    spec = _spec(tmp_path, methods=("rs", "none"), sweep_epsilons=(1.0, 8.0))
    runs = compare.plan_runs(spec)
    assert [run.label() for run in runs] == [
        "rs_training/iid-seed0-eps1",
        "rs_training/iid-seed0-eps8",
        "non_private/iid-seed0",
    ]


def test_matched_noise_configs_equal(tmp_path):
    spec = _spec(tmp_path, methods=("rs", "automatic", "flat", "adaptive", "rs-automatic"))
    configs = [
        compare.run_config_for(spec, run, tmp_path / "m.csv") for run in compare.plan_runs(spec)
    ]
    for config in configs:
        assert config.noise_multiplier == 1.3
        assert config.calibrate_noise is False
        assert config.batch_size == 2
        assert config.num_server_rounds == spec.base.num_server_rounds
        assert config.local_epochs == spec.base.local_epochs
    assert [c.method for c in configs] == ["rs", "automatic", "flat", "adaptive", "rs-automatic"]
    assert len({c.output_dir for c in configs}) == 5


def test_matched_epsilon_calibrates(tmp_path):
    spec = _spec(tmp_path, match="epsilon", methods=("rs", "none"),
                 base=RunConfig(num_sites=2, target_epsilon=3.0))
    rs, none = (compare.run_config_for(spec, r, tmp_path / "m.csv") for r in compare.plan_runs(spec))
    assert rs.calibrate_noise is True
    assert rs.target_epsilon == 3.0
    assert none.calibrate_noise is False


def test_sweep_sets_target_per_run(tmp_path):
    spec = _spec(tmp_path, sweep_epsilons=(2.0, 4.0), methods=("automatic",))
    configs = [compare.run_config_for(spec, r, tmp_path / "m.csv") for r in compare.plan_runs(spec)]
    assert [c.target_epsilon for c in configs] == [2.0, 4.0]
    assert all(c.calibrate_noise for c in configs)
    assert configs[0].output_dir.endswith("automatic_clipping/iid-seed0-eps2")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"methods": ("rs", "clip")}, "methods must be a non-empty selection"),
        ({"methods": ("rs", "rs")}, "listed twice"),
        ({"match": "budget"}, "match must be one of noise, epsilon; got 'budget'"),
        ({"seeds": (0, 0)}, "seeds must be distinct"),
        ({"sweep_epsilons": (1.0, 0.0)}, r"target epsilons must be finite and > 0; got \[0.0\]"),
        ({"setups": ("iid", "hospital")}, "setup must be one of"),
        ({"site_options": {"alpah": 1.0}}, "unknown --site-option alpah; valid options: alpha, attribute, "),
    ],
)
def test_spec_rejects_bad_values(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        _spec(tmp_path, **changes)


def test_resume_action_per_folder_state(tmp_path):
    assert compare.resume_action(tmp_path / "missing") == compare.START
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / results.CHECKPOINT_FILE).write_bytes(b"x")
    assert compare.resume_action(folder) == compare.RESUME
    write_json(folder / results.STATUS_FILE, {"complete": False, "last_round": 1})
    assert compare.resume_action(folder) == compare.RESUME
    write_json(folder / results.STATUS_FILE, {"complete": True, "last_round": 3})
    assert compare.resume_action(folder) == compare.SKIP


def test_saved_config_mismatch_names_key(tmp_path):
    config = RunConfig(num_server_rounds=3, output_dir=str(tmp_path))
    write_json(tmp_path / results.CONFIG_FILE, config.replace(
        num_server_rounds=5, output_dir="/elsewhere", resume=True).to_run_config())
    with pytest.raises(ValueError, match="num-server-rounds: saved 5, requested 3"):
        compare.check_saved_config(tmp_path, config)


def test_saved_config_ignores_paths_and_calibrated_noise(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = RunConfig(calibrate_noise=True, data_dir="data")
    saved = config.replace(
        noise_multiplier=0.731, data_dir=str(tmp_path / "data"), resume=True, cache_dir="/c"
    )
    write_json(tmp_path / results.CONFIG_FILE, saved.to_run_config())
    compare.check_saved_config(tmp_path, config)


def test_saved_config_rejects_other_dataset(tmp_path):
    saved = RunConfig(data_dir=str(tmp_path / "demo-data"))
    write_json(tmp_path / results.CONFIG_FILE, saved.to_run_config())
    with pytest.raises(ValueError, match="data-dir: saved"):
        compare.check_saved_config(tmp_path, saved.replace(data_dir=str(tmp_path / "other")))


def test_time_left_estimate():
    timer = compare.TimeLeft(5)
    timer.skip()
    assert timer.describe() == "4 runs left"
    timer.finished(60.0)
    timer.finished(120.0)
    assert timer.describe() == "about 3 min 0 s left for 2 runs (estimate: mean 90 s per run so far)"
    timer.finished(1.0)
    timer.skip()
    assert timer.describe() == "all runs done"


def test_run_progress_counts_saved_rounds(tmp_path):
    progress = compare.RunProgress(tmp_path, total=3, label="rs")
    assert progress.rounds_done() == 0
    rows = pd.DataFrame({"server_round": [1, 1, 2, 2], "site": [0, 1, 0, 1]})
    write_csv(tmp_path / results.ROUNDS_FILE, rows)
    assert progress.rounds_done() == 2
    with progress as bar:
        assert bar._bar.n == 2


def test_cli_spec_merges_preset_and_overrides(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    args = build_parser().parse_args([
        "compare", "--preset", "paper", "--data", str(data), "--out", str(tmp_path / "o"),
        "--methods", "rs", "automatic", "none", "--seeds", "3", "--sites", "4",
        "-c", "num-server-rounds=2", "-c", "image-size=64", "--site-option", "alpha=0.3",
        "--site-option", "split-ratios=0.6,0.2,0.2", "--init-weights", str(weights),
        "--epsilons", "1", "2",
    ])
    spec = build_spec(args)
    assert spec.base.encoder == "resnet34"  # from the preset
    assert spec.base.num_server_rounds == 2
    assert spec.base.image_size == 64
    assert spec.base.num_sites == 4
    assert spec.base.init_weights == str(weights.resolve())
    assert spec.methods == ("rs", "automatic", "none")
    assert spec.seeds == (3,)
    assert spec.sweep_epsilons == (1.0, 2.0)
    assert spec.site_options["alpha"] == 0.3
    assert spec.site_options["split_ratios"] == (0.6, 0.2, 0.2)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["-c", "seed=3"], "set per run by the comparison; use --seeds"),
        (["-c", "learnign-rate=0.1"], "unknown run setting 'learnign-rate'"),
        (["-c", "rounds"], "-c expects KEY=VALUE, got 'rounds'"),
        (["-c", "batch-size=0"], r"batch-size must lie in \[1, inf\); got 0"),
    ],
)
def test_cli_rejects_bad_overrides(tmp_path, argv, message):
    args = build_parser().parse_args(
        ["compare", "--data", str(tmp_path), "--out", str(tmp_path / "o"), *argv]
    )
    with pytest.raises(ValueError, match=message):
        build_spec(args)


def test_paper_preset_needs_data(tmp_path):
    args = build_parser().parse_args(["compare", "--preset", "paper", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="needs real data: pass --data DIR"):
        build_spec(args)


def test_presets_have_reference_values():
    assert get_preset("demo") is DEMO
    assert DEMO.methods == ("rs", "automatic")
    paper = RunConfig(**PAPER.config)
    assert (paper.encoder, paper.image_size, paper.num_sites) == ("resnet34", 256, 5)
    assert (paper.noise_multiplier, paper.max_grad_norm) == (1.0, 1.0)
    assert (paper.target_epsilon, paper.delta) == (8.0, 1e-5)
    with pytest.raises(ValueError, match="unknown preset 'big'; choose one of demo, paper"):
        get_preset("big")


def test_manifest_built_once_and_checked(tmp_path, rsna_sample):
    spec = _spec(tmp_path, data_dir=rsna_sample, setups=("iid", "label-skew"))
    builder = compare.ManifestBuilder()
    path = builder(spec, "iid", 0)
    assert path == spec.outputs / "manifests" / "iid-seed0.csv"
    manifest = pd.read_csv(path)
    assert sorted(manifest["site"].unique()) == [0, 1]
    assert len(manifest) == 16
    mtime = path.stat().st_mtime_ns
    assert builder(spec, "iid", 0) == path
    assert path.stat().st_mtime_ns == mtime
    changed = _spec(tmp_path, data_dir=rsna_sample, site_options={"min_site_size": 5})
    with pytest.raises(ValueError, match="other partition settings"):
        compare.ManifestBuilder()(changed, "iid", 0)


class _SchemaRunner:
    """Stands in for the Flower runner: writes a finished run folder as the server does."""

    def __init__(self, fail: set[str] = frozenset()):
        self.calls = []
        self.fail = fail

    def __call__(self, config, *, num_sites, timeout, on_line):
        from pathlib import Path

        folder = Path(config.output_dir)
        self.calls.append((folder.parent.name + "/" + folder.name, config.resume))
        if folder.name in self.fail:
            raise RuntimeError(f"Flower run in {folder} did not complete")
        from simulations.summary import parse_run_name

        setup, seed, eps = parse_run_name(folder.name)
        write_run(folder.parents[1], config.method, setup, seed, eps, sites=num_sites)
        write_json(folder / results.CONFIG_FILE, config.to_run_config())
        on_line("round 1/3: done")
        return folder


def _manifest_stub(spec, setup, seed):
    return spec.outputs / "manifests" / f"{setup}-seed{seed}.csv"


@pytest.mark.slow
def test_comparison_skips_finished_and_resumes(tmp_path, caplog):
    spec = _spec(tmp_path, seeds=(0, 1))
    runner = _SchemaRunner()
    written = compare.run_comparison(spec, prepare_manifest=_manifest_stub, runner=runner)
    assert [name for name, _ in runner.calls] == [
        "rs_training/iid-seed0", "automatic_clipping/iid-seed0",
        "rs_training/iid-seed1", "automatic_clipping/iid-seed1",
    ]
    assert {p.name for p in written} >= {"summary.csv", "summary.md", "accuracy_comparison.png"}
    # Interrupt the last run after a checkpoint: it resumes, the others are skipped.
    last = spec.outputs / "automatic_clipping" / "iid-seed1"
    write_json(last / results.STATUS_FILE, {"complete": False, "last_round": 1, "stop_reason": ""})
    (last / results.CHECKPOINT_FILE).write_bytes(b"checkpoint")
    runner.calls.clear()
    caplog.clear()
    with caplog.at_level("INFO", logger="simulations.compare"):
        compare.run_comparison(spec, prepare_manifest=_manifest_stub, runner=runner)
    assert runner.calls == [("automatic_clipping/iid-seed1", True)]
    assert caplog.text.count("finished earlier: skipped") == 3
    plan = json.loads((spec.outputs / "comparison" / "plan.json").read_text())
    assert [r["state"] for r in plan["runs"]] == ["complete"] * 4
    assert all(r["seconds"] is not None for r in plan["runs"])


def test_comparison_goes_on_after_failure(tmp_path):
    spec = _spec(tmp_path, seeds=(0, 1))
    runner = _SchemaRunner(fail={"iid-seed0"})
    with pytest.raises(RuntimeError, match="2 of 4 runs failed: rs_training/iid-seed0, "
                                           "automatic_clipping/iid-seed0"):
        compare.run_comparison(spec, prepare_manifest=_manifest_stub, runner=runner)
    assert len(runner.calls) == 4
    summary = pd.read_csv(spec.outputs / "comparison" / "summary.csv")
    assert summary["seeds"].tolist() == [1, 1]  # the report covers the finished seed 1
    plan = json.loads((spec.outputs / "comparison" / "plan.json").read_text())
    assert [r["state"] for r in plan["runs"]] == ["failed", "failed", "complete", "complete"]


def test_comparison_rejects_changed_settings(tmp_path):
    spec = _spec(tmp_path)
    compare.run_comparison(spec, prepare_manifest=_manifest_stub, runner=_SchemaRunner())
    changed = _spec(tmp_path, base=RunConfig(num_sites=2, batch_size=4, noise_multiplier=1.3))
    with pytest.raises(ValueError, match="batch-size: saved 2, requested 4"):
        compare.run_comparison(changed, prepare_manifest=_manifest_stub, runner=_SchemaRunner())


def dry_run_lines(tmp_path, capsys, *, saved_sites: int) -> list[str]:
    """Save a finished RS run made with ``saved_sites`` sites, then dry-run the demo on it."""
    from simulations.cli import main

    write_run(tmp_path / "out", "rs", sites=saved_sites)
    data = tmp_path / "data"
    data.mkdir()
    status = main(["compare", "--data", str(data), "--out", str(tmp_path / "out"), "--dry-run"])
    assert status == 0
    return capsys.readouterr().out.splitlines()


def test_dry_run_lists_actions(tmp_path, capsys):
    lines = dry_run_lines(tmp_path, capsys, saved_sites=3)
    assert lines[1].split() == ["skip", "rs_training/iid-seed0"]
    assert lines[2].split() == ["start", "automatic_clipping/iid-seed0"]


def test_dry_run_shows_rejected_runs(tmp_path, capsys):
    """A saved run with other settings is listed as the real command would treat it."""
    lines = dry_run_lines(tmp_path, capsys, saved_sites=2)
    assert lines[1].split() == ["reject", "rs_training/iid-seed0"]
    assert "made with other settings (num-sites: saved 2, requested 3)" in lines[2]
    assert lines[3].split() == ["start", "automatic_clipping/iid-seed0"]


def test_no_arguments_mean_demo(tmp_path, monkeypatch):
    monkeypatch.setenv("DPFEDSEG_STATE", str(tmp_path / "state"))
    spec = build_spec(build_parser().parse_args(["compare", "--dry-run"]))
    assert spec.methods == ("rs", "automatic")
    assert spec.setups == DEMO.setups
    assert spec.data_dir == DEMO.synthetic.folder()
    assert spec.data_dir.is_relative_to(tmp_path / "state")
    assert spec.base.num_sites == 3
    assert spec.match == "noise"


def test_synthetic_data_generated_once(tmp_path, monkeypatch, caplog):
    from simulations.presets import SyntheticData

    monkeypatch.setenv("DPFEDSEG_STATE", str(tmp_path))
    data = SyntheticData(images=4, image_size=32, seed=1)
    folder = data.ensure()
    labels = folder / "stage_2_train_labels.csv"
    assert len(list((folder / "stage_2_train_images").glob("*.dcm"))) == 4
    mtime = labels.stat().st_mtime_ns
    with caplog.at_level("INFO", logger="simulations.presets"):
        assert data.ensure() == folder
    assert labels.stat().st_mtime_ns == mtime
    assert "using cached synthetic data" in caplog.text


def test_synthetic_data_regenerated_when_incomplete(tmp_path, monkeypatch):
    from simulations.presets import SyntheticData

    monkeypatch.setenv("DPFEDSEG_STATE", str(tmp_path))
    data = SyntheticData(images=3, image_size=32, seed=2)
    data.folder().mkdir(parents=True)
    (data.folder() / "partial.tmp").write_text("interrupted")
    folder = data.ensure()
    assert not (folder / "partial.tmp").exists()
    assert len(list((folder / "stage_2_train_images").glob("*.dcm"))) == 3

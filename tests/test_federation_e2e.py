"""The federation through Flower's real simulation engine, on tiny synthetic images.

One 3-site job runs one round (aggregation checked against an independent weighted
average of each site's training, reproduced outside Flower), then resumes for a second
round (epsilon grows and equals each site's ledger and dp_accounting). A second job
has a broken site and is stopped after round 1, then resumed.
"""

from __future__ import annotations

import json

import dp_accounting
import numpy as np
import pandas as pd
import pytest
import torch

from common import federation as fed
from common.config import RunConfig
from common.privacy.sparse_upload import decode_update, round_mask, weight_shapes
from common.privacy.ledger import PrivacyLedger
from common.results import STATUS_FAILED, STATUS_OK

pytestmark = pytest.mark.slow

NUM_SITES = 3


@pytest.fixture(scope="module")
def synthetic_dataset(tmp_path_factory):
    from common.data import load_dataset, synthesize
    from common.sites import partition, write_manifest

    root = tmp_path_factory.mktemp("fed") / "data"
    synthesize(root, images=36, seed=3, image_size=64, positive_rate=0.5)
    frame = load_dataset(root).frame()
    part = partition(frame, setup="iid", num_sites=NUM_SITES, seed=0, min_site_size=4)
    manifest = root.parent / "manifest.csv"
    write_manifest(part, manifest)
    return root, manifest


def _config(tmp_path, data, manifest, **changes) -> RunConfig:
    base = RunConfig(
        method="rs",
        num_server_rounds=1,
        num_sites=NUM_SITES,
        encoder="resnet18",
        image_size=32,
        batch_size=2,
        learning_rate=0.1,
        accountant="pld",
        data_dir=str(data),
        manifest=str(manifest),
        output_dir=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache"),
        round_timeout=300,
    )
    return base.replace(**changes)


def _dp_accounting_epsilon(entries, delta: float) -> float:
    accountant = dp_accounting.pld.PLDAccountant()
    for entry in entries:
        event = dp_accounting.PoissonSampledDpEvent(
            entry.sample_rate, dp_accounting.GaussianDpEvent(entry.noise_multiplier)
        )
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, entry.steps))
    return accountant.get_epsilon(delta)


def test_two_rounds_aggregate_and_account(tmp_path, synthetic_dataset):
    from client.site import train_round
    from server.aggregate import weighted_average
    from server.app import initial_weights
    from simulations.flower_run import run_federated

    data, manifest = synthetic_dataset
    config = _config(tmp_path, data, manifest)
    run_dir = run_federated(config, num_sites=NUM_SITES)

    # Round 1: FedAvg of the three sites' own training, reproduced here without Flower.
    torch.set_num_threads(1)
    start = initial_weights(config)
    replay = config.replace(site_dir=str(tmp_path / "replay-sites"), cache_dir=config.cache_dir)
    replies = [
        train_round(replay, {"partition-id": site}, start, server_round=1) for site in range(NUM_SITES)
    ]
    site_weights = []
    for site, reply in enumerate(replies):
        if reply.info[fed.INFO_UPLOAD] == fed.UPLOAD_SPARSE:
            mask = round_mask(config, weight_shapes(start), server_round=1, site=site)
            site_weights.append(decode_update(start, reply.weights[fed.SPARSE_VALUES], mask))
        else:
            site_weights.append(reply.weights)
    assert [r.info[fed.INFO_UPLOAD] for r in replies] == [fed.UPLOAD_SPARSE] * NUM_SITES
    expected = weighted_average(site_weights, [r.metrics["num-examples"] for r in replies])
    final = torch.load(run_dir / "final_model.pt", weights_only=True)
    assert sorted(final) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(final[key].numpy(), value, atol=2e-5, err_msg=key)

    # Round 2, resumed from the round-1 checkpoint.
    run_federated(config.replace(num_server_rounds=2, resume=True), num_sites=NUM_SITES)
    rows = pd.read_csv(run_dir / "rounds.csv")
    assert len(rows) == 2 * NUM_SITES
    assert set(rows["status"]) == {STATUS_OK}
    for site in range(NUM_SITES):
        site_rows = rows[rows["site"] == site].sort_values("server_round")
        first, second = site_rows["epsilon"].tolist()
        assert second > first
        ledger = PrivacyLedger(run_dir / "sites" / f"site-{site}" / "privacy_ledger.json", delta=1e-5)
        assert [e.server_round for e in ledger.entries] == [1, 2]
        assert second == pytest.approx(ledger.epsilon("pld"), rel=1e-9)
        assert second == pytest.approx(_dp_accounting_epsilon(ledger.entries, 1e-5), rel=1e-3)
        assert site_rows["epsilon_server"].tolist() == pytest.approx(site_rows["epsilon"].tolist(), rel=1e-9)
        server_ledger = json.loads((run_dir / "ledgers" / f"site-{site}.json").read_text())
        assert len(server_ledger["entries"]) == 2
    status = json.loads((run_dir / "status.json").read_text())
    assert status == {"complete": True, "last_round": 2, "stop_reason": "all rounds done"}


def test_broken_site_and_stopped_server(tmp_path, synthetic_dataset):
    from simulations.flower_run import run_federated

    data, manifest = synthetic_dataset
    broken = pd.read_csv(manifest)
    broken.loc[(broken["site"] == 2) & (broken["split"] == "train"), "split"] = "val"
    broken_manifest = tmp_path / "broken.csv"
    broken.to_csv(broken_manifest, index=False)
    # A loose budget: this test is about faults and resuming, not budget enforcement.
    config = _config(
        tmp_path, data, broken_manifest, num_server_rounds=3, accountant="rdp", target_epsilon=50.0
    )

    class StopAfterRoundOne(Exception):
        pass

    def stop_after_round_one(line: str) -> None:
        if "round 1/3:" in line:
            raise StopAfterRoundOne

    with pytest.raises(StopAfterRoundOne):
        run_federated(config, num_sites=NUM_SITES, on_line=stop_after_round_one)
    # `flwr stop` alone left the ServerApp training on in the background.
    from simulations.flower_processes import project_processes

    assert not list(project_processes("flwr-simulation"))
    run_dir = tmp_path / "run"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["complete"] is False
    assert status["last_round"] == 1

    run_federated(config.replace(resume=True), num_sites=NUM_SITES)
    rows = pd.read_csv(run_dir / "rounds.csv", keep_default_na=False)
    assert sorted(rows["server_round"].unique().tolist()) == [1, 2, 3]
    failed = rows[rows["status"] == STATUS_FAILED]
    assert len(failed) == 3
    assert all("site 2 has no training images" in reason for reason in failed["reason"])
    assert (rows[rows["site"] != 2]["status"] == STATUS_OK).all()
    for site in (0, 1):
        ledger = PrivacyLedger(run_dir / "sites" / f"site-{site}" / "privacy_ledger.json", delta=1e-5)
        # Round 2 may have started before the stop reached the SuperLink. A site that
        # trained in it keeps that entry, so its epsilon is never under-reported.
        assert [e.server_round for e in ledger.entries] in ([1, 2, 3], [1, 2, 2, 3])
        assert ledger.epsilon() <= config.target_epsilon
        last = rows[(rows["site"] == site) & (rows["server_round"] == 3)].iloc[0]
        assert float(last["epsilon"]) == pytest.approx(ledger.epsilon(), rel=1e-9)
        assert float(last["epsilon_server"]) == pytest.approx(ledger.epsilon(), rel=1e-9)


def test_run_stops_when_every_site_fails(tmp_path, synthetic_dataset):
    """A round with no site trained ends the run unfinished, with the sites' reasons."""
    from simulations.flower_run import run_federated

    data, manifest = synthetic_dataset
    broken = pd.read_csv(manifest)
    broken.loc[broken["split"] == "train", "split"] = "val"
    broken_manifest = tmp_path / "no-train.csv"
    broken.to_csv(broken_manifest, index=False)
    config = _config(tmp_path, data, broken_manifest, num_server_rounds=2)

    with pytest.raises(RuntimeError, match="did not complete") as raised:
        run_federated(config, num_sites=NUM_SITES)
    assert "every sampled site failed in round 1" in str(raised.value)
    assert "has no training images" in str(raised.value)
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status == {
        "complete": False, "last_round": 0, "stop_reason": "every sampled site failed in round 1",
    }

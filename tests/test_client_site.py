"""A site's round without Flower: reply content, sparse RS uploads, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common import federation as fed
from common.config import RunConfig
from common.privacy.ledger import PrivacyLedger
from common.privacy.sparse_upload import decode_update, encode_update, mask_digest, round_mask, weight_shapes

ALLOWED_METRICS = {
    fed.SITE, fed.NUM_EXAMPLES, "epsilon", "delta", "noise_multiplier", "sample_rate",
    fed.LEDGER_NOISE, fed.LEDGER_RATE, fed.LEDGER_STEPS, fed.LEDGER_ROUND, *fed.TRAIN_METRIC_KEYS,
}
ALLOWED_INFO = {fed.INFO_STATUS, fed.INFO_REASON, fed.INFO_ACCOUNTANT, fed.INFO_METHOD, fed.INFO_UPLOAD}


@pytest.fixture(scope="module")
def site_data(tmp_path_factory):
    from common.data import load_dataset, synthesize
    from common.sites import partition, write_manifest

    root = tmp_path_factory.mktemp("site") / "data"
    synthesize(root, images=16, seed=5, image_size=64, positive_rate=0.5)
    part = partition(load_dataset(root).frame(), setup="iid", num_sites=2, seed=0, min_site_size=4)
    manifest = root.parent / "manifest.csv"
    write_manifest(part, manifest)
    return root, manifest


def _config(tmp_path, site_data, **changes) -> RunConfig:
    root, manifest = site_data
    return RunConfig(
        method="rs", num_server_rounds=2, encoder="resnet18", image_size=32, batch_size=2,
        data_dir=str(root), manifest=str(manifest), output_dir=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache"),
    ).replace(**changes)


def _initial(config: RunConfig) -> dict[str, np.ndarray]:
    from common.model import build_unet, plain_state_dict

    torch.manual_seed(0)
    model = build_unet(encoder=config.encoder, group_norm_groups=config.group_norm_groups)
    return {k: v.numpy() for k, v in plain_state_dict(model).items()}


def test_reply_holds_weights_and_metrics_only(tmp_path, site_data):
    from client.site import train_round

    config = _config(tmp_path, site_data, method="automatic")
    start = _initial(config)
    reply = train_round(config, {"partition-id": 1}, start, server_round=1)

    assert list(reply.weights) == list(start)
    for key, value in reply.weights.items():
        assert value.shape == start[key].shape
    assert set(reply.metrics) <= ALLOWED_METRICS
    assert set(reply.info) <= ALLOWED_INFO
    for key, value in reply.metrics.items():
        if isinstance(value, list):
            assert len(value) == 1, key  # one ledger entry: one round
        else:
            assert np.isscalar(value), key
    assert reply.metrics[fed.SITE] == 1
    assert reply.info[fed.INFO_STATUS] == "ok"
    assert reply.info[fed.INFO_UPLOAD] == fed.UPLOAD_DENSE
    total = sum(v.nbytes for v in start.values())
    assert reply.metrics["upload_bytes"] == total
    assert "train_loss" not in reply.metrics  # not differentially private


def test_rerun_on_same_site_folder_draws_new_noise(tmp_path, site_data):
    """A rerun composed in the same ledger must not reuse the noise; a fresh folder reproduces."""
    from client.site import train_round

    config = _config(tmp_path, site_data, method="automatic")
    start = _initial(config)
    first = train_round(config, {"partition-id": 1}, start, server_round=1)
    again = train_round(config, {"partition-id": 1}, start, server_round=1)
    fresh_config = config.replace(output_dir=str(tmp_path / "fresh"))
    fresh = train_round(fresh_config, {"partition-id": 1}, start, server_round=1)

    assert len(again.metrics[fed.LEDGER_STEPS]) == 2  # composed with the first run
    for key in start:
        np.testing.assert_array_equal(fresh.weights[key], first.weights[key])
    differing = [key for key in start if not np.array_equal(again.weights[key], first.weights[key])]
    assert len(differing) == len(start)


def test_round_waits_for_other_process(tmp_path, site_data, caplog):
    """A round started while another process trains the site reads the ledger after that round."""
    import subprocess
    import sys

    from client.site import resolve_site, train_round
    from common.privacy.accounting import calibrate_noise_multiplier
    from common.privacy.ledger import LedgerEntry

    config = _config(tmp_path, site_data, method="automatic", calibrate_noise=True, target_epsilon=5.0,
                     num_server_rounds=1)
    site_dir = resolve_site(config, {"partition-id": 1}).site_dir
    other = LedgerEntry(noise_multiplier=1.5, sample_rate=0.5, steps=4, server_round=1, method="automatic")
    # The other process holds the site's round lock, then records its round and exits.
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from common.privacy.ledger import LedgerEntry, PrivacyLedger, site_round_lock\n"
        "folder = Path(sys.argv[1])\n"
        "with site_round_lock(folder):\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(3)\n"
        "    ledger = PrivacyLedger(folder / 'privacy_ledger.json', delta=1e-5, target_epsilon=5.0)\n"
        f"    ledger.record([LedgerEntry.from_dict({other.to_dict()!r})])\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(site_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        reply = train_round(config, {"partition-id": 1}, _initial(config), server_round=1)
    finally:
        child.wait(timeout=60)
    assert child.returncode == 0
    assert "is in use by another process; waiting" in caplog.text
    assert reply.metrics[fed.LEDGER_STEPS][0] == other.steps  # the other round comes first
    assert len(reply.metrics[fed.LEDGER_STEPS]) == 2
    expected = calibrate_noise_multiplier(
        target_epsilon=5.0, delta=1e-5, sample_rate=reply.metrics["sample_rate"],
        steps=reply.metrics["steps"], prior=[other],
    )
    assert reply.metrics["noise_multiplier"] == pytest.approx(expected)
    assert reply.metrics["epsilon"] <= 5.0


def test_only_nonprivate_reply_sends_train_loss(tmp_path, site_data):
    from client.site import train_round

    config = _config(tmp_path, site_data, method="none")
    reply = train_round(config, {"partition-id": 0}, _initial(config), server_round=1)
    assert reply.info[fed.INFO_STATUS] == "ok"
    assert np.isfinite(reply.metrics["train_loss"])
    assert reply.metrics["train_loss"] > 0


def test_rs_round_uploads_kept_values_only(tmp_path, site_data):
    from client.site import train_round

    config = _config(tmp_path, site_data, method="rs", rs_final_rate=0.9)
    start = _initial(config)
    # Round 2 of 2 is the last RS window: rate 0.9.
    reply = train_round(config, {"partition-id": 0}, start, server_round=2)
    assert reply.info[fed.INFO_UPLOAD] == fed.UPLOAD_SPARSE
    values = reply.weights[fed.SPARSE_VALUES]
    mask = round_mask(config, weight_shapes(start), server_round=2, site=0)
    d = sum(v.size for v in start.values())
    assert mask.num_zeroed == int(0.9 * d)
    assert values.shape == (d - int(0.9 * d),)
    digest = reply.weights[fed.SPARSE_MASK_DIGEST]
    assert digest.dtype == np.uint8
    assert reply.metrics["upload_bytes"] == values.nbytes + 16
    rebuilt = decode_update(start, values, mask, digest=digest)
    changed = sum(int(np.count_nonzero(rebuilt[k] != start[k])) for k in start)
    assert 0 < changed <= mask.num_kept


def test_sparse_codec_round_trips_and_rejects_dense_updates():
    old = {"a": np.zeros((3, 4), np.float32), "b": np.ones(5, np.float32)}
    config = RunConfig(method="rs", num_server_rounds=1, rs_final_rate=0.5)
    mask = round_mask(config, weight_shapes(old), server_round=1, site=0)
    assert mask.num_zeroed == 8  # floor(0.5 * 17)
    new = {k: v.copy() for k, v in old.items()}
    for (key, value), kept in zip(new.items(), mask.kept):
        value[kept.numpy()] += 0.25
    values = encode_update(old, new, mask)
    assert values.shape == (9,)
    rebuilt = decode_update(old, values, mask)
    for key in old:
        np.testing.assert_array_equal(rebuilt[key], new[key])
    new["a"][~mask.kept[0].numpy()] = 1.0  # a change on a masked coordinate
    assert encode_update(old, new, mask) is None
    with pytest.raises(ValueError, match="keeps 9 coordinates"):
        decode_update(old, values[:-1], mask)


def test_sparse_upload_rejects_other_mask():
    """A mask with as many kept coordinates but other ones would misplace every value."""
    old = {"a": np.zeros((3, 4), np.float32), "b": np.ones(5, np.float32)}
    config = RunConfig(method="rs", num_server_rounds=1, rs_final_rate=0.5)
    site_mask = round_mask(config, weight_shapes(old), server_round=1, site=0)
    other = round_mask(config, weight_shapes(old), server_round=1, site=1)
    assert other.num_kept == site_mask.num_kept
    assert not all(torch.equal(a, b) for a, b in zip(site_mask.kept, other.kept))
    values = np.arange(site_mask.num_kept, dtype=np.float32)
    digest = mask_digest(site_mask)
    assert digest.shape == (16,)
    decode_update(old, values, site_mask, digest=digest)
    with pytest.raises(ValueError, match="the site's RS mask differs from the one the server rebuilt"):
        decode_update(old, values, other, digest=digest)


def test_site_refuses_round_past_budget(tmp_path, site_data):
    from client.site import resolve_site, train_round

    config = _config(tmp_path, site_data, method="flat", target_epsilon=0.5)
    start = _initial(config)
    reply = train_round(config, {"partition-id": 0}, start, server_round=1)
    assert reply.weights is None
    assert reply.info[fed.INFO_STATUS] == "refused"
    assert "0.5" in reply.info[fed.INFO_REASON]
    ledger = PrivacyLedger(resolve_site(config, {"partition-id": 0}).ledger_path, delta=config.delta)
    assert ledger.entries == ()


def test_site_keeps_its_budget_accountant(tmp_path, site_data):
    """A later run on the site folder cannot check the same target under another accountant."""
    from client.site import train_round

    config = _config(tmp_path, site_data, method="flat")
    start = _initial(config)
    assert train_round(config, {"partition-id": 0}, start, server_round=1).info[fed.INFO_STATUS] == "ok"
    with pytest.raises(ValueError, match="under the rdp accountant, but the pld accountant was requested"):
        train_round(config.replace(accountant="pld"), {"partition-id": 0}, start, server_round=2)


def test_each_message_model_is_a_fresh_copy(tmp_path, site_data):
    """Messages start from copies of one checked U-Net, each loaded with the given weights."""
    from client.site import _model_with, _unet_template

    config = _config(tmp_path, site_data)
    start = _initial(config)
    first = _model_with(config, start)
    with torch.no_grad():
        for param in first.parameters():
            param.add_(1.0)  # training one message's model
    second = _model_with(config, start)
    template = _unet_template(config.encoder, config.group_norm_groups)

    for name, value in second.state_dict().items():
        assert torch.equal(value, torch.from_numpy(start[name]))
    shared = {p.data_ptr() for p in template.parameters()}
    assert not shared & {p.data_ptr() for p in first.parameters()}
    assert not shared & {p.data_ptr() for p in second.parameters()}
    assert _unet_template(config.encoder, config.group_norm_groups) is template

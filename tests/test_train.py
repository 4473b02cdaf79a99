"""Local training of a site: budget rejection, ledger entries, RS schedule, evaluation."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import TensorDataset

from client.evaluate import evaluate_model
from client.train import plan_round, train_site
from common.config import RunConfig
from common.model import build_unet
from common.privacy.accounting import calibrate_noise_multiplier, compute_epsilon
from common.privacy.ledger import PrivacyLedger
from common.privacy.sparsify import num_zeroed

SIZE = 16


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_unet(encoder="resnet18", encoder_depth=2, decoder_channels=(8, 8))


def dataset(n: int = 12) -> TensorDataset:
    generator = torch.Generator().manual_seed(n)
    images = torch.rand(n, 1, SIZE, SIZE, generator=generator)
    masks = (torch.rand(n, 1, SIZE, SIZE, generator=generator) > 0.8).float()
    masks[: n // 3] = 0
    return TensorDataset(images, masks)


def config(**changes) -> RunConfig:
    base = dict(method="flat", batch_size=4, local_epochs=1, num_server_rounds=2, image_size=32,
                noise_multiplier=1.0, learning_rate=0.01)
    base.update(changes)
    return RunConfig(**base)


def weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_plan_round_rules():
    plan = plan_round(config(batch_size=4, local_epochs=3, num_server_rounds=5), 10)
    assert plan.sample_rate == 0.4
    assert plan.steps_per_epoch == round(1 / 0.4) == 2
    assert plan.steps == 6
    assert plan.total_steps == 30
    assert plan.expected_batch_size == pytest.approx(4.0)
    capped = plan_round(config(batch_size=8), 5)
    assert (capped.sample_rate, capped.steps_per_epoch, capped.expected_batch_size) == (1.0, 1, 5.0)
    with pytest.raises(ValueError, match="at least one training image, got 0"):
        plan_round(config(), 0)


def test_round_over_budget_is_rejected_untouched():
    model = tiny_model()
    before = weights(model)
    ledger = PrivacyLedger(None, delta=1e-5, target_epsilon=0.5)
    result = train_site(model, dataset(), config(), ledger=ledger, server_round=1, site=0, generator_seed=0)
    assert result.refused is not None and "above the target epsilon 0.5" in result.refused
    assert result.steps == 0
    assert result.entries == []
    assert ledger.entries == ()
    assert result.strategy == ""  # a rejected round does not time strategies
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model)))


def test_round_records_entries_after_training():
    model = tiny_model()
    before = weights(model)
    ledger = PrivacyLedger(None, delta=1e-5, target_epsilon=100.0)
    cfg = config(local_epochs=2)
    result = train_site(model, dataset(), cfg, ledger=ledger, server_round=1, site=0, generator_seed=0)
    assert result.refused is None
    assert result.steps == 2 * 3
    assert [(e.noise_multiplier, e.sample_rate, e.steps, e.server_round, e.method) for e in ledger.entries] == [
        (1.0, pytest.approx(1 / 3), 6, 1, "flat")
    ]
    assert result.entries == list(ledger.entries)
    assert result.epsilon == pytest.approx(compute_epsilon(ledger.entries, delta=1e-5))
    assert not all(torch.equal(a, b) for a, b in zip(before, weights(model)))
    assert result.upload_coordinates == result.num_coordinates == sum(p.numel() for p in model.parameters())
    assert math.isfinite(result.train_loss)
    assert result.strategy == "ghost"  # the CPU's measured default, taken without timing


def test_calibrated_sigma_uses_all_planned_steps():
    ledger = PrivacyLedger(None, delta=1e-5, target_epsilon=5.0)
    cfg = config(calibrate_noise=True, target_epsilon=5.0, num_server_rounds=3, local_epochs=2)
    result = train_site(tiny_model(), dataset(), cfg, ledger=ledger, server_round=1, site=0, generator_seed=0)
    expected = calibrate_noise_multiplier(
        target_epsilon=5.0, delta=1e-5, sample_rate=1 / 3, steps=3 * 2 * 3, accountant="rdp"
    )
    assert result.noise_multiplier == pytest.approx(expected)
    assert result.epsilon < 5.0


def test_calibration_spends_ledger_remainder():
    """Each round calibrates to the ledger's remaining budget: a used site folder trains, and the run ends at the target."""
    target, rounds = 5.0, 3
    ledger = PrivacyLedger(None, delta=1e-5, target_epsilon=target)
    earlier = config(noise_multiplier=2.0, num_server_rounds=1, local_epochs=2)
    train_site(tiny_model(), dataset(), earlier, ledger=ledger, server_round=1, site=0, generator_seed=0)
    spent = ledger.epsilon()
    cfg = config(calibrate_noise=True, target_epsilon=target, num_server_rounds=rounds, local_epochs=2)
    sigmas = []
    for server_round in range(1, rounds + 1):
        prior = ledger.entries
        result = train_site(tiny_model(), dataset(), cfg, ledger=ledger, server_round=server_round, site=0,
                            generator_seed=server_round)
        expected = calibrate_noise_multiplier(
            target_epsilon=target, delta=1e-5, sample_rate=1 / 3, steps=(rounds - server_round + 1) * 2 * 3,
            accountant="rdp", prior=prior,
        )
        assert result.refused is None
        assert result.noise_multiplier == pytest.approx(expected)
        sigmas.append(result.noise_multiplier)
    fresh = calibrate_noise_multiplier(target_epsilon=target, delta=1e-5, sample_rate=1 / 3, steps=rounds * 2 * 3)
    assert sigmas[0] > fresh  # the earlier run's spending leaves less for this one
    final = compute_epsilon(ledger.entries, delta=1e-5, accountant="rdp")
    assert final <= target
    assert final > 0.97 * target  # calibration at 1% in sigma leaves little unused
    assert spent < final


def test_calibration_rejects_spent_ledger():
    ledger = PrivacyLedger(None, delta=1e-5, target_epsilon=100.0)
    train_site(tiny_model(), dataset(), config(noise_multiplier=0.3, local_epochs=3), ledger=ledger,
               server_round=1, site=0, generator_seed=0)
    spent = ledger.epsilon()
    model = tiny_model()
    before = weights(model)
    cfg = config(calibrate_noise=True, target_epsilon=spent * 0.999)
    result = train_site(model, dataset(), cfg, ledger=ledger, server_round=1, site=0, generator_seed=0)
    assert result.refused.startswith("no noise multiplier fits the rest of the budget")
    assert "the prior entries alone spend" in result.refused
    assert result.steps == 0
    assert result.entries == []
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model)))
    assert ledger.epsilon() == spent


def test_calibration_settings_error_with_prior():
    """A target that bounds nothing is a settings error, also on a ledger with entries."""
    ledger = PrivacyLedger(None, delta=1e-5, target_epsilon=1e4)
    train_site(tiny_model(), dataset(), config(), ledger=ledger, server_round=1, site=0, generator_seed=0)
    cfg = config(calibrate_noise=True, target_epsilon=1e4)
    with pytest.raises(ValueError, match="bounds nothing useful"):
        train_site(tiny_model(), dataset(), cfg, ledger=ledger, server_round=2, site=0, generator_seed=0)


def test_adaptive_calibration_rejects_spent_ledger():
    """Calibrated to what a spent ledger leaves, sigma passes 2 x count noise: a rejection, not an error."""
    ledger = PrivacyLedger(None, delta=1e-5, target_epsilon=4.0)
    train_site(tiny_model(), dataset(), config(noise_multiplier=1.2), ledger=ledger, server_round=1, site=0,
               generator_seed=0)
    cfg = config(method="adaptive", calibrate_noise=True, target_epsilon=4.0, adaptive_count_noise=1.5)
    fresh = calibrate_noise_multiplier(target_epsilon=4.0, delta=1e-5, sample_rate=1 / 3, steps=2 * 3)
    remainder = calibrate_noise_multiplier(
        target_epsilon=4.0, delta=1e-5, sample_rate=1 / 3, steps=3, prior=ledger.entries
    )
    assert fresh < 2 * 1.5 <= remainder  # the settings alone fit; the ledger's remainder does not
    model = tiny_model()
    before = weights(model)
    result = train_site(model, dataset(), cfg, ledger=ledger, server_round=2, site=0, generator_seed=0)
    assert result.refused.startswith("no noise multiplier fits the rest of the budget")
    assert "noise_multiplier < 2 * adaptive-count-noise" in result.refused
    assert result.entries == []
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model)))


@pytest.mark.parametrize("server_round", [1, 2])
def test_rs_round_follows_ramp_and_sparse_upload(server_round):
    model = tiny_model()
    ledger = PrivacyLedger(None, delta=1e-5, target_epsilon=100.0)
    cfg = config(method="rs", rs_final_rate=0.9, rs_refresh="round", momentum=0.0)
    result = train_site(model, dataset(), cfg, ledger=ledger, server_round=server_round, site=1, generator_seed=0)
    d = result.num_coordinates
    if server_round == 1:
        assert result.rs_rate == 0.0  # first of two windows is dense
        assert result.upload_coordinates == d
    else:
        assert result.rs_rate == 0.9
        assert result.upload_coordinates == d - num_zeroed(0.9, d)


def test_single_window_uses_final_rate():
    ledger = PrivacyLedger(None, delta=1e-5, target_epsilon=100.0)
    cfg = config(method="rs-automatic", num_server_rounds=1, rs_final_rate=0.5)
    result = train_site(tiny_model(), dataset(), cfg, ledger=ledger, server_round=1, site=0, generator_seed=0)
    assert result.rs_rate == 0.5


@pytest.mark.slow
def test_empty_batches_still_count_as_steps():
    # q = 1/20: each step is empty with probability (19/20)^20 ~ 0.36.
    ledger = PrivacyLedger(None, delta=1e-5, target_epsilon=100.0)
    cfg = config(batch_size=1, num_server_rounds=1, noise_multiplier=2.0)
    result = train_site(tiny_model(), dataset(20), cfg, ledger=ledger, server_round=1, site=0, generator_seed=3)
    assert result.steps == 20
    assert ledger.entries[0].steps == 20


def test_adaptive_reports_its_bound_and_checks_noise():
    ledger = PrivacyLedger(None, delta=1e-5, target_epsilon=100.0)
    cfg = config(method="adaptive", adaptive_count_noise=10.0)
    result = train_site(tiny_model(), dataset(), cfg, ledger=ledger, server_round=1, site=0, generator_seed=0)
    assert result.max_grad_norm != cfg.max_grad_norm
    bad = config(method="adaptive", noise_multiplier=3.0, adaptive_count_noise=1.0)
    with pytest.raises(ValueError, match="noise_multiplier < 2 \\* adaptive-count-noise"):
        train_site(tiny_model(), dataset(), bad, ledger=PrivacyLedger(None, delta=1e-5),
                   server_round=1, site=0)


def test_adaptive_warns_when_count_noise_dominates(caplog):
    """At an expected batch of 1 the count noise moves the clip bound by e^2 per step."""
    for batch_size, warned in ((4, False), (1, True)):
        caplog.clear()
        ledger = PrivacyLedger(None, delta=1e-5, target_epsilon=100.0)
        cfg = config(method="adaptive", batch_size=batch_size, adaptive_count_noise=10.0)
        train_site(tiny_model(), dataset(), cfg, ledger=ledger, server_round=1, site=0, generator_seed=0)
        assert ("the count noise alone moves the clip bound" in caplog.text) == warned
    assert "at expected batch 1.00 with adaptive-count-noise 10" in caplog.text
    assert "by a factor of about 7.4 per step" in caplog.text


def test_private_method_needs_ledger():
    with pytest.raises(ValueError, match="needs the site's PrivacyLedger"):
        train_site(tiny_model(), dataset(), config(), ledger=None, server_round=1, site=0)


def test_non_private_round_has_no_privacy():
    model = tiny_model()
    result = train_site(model, dataset(), config(method="none"), ledger=None, server_round=1, site=0)
    assert result.entries == []
    assert result.epsilon == math.inf
    assert result.noise_multiplier == 0.0
    assert result.steps == 3
    assert result.strategy == ""


class ConstantLogits(torch.nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = value
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return torch.full_like(x, self.value) * self.scale


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_evaluate_empty_predictor_and_restores_mode(mode):
    data = dataset(12)  # 4 negative images, 8 positive
    model = ConstantLogits(-10.0)
    model.train(mode == "train")
    scores = evaluate_model(model, data, batch_size=5)
    assert model.training == (mode == "train")
    assert scores["num_examples"] == 12
    assert scores["num_positive"] == 8
    assert scores["dice"] == pytest.approx(4 / 12)
    assert scores["dice_positive"] == 0.0
    assert scores["fpr"] == 0.0
    everywhere = evaluate_model(ConstantLogits(10.0), data)
    assert everywhere["fpr"] == 1.0

"""Choosing the per-sample strategy by timing: candidates, exclusions, cache, defaults.

These run the GPU's timing path on the CPU (``measure=True``) with a tiny model.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch
from torch import nn

from common.metrics import dice_bce_loss
from common.privacy import choose
from common.privacy.choose import choose_strategy, time_strategies
from common.privacy.per_sample import STRATEGIES


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1)
    )


def transposed_net() -> nn.Module:
    """A model with a layer the book-keeping strategy does not support."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.ConvTranspose2d(4, 1, 2, stride=2))


@pytest.fixture(autouse=True)
def fresh_cache():
    choose._CHOSEN.clear()
    yield
    choose._CHOSEN.clear()


def test_every_strategy_timed():
    timings = time_strategies(tiny_net(), dice_bce_loss, device="cpu", batch_size=3, input_shape=(1, 8, 8))
    assert sorted(timings) == sorted(STRATEGIES)
    assert all(0 < seconds < 60 for seconds in timings.values())


def test_timing_leaves_model_untouched():
    model = tiny_net()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    time_strategies(model, dice_bce_loss, device="cpu", batch_size=3, input_shape=(1, 8, 8), mask_rate=0.5)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name])
        assert param.grad is None
    assert not model._forward_hooks and not any(m._forward_hooks for m in model.modules())


def test_unsupported_strategy_left_out(caplog):
    with caplog.at_level(logging.INFO, logger="common.privacy.choose"):
        timings = time_strategies(
            transposed_net(), dice_bce_loss, device="cpu", batch_size=2, input_shape=(1, 8, 8)
        )
    assert "ghost" not in timings
    assert "loop" in timings
    assert re.search(r"strategy ghost left out on cpu: .*ConvTranspose2d", caplog.text)


def test_no_runnable_strategy_raises():
    with pytest.raises(RuntimeError, match="no per-sample strategy of ghost runs this model on cpu"):
        time_strategies(
            transposed_net(), dice_bce_loss, device="cpu", batch_size=2, input_shape=(1, 8, 8),
            candidates=["ghost"],
        )


def test_choice_is_fastest_and_cached(caplog):
    model = tiny_net()
    with caplog.at_level(logging.INFO, logger="common.privacy.choose"):
        chosen = choose_strategy(
            model, dice_bce_loss, device="cpu", batch_size=3, input_shape=(1, 8, 8), mask_rate=0.9,
            measure=True,
        )
    logged = re.search(r"per-sample strategy on cpu: (\w+) \(seconds per step: (.*)\)", caplog.text)
    timings = {name: float(seconds) for name, seconds in (part.split() for part in logged.group(2).split(", "))}
    assert logged.group(1) == chosen
    assert timings[chosen] == min(timings.values())
    assert sorted(timings) == sorted(STRATEGIES)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="common.privacy.choose"):
        again = choose_strategy(
            model, dice_bce_loss, device="cpu", batch_size=3, input_shape=(1, 8, 8), mask_rate=0.9,
            measure=True,
        )
        assert again == chosen
        assert "seconds per step" not in caplog.text
        choose_strategy(
            model, dice_bce_loss, device="cpu", batch_size=4, input_shape=(1, 8, 8), mask_rate=0.9,
            measure=True,
        )
    assert caplog.text.count("seconds per step") == 1


@pytest.mark.parametrize(
    "device, mask_rate, expected",
    [("cpu", None, "ghost"), ("cpu", 0.9, "ghost"), ("cuda", None, "ghost"), ("cuda", 0.9, "opacus")],
)
def test_untimed_choice_is_default(device, mask_rate, expected):
    """Without timing no tensor moves, so this holds on a machine without a GPU."""
    chosen = choose_strategy(
        tiny_net(), dice_bce_loss, device=device, batch_size=3, input_shape=(1, 8, 8),
        mask_rate=mask_rate, measure=False,
    )
    assert chosen == expected


def test_cpu_takes_default_without_timing(caplog):
    with caplog.at_level(logging.INFO, logger="common.privacy.choose"):
        chosen = choose_strategy(tiny_net(), dice_bce_loss, device="cpu", batch_size=3, input_shape=(1, 8, 8))
    assert chosen == "ghost"
    assert "seconds per step" not in caplog.text

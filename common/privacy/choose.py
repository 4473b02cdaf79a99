"""Choosing the per-sample gradient strategy for a device by timing the candidates.

The fastest strategy depends on the device as well as the model: on the CPU the
book-keeping strategy (``ghost``) wins for every method, as measured in BENCHMARKS.md,
while a GPU favours batched kernels, which may make Opacus's hooks faster there. On a
GPU, :func:`choose_strategy` therefore times each candidate on the model itself, at the
round's expected batch size and image size, and keeps the fastest for the process.

Timing uses a copy of the model and random images and targets, never a site's data, so
the choice reveals nothing about the data. All strategies compute the same clipped sum
(see :mod:`common.privacy.per_sample`), so the choice changes speed and memory only.

NOTE: the timing has run only on the CPU. The book-keeping kernels' CUDA paths
(grouped and sampled sparse products, GroupNorm statistics read back from autograd)
have not run on a GPU, and their exactness tests run on the CPU.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from typing import Sequence

import torch
from torch import Tensor, nn

from common.privacy.per_sample import STRATEGIES, LossFn, default_strategy, make_strategy
from common.privacy.sparsify import SparsityMask, draw_mask

logger = logging.getLogger(__name__)

_CHOSEN: dict[tuple, str] = {}


def choose_strategy(
    model: nn.Module,
    loss_fn: LossFn,
    *,
    device: torch.device | str,
    batch_size: int,
    input_shape: Sequence[int],
    mask_rate: float | None = None,
    measure: bool | None = None,
) -> str:
    """Return the per-sample strategy for ``model`` on ``device``.

    Args:
        batch_size: the batch size to time at (the round's expected batch size).
        input_shape: one image's shape, ``(channels, height, width)``.
        mask_rate: the RS rate to time at (RS methods), or None for dense methods.
        measure: time the candidates (the default on a GPU) or take
            :func:`common.privacy.per_sample.default_strategy` (the default on the CPU,
            whose choice comes from the benchmark).

    The choice is kept for the rest of the process, keyed by device, parameter shapes,
    batch size, input shape and mask rate, so timing runs once per configuration.
    """
    device = torch.device(device)
    if measure is None:
        measure = device.type == "cuda"
    if not measure:
        return default_strategy(device, sparsify=mask_rate is not None)
    key = (
        str(device), tuple(tuple(p.shape) for p in model.parameters() if p.requires_grad),
        int(batch_size), tuple(input_shape), mask_rate,
    )
    if key not in _CHOSEN:
        timings = time_strategies(
            model, loss_fn, device=device, batch_size=batch_size, input_shape=input_shape,
            mask_rate=mask_rate,
        )
        chosen = min(timings, key=timings.get)
        logger.info(
            "per-sample strategy on %s: %s (seconds per step: %s)", device, chosen,
            ", ".join(f"{name} {seconds:.3f}" for name, seconds in sorted(timings.items(), key=lambda kv: kv[1])),
        )
        _CHOSEN[key] = chosen
    return _CHOSEN[key]


def time_strategies(
    model: nn.Module,
    loss_fn: LossFn,
    *,
    device: torch.device | str,
    batch_size: int,
    input_shape: Sequence[int],
    mask_rate: float | None = None,
    candidates: Sequence[str] = STRATEGIES,
    rounds: int = 2,
) -> dict[str, float]:
    """Return the median seconds of one clipped sum for each candidate that runs.

    Each candidate runs once untimed (its first call allocates and picks kernels), then
    ``rounds`` times timed, on a copy of ``model`` on ``device``. A candidate that
    cannot handle the model, or runs out of memory, is left out and the reason logged.
    Raises ``RuntimeError`` when no candidate runs.
    """
    device = torch.device(device)
    trial = copy.deepcopy(model).to(device)
    images, targets = _random_batch(trial, device, batch_size, input_shape)
    params = [p for p in trial.parameters() if p.requires_grad]
    mask = None
    if mask_rate is not None:
        generator = torch.Generator().manual_seed(0)
        mask = draw_mask([p.shape for p in params], rate=mask_rate, generator=generator, device=device)
    timings: dict[str, float] = {}
    for name in candidates:
        try:
            timings[name] = _time_one(name, trial, loss_fn, images, targets, mask, rounds)
        except (ValueError, TypeError, NotImplementedError, RuntimeError) as error:
            # torch.cuda.OutOfMemoryError is a RuntimeError.
            logger.info("per-sample strategy %s left out on %s: %s", name, device, error)
        finally:
            for param in params:
                param.grad = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if not timings:
        raise RuntimeError(
            f"no per-sample strategy of {', '.join(candidates)} runs this model on {device}; "
            "see the log for each one's reason"
        )
    return timings


def _time_one(
    name: str, model: nn.Module, loss_fn: LossFn, images: Tensor, targets: Tensor,
    mask: SparsityMask | None, rounds: int,
) -> float:
    strategy = make_strategy(name, model, loss_fn)
    try:
        strategy.prepare_mask(mask)
        clip = lambda norms: 1.0 / norms.clamp(min=1.0)  # noqa: E731
        seconds = []
        for attempt in range(rounds + 1):
            _synchronize(images.device)
            started = time.perf_counter()
            strategy.clipped_sum(images, targets, clip=clip, mask=mask)
            _synchronize(images.device)
            if attempt > 0:
                seconds.append(time.perf_counter() - started)
        return statistics.median(seconds)
    finally:
        strategy.close()


def _random_batch(
    model: nn.Module, device: torch.device, batch_size: int, input_shape: Sequence[int]
) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(max(1, int(batch_size)), *input_shape, generator=generator)
    with torch.no_grad():
        out_shape = model(images[:1].to(device)).shape[1:]
    targets = (torch.rand(images.shape[0], *out_shape, generator=generator) > 0.9).float()
    return images.to(device), targets.to(device)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

"""Local training of one site for one federated round: DP-SGD with Poisson sampling.

Plan of a round (:func:`plan_round`) for a site with ``n`` training images and expected
batch size ``B`` (``batch-size``):

- sample rate ``q = min(1, B / n)``. Each step includes each image independently with
  probability ``q``, so a batch may be empty. An empty batch still takes a noise-only
  step, which the accountant counts;
- steps per local epoch ``round(1 / q)`` (at least 1), so an epoch sees each image once
  in expectation; steps per round ``local_epochs`` times that;
- the sum of clipped gradients is divided by the expected batch size ``q n``.

With ``calibrate-noise``, sigma is calibrated before each round to what the ledger has
left for this round and the run's later rounds (:func:`resolve_noise_multiplier`).
Before training, a private site computes the epsilon the round would reach from its
ledger; if that exceeds its target, or no sigma fits what is left, it rejects the round
with the reason and trains nothing. Steps are recorded in the ledger only after
training succeeds.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from common.config import RunConfig
from common.metrics import dice_bce_loss
from common.privacy.accounting import calibrate_noise_multiplier
from common.privacy.clipping import AdaptiveClipBound, adaptive_noise_multiplier
from common.privacy.ledger import LedgerEntry, PrivacyLedger
from common.privacy.noise import NoiseSource, poisson_sample
from common.privacy.choose import choose_strategy
from common.privacy.sparsify import mask_seed, rs_num_windows, rs_rate, rs_window, seeded_mask
from common.privacy.step import METHOD_PIECES, DPStep, NonPrivateStep

logger = logging.getLogger(__name__)

_MAX_CLIP_DRIFT = 0.5
"""Largest change of log C per step, from one std of the count noise, without a warning."""


@dataclass
class TrainResult:
    """Outcome of one site's local training in one round.

    ``epsilon`` is the site's cumulative epsilon after the round (``inf`` for method
    ``none``); ``entries`` are this round's ledger entries. ``upload_coordinates`` counts
    the coordinates where the weights changed: ``d`` for dense methods, at most the
    ``d - floor(p d)`` kept coordinates for RS with a per-round mask and momentum 0.
    ``train_loss`` is the mean per-example loss of the sampled batches. It comes from the
    private images without noise, so a private site logs it and does not send it.
    """

    num_examples: int
    train_loss: float
    steps: int
    entries: list[LedgerEntry]
    epsilon: float
    accountant: str
    refused: str | None
    noise_multiplier: float
    sample_rate: float
    seconds: float
    upload_coordinates: int
    num_coordinates: int = 0
    rs_rate: float = 0.0
    max_grad_norm: float = 0.0
    strategy: str = ""


@dataclass(frozen=True)
class RoundPlan:
    """Sampling plan of one site's round."""

    sample_rate: float
    steps_per_epoch: int
    steps: int
    expected_batch_size: float
    total_steps: int


def plan_round(config: RunConfig, num_examples: int) -> RoundPlan:
    """Return the sampling plan of a round for a site with ``num_examples`` training images.

    ``total_steps`` is the planned number of steps over all ``num-server-rounds`` rounds.
    """
    if num_examples < 1:
        raise ValueError(f"a site needs at least one training image, got {num_examples}")
    sample_rate = min(1.0, config.batch_size / num_examples)
    steps_per_epoch = max(1, round(1 / sample_rate))
    steps = config.local_epochs * steps_per_epoch
    return RoundPlan(
        sample_rate=sample_rate,
        steps_per_epoch=steps_per_epoch,
        steps=steps,
        expected_batch_size=sample_rate * num_examples,
        total_steps=config.num_server_rounds * steps,
    )


def resolve_noise_multiplier(
    config: RunConfig, plan: RoundPlan, *, prior: Sequence[LedgerEntry] = (), server_round: int = 1
) -> float:
    """Return sigma: ``noise-multiplier``, or calibrated to ``target-epsilon``.

    Calibrated, sigma is the smallest one with which this round and the run's later
    rounds (up to ``num-server-rounds``), composed after the ``prior`` ledger entries,
    stay within the target. On a fresh ledger in round 1 that is every planned step of
    the run. Later rounds, and later runs on the same site folder, calibrate to what the
    ledger has left. Raises ``ValueError`` when no sigma fits.
    """
    if not config.calibrate_noise:
        return config.noise_multiplier
    remaining_rounds = max(1, config.num_server_rounds - server_round + 1)
    return calibrate_noise_multiplier(
        target_epsilon=config.target_epsilon,
        delta=config.delta,
        sample_rate=plan.sample_rate,
        steps=remaining_rounds * plan.steps,
        accountant=config.accountant,
        prior=prior,
    )


def train_site(
    model: nn.Module,
    dataset: Dataset,
    config: RunConfig,
    *,
    ledger: PrivacyLedger | None,
    server_round: int,
    site: int,
    device: torch.device | str = "cpu",
    generator_seed: int | None = None,
    strategy: str | None = None,
    max_grad_norm: float | None = None,
) -> TrainResult:
    """Train ``model`` on ``dataset`` for one round with ``config.method``; see the module doc.

    Args:
        ledger: the site's privacy ledger; None only for method ``none``.
        server_round: 1-based round, used for the ledger entry and the RS schedule.
        site: the site id, used for the RS mask seed.
        generator_seed: seed of the sampling and noise generator; None draws a fresh
            one from the OS. A known seed lets anyone regenerate the noise, so a fixed
            seed is for reproducible simulations only.
        strategy: per-sample gradient strategy; None chooses per device
            (:func:`common.privacy.choose.choose_strategy`: the measured default on the
            CPU, the fastest candidate timed on this model on a GPU).
        max_grad_norm: starting clipping bound, overriding ``max-grad-norm`` (to carry
            an adaptive bound from one round to the next).

    Returns a result with ``refused`` set, and leaves the model untouched, when the
    round would exceed the ledger's target epsilon.
    """
    started = time.perf_counter()
    if config.private and ledger is None:
        raise ValueError(f"method {config.method!r} is private and needs the site's PrivacyLedger")
    num_examples = len(dataset)
    plan = plan_round(config, num_examples)
    sigma, calibration_failure = 0.0, None
    if config.private:
        sigma, calibration_failure = _sigma_for_ledger(config, plan, ledger, server_round)
    entries = [] if calibration_failure else _round_entries(config, plan, sigma, server_round)
    clip_bound = config.max_grad_norm if max_grad_norm is None else float(max_grad_norm)
    device = torch.device(device)
    result = TrainResult(
        num_examples=num_examples, train_loss=float("nan"), steps=0, entries=[],
        epsilon=math.inf, accountant=config.accountant, refused=None, noise_multiplier=sigma,
        sample_rate=plan.sample_rate, seconds=0.0, upload_coordinates=0,
        max_grad_norm=clip_bound if config.private else 0.0,
        strategy=(strategy or "") if config.private else "",
    )
    if config.private:
        result.epsilon = ledger.epsilon(config.accountant)
        reason = calibration_failure or ledger.check_budget(entries, accountant=config.accountant)
        if reason is not None:
            logger.warning("site %d rejects round %d: %s", site, server_round, reason)
            result.refused = reason
            result.seconds = time.perf_counter() - started
            return result

    model.to(device)
    if config.private and not result.strategy:
        result.strategy = _choose_strategy(model, config, plan, device)
    _run_local_epochs(model, dataset, config, plan, result, clip_bound=clip_bound,
                      ledger=ledger, server_round=server_round, site=site, device=device,
                      generator_seed=generator_seed)
    if config.private:
        ledger.record(entries)
        result.entries = entries
        result.epsilon = ledger.epsilon(config.accountant)
    result.seconds = time.perf_counter() - started
    return result


def _sigma_for_ledger(
    config: RunConfig, plan: RoundPlan, ledger: PrivacyLedger, server_round: int
) -> tuple[float, str | None]:
    """Return ``(sigma, None)``, or ``(0, reason)`` when the ledger's spending leaves no sigma that fits.

    Raises ``ValueError`` when the settings admit no sigma even on a fresh ledger (a
    target too small to reach, or so large that it bounds nothing, or a sigma adaptive
    clipping cannot split with its count query).
    """
    try:
        return _usable_sigma(config, plan, prior=ledger.entries, server_round=server_round), None
    except ValueError as error:
        if not ledger.entries:
            raise
        _usable_sigma(config, plan, prior=(), server_round=server_round)  # raises for the settings alone
        return 0.0, f"no noise multiplier fits the rest of the budget: {error}"


def _usable_sigma(
    config: RunConfig, plan: RoundPlan, *, prior: Sequence[LedgerEntry], server_round: int
) -> float:
    """Return :func:`resolve_noise_multiplier`'s sigma after checking that the method can use it.

    Calibrated to a small remaining budget, sigma can reach twice ``adaptive-count-noise``,
    where adaptive clipping leaves no noise for the gradient.
    """
    sigma = resolve_noise_multiplier(config, plan, prior=prior, server_round=server_round)
    if config.method == "adaptive":
        adaptive_noise_multiplier(sigma, count_noise=config.adaptive_count_noise)
    return sigma


def _round_entries(config: RunConfig, plan: RoundPlan, sigma: float, server_round: int) -> list[LedgerEntry]:
    if not config.private:
        return []
    return [
        LedgerEntry(
            noise_multiplier=sigma, sample_rate=plan.sample_rate, steps=plan.steps,
            server_round=server_round, method=config.method,
        )
    ]


def _choose_strategy(model: nn.Module, config: RunConfig, plan: RoundPlan, device: torch.device) -> str:
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return choose_strategy(
        model, dice_bce_loss, device=device,
        batch_size=max(1, round(plan.expected_batch_size)),
        input_shape=(first_conv.in_channels, config.image_size, config.image_size),
        mask_rate=config.rs_final_rate if _sparsifies(config) else None,
    )


def _sparsifies(config: RunConfig) -> bool:
    return config.private and METHOD_PIECES[config.method].sparsify


def _run_local_epochs(
    model: nn.Module,
    dataset: Dataset,
    config: RunConfig,
    plan: RoundPlan,
    result: TrainResult,
    *,
    clip_bound: float,
    ledger: PrivacyLedger | None,
    server_round: int,
    site: int,
    device: torch.device,
    generator_seed: int | None,
) -> None:
    was_training = model.training
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]

    source = NoiseSource(seed=generator_seed, secure=config.secure_rng, device=device)
    if config.private and source.seeded:
        logger.info("site %d: noise drawn from a fixed seed (reproducible, not for deployment)", site)
    step = _make_step(model, config, plan, result, clip_bound=clip_bound, source=source)
    optimizer = torch.optim.SGD(params, lr=config.learning_rate, momentum=config.momentum)
    loss_sum, seen = 0.0, 0

    try:
        for epoch in range(config.local_epochs):
            if _sparsifies(config) and (epoch == 0 or config.rs_refresh == "epoch"):
                result.rs_rate = _set_round_mask(step, config, server_round, site, epoch, device)
            for _ in range(plan.steps_per_epoch):
                indices = poisson_sample(len(dataset), sample_rate=plan.sample_rate, source=source)
                images, targets = _collate(dataset, indices, device)
                stats = step(images, targets)
                if config.private or stats.batch_size:
                    optimizer.step()
                loss_sum += stats.loss_sum
                seen += stats.batch_size
                result.steps += 1
            _log_epoch(config, plan, result, ledger, site, server_round, epoch, loss_sum, seen)
    finally:
        step.close()
        for param in params:
            param.grad = None
        model.train(was_training)

    if config.private and config.method == "adaptive":
        result.max_grad_norm = step.clip_bound
    result.train_loss = loss_sum / seen if seen else float("nan")
    with torch.no_grad():
        result.upload_coordinates = sum(int((p != b).sum()) for p, b in zip(params, before))
    result.num_coordinates = sum(p.numel() for p in params)


def _make_step(
    model: nn.Module, config: RunConfig, plan: RoundPlan, result: TrainResult,
    *, clip_bound: float, source: NoiseSource,
) -> DPStep | NonPrivateStep:
    if not config.private:
        return NonPrivateStep(model, dice_bce_loss)
    adaptive = None
    if config.method == "adaptive":
        _warn_on_clip_drift(config, plan)
        adaptive = AdaptiveClipBound(
            max_grad_norm=clip_bound, target_quantile=config.adaptive_target_quantile,
            clip_lr=config.adaptive_clip_lr, count_noise=config.adaptive_count_noise,
        )
    return DPStep(
        model, dice_bce_loss, method=config.method, noise_multiplier=result.noise_multiplier,
        max_grad_norm=clip_bound, expected_batch_size=plan.expected_batch_size, source=source,
        strategy=result.strategy, ac_gamma=config.ac_gamma, adaptive=adaptive,
    )


def _warn_on_clip_drift(config: RunConfig, plan: RoundPlan) -> None:
    """Warn when the count noise alone moves the adaptive clip bound a lot at each step.

    The bound's update is ``C <- C exp(-eta (b_hat - gamma))``, and ``b_hat`` carries count
    noise of std ``sigma_b / B``. So one standard deviation of that noise changes
    ``log C`` by ``eta sigma_b / B`` per step. Above :data:`_MAX_CLIP_DRIFT` the bound
    follows a random walk: at an expected batch of 1 with the defaults it is 2.0, a
    factor of 7.4 per step.
    """
    drift = config.adaptive_clip_lr * config.adaptive_count_noise / plan.expected_batch_size
    if drift > _MAX_CLIP_DRIFT:
        logger.warning(
            "adaptive clipping: at expected batch %.2f with adaptive-count-noise %g and "
            "adaptive-clip-lr %g, the count noise alone moves the clip bound by a factor of "
            "about %.1f per step, so the bound drifts at random and training can diverge; "
            "use a larger batch-size",
            plan.expected_batch_size, config.adaptive_count_noise, config.adaptive_clip_lr,
            math.exp(drift),
        )


def _set_round_mask(
    step: DPStep, config: RunConfig, server_round: int, site: int, epoch: int, device: torch.device
) -> float:
    window = rs_window(
        server_round=server_round, local_epoch=epoch, local_epochs=config.local_epochs,
        refresh=config.rs_refresh,
    )
    windows = rs_num_windows(
        num_server_rounds=config.num_server_rounds, local_epochs=config.local_epochs,
        refresh=config.rs_refresh,
    )
    if window >= windows:
        logger.warning(
            "site %d: round %d lies beyond the %d planned RS windows; using the final rate",
            site, server_round, windows,
        )
        window = windows - 1
    rate = rs_rate(window, num_windows=windows, final_rate=config.rs_final_rate)
    seed = mask_seed(seed=config.seed, server_round=server_round, site=site, window=window)
    step.set_mask(seeded_mask([p.shape for p in step.params], rate=rate, seed=seed, device=device))
    return rate


def _collate(dataset: Dataset, indices: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """Stack the sampled items; an empty sample gives tensors with batch dimension 0."""
    if indices.numel() == 0:
        image, target = dataset[0]
        return (
            torch.empty((0, *image.shape), dtype=image.dtype, device=device),
            torch.empty((0, *target.shape), dtype=target.dtype, device=device),
        )
    items = [dataset[int(i)] for i in indices]
    images = torch.stack([image for image, _ in items]).to(device)
    targets = torch.stack([target for _, target in items]).to(device)
    return images, targets


def _log_epoch(
    config: RunConfig, plan: RoundPlan, result: TrainResult, ledger: PrivacyLedger | None,
    site: int, server_round: int, epoch: int, loss_sum: float, seen: int,
) -> None:
    epsilon = math.inf
    if config.private:
        done = LedgerEntry(
            noise_multiplier=result.noise_multiplier, sample_rate=plan.sample_rate,
            steps=result.steps, server_round=server_round, method=config.method,
        )
        epsilon = ledger.epsilon(config.accountant, extra=[done])
    logger.info(
        "site %d round %d epoch %d/%d: method %s, loss %.4f, steps %d, epsilon %.4f (%s)",
        site, server_round, epoch + 1, config.local_epochs, config.method,
        loss_sum / seen if seen else float("nan"), result.steps, epsilon, config.accountant,
    )


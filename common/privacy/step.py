"""One DP-SGD gradient, composed from the pieces in the order the math reads.

For a Poisson batch ``S`` of expected size ``B``, RS mask ``m`` (all ones without RS),
clipping bound ``C`` and noise multiplier ``sigma``:

    grad = m * ( sum_{i in S} f_i (m * g_i) + N(0, sigma^2 C^2 I) ) / B

1. per-sample gradients ``g_i`` (a strategy of :mod:`common.privacy.per_sample`),
2. sparsify: ``m * g_i`` (:mod:`common.privacy.sparsify`),
3. clip: ``f_i`` from ``||m * g_i||`` (:mod:`common.privacy.clipping`),
4. sum, 5. add noise and zero it on the mask (:mod:`common.privacy.noise`),
6. scale by the *expected* batch size ``B``: dividing by the realised size would leak it.

A method is a choice of pieces, see :data:`METHOD_PIECES`. An empty batch still yields a
(noise-only) gradient, as the accountant assumes a step was taken.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from common.privacy.clipping import (
    AdaptiveClipBound,
    adaptive_noise_multiplier,
    automatic_clip_factor,
    flat_clip_factor,
)
from common.privacy.noise import NoiseSource
from common.privacy.per_sample import LossFn, PerSampleStrategy, make_strategy
from common.privacy.sparsify import SparsityMask

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MethodPieces:
    """A method's clipping function and whether it sparsifies (RS)."""

    clipping: str
    sparsify: bool


METHOD_PIECES = {
    "flat": MethodPieces(clipping="flat", sparsify=False),
    "automatic": MethodPieces(clipping="automatic", sparsify=False),
    "adaptive": MethodPieces(clipping="adaptive", sparsify=False),
    "rs": MethodPieces(clipping="flat", sparsify=True),
    "rs-automatic": MethodPieces(clipping="automatic", sparsify=True),
}
"""The private methods; ``none`` is plain SGD (:class:`NonPrivateStep`)."""


@dataclass(frozen=True)
class StepStats:
    """One step's realised batch size, summed per-example loss and clipping bound used."""

    batch_size: int
    loss_sum: float
    max_grad_norm: float
    clipped: int


class DPStep:
    """Sets ``p.grad`` of every trainable parameter to one DP-SGD gradient.

    Args:
        model: the model (already safe for per-sample gradients).
        loss_fn: per-example loss, ``(logits, targets) -> (B,)``.
        method: a key of :data:`METHOD_PIECES`.
        noise_multiplier: sigma, the one the ledger records (> 0).
        max_grad_norm: C; the starting bound for ``adaptive``.
        expected_batch_size: B = sample_rate x dataset size, the divisor of the sum.
        source: noise generator.
        strategy: per-sample strategy name (see :data:`common.privacy.per_sample.STRATEGIES`).
        ac_gamma: automatic clipping's gamma.
        adaptive: the clipping-bound state for method ``adaptive``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        *,
        method: str,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        source: NoiseSource,
        strategy: str,
        ac_gamma: float = 0.01,
        adaptive: AdaptiveClipBound | None = None,
    ) -> None:
        if method not in METHOD_PIECES:
            raise ValueError(f"unknown DP method {method!r}; choose one of {', '.join(METHOD_PIECES)}")
        if not noise_multiplier > 0:
            raise ValueError(f"a DP step needs noise_multiplier > 0, got {noise_multiplier!r}")
        if not expected_batch_size > 0:
            raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size!r}")
        self.pieces = METHOD_PIECES[method]
        if self.pieces.clipping == "adaptive" and adaptive is None:
            raise ValueError("method 'adaptive' needs an AdaptiveClipBound")
        self.method = method
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.expected_batch_size = float(expected_batch_size)
        self.ac_gamma = float(ac_gamma)
        self.adaptive = adaptive
        self.source = source
        self.gradient_noise_multiplier = (
            adaptive_noise_multiplier(noise_multiplier, count_noise=adaptive.count_noise)
            if adaptive is not None and self.pieces.clipping == "adaptive"
            else self.noise_multiplier
        )
        self.strategy: PerSampleStrategy = make_strategy(strategy, model, loss_fn)
        self.params = self.strategy.params
        self.mask: SparsityMask | None = None
        self._active_mask: SparsityMask | None = None
        self._kept_index: tuple[Tensor, ...] = ()

    def set_mask(self, mask: SparsityMask | None) -> None:
        """Use ``mask`` for the following steps (RS methods), or none."""
        if mask is not None and not self.pieces.sparsify:
            raise ValueError(f"method {self.method!r} does not sparsify; it takes no mask")
        if mask is not None and len(mask.kept) != len(self.params):
            raise ValueError(f"mask covers {len(mask.kept)} parameters, the model has {len(self.params)}")
        # A mask that zeroes nothing (the first window of the RS ramp) changes nothing.
        self.mask = mask
        self._active_mask = mask if mask is not None and mask.num_zeroed > 0 else None
        if self._active_mask is not None:
            # The kept indices and the strategy's view of them live as long as the mask,
            # so they are built here, outside the steps' peak memory.
            self._kept_index = self._active_mask.kept_index
            self.strategy.prepare_mask(self._active_mask)

    @property
    def clip_bound(self) -> float:
        """The clipping bound C of the next step."""
        return self.adaptive.max_grad_norm if self.pieces.clipping == "adaptive" else self.max_grad_norm

    def clip_factors(self, norms: Tensor) -> Tensor:
        """Return the per-sample clip factors of this method for ``norms``."""
        if self.pieces.clipping == "automatic":
            return automatic_clip_factor(norms, max_grad_norm=self.max_grad_norm, gamma=self.ac_gamma)
        return flat_clip_factor(norms, max_grad_norm=self.clip_bound)

    def __call__(self, images: Tensor, targets: Tensor) -> StepStats:
        if self.pieces.sparsify and self.mask is None:
            raise RuntimeError(f"method {self.method!r} needs set_mask() before its first step")
        bound = self.clip_bound
        scale = 1.0 / self.expected_batch_size
        mask = self._active_mask
        for param in self.params:
            param.grad = None  # the last step's gradient would add to this step's peak memory
        sums, stats = self.strategy.clipped_sum(
            images, targets, clip=lambda norms: self.clip_factors(norms) * scale, mask=mask
        )
        with torch.no_grad():
            # The clip factors carry the division by B, and the noise is drawn with
            # std sigma C / B, so no pass divides the sum. Under RS only the kept
            # coordinates get noise. Every strategy leaves the masked coordinates 0
            # (tested for each kernel path), so the sums are not masked again here: a
            # pass over all d coordinates cost about 18 ms, 4% of a 128 px step.
            std = self.gradient_noise_multiplier * bound * scale
            if mask is None:
                self.source.add_normal_(sums, std=std)
            else:
                self.source.add_normal_at_(sums, self._kept_index, std=std)
        for param, grad in zip(self.params, sums):
            param.grad = grad
        if self.pieces.clipping == "adaptive":
            fraction = self.adaptive.unclipped_fraction(
                stats.norms, expected_batch_size=self.expected_batch_size, source=self.source
            )
            self.adaptive.update(fraction)
        return StepStats(
            batch_size=int(images.shape[0]),
            loss_sum=float(stats.losses.sum()),
            max_grad_norm=bound,
            clipped=int((stats.norms > bound).sum()) if self.pieces.clipping != "automatic" else 0,
        )

    def close(self) -> None:
        """Remove the strategy's hooks from the model."""
        self.strategy.close()


class NonPrivateStep:
    """Sets ``p.grad`` to the gradient of the mean per-example loss of the batch (plain SGD)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.params: Sequence[Tensor] = [p for p in model.parameters() if p.requires_grad]

    def __call__(self, images: Tensor, targets: Tensor) -> StepStats:
        for param in self.params:
            param.grad = None
        if images.shape[0] == 0:
            return StepStats(batch_size=0, loss_sum=0.0, max_grad_norm=0.0, clipped=0)
        losses = self.loss_fn(self.model(images), targets)
        losses.mean().backward()
        return StepStats(
            batch_size=int(images.shape[0]), loss_sum=float(losses.detach().sum()),
            max_grad_norm=0.0, clipped=0,
        )

    def close(self) -> None:
        """Nothing to remove (kept for symmetry with :class:`DPStep`)."""

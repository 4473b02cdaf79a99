"""Per-sample clipping factors of DP-SGD and the adaptive clipping bound.

Each clipping function maps the per-sample gradient norms ``||g_i||`` (of the masked
gradient under RS) to factors ``f_i`` with ``||f_i * g_i|| <= C``. The sum of the
contributions then has sensitivity ``C`` under adding or removing one example, so every
method uses the same Gaussian mechanism and the same accountant.

- flat (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016):
  ``f_i = min(1, C / ||g_i||)``; a zero gradient gets factor 1.
- automatic, AUTO-S (Bu, Wang, Zha, Karypis, NeurIPS 2023, arXiv 2206.07136):
  ``f_i = C / (||g_i|| + gamma)``; ``gamma = 0`` is AUTO-V, where a zero gradient
  gets factor 0 (its contribution is 0 under any factor).
- adaptive quantile clipping (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021): flat
  clipping whose ``C`` follows the noisy fraction of unclipped examples, see
  :class:`AdaptiveClipBound`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from common.privacy.noise import NoiseSource


def flat_clip_factor(norms: Tensor, *, max_grad_norm: float) -> Tensor:
    """Return ``min(1, C / ||g_i||)`` per sample (1 where the norm is 0, 0 where it is NaN).

    A NaN norm bounds nothing, so its example gets factor 0 and contributes nothing;
    factor 1 would add it unclipped.
    """
    _check_positive("max_grad_norm", max_grad_norm)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    factors = torch.clamp(max_grad_norm / safe, max=1.0)
    return torch.where(torch.isnan(norms), torch.zeros_like(factors), factors)


def automatic_clip_factor(norms: Tensor, *, max_grad_norm: float, gamma: float) -> Tensor:
    """Return ``C / (||g_i|| + gamma)`` per sample (0 where norm and gamma are both 0)."""
    _check_positive("max_grad_norm", max_grad_norm)
    if gamma < 0 or not math.isfinite(gamma):
        raise ValueError(f"automatic clipping gamma must be a finite number >= 0, got {gamma!r}")
    denominator = norms + gamma
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, max_grad_norm / safe, torch.zeros_like(norms))


def adaptive_noise_multiplier(noise_multiplier: float, *, count_noise: float) -> float:
    """Return the noise multiplier left for the gradient under adaptive clipping.

    ``z_grad = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` (Andrew et al. 2021, Theorem 1): the
    gradient query and the unclipped-count query together cost what one Gaussian
    mechanism with multiplier ``z`` costs, so the ledger records ``z``. Needs
    ``z < 2 sigma_b``.
    """
    _check_positive("noise_multiplier", noise_multiplier)
    _check_positive("count_noise", count_noise)
    if noise_multiplier >= 2 * count_noise:
        raise ValueError(
            f"adaptive clipping needs noise_multiplier < 2 * adaptive-count-noise, got "
            f"noise_multiplier {noise_multiplier:g} and adaptive-count-noise {count_noise:g}; "
            f"raise adaptive-count-noise above {noise_multiplier / 2:g}"
        )
    return (noise_multiplier**-2 - (2 * count_noise) ** -2) ** -0.5


@dataclass
class AdaptiveClipBound:
    """The clipping bound ``C`` of adaptive quantile clipping and its update rule.

    After each step ``C <- C * exp(-eta * (b_hat - gamma_q))`` with ``eta`` =
    ``clip_lr``, ``gamma_q`` = ``target_quantile`` and
    ``b_hat = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / B + 1/2``, where
    ``b_i = 1[||g_i|| <= C]`` and ``B`` is the expected batch size. Centring the
    count at 1/2 makes its sensitivity 1/2, which is what the ``(2 sigma_b)^-2`` term of
    :func:`adaptive_noise_multiplier` assumes; dividing by the expected rather than
    the realised batch size keeps the batch size private. Opacus 1.6's
    ``AdaClipDPOptimizer`` applies the same geometric update and noise split but counts
    uncentred and divides by the realised batch size.
    """

    max_grad_norm: float
    target_quantile: float
    clip_lr: float
    count_noise: float

    def __post_init__(self) -> None:
        _check_positive("max_grad_norm", self.max_grad_norm)
        if not 0 <= self.target_quantile <= 1:
            raise ValueError(f"target_quantile must lie in [0, 1], got {self.target_quantile!r}")
        if self.clip_lr < 0 or not math.isfinite(self.clip_lr):
            raise ValueError(f"clip_lr must be a finite number >= 0, got {self.clip_lr!r}")
        _check_positive("count_noise", self.count_noise)

    def unclipped_fraction(
        self, norms: Tensor, *, expected_batch_size: float, source: NoiseSource
    ) -> float:
        """Return the noisy unclipped fraction ``b_hat`` of a batch with these norms."""
        centred = float((norms <= self.max_grad_norm).sum()) - 0.5 * norms.numel()
        noise = float(source.normal((1,), std=self.count_noise, dtype=torch.float64).item())
        return (centred + noise) / expected_batch_size + 0.5

    def update(self, unclipped_fraction: float) -> float:
        """Apply the geometric update for one step's ``b_hat`` and return the new ``C``."""
        self.max_grad_norm *= math.exp(-self.clip_lr * (unclipped_fraction - self.target_quantile))
        return self.max_grad_norm


def _check_positive(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")

"""Random sparsification (RS) of DP-SGD gradients: the mask and its rate schedule.

Source: Zhu and Blaschko, "Improving Differentially Private SGD via Randomly Sparsified
Gradients", TMLR 2023 (arXiv 2112.00845). As their reference implementation does it:

- one mask zeroes exactly ``floor(p * d)`` of the ``d`` trainable coordinates, a subset
  drawn uniformly from the whole flattened parameter vector (all layers together);
- the mask is shared by every example and every step of a refresh window;
- each per-sample gradient is masked before it is clipped, and the Gaussian noise is
  zeroed on the mask too, so masked coordinates carry neither signal nor noise;
- kept coordinates are not rescaled by ``1 / (1 - p)``;
- the rate ramps linearly from 0 in the first window to the final rate ``p*`` in the
  last window ("gradual cooling").

The mask is drawn independently of the data, so every step stays the same subsampled
Gaussian mechanism and epsilon is unchanged. The mask, and its seed, may be public.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from functools import cached_property
from fractions import Fraction
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

_MASK_SEED_TAG = 0x5253  # separates mask seeds from other seeds derived from the run seed
REFRESH_CHOICES = ("round", "epoch")
_MASK_BLOCK = 1 << 16  # coordinates per block of a mask draw, see _clear_uniform_subset


def rs_rate(window: int, *, num_windows: int, final_rate: float) -> float:
    """Return the sparsification rate of refresh window ``window`` (0-based).

    ``p_k = min(p*, p* * k / (W - 1))`` for ``W = num_windows`` windows: window 0 is
    dense and the last window reaches ``p* = final_rate``. With a single window the
    schedule cannot ramp; that window uses ``p*``, so RS is never silently turned off.
    """
    if not 0 <= final_rate < 1:
        raise ValueError(f"final_rate must lie in [0, 1), got {final_rate!r}")
    if num_windows < 1 or not 0 <= window < num_windows:
        raise ValueError(f"window must lie in [0, {num_windows}), got {window!r}")
    if num_windows == 1:
        return float(final_rate)
    return min(final_rate, final_rate * window / (num_windows - 1))


def rs_num_windows(*, num_server_rounds: int, local_epochs: int, refresh: str) -> int:
    """Return how many masks a site draws over the planned run (one per window)."""
    _check_refresh(refresh)
    return num_server_rounds * (local_epochs if refresh == "epoch" else 1)


def rs_window(*, server_round: int, local_epoch: int, local_epochs: int, refresh: str) -> int:
    """Return the 0-based refresh window of local epoch ``local_epoch`` of ``server_round``.

    ``server_round`` is 1-based (Flower's numbering), ``local_epoch`` 0-based. With
    ``refresh="round"`` a window is a whole round of ``local_epochs`` epochs, so the ramp
    still spans all planned local epochs of all rounds.
    """
    _check_refresh(refresh)
    if server_round < 1 or not 0 <= local_epoch < local_epochs:
        raise ValueError(
            f"need server_round >= 1 and 0 <= local_epoch < {local_epochs}; got "
            f"{server_round}, {local_epoch}"
        )
    if refresh == "round":
        return server_round - 1
    return (server_round - 1) * local_epochs + local_epoch


def mask_seed(*, seed: int, server_round: int, site: int, window: int) -> int:
    """Return the seed of one site's mask for one window, derived from the run seed."""
    state = np.random.SeedSequence([_MASK_SEED_TAG, int(seed), int(server_round), int(site), int(window)])
    return int(state.generate_state(1, dtype=np.uint64)[0] >> 1)


def num_zeroed(rate: float, num_coordinates: int) -> int:
    """Return ``floor(rate * num_coordinates)``, with ``rate`` read as the decimal it prints as.

    Exact rational arithmetic on ``repr(rate)`` avoids binary rounding in both
    directions: 0.3 x 10 gives 3 (the float 0.3 lies just below 3/10) and 0.29 x 100
    gives 29 (the float product is 28.999...).
    """
    return int(Fraction(repr(float(rate))) * num_coordinates // 1)


@dataclass(frozen=True)
class SparsityMask:
    """One RS mask: for each parameter, a boolean tensor of its shape, True where kept.

    Attributes:
        kept: one bool tensor per parameter, in the order the mask was drawn for.
        dropped: the complements of ``kept`` (True = zeroed), derived at construction.
        rate: the sparsification rate p the mask was drawn with.
        num_zeroed: ``floor(p * d)``, the number of masked (zeroed) coordinates.
        num_coordinates: d, the total number of coordinates.
    """

    kept: tuple[Tensor, ...]
    rate: float
    num_zeroed: int
    num_coordinates: int
    dropped: tuple[Tensor, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The complement is used on every step; computing it once saves a pass over d.
        object.__setattr__(self, "dropped", tuple(~kept for kept in self.kept))

    @cached_property
    def kept_index(self) -> tuple[Tensor, ...]:
        """Per parameter, the flat indices (int64, ascending) of its kept coordinates."""
        return tuple(torch.nonzero(kept.flatten()).flatten() for kept in self.kept)

    @property
    def num_kept(self) -> int:
        """Number of coordinates the mask keeps, ``d - floor(p * d)``."""
        return self.num_coordinates - self.num_zeroed

    def apply_(self, tensors: Sequence[Tensor]) -> None:
        """Zero the masked coordinates of ``tensors`` (one per parameter), in place."""
        if len(tensors) != len(self.kept):
            raise ValueError(f"mask has {len(self.kept)} parameters, got {len(tensors)} tensors")
        for tensor, kept in zip(tensors, self.kept):
            tensor.mul_(kept.to(tensor.dtype))  # see keep_factors

    def apply_per_sample(self, index: int, per_sample: Tensor) -> Tensor:
        """Return ``per_sample`` (leading batch dim) of parameter ``index`` with its mask applied."""
        return per_sample * self.kept[index].to(per_sample.dtype)


def keep_factors(dropped: Tensor, dtype: torch.dtype) -> Tensor:
    """Return 1 where a coordinate is kept and 0 where ``dropped``, in ``dtype``.

    Multiplying by these zeroes the dropped coordinates (as -0.0 where negative) far
    faster than ``masked_fill_`` on the CPU: for 2.36 M float32 values on 2 threads, 1.05 ms
    with the conversion and 0.33 ms without, against 4.2 ms.

    NOTE: an infinite or NaN value at a dropped coordinate becomes NaN, not 0. A
    non-finite per-sample gradient already makes every method's update NaN (its norm is
    infinite or NaN), so no step guards against it.
    """
    return torch.logical_not(dropped).to(dtype)


def draw_mask(
    shapes: Sequence[torch.Size],
    *,
    rate: float,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> SparsityMask:
    """Draw a mask zeroing exactly ``floor(rate * d)`` of the ``d`` coordinates of ``shapes``.

    The zeroed coordinates are a uniform random subset of that size of the flattened
    parameter vector, whatever the layer sizes. ``generator`` seeds the draw (see
    :func:`_clear_uniform_subset`).
    """
    if not 0 <= rate < 1:
        raise ValueError(f"RS rate must lie in [0, 1), got {rate!r}")
    sizes = [int(np.prod(shape)) for shape in shapes]
    total = sum(sizes)
    zeroed = num_zeroed(rate, total)
    flat = torch.ones(total, dtype=torch.bool)
    if zeroed:
        rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))
        _clear_uniform_subset(flat.numpy(), zeroed, rng)
    kept = tuple(
        part.reshape(shape).to(device) for part, shape in zip(torch.split(flat, sizes), shapes)
    )
    return SparsityMask(kept=kept, rate=float(rate), num_zeroed=zeroed, num_coordinates=total)


def _clear_uniform_subset(flags: np.ndarray, count: int, rng: np.random.Generator) -> None:
    """Set ``count`` entries of the all-True ``flags`` to False, a uniformly random subset.

    The entries are split into blocks of ``_MASK_BLOCK``. How many of the subset fall in
    each block follows the multivariate hypergeometric distribution, and given those
    counts the subset within each block is a uniform one of its size, independent of
    the other blocks. Drawing the counts first and then each block's subset is therefore
    exact. Each block's draw stays in cache, so 45% of a ResNet18 U-Net's 14.3 M
    coordinates took 0.04 s on 2 cores, against 0.60 s for one draw over all of them.
    """
    starts = np.arange(0, flags.size, _MASK_BLOCK)
    sizes = np.minimum(_MASK_BLOCK, flags.size - starts)
    counts = rng.multivariate_hypergeometric(sizes, count, method="marginals")
    for start, size, cleared in zip(starts.tolist(), sizes.tolist(), counts.tolist()):
        block = flags[start : start + size]
        # Draw the smaller side: the cleared entries, or the ones that stay set.
        if cleared <= size - cleared:
            block[rng.choice(size, cleared, replace=False, shuffle=False)] = False
        else:
            block[:] = False
            block[rng.choice(size, size - cleared, replace=False, shuffle=False)] = True


def seeded_mask(
    shapes: Sequence[torch.Size], *, rate: float, seed: int, device: torch.device | str = "cpu"
) -> SparsityMask:
    """Return :func:`draw_mask` of ``shapes`` at ``rate`` from a generator seeded with ``seed``.

    The last mask is kept: a site draws its round's mask to train and again to encode
    its sparse upload, and a draw also splits the mask by parameter and finds its kept
    indices. Callers must not modify the mask.
    """
    return _seeded_mask(tuple(tuple(shape) for shape in shapes), float(rate), int(seed), str(torch.device(device)))


@functools.lru_cache(maxsize=1)
def _seeded_mask(shapes: tuple[tuple[int, ...], ...], rate: float, seed: int, device: str) -> SparsityMask:
    generator = torch.Generator().manual_seed(seed)
    return draw_mask([torch.Size(shape) for shape in shapes], rate=rate, generator=generator, device=device)


def _check_refresh(refresh: str) -> None:
    if refresh not in REFRESH_CHOICES:
        raise ValueError(f"RS refresh must be one of {', '.join(REFRESH_CHOICES)}; got {refresh!r}")

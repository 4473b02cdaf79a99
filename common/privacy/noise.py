"""Randomness of DP-SGD: the Gaussian noise and the Poisson sampling draws.

:class:`NoiseSource` draws from a seeded ``torch.Generator`` (reproducible, fast) or,
with ``secure=True``, from the operating system's CSPRNG (``os.urandom``). Opacus's own
secure mode needs ``torchcsprng``, which has no build for current torch releases, so the
secure path here turns ``os.urandom`` bytes into uniforms and those into normals with the
Box-Muller transform. Like Opacus, it returns the sum of 4 normals divided by 2 (same
variance), which Holohan and Braghin (arXiv 2107.10138, section 5.1) show defeats the
floating-point attacks on a single Gaussian sample.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

_SECURE_SUMMANDS = 4  # normals summed per secure sample; the sum is divided by 2
_FLOAT64_MANTISSA_BITS = 53
# torch draws normals on one CPU thread, so large fills are split over this many
# generator streams drawn in parallel threads. The count is fixed so that a seed gives
# the same noise whatever the number of threads.
_NOISE_STREAMS = 4
_PARALLEL_MIN_ELEMENTS = 1 << 20


class NoiseSource:
    """Source of the Gaussian noise and the Poisson-sampling uniforms of one training run.

    Args:
        seed: seed of the ``torch.Generator``; None draws one from ``os.urandom``. The
            seed regenerates the noise, so anyone holding it can remove the noise. A fixed
            seed is for reproducible simulations only.
        secure: draw every sample from ``os.urandom`` instead (slower; ``seed`` unused).
        device: where returned tensors live; the secure path draws on the CPU and copies.
    """

    def __init__(
        self, *, seed: int | None = None, secure: bool = False, device: torch.device | str = "cpu"
    ) -> None:
        self.secure = bool(secure)
        self.device = torch.device(device)
        self.seeded = seed is not None and not self.secure
        self.generator: torch.Generator | None = None
        self._sampling_generator: torch.Generator | None = None
        self._streams: list[torch.Generator] = []
        self._pool: ThreadPoolExecutor | None = None
        if not self.secure:
            if seed is None:
                seed = int.from_bytes(os.urandom(8), "little") >> 1
            noise_seed, sampling_seed = np.random.SeedSequence(int(seed)).generate_state(2)
            self.generator = torch.Generator(device=self.device)
            self.generator.manual_seed(int(noise_seed))
            # Sampling decisions are made on the CPU, whatever the device of the noise.
            self._sampling_generator = torch.Generator()
            self._sampling_generator.manual_seed(int(sampling_seed))
            if self.device.type == "cpu":
                stream_seeds = np.random.SeedSequence([int(noise_seed), 1]).generate_state(_NOISE_STREAMS)
                self._streams = [torch.Generator().manual_seed(int(s)) for s in stream_seeds]

    def uniform(self, n: int) -> Tensor:
        """Return ``n`` independent uniforms in [0, 1) as float64 on the CPU."""
        if self.secure:
            return torch.from_numpy(_secure_uniform(n, open_at_zero=False))
        return torch.rand(n, generator=self._sampling_generator, dtype=torch.float64)

    def normal(self, shape: Sequence[int], *, std: float, dtype: torch.dtype = torch.float32) -> Tensor:
        """Return a tensor of N(0, std^2) samples with ``shape``, on :attr:`device`."""
        if std < 0 or not math.isfinite(std):
            raise ValueError(f"noise std must be a finite number >= 0, got {std!r}")
        if std == 0:
            return torch.zeros(tuple(shape), dtype=dtype, device=self.device)
        if self.secure:
            n = math.prod(shape)
            total = sum(_secure_standard_normal(n) for _ in range(_SECURE_SUMMANDS))
            sample = torch.from_numpy(total * (std / 2.0)).reshape(tuple(shape))
            return sample.to(device=self.device, dtype=dtype)
        return torch.normal(
            0.0, std, size=tuple(shape), generator=self.generator, device=self.device, dtype=dtype
        )

    def fill_normal_(self, tensors: Sequence[Tensor], *, std: float) -> None:
        """Overwrite every element of ``tensors`` with independent N(0, std^2) samples."""
        self._draw(tensors, std=std, add=False)

    def add_normal_(self, tensors: Sequence[Tensor], *, std: float) -> None:
        """Add independent N(0, std^2) samples to every element of ``tensors``, in place.

        Samples are drawn into a temporary the size of one tensor (or one chunk of it on
        the parallel path) at a time, so no second copy of all of ``tensors`` is allocated.
        """
        self._draw(tensors, std=std, add=True)

    def add_normal_at_(self, tensors: Sequence[Tensor], indices: Sequence[Tensor], *, std: float) -> None:
        """Add N(0, std^2) samples at the flat ``indices`` of each of ``tensors``, in place.

        For RS: only the coordinates a mask keeps get noise, so only those are drawn.
        """
        counts = [int(index.numel()) for index in indices]
        values = tensors[0].new_empty(sum(counts))
        self.fill_normal_([values], std=std)
        for tensor, index, part in zip(tensors, indices, values.split(counts)):
            tensor.view(-1).index_add_(0, index, part)

    def _draw(self, tensors: Sequence[Tensor], *, std: float, add: bool) -> None:
        if self.secure or std == 0:
            for tensor in tensors:
                sample = self.normal(tensor.shape, std=std, dtype=tensor.dtype)
                tensor.add_(sample) if add else tensor.copy_(sample)
            return
        parallel = (
            self._streams
            and sum(t.numel() for t in tensors) >= _PARALLEL_MIN_ELEMENTS
            and all(t.is_contiguous() for t in tensors)
        )
        if not parallel:
            for tensor in tensors:
                _draw_chunk(tensor, std, self.generator, add)
            return
        parts: list[list[Tensor]] = [[] for _ in self._streams]
        for tensor in tensors:
            for k, chunk in enumerate(tensor.view(-1).tensor_split(len(self._streams))):
                parts[k].append(chunk)

        def draw(k: int) -> None:
            for chunk in parts[k]:
                _draw_chunk(chunk, std, self._streams[k], add)

        if self._pool is None:
            workers = max(1, min(len(self._streams), torch.get_num_threads()))
            self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dp-noise")
        list(self._pool.map(draw, range(len(self._streams))))


def _draw_chunk(chunk: Tensor, std: float, generator: torch.Generator, add: bool) -> None:
    if add:
        chunk.add_(torch.empty_like(chunk).normal_(0.0, std, generator=generator))
    else:
        chunk.normal_(0.0, std, generator=generator)


def _secure_uniform(n: int, *, open_at_zero: bool) -> np.ndarray:
    """Return ``n`` uniforms from ``os.urandom`` with 53 random bits each.

    The values lie in [0, 1), or in (0, 1] when ``open_at_zero`` (Box-Muller takes a log).
    """
    raw = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(64 - _FLOAT64_MANTISSA_BITS)
    values = raw.astype(np.float64)
    if open_at_zero:
        values += 1.0
    return values * 2.0**-_FLOAT64_MANTISSA_BITS


def _secure_standard_normal(n: int) -> np.ndarray:
    half = (n + 1) // 2
    radius = np.sqrt(-2.0 * np.log(_secure_uniform(half, open_at_zero=True)))
    angle = 2.0 * np.pi * _secure_uniform(half, open_at_zero=False)
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]


def poisson_sample(n: int, *, sample_rate: float, source: NoiseSource) -> Tensor:
    """Return the indices (int64, sorted) of a Poisson sample of ``range(n)``.

    Each index is included independently with probability ``sample_rate``, as the
    subsampled-Gaussian accountants assume; the result may be empty.
    """
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate!r}")
    if sample_rate == 1:
        return torch.arange(n)
    return torch.nonzero(source.uniform(n) < sample_rate).flatten()

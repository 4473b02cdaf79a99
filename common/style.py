"""Per-site acquisition styles: how one hospital's scanner and protocol change an image.

A style is applied deterministically to a float image in [0, 1]. The synthetic generator
uses it when writing a site's DICOMs, and the ``scanner-shift`` site setup applies it at
load time, so the same patient looks different at different sites.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class AcquisitionStyle:
    """One site's acquisition differences from a neutral scanner.

    Attributes:
        contrast: multiplier of the deviation from mid-grey (1 = unchanged).
        gamma: exponent applied after contrast (1 = unchanged; >1 darkens mid-tones).
        noise_std: std of additive Gaussian detector noise, in units of the [0, 1] range.
        blur_sigma: std of a Gaussian blur in pixels of the image it is applied to (0 = none).
        magnification: geometric zoom about the image centre (AP films sit closer to the
            source and magnify the heart and lungs; 1 = unchanged).
    """

    contrast: float = 1.0
    gamma: float = 1.0
    noise_std: float = 0.0
    blur_sigma: float = 0.0
    magnification: float = 1.0

    def __post_init__(self) -> None:
        if self.contrast <= 0:
            raise ValueError(f"contrast must be > 0; got {self.contrast}")
        if self.gamma <= 0:
            raise ValueError(f"gamma must be > 0; got {self.gamma}")
        if self.noise_std < 0 or self.blur_sigma < 0:
            raise ValueError(
                f"noise_std and blur_sigma must be >= 0; got {self.noise_std}, {self.blur_sigma}"
            )
        if not 0.5 <= self.magnification <= 2.0:
            raise ValueError(f"magnification must lie in [0.5, 2]; got {self.magnification}")

    @property
    def is_neutral(self) -> bool:
        """Whether applying the style leaves every image unchanged."""
        return self == AcquisitionStyle()

    def to_dict(self) -> dict[str, float]:
        """Return the style as ``{field: value}`` (for manifests and JSON)."""
        return asdict(self)

    @classmethod
    def random(cls, rng: np.random.Generator, *, strength: float = 1.0) -> "AcquisitionStyle":
        """Draw a plausible scanner style; ``strength`` 0 gives the neutral style."""
        return cls(
            contrast=float(np.exp(rng.uniform(-0.35, 0.35) * strength)),
            gamma=float(np.exp(rng.uniform(-0.4, 0.4) * strength)),
            noise_std=float(rng.uniform(0.0, 0.04) * strength),
            blur_sigma=float(rng.uniform(0.0, 1.5) * strength),
            magnification=1.0,
        )


def apply_style(image: np.ndarray, style: AcquisitionStyle, *, seed: int) -> np.ndarray:
    """Return ``image`` (float in [0, 1], 2-D) as ``style``'s scanner would record it.

    The noise is drawn from ``seed``, so one (image, style, seed) always gives one result.
    Magnification is not applied here because it moves the lesion masks too; the
    generator applies it to the geometry before drawing.
    """
    if image.ndim != 2:
        raise ValueError(f"apply_style expects a 2-D image, got shape {image.shape}")
    if style.is_neutral:
        return image.astype(np.float32, copy=False)
    out = image.astype(np.float32, copy=True)
    if style.blur_sigma > 0:
        out = _gaussian_blur(out, style.blur_sigma)
    out = np.clip(0.5 + (out - 0.5) * style.contrast, 0.0, 1.0)
    if style.gamma != 1.0:
        out = out**style.gamma
    if style.noise_std > 0:
        rng = np.random.default_rng(seed)
        out = out + rng.normal(0.0, style.noise_std, size=out.shape).astype(np.float32)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    radius = max(1, int(round(3 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(image, radius, mode="reflect")
    rows = np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="valid"), 1, padded)
    return np.apply_along_axis(lambda c: np.convolve(c, kernel, mode="valid"), 0, rows)

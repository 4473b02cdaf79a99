"""Rendering of a synthetic frontal chest radiograph with pneumonia-like opacities.

The picture is built as a density map in [0, 1] (bright = dense, as MONOCHROME2 shows
it) from smooth analytic shapes in normalised coordinates ``u`` (left to right) and ``v``
(top to bottom), both in [0, 1] at pixel centres, so one anatomy renders the same at any
size. The anatomy layers, from back to front, are body and soft tissue, two lung fields
with diaphragm domes and tapered apices, vessel markings growing denser towards the hila,
posterior and anterior ribs, clavicles, spine, mediastinum and heart. Findings follow: a
"Not Normal" image gets cardiomegaly, a basal effusion or a nodule, and some portable AP
films show a tube. Then come a detector blur, the opacities inside the label boxes, and
last exposure variation and detector noise.

An opacity is confined to its box: every pixel it brightens has its centre inside the
box, so the box mask covers the whole lesion. Shapes and intensities are hand-tuned to
resemble RSNA images at a glance. They are not fitted to pixel statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
from PIL import Image

from common.data.masks import pixel_span
from common.data.records import Box

SOFT_TISSUE = 0.58
LUNG_AIR_DROP = 0.40  # density removed inside the lungs (air)
HEART_DENSITY = 0.66
MEDIASTINUM_DENSITY = 0.66
OPACITY_DENSITY = 0.72  # density an opacity tends to at full strength
BACKGROUND = 0.04
AP_HEART_MAGNIFICATION = 1.15
"""AP films sit closer to the X-ray source than PA films, which magnifies the heart by
roughly 15 to 20 % (cardiothoracic ratio on AP films is read with this allowance)."""

LUNG_MARGIN = 0.02
MAX_DIAPHRAGM = 0.93
MIN_LUNG_TOP = 0.05
MAX_HALF_WIDTH = 0.21
"""Limits, as fractions of the image side, when lungs are stretched to hold the boxes."""

CARDIOMEGALY_FACTOR = 1.3
OPACITY_NOISE_CELLS = 5
"""Random-field cells across an opacity's box: blobs about a fifth of the box."""

FINDINGS = ("cardiomegaly", "effusion", "nodule")
"""Non-pneumonia findings drawn for "No Lung Opacity / Not Normal" images."""

DEVICE_RATE_AP = 0.25
"""Share of AP (portable) films showing a tube or line."""

ANATOMY_RENDER_SIZE = 512
MIN_RENDER_SIZE = 32
"""The smooth anatomy is computed at half the image side, within these bounds, and
upsampled bilinearly, which is the detector blur. At full side the blur would halve and
restore it anyway, so this costs no detail and a quarter of the arithmetic."""

NOISE_STD = (0.008, 0.02)
"""Range of the detector noise std drawn per image, in [0, 1] units at mid grey."""


@dataclass(frozen=True)
class Anatomy:
    """Per-image geometry in normalised coordinates (fractions of the image side)."""

    centre_u: float
    lung_offset: float  # distance of each lung centre from the midline
    lung_half_width: float
    lung_top: float
    diaphragm: tuple[float, float]  # bottom of the image-left and image-right lung
    heart_half_width: float
    heart_half_height: float
    heart_centre: tuple[float, float]
    rib_spacing: float
    tilt: float  # small rotation, radians


def draw_anatomy(
    rng: np.random.Generator,
    *,
    view_position: str,
    finding: str,
    boxes: Sequence[Box] = (),
    reference_size: int = 1024,
) -> Anatomy:
    """Draw one patient's geometry; AP films get a magnified heart.

    The lung fields are then stretched to hold ``boxes`` (pixels of a ``reference_size``
    image), because real opacities lie in the lungs. A box below the drawn diaphragm
    lowers it, one above the apex raises it, and one beyond the chest wall widens the lungs.
    """
    scale = float(np.clip(rng.normal(1.0, 0.04), 0.88, 1.12))
    heart = 0.125 * scale * float(np.clip(rng.normal(1.0, 0.06), 0.85, 1.2))
    if view_position == "AP":
        heart *= AP_HEART_MAGNIFICATION
    if finding == "cardiomegaly":
        heart *= CARDIOMEGALY_FACTOR
    right_dome = 0.79 + rng.normal(0.0, 0.02)
    anatomy = Anatomy(
        centre_u=0.5 + rng.normal(0.0, 0.01),
        lung_offset=0.205 * scale,
        lung_half_width=0.155 * scale,
        lung_top=0.13 + rng.normal(0.0, 0.012),
        # The patient's right dome (image left) sits higher, above the liver.
        diaphragm=(right_dome - 0.025, right_dome),
        heart_half_width=heart,
        heart_half_height=0.11 * scale,
        heart_centre=(0.5 + 0.055 * scale, 0.64 + rng.normal(0.0, 0.015)),
        rib_spacing=0.064 * scale,
        tilt=float(rng.normal(0.0, 0.02)),
    )
    return _fit_lungs_to_boxes(anatomy, boxes, reference_size)


def _fit_lungs_to_boxes(anatomy: Anatomy, boxes: Sequence[Box], reference_size: int) -> Anatomy:
    top, bottoms, half_width = anatomy.lung_top, list(anatomy.diaphragm), anatomy.lung_half_width
    for box in boxes:
        x0, y0 = box.x / reference_size, box.y / reference_size
        x1, y1 = x0 + box.width / reference_size, y0 + box.height / reference_size
        side = 0 if (x0 + x1) / 2 < anatomy.centre_u else 1
        bottoms[side] = max(bottoms[side], min(y1 + LUNG_MARGIN, MAX_DIAPHRAGM))
        top = min(top, max(y0 - LUNG_MARGIN, MIN_LUNG_TOP))
        lateral = anatomy.centre_u - x0 if side == 0 else x1 - anatomy.centre_u
        half_width = max(half_width, min(lateral + LUNG_MARGIN - anatomy.lung_offset, MAX_HALF_WIDTH))
    return replace(anatomy, lung_top=top, diaphragm=(bottoms[0], bottoms[1]), lung_half_width=half_width)


def render_chest(
    rng: np.random.Generator,
    *,
    size: int,
    anatomy: Anatomy,
    boxes: tuple[Box, ...],
    finding: str,
    device: bool,
    magnification: float = 1.0,
) -> np.ndarray:
    """Return a float32 [size, size] radiograph in [0, 1].

    ``boxes`` are in pixels of this image; each gets an opacity inside it. The anatomy is
    zoomed by ``magnification`` about the image centre (the boxes are not: the caller
    zooms them so that they stay on the same anatomy). Anatomy, findings, opacities and
    exposure draw from separate streams of ``rng``, and everything after the opacities is
    pointwise, so the same call without boxes differs only at pixels inside the boxes.
    """
    anatomy_rng, finding_rng, opacity_rng, exposure_rng = rng.spawn(4)
    work = min(max(size // 2, MIN_RENDER_SIZE), ANATOMY_RENDER_SIZE, size)
    u, v = _grid(work, anatomy, magnification)
    density, lungs, lung_side = _anatomy_density(anatomy_rng, u, v, anatomy, work)
    if finding == "effusion":
        effusion = _effusion(finding_rng, u, v, anatomy, lung_side) * lungs
        density = _blend(density, 0.64, effusion)
    elif finding == "nodule":
        density = _blend(density, 0.7, _nodule(finding_rng, u, v, anatomy))
    if device:
        density = density + 0.25 * _tube(finding_rng, u, v, anatomy)
    density = _detector_blur(density, size)
    for box in boxes:
        _add_opacity(opacity_rng, density, box)
    density = _expose(exposure_rng, density, size)
    return np.clip(density, 0.0, 1.0).astype(np.float32)


def _anatomy_density(
    rng: np.random.Generator, u: np.ndarray, v: np.ndarray, anatomy: Anatomy, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    body = _soft_step(_superellipse_inside(u - anatomy.centre_u, v - 0.64, 0.47, 0.66, 4), 0.02)
    lungs, lung_side = _lungs(u, v, anatomy)
    thorax = _soft_step(0.43 - np.abs(u - anatomy.centre_u), 0.02) * _soft_step(
        max(anatomy.diaphragm) + 0.02 - v, 0.02
    )
    density = BACKGROUND + (SOFT_TISSUE - BACKGROUND) * body
    # Below the diaphragm the abdomen is denser than the chest wall.
    density = density + 0.08 * body * _soft_step(v - max(anatomy.diaphragm) + 0.03, 0.04)
    density = density - LUNG_AIR_DROP * lungs * (0.85 + 0.15 * _soft_step(0.45 - v, 0.15))
    density = density + 0.1 * lungs * _vessels(rng, u, v, anatomy, size)
    ribs = 0.08 * _posterior_ribs(u, v, anatomy) + 0.035 * _anterior_ribs(u, v, anatomy)
    density = density + ribs * thorax * (0.35 + 0.65 * lungs)
    density = density + 0.10 * _clavicles(u, v, anatomy)
    density = _blend(density, MEDIASTINUM_DENSITY, _mediastinum(u, v, anatomy))
    density = _blend(density, HEART_DENSITY, _heart(u, v, anatomy))
    density = density + 0.03 * _spine(u, v, anatomy)
    return density, lungs, lung_side


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Return a [size, size] random field of unit std varying over ``size / cells`` pixels."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    field = np.asarray(
        Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32
    )
    return field / max(float(field.std()), 1e-6)


def _grid(size: int, anatomy: Anatomy, magnification: float) -> tuple[np.ndarray, np.ndarray]:
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size
    u, v = np.meshgrid(centres, centres)
    u = 0.5 + (u - 0.5) / magnification
    v = 0.5 + (v - 0.5) / magnification
    cos, sin = np.cos(anatomy.tilt), np.sin(anatomy.tilt)
    du, dv = u - 0.5, v - 0.5
    return 0.5 + cos * du - sin * dv, 0.5 + sin * du + cos * dv


def _lungs(u: np.ndarray, v: np.ndarray, a: Anatomy) -> tuple[np.ndarray, np.ndarray]:
    total = np.zeros_like(u)
    side_of = np.where(u < a.centre_u, -1.0, 1.0).astype(np.float32)
    for side, bottom in zip((-1.0, 1.0), a.diaphragm):
        centre = a.centre_u + side * a.lung_offset
        mid, half_height = (a.lung_top + bottom) / 2.0, (bottom - a.lung_top) / 2.0
        # Apices are narrower than the bases: the half-width grows over the top third.
        taper = 0.55 + 0.45 * np.clip((v - a.lung_top) / (1.4 * half_height), 0.0, 1.0) ** 0.7
        dx = (u - centre) / (a.lung_half_width * taper)
        shape = _superellipse_inside(dx, (v - mid) / half_height, 1.0, 1.0, 3)
        # Diaphragm dome: the lung base rises towards the lung's centre.
        dome = bottom - 0.05 * (1.0 - np.clip(dx, -1.0, 1.0) ** 2) - v
        total = np.maximum(total, _soft_step(np.minimum(shape, dome * 8.0), 0.06))
    return total, side_of


def _vessels(
    rng: np.random.Generator, u: np.ndarray, v: np.ndarray, a: Anatomy, size: int
) -> np.ndarray:
    texture = 0.5 * smooth_noise(rng, size, 20) + 0.5 * smooth_noise(rng, size, 64)
    hilum_distance = np.hypot(np.abs(u - a.centre_u) - 0.09, (v - 0.45) * 0.8)
    # Vessel markings are densest at the hila and fade to the lung periphery.
    return (0.6 + 0.4 * texture) * np.exp(-hilum_distance / 0.13)


def _posterior_ribs(u: np.ndarray, v: np.ndarray, a: Anatomy) -> np.ndarray:
    d = np.abs(u - a.centre_u)
    # Posterior ribs leave the spine almost level and curve down towards the chest wall.
    curve = -0.12 * d + 1.8 * np.maximum(d - 0.1, 0.0) ** 2
    return _rib_bands(v - curve, a, phase=0.0)


def _anterior_ribs(u: np.ndarray, v: np.ndarray, a: Anatomy) -> np.ndarray:
    d = np.abs(u - a.centre_u)
    # Anterior ribs run down and in from the chest wall towards the sternum.
    curve = 0.45 * (0.42 - np.clip(d, 0.05, 0.42))
    return _rib_bands(v - curve, a, phase=0.5) * _soft_step(d - 0.07, 0.02)


def _rib_bands(t: np.ndarray, a: Anatomy, *, phase: float) -> np.ndarray:
    position = (t - a.lung_top + 0.03) / a.rib_spacing
    inside = (position > 0) & (position < 10.5)
    bands = np.maximum(np.cos(2.0 * np.pi * (position - phase)), 0.0)
    bands = bands * bands
    return bands * inside


def _clavicles(u: np.ndarray, v: np.ndarray, a: Anatomy) -> np.ndarray:
    d = np.abs(u - a.centre_u)
    # From the sternal end just below the lung apex, up and out to the shoulder.
    line = a.lung_top + 0.035 - 0.2 * (d - 0.05) + 0.15 * np.maximum(d - 0.25, 0.0)
    band = np.exp(-(((v - line) / 0.018) ** 2))
    return band * _soft_step(d - 0.05, 0.01) * _soft_step(0.38 - d, 0.03)


def _mediastinum(u: np.ndarray, v: np.ndarray, a: Anatomy) -> np.ndarray:
    half_width = 0.055 + 0.03 * np.clip((v - 0.25) / 0.3, 0.0, 1.0)
    across = _soft_step(half_width - np.abs(u - a.centre_u - 0.008), 0.012)
    return across * _soft_step(0.7 - v, 0.03)


def _heart(u: np.ndarray, v: np.ndarray, a: Anatomy) -> np.ndarray:
    cu, cv = a.heart_centre
    shape = _superellipse_inside(u - cu, v - cv, a.heart_half_width, a.heart_half_height, 2)
    # The heart's lower border merges into the left dome of the diaphragm.
    return _soft_step(shape, 0.12) * _soft_step(a.diaphragm[1] + 0.03 - v, 0.03)


def _spine(u: np.ndarray, v: np.ndarray, a: Anatomy) -> np.ndarray:
    column = _soft_step(0.03 - np.abs(u - a.centre_u), 0.008)
    vertebrae = 0.6 + 0.4 * np.cos(2.0 * np.pi * v / 0.045) ** 2
    return column * vertebrae


def _effusion(
    rng: np.random.Generator, u: np.ndarray, v: np.ndarray, a: Anatomy, side_of: np.ndarray
) -> np.ndarray:
    side = 1.0 if rng.random() < 0.5 else -1.0
    bottom = a.diaphragm[0 if side < 0 else 1]
    depth = rng.uniform(0.06, 0.14)
    lateral = np.clip(np.abs(u - a.centre_u) - a.lung_offset, -0.2, 0.2)
    # A meniscus: the fluid level climbs along the lateral chest wall.
    level = bottom - depth - 0.35 * np.maximum(lateral, 0.0)
    return _soft_step(v - level, 0.02) * (side_of == side) * _soft_step(bottom + 0.04 - v, 0.02)


def _nodule(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, a: Anatomy) -> np.ndarray:
    side = rng.choice((-1.0, 1.0))
    cu = a.centre_u + side * (a.lung_offset + rng.uniform(-0.06, 0.06))
    cv = rng.uniform(a.lung_top + 0.1, a.diaphragm[0] - 0.1)
    radius = rng.uniform(0.012, 0.028)
    return _soft_step(radius - np.hypot(u - cu, v - cv), 0.004)


def _tube(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, a: Anatomy) -> np.ndarray:
    wiggle = rng.uniform(-0.02, 0.02)
    end = rng.uniform(0.3, 0.75)
    path = a.centre_u + 0.01 + wiggle * np.sin(np.pi * v / end)
    line = np.exp(-(((u - path) / 0.0035) ** 2))
    return line * (v < end)


def _add_opacity(rng: np.random.Generator, density: np.ndarray, box: Box) -> None:
    """Brighten the pixels whose centres lie in ``box`` with a patchy, soft-edged opacity."""
    size = density.shape[0]
    c0, c1 = pixel_span(box.x, box.x + box.width, size)
    r0, r1 = pixel_span(box.y, box.y + box.height, size)
    if c1 <= c0 or r1 <= r0:
        return
    columns = (np.arange(c0, c1, dtype=np.float32) + 0.5 - (box.x + box.width / 2)) / (box.width / 2)
    rows = (np.arange(r0, r1, dtype=np.float32) + 0.5 - (box.y + box.height / 2)) / (box.height / 2)
    dx, dy = np.meshgrid(columns, rows)
    height, width = dy.shape
    side = max(height, width)
    patch = smooth_noise(rng, side, OPACITY_NOISE_CELLS)[:height, :width]
    fine = smooth_noise(rng, side, 2 * OPACITY_NOISE_CELLS)[:height, :width]
    # Consolidation: a hazy, patchy density with ragged edges fading towards the box edges.
    edge = _superellipse_inside(dx, dy, 1.0, 1.0, 2) + 0.25 * patch
    texture = np.clip(0.7 + 0.3 * patch + 0.08 * fine, 0.15, 1.0)
    alpha = rng.uniform(0.35, 0.7) * _soft_step(edge - 0.1, 0.15) * texture
    region = density[r0:r1, c0:c1]
    density[r0:r1, c0:c1] = region + (OPACITY_DENSITY - region) * alpha


def _expose(rng: np.random.Generator, density: np.ndarray, size: int) -> np.ndarray:
    contrast = rng.uniform(0.85, 1.15)
    offset = rng.normal(0.0, 0.03)
    shading = 0.03 * smooth_noise(rng, size, 4)
    out = 0.5 + (density - 0.5) * contrast + offset + shading
    out = np.clip(out, 0.0, 1.0) ** float(np.exp(rng.normal(0.0, 0.08)))
    noise_std = rng.uniform(*NOISE_STD)
    # Fewer photons reach the detector behind dense tissue, so bright areas are noisier.
    noise = rng.standard_normal(out.shape).astype(np.float32) * noise_std * (0.6 + 0.8 * out)
    return out + noise


def _detector_blur(image: np.ndarray, size: int) -> np.ndarray:
    """Soften edges as a detector's point spread does, returning a [size, size] copy.

    An image rendered below ``size`` is upsampled bilinearly, which blurs it; one rendered
    at ``size`` is halved and restored.
    """
    rendered = Image.fromarray(image.astype(np.float32))
    if image.shape[0] == size:
        half = max(size // 2, 1)
        rendered = rendered.resize((half, half), Image.Resampling.BOX)
    return np.array(rendered.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


def _blend(density: np.ndarray, target: float, weight: np.ndarray) -> np.ndarray:
    return density + (target - density) * weight


def _superellipse_inside(
    du: np.ndarray, dv: np.ndarray, half_u: float, half_v: float, power: int
) -> np.ndarray:
    """Return ``(1 - r^p) / p`` for the superellipse radius ``r``: positive inside.

    Near the outline this equals ``1 - r`` to first order, a signed distance in units of
    the half axes, without the cost of a fractional power.
    """
    a, b = np.abs(du / half_u), np.abs(dv / half_v)
    a_power, b_power = a, b
    for _ in range(power - 1):
        a_power, b_power = a_power * a, b_power * b
    return (1.0 - (a_power + b_power)) / power


def _soft_step(x: np.ndarray, width: float) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(x / width))

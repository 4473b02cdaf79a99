"""The torch dataset that training and evaluation read: cached images and masks only."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from common.data.cache import ImageCache
from common.style import AcquisitionStyle, apply_style


class SegmentationDataset(Dataset):
    """Images and masks of ``patient_ids`` from an :class:`ImageCache`, in the order given.

    Item ``k`` is ``(image, mask)``: float32 tensors [1, S, S], the image in [0, 1] and the
    mask of 0.0/1.0. With ``style``, the image is passed through
    :func:`common.style.apply_style` with the seed ``derive_item_seed(style_seed, k)``, so
    item ``k`` looks the same in every epoch and process. A style's ``magnification``
    zooms image and mask together about the centre (the mask by nearest neighbour).
    """

    def __init__(
        self,
        cache: ImageCache,
        patient_ids: Sequence[str],
        *,
        style: AcquisitionStyle | None = None,
        style_seed: int = 0,
    ) -> None:
        self.cache = cache
        self.patient_ids = list(patient_ids)
        self.positions = [cache.position(patient_id) for patient_id in self.patient_ids]
        self.style = style if style is not None and not style.is_neutral else None
        self.style_seed = int(style_seed)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        position = self.positions[index]
        image = self.cache.image(position)
        mask = self.cache.mask(position)
        if self.style is not None:
            if self.style.magnification != 1.0:
                image, mask = magnify(image, mask, self.style.magnification)
            image = apply_style(image, self.style, seed=derive_item_seed(self.style_seed, index))
        return (
            torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None],
            torch.from_numpy(mask.astype(np.float32))[None],
        )

    @property
    def targets(self) -> list[int]:
        """Image-level labels (1 = at least one opacity box) in item order."""
        frame = self.cache.frame
        return [int(frame["target"].iat[position]) for position in self.positions]


def derive_item_seed(style_seed: int, index: int) -> int:
    """Return a 63-bit seed for item ``index``, independent across items (``SeedSequence``)."""
    state = np.random.SeedSequence([int(style_seed) & 0xFFFFFFFFFFFFFFFF, int(index)])
    return int(state.generate_state(1, dtype=np.uint64)[0] >> 1)


def magnify(image: np.ndarray, mask: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Zoom ``image`` (bilinear) and ``mask`` (nearest) by ``factor`` about the image centre.

    Output pixel centre ``p`` samples the input at ``c + (p - c) / factor`` with ``c`` the
    image centre; samples outside the input are 0 (air).
    """
    size = image.shape[1], image.shape[0]
    centre_x, centre_y = size[0] / 2.0, size[1] / 2.0
    inverse = 1.0 / factor
    # Pillow's affine maps output (x, y) to input (a x + b y + c, d x + e y + f).
    coefficients = (inverse, 0.0, centre_x * (1 - inverse), 0.0, inverse, centre_y * (1 - inverse))
    zoomed = Image.fromarray(image.astype(np.float32)).transform(
        size, Image.Transform.AFFINE, coefficients, resample=Image.Resampling.BILINEAR
    )
    zoomed_mask = Image.fromarray(mask.astype(np.uint8)).transform(
        size, Image.Transform.AFFINE, coefficients, resample=Image.Resampling.NEAREST
    )
    return np.asarray(zoomed, dtype=np.float32), np.asarray(zoomed_mask, dtype=np.uint8)

"""Evaluation of a segmentation model on a dataset: loss, Dice, IoU and false-positive rate.

The metrics and their empty-mask convention are defined in :mod:`common.metrics`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from common.metrics import SegmentationScores


def pick_device() -> torch.device:
    """Return ``cuda`` when a GPU is available, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def evaluate_model(
    model: nn.Module,
    dataset: Dataset,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    threshold: float = 0.5,
) -> dict[str, float]:
    """Return loss, dice, dice_positive, iou, fpr, num_examples and num_positive of ``model``.

    Pixels with ``sigmoid(logit) >= threshold`` are predicted positive. The model runs
    in eval mode without gradients on ``device``; its train/eval mode is restored.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
    was_training = model.training
    model.to(device)
    model.eval()
    scores = SegmentationScores()
    try:
        with torch.no_grad():
            for images, targets in DataLoader(dataset, batch_size=batch_size, shuffle=False):
                logits = model(images.to(device))
                scores.add(logits, targets.to(device), threshold=threshold)
    finally:
        model.train(was_training)
    return scores.summary()

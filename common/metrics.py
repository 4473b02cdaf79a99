"""Segmentation loss (soft Dice + BCE) and metrics (Dice, IoU, false-positive rate).

Empty-mask convention, used by every metric here: a metric of an empty predicted mask
against an empty true mask is 1, because a negative image was correctly left empty. An
empty prediction against a non-empty mask, or a non-empty prediction against an empty
mask, is 0. For two non-empty masks it is the usual ``2|P & T| / (|P| + |T|)`` (Dice) or
``|P & T| / |P | T|`` (IoU). Libraries disagree here (some return 0 or NaN for
empty/empty); this convention makes "predict nothing on a healthy lung" count as right.

Every metric is computed per image and then averaged over images, reported three ways:
over all images (``dice``, ``iou``), over images with at least one positive pixel
(``dice_positive``), and as the share of negative images with any predicted pixel
(``fpr``, the image-level false-positive rate).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

SOFT_DICE_SMOOTH = 1.0
"""Additive smoothing of the soft Dice loss, in pixels: an empty prediction of an empty
mask then has loss 0, and the loss stays differentiable on negative images."""


def dice_bce_loss(logits: Tensor, targets: Tensor, *, smooth: float = SOFT_DICE_SMOOTH) -> Tensor:
    """Return the per-image loss ``BCE + (1 - soft Dice)``, shape ``(B,)``.

    ``BCE`` is the mean binary cross-entropy over the image's pixels (from logits);
    soft Dice is ``(2 sum(p t) + s) / (sum(p) + sum(t) + s)`` with ``p = sigmoid(logits)``
    and ``s = smooth``. Each image's loss depends on that image alone, as per-sample
    clipping requires.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"logits shape {tuple(logits.shape)} differs from targets {tuple(targets.shape)}")
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").flatten(1).mean(1)
    probabilities = torch.sigmoid(logits).flatten(1)
    flat_targets = targets.flatten(1)
    intersection = (probabilities * flat_targets).sum(1)
    total = probabilities.sum(1) + flat_targets.sum(1)
    soft_dice = (2 * intersection + smooth) / (total + smooth)
    return bce + (1 - soft_dice)


def dice_iou_per_image(predicted: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Return per-image Dice and IoU of binary masks ``(B, ...)`` under the empty-mask convention."""
    pred = predicted.flatten(1).bool()
    true = targets.flatten(1).bool()
    intersection = (pred & true).sum(1).double()
    union = (pred | true).sum(1).double()
    total = pred.sum(1).double() + true.sum(1).double()
    both_empty = union == 0
    dice = torch.where(both_empty, 1.0, 2 * intersection / total.clamp(min=1))
    iou = torch.where(both_empty, 1.0, intersection / union.clamp(min=1))
    return dice, iou


@dataclass
class SegmentationScores:
    """Running sums of per-image metrics; :meth:`summary` gives the averages."""

    loss_sum: float = 0.0
    dice: list[Tensor] = field(default_factory=list)
    iou: list[Tensor] = field(default_factory=list)
    positive: list[Tensor] = field(default_factory=list)
    predicted_any: list[Tensor] = field(default_factory=list)

    def add(self, logits: Tensor, targets: Tensor, *, threshold: float = 0.5) -> None:
        """Add a batch: ``logits`` and 0/1 ``targets`` of shape ``(B, 1, H, W)``."""
        self.loss_sum += float(dice_bce_loss(logits, targets).sum())
        predicted = torch.sigmoid(logits) >= threshold
        dice, iou = dice_iou_per_image(predicted, targets)
        self.dice.append(dice.cpu())
        self.iou.append(iou.cpu())
        self.positive.append(targets.flatten(1).bool().any(1).cpu())
        self.predicted_any.append(predicted.flatten(1).any(1).cpu())

    def summary(self) -> dict[str, float]:
        """Return loss, dice, dice_positive, iou, fpr, num_examples and num_positive.

        Averages over an empty set (no images, no positive or no negative image) are NaN.
        """
        count = sum(len(d) for d in self.dice)
        if count == 0:
            nan = float("nan")
            return {"loss": nan, "dice": nan, "dice_positive": nan, "iou": nan, "fpr": nan,
                    "num_examples": 0.0, "num_positive": 0.0}
        dice, iou = torch.cat(self.dice), torch.cat(self.iou)
        positive, predicted_any = torch.cat(self.positive), torch.cat(self.predicted_any)
        return {
            "loss": self.loss_sum / count,
            "dice": float(dice.mean()),
            "dice_positive": _mean(dice[positive]),
            "iou": float(iou.mean()),
            "fpr": _mean(predicted_any[~positive].double()),
            "num_examples": float(count),
            "num_positive": float(positive.sum()),
        }


def _mean(values: Tensor) -> float:
    return float(values.mean()) if values.numel() else float("nan")

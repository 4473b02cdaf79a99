"""Loss and metrics, with the empty-mask convention checked case by case."""

from __future__ import annotations

import math

import pytest
import torch

from common.metrics import SegmentationScores, dice_bce_loss, dice_iou_per_image

EMPTY = torch.zeros(1, 1, 4, 4)


def mask(*pixels: tuple[int, int]) -> torch.Tensor:
    out = torch.zeros(1, 1, 4, 4)
    for row, column in pixels:
        out[0, 0, row, column] = 1
    return out


@pytest.mark.parametrize(
    ("predicted", "target", "dice", "iou"),
    [
        (EMPTY, EMPTY, 1.0, 1.0),  # negative image left empty: right
        (mask((0, 0)), EMPTY, 0.0, 0.0),  # false positive
        (EMPTY, mask((0, 0)), 0.0, 0.0),  # missed lesion
        (mask((0, 0), (0, 1)), mask((0, 1), (0, 2), (0, 3)), 2 * 1 / 5, 1 / 4),
        (mask((1, 1)), mask((1, 1)), 1.0, 1.0),
    ],
)
def test_dice_iou_convention(predicted, target, dice, iou):
    got_dice, got_iou = dice_iou_per_image(predicted, target)
    assert got_dice.item() == pytest.approx(dice, abs=1e-12)
    assert got_iou.item() == pytest.approx(iou, abs=1e-12)


def logits_of(predicted: torch.Tensor) -> torch.Tensor:
    return torch.where(predicted > 0, 20.0, -20.0)


def test_scores_report_overall_positive_and_fpr():
    predictions = torch.cat([EMPTY, mask((0, 0)), mask((0, 0), (0, 1)), EMPTY])
    targets = torch.cat([EMPTY, EMPTY, mask((0, 1), (0, 2), (0, 3)), mask((2, 2))])
    scores = SegmentationScores()
    scores.add(logits_of(predictions[:2]), targets[:2])
    scores.add(logits_of(predictions[2:]), targets[2:])
    summary = scores.summary()
    assert summary["num_examples"] == 4
    assert summary["num_positive"] == 2
    assert summary["dice"] == pytest.approx((1 + 0 + 0.4 + 0) / 4)
    assert summary["iou"] == pytest.approx((1 + 0 + 0.25 + 0) / 4)
    assert summary["dice_positive"] == pytest.approx(0.2)
    assert summary["fpr"] == pytest.approx(0.5)
    expected_loss = dice_bce_loss(logits_of(predictions), targets).mean().item()
    assert summary["loss"] == pytest.approx(expected_loss)


def test_threshold_applies_to_probabilities():
    scores = SegmentationScores()
    scores.add(torch.full((1, 1, 4, 4), 0.1), EMPTY, threshold=0.6)  # sigmoid(0.1) = 0.525
    assert scores.summary()["fpr"] == 0.0


def test_summary_without_negatives_or_images_is_nan():
    scores = SegmentationScores()
    assert math.isnan(scores.summary()["dice"])
    scores.add(logits_of(mask((0, 0))), mask((0, 0)))
    assert math.isnan(scores.summary()["fpr"])
    assert scores.summary()["dice_positive"] == 1.0


def test_loss_of_confident_correct_prediction_is_near_zero():
    target = mask((1, 1), (1, 2))
    assert dice_bce_loss(logits_of(target), target).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_bce_loss(logits_of(EMPTY), EMPTY).item() == pytest.approx(0.0, abs=1e-6)


def test_loss_matches_hand_computation():
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 0.5]]]])
    target = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    p = torch.sigmoid(logits)
    bce = -(target * p.log() + (1 - target) * (1 - p).log()).mean()
    dice = (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    assert dice_bce_loss(logits, target).item() == pytest.approx((bce + 1 - dice).item(), rel=1e-6)


def test_loss_is_per_image():
    logits = torch.randn(3, 1, 4, 4)
    targets = (torch.rand(3, 1, 4, 4) > 0.5).float()
    batched = dice_bce_loss(logits, targets)
    singles = torch.cat([dice_bce_loss(logits[i : i + 1], targets[i : i + 1]) for i in range(3)])
    assert torch.allclose(batched, singles)


def test_loss_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="logits shape \\(1, 1, 4, 4\\) differs"):
        dice_bce_loss(EMPTY, torch.zeros(1, 1, 2, 2))

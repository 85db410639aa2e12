"""Metric functions on hand-computed cases and their invariances."""

import math

import pytest
import torch

from mtssm.metrics import (
    SALIENCY_THRESHOLDS,
    depth_rmse,
    miou,
    normals_mean_angle,
    saliency_maxf,
)

# ------------------------------------------------------------------ mIoU

PRED_A = torch.tensor([[0, 1], [1, 1]])
LABEL_A = torch.tensor([[0, 0], [1, 1]])


def test_miou_two_by_two_confusion():
    # confusion [[1, 1], [0, 2]]: IoU0 = 1 / 2, IoU1 = 2 / 3
    assert miou(PRED_A, LABEL_A, num_classes=2) == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)


def test_miou_is_dataset_level_not_image_mean():
    pred_b, label_b = torch.tensor([[0, 0]]), torch.tensor([[0, 0]])
    # summed confusion [[3, 1], [0, 2]]: IoU0 = 3 / 4, IoU1 = 2 / 3
    expected = 100 * (3 / 4 + 2 / 3) / 2
    assert miou([PRED_A, pred_b], [LABEL_A, label_b], num_classes=2) == pytest.approx(expected)
    per_image_mean = (miou(PRED_A, LABEL_A, 2) + miou(pred_b, label_b, 2)) / 2
    assert per_image_mean != pytest.approx(expected)


def test_miou_ignores_ignore_index_pixels():
    pred = torch.tensor([[0, 1, 1], [1, 1, 0]])
    label = torch.tensor([[0, 0, 255], [1, 1, 255]])
    assert miou(pred, label, 2) == pytest.approx(miou(PRED_A, LABEL_A, 2))
    assert miou(pred, torch.where(label == 255, 7, label), 2, ignore_index=7) == pytest.approx(
        miou(PRED_A, LABEL_A, 2)
    )


def test_miou_perfect_and_permutation_invariant():
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 5, (3, 8, 8), generator=g)
    pred = torch.where(torch.rand(3, 8, 8, generator=g) < 0.3, torch.randint(0, 5, (3, 8, 8), generator=g), label)
    assert miou(label, label, 5) == pytest.approx(100.0)
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert miou(perm[pred], perm[label], 5) == pytest.approx(miou(pred, label, 5))
    assert miou(pred.numpy(), label.numpy(), 5) == pytest.approx(miou(pred, label, 5))


def test_miou_bad_input():
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        miou(torch.tensor([0, 2]), torch.tensor([0, 1]), 2)
    with pytest.raises(TypeError, match="integer class ids"):
        miou(torch.rand(2, 2), LABEL_A, 2)
    with pytest.raises(ValueError, match="prediction shape"):
        miou(PRED_A, LABEL_A[:1], 2)
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        miou([PRED_A, PRED_A], [LABEL_A], 2)


# ------------------------------------------------------------------ depth RMSE


def test_depth_rmse_valid_pixels_dataset_level():
    pred1, gt1 = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 0.0, 5.0, 4.0])
    assert depth_rmse(pred1, gt1) == pytest.approx(math.sqrt(4 / 3))  # errors 0, -, -2, 0
    pred2, gt2 = torch.tensor([0.0]), torch.tensor([2.0])
    # dataset level: (4 + 4) / (3 + 1) valid pixels, not the mean of per-image RMSEs
    assert depth_rmse([pred1, pred2], [gt1, gt2]) == pytest.approx(math.sqrt(2.0))
    gt = torch.rand(2, 1, 4, 4) + 0.1
    assert depth_rmse(gt, gt) == 0.0
    assert math.isnan(depth_rmse(pred1, torch.zeros(4)))


# ------------------------------------------------------------------ normals mean angle


def test_normals_mean_angle_hand_computed():
    pred = torch.tensor([[1.0, 0, 0], [2.0, 0, 0], [1.0, 1.0, 0], [5.0, 5.0, 5.0]]).T.reshape(3, 1, 4)
    gt = torch.tensor([[0, 1.0, 0], [1.0, 0, 0], [1.0, 0, 0], [0, 0, 0]]).T.reshape(3, 1, 4)
    # angles 90, 0 (unnormalised prediction), 45; the all-zero label vector is invalid
    assert normals_mean_angle(pred, gt) == pytest.approx((90 + 0 + 45) / 3)
    assert normals_mean_angle(-gt[:, :, :3], gt[:, :, :3]) == pytest.approx(180.0)


def test_normals_mean_angle_batch_list_and_scale_invariant():
    g = torch.Generator().manual_seed(1)
    pred, gt = torch.randn(2, 3, 5, 5, generator=g), torch.randn(2, 3, 5, 5, generator=g)
    value = normals_mean_angle(pred, gt)
    assert normals_mean_angle([pred[0], pred[1]], [gt[0], gt[1]]) == pytest.approx(value)
    assert normals_mean_angle(3.0 * pred, 0.5 * gt) == pytest.approx(value)
    cos = torch.nn.functional.cosine_similarity(pred.double(), gt.double(), dim=1)
    assert value == pytest.approx(float(torch.rad2deg(torch.acos(cos)).mean()), rel=1e-6)
    assert normals_mean_angle(gt, gt) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        normals_mean_angle(pred[:, :2], gt[:, :2])


# ------------------------------------------------------------------ saliency maxF


def f_beta(p, r, beta2=0.3):
    return (1 + beta2) * p * r / (beta2 * p + r)


def test_saliency_maxf_hand_computed():
    probs, gt = torch.tensor([0.9, 0.6, 0.1]), torch.tensor([1, 0, 0])
    # at 0.5: tp 1, predicted 2, actual 1 -> P = 1/2, R = 1
    assert saliency_maxf(probs[None], gt[None], thresholds=[0.5]) == pytest.approx(100 * f_beta(0.5, 1.0))
    assert saliency_maxf(probs[None], gt[None], thresholds=[0.5, 0.7]) == pytest.approx(100.0)
    # a probability equal to the threshold counts as salient
    assert saliency_maxf(torch.tensor([[0.5, 0.2]]), torch.tensor([[1, 0]]), thresholds=[0.5]) == pytest.approx(100)


def test_saliency_maxf_protocols():
    probs_a, gt_a = torch.tensor([[0.9, 0.6]]), torch.tensor([[1, 0]])
    probs_b, gt_b = torch.tensor([[0.9, 0.2, 0.2, 0.2]]), torch.tensor([[1, 1, 1, 1]])
    # dataset: tp 2, predicted 3, actual 5
    dataset = saliency_maxf([probs_a, probs_b], [gt_a, gt_b], thresholds=[0.5])
    assert dataset == pytest.approx(100 * f_beta(2 / 3, 2 / 5))
    # per image: P = (1/2 + 1) / 2, R = (1 + 1/4) / 2
    per_image = saliency_maxf([probs_a, probs_b], [gt_a, gt_b], thresholds=[0.5], protocol="per_image")
    assert per_image == pytest.approx(100 * f_beta(0.75, 0.625))


def test_saliency_maxf_matches_threshold_loop_and_ignores():
    assert SALIENCY_THRESHOLDS[0] == 0.05 and SALIENCY_THRESHOLDS[-1] == 0.95 and len(SALIENCY_THRESHOLDS) == 19
    g = torch.Generator().manual_seed(2)
    probs = torch.rand(3, 6, 7, generator=g)
    gt = (torch.rand(3, 6, 7, generator=g) < probs).long()
    gt[0, :2] = 255
    valid = gt != 255
    best = 0.0
    for t in SALIENCY_THRESHOLDS:
        pos = (probs >= t) & valid
        tp = (pos & (gt == 1)).sum().item()
        p, r = tp / max(pos.sum().item(), 1), tp / (gt == 1).sum().item()
        best = max(best, f_beta(p, r) if p + r else 0.0)
    assert saliency_maxf(probs, gt) == pytest.approx(100 * best)
    probs_changed = probs.clone()
    probs_changed[0, :2] = 1 - probs_changed[0, :2]
    assert saliency_maxf(probs_changed, gt) == pytest.approx(100 * best)
    assert saliency_maxf(gt.clamp(max=1).float(), gt) == pytest.approx(100.0)

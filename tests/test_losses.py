"""Per-task losses: hand-computed values, ignore handling, empty batches, gradients."""

import math

import pytest
import torch
import torch.nn.functional as F
from tensordict import TensorDict

from mtssm.losses import (
    BalancedBCELoss,
    BalancedCELoss,
    DepthL1Loss,
    MultiTaskLoss,
    NormalsL1Loss,
    SegmentationCELoss,
    build_task_losses,
)

B, H, W = 2, 4, 5
TASKS = ["semseg", "human_parts", "depth", "normals", "sal", "edge"]


def labels_and_outputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = {
        "semseg": torch.randint(0, 4, (B, H, W), generator=g),
        "human_parts": torch.randint(0, 3, (B, H, W), generator=g),
        "depth": torch.rand(B, 1, H, W, generator=g) + 0.1,
        "normals": F.normalize(torch.randn(B, 3, H, W, generator=g), dim=1),
        "sal": torch.randint(0, 2, (B, H, W), generator=g),
        "edge": torch.randint(0, 2, (B, 1, H, W), generator=g).float(),
    }
    channels = {"semseg": 4, "human_parts": 3, "depth": 1, "normals": 3, "sal": 2, "edge": 1}
    outputs = {t: torch.randn(B, c, H, W, generator=g, requires_grad=True) for t, c in channels.items()}
    return outputs, labels


def invalidate(labels: dict) -> dict:
    """Every pixel unlabelled."""
    return {
        t: torch.zeros_like(v) if t in ("depth", "normals") else torch.full_like(v, 255)
        for t, v in labels.items()
    }


def test_segmentation_ce_ignores_255():
    outputs, labels = labels_and_outputs()
    logits, label = outputs["semseg"], labels["semseg"].clone()
    label[0, :2] = 255
    valid = label != 255
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[valid], label[valid])
    assert SegmentationCELoss()(logits, label).item() == pytest.approx(expected.item(), rel=1e-6)
    changed = logits.detach().clone()
    changed[0, :, :2] += 100.0
    assert SegmentationCELoss()(changed, label) == pytest.approx(expected.item(), rel=1e-6)


def test_balanced_ce_hand_computed():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, -0.5], [0.0, 3.0]]).T.reshape(1, 2, 1, 5)
    label = torch.tensor([[[1, 0, 0, 0, 255]]])
    ce = F.cross_entropy(logits[0, :, 0, :4].T, label[0, 0, :4], reduction="none")
    w_pos = 3 / 4  # fraction of valid pixels that are negative
    expected = (w_pos * ce[0] + (1 - w_pos) * ce[1:].sum()) / 4
    assert BalancedCELoss()(logits, label) == pytest.approx(expected.item(), rel=1e-6)


def test_balanced_bce_hand_computed():
    logits = torch.tensor([0.3, -1.2, 2.0, 5.0]).reshape(1, 1, 1, 4)
    label = torch.tensor([1.0, 0.0, 1.0, 255.0]).reshape(1, 1, 1, 4)
    s = torch.sigmoid(logits.flatten()[:3])
    terms = [-0.95 * math.log(s[0]), -0.05 * math.log(1 - s[1]), -0.95 * math.log(s[2])]
    assert BalancedBCELoss()(logits, label) == pytest.approx(sum(terms) / 3, rel=1e-5)
    assert BalancedBCELoss(pos_weight=0.5)(logits, label) == pytest.approx(
        0.5 * F.binary_cross_entropy_with_logits(logits.flatten()[:3], label.flatten()[:3]).item(), rel=1e-5
    )
    with pytest.raises(ValueError, match="pos_weight"):
        BalancedBCELoss(pos_weight=1.0)


def test_depth_and_normals_l1_hand_computed():
    pred = torch.tensor([1.0, 2.0, 3.0]).reshape(1, 1, 1, 3)
    gt = torch.tensor([2.0, 0.0, 5.0]).reshape(1, 1, 1, 3)
    assert DepthL1Loss()(pred, gt) == pytest.approx((1 + 2) / 2)
    pred_n = torch.tensor([[2.0, 0, 0], [0, 1.0, 0], [7.0, 7.0, 7.0]]).T.reshape(1, 3, 1, 3)
    gt_n = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 0, 0]]).T.reshape(1, 3, 1, 3)
    # |(1,0,0)-(1,0,0)|_1 = 0, |(0,1,0)-(1,0,0)|_1 = 2; the zero label vector is invalid
    assert NormalsL1Loss()(pred_n, gt_n) == pytest.approx(1.0)


@pytest.mark.parametrize("task", TASKS)
def test_no_valid_pixel_gives_finite_zero_attached_to_graph(task):
    outputs, labels = labels_and_outputs()
    loss_fn = build_task_losses([task]).losses[task]
    loss = loss_fn(outputs[task], invalidate(labels)[task])
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.isfinite(outputs[task].grad).all() and (outputs[task].grad == 0).all()


@pytest.mark.parametrize("task", TASKS)
def test_gradients_finite_and_nonzero(task):
    outputs, labels = labels_and_outputs(1)
    loss = build_task_losses([task]).losses[task](outputs[task], labels[task])
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(outputs[task].grad).all()
    assert outputs[task].grad.abs().sum() > 0


def test_multitask_loss_weighted_sum_and_tensordict():
    outputs, labels = labels_and_outputs(2)
    weights = {"semseg": 1.0, "human_parts": 2.0, "depth": 1.0, "normals": 10.0, "sal": 5.0, "edge": 50.0}
    criterion = build_task_losses(TASKS, weights)
    assert set(criterion.losses) == set(TASKS)
    total, per_task = criterion(outputs, labels)
    assert total.item() == pytest.approx(sum(weights[t] * per_task[t].item() for t in TASKS), rel=1e-6)
    td_out = TensorDict({k: v for k, v in outputs.items()}, batch_size=[B])
    td_lab = TensorDict(labels, batch_size=[B])
    total_td, _ = criterion(td_out, td_lab)
    assert total_td.item() == pytest.approx(total.item())
    # a task with no labels in the batch leaves the total finite
    partial = dict(labels, edge=torch.full_like(labels["edge"], 255))
    total_partial, per_task_partial = criterion(outputs, partial)
    assert per_task_partial["edge"].item() == 0.0 and torch.isfinite(total_partial)
    total_partial.backward()
    assert all(torch.isfinite(v.grad).all() for v in outputs.values())


def test_outputs_resized_to_label_size():
    outputs, labels = labels_and_outputs(3)
    small = F.interpolate(outputs["depth"].detach(), scale_factor=0.5)
    assert torch.isfinite(DepthL1Loss()(small, labels["depth"]))


def test_bad_input_messages():
    with pytest.raises(ValueError, match="unknown task 'segm'"):
        build_task_losses(["segm"])
    with pytest.raises(ValueError, match=r"missing tasks \['depth'\]"):
        build_task_losses(["semseg", "depth"], {"semseg": 1.0})
    with pytest.raises(ValueError, match=r"unknown tasks \['sal'\]"):
        MultiTaskLoss({"depth": DepthL1Loss()}, {"depth": 1.0, "sal": 1.0})
    outputs, labels = labels_and_outputs()
    criterion = build_task_losses(["depth", "edge"])
    with pytest.raises(KeyError, match="outputs: missing task 'edge'"):
        criterion({"depth": outputs["depth"]}, labels)
    with pytest.raises(ValueError, match=r"expected output \(B, 3, H, W\)"):
        NormalsL1Loss()(outputs["depth"], labels["normals"])

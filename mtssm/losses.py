"""Per-task training losses and their weighted sum.

Outputs and labels follow the layout of :mod:`mtssm.metrics.evaluator`: segmentation logits
(B, K, H, W) with int64 labels (B, H, W) (255 ignored); depth (B, 1, H, W) with 0 = invalid;
normals (B, 3, H, W) with all-zero label vectors invalid; saliency logits (B, 2, H, W) with int64
labels (B, H, W) in {0, 1} (255 ignored); boundary logits (B, 1, H, W) with float labels in {0, 1}
(255 ignored). Outputs whose spatial size differs from the labels' are resized bilinearly first.

Every loss averages over the valid pixels of the batch and is 0 (still attached to the graph, with
zero gradients) when the batch has none, so a batch without labels for a task never gives NaN.
The definitions follow the losses of the InvPT code base used by MTMamba and MSM.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtssm.tasks import IGNORE_INDEX, TASKS

__all__ = [
    "TASK_LOSSES",
    "BalancedBCELoss",
    "BalancedCELoss",
    "DepthL1Loss",
    "MultiTaskLoss",
    "NormalsL1Loss",
    "SegmentationCELoss",
    "build_task_losses",
]


def _to_label_size(pred: Tensor, label: Tensor) -> Tensor:
    size = tuple(label.shape[-2:])
    if tuple(pred.shape[-2:]) == size:
        return pred
    return F.interpolate(pred, size=size, mode="bilinear", align_corners=False)


def _squeeze_channel(label: Tensor) -> Tensor:
    return label[:, 0] if label.ndim == 4 else label


def _check(name: str, pred: Tensor, label: Tensor, channels: int | None) -> None:
    if pred.ndim != 4 or (channels is not None and pred.shape[1] != channels):
        want = f"(B, {channels}, H, W)" if channels is not None else "(B, K, H, W)"
        raise ValueError(f"{name}: expected output {want}, got {tuple(pred.shape)}")
    if label.ndim not in (3, 4) or label.shape[0] != pred.shape[0]:
        raise ValueError(f"{name}: label shape {tuple(label.shape)} does not fit output {tuple(pred.shape)}")


def _mean_over(loss_sum: Tensor, n_valid: Tensor) -> Tensor:
    """``loss_sum / n_valid``, or ``loss_sum`` (a graph-attached 0) when nothing is valid."""
    return loss_sum / n_valid.clamp_min(1).to(loss_sum.dtype)


class SegmentationCELoss(nn.Module):
    """Cross-entropy of logits (B, K, H, W) against class ids (B, H, W), mean over non-ignored pixels."""

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, pred: Tensor, label: Tensor) -> Tensor:
        _check(type(self).__name__, pred, label, None)
        label = _squeeze_channel(label).long()
        loss = F.cross_entropy(
            _to_label_size(pred, label), label, ignore_index=self.ignore_index, reduction="sum"
        )
        return _mean_over(loss, (label != self.ignore_index).sum())


class BalancedCELoss(nn.Module):
    """Class-balanced two-class cross-entropy for saliency.

    Logits (B, 2, H, W), labels (B, H, W) in {0, 1} or ``ignore_index``. With ``w`` the fraction of
    valid pixels that are negative in the batch, positives weigh ``w`` and negatives ``1 - w``;
    the weighted sum is divided by the number of valid pixels.
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, pred: Tensor, label: Tensor) -> Tensor:
        _check(type(self).__name__, pred, label, 2)
        label = _squeeze_channel(label).long()
        valid = label != self.ignore_index
        n_valid = valid.sum()
        w_pos = ((label == 0) & valid).sum().to(pred.dtype) / n_valid.clamp_min(1).to(pred.dtype)
        weight = torch.stack([1 - w_pos, w_pos]).detach()
        loss = F.cross_entropy(
            _to_label_size(pred, label), label, weight=weight, ignore_index=self.ignore_index, reduction="none"
        )
        return _mean_over(loss.sum(), n_valid)


class BalancedBCELoss(nn.Module):
    """Balanced binary cross-entropy for boundaries (HED style, fixed positive weight).

    Logits (B, 1, H, W), labels (B, 1, H, W) in {0, 1} or ``ignore_index``. Per valid pixel,
    ``-pos_weight * y * log(s) - (1 - pos_weight) * (1 - y) * log(1 - s)`` with ``s`` the sigmoid,
    averaged over valid pixels.
    """

    def __init__(self, pos_weight: float = 0.95, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        if not 0 < pos_weight < 1:
            raise ValueError(f"pos_weight: expected a value in (0, 1), got {pos_weight}")
        self.pos_weight = pos_weight
        self.ignore_index = ignore_index

    def forward(self, pred: Tensor, label: Tensor) -> Tensor:
        _check(type(self).__name__, pred, label, 1)
        label = _squeeze_channel(label)
        logits = _to_label_size(pred, label)[:, 0]
        valid = label != self.ignore_index
        target = torch.where(valid, label, torch.zeros_like(label)).to(logits.dtype)
        w = self.pos_weight
        bce = F.binary_cross_entropy_with_logits(
            logits, target, pos_weight=torch.tensor(w / (1 - w), dtype=logits.dtype, device=logits.device),
            reduction="none",
        )
        return _mean_over(torch.where(valid, bce * (1 - w), torch.zeros_like(bce)).sum(), valid.sum())


class DepthL1Loss(nn.Module):
    """L1 depth error of (B, 1, H, W) outputs over valid pixels (label > 0)."""

    def forward(self, pred: Tensor, label: Tensor) -> Tensor:
        _check(type(self).__name__, pred, label, 1)
        label = _squeeze_channel(label)
        pred = _to_label_size(pred, label)[:, 0]
        valid = label > 0
        diff = torch.where(valid, pred - label.to(pred.dtype), torch.zeros_like(pred))
        return _mean_over(diff.abs().sum(), valid.sum())


class NormalsL1Loss(nn.Module):
    """L1 distance between L2-normalised output normals (B, 3, H, W) and label normals.

    Summed over the 3 components, averaged over valid pixels (non-zero label vector).
    """

    def forward(self, pred: Tensor, label: Tensor) -> Tensor:
        _check(type(self).__name__, pred, label, 3)
        if label.ndim != 4 or label.shape[1] != 3:
            raise ValueError(f"NormalsL1Loss: expected label (B, 3, H, W), got {tuple(label.shape)}")
        pred = F.normalize(_to_label_size(pred, label), dim=1)
        label = label.to(pred.dtype)
        valid = label.norm(dim=1, keepdim=True) > 0
        diff = torch.where(valid, pred - F.normalize(label, dim=1), torch.zeros_like(pred))
        return _mean_over(diff.abs().sum(), valid.sum())


# The loss class of each task.
TASK_LOSSES: dict[str, type[nn.Module]] = {
    "semseg": SegmentationCELoss,
    "human_parts": SegmentationCELoss,
    "sal": BalancedCELoss,
    "edge": BalancedBCELoss,
    "depth": DepthL1Loss,
    "normals": NormalsL1Loss,
}


class MultiTaskLoss(nn.Module):
    """Weighted sum of per-task losses.

    Args:
        losses: task -> loss module ``(output, label) -> scalar``.
        weights: task -> weight; every task of ``losses`` needs one (None: all 1).
        scheme: ``"sum"``: ``sum_t w_t L_t``; ``"log"``: ``sum_t w_t log(L_t + 1e-8)`` (the
            ``MultiTaskLoss_log`` of MTMamba's code, ``losses/loss_schemes.py:34-48``).
    """

    def __init__(self, losses: Mapping[str, nn.Module], weights: Mapping[str, float] | None = None,
                 scheme: str = "sum") -> None:
        super().__init__()
        if scheme not in ("sum", "log"):
            raise ValueError(f"scheme: expected 'sum' or 'log', got {scheme!r}")
        self.scheme = scheme
        if not losses:
            raise ValueError("losses: expected at least one task")
        self.losses = nn.ModuleDict(dict(losses))
        weights = {t: 1.0 for t in losses} if weights is None else dict(weights)
        missing = sorted(set(losses) - set(weights))
        extra = sorted(set(weights) - set(losses))
        if missing or extra:
            raise ValueError(f"weights: missing tasks {missing}, unknown tasks {extra}; expected {sorted(losses)}")
        self.weights = {t: float(weights[t]) for t in losses}

    def forward(self, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of one batch.

        Args:
            outputs: task -> model output (dict or TensorDict; extra keys are ignored).
            labels: task -> label batch (dict or TensorDict).

        Returns:
            ``(total, per_task)``: the weighted sum (scalar), and task -> unweighted loss (scalar
            tensors, attached to the graph; check them for NaN/inf to name a failing task).
        """
        per_task: dict[str, Tensor] = {}
        for task, loss in self.losses.items():
            for what, source in (("outputs", outputs), ("labels", labels)):
                if task not in source.keys():
                    raise KeyError(f"{what}: missing task {task!r} (has {sorted(source.keys())})")
            per_task[task] = loss(outputs[task], labels[task])
        if self.scheme == "log":
            total = torch.stack([self.weights[t] * torch.log(v.float() + 1e-8) for t, v in per_task.items()]).sum()
        else:
            total = torch.stack([self.weights[t] * v.float() for t, v in per_task.items()]).sum()
        return total, per_task

    def extra_repr(self) -> str:
        return f"weights={self.weights}"


def build_task_losses(
    tasks: Sequence[str],
    weights: Mapping[str, float] | None = None,
    *,
    edge_pos_weight: float = 0.95,
    ignore_index: int = IGNORE_INDEX,
    scheme: str = "sum",
) -> MultiTaskLoss:
    """The losses of ``tasks`` (per-task modules in ``.losses``), weighted by ``weights``.

    Args:
        tasks: names among ``TASK_LOSSES``.
        weights: task -> weight (from the recipe); None gives every task weight 1.
        edge_pos_weight: positive-class weight of the boundary loss.
        ignore_index: label value of unlabelled pixels.
        scheme: how the weighted task losses combine (see :class:`MultiTaskLoss`).
    """
    losses: dict[str, nn.Module] = {}
    for task in tasks:
        if task not in TASK_LOSSES:
            raise ValueError(f"tasks: unknown task {task!r}; known: {sorted(TASK_LOSSES)}")
        if TASKS[task].kind == "segmentation":
            losses[task] = SegmentationCELoss(ignore_index)
        elif task == "sal":
            losses[task] = BalancedCELoss(ignore_index)
        elif task == "edge":
            losses[task] = BalancedBCELoss(edge_pos_weight, ignore_index)
        else:
            losses[task] = TASK_LOSSES[task]()
    return MultiTaskLoss(losses, weights, scheme)

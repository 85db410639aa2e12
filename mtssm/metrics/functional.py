"""Dataset-level metrics of multi-task dense prediction, one function per metric.

Every function takes final predictions (class ids, depths, normal vectors, probabilities), either
as one batch (tensor or array) or as a list of per-image / per-batch tensors or arrays whose sizes
may differ, and the labels in the same layout. Percentages (mIoU, maxF, odsF) are in [0, 100].

The ``*_counts`` functions return the additive statistics the metrics are computed from; the
streaming accumulators of :mod:`mtssm.metrics.evaluator` sum them batch by batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from mtssm.metrics.boundary import Matcher, boundary_counts, edge_thresholds, ods_f

__all__ = [
    "SALIENCY_THRESHOLDS",
    "boundary_odsf",
    "confusion_matrix",
    "depth_rmse",
    "depth_sums",
    "edge_image_counts",
    "miou",
    "miou_from_confusion",
    "normals_mean_angle",
    "normals_sums",
    "per_image_precision_recall",
    "saliency_counts",
    "saliency_maxf",
    "saliency_maxf_from_counts",
]

ArrayLike = Tensor | np.ndarray
Batches = ArrayLike | Sequence[ArrayLike]

# 0.05, 0.10, ..., 0.95: the thresholds of the public saliency evaluation.
SALIENCY_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))


def _pairs(preds: Batches, labels: Batches, what: str) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield matching (prediction, label) tensors from two batches or two equal-length lists."""
    if isinstance(preds, (Tensor, np.ndarray)) and isinstance(labels, (Tensor, np.ndarray)):
        items = [(preds, labels)]
    elif isinstance(preds, Sequence) and isinstance(labels, Sequence):
        if len(preds) != len(labels):
            raise ValueError(f"{what}: got {len(preds)} predictions but {len(labels)} labels")
        items = list(zip(preds, labels))
    else:
        raise TypeError(
            f"{what}: predictions and labels must both be tensors/arrays or both lists of them, "
            f"got {type(preds).__name__} and {type(labels).__name__}"
        )
    for p, y in items:
        p, y = torch.as_tensor(p), torch.as_tensor(y)
        if p.shape != y.shape:
            raise ValueError(f"{what}: prediction shape {tuple(p.shape)} != label shape {tuple(y.shape)}")
        yield p, y.to(p.device)


# ---------------------------------------------------------------- segmentation (mIoU)


def confusion_matrix(pred: Tensor, label: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """Confusion counts of class-id maps of any equal shapes.

    Args:
        pred: predicted class ids, integers in [0, num_classes).
        label: true class ids, in [0, num_classes) or ``ignore_index``.

    Returns:
        (num_classes, num_classes) int64 tensor on pred's device; entry [i, j] counts pixels of
        true class i predicted as j.
    """
    if pred.is_floating_point() or label.is_floating_point():
        raise TypeError("miou: predictions and labels must be integer class ids (argmax the logits)")
    valid = label != ignore_index
    pred, label = pred[valid].long(), label[valid].long()
    for name, ids in (("predictions", pred), ("labels", label)):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_classes):
            raise ValueError(
                f"miou: {name} hold class ids outside [0, {num_classes}) "
                f"(min {int(ids.min())}, max {int(ids.max())}); ignore_index is {ignore_index}"
            )
    flat = label * num_classes + pred
    return torch.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def miou_from_confusion(confusion: Tensor) -> float:
    """Mean IoU in percent over the classes that occur in the labels or the predictions.

    ``IoU_k = TP / (TP + FP + FN)``; classes absent from both are left out of the mean (on a real
    test set every class occurs and this equals the public code's mean over all classes).
    """
    confusion = confusion.double()
    tp = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - tp
    present = union > 0
    if not bool(present.any()):
        return float("nan")
    return float(100.0 * (tp[present] / union[present]).mean())


def miou(preds: Batches, labels: Batches, num_classes: int, ignore_index: int = 255) -> float:
    """Mean intersection over union (percent) from the confusion matrix of the whole dataset.

    Args:
        preds: predicted class ids, (B, H, W) or a list of (H, W) / (B, H, W).
        labels: true class ids in the same layout, ``ignore_index`` where unlabelled.
        num_classes: number of classes K.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes: expected >= 1, got {num_classes}")
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for p, y in _pairs(preds, labels, "miou"):
        confusion += confusion_matrix(p, y, num_classes, ignore_index).cpu()
    return miou_from_confusion(confusion)


# ---------------------------------------------------------------- depth (RMSE)


def depth_sums(pred: Tensor, gt: Tensor, max_depth: float = float("inf")) -> tuple[float, int]:
    """Sum of squared errors and count over valid pixels (``0 < gt < max_depth``) of equal-shape
    depth maps. Predictions are clamped at 1e-9 first, as the official evaluation does (its
    ``get_output`` clamps at 0 and ``DepthMeter`` lifts values <= 0 to 1e-9)."""
    valid = (gt > 0) & (gt < max_depth)
    err = pred[valid].double().clamp_min(1e-9) - gt[valid].double()
    return float((err * err).sum()), int(valid.sum())


def depth_rmse(pred: Batches, gt: Batches, max_depth: float = float("inf")) -> float:
    """Root mean square depth error over every valid pixel of the dataset (``0 < gt < max_depth``;
    predictions clamped at 1e-9).

    Args:
        pred: predicted depths, (B, 1, H, W), (B, H, W), or a list of per-image maps.
        gt: ground-truth depths in the same layout, 0 where invalid.
        max_depth: upper end of the scored range (80 for Cityscapes disparity, see
            :mod:`mtssm.data.protocol`).

    Returns:
        ``sqrt(sum of squared errors / number of valid pixels)``; NaN without valid pixels.
    """
    sse, n = 0.0, 0
    for p, y in _pairs(pred, gt, "depth_rmse"):
        s, c = depth_sums(p, y, max_depth)
        sse, n = sse + s, n + c
    return float(np.sqrt(sse / n)) if n else float("nan")


# ---------------------------------------------------------------- surface normals (mean angle)


def normals_sums(pred: Tensor, gt: Tensor) -> tuple[float, int]:
    """Sum of angular errors (degrees) and count over valid pixels of normal maps.

    Args:
        pred: (B, 3, H, W) or (3, H, W) normals, any length (normalised here).
        gt: same shape; pixels whose vector has zero length are invalid.
    """
    if pred.ndim < 3 or pred.shape[-3] != 3:
        raise ValueError(f"normals: expected (B, 3, H, W) or (3, H, W), got {tuple(pred.shape)}")
    pred, gt = pred.double(), gt.double()
    valid = gt.norm(dim=-3) > 0
    p = torch.nn.functional.normalize(pred, dim=-3)
    g = torch.nn.functional.normalize(gt, dim=-3)
    angle = 2 * torch.atan2((p - g).norm(dim=-3), (p + g).norm(dim=-3))
    return float(torch.rad2deg(angle[valid]).sum()), int(valid.sum())


def normals_mean_angle(pred: Batches, gt: Batches) -> float:
    """Mean angular error in degrees over every valid pixel of the dataset.

    The angle between unit vectors p and g is ``2 * atan2(|p - g|, |p + g|)`` (accurate near 0 and
    180 degrees, unlike ``acos(p . g)``).

    Args:
        pred: (B, 3, H, W) normals (not necessarily unit), or a list of (3, H, W) / (B, 3, H, W).
        gt: same layout; all-zero vectors mark invalid pixels.
    """
    total, n = 0.0, 0
    for p, y in _pairs(pred, gt, "normals_mean_angle"):
        s, c = normals_sums(p, y)
        total, n = total + s, n + c
    return total / n if n else float("nan")


# ---------------------------------------------------------------- saliency (maxF)


def saliency_counts(
    probs: Tensor,
    gt: Tensor,
    thresholds: Sequence[float] = SALIENCY_THRESHOLDS,
    ignore_index: int = 255,
) -> Tensor:
    """Per-image, per-threshold true, predicted and actual positives.

    Args:
        probs: (B, H, W) or (H, W) saliency probabilities; a pixel is salient at t if ``prob >= t``.
        gt: same shape, values {0, 1} or ``ignore_index``.
        thresholds: increasing thresholds (T,).

    Returns:
        (B, 3, T) float64 tensor on the CPU: true positives, predicted positives, actual positives.
    """
    if probs.ndim == 2:
        probs, gt = probs[None], gt[None]
    if probs.ndim != 3:
        raise ValueError(f"saliency: expected (B, H, W) or (H, W) maps, got {tuple(probs.shape)}")
    thr = torch.as_tensor(thresholds, dtype=probs.dtype if probs.is_floating_point() else torch.float64)
    if thr.ndim != 1 or thr.numel() == 0 or bool((thr.diff() <= 0).any()):
        raise ValueError("thresholds: expected a non-empty strictly increasing sequence")
    b, t = probs.shape[0], thr.numel()
    valid = gt != ignore_index
    positive = (gt == 1) & valid
    # level = how many thresholds a pixel's probability reaches (0..T); histogram it per image.
    level = torch.bucketize(probs.to(thr.dtype).contiguous(), thr.to(probs.device), right=True)
    offset = torch.arange(b, device=probs.device).view(b, 1, 1) * (t + 1)

    def histogram(mask: Tensor) -> Tensor:
        return torch.bincount((level + offset)[mask], minlength=b * (t + 1)).view(b, t + 1)

    def at_least(hist: Tensor) -> Tensor:  # [:, i] = pixels reaching threshold i
        return hist.flip(1).cumsum(1).flip(1)[:, 1:]

    tp = at_least(histogram(positive))
    pp = at_least(histogram(valid))
    ap = positive.reshape(b, -1).sum(1, keepdim=True).expand(b, t)
    return torch.stack([tp, pp, ap], dim=1).double().cpu()


def _f_beta(precision: Tensor, recall: Tensor, beta2: float) -> Tensor:
    denom = beta2 * precision + recall
    f = (1 + beta2) * precision * recall / denom
    return torch.where(denom > 0, f, torch.zeros_like(f))


def saliency_maxf_from_counts(
    sums: Tensor, beta2: float = 0.3, protocol: Literal["dataset", "per_image"] = "dataset"
) -> float:
    """maxF in percent from (3, T) sums over the dataset.

    Args:
        sums: for ``protocol='dataset'``, the summed ``saliency_counts`` (true, predicted, actual
            positives); for ``'per_image'``, ``per_image_precision_recall`` summed (sum of
            precisions, sum of recalls, number of images).
    """
    if protocol == "dataset":
        tp, pp, ap = sums
        precision = torch.where(pp > 0, tp / pp.clamp_min(1), torch.zeros_like(tp))
        recall = torch.where(ap > 0, tp / ap.clamp_min(1), torch.zeros_like(tp))
    elif protocol == "per_image":
        sum_p, sum_r, n = sums
        if not bool((n > 0).all()):
            return float("nan")
        precision, recall = sum_p / n, sum_r / n
    else:
        raise ValueError(f"protocol: expected 'dataset' or 'per_image', got {protocol!r}")
    return float(100.0 * _f_beta(precision, recall, beta2).max())


def per_image_precision_recall(counts: Tensor) -> Tensor:
    """(B, 3, T) ``saliency_counts`` -> (3, T): sums over the B images of precision and recall,
    and B. An image's precision (recall) is 0 where it predicts (holds) no salient pixel."""
    tp, pp, ap = counts.unbind(1)
    precision = torch.where(pp > 0, tp / pp.clamp_min(1), torch.zeros_like(tp))
    recall = torch.where(ap > 0, tp / ap.clamp_min(1), torch.zeros_like(tp))
    n = torch.full_like(precision[0], counts.shape[0])
    return torch.stack([precision.sum(0), recall.sum(0), n])


def saliency_maxf(
    probs: Batches,
    gt: Batches,
    beta2: float = 0.3,
    thresholds: Sequence[float] = SALIENCY_THRESHOLDS,
    ignore_index: int = 255,
    protocol: Literal["dataset", "per_image"] = "dataset",
) -> float:
    """Maximum F-beta (percent) of saliency probabilities over thresholds 0.05, 0.10, ..., 0.95.

    ``F = (1 + beta2) P R / (beta2 P + R)`` with ``beta2 = 0.3``. Predictions are probabilities
    (no sigmoid is applied here). Two protocols:

    - ``'dataset'`` (default): true/predicted/actual positives are summed over all valid pixels of
      the dataset per threshold, then P, R and F per threshold, then the max. This is the saliency
      meter with ``beta_squared=0.3, threshold_step=0.05`` of the InvPT code base that MTMamba,
      MTMamba++ and MSM evaluate with, so it is the one comparable with their tables.
    - ``'per_image'``: P and R per image and threshold, averaged over images, then F and the max
      (the older ASTMT / MTI-Net ``eval_sal`` averaging, which used F1 and thresholds 0.2..0.9).

    Args:
        probs: (B, H, W) probabilities, or a list of (H, W) / (B, H, W).
        gt: same layout, values {0, 1}, ``ignore_index`` where unlabelled.
    """
    parts = [saliency_counts(p, y, thresholds, ignore_index) for p, y in _pairs(probs, gt, "saliency_maxf")]
    counts = torch.cat(parts)
    if protocol == "per_image":
        return saliency_maxf_from_counts(per_image_precision_recall(counts), beta2, protocol)
    return saliency_maxf_from_counts(counts.sum(0), beta2, protocol)


# ---------------------------------------------------------------- boundaries (odsF)


def boundary_odsf(
    preds: Batches,
    gts: Batches,
    max_dist: float = 0.0075,
    thresholds: int | Sequence[float] = 99,
    ignore_index: int = 255,
    *,
    apply_thinning: bool = True,
    matcher: Matcher = "auto",
) -> float:
    """Optimal-dataset-scale F-measure (percent) of boundary probabilities, SEISM protocol.

    See :mod:`mtssm.metrics.boundary`. Pixels labelled ``ignore_index`` are removed from both the
    prediction and the ground truth before matching.

    Args:
        preds: edge probabilities in [0, 1]: (B, 1, H, W), (B, H, W), (H, W) or a list of them.
        gts: same layout, {0, 1} edges, ``ignore_index`` where unlabelled.
        max_dist: matching radius as a fraction of the image diagonal (0.0075 PASCAL-Context,
            0.011 NYUDv2).
        thresholds: a count n (SEISM's ``linspace(1/(n+1), 1-1/(n+1), n)``) or explicit values.
        matcher: 'auto' (pyEdgeEval's correspondPixels if installed, else scipy), 'pyedgeeval',
            or 'scipy'.
    """
    thr = edge_thresholds(thresholds)
    counts = np.zeros((4, thr.size), dtype=np.int64)
    for p, y in _pairs(preds, gts, "boundary_odsf"):
        for prob, gt in zip(_edge_images(p), _edge_images(y)):
            counts += edge_image_counts(prob, gt, thr, max_dist, ignore_index, apply_thinning, matcher)
    return ods_f(counts)


def _edge_images(x: Tensor) -> Tensor:
    """View a (…, H, W) stack of edge maps as (N, H, W)."""
    if x.ndim < 2:
        raise ValueError(f"boundary_odsf: expected (…, H, W) maps, got shape {tuple(x.shape)}")
    return x.reshape(-1, *x.shape[-2:])


def edge_image_counts(
    prob: Tensor,
    gt: Tensor,
    thresholds: np.ndarray,
    max_dist: float,
    ignore_index: int = 255,
    apply_thinning: bool = True,
    matcher: Matcher = "auto",
) -> np.ndarray:
    """(4, T) boundary counts of one (H, W) image; ignored pixels leave both maps."""
    gt_np = gt.detach().cpu().numpy()
    ignored = gt_np == ignore_index
    prob_np = prob.detach().cpu().double().numpy().copy()
    prob_np[ignored] = -1.0  # below every threshold
    edges = (gt_np == 1) & ~ignored
    return boundary_counts(
        prob_np, edges, thresholds, max_dist, apply_thinning=apply_thinning, matcher=matcher
    )

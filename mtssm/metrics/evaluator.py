"""Streaming metric accumulators fed with raw model outputs and mtssm label batches.

Model outputs per task (spatial size may differ from the labels': logits are then resized to the
label size bilinearly before anything else):

======================  ===================  ==================================================
task                    output               label
======================  ===================  ==================================================
semseg, human_parts     logits (B, K, H, W)  int64 (B, H, W), 255 ignored
depth                   (B, 1, H, W)         float (B, 1, H, W), 0 invalid
normals                 (B, 3, H, W)         float (B, 3, H, W), all-zero vector invalid
sal                     logits (B, 2, H, W)  int64 (B, H, W) in {0, 1}, 255 ignored
edge                    logits (B, 1, H, W)  float (B, 1, H, W) in {0, 1}, 255 ignored
======================  ===================  ==================================================

Every accumulator keeps only additive sums (a confusion matrix, error sums, per-threshold counts),
so ``all_reduce`` over processes gives the metrics of the whole distributed dataset.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mtssm.data.protocol import PROTOCOLS
from mtssm.metrics.boundary import Matcher, _matcher, edge_thresholds, ods_f
from mtssm.metrics.delta import SINGLE_TASK_BASELINES, delta_m
from mtssm.metrics.functional import (
    SALIENCY_THRESHOLDS,
    confusion_matrix,
    depth_sums,
    edge_image_counts,
    miou_from_confusion,
    normals_sums,
    per_image_precision_recall,
    saliency_counts,
    saliency_maxf_from_counts,
)
from mtssm.tasks import HIGHER_IS_BETTER, IGNORE_INDEX, METRIC_NAMES, NUM_CLASSES, TASKS

__all__ = [
    "DATASETS",
    "DepthAccumulator",
    "EdgeAccumulator",
    "MetricAccumulator",
    "MultiTaskEvaluator",
    "NormalsAccumulator",
    "SaliencyAccumulator",
    "SegmentationAccumulator",
    "build_evaluator",
]

# Evaluation settings per dataset, read from the task facts and the protocol of mtssm.data: classes
# per segmentation task, the boundary matching radius (fraction
# of the image diagonal) and the upper end of the scored depth range.
DATASETS: dict[str, dict[str, Any]] = {
    name: {
        "num_classes": dict(NUM_CLASSES[name]),
        "edge_max_dist": proto.edge_max_dist,
        "max_depth": proto.depth_range[1],
    }
    for name, proto in PROTOCOLS.items()
}


def _check_batch(task: str, pred: Tensor, target: Tensor, channels: int | None) -> None:
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"{task}: expected tensors, got {type(pred).__name__}, {type(target).__name__}")
    if pred.ndim != 4 or (channels is not None and pred.shape[1] != channels):
        want = f"(B, {channels}, H, W)" if channels is not None else "(B, K, H, W)"
        raise ValueError(f"{task}: expected model output {want}, got {tuple(pred.shape)}")
    if target.shape[0] != pred.shape[0] or target.ndim not in (3, 4):
        raise ValueError(
            f"{task}: label shape {tuple(target.shape)} does not fit output shape {tuple(pred.shape)}"
        )


def _to_label_size(pred: Tensor, target: Tensor) -> Tensor:
    """Bilinearly resize (B, C, h, w) outputs to the label's (H, W) when they differ."""
    size = tuple(target.shape[-2:])
    if tuple(pred.shape[-2:]) == size:
        return pred
    return F.interpolate(pred.float(), size=size, mode="bilinear", align_corners=False)


def _squeeze_channel(target: Tensor) -> Tensor:
    """(B, 1, H, W) -> (B, H, W); (B, H, W) unchanged."""
    return target[:, 0] if target.ndim == 4 else target


class MetricAccumulator:
    """Sums the statistics of one task's metric over batches.

    Subclasses define ``task``'s output decoding in ``update`` and the metric in ``compute``. The
    state is one tensor of additive sums (``self.state``), reset by ``reset``.
    """

    #: metric names of ``compute``'s result; the first is the one Δm uses.
    metric: str = ""

    def __init__(self, task: str) -> None:
        self.task = task
        self.state = self._empty_state()

    @property
    def higher_is_better(self) -> bool:
        """Whether a larger value of the main metric is better."""
        return HIGHER_IS_BETTER[self.task]

    def _empty_state(self) -> Tensor:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget every batch seen so far."""
        self.state = self._empty_state()

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one batch: ``pred`` the raw model output, ``target`` the label batch."""
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        """The metrics of every batch seen since the last reset (NaN where nothing was valid)."""
        raise NotImplementedError

    def all_reduce(self, group: Any = None) -> None:
        """Sum the state over the processes of ``torch.distributed`` (no-op when not initialised)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        state = self.state
        if dist.get_backend(group) == "nccl":
            state = state.cuda()
        dist.all_reduce(state, group=group)
        self.state = state.cpu()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(task={self.task!r})"


class SegmentationAccumulator(MetricAccumulator):
    """Dataset-level confusion matrix; ``compute`` gives ``{"mIoU": percent}``.

    Accepts logits (B, K, H, W) (argmax taken) or class ids (B, H, W); labels (B, H, W).
    """

    metric = "mIoU"

    def __init__(self, task: str, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes: expected >= 1 for task {task!r}, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        super().__init__(task)

    def _empty_state(self) -> Tensor:
        return torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        if pred.is_floating_point():
            _check_batch(self.task, pred, target, self.num_classes)
            pred = _to_label_size(pred, target).argmax(1)
        target = _squeeze_channel(target)
        if pred.shape != target.shape:
            raise ValueError(
                f"{self.task}: prediction {tuple(pred.shape)} and label {tuple(target.shape)} differ"
            )
        self.state += confusion_matrix(pred, target.to(pred.device), self.num_classes, self.ignore_index).cpu()

    def compute(self) -> dict[str, float]:
        return {"mIoU": miou_from_confusion(self.state)}


class DepthAccumulator(MetricAccumulator):
    """RMSE over every valid pixel (0 < label < ``max_depth``) seen, predictions clamped at 1e-9
    (see :func:`mtssm.metrics.functional.depth_sums`); ``{"rmse": value}`` in label units."""

    metric = "rmse"

    def __init__(self, task: str = "depth", max_depth: float = float("inf")) -> None:
        self.max_depth = max_depth
        super().__init__(task)

    def _empty_state(self) -> Tensor:
        return torch.zeros(2, dtype=torch.float64)  # sum of squared errors, valid pixels

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        _check_batch(self.task, pred, target, 1)
        pred = _to_label_size(pred, target)[:, 0]
        sse, n = depth_sums(pred, _squeeze_channel(target).to(pred.device), self.max_depth)
        self.state += torch.tensor([sse, n], dtype=torch.float64)

    def compute(self) -> dict[str, float]:
        sse, n = self.state.tolist()
        return {"rmse": float(np.sqrt(sse / n)) if n else float("nan")}


class NormalsAccumulator(MetricAccumulator):
    """Mean angular error in degrees over valid pixels (non-zero label vector); ``{"mErr": deg}``.

    Outputs are normalised here.
    """

    metric = "mErr"

    def __init__(self, task: str = "normals") -> None:
        super().__init__(task)

    def _empty_state(self) -> Tensor:
        return torch.zeros(2, dtype=torch.float64)  # sum of angles (degrees), valid pixels

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        _check_batch(self.task, pred, target, 3)
        if target.ndim != 4 or target.shape[1] != 3:
            raise ValueError(f"{self.task}: expected label (B, 3, H, W), got {tuple(target.shape)}")
        total, n = normals_sums(_to_label_size(pred, target), target.to(pred.device))
        self.state += torch.tensor([total, n], dtype=torch.float64)

    def compute(self) -> dict[str, float]:
        total, n = self.state.tolist()
        return {"mErr": total / n if n else float("nan")}


class SaliencyAccumulator(MetricAccumulator):
    """maxF (percent, ``beta2`` = 0.3) of the salient-class probability; ``{"maxF": percent}``.

    Outputs: logits (B, 2, H, W) (softmax, class 1) or (B, 1, H, W) (sigmoid). See
    :func:`mtssm.metrics.saliency_maxf` for the two protocols. ``squash`` (default, the official
    evaluation) passes the probability through a sigmoid once more before thresholding, as the
    ``SaliencyMeter`` of InvPT / MTMamba does with the probabilities ``get_output`` gives it
    (thresholds 0.05..0.95 of ``sigmoid(p)``, i.e. every pixel positive up to 0.5, then p above
    0.20, 0.41, 0.62, 0.85); ``squash=False`` thresholds the probability itself.
    """

    metric = "maxF"

    def __init__(
        self,
        task: str = "sal",
        beta2: float = 0.3,
        thresholds: Sequence[float] = SALIENCY_THRESHOLDS,
        ignore_index: int = IGNORE_INDEX,
        protocol: Literal["dataset", "per_image"] = "dataset",
        squash: bool = True,
    ) -> None:
        if protocol not in ("dataset", "per_image"):
            raise ValueError(f"protocol: expected 'dataset' or 'per_image', got {protocol!r}")
        self.beta2 = beta2
        self.thresholds = tuple(float(t) for t in thresholds)
        self.ignore_index = ignore_index
        self.protocol = protocol
        self.squash = squash
        super().__init__(task)

    def _empty_state(self) -> Tensor:
        return torch.zeros(3, len(self.thresholds), dtype=torch.float64)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        _check_batch(self.task, pred, target, None)
        pred = _to_label_size(pred.float(), target)
        if pred.shape[1] == 2:
            probs = pred.softmax(1)[:, 1]
        elif pred.shape[1] == 1:
            probs = pred[:, 0].sigmoid()
        else:
            raise ValueError(f"{self.task}: expected (B, 2, H, W) or (B, 1, H, W) logits, got {tuple(pred.shape)}")
        if self.squash:
            probs = probs.sigmoid()
        counts = saliency_counts(probs, _squeeze_channel(target).to(probs.device), self.thresholds, self.ignore_index)
        self.state += counts.sum(0) if self.protocol == "dataset" else per_image_precision_recall(counts)

    def compute(self) -> dict[str, float]:
        return {"maxF": saliency_maxf_from_counts(self.state, self.beta2, self.protocol)}


class EdgeAccumulator(MetricAccumulator):
    """Boundary odsF (percent) with the SEISM protocol; ``{"odsF": percent}``.

    Per image and threshold the sigmoid of the logits is binarised, thinned and matched within
    ``max_dist`` of the image diagonal (see :mod:`mtssm.metrics.boundary`); counts are summed over
    the dataset. This runs on the CPU and is by far the slowest metric (on a 448x576 image, one
    threshold costs up to about 0.2 s of thinning plus 0.2 s of scipy matching or several seconds
    of pyEdgeEval matching): lower ``thresholds`` (99 by default, as SEISM) or use
    ``matcher='scipy'`` for quick evaluations during training.
    """

    metric = "odsF"

    def __init__(
        self,
        task: str = "edge",
        max_dist: float = 0.0075,
        thresholds: int | Sequence[float] = 99,
        ignore_index: int = IGNORE_INDEX,
        apply_thinning: bool = True,
        matcher: Matcher = "auto",
    ) -> None:
        if max_dist <= 0:
            raise ValueError(f"max_dist: expected a positive fraction of the diagonal, got {max_dist}")
        self.max_dist = max_dist
        self.thresholds = edge_thresholds(thresholds)
        self.ignore_index = ignore_index
        self.apply_thinning = apply_thinning
        _matcher(matcher)  # fail now on a bad name
        self.matcher = matcher
        super().__init__(task)

    def _empty_state(self) -> Tensor:
        return torch.zeros(4, self.thresholds.size, dtype=torch.int64)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        _check_batch(self.task, pred, target, 1)
        probs = _to_label_size(pred.float(), target)[:, 0].sigmoid().cpu()
        labels = _squeeze_channel(target).cpu()
        for prob, label in zip(probs, labels):
            counts = edge_image_counts(
                prob, label, self.thresholds, self.max_dist, self.ignore_index, self.apply_thinning, self.matcher
            )
            self.state += torch.from_numpy(counts)

    def compute(self) -> dict[str, float]:
        return {"odsF": ods_f(self.state.numpy())}


class MultiTaskEvaluator(Mapping[str, MetricAccumulator]):
    """A mapping task -> accumulator, with batch-wide ``update`` and ``compute``."""

    def __init__(
        self,
        accumulators: Mapping[str, MetricAccumulator],
        single_task_baseline: Mapping[str, float] | None = None,
    ) -> None:
        self._accumulators = dict(accumulators)
        self.single_task_baseline = None if single_task_baseline is None else dict(single_task_baseline)

    def __getitem__(self, task: str) -> MetricAccumulator:
        return self._accumulators[task]

    def __iter__(self) -> Iterator[str]:
        return iter(self._accumulators)

    def __len__(self) -> int:
        return len(self._accumulators)

    def reset(self) -> None:
        for acc in self._accumulators.values():
            acc.reset()

    def update(self, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> None:
        """Add one batch: ``outputs`` and ``labels`` are dicts or TensorDicts keyed by task."""
        for task, acc in self._accumulators.items():
            for what, source in (("outputs", outputs), ("labels", labels)):
                if task not in source.keys():
                    raise KeyError(f"{what}: missing task {task!r} (has {sorted(source.keys())})")
            acc.update(outputs[task], labels[task])

    def all_reduce(self, group: Any = None) -> None:
        for acc in self._accumulators.values():
            acc.all_reduce(group)

    def compute(self) -> dict[str, dict[str, float]]:
        """task -> {metric name: value} over every batch since the last reset."""
        return {task: acc.compute() for task, acc in self._accumulators.items()}

    def delta_m(self, results: Mapping[str, Mapping[str, float]] | None = None) -> float | None:
        """Δm (percent) of ``results`` (default: ``compute()``) against the single-task baseline,
        or None when there is no baseline for every task."""
        base = self.single_task_baseline
        if base is None or not all(task in base for task in self._accumulators):
            return None
        return delta_m(self.compute() if results is None else results, base)


def _dataset_info(dataset: str | Any) -> tuple[str | None, dict[str, int], float | None]:
    if isinstance(dataset, str):
        key = dataset.lower()
        if key not in DATASETS:
            raise ValueError(f"dataset: unknown {dataset!r}; known: {sorted(DATASETS)} (or pass an object)")
        info = DATASETS[key]
        return key, dict(info["num_classes"]), info["edge_max_dist"]
    name = getattr(dataset, "name", None)
    key = name.lower() if isinstance(name, str) and name.lower() in DATASETS else None
    classes = dict(DATASETS[key]["num_classes"]) if key else {}
    max_dist = DATASETS[key]["edge_max_dist"] if key else None
    declared = getattr(dataset, "num_classes", None)
    if isinstance(declared, Mapping):
        classes.update({str(k): int(v) for k, v in declared.items()})
    elif isinstance(declared, (int, np.integer)):
        classes["semseg"] = int(declared)
    max_dist = getattr(dataset, "edge_max_dist", max_dist)
    return key, classes, max_dist


def build_evaluator(
    tasks: Sequence[str],
    dataset: str | Any,
    *,
    num_classes: Mapping[str, int] | None = None,
    edge_max_dist: float | None = None,
    edge_thresholds: int | Sequence[float] = 99,
    edge_matcher: Matcher = "auto",
    saliency_protocol: Literal["dataset", "per_image"] = "dataset",
    saliency_squash: bool = True,
    ignore_index: int = IGNORE_INDEX,
    single_task_baseline: Mapping[str, float] | None = None,
) -> MultiTaskEvaluator:
    """Accumulators for ``tasks`` with the settings of ``dataset``.

    Args:
        tasks: task names among ``METRIC_NAMES`` (semseg, human_parts, depth, normals, sal, edge).
        dataset: a name in ``DATASETS`` ('nyud', 'pascal', 'cityscapes'), or a dataset object; from
            an object are read ``name`` (a known name supplies defaults), ``num_classes`` (an int
            for semseg, or task -> classes) and ``edge_max_dist``.
        num_classes: task -> number of classes, overriding the dataset's.
        edge_max_dist: boundary matching radius (fraction of the diagonal), overriding the dataset's
            (0.011 NYUDv2, 0.0075 otherwise).
        edge_thresholds: number (or list) of boundary thresholds; 99 as SEISM.
        edge_matcher: boundary correspondence: 'auto' (pyEdgeEval's port of the benchmark's
            correspondPixels when installed, else scipy), 'pyedgeeval', or 'scipy' (exact solution
            of the same objective; much faster on large edge maps, matches slightly more pixels).
        saliency_protocol: 'dataset' or 'per_image' (see ``saliency_maxf``).
        saliency_squash: the official sigmoid of the probabilities (see ``SaliencyAccumulator``).
        single_task_baseline: task -> single-task value for ``delta_m()``; by default the
            built-in baseline of the dataset where there is one (NYUDv2).
    """
    key, classes, max_dist = _dataset_info(dataset)
    classes.update(num_classes or {})
    if edge_max_dist is not None:
        max_dist = edge_max_dist
    accumulators: dict[str, MetricAccumulator] = {}
    for task in tasks:
        kind = TASKS[task].kind if task in TASKS else None
        if kind == "segmentation":
            if task not in classes:
                raise ValueError(f"num_classes: no class count for task {task!r}; pass num_classes={{{task!r}: K}}")
            accumulators[task] = SegmentationAccumulator(task, classes[task], ignore_index)
        elif task == "depth":
            accumulators[task] = DepthAccumulator(task, DATASETS[key]["max_depth"] if key else float("inf"))
        elif task == "normals":
            accumulators[task] = NormalsAccumulator(task)
        elif task == "sal":
            accumulators[task] = SaliencyAccumulator(
                task, ignore_index=ignore_index, protocol=saliency_protocol, squash=saliency_squash)
        elif task == "edge":
            accumulators[task] = EdgeAccumulator(
                task, 0.0075 if max_dist is None else max_dist, edge_thresholds, ignore_index,
                matcher=edge_matcher,
            )
        else:
            raise ValueError(f"tasks: unknown task {task!r}; known: {sorted(METRIC_NAMES)}")
    if single_task_baseline is None and key in SINGLE_TASK_BASELINES:
        single_task_baseline = SINGLE_TASK_BASELINES[key]
    return MultiTaskEvaluator(accumulators, single_task_baseline)

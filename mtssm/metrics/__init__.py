"""Metrics of multi-task dense prediction: one function per metric, streaming accumulators, Δm.

Functions (final predictions and labels, one batch or a list): :func:`miou`, :func:`depth_rmse`,
:func:`normals_mean_angle`, :func:`saliency_maxf`, :func:`boundary_odsf`; :func:`delta_m`.
Evaluation loop: ``evaluator = build_evaluator(tasks, "nyud")``, then
``evaluator.update(outputs, labels)`` per batch and ``evaluator.compute()``.
"""

from mtssm.metrics.boundary import edge_thresholds, thin
from mtssm.metrics.delta import (
    HIGHER_IS_BETTER,
    METRIC_NAMES,
    NYUD_SINGLE_TASK_BASELINE,
    SINGLE_TASK_BASELINES,
    delta_m,
)
from mtssm.metrics.evaluator import (
    DATASETS,
    DepthAccumulator,
    EdgeAccumulator,
    MetricAccumulator,
    MultiTaskEvaluator,
    NormalsAccumulator,
    SaliencyAccumulator,
    SegmentationAccumulator,
    build_evaluator,
)
from mtssm.metrics.functional import (
    SALIENCY_THRESHOLDS,
    boundary_odsf,
    confusion_matrix,
    depth_rmse,
    miou,
    normals_mean_angle,
    saliency_maxf,
)

__all__ = [
    "DATASETS",
    "HIGHER_IS_BETTER",
    "METRIC_NAMES",
    "NYUD_SINGLE_TASK_BASELINE",
    "SALIENCY_THRESHOLDS",
    "SINGLE_TASK_BASELINES",
    "DepthAccumulator",
    "EdgeAccumulator",
    "MetricAccumulator",
    "MultiTaskEvaluator",
    "NormalsAccumulator",
    "SaliencyAccumulator",
    "SegmentationAccumulator",
    "boundary_odsf",
    "build_evaluator",
    "confusion_matrix",
    "delta_m",
    "depth_rmse",
    "edge_thresholds",
    "miou",
    "normals_mean_angle",
    "saliency_maxf",
    "thin",
]

"""Multi-task gain Δm (Maninis et al. 2019; Vandenhende et al. 2021) against single-task baselines.

Each task's headline metric and its direction (``METRIC_NAMES``, ``HIGHER_IS_BETTER``) come from
the task table :mod:`mtssm.tasks`.
"""

from __future__ import annotations

from collections.abc import Mapping

from mtssm.tasks import HIGHER_IS_BETTER, METRIC_NAMES

__all__ = [
    "HIGHER_IS_BETTER",
    "METRIC_NAMES",
    "NYUD_SINGLE_TASK_BASELINE",
    "SINGLE_TASK_BASELINES",
    "delta_m",
]

# NYUDv2 single-task models (Swin-L encoder, two Swin blocks per decoder stage): MTMamba (ECCV 2024)
# Table 2, "Single-task" row, also the "STL Model" row of MSM's tables.
NYUD_SINGLE_TASK_BASELINE: dict[str, float] = {
    "semseg": 54.32,
    "depth": 0.5166,
    "normals": 19.21,
    "edge": 77.30,
}

# By dataset name. The MTMamba, MTMamba++, MSM and PAMM papers at hand give no PASCAL-Context
# single-task row, so none is built in for PASCAL-Context: pass its baseline as a dict.
SINGLE_TASK_BASELINES: dict[str, dict[str, float]] = {
    "nyud": NYUD_SINGLE_TASK_BASELINE,
}


def _score(task: str, value: float | Mapping[str, float]) -> float:
    if isinstance(value, Mapping):
        name = METRIC_NAMES.get(task)
        if name is None or name not in value:
            raise ValueError(f"scores[{task!r}]: expected a number or a mapping with key {name!r}")
        value = value[name]
    return float(value)


def delta_m(
    scores: Mapping[str, float | Mapping[str, float]],
    single_task_baseline: str | Mapping[str, float] = "nyud",
    higher_is_better: Mapping[str, bool] | None = None,
) -> float:
    """Average relative gain over single-task models, in percent.

    ``Δm = 100 / T * sum_t (-1)^{l_t} (M_t - M_single,t) / M_single,t`` with ``l_t = 1`` where lower
    is better. Computed over the tasks in ``scores``.

    Args:
        scores: task -> metric value, or task -> {metric name: value} as returned by an evaluator
            (the task's entry of ``METRIC_NAMES`` is used).
        single_task_baseline: task -> single-task value, or a name in ``SINGLE_TASK_BASELINES``.
        higher_is_better: task -> bool; defaults to ``HIGHER_IS_BETTER``.
    """
    if isinstance(single_task_baseline, str):
        if single_task_baseline not in SINGLE_TASK_BASELINES:
            raise ValueError(
                f"single_task_baseline: unknown {single_task_baseline!r}; "
                f"built in: {sorted(SINGLE_TASK_BASELINES)} (or pass a dict)"
            )
        single_task_baseline = SINGLE_TASK_BASELINES[single_task_baseline]
    direction = HIGHER_IS_BETTER if higher_is_better is None else higher_is_better
    if not scores:
        raise ValueError("scores: expected at least one task")
    total = 0.0
    for task, value in scores.items():
        if task not in single_task_baseline:
            raise ValueError(
                f"single_task_baseline: no value for task {task!r} "
                f"(has {sorted(single_task_baseline)})"
            )
        if task not in direction:
            raise ValueError(f"higher_is_better: no entry for task {task!r}")
        base = float(single_task_baseline[task])
        if base == 0:
            raise ValueError(f"single_task_baseline[{task!r}] is 0; Δm divides by it")
        sign = 1.0 if direction[task] else -1.0
        total += sign * (_score(task, value) - base) / base
    return 100.0 * total / len(scores)

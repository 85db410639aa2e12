"""The task table: dense prediction tasks, their output channels, and each dataset's task list.

A model predicts, for every task ``t``, a map ``(B, C_t, H, W)`` at the input resolution, where
``C_t`` comes from this table (semantic segmentation has one channel per class, so its width depends
on the dataset).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "DATASET_TASKS",
    "SEMSEG_CLASSES",
    "TASK_CHANNELS",
    "dataset_tasks",
    "resolve_tasks",
    "task_channels",
]

#: Number of semantic classes (the ``semseg`` output channels) of each dataset.
SEMSEG_CLASSES: dict[str, int] = {"nyud": 40, "pascal": 21, "cityscapes": 19}

#: Output channels of every task whose width does not depend on the dataset.
TASK_CHANNELS: dict[str, int] = {
    "depth": 1,
    "normals": 3,
    "edge": 1,
    "human_parts": 7,
    "sal": 2,
}

#: The tasks each dataset is evaluated on, in the order the papers list them.
DATASET_TASKS: dict[str, tuple[str, ...]] = {
    "nyud": ("semseg", "depth", "normals", "edge"),
    "pascal": ("semseg", "human_parts", "sal", "normals", "edge"),
    "cityscapes": ("semseg", "depth"),
}

_ALL_TASKS = ("semseg", *TASK_CHANNELS)


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASET_TASKS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(DATASET_TASKS)}")


def task_channels(task: str, dataset: str = "nyud") -> int:
    """Output channels ``C_t`` of ``task`` on ``dataset`` (``semseg`` depends on the dataset)."""
    _check_dataset(dataset)
    if task == "semseg":
        return SEMSEG_CLASSES[dataset]
    if task not in TASK_CHANNELS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(_ALL_TASKS)}")
    return TASK_CHANNELS[task]


def dataset_tasks(dataset: str) -> tuple[str, ...]:
    """The task names of ``dataset`` (``nyud``, ``pascal`` or ``cityscapes``)."""
    _check_dataset(dataset)
    return DATASET_TASKS[dataset]


def resolve_tasks(tasks: Sequence[str] | None = None, dataset: str = "nyud") -> dict[str, int]:
    """Map each task name to its output channels; ``tasks=None`` takes the dataset's task list.

    Raises a one-line ``ValueError`` naming an unknown task or dataset, or a repeated task.
    """
    if isinstance(tasks, str):
        raise TypeError(f"tasks must be a sequence of task names, not the string {tasks!r}")
    names = dataset_tasks(dataset) if tasks is None else tuple(tasks)
    if not names:
        raise ValueError("tasks must name at least one task")
    if len(set(names)) != len(names):
        raise ValueError(f"tasks has a repeated name: {list(names)}")
    return {t: task_channels(t, dataset) for t in names}

"""The task table: every dense prediction task and every dataset, written once.

The model (output channels), the data (task lists, label values, padding), the losses and metrics
(ignored labels, class counts, headline metric and its direction), the recipe validation and
``mtssm data check`` all read the two tables below. This module imports nothing but the standard
library, so any part of the package (or a user's script) can read it without loading torch.

A model predicts, for every task ``t``, a map ``(B, C_t, H, W)``: ``C_t`` is
:func:`task_channels` (segmentation tasks have one channel per class, so their width depends on the
dataset). Labels come as:

======================  ====================================  ========================
task                    label                                 no label
======================  ====================================  ========================
semseg, human_parts     class ids (H, W)                      255
sal                     {0, 1} (H, W)                         255
edge                    {0, 1} (1, H, W)                      255
depth                   metres (1, H, W)                      0
normals                 unit vectors (3, H, W)                0 (the zero vector)
======================  ====================================  ========================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

__all__ = [
    "DATASETS",
    "DATASET_TASKS",
    "HIGHER_IS_BETTER",
    "IGNORE_INDEX",
    "METRIC_NAMES",
    "NUM_CLASSES",
    "SEMSEG_CLASSES",
    "TASKS",
    "TASK_CHANNELS",
    "DatasetSpec",
    "TaskSpec",
    "class_names",
    "dataset_spec",
    "dataset_tasks",
    "num_classes",
    "resolve_tasks",
    "task_channels",
]

#: Label value of unlabelled pixels in every class-id and binary label map.
IGNORE_INDEX: Final[int] = 255

TaskKind = Literal["segmentation", "binary", "boundary", "regression"]


@dataclass(frozen=True)
class TaskSpec:
    """One task.

    Attributes:
        kind: ``segmentation`` (class ids, one output channel per class), ``binary`` (two-class
            logits), ``boundary`` (one logit channel), ``regression`` (real values).
        channels: output channels ``C_t``; None for a segmentation task, whose width is its
            class count.
        no_label: label value meaning "no label here" (ignored by losses and metrics, used to pad).
        metric: the headline metric (what Δm uses), in the units the metric functions return.
        higher_is_better: the direction of ``metric``.
        classes: class names (index = class id) of a segmentation task whose classes are the same
            on every dataset; None where each dataset names its own (:attr:`DatasetSpec.classes`).
    """

    name: str
    kind: TaskKind
    channels: int | None
    no_label: int | float
    metric: str
    higher_is_better: bool
    classes: tuple[str, ...] | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset.

    Attributes:
        tasks: the tasks it is evaluated on, in the order the papers list them.
        classes: class names (index = class id) of each segmentation task whose classes depend
            on the dataset (``semseg``).

    How a dataset is fed and scored (crops, depth range, boundary radius) is its protocol,
    :mod:`mtssm.data.protocol`.
    """

    name: str
    tasks: tuple[str, ...]
    classes: dict[str, tuple[str, ...]] = field(default_factory=dict)


#: The 6 human parts (PASCAL-Part person parts merged), background first.
_HUMAN_PARTS = ("background", "head", "torso", "upper arms", "lower arms", "upper legs", "lower legs")

#: Every task, in a fixed order.
TASKS: Final[dict[str, TaskSpec]] = {
    t.name: t
    for t in (
        TaskSpec("semseg", "segmentation", None, IGNORE_INDEX, "mIoU", True),
        TaskSpec("depth", "regression", 1, 0.0, "rmse", False),
        TaskSpec("normals", "regression", 3, 0.0, "mErr", False),
        TaskSpec("edge", "boundary", 1, IGNORE_INDEX, "odsF", True),
        TaskSpec("human_parts", "segmentation", None, IGNORE_INDEX, "mIoU", True, _HUMAN_PARTS),
        TaskSpec("sal", "binary", 2, IGNORE_INDEX, "maxF", True),
    )
}

#: NYUDv2 40-class names; stored label v in 1..40 is class v - 1 (0 = unlabelled).
_NYUD_CLASSES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror",
    "floor mat", "clothes", "ceiling", "books", "refrigerator", "television", "paper", "towel",
    "shower curtain", "box", "whiteboard", "person", "night stand", "toilet", "sink", "lamp",
    "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop",
)  # fmt: skip

#: PASCAL VOC 21 classes (background first) used by PASCAL-Context semantic segmentation.
_PASCAL_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

#: Cityscapes 19 train classes.
_CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip

#: Every dataset, by the name recipes and the CLI use.
DATASETS: Final[dict[str, DatasetSpec]] = {
    d.name: d
    for d in (
        DatasetSpec("nyud", ("semseg", "depth", "normals", "edge"), {"semseg": _NYUD_CLASSES}),
        DatasetSpec(
            "pascal",
            ("semseg", "human_parts", "sal", "normals", "edge"),
            {"semseg": _PASCAL_CLASSES},
        ),
        DatasetSpec("cityscapes", ("semseg", "depth"), {"semseg": _CITYSCAPES_CLASSES}),
    )
}

def dataset_spec(dataset: str) -> DatasetSpec:
    """The table entry of ``dataset``; a one-line ``ValueError`` names an unknown one."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[dataset]


def dataset_tasks(dataset: str) -> tuple[str, ...]:
    """The task names of ``dataset`` (``nyud``, ``pascal`` or ``cityscapes``)."""
    return dataset_spec(dataset).tasks


def _task(task: str) -> TaskSpec:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    return TASKS[task]


def class_names(task: str, dataset: str) -> tuple[str, ...]:
    """Class names of segmentation ``task`` on ``dataset`` (index = class id)."""
    spec, data = _task(task), dataset_spec(dataset)
    if spec.kind != "segmentation":
        raise ValueError(f"task {task!r} is not a segmentation task; it has no classes")
    names = spec.classes if spec.classes is not None else data.classes.get(task)
    if names is None:
        raise ValueError(f"dataset {dataset!r} names no classes for task {task!r}")
    return names


def num_classes(task: str, dataset: str) -> int:
    """Class count of segmentation ``task`` on ``dataset``."""
    return len(class_names(task, dataset))


def task_channels(task: str, dataset: str = "nyud") -> int:
    """Output channels ``C_t`` of ``task`` on ``dataset`` (``semseg``'s depend on the dataset)."""
    spec = _task(task)
    dataset_spec(dataset)
    return spec.channels if spec.channels is not None else num_classes(task, dataset)


# Views of the two tables under the names the package has long exported.

#: dataset -> its tasks.
DATASET_TASKS: Final[dict[str, tuple[str, ...]]] = {n: d.tasks for n, d in DATASETS.items()}
#: dataset -> {segmentation task of that dataset: class count}.
NUM_CLASSES: Final[dict[str, dict[str, int]]] = {
    n: {t: num_classes(t, n) for t in d.tasks if TASKS[t].kind == "segmentation"} for n, d in DATASETS.items()
}
#: dataset -> semseg class count.
SEMSEG_CLASSES: Final[dict[str, int]] = {n: c["semseg"] for n, c in NUM_CLASSES.items()}
#: task -> output channels, for the tasks whose width does not depend on the dataset.
TASK_CHANNELS: Final[dict[str, int]] = {
    n: t.channels if t.channels is not None else len(t.classes) for n, t in TASKS.items()
    if t.channels is not None or t.classes is not None
}
#: task -> headline metric name.
METRIC_NAMES: Final[dict[str, str]] = {n: t.metric for n, t in TASKS.items()}
#: task -> whether a larger headline metric is better.
HIGHER_IS_BETTER: Final[dict[str, bool]] = {n: t.higher_is_better for n, t in TASKS.items()}


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

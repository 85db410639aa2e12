"""Constants of the data layouts: normalisation, padding, crops and the datasets' label codings.

Tasks, class counts, class names and the label value of unlabelled pixels come from the task table
:mod:`mtssm.tasks`; the names below re-export them for :mod:`mtssm.data`'s users.
"""

from __future__ import annotations

from typing import Final

from mtssm.tasks import DATASET_TASKS, IGNORE_INDEX, NUM_CLASSES, TASKS, class_names

#: Tasks each dataset provides, in the order the papers list them.
TASKS_BY_DATASET: Final[dict[str, tuple[str, ...]]] = DATASET_TASKS

#: ImageNet statistics used to normalise images (RGB, on [0, 1] values).
IMAGENET_MEAN: Final[tuple[float, float, float]] = (0.485, 0.456, 0.406)
IMAGENET_STD: Final[tuple[float, float, float]] = (0.229, 0.224, 0.225)

#: Padding value of every key: each task's "no label" value (labels 255, depth and normals 0),
#: image 0.
PAD_VALUES: Final[dict[str, float]] = {"image": 0.0, **{t: spec.no_label for t, spec in TASKS.items()}}

#: Train crop size (H, W) of each dataset, as in the papers.
TRAIN_CROP_SIZE: Final[dict[str, tuple[int, int]]] = {
    "nyud": (448, 576),
    "pascal": (512, 512),
    "cityscapes": (512, 1024),
}

#: Class names of ``semseg`` on each dataset (index = class id).
NYUD_CLASSES: Final[tuple[str, ...]] = class_names("semseg", "nyud")
PASCAL_CLASSES: Final[tuple[str, ...]] = class_names("semseg", "pascal")
CITYSCAPES_CLASSES: Final[tuple[str, ...]] = class_names("semseg", "cityscapes")

#: PASCAL-Part person part names -> the 6 parts used for ``human_parts`` (0 = background):
#: 1 head, 2 torso, 3 upper arms, 4 lower arms, 5 upper legs, 6 lower legs.
PASCAL_PERSON_PARTS: Final[dict[str, int]] = {
    "hair": 1, "head": 1, "lear": 1, "lebrow": 1, "leye": 1, "mouth": 1, "nose": 1, "rear": 1,
    "rebrow": 1, "reye": 1, "neck": 2, "torso": 2, "luarm": 3, "ruarm": 3, "lhand": 4, "llarm": 4,
    "rhand": 4, "rlarm": 4, "luleg": 5, "ruleg": 5, "lfoot": 6, "llleg": 6, "rfoot": 6, "rlleg": 6,
}  # fmt: skip

#: VOC class index of ``person`` in PASCAL-Part ``anno.objects.class_ind``.
PASCAL_PERSON_CLASS: Final[int] = 15

#: Cityscapes ``labelIds`` (0..33, -1 = license plate) -> train id (0..18, 255 = ignored).
CITYSCAPES_LABEL_TO_TRAIN: Final[dict[int, int]] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip

#: Cityscapes depth range in metres: 0 < d < 80 is valid, anything else becomes 0 (invalid).
CITYSCAPES_MAX_DEPTH: Final[float] = 80.0

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

#: PASCAL-Context ``LabelMap`` classes on which the distilled normals (``normals_distill``) are
#: kept; every other pixel is invalid. The official loaders (InvPT / MTMamba / PAMM
#: ``data/pascal_context.py``, ``normals_valid_classes``) take the classes whose name is both in
#: ``data/db_info/nyu_classes.json`` and in ``data/db_info/context_classes.json`` (except
#: 'unknown'), by their context id, plus 'tvmonitor' (427): 170 ids.
PASCAL_NORMALS_VALID_CLASSES: Final[tuple[int, ...]] = (
    3, 4, 6, 9, 10, 11, 13, 15, 17, 18, 22, 23, 29, 30, 33, 34, 36, 37, 38, 39, 41, 43, 46, 49,
    50, 51, 53, 55, 56, 59, 61, 62, 65, 66, 68, 69, 72, 73, 78, 83, 84, 85, 87, 88, 95, 96, 101,
    104, 105, 107, 111, 113, 115, 122, 124, 135, 141, 142, 143, 146, 150, 154, 157, 158, 159, 165,
    172, 174, 181, 183, 184, 191, 193, 195, 197, 199, 202, 213, 215, 216, 219, 220, 223, 225, 228,
    230, 232, 233, 238, 239, 242, 243, 246, 250, 251, 252, 255, 260, 261, 263, 269, 272, 273, 275,
    281, 283, 284, 285, 286, 287, 288, 290, 291, 292, 293, 295, 304, 307, 309, 310, 314, 315, 319,
    323, 329, 330, 331, 336, 342, 345, 349, 350, 351, 352, 355, 357, 368, 370, 371, 374, 379, 380,
    383, 384, 397, 401, 403, 405, 407, 408, 411, 412, 413, 414, 417, 419, 421, 423, 427, 429, 430,
    432, 440, 441, 442, 443, 444, 446, 454, 457,
)  # fmt: skip

#: VOC class index of ``person`` in PASCAL-Part ``anno.objects.class_ind``.
PASCAL_PERSON_CLASS: Final[int] = 15

#: Cityscapes ``labelIds`` (0..33, -1 = license plate) -> train id (0..18, 255 = ignored).
CITYSCAPES_LABEL_TO_TRAIN: Final[dict[int, int]] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip

#: Cityscapes stereo rig used to turn disparity into metres (``depth_target="metres"``) when a
#: sample has no ``camera/*.json``: baseline (m) and focal length (px).
CITYSCAPES_BASELINE: Final[float] = 0.209313
CITYSCAPES_FX: Final[float] = 2262.52

#: File that :func:`mtssm.data.render_scenes` writes at the root of a rendered dataset (the
#: official layouts have no such file); evaluation reads it to know the scenes are rendered.
RENDER_MARKER: Final[str] = "mtssm_rendered.json"

#: Cityscapes depth range in metres (``depth_target="metres"``): 0 < d < 80 is valid, anything else
#: becomes 0 (invalid).
CITYSCAPES_MAX_DEPTH: Final[float] = 80.0

#: Depth a dataset's sensor can measure, in metres: stored depth is 0 (no reading) or within
#: ``(0, max]``; anything else (a wrong unit, a fill value, an overflow) is not a measurement.
#: NYUDv2: the Kinect v1 reports 0..10 m (libfreenect's millimetre depth is 0..10000).
#: Cityscapes: its loader keeps only depth below 80 m (:data:`CITYSCAPES_MAX_DEPTH`).
DEPTH_RANGE: Final[dict[str, tuple[float, float]]] = {"nyud": (0.0, 10.0), "cityscapes": (0.0, CITYSCAPES_MAX_DEPTH)}

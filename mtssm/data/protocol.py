"""The data and evaluation protocol of each dataset, as the papers' official code applies it.

One :class:`Protocol` per dataset says how images reach the network (native size with the ATRC
augmentations, or resized without augmentation), what the depth target is and where it is scored,
and the boundary matching radius.
:func:`mtssm.data.build_dataset` and :func:`mtssm.metrics.build_evaluator` read it; ``mtssm eval``
prints :meth:`Protocol.describe`. Task lists, class counts and ignore values live in
the task table :mod:`mtssm.tasks`.

Sources (the official repositories):

- NYUD-MT and PASCAL-MT: InvPT (``prismformore/Multi-Task-Transformer``, ``InvPT/data/``),
  MTMamba (``EnVision-Research/MTMamba``, ``data/nyud.py``, ``data/pascal_context.py``,
  ``data/transforms.py``, ``utils/common_config.py`` ``get_transformations``), PAMM; boundary
  odsF with the SEISM evaluation at ``maxDist`` 0.011 (NYUD) and 0.0075 (PASCAL), as ATRC / MTI-Net
  run it. Depth is scored on every valid (non-zero) pixel, predictions clamped at 0
  (``utils/utils.py`` ``get_output``, ``evaluation/eval_depth.py``).
- Cityscapes: MTMamba++ (``EnVision-Research/MTMamba``: ``data/cityscapes.py``,
  ``utils/config.py`` ``TRAIN.SCALE = TEST.SCALE = (512, 1024)``, ``IMAGE_ORI_SIZE = (1024, 2048)``,
  ``depth_min = 0``, ``depth_max = 80``; ``models/MTMamba_plus.py`` interpolates every output to
  ``IMAGE_ORI_SIZE``): the image resized to 512x1024, no augmentation, labels at their stored
  1024x2048, outputs resized (bilinearly) to the labels' size, depth a disparity in pixels scored
  where 0 < gt < 80.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from mtssm.data.constants import IGNORE_INDEX, TRAIN_CROP_SIZE

__all__ = ["PROTOCOLS", "Protocol", "protocol"]


@dataclass(frozen=True)
class Protocol:
    """How one dataset is fed and scored.

    Attributes:
        dataset: the dataset name (a key of :data:`PROTOCOLS`).
        train_crop: (H, W) of the random crops of the augmented training pipeline; None when the
            dataset is not augmented.
        image_size: (H, W) the image is resized to (train and eval) with labels at their stored
            size; None when images keep their size.
        depth_units: what ``depth`` holds (None: no depth task).
        depth_range: ``(lo, hi)``: depth is scored where ``lo < gt < hi``, predictions clamped at
            0 first.
        edge_max_dist: boundary matching radius, a fraction of the image diagonal.
        ignore_index: label value the losses and metrics ignore (depth and normals: 0 is invalid).
    """

    dataset: str
    train_crop: tuple[int, int] | None
    image_size: tuple[int, int] | None
    depth_units: str | None
    depth_range: tuple[float, float]
    edge_max_dist: float
    ignore_index: int = IGNORE_INDEX

    def describe(self, tasks: Sequence[str] | None = None) -> str:
        """One line naming every choice (for ``tasks``, default every task), for ``mtssm eval``."""
        if self.image_size is None:
            feed = f"images at their size (train: random scale 0.5-2, crop {_hw(self.train_crop)}, flip, colour)"
        else:
            feed = f"images resized to {_hw(self.image_size)}, no augmentation, labels at their stored size"
        lo, hi = self.depth_range
        depth = "" if self.depth_units is None or (tasks is not None and "depth" not in tasks) else (
            f"depth in {self.depth_units} scored on {lo:g} < gt" + (f" < {hi:g}; " if hi != float("inf") else "; "))
        edge = "" if tasks is not None and "edge" not in tasks else (
            f"edge maxDist {self.edge_max_dist:g} of the diagonal; ")
        return (
            f"{self.dataset} protocol: {feed}; predictions resized to the labels' (original) size; "
            f"{depth}{edge}ignore value {self.ignore_index}"
        )


def _hw(size: tuple[int, int] | None) -> str:
    return "-" if size is None else f"{size[0]}x{size[1]}"


#: The protocol of each dataset.
PROTOCOLS: Final[dict[str, Protocol]] = {
    "nyud": Protocol("nyud", TRAIN_CROP_SIZE["nyud"], None, "metres", (0.0, float("inf")), 0.011),
    "pascal": Protocol("pascal", TRAIN_CROP_SIZE["pascal"], None, None, (0.0, float("inf")), 0.0075),
    "cityscapes": Protocol("cityscapes", None, TRAIN_CROP_SIZE["cityscapes"], "disparity pixels", (0.0, 80.0), 0.0075),
}


def protocol(dataset: str) -> Protocol:
    """The protocol of ``dataset`` ('nyud', 'pascal' or 'cityscapes')."""
    key = dataset.lower()
    if key not in PROTOCOLS:
        raise ValueError(f"dataset: unknown {dataset!r}; known: {sorted(PROTOCOLS)}")
    return PROTOCOLS[key]

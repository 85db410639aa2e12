"""Datasets, augmentations, resumable loaders and rendered scenes for multi-task dense prediction.

Public API: the datasets :class:`NYUDv2`, :class:`PASCALContext`, :class:`Cityscapes` (raw samples
as numpy arrays, see :mod:`mtssm.data.datasets`), :func:`build_dataset` (with the train or eval
transforms), :func:`make_dataloader` (resumable, yields :class:`tensordict.TensorDict` batches),
:func:`render_scenes` and :func:`check_dataset`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from mtssm.data.check import DATASETS, check_dataset
from mtssm.data.constants import (
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    NUM_CLASSES,
    TASKS_BY_DATASET,
    TRAIN_CROP_SIZE,
)
from mtssm.data.datasets import Cityscapes, DenseDataset, NYUDv2, PASCALContext
from mtssm.data.io import DataFileError
from mtssm.data.loader import SeededSampler, collate, make_dataloader
from mtssm.data.render import render_scenes
from mtssm.data.transforms import eval_transforms, train_transforms

__all__ = [
    "DATASETS",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NUM_CLASSES",
    "TASKS_BY_DATASET",
    "TRAIN_CROP_SIZE",
    "Cityscapes",
    "DataFileError",
    "DenseDataset",
    "NYUDv2",
    "PASCALContext",
    "SeededSampler",
    "build_dataset",
    "check_dataset",
    "collate",
    "eval_transforms",
    "make_dataloader",
    "render_scenes",
    "train_transforms",
]


def build_dataset(
    name: str,
    root: str | os.PathLike,
    split: str,
    train: bool,
    crop_size: int | Sequence[int] | None = None,
    tasks: Sequence[str] | None = None,
    on_error: str = "raise",
    normalization: tuple[Sequence[float], Sequence[float]] | None = None,
) -> DenseDataset:
    """Dataset ``name`` ("nyud", "pascal" or "cityscapes") with tensor samples.

    ``train=True``: random scale [0.5, 2] + crop to ``crop_size`` (default
    :data:`TRAIN_CROP_SIZE` of the dataset), flip, photometric distortion. ``train=False``: no
    resizing; padded to ``crop_size`` if given (the loader pads each batch to a common size).
    Images are normalised with ``normalization = (mean, std)``: the model's
    (``model.input_normalization``); None gives the ImageNet statistics.
    """
    if name not in DATASETS:
        raise ValueError(f"dataset name must be one of {sorted(DATASETS)}, got {name!r}")
    if train:
        crop = TRAIN_CROP_SIZE[name] if crop_size is None else crop_size
        transforms = train_transforms(crop, normalization=normalization)
    else:
        transforms = eval_transforms(crop_size, normalization=normalization)
    dataset = DATASETS[name](root, split, transforms=transforms, tasks=tasks, on_error=on_error)
    dataset.encoded_normals = True  # decoded by ToTensor after augmentation
    return dataset

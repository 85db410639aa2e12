"""Datasets, augmentations, resumable loaders and rendered scenes for multi-task dense prediction.

Public API: the datasets :class:`NYUDv2`, :class:`PASCALContext`, :class:`Cityscapes` (raw samples
as numpy arrays, see :mod:`mtssm.data.datasets`), :func:`build_dataset` (with the train or eval
transforms), :func:`make_dataloader` (resumable, yields :class:`tensordict.TensorDict` batches),
:func:`render_scenes` and :func:`check_dataset`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

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
from mtssm.data.protocol import PROTOCOLS, Protocol, protocol
from mtssm.data.render import render_scenes
from mtssm.data.transforms import eval_transforms, resize_transforms, train_transforms

__all__ = [
    "DATASETS",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NUM_CLASSES",
    "PROTOCOLS",
    "TASKS_BY_DATASET",
    "TRAIN_CROP_SIZE",
    "Cityscapes",
    "DataFileError",
    "DenseDataset",
    "NYUDv2",
    "PASCALContext",
    "Protocol",
    "SeededSampler",
    "build_dataset",
    "check_dataset",
    "collate",
    "eval_transforms",
    "make_dataloader",
    "protocol",
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
    **options: Any,
) -> DenseDataset:
    """Dataset ``name`` ("nyud", "pascal" or "cityscapes") with tensor samples, fed as its
    :class:`Protocol` says.

    NYUDv2 and PASCAL-Context: ``train=True``: random scale [0.5, 2] + crop to ``crop_size``
    (default the protocol's ``train_crop``), flip, photometric distortion; ``train=False``: no
    resizing, padded to ``crop_size`` if given (the loader pads each batch to a common size).
    Evaluation pads real data (centred) to the protocol's ``train_crop``, the official test size;
    rendered scenes are evaluated at their size.
    Cityscapes: the image resized to the protocol's ``image_size`` (or ``crop_size``), labels at
    their stored size, no augmentation, in both splits. ``options`` go to the dataset
    (``normals_rule``, ``edge_rule``, ``depth_target``: the departures of
    :mod:`mtssm.data.datasets`). Images are normalised with ``normalization = (mean, std)``: the
    model's (``model.input_normalization``); None gives the ImageNet statistics.
    """
    if name not in DATASETS:
        raise ValueError(f"dataset name must be one of {sorted(DATASETS)}, got {name!r}")
    proto = protocol(name)
    dataset = DATASETS[name](root, split, tasks=tasks, on_error=on_error, **options)
    if proto.image_size is not None:
        dataset.transforms = resize_transforms(proto.image_size if crop_size is None else crop_size, normalization)
    elif train:
        dataset.transforms = train_transforms(proto.train_crop if crop_size is None else crop_size, normalization=normalization)
    else:  # real data: centred padding to the test size, as the official pipeline
        pad = crop_size if crop_size is not None or dataset.rendered else proto.train_crop
        dataset.transforms = eval_transforms(pad, normalization)
    dataset.encoded_normals = True  # decoded by ToTensor after augmentation
    return dataset

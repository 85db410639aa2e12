"""``check_dataset``: list every missing, unreadable, mis-sized or out-of-range file of a copy."""

from __future__ import annotations

import os
from pathlib import Path

from mtssm.data.datasets import Cityscapes, DenseDataset, NYUDv2, PASCALContext
from mtssm.data.io import DataFileError

__all__ = ["DATASETS", "check_dataset"]

#: Dataset classes by layout name (their ``name``, a dataset of the task table :mod:`mtssm.tasks`).
DATASETS: dict[str, type[DenseDataset]] = {cls.name: cls for cls in (NYUDv2, PASCALContext, Cityscapes)}


def check_dataset(root: str | os.PathLike, layout: str) -> list[str]:
    """Read every sample of every split of the ``layout`` dataset at ``root`` with all its tasks.

    Returns one line per problem, ``"<path>: <what is wrong and what was expected>"``; an empty
    list means the copy is sound. A missing root, folder or split file, and a split file with lines
    that are not UTF-8 (by line number), are reported as problems. Targets are checked for what a
    sensor can give: depth finite and within the dataset's range
    (:data:`mtssm.data.constants.DEPTH_RANGE`), decoded normals finite.
    """
    if layout not in DATASETS:
        raise ValueError(f"layout must be one of {sorted(DATASETS)}, got {layout!r}")
    cls = DATASETS[layout]
    root = Path(root)
    if not root.is_dir():
        return [f"{root}: root folder not found"]
    problems: list[str] = []
    splits = [s for s in cls.splits if s != "test"]
    for split in splits:
        try:
            ds = cls(root, split)
        except (FileNotFoundError, DataFileError) as exc:  # no split file, or one that is not text
            problems.append(str(exc))
            continue
        if len(ds) == 0:
            problems.append(f"{root}: split {split!r} lists no samples")
        for i in range(len(ds)):
            errors: list[DataFileError] = []
            ds.load(i, errors)
            problems.extend(str(e) for e in errors)
    return problems

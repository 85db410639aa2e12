"""Map-style datasets reading NYUDv2, PASCAL-Context and Cityscapes in their distributed layouts.

A raw sample (``transforms=None``) is a dict of numpy arrays at the stored size:

- ``image``: uint8 (H, W, 3) RGB;
- ``semseg``: uint8 (H, W) class ids, 255 = ignored;
- ``depth``: float32 (H, W) metres, 0 = invalid;
- ``normals``: float32 (H, W, 3) camera-frame unit normals (x right, y down, z forward),
  0 = invalid (stored normals whose decoded norm is below 0.1);
- ``edge``: uint8 (H, W) in {0, 1};
- ``human_parts``: uint8 (H, W) 0 background, 1..6 parts, 255 = ignored (images without people);
- ``sal``: uint8 (H, W) in {0, 1};
- ``meta``: ``{"id": str, "size": (H, W)}``.

Setting ``dataset.encoded_normals = True`` (what :func:`mtssm.data.build_dataset` does) keeps
normals as the stored uint8 (H, W, 3) codes (n = 2 v / 255 - 1) until
:class:`mtssm.data.transforms.ToTensor` decodes them after augmentation: nearest resampling and
flipping (v -> 255 - v) commute with decoding, so this only saves time.

With ``transforms`` the sample is ``transforms(sample, rng)`` (see :mod:`mtssm.data.transforms`),
where ``rng`` is a :class:`numpy.random.Generator`. Indexing with ``(index, seed)`` (what
:func:`mtssm.data.make_dataloader`'s sampler yields) seeds ``rng`` with ``seed``, so augmentations
are reproducible; a plain integer index draws fresh entropy.

Cityscapes: ``leftImg8bit/{split}/{city}/*_leftImg8bit.png``, ``gtFine/{split}/{city}/
*_gtFine_labelIds.png`` (mapped to the 19 train ids, others 255) and ``disparity/{split}/{city}/
*_disparity.png`` (uint16, disparity = (v - 1) / 256 for v > 0). Depth = baseline * fx / disparity
with baseline and fx from ``camera/{split}/{city}/*_camera.json`` when present, else Cityscapes'
standard 0.209313 m and 2262.52 px; only 0 < depth < 80 m is kept, the rest is 0 (invalid).

A file that is missing, cannot be decoded, has another size than its image or holds out-of-range
values raises :class:`mtssm.data.io.DataFileError` naming the file; with ``on_error="skip"`` the
sample is returned as ``None`` (the loader's collate drops it), a warning names the file and
``dataset.skipped`` counts it (per process).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from mtssm.data.constants import (
    CITYSCAPES_LABEL_TO_TRAIN,
    CITYSCAPES_MAX_DEPTH,
    IGNORE_INDEX,
    PASCAL_PERSON_CLASS,
    PASCAL_PERSON_PARTS,
)
from mtssm.data.io import DataFileError, check_size, read_image, read_label_png, read_mat, read_npy
from mtssm.tasks import dataset_tasks

__all__ = ["DenseDataset", "NYUDv2", "PASCALContext", "Cityscapes", "decode_normals", "label_edges"]

Sample = dict[str, Any]
Transform = Callable[[Sample, np.random.Generator], Sample]


_NORMAL_SCALE = np.float32(2.0 / 255.0)


def decode_normals(png: np.ndarray, channels_first: bool = False, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 (H, W, 3) codes -> float32 unit normals via n = 2 v / 255 - 1, renormalised; codes
    whose vector has norm < 0.1 (e.g. 128, 128, 128) are invalid and give 0. Returns (H, W, 3),
    or (3, H, W) with ``channels_first``, in which case ``out`` (a C-contiguous float32
    (3, H, W) array) may receive the result."""
    shape = (3,) + png.shape[:2]
    if out is None:
        n = np.empty(shape, np.float32)
    elif not channels_first or out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {shape} with channels_first")
    else:
        n = out
    for c in range(3):  # float32 v * (2 / 255) - 1, rounded as a float32 lookup table would be
        np.multiply(png[..., c], _NORMAL_SCALE, out=n[c], dtype=np.float32)
    n -= np.float32(1.0)
    sq = np.multiply(n[0], n[0])
    tmp = np.multiply(n[1], n[1])
    sq += tmp
    sq += np.multiply(n[2], n[2], out=tmp)
    invalid = sq < np.float32(0.01)
    np.sqrt(sq, out=sq)
    np.copyto(sq, np.inf, where=invalid)  # 1 / inf = 0: invalid normals become 0
    n *= np.divide(np.float32(1.0), sq, out=sq)
    return n if channels_first else np.ascontiguousarray(n.transpose(1, 2, 0))


def label_edges(labels: np.ndarray) -> np.ndarray:
    """One-pixel-wide boundaries of a label map (H, W) -> uint8 {0, 1}: a pixel is an edge when a
    4-neighbour has a smaller label, so each discontinuity is marked on exactly one side."""
    edge = np.zeros(labels.shape, bool)
    edge[:, 1:] |= labels[:, 1:] > labels[:, :-1]
    edge[:, :-1] |= labels[:, :-1] > labels[:, 1:]
    edge[1:] |= labels[1:] > labels[:-1]
    edge[:-1] |= labels[:-1] > labels[1:]
    return edge.view(np.uint8)


class DenseDataset(torch.utils.data.Dataset):
    """Shared logic: argument checks, split ids, error policy, transforms.

    Subclasses set ``name`` (a dataset of the task table :mod:`mtssm.tasks`) and implement ``_ids`` and the
    per-task readers ``_read_<task>(sample_id, size)``.
    """

    name: ClassVar[str]
    splits: ClassVar[tuple[str, ...]] = ("train", "val")

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        transforms: Transform | None = None,
        tasks: Sequence[str] | None = None,
        on_error: str = "raise",
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{type(self).__name__} root folder not found: {self.root}")
        if split not in self.splits:
            raise ValueError(f"split must be one of {self.splits}, got {split!r}")
        available = dataset_tasks(self.name)
        tasks = tuple(available if tasks is None else tasks)
        unknown = [t for t in tasks if t not in available]
        if unknown:
            raise ValueError(f"tasks {unknown} are not provided by {self.name}; choose from {available}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.split = split
        self.tasks = tasks
        self.transforms = transforms
        self.on_error = on_error
        self.skipped = 0
        self.encoded_normals = False
        self.ids: list[str] = self._ids()

    def _ids(self) -> list[str]:
        raise NotImplementedError

    def _split_file_ids(self, path: Path) -> list[str]:
        if not path.is_file():
            raise FileNotFoundError(f"split file not found: {path} (looked for the {self.split!r} split)")
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]

    def _require_dir(self, sub: str) -> Path:
        path = self.root / sub
        if not path.is_dir():
            raise FileNotFoundError(
                f"{type(self).__name__}: folder {path} not found; is {self.root} a {self.name} root?"
            )
        return path

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, sample_id: str) -> Path:
        raise NotImplementedError

    def load(self, index: int, errors: list[DataFileError] | None = None) -> Sample | None:
        """The raw sample ``index``. With ``errors`` given, every failing file is appended to it
        (and ``None`` returned if any failed) instead of raising at the first."""
        sample_id = self.ids[index]
        try:
            image = read_image(self.image_path(sample_id))
        except DataFileError as exc:
            if errors is None:
                raise
            errors.append(exc)
            return None
        size = image.shape[:2]
        sample: Sample = {"image": image}
        for task in self.tasks:
            try:
                sample[task] = getattr(self, f"_read_{task}")(sample_id, size)
            except DataFileError as exc:
                if errors is None:
                    raise
                errors.append(exc)
        sample["meta"] = {"id": sample_id, "size": (int(size[0]), int(size[1]))}
        return None if errors else sample

    @property
    def supports_compact(self) -> bool:
        """Whether :meth:`sample` can give compact samples: ``transforms`` offer a compact variant
        (``with_compact_output()``, as the pipelines of :func:`mtssm.data.build_dataset` do)."""
        return self._compact_transforms() is not None

    def _compact_transforms(self) -> Transform | None:
        variant = getattr(self.transforms, "with_compact_output", None)
        return None if variant is None else variant()

    def sample(self, index: int, seed: int | None = None, *, compact: bool = False) -> Sample | None:
        """Sample ``index`` through ``transforms``, augmented with ``np.random.default_rng(seed)``
        (fresh entropy when ``seed`` is None).

        ``compact=True`` ends with ``ToTensor(compact=True)`` instead of ``ToTensor()``: small
        dtypes for a cheap trip between processes, turned into the usual batch by
        :func:`mtssm.data.loader.finalize_batch` (needs :attr:`supports_compact`). Returns None
        for a sample skipped under ``on_error="skip"``.
        """
        transforms = self.transforms
        if compact:
            transforms = self._compact_transforms()
            if transforms is None:
                raise ValueError(f"{type(self).__name__}: compact samples need transforms ending with ToTensor()")
        if not 0 <= index < len(self.ids):
            raise IndexError(f"index {index} out of range for {len(self.ids)} samples")
        try:
            sample = self.load(index)
        except DataFileError as exc:
            if self.on_error == "raise":
                raise
            self.skipped += 1
            warnings.warn(f"skipping sample {self.ids[index]!r}: {exc}", stacklevel=2)
            return None
        return sample if transforms is None else transforms(sample, np.random.default_rng(seed))

    def __getitem__(self, index: int | tuple[int, int]) -> Sample | None:
        """``dataset[i]`` or ``dataset[(i, seed)]``: :meth:`sample` ``i`` (seeded with ``seed``)."""
        if isinstance(index, tuple):
            return self.sample(*index)
        return self.sample(index)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, "
            f"tasks={self.tasks})"
        )


def _labels(path: Path, size: tuple[int, int], max_value: int, allow_ignore: bool) -> np.ndarray:
    arr = read_label_png(path)
    check_size(path, arr, size)
    if arr.size and arr.max() > max_value:  # one reduction; the mask only for the slow path
        bad = arr > max_value
        if allow_ignore:
            bad &= arr != IGNORE_INDEX
        if bad.any():
            allowed = f"0..{max_value}" + (" or 255" if allow_ignore else "")
            raise DataFileError(path, f"label value {int(arr[bad].max())} out of range (expected {allowed})")
    return arr.astype(np.uint8)


def _normals(path: Path, size: tuple[int, int], encoded: bool) -> np.ndarray:
    png = read_label_png(path, channels=3)
    check_size(path, png, size)
    return np.ascontiguousarray(png) if encoded else decode_normals(png)


class NYUDv2(DenseDataset):
    """NYUDv2 as in the ATRC/MTI-Net tarball: ``images/*.png``, ``segmentation/*.png`` (0..40),
    ``depth/*.npy``, ``normals/*.png``, ``edge/*.png``, ``gt_sets/{train,val}.txt``."""

    name = "nyud"

    def _ids(self) -> list[str]:
        self._require_dir("images")
        return self._split_file_ids(self.root / "gt_sets" / f"{self.split}.txt")

    def image_path(self, sample_id: str) -> Path:
        return self.root / "images" / f"{sample_id}.png"

    def _read_semseg(self, sid: str, size: tuple[int, int]) -> np.ndarray:
        # stored 0..40 with 0 unlabelled -> class v - 1, and 0 - 1 wraps to 255 in uint8.
        labels = _labels(self.root / "segmentation" / f"{sid}.png", size, 40, False)
        return np.subtract(labels, np.uint8(1), dtype=np.uint8)

    def _read_depth(self, sid: str, size: tuple[int, int]) -> np.ndarray:
        path = self.root / "depth" / f"{sid}.npy"
        depth = read_npy(path)
        if depth.ndim == 3 and depth.shape[2] == 1:
            depth = depth[..., 0]
        if depth.ndim != 2:
            raise DataFileError(path, f"expected a 2-D depth map, got shape {depth.shape}")
        check_size(path, depth, size)
        depth = depth.astype(np.float32, copy=False)
        # min is NaN if any value is; two reductions instead of full-size masks
        if depth.size and not (depth.min() >= 0 and depth.max() < np.inf):
            raise DataFileError(path, "depth holds negative or non-finite values (expected >= 0 metres)")
        return depth

    def _read_normals(self, sid: str, size: tuple[int, int]) -> np.ndarray:
        return _normals(self.root / "normals" / f"{sid}.png", size, self.encoded_normals)

    def _read_edge(self, sid: str, size: tuple[int, int]) -> np.ndarray:
        path = self.root / "edge" / f"{sid}.png"
        arr = read_label_png(path)
        check_size(path, arr, size)
        edge = arr == 255
        if np.count_nonzero(arr) != np.count_nonzero(edge):  # some value is neither 0 nor 255
            bad = (arr != 0) & ~edge
            raise DataFileError(path, f"edge value {int(arr[bad][0])} out of range (expected 0 or 255)")
        return edge.view(np.uint8)


class PASCALContext(DenseDataset):
    """PASCAL-Context as in the ATRC/MTI-Net tarball: ``JPEGImages/*.jpg``, ``semseg/VOC12/*.png``
    (falling back to ``semseg/pascal-context/*.png``; 21 classes), ``human_parts/*.mat``
    (PASCAL-Part ``anno`` structs; a missing file or no person with parts gives all 255),
    ``normals_distill/*.png``, ``sal_distill/*.png`` (v / 255 > 0.5), edges as the label
    discontinuities of ``pascal-context/trainval/*.mat`` ``LabelMap``, one pixel wide (marked on
    the side with the larger label, see :func:`label_edges`),
    ``ImageSets/Context/{train,val}.txt``. Nothing is written into the dataset folder."""

    name = "pascal"

    def _ids(self) -> list[str]:
        self._require_dir("JPEGImages")
        return self._split_file_ids(self.root / "ImageSets" / "Context" / f"{self.split}.txt")

    def image_path(self, sample_id: str) -> Path:
        return self.root / "JPEGImages" / f"{sample_id}.jpg"

    def _read_semseg(self, sid: str, size: tuple[int, int]) -> np.ndarray:
        path = self.root / "semseg" / "VOC12" / f"{sid}.png"
        if not path.is_file():
            fallback = self.root / "semseg" / "pascal-context" / f"{sid}.png"
            if fallback.is_file():
                path = fallback
        return _labels(path, size, 20, True)

    def _read_human_parts(self, sid: str, size: tuple[int, int]) -> np.ndarray:
        path = self.root / "human_parts" / f"{sid}.mat"
        target = np.full(size, IGNORE_INDEX, np.uint8)
        if not path.is_file():
            return target
        anno = read_mat(path, "anno")
        try:
            objects = anno[0, 0]["objects"]
            objects = objects[0] if objects.size else []
            found = False
            for obj in objects:
                if int(np.asarray(obj["class_ind"]).reshape(-1)[0]) != PASCAL_PERSON_CLASS:
                    continue
                parts = obj["parts"]
                if parts.size == 0:
                    continue
                if not found:
                    target[:] = 0
                    found = True
                for part in parts[0]:
                    name = str(np.asarray(part["part_name"]).reshape(-1)[0])
                    if name not in PASCAL_PERSON_PARTS:
                        raise DataFileError(path, f"unknown person part {name!r}")
                    mask = np.asarray(part["mask"]).astype(bool)
                    check_size(path, mask, size)
                    target[mask] = PASCAL_PERSON_PARTS[name]
        except DataFileError:
            raise
        except (IndexError, KeyError, ValueError, TypeError) as exc:
            raise DataFileError(path, f"malformed PASCAL-Part anno struct ({exc})") from None
        return target

    def _read_sal(self, sid: str, size: tuple[int, int]) -> np.ndarray:
        path = self.root / "sal_distill" / f"{sid}.png"
        arr = read_label_png(path)
        check_size(path, arr, size)
        return (arr.astype(np.float32) / 255.0 > 0.5).astype(np.uint8)

    def _read_normals(self, sid: str, size: tuple[int, int]) -> np.ndarray:
        return _normals(self.root / "normals_distill" / f"{sid}.png", size, self.encoded_normals)

    def _read_edge(self, sid: str, size: tuple[int, int]) -> np.ndarray:
        path = self.root / "pascal-context" / "trainval" / f"{sid}.mat"
        labels = read_mat(path, "LabelMap")
        if labels.ndim != 2:
            raise DataFileError(path, f"LabelMap must be 2-D, got shape {labels.shape}")
        check_size(path, labels, size)
        return label_edges(labels.astype(np.int64))


class Cityscapes(DenseDataset):
    """Cityscapes in its standard layout (see the module docstring for depth from disparity)."""

    name = "cityscapes"
    splits = ("train", "val", "test")
    DEFAULT_BASELINE = 0.209313
    DEFAULT_FX = 2262.52

    def _ids(self) -> list[str]:
        folder = self._require_dir(f"leftImg8bit/{self.split}")
        suffix = "_leftImg8bit.png"
        return sorted(f"{p.parent.name}/{p.name[: -len(suffix)]}" for p in folder.glob(f"*/*{suffix}"))

    def _path(self, kind: str, sid: str, suffix: str) -> Path:
        city, stem = sid.split("/", 1)
        return self.root / kind / self.split / city / f"{stem}_{suffix}"

    def image_path(self, sample_id: str) -> Path:
        return self._path("leftImg8bit", sample_id, "leftImg8bit.png")

    def _read_semseg(self, sid: str, size: tuple[int, int]) -> np.ndarray:
        path = self._path("gtFine", sid, "gtFine_labelIds.png")
        arr = read_label_png(path)
        check_size(path, arr, size)
        if arr.max() > 33:
            raise DataFileError(path, f"labelId {int(arr.max())} out of range (expected 0..33)")
        lut = np.full(256, IGNORE_INDEX, np.uint8)
        for label_id, train_id in CITYSCAPES_LABEL_TO_TRAIN.items():
            lut[label_id] = train_id
        return lut[arr]

    def _read_depth(self, sid: str, size: tuple[int, int]) -> np.ndarray:
        path = self._path("disparity", sid, "disparity.png")
        arr = read_label_png(path)
        check_size(path, arr, size)
        baseline, fx = self.DEFAULT_BASELINE, self.DEFAULT_FX
        cam = self._path("camera", sid, "camera.json")
        if cam.is_file():
            try:
                info = json.loads(cam.read_text())
                baseline, fx = float(info["extrinsic"]["baseline"]), float(info["intrinsic"]["fx"])
            except (ValueError, KeyError, TypeError) as exc:
                raise DataFileError(cam, f"expected extrinsic.baseline and intrinsic.fx ({exc})") from None
        raw = arr.astype(np.float32)
        disparity = np.where(raw > 0, (raw - 1.0) / 256.0, 0.0)
        with np.errstate(divide="ignore"):
            depth = np.where(disparity > 0, baseline * fx / disparity, 0.0)
        depth[(depth <= 0) | (depth >= CITYSCAPES_MAX_DEPTH)] = 0.0
        return depth.astype(np.float32)

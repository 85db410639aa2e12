"""Map-style datasets reading NYUDv2, PASCAL-Context and Cityscapes in their distributed layouts.

A raw sample (``transforms=None``) is a dict of numpy arrays at the stored size, decoded as the
official loaders decode them (InvPT / MTMamba / PAMM ``data/nyud.py`` and
``data/pascal_context.py``, followed by their ``AddIgnoreRegions``; MTMamba++
``data/cityscapes.py`` for Cityscapes):

- ``image``: uint8 (H, W, 3) RGB;
- ``semseg``: uint8 (H, W) class ids, 255 = ignored;
- ``depth``: float32 (H, W), 0 = invalid: metres (NYUDv2), disparity in pixels (Cityscapes);
- ``normals``: float32 (H, W, 3) camera-frame normals (x right, y down, z forward) decoded as
  stored, ``n = 2 v / 255 - 1`` (not renormalised), all 0 where invalid (PASCAL-Context: pixels
  whose ``LabelMap`` class is not one of :data:`~mtssm.data.constants.PASCAL_NORMALS_VALID_CLASSES`);
- ``edge``: uint8 (H, W) in {0, 1};
- ``human_parts``: uint8 (H, W) 0 background, 1..6 parts, 255 = ignored: the whole map is 255
  when it holds no part (no person in the image, people without parts, or, after a crop, no part
  left in the window: see :class:`mtssm.data.transforms.IgnoreEmptyParts`);
- ``sal``: uint8 (H, W) in {0, 1};
- ``meta``: ``{"id": str, "size": (H, W)}``.

Departures from the official decoding are options, off by default (and in every paper recipe):
``normals_rule="unit"`` renormalises stored normals and marks codes whose vector is shorter than
0.1 invalid (the official decoding keeps such codes, e.g. (128, 128, 128), as near-zero targets);
``edge_rule="neighbour4"`` marks PASCAL-Context edges one pixel wide on the larger label of every
4-neighbour discontinuity (the official Laplacian misses discontinuities whose neighbours cancel,
e.g. labels 1 and 3 around a 2, and its thinning moves some edge pixels);
``depth_target="metres"`` turns Cityscapes disparity into metres (``baseline * fx / disparity``
with the camera of ``camera/*.json``, else :data:`~mtssm.data.constants.CITYSCAPES_BASELINE` and
``CITYSCAPES_FX``; only 0 < depth < 80 m kept).

Setting ``dataset.encoded_normals = True`` (what :func:`mtssm.data.build_dataset` does) keeps
normals as uint8 (H, W, 4) codes until :class:`mtssm.data.transforms.ToTensor` (or the loader)
decodes them after augmentation: channels 0-2 the stored codes, channel 3 a flag, 255 valid, 254
valid with x negated (a horizontal flip), anything else invalid (padding uses 128). Nearest
resampling, cropping and flipping commute with decoding, so the decoded values are exactly those of
decoding first. With ``normals_rule="unit"`` normals always travel decoded.

With ``transforms`` the sample is ``transforms(sample, rng)`` (see :mod:`mtssm.data.transforms`),
where ``rng`` is a :class:`numpy.random.Generator`. Indexing with ``(index, seed)`` (what
:func:`mtssm.data.make_dataloader`'s sampler yields) seeds ``rng`` with ``seed``, so augmentations
are reproducible; a plain integer index draws fresh entropy.

Cityscapes: ``leftImg8bit/{split}/{city}/*_leftImg8bit.png``, ``gtFine/{split}/{city}/
*_gtFine_labelIds.png`` (mapped to the 19 train ids, others 255) and ``disparity/{split}/{city}/
*_disparity.png`` (uint16 v; disparity = (v - 1) / 256 for v > 0, v = 0 invalid; as in MTMamba++,
pixels whose labelId is 10 get disparity 0, which is never scored).

A file that is missing, cannot be decoded, has another size than its image or holds out-of-range
values raises :class:`mtssm.data.io.DataFileError` naming the file; with ``on_error="skip"`` the
sample is returned as ``None`` (the loader's collate drops it), a warning names the file and
``dataset.skipped`` counts it (per process). Stricter than the official loaders, which resize
mis-sized targets, read NYUDv2 edges as ``v / 255`` of any value, and stop at a missing human-parts
file (mtssm ignores the parts of such an image).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from scipy import ndimage

from mtssm.data.constants import (
    CITYSCAPES_BASELINE,
    CITYSCAPES_FX,
    CITYSCAPES_LABEL_TO_TRAIN,
    CITYSCAPES_MAX_DEPTH,
    DEPTH_RANGE,
    IGNORE_INDEX,
    PASCAL_NORMALS_VALID_CLASSES,
    PASCAL_PERSON_CLASS,
    PASCAL_PERSON_PARTS,
    RENDER_MARKER,
)
from mtssm.data.io import (
    DataFileError,
    check_depth_range,
    check_size,
    read_image,
    read_label_png,
    read_lines,
    read_mat,
    read_npy,
)
from mtssm.metrics.boundary import thin
from mtssm.tasks import dataset_tasks

__all__ = [
    "DenseDataset",
    "NYUDv2",
    "PASCALContext",
    "Cityscapes",
    "decode_normals",
    "encode_normals",
    "unit_normals",
    "label_edges",
    "laplacian_edges",
    "ignore_empty_parts",
]

Sample = dict[str, Any]
Transform = Callable[[Sample, np.random.Generator], Sample]
NormalsRule = Literal["official", "unit"]
EdgeRule = Literal["official", "neighbour4"]
DepthTarget = Literal["disparity", "metres"]

# n = 2 v / 255 - 1 for every code v, in float32 exactly as the official loaders compute it.
_NORMAL_LUT = 2.0 * np.arange(256, dtype=np.float32) / 255.0 - 1.0
#: Flag channel of encoded normals (see the module docstring).
NORMAL_VALID, NORMAL_VALID_FLIPPED = 255, 254


def encode_normals(codes: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Stored uint8 (H, W, 3) codes (and an optional (H, W) bool validity) -> (H, W, 4) codes with
    the flag channel (255 valid, 0 invalid)."""
    out = np.empty(codes.shape[:2] + (4,), np.uint8)
    out[..., :3] = codes
    out[..., 3] = NORMAL_VALID if valid is None else np.where(valid, NORMAL_VALID, 0)
    return out


def decode_normals(codes: np.ndarray, channels_first: bool = False, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 codes -> float32 normals ``n = 2 v / 255 - 1``, the official decoding (no
    renormalisation). ``codes`` is (H, W, 3), every pixel valid, or (H, W, 4) with a flag channel
    (255 valid, 254 valid with x negated, else invalid, decoded as 0). Returns (H, W, 3), or
    (3, H, W) with ``channels_first``, in which case ``out`` (a C-contiguous float32 (3, H, W)
    array) may receive the result."""
    shape = (3,) + codes.shape[:2]
    if codes.ndim != 3 or codes.shape[2] not in (3, 4):
        raise ValueError(f"codes must be (H, W, 3) or (H, W, 4) uint8, got shape {codes.shape}")
    if out is None:
        n = np.empty(shape, np.float32)
    elif not channels_first or out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {shape} with channels_first")
    else:
        n = out
    for c in range(3):
        np.take(_NORMAL_LUT, codes[..., c], out=n[c])
    if codes.shape[2] == 4:
        flag = codes[..., 3]
        np.negative(n[0], out=n[0], where=flag == NORMAL_VALID_FLIPPED)
        np.copyto(n, np.float32(0.0), where=flag < NORMAL_VALID_FLIPPED)  # broadcast over channels
    return n if channels_first else np.ascontiguousarray(n.transpose(1, 2, 0))


def unit_normals(normals: np.ndarray) -> np.ndarray:
    """The stricter rule (``normals_rule="unit"``): (H, W, 3) normals renormalised to unit length,
    vectors shorter than 0.1 (codes near 128, 128, 128) and invalid ones made 0."""
    norm = np.linalg.norm(normals, axis=-1, keepdims=True)
    safe = np.where(norm < 0.1, np.inf, norm)
    return (normals / safe).astype(np.float32)


def label_edges(labels: np.ndarray) -> np.ndarray:
    """One-pixel-wide boundaries of a label map (H, W) -> uint8 {0, 1}: a pixel is an edge when a
    4-neighbour has a smaller label, so each discontinuity is marked on exactly one side
    (``edge_rule="neighbour4"``)."""
    edge = np.zeros(labels.shape, bool)
    edge[:, 1:] |= labels[:, 1:] > labels[:, :-1]
    edge[:, :-1] |= labels[:, :-1] > labels[:, 1:]
    edge[1:] |= labels[1:] > labels[:-1]
    edge[:-1] |= labels[:-1] > labels[1:]
    return edge.view(np.uint8)


_LAPLACIAN = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float64)


def laplacian_edges(labels: np.ndarray) -> np.ndarray:
    """The official PASCAL-Context edge rule (``edge_rule="official"``): uint8 {0, 1} (H, W) where
    the 4-neighbour Laplacian of the label map (OpenCV's ``Laplacian`` with ``ksize=1``, borders
    reflected without repeating the edge pixel) is non-zero, thinned to one-pixel curves (Guo and
    Hall's thinning, scikit-image's ``thin``)."""
    lap = ndimage.correlate(labels.astype(np.float64), _LAPLACIAN, mode="mirror")
    return thin(lap != 0).view(np.uint8)


def ignore_empty_parts(parts: np.ndarray) -> np.ndarray:
    """The official rule for human parts: a map holding no part (only background 0 and ignored
    255) is ignored as a whole (all 255). Returns ``parts`` itself when it holds a part."""
    if parts.size and np.any((parts != 0) & (parts != IGNORE_INDEX)):
        return parts
    return np.full(parts.shape, IGNORE_INDEX, np.uint8)


class DenseDataset(torch.utils.data.Dataset):
    """Shared logic: argument checks, split ids, error policy, transforms.

    Subclasses set ``name`` (a dataset of the task table :mod:`mtssm.tasks`) and implement ``_ids`` and the
    per-task readers ``_read_<task>(sample_id, size)``. ``normals_rule``, ``edge_rule`` and
    ``depth_target`` choose the departures described in the module docstring (each read only by
    the datasets it concerns); ``rendered`` says whether the root holds rendered scenes (it has
    :data:`~mtssm.data.constants.RENDER_MARKER`).
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
        normals_rule: NormalsRule = "official",
        edge_rule: EdgeRule = "official",
        depth_target: DepthTarget = "disparity",
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
        for what, value, allowed in (("normals_rule", normals_rule, ("official", "unit")),
                                     ("edge_rule", edge_rule, ("official", "neighbour4")),
                                     ("depth_target", depth_target, ("disparity", "metres"))):  # fmt: skip
            if value not in allowed:
                raise ValueError(f"{what} must be one of {allowed}, got {value!r}")
        self.normals_rule = normals_rule
        self.edge_rule = edge_rule
        self.depth_target = depth_target
        self.rendered = (self.root / RENDER_MARKER).is_file()
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
        return read_lines(path)

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


def _normals(path: Path, size: tuple[int, int], dataset: DenseDataset, valid: np.ndarray | None = None) -> np.ndarray:
    """Stored normals at ``path``, valid where ``valid`` (default everywhere), encoded or decoded
    as ``dataset`` asks (see the module docstring)."""
    png = read_label_png(path, channels=3)
    check_size(path, png, size)
    if dataset.normals_rule == "official" and dataset.encoded_normals:
        return encode_normals(png, valid)
    normals = decode_normals(png)
    if valid is not None:
        normals[~valid] = 0.0
    return unit_normals(normals) if dataset.normals_rule == "unit" else normals


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
        check_depth_range(path, depth, DEPTH_RANGE[self.name][1])
        return depth

    def _read_normals(self, sid: str, size: tuple[int, int]) -> np.ndarray:
        return _normals(self.root / "normals" / f"{sid}.png", size, self)

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
    """PASCAL-Context as in the ATRC/MTI-Net tarball (``PASCAL_MT``): ``JPEGImages/*.jpg``,
    ``semseg/VOC12/*.png`` (falling back to ``semseg/pascal-context/*.png``; 21 classes),
    ``human_parts/*.mat`` (PASCAL-Part ``anno`` structs), ``normals_distill/*.png`` (kept on the
    NYU-compatible ``LabelMap`` classes only), ``sal_distill/*.png`` (v / 255 > 0.5), edges from
    ``pascal-context/trainval/*.mat`` ``LabelMap`` (see :func:`laplacian_edges`),
    ``ImageSets/Context/{train,val}.txt``. Nothing is written into the dataset folder (the official
    loader caches the person presence in ``ImageSets/Parts``; mtssm reads it from the ``.mat``)."""

    name = "pascal"

    def _ids(self) -> list[str]:
        self._require_dir("JPEGImages")
        return self._split_file_ids(self.root / "ImageSets" / "Context" / f"{self.split}.txt")

    def image_path(self, sample_id: str) -> Path:
        return self.root / "JPEGImages" / f"{sample_id}.jpg"

    def _label_map(self, sid: str, size: tuple[int, int]) -> np.ndarray:
        """``LabelMap`` of ``sid`` (read once for its normals and its edges)."""
        cached = getattr(self, "_last_label_map", None)
        if cached is not None and cached[0] == sid:
            return cached[1]
        path = self.root / "pascal-context" / "trainval" / f"{sid}.mat"
        labels = read_mat(path, "LabelMap")
        if labels.ndim != 2:
            raise DataFileError(path, f"LabelMap must be 2-D, got shape {labels.shape}")
        check_size(path, labels, size)
        self._last_label_map = (sid, labels)
        return labels

    def _read_semseg(self, sid: str, size: tuple[int, int]) -> np.ndarray:
        path = self.root / "semseg" / "VOC12" / f"{sid}.png"
        if not path.is_file():
            fallback = self.root / "semseg" / "pascal-context" / f"{sid}.png"
            if fallback.is_file():
                path = fallback
        return _labels(path, size, 20, True)

    def _read_human_parts(self, sid: str, size: tuple[int, int]) -> np.ndarray:
        """The official decoding: an image has a person when some object of class 15 has a
        non-empty instance mask; then the parts of every person object with parts are painted on
        background 0 (later objects over earlier ones); a map with no part is ignored (255)."""
        path = self.root / "human_parts" / f"{sid}.mat"
        target = np.zeros(size, np.uint8)
        if not path.is_file():
            return ignore_empty_parts(target)
        anno = read_mat(path, "anno")
        try:
            objects = anno[0, 0]["objects"]
            objects = objects[0] if objects.size else []
            people = [obj for obj in objects
                      if int(np.asarray(obj["class_ind"]).reshape(-1)[0]) == PASCAL_PERSON_CLASS]  # fmt: skip
            if not any(np.asarray(obj["mask"]).any() for obj in people):  # "no person"
                return ignore_empty_parts(target)
            for obj in people:
                parts = obj["parts"]
                if parts.size == 0:
                    continue
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
        return ignore_empty_parts(target)

    def _read_sal(self, sid: str, size: tuple[int, int]) -> np.ndarray:
        path = self.root / "sal_distill" / f"{sid}.png"
        arr = read_label_png(path)
        check_size(path, arr, size)
        return (arr.astype(np.float32) / 255.0 > 0.5).astype(np.uint8)

    def _read_normals(self, sid: str, size: tuple[int, int]) -> np.ndarray:
        valid = np.isin(self._label_map(sid, size), PASCAL_NORMALS_VALID_CLASSES)
        return _normals(self.root / "normals_distill" / f"{sid}.png", size, self, valid)

    def _read_edge(self, sid: str, size: tuple[int, int]) -> np.ndarray:
        labels = self._label_map(sid, size)
        if self.edge_rule == "neighbour4":
            return label_edges(labels.astype(np.int64))
        return laplacian_edges(labels)


class Cityscapes(DenseDataset):
    """Cityscapes in its standard layout, decoded as MTMamba++ does (see the module docstring)."""

    name = "cityscapes"
    splits = ("train", "val", "test")

    def _ids(self) -> list[str]:
        folder = self._require_dir(f"leftImg8bit/{self.split}")
        suffix = "_leftImg8bit.png"
        return sorted(f"{p.parent.name}/{p.name[: -len(suffix)]}" for p in folder.glob(f"*/*{suffix}"))

    def _path(self, kind: str, sid: str, suffix: str) -> Path:
        city, stem = sid.split("/", 1)
        return self.root / kind / self.split / city / f"{stem}_{suffix}"

    def image_path(self, sample_id: str) -> Path:
        return self._path("leftImg8bit", sample_id, "leftImg8bit.png")

    def _label_ids(self, sid: str, size: tuple[int, int]) -> np.ndarray:
        path = self._path("gtFine", sid, "gtFine_labelIds.png")
        arr = read_label_png(path)
        check_size(path, arr, size)
        if arr.max() > 33:
            raise DataFileError(path, f"labelId {int(arr.max())} out of range (expected 0..33)")
        return arr

    def _read_semseg(self, sid: str, size: tuple[int, int]) -> np.ndarray:
        lut = np.full(256, IGNORE_INDEX, np.uint8)
        for label_id, train_id in CITYSCAPES_LABEL_TO_TRAIN.items():
            lut[label_id] = train_id
        return lut[self._label_ids(sid, size)]

    def _read_depth(self, sid: str, size: tuple[int, int]) -> np.ndarray:
        path = self._path("disparity", sid, "disparity.png")
        arr = read_label_png(path)
        check_size(path, arr, size)
        raw = arr.astype(np.float32)
        disparity = np.where(raw > 0, (raw - 1.0) / 256.0, 0.0).astype(np.float32)
        if self.depth_target == "disparity":
            # MTMamba++ gives labelId 10 disparity 0 (as invalid pixels, never scored): 0 here.
            disparity[self._label_ids(sid, size) == 10] = 0.0
            return disparity
        baseline, fx = CITYSCAPES_BASELINE, CITYSCAPES_FX
        cam = self._path("camera", sid, "camera.json")
        if cam.is_file():
            try:
                info = json.loads(cam.read_text())
                baseline, fx = float(info["extrinsic"]["baseline"]), float(info["intrinsic"]["fx"])
            except (ValueError, KeyError, TypeError) as exc:
                raise DataFileError(cam, f"expected extrinsic.baseline and intrinsic.fx ({exc})") from None
        with np.errstate(divide="ignore"):
            depth = np.where(disparity > 0, baseline * fx / disparity, 0.0)
        depth[(depth <= 0) | (depth >= CITYSCAPES_MAX_DEPTH)] = 0.0
        return depth.astype(np.float32)

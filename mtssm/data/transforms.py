"""Augmentations that keep every task consistent with the image.

A transform is ``transform(sample, rng) -> sample`` on the raw numpy samples of
:mod:`mtssm.data.datasets` (``rng`` a :class:`numpy.random.Generator`); :class:`ToTensor` ends a
pipeline with torch tensors. Per key: the image is resampled bilinearly; every label (``semseg``,
``human_parts``, ``sal``, ``edge``), ``depth`` and ``normals`` with nearest neighbours; padding
uses :data:`mtssm.data.constants.PAD_VALUES` (labels 255, depth 0, normals 0); scaling by ``s``
divides depth by ``s`` (the scene looks ``s`` times closer); a horizontal flip negates the x
component of normals. Normals may also travel as their stored uint8 codes (n = 2 v / 255 - 1, see
``DenseDataset.encoded_normals``): then padding uses the invalid code 128, a flip maps v to 255 - v,
and :class:`ToTensor` decodes them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from mtssm.data.constants import IMAGENET_MEAN, IMAGENET_STD, PAD_VALUES
from mtssm.data.datasets import decode_normals

__all__ = [
    "Compose",
    "RandomScale",
    "RandomCrop",
    "RandomScaleCrop",
    "RandomHorizontalFlip",
    "PhotometricDistortion",
    "PadTo",
    "ToTensor",
    "train_transforms",
    "eval_transforms",
]

Sample = dict[str, Any]
_DENSE = ("semseg", "human_parts", "sal", "edge", "depth", "normals")


_ENCODED_NORMAL_PAD = 128  # decodes to a vector of norm < 0.1, i.e. invalid


def _dense_keys(sample: Sample) -> list[str]:
    return [k for k in _DENSE if k in sample]


def _pad_value(key: str, arr: np.ndarray) -> float:
    if key == "normals" and arr.dtype == np.uint8:
        return _ENCODED_NORMAL_PAD
    return PAD_VALUES[key]


def _pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"{name} must be a positive int or (H, W), got {size!r}")
    return int(size[0]), int(size[1])


def _nearest_index(n_out: int, n_in: int, n_scaled: int, offset: int = 0) -> np.ndarray:
    """Source index of output pixels ``offset .. offset + n_out - 1`` of an axis resized from
    ``n_in`` to ``n_scaled`` (pixel-centre nearest neighbour)."""
    pos = (np.arange(offset, offset + n_out) + 0.5) * (n_in / n_scaled)
    return np.minimum(pos.astype(np.int64), n_in - 1)


def _resample(sample: Sample, scaled: tuple[int, int], box: tuple[int, int, int, int],
              out_size: tuple[int, int]) -> Sample:  # fmt: skip
    """Resize the sample to ``scaled`` (H, W), keep the window ``box`` = (y0, x0, h, w) of it
    (which lies inside the scaled image) and pad the result to ``out_size`` with the pad values.
    Only the window is computed."""
    h_in, w_in = sample["image"].shape[:2]
    hs, ws = scaled
    y0, x0, vh, vw = box
    oh, ow = out_size
    out = dict(sample)
    fy, fx = h_in / hs, w_in / ws
    img = Image.fromarray(np.ascontiguousarray(sample["image"])).resize(
        (vw, vh), Image.BILINEAR, box=(x0 * fx, y0 * fy, (x0 + vw) * fx, (y0 + vh) * fy)
    )
    image = np.zeros((oh, ow, 3), np.uint8)
    image[:vh, :vw] = np.asarray(img)
    out["image"] = image
    iy = _nearest_index(vh, h_in, hs, y0)
    ix = _nearest_index(vw, w_in, ws, x0)
    scale = hs / h_in
    for key in _dense_keys(sample):
        src = sample[key]
        arr = np.full((oh, ow) + src.shape[2:], _pad_value(key, src), src.dtype)
        arr[:vh, :vw] = src.take(iy, axis=0).take(ix, axis=1)
        if key == "depth" and scale != 1.0:
            arr /= np.float32(scale)
        out[key] = arr
    return out


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Any]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        for t in self.transforms:
            sample = t(sample, rng)
        return sample

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


class RandomScale:
    """Resize by a factor drawn uniformly from ``scale_range`` (size rounded to whole pixels)."""

    def __init__(self, scale_range: tuple[float, float] = (0.5, 2.0)) -> None:
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must satisfy 0 < lo <= hi, got {scale_range!r}")
        self.scale_range = scale_range

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        s = rng.uniform(*self.scale_range)
        h, w = sample["image"].shape[:2]
        hs, ws = max(round(h * s), 1), max(round(w * s), 1)
        return _resample(sample, (hs, ws), (0, 0, hs, ws), (hs, ws))


class RandomCrop:
    """Crop a random ``size`` window; sides shorter than ``size`` are padded at the bottom/right
    with the pad values (image 0, labels 255, depth and normals 0)."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _pair(size, "size")

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        h, w = sample["image"].shape[:2]
        ch, cw = self.size
        y0 = int(rng.integers(0, max(h - ch, 0) + 1))
        x0 = int(rng.integers(0, max(w - cw, 0) + 1))
        return _resample(sample, (h, w), (y0, x0, min(ch, h - y0), min(cw, w - x0)), self.size)


class RandomScaleCrop:
    """:class:`RandomScale` then :class:`RandomCrop` in one pass that resamples only the cropped
    window: the same random draws give exactly the same labels, depth and normals, and the same
    image up to rounding (the bilinear filter is evaluated at the same source positions)."""

    def __init__(self, size: int | Sequence[int], scale_range: tuple[float, float] = (0.5, 2.0)) -> None:
        self.scale = RandomScale(scale_range)
        self.size = _pair(size, "size")

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        s = rng.uniform(*self.scale.scale_range)
        h, w = sample["image"].shape[:2]
        hs, ws = max(round(h * s), 1), max(round(w * s), 1)
        ch, cw = self.size
        y0 = int(rng.integers(0, max(hs - ch, 0) + 1))
        x0 = int(rng.integers(0, max(ws - cw, 0) + 1))
        return _resample(sample, (hs, ws), (y0, x0, min(ch, hs - y0), min(cw, ws - x0)), self.size)


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p``; normals' x component changes sign."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if rng.random() >= self.p:
            return sample
        # Views with negative strides: later steps copy what they must anyway.
        out = dict(sample)
        out["image"] = sample["image"][:, ::-1]
        for key in _dense_keys(sample):
            out[key] = sample[key][:, ::-1]
        if "normals" in out:
            out["normals"] = out["normals"].copy()
            nx = out["normals"][..., 0]
            if nx.dtype == np.uint8:
                np.subtract(255, nx, out=nx)
            else:
                nx *= -1.0
        return out


def _saturation_hue_matrix(saturation: float, hue_degrees: float) -> tuple[float, ...]:
    """RGB -> RGB 3x4 matrix (PIL ``convert`` layout) that scales saturation around the luma axis
    and rotates hue by ``hue_degrees`` (the SVG ``feColorMatrix`` saturate and hueRotate)."""
    lum = np.array([0.213, 0.715, 0.072])
    s = saturation
    sat = np.outer(np.ones(3), lum) * (1 - s) + np.eye(3) * s
    c, d = math.cos(math.radians(hue_degrees)), math.sin(math.radians(hue_degrees))
    hue = (
        np.outer(np.ones(3), lum)
        + c * np.array([[0.787, -0.715, -0.072], [-0.213, 0.285, -0.072], [-0.213, -0.715, 0.928]])
        + d * np.array([[-0.213, -0.715, 0.928], [0.143, 0.140, -0.283], [-0.787, 0.715, 0.072]])
    )
    m = hue @ sat
    return tuple(float(v) for row in m for v in (*row, 0.0))


class PhotometricDistortion:
    """Image-only colour jitter with mmseg's ranges and order, each step with probability 0.5:
    brightness +-``brightness`` levels, contrast x``contrast``, saturation x``saturation``, hue
    +-``hue`` (OpenCV units of 2 degrees); contrast goes before or after the colour steps at random.
    Brightness and contrast are uint8 lookup tables; saturation (scaling around the luma axis) and
    hue (rotation about the grey axis) are one 3x3 colour matrix, a fast stand-in for mmseg's HSV
    round trip."""

    def __init__(self, brightness: float = 32, contrast: tuple[float, float] = (0.5, 1.5),
                 saturation: tuple[float, float] = (0.5, 1.5), hue: float = 18) -> None:  # fmt: skip
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        levels = np.arange(256, dtype=np.float32)
        if rng.random() < 0.5:
            levels = np.clip(levels + rng.uniform(-self.brightness, self.brightness), 0, 255)
        contrast_first = rng.random() < 0.5
        alpha = rng.uniform(*self.contrast) if rng.random() < 0.5 else None
        if contrast_first and alpha is not None:
            levels = np.clip(levels * alpha, 0, 255)
        sat = rng.uniform(*self.saturation) if rng.random() < 0.5 else 1.0
        hue = rng.uniform(-self.hue, self.hue) if rng.random() < 0.5 else 0.0
        img = Image.fromarray(np.ascontiguousarray(sample["image"]))
        img = img.point(np.rint(levels).astype(np.uint8).tolist() * 3)
        if sat != 1.0 or hue != 0.0:
            img = img.convert("RGB", _saturation_hue_matrix(sat, 2.0 * hue))
        if not contrast_first and alpha is not None:
            img = img.point(np.rint(np.clip(np.arange(256) * alpha, 0, 255)).astype(np.uint8).tolist() * 3)
        out = dict(sample)
        out["image"] = np.asarray(img)
        return out


class PadTo:
    """Pad at the bottom/right to at least ``size`` with the pad values; never resizes."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _pair(size, "size")

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        h, w = sample["image"].shape[:2]
        oh, ow = max(h, self.size[0]), max(w, self.size[1])
        if (oh, ow) == (h, w):
            return sample
        return _resample(sample, (h, w), (0, 0, h, w), (oh, ow))


class ToTensor:
    """numpy sample -> tensors: ``image`` float32 (3, H, W) ImageNet-normalised; ``semseg``,
    ``human_parts``, ``sal`` int64 (H, W); ``depth``, ``edge`` float32 (1, H, W); ``normals``
    float32 (3, H, W); ``meta`` unchanged."""

    # Per-channel lookup tables: uint8 level -> normalised float32.
    _luts = [
        ((np.arange(256, dtype=np.float32) / 255.0 - m) / s).astype(np.float32)
        for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)
    ]

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        out: Sample = {}
        img = sample["image"]
        image = np.empty((3,) + img.shape[:2], np.float32)
        for c in range(3):
            np.take(self._luts[c], img[..., c], out=image[c])
        out["image"] = torch.from_numpy(image)
        for key in ("semseg", "human_parts", "sal"):
            if key in sample:
                out[key] = torch.from_numpy(np.ascontiguousarray(sample[key], np.int64))
        for key in ("depth", "edge"):
            if key in sample:
                out[key] = torch.from_numpy(np.ascontiguousarray(sample[key], np.float32)[None])
        if "normals" in sample:
            n = sample["normals"]
            if n.dtype == np.uint8:
                n = decode_normals(n, channels_first=True)
            else:
                n = np.ascontiguousarray(n.transpose(2, 0, 1), np.float32)
            out["normals"] = torch.from_numpy(n)
        out["meta"] = sample["meta"]
        return out


def train_transforms(crop_size: int | Sequence[int], scale_range: tuple[float, float] = (0.5, 2.0)) -> Compose:
    """Random scale + crop to ``crop_size``, flip p=0.5, photometric distortion, to tensors."""
    return Compose([RandomScaleCrop(crop_size, scale_range), RandomHorizontalFlip(0.5),
                    PhotometricDistortion(), ToTensor()])  # fmt: skip


def eval_transforms(pad_size: int | Sequence[int] | None = None) -> Compose:
    """No resizing: optional padding to ``pad_size`` (batches are padded to a common size by the
    loader's collate anyway), then tensors."""
    return Compose(([PadTo(pad_size)] if pad_size is not None else []) + [ToTensor()])

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
import warnings
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
    "normalize_image",
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


def _negate_normals_x(normals: np.ndarray) -> None:
    """Negate the x component of ``normals`` (H, W, 3) in place: -x for float vectors, 255 - v
    for uint8 codes."""
    nx = normals[..., 0]
    if nx.dtype == np.uint8:
        np.subtract(255, nx, out=nx)
    else:
        nx *= -1.0


def _resample(sample: Sample, scaled: tuple[int, int], box: tuple[int, int, int, int],
              out_size: tuple[int, int], flip: bool = False) -> Sample:  # fmt: skip
    """Resize the sample to ``scaled`` (H, W), keep the window ``box`` = (y0, x0, h, w) of it
    (which lies inside the scaled image) and pad the result to ``out_size`` with the pad values.
    Only the window is computed. ``flip`` then mirrors the result left-right (what
    :class:`RandomHorizontalFlip` does, so the padding ends up on the left), in the same pass."""
    h_in, w_in = sample["image"].shape[:2]
    hs, ws = scaled
    y0, x0, vh, vw = box
    oh, ow = out_size
    out = dict(sample)
    fy, fx = h_in / hs, w_in / ws
    img = Image.fromarray(np.ascontiguousarray(sample["image"])).resize(
        (vw, vh), Image.BILINEAR, box=(x0 * fx, y0 * fy, (x0 + vw) * fx, (y0 + vh) * fy)
    )
    cols = slice(ow - vw, ow) if flip else slice(0, vw)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if (vh, vw) == (oh, ow):
        image = np.asarray(img)  # no padding: the resized window is the output (read-only)
    else:
        image = np.zeros((oh, ow, 3), np.uint8)
        image[:vh, cols] = np.asarray(img)
    out["image"] = image
    iy = _nearest_index(vh, h_in, hs, y0)
    ix = _nearest_index(vw, w_in, ws, x0)
    if flip:
        ix = ix[::-1]
    scale = hs / h_in
    for key in _dense_keys(sample):
        src = sample[key]
        if (vh, vw) == (oh, ow):
            arr = src.take(iy, axis=0).take(ix, axis=1)
        else:
            arr = np.full((oh, ow) + src.shape[2:], _pad_value(key, src), src.dtype)
            arr[:vh, cols] = src.take(iy, axis=0).take(ix, axis=1)
        if key == "depth" and scale != 1.0:
            arr /= np.float32(scale)
        if key == "normals" and flip:
            _negate_normals_x(arr)
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
    """:class:`RandomScale` then :class:`RandomCrop`, then (with ``flip_p`` > 0)
    ``RandomHorizontalFlip(flip_p)``, in one pass that resamples only the cropped window: the same
    random draws give exactly the same labels, depth and normals as the separate transforms, and
    the same image up to rounding (the bilinear filter is evaluated at the same source
    positions)."""

    def __init__(self, size: int | Sequence[int], scale_range: tuple[float, float] = (0.5, 2.0),
                 flip_p: float = 0.0) -> None:  # fmt: skip
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p must be a probability in [0, 1], got {flip_p!r}")
        self.scale = RandomScale(scale_range)
        self.size = _pair(size, "size")
        self.flip_p = flip_p

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        s = rng.uniform(*self.scale.scale_range)
        h, w = sample["image"].shape[:2]
        hs, ws = max(round(h * s), 1), max(round(w * s), 1)
        ch, cw = self.size
        y0 = int(rng.integers(0, max(hs - ch, 0) + 1))
        x0 = int(rng.integers(0, max(ws - cw, 0) + 1))
        flip = self.flip_p > 0 and rng.random() < self.flip_p  # RandomHorizontalFlip's draw
        box = (y0, x0, min(ch, hs - y0), min(cw, ws - x0))
        return _resample(sample, (hs, ws), box, self.size, flip)

    def __repr__(self) -> str:
        return f"RandomScaleCrop(size={self.size}, scale_range={self.scale.scale_range}, flip_p={self.flip_p})"


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
            _negate_normals_x(out["normals"])
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
        identity = True  # skip the lookup when neither brightness nor a first contrast applies
        if rng.random() < 0.5:
            levels = np.clip(levels + rng.uniform(-self.brightness, self.brightness), 0, 255)
            identity = False
        contrast_first = rng.random() < 0.5
        alpha = rng.uniform(*self.contrast) if rng.random() < 0.5 else None
        if contrast_first and alpha is not None:
            levels = np.clip(levels * alpha, 0, 255)
            identity = False
        sat = rng.uniform(*self.saturation) if rng.random() < 0.5 else 1.0
        hue = rng.uniform(-self.hue, self.hue) if rng.random() < 0.5 else 0.0
        img = Image.fromarray(np.ascontiguousarray(sample["image"]))
        if not identity:
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


Stats = tuple[Sequence[float], Sequence[float]]  # (mean, std) per RGB channel, images in [0, 1]


def normalize_image(
    image: torch.Tensor,
    out: torch.Tensor | None = None,
    normalization: Stats | None = None,
) -> torch.Tensor:
    """uint8 RGB levels ``(..., 3, H, W)`` (CPU) -> float32 ``(..., 3, H, W)`` normalised with
    ``normalization = (mean, std)`` (the model's, :attr:`mtssm.nn.MultiTaskModel.input_normalization`;
    None: the ImageNet statistics), ``(v / 255 - mean) / std`` computed in float32 as ``v * a + b``;
    written into ``out`` (a contiguous CPU float32 tensor of the same shape) when given.

    Runs in numpy, on one thread: called once per batch in the loader's main process, where
    torch's intra-op threads would only add overhead on a machine busy with the training step."""
    if image.dtype != torch.uint8:
        raise TypeError(f"image must be a uint8 tensor of levels, got {image.dtype}")
    if image.dim() < 3 or image.shape[-3] != 3:
        raise ValueError(f"image must have shape (..., 3, H, W), got {tuple(image.shape)}")
    mean, std = normalization if normalization is not None else (IMAGENET_MEAN, IMAGENET_STD)
    scale = np.array([1.0 / (255.0 * s) for s in std], np.float32).reshape(3, 1, 1)
    shift = np.array([-m / s for m, s in zip(mean, std)], np.float32).reshape(3, 1, 1)
    if out is None:
        out = torch.empty(image.shape, dtype=torch.float32)
    elif out.dtype != torch.float32 or out.shape != image.shape or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor of shape {tuple(image.shape)}")
    dst = out.numpy()
    np.multiply(image.numpy(), scale, out=dst, dtype=np.float32)
    dst += shift
    return out


def _tensor(arr: np.ndarray) -> torch.Tensor:
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:  # e.g. np.asarray(PIL image); the tensor is only read (and copied)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(arr)
    return torch.from_numpy(arr)


class ToTensor:
    """numpy sample -> tensors: ``image`` float32 (3, H, W) normalised with ``normalization``
    (``(mean, std)``; None: ImageNet's; see :func:`normalize_image`); ``semseg``, ``human_parts``, ``sal`` int64 (H, W); ``depth``, ``edge``
    float32 (1, H, W); ``normals`` float32 (3, H, W); ``meta`` unchanged.

    ``compact=True`` keeps the small dtypes for a cheap trip between processes (what
    :func:`mtssm.data.make_dataloader` uses; :func:`mtssm.data.loader.finalize_batch` turns a batch
    of them into the tensors above): ``image`` uint8 (3, H, W) levels; ``semseg``, ``human_parts``,
    ``sal`` uint8 (H, W); ``edge`` uint8 (1, H, W); ``depth`` float32 (1, H, W); ``normals`` uint8
    (3, H, W) codes if they travel encoded (see ``DenseDataset.encoded_normals``), else float32.
    Compact tensors may be non-contiguous views."""

    def __init__(self, compact: bool = False, normalization: Stats | None = None) -> None:
        self.compact = compact
        self.normalization = normalization

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        out: Sample = {}
        image = _tensor(sample["image"]).permute(2, 0, 1)
        out["image"] = image if self.compact else normalize_image(image, normalization=self.normalization)
        for key in ("semseg", "human_parts", "sal"):
            if key in sample:
                t = _tensor(sample[key])
                out[key] = t if self.compact else t.long()
        if "depth" in sample:
            out["depth"] = _tensor(sample["depth"].astype(np.float32, copy=False))[None]
        if "edge" in sample:
            t = _tensor(sample["edge"])[None]
            out["edge"] = t if self.compact else t.float()
        if "normals" in sample:
            n = sample["normals"]
            if n.dtype == np.uint8:
                out["normals"] = _tensor(n).permute(2, 0, 1) if self.compact else torch.from_numpy(
                    decode_normals(n, channels_first=True))
            else:
                out["normals"] = _tensor(n.transpose(2, 0, 1).astype(np.float32, copy=False))
        out["meta"] = sample["meta"]
        return out

    def __repr__(self) -> str:
        return f"ToTensor(compact={self.compact})"


def train_transforms(crop_size: int | Sequence[int], scale_range: tuple[float, float] = (0.5, 2.0),
                     normalization: Stats | None = None) -> Compose:
    """Random scale + crop to ``crop_size`` and flip p=0.5 (fused in one :class:`RandomScaleCrop`
    pass; the same draws as ``RandomScaleCrop`` then ``RandomHorizontalFlip(0.5)``), photometric
    distortion, to tensors normalised with ``normalization`` (None: ImageNet's)."""
    return Compose([RandomScaleCrop(crop_size, scale_range, flip_p=0.5), PhotometricDistortion(),
                    ToTensor(normalization=normalization)])


def eval_transforms(pad_size: int | Sequence[int] | None = None, normalization: Stats | None = None) -> Compose:
    """No resizing: optional padding to ``pad_size`` (batches are padded to a common size by the
    loader's collate anyway), then tensors normalised with ``normalization`` (None: ImageNet's)."""
    return Compose(([PadTo(pad_size)] if pad_size is not None else []) + [ToTensor(normalization=normalization)])

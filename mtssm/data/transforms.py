"""Augmentations that keep every task consistent with the image.

A transform is ``transform(sample, rng) -> sample`` on the raw numpy samples of
:mod:`mtssm.data.datasets` (``rng`` a :class:`numpy.random.Generator`); :class:`ToTensor` ends a
pipeline with torch tensors. Per key: the image is resampled bilinearly; every label (``semseg``,
``human_parts``, ``sal``, ``edge``), ``depth`` and ``normals`` with nearest neighbours; padding
uses :data:`mtssm.data.constants.PAD_VALUES` (labels 255, depth 0, normals 0); scaling by ``s``
divides depth by ``s`` (the scene looks ``s`` times closer); a horizontal flip negates the x
component of normals. Normals may also travel as their stored uint8 codes with a flag channel
(n = 2 v / 255 - 1, see ``DenseDataset.encoded_normals``): then padding uses the invalid code 128, a
flip toggles the flag between valid (255) and valid-with-x-negated (254), and :class:`ToTensor`
decodes them, to exactly the values of decoding first.

These are the official transforms (ATRC's, used by InvPT / MTMamba / PAMM): ``RandomScaling``
(0.5-2, labels, depth and normals nearest, depth divided by the scale), ``RandomCrop``,
``RandomHorizontalFlip``, ``PhotoMetricDistortion``, ``PadImage``, ``AddIgnoreRegions`` (here
:class:`IgnoreEmptyParts`; zero depth and zero normals are already mtssm's invalid values). Where
mtssm differs, only the image's resampling and the random draws do: see :class:`RandomScaleCrop`
and :class:`PhotometricDistortion`. Cityscapes (MTMamba++) is not augmented: :class:`ResizeImage`
resizes the image only, the labels stay at their stored size.
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
from mtssm.data.datasets import NORMAL_VALID_FLIPPED, decode_normals, ignore_empty_parts

__all__ = [
    "Compose",
    "RandomScale",
    "RandomCrop",
    "RandomScaleCrop",
    "RandomHorizontalFlip",
    "PhotometricDistortion",
    "PadTo",
    "IgnoreEmptyParts",
    "ResizeImage",
    "ToTensor",
    "normalize_image",
    "train_transforms",
    "eval_transforms",
    "resize_transforms",
]

Sample = dict[str, Any]
_DENSE = ("semseg", "human_parts", "sal", "edge", "depth", "normals")


_ENCODED_NORMAL_PAD = 128  # a flag that is neither valid (255) nor valid-flipped (254)


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
    ``n_in`` to ``n_scaled`` with OpenCV's ``INTER_NEAREST`` (what the official ``RandomScaling``
    uses): ``min(floor(x * scale), n_in - 1)`` with ``scale = 1 / (n_scaled / n_in)`` in float64."""
    scale = 1.0 / (n_scaled / n_in)
    pos = np.floor(np.arange(offset, offset + n_out, dtype=np.float64) * scale).astype(np.int64)
    return np.minimum(pos, n_in - 1)


def _negate_normals_x(normals: np.ndarray) -> None:
    """Negate the x component of ``normals`` in place: -x for float (H, W, 3) vectors; for uint8
    (H, W, 4) codes the flag of valid pixels toggles between 255 and 254 (x negated)."""
    if normals.dtype == np.uint8:
        flag = normals[..., 3]
        np.bitwise_xor(flag, np.uint8(1), out=flag, where=flag >= NORMAL_VALID_FLIPPED)
    else:
        normals[..., 0] *= -1.0


def _scaled_size(h: int, w: int, s: float) -> tuple[int, int]:
    """The official ``RandomScaling`` size: ``int(side * s)`` (truncated), at least 1."""
    return max(int(h * s), 1), max(int(w * s), 1)


def _resample(sample: Sample, scaled: tuple[int, int], box: tuple[int, int, int, int],
              out_size: tuple[int, int], flip: bool = False, depth_scale: float = 1.0) -> Sample:  # fmt: skip
    """Resize the sample to ``scaled`` (H, W), keep the window ``box`` = (y0, x0, h, w) of it
    (which lies inside the scaled image), mirror it left-right if ``flip``, and pad it to
    ``out_size`` with the pad values, centred as the official ``PadImage`` does (``delta // 2``
    above and to the left). Only the window is computed. Depth is divided by ``depth_scale`` (the
    drawn scale factor)."""
    h_in, w_in = sample["image"].shape[:2]
    hs, ws = scaled
    y0, x0, vh, vw = box
    oh, ow = out_size
    top, left = (oh - vh) // 2, (ow - vw) // 2
    out = dict(sample)
    fy, fx = h_in / hs, w_in / ws
    img = Image.fromarray(np.ascontiguousarray(sample["image"])).resize(
        (vw, vh), Image.BILINEAR, box=(x0 * fx, y0 * fy, (x0 + vw) * fx, (y0 + vh) * fy)
    )
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    rows, cols = slice(top, top + vh), slice(left, left + vw)
    if (vh, vw) == (oh, ow):
        image = np.asarray(img)  # no padding: the resized window is the output (read-only)
    else:
        image = np.zeros((oh, ow, 3), np.uint8)
        image[rows, cols] = np.asarray(img)
    out["image"] = image
    iy = _nearest_index(vh, h_in, hs, y0)
    ix = _nearest_index(vw, w_in, ws, x0)
    if flip:
        ix = ix[::-1]
    for key in _dense_keys(sample):
        src = sample[key]
        if (vh, vw) == (oh, ow):
            arr = src.take(iy, axis=0).take(ix, axis=1)
        else:
            arr = np.full((oh, ow) + src.shape[2:], _pad_value(key, src), src.dtype)
            arr[rows, cols] = src.take(iy, axis=0).take(ix, axis=1)
        if key == "depth" and depth_scale != 1.0:
            arr /= np.float32(depth_scale)
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

    def with_compact_output(self) -> Compose | None:
        """These transforms with the final :class:`ToTensor` compact (the same draws, small
        dtypes), or None when they do not end with a plain ``ToTensor``."""
        if not self.transforms or type(self.transforms[-1]) is not ToTensor:  # a subclass may convert differently
            return None
        return Compose([*self.transforms[:-1], ToTensor(compact=True, normalization=self.transforms[-1].normalization)])

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


class RandomScale:
    """Resize by a factor ``s`` drawn uniformly from ``scale_range`` to ``int(side * s)`` pixels
    (the official ``RandomScaling``); depth is divided by ``s``."""

    def __init__(self, scale_range: tuple[float, float] = (0.5, 2.0)) -> None:
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must satisfy 0 < lo <= hi, got {scale_range!r}")
        self.scale_range = scale_range

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        s = float(rng.uniform(*self.scale_range))
        hs, ws = _scaled_size(*sample["image"].shape[:2], s)
        return _resample(sample, (hs, ws), (0, 0, hs, ws), (hs, ws), depth_scale=s)


def _crop_box(sample: Sample, scaled: tuple[int, int], size: tuple[int, int], cat_max_ratio: float,
              rng: np.random.Generator) -> tuple[int, int, int, int]:  # fmt: skip
    """The official ``RandomCrop`` window (y0, x0, h, w) of the sample resized to ``scaled``: a
    uniform offset in [0, max(side - crop, 0)], clipped at the image's end; with ``cat_max_ratio``
    < 1, redrawn (up to 10 times, the 11th draw is kept) while one class covers at least that
    fraction of the window's non-ignored ``semseg`` pixels or fewer than two classes are present."""
    hs, ws = scaled
    ch, cw = size

    def draw() -> tuple[int, int, int, int]:
        y0 = int(rng.integers(0, max(hs - ch, 0) + 1))
        x0 = int(rng.integers(0, max(ws - cw, 0) + 1))
        return y0, x0, min(ch, hs - y0), min(cw, ws - x0)

    box = draw()
    if cat_max_ratio < 1.0 and "semseg" in sample:
        h_in, w_in = sample["semseg"].shape[:2]
        for _ in range(10):
            y0, x0, vh, vw = box
            window = sample["semseg"].take(_nearest_index(vh, h_in, hs, y0), axis=0).take(
                _nearest_index(vw, w_in, ws, x0), axis=1)
            counts = np.bincount(window.reshape(-1), minlength=256)[:255]
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = draw()
    return box


class RandomCrop:
    """Crop a random ``size`` window (sides shorter than ``size`` stay shorter: :class:`PadTo`
    pads them), as the official ``RandomCrop`` with ``cat_max_ratio`` (0.75 in the official
    training pipeline; 1 disables the redraws)."""

    def __init__(self, size: int | Sequence[int], cat_max_ratio: float = 0.75) -> None:
        self.size = _pair(size, "size")
        self.cat_max_ratio = cat_max_ratio

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        h, w = sample["image"].shape[:2]
        box = _crop_box(sample, (h, w), self.size, self.cat_max_ratio, rng)
        return _resample(sample, (h, w), box, box[2:])


class RandomScaleCrop:
    """:class:`RandomScale`, :class:`RandomCrop`, then (with ``flip_p`` > 0)
    ``RandomHorizontalFlip(flip_p)`` and ``PadTo(size)``, in one pass that resamples only the
    cropped window: the same random draws give exactly the same labels, depth and normals as the
    separate transforms, and the same image up to rounding (the bilinear filter is evaluated at the
    same source positions)."""

    def __init__(self, size: int | Sequence[int], scale_range: tuple[float, float] = (0.5, 2.0),
                 flip_p: float = 0.0, cat_max_ratio: float = 0.75) -> None:  # fmt: skip
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p must be a probability in [0, 1], got {flip_p!r}")
        self.scale = RandomScale(scale_range)
        self.size = _pair(size, "size")
        self.flip_p = flip_p
        self.cat_max_ratio = cat_max_ratio

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        s = float(rng.uniform(*self.scale.scale_range))
        hs, ws = _scaled_size(*sample["image"].shape[:2], s)
        box = _crop_box(sample, (hs, ws), self.size, self.cat_max_ratio, rng)
        flip = self.flip_p > 0 and rng.random() < self.flip_p  # RandomHorizontalFlip's draw
        out_size = (max(self.size[0], box[2]), max(self.size[1], box[3]))
        return _resample(sample, (hs, ws), box, out_size, flip, depth_scale=s)

    def __repr__(self) -> str:
        return (f"RandomScaleCrop(size={self.size}, scale_range={self.scale.scale_range}, "
                f"flip_p={self.flip_p}, cat_max_ratio={self.cat_max_ratio})")  # fmt: skip


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
    """Pad to at least ``size`` with the pad values, centred as the official ``PadImage`` does
    (``delta // 2`` above and to the left); never resizes. ``meta["offset"]`` records where the
    original pixels start, (top, left), so evaluation can crop back to them."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _pair(size, "size")

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        h, w = sample["image"].shape[:2]
        oh, ow = max(h, self.size[0]), max(w, self.size[1])
        if (oh, ow) == (h, w):
            return sample
        out = _resample(sample, (h, w), (0, 0, h, w), (oh, ow))
        if "meta" in sample:
            out["meta"] = {**sample["meta"], "offset": ((oh - h) // 2, (ow - w) // 2)}
        return out


class IgnoreEmptyParts:
    """The official ``AddIgnoreRegions`` rule for ``human_parts``: a map with no part left (only
    background and ignored pixels, e.g. a crop beside the person) becomes all ignored (255), so the
    crop does not train every pixel as background."""

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        if "human_parts" not in sample:
            return sample
        out = dict(sample)
        out["human_parts"] = ignore_empty_parts(sample["human_parts"])
        return out

    def __repr__(self) -> str:
        return "IgnoreEmptyParts()"


class ResizeImage:
    """Resize the image alone to ``size`` (H, W), bilinearly (PIL, as MTMamba++'s Cityscapes
    loader does); the labels keep their stored size, so the loss and the metrics compare outputs
    resized to the labels' size."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _pair(size, "size")

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        out = dict(sample)
        h, w = self.size
        if sample["image"].shape[:2] != (h, w):
            img = Image.fromarray(np.ascontiguousarray(sample["image"])).resize((w, h), Image.BILINEAR)
            out["image"] = np.asarray(img)
        return out

    def __repr__(self) -> str:
        return f"ResizeImage(size={self.size})"


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
    (4, H, W) codes if they travel encoded (see ``DenseDataset.encoded_normals``), else float32.
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

    def with_compact_output(self) -> ToTensor | None:
        """``ToTensor(compact=True)`` (None for a subclass, which may convert differently)."""
        return ToTensor(compact=True, normalization=self.normalization) if type(self) is ToTensor else None

    def __repr__(self) -> str:
        return f"ToTensor(compact={self.compact})"


def train_transforms(crop_size: int | Sequence[int], scale_range: tuple[float, float] = (0.5, 2.0),
                     normalization: Stats | None = None) -> Compose:
    """Random scale + crop to ``crop_size`` and flip p=0.5 (fused in one :class:`RandomScaleCrop`
    pass; the same draws as ``RandomScaleCrop`` then ``RandomHorizontalFlip(0.5)``), photometric
    distortion, empty parts maps ignored, to tensors normalised with ``normalization`` (None:
    ImageNet's)."""
    return Compose([RandomScaleCrop(crop_size, scale_range, flip_p=0.5), PhotometricDistortion(),
                    IgnoreEmptyParts(), ToTensor(normalization=normalization)])  # fmt: skip


def eval_transforms(pad_size: int | Sequence[int] | None = None, normalization: Stats | None = None) -> Compose:
    """No resizing: optional padding to ``pad_size`` (batches are padded to a common size by the
    loader's collate anyway), empty parts maps ignored, then tensors normalised with
    ``normalization`` (None: ImageNet's)."""
    return Compose(([PadTo(pad_size)] if pad_size is not None else [])
                   + [IgnoreEmptyParts(), ToTensor(normalization=normalization)])


def resize_transforms(image_size: int | Sequence[int], normalization: Stats | None = None) -> Compose:
    """The unaugmented pipeline (MTMamba++ Cityscapes, train and eval): the image resized to
    ``image_size``, labels at their stored size, then tensors normalised with ``normalization``
    (None: ImageNet's)."""
    return Compose([ResizeImage(image_size), IgnoreEmptyParts(), ToTensor(normalization=normalization)])

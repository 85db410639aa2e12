"""Prediction images: one PNG per task per image, and a side-by-side sheet.

Colour maps: segmentation and human parts get the PASCAL VOC palette (class index -> colour),
depth a perceptual blue-to-yellow ramp over each image's 2nd..98th percentile, normals the usual
``(n + 1) / 2`` RGB encoding of unit vectors, boundaries and saliency their probability in grey.
Ground truth (the sheets written during evaluation) uses the same maps, depth on the prediction's
range; ignored label pixels take VOC's void colour (light beige), invalid depth and normals black.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps
from torch import Tensor, nn

from mtssm.data.constants import IMAGENET_MEAN, IMAGENET_STD
from mtssm.engine.build import build_model
from mtssm.engine.checkpoint import load_model_weights, read_checkpoint_config
from mtssm.engine.config import config_from_dict

__all__ = [
    "colorize",
    "colorize_target",
    "load_image",
    "load_model_from_checkpoint",
    "output_stems",
    "predict_dataset",
    "predict_images",
    "predict_tensor",
    "read_rgb",
    "save_predictions",
    "voc_palette",
]

_MULTIPLE = 32  # encoder stride: inputs are padded up to a multiple of it, outputs cropped back


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: ``(n, 3)`` uint8, class ``i`` -> RGB (bit-interleaved)."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


# Anchors of a viridis-like ramp (dark blue -> green -> yellow), interpolated linearly.
_RAMP = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64
)


def _ramp(x: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] ``(H, W)`` to RGB uint8 ``(H, W, 3)``."""
    pos = np.clip(x, 0, 1) * (len(_RAMP) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_RAMP) - 2)
    frac = (pos - lo)[..., None]
    return (_RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac).round().astype(np.uint8)


def colorize(task: str, pred: Tensor) -> Image.Image:
    """An RGB image of one task's prediction ``pred`` (C_t, H, W) (logits or values, float)."""
    pred = pred.detach().float().cpu()
    if task in ("semseg", "human_parts"):
        return Image.fromarray(voc_palette()[pred.argmax(0).numpy().astype(np.uint8)])
    if task == "depth":
        d = pred[0].numpy()
        lo, hi = np.percentile(d, [2, 98])
        return Image.fromarray(_ramp((d - lo) / max(hi - lo, 1e-6)))
    if task == "normals":
        n = F.normalize(pred[:3], dim=0).permute(1, 2, 0).numpy()
        return Image.fromarray(((n + 1) * 127.5).clip(0, 255).round().astype(np.uint8))
    if task == "sal":
        p = pred.softmax(0)[1] if pred.shape[0] > 1 else pred[0].sigmoid()
        return Image.fromarray((p.numpy() * 255).round().astype(np.uint8)).convert("RGB")
    # boundaries ("edge") and any single-channel map: sigmoid probability in grey
    p = pred[0].sigmoid() if pred.shape[0] == 1 else pred.softmax(0)[-1]
    return Image.fromarray((p.numpy() * 255).round().astype(np.uint8)).convert("RGB")


def colorize_target(task: str, target: Tensor, pred: Tensor | None = None) -> Image.Image:
    """An RGB image of one task's ground truth as the data pipeline gives it: labels (H, W) or
    (1, H, W) with 255 ignored, depth (1, H, W) with 0 invalid (coloured on the range of ``pred``,
    when given, so the two compare), normals (3, H, W) with zero vectors invalid. Ignored label
    pixels take the VOC void colour (palette entry 255), invalid depth and normals are black."""
    t = target.detach().float().cpu()
    if task in ("semseg", "human_parts", "sal", "edge"):
        lab = (t[0] if t.ndim == 3 else t).numpy()
        ignored = lab == 255
        palette = voc_palette()
        if task in ("semseg", "human_parts"):
            rgb = palette[np.where(ignored, 0, lab).astype(np.uint8)]
        else:
            rgb = np.repeat((np.where(ignored, 0, lab) * 255).clip(0, 255).astype(np.uint8)[..., None], 3, -1)
        rgb[ignored] = palette[255]
        return Image.fromarray(rgb)
    if task == "depth":
        d = t[0].numpy()
        valid = d > 0
        ref = pred[0].float().cpu().numpy() if pred is not None else d[valid]
        lo, hi = np.percentile(ref, [2, 98]) if ref.size else (0.0, 1.0)
        rgb = _ramp((d - lo) / max(hi - lo, 1e-6))
        rgb[~valid] = 0
        return Image.fromarray(rgb)
    if task == "normals":
        n = t[:3].permute(1, 2, 0).numpy()
        valid = np.linalg.norm(n, axis=-1) > 0
        rgb = ((n + 1) * 127.5).clip(0, 255).round().astype(np.uint8)
        rgb[~valid] = 0
        return Image.fromarray(rgb)
    raise ValueError(f"colorize_target: unknown task {task!r}")


#: Modes holding one 16-bit grey channel (``I`` is how older Pillow opened 16-bit PNGs).
_MODES_16BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def read_rgb(path: str | Path, background: Sequence[float] | None = None) -> np.ndarray:
    """The image at ``path`` as float32 RGB ``(H, W, 3)`` in ``[0, 1]``, upright, whatever its mode.

    8-bit modes are divided by 255; 16-bit grey (``I;16*``, and ``I``) by 65535, so the full range
    is kept rather than clipped to white; ``F`` is taken as intensities in ``[0, 1]`` (clipped, NaN
    as 0). Grey is repeated into three channels; ``P``, ``CMYK`` and ``YCbCr`` go through Pillow's
    conversion. Transparent pixels (``RGBA``, ``LA``, ``PA``, a palette or colour with a transparent
    entry) are composited onto ``background`` (the model's input mean; None: the ImageNet mean),
    the colour of the padding the model sees around an image, so that they read as "no image"
    rather than as black or white. The EXIF orientation
    is applied. Raises a one-line ``FileNotFoundError`` / ``ValueError`` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    mean = np.asarray(IMAGENET_MEAN if background is None else background, dtype=np.float32)
    try:
        img = Image.open(path)
        img.load()
        img = ImageOps.exif_transpose(img)
        mode = img.mode
        if mode in _MODES_16BIT:
            grey = np.clip(np.asarray(img).astype(np.float32) / np.float32(65535.0), 0.0, 1.0)
            return np.repeat(grey[..., None], 3, axis=2)
        if mode == "F":
            grey = np.clip(np.nan_to_num(np.asarray(img, dtype=np.float32)), 0.0, 1.0)
            return np.repeat(grey[..., None], 3, axis=2)
        if "A" in mode or "a" in mode or "transparency" in img.info:
            rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
            alpha = rgba[..., 3:]
            return rgba[..., :3] * alpha + mean * (1.0 - alpha)
        return np.asarray(img if mode == "RGB" else img.convert("RGB"), dtype=np.float32) / 255.0
    except Exception as exc:  # Pillow raises OSError, ValueError, DecompressionBombError, ...
        why = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        raise ValueError(f"image {str(path)!r} cannot be read ({why})") from None


def _stats(normalization: tuple[Sequence[float], Sequence[float]] | None) -> tuple[Tensor, Tensor]:
    """``(mean, std)`` as ``(3, 1, 1)`` tensors; None gives the ImageNet statistics."""
    mean, std = normalization if normalization is not None else (IMAGENET_MEAN, IMAGENET_STD)
    return torch.tensor(mean, dtype=torch.float32).view(3, 1, 1), torch.tensor(std, dtype=torch.float32).view(3, 1, 1)


def load_image(
    path: str | Path, normalization: tuple[Sequence[float], Sequence[float]] | None = None
) -> tuple[Image.Image, Tensor]:
    """The image at ``path`` as 8-bit RGB (for display) and its tensor ``(3, H, W)`` normalised with
    ``normalization`` (``(mean, std)``, the model's ``input_normalization``; None: ImageNet's), from
    :func:`read_rgb` (transparent pixels onto that mean)."""
    mean, std = _stats(normalization)
    rgb = read_rgb(path, background=mean.flatten().tolist())
    img = Image.fromarray((rgb * 255.0).round().astype(np.uint8))
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
    return img, (x - mean) / std


@torch.no_grad()
def predict_tensor(model: nn.Module, image: Tensor) -> dict[str, Tensor]:
    """Run ``model`` on one normalised image ``(3, H, W)``; returns ``{task: (C_t, H, W)}``.

    The image is zero-padded (the data pipeline's image padding value) up to a multiple of the
    encoder stride, or up to the model's :attr:`~mtssm.nn.MultiTaskModel.fixed_input_size` when it
    has one, and the outputs are cropped back to ``H, W``.
    """
    h, w = image.shape[-2:]
    ph, pw = -h % _MULTIPLE, -w % _MULTIPLE
    fixed = getattr(model, "fixed_input_size", None)
    if fixed is not None:
        if h > fixed[0] or w > fixed[1]:
            raise ValueError(
                f"a {h}x{w} image is larger than {fixed[0]}x{fixed[1]}, the only input size this model runs at "
                f"(its routers pool over a fixed grid); resize or crop the image"
            )
        ph, pw = fixed[0] - h, fixed[1] - w
    x = F.pad(image[None], (0, pw, 0, ph))
    param = next(model.parameters(), None)
    if param is not None:
        x = x.to(param.device)
    out = model(x)
    return {t: v[0, :, :h, :w].float().cpu() for t, v in dict(out.items()).items()}


def save_predictions(
    image: Image.Image, preds: dict[str, Tensor], out_dir: str | Path, stem: str,
    targets: dict[str, Tensor] | None = None,
) -> list[Path]:
    """Write ``<stem>_<task>.png`` for each task and ``<stem>_sheet.png``, captioned: the input,
    then per task its ground truth (when ``targets`` has it) beside its prediction.

    ``stem`` may hold folders (``a/scene``); they are created under ``out_dir``.
    """
    out = Path(out_dir)
    (out / stem).parent.mkdir(parents=True, exist_ok=True)
    written = []
    tiles = [("input", image.convert("RGB"))]
    for task, pred in preds.items():
        tile = colorize(task, pred)
        path = out / f"{stem}_{task}.png"
        tile.save(path)
        written.append(path)
        if targets is not None and task in targets:
            tiles.append((f"{task} gt", colorize_target(task, targets[task], pred)))
        tiles.append((task, tile))
    w, h = image.size
    caption = 14
    sheet = Image.new("RGB", (w * len(tiles), h + caption), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (name, tile) in enumerate(tiles):
        sheet.paste(tile.resize((w, h)), (i * w, caption))
        draw.text((i * w + 3, 1), name, fill="black")
    path = out / f"{stem}_sheet.png"
    sheet.save(path)
    written.append(path)
    return written


def load_model_from_checkpoint(ckpt: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, object, int]:
    """Rebuild a checkpoint's model from the recipe stored in it and load its weights.

    Returns ``(model in eval mode, RecipeConfig, step)``.
    """
    data, step = read_checkpoint_config(ckpt)
    cfg = config_from_dict(data)
    # built for real (non-persistent buffers are not in the checkpoint), without the recipe's
    # weights files: the checkpoint holds every weight and the input normalisation
    model = build_model(cfg, load_weights=False, echo=None)
    load_model_weights(model, ckpt)
    return model.to(device).eval(), cfg, step


def output_stems(images: Sequence[str | Path]) -> dict[Path, str]:
    """The output stem of each distinct image file (a file named twice is predicted once).

    A stem is the image's path relative to the folder holding all of them, without its suffix
    (``scene``; ``a/scene`` and ``b/scene`` for two ``scene.png`` in different folders), or with
    its suffix where two files differ only by it (``scene.png``, ``scene.jpg``). Outputs are
    ``<stem>_<task>.png``: distinct stems give distinct outputs, as no task name ends in
    ``_<another task name>``.
    """
    files = list(dict.fromkeys(Path(p).resolve() for p in images))
    if not files:
        return {}
    base = Path(os.path.commonpath([f.parent for f in files]))
    rel = [f.relative_to(base) for f in files]
    stems = [r.with_suffix("").as_posix() for r in rel]
    if len(set(stems)) < len(stems):
        stems = [r.as_posix() for r in rel]
    return dict(zip(files, stems))


def predict_images(model: nn.Module, images: Sequence[str | Path], out_dir: str | Path) -> list[Path]:
    """Predict every image file and write its PNGs into ``out_dir`` (names from
    :func:`output_stems`); returns the written paths, each once.

    Refuses, before writing anything, a run whose outputs would overwrite one of its inputs.
    """
    stems = output_stems(images)
    for path in images:  # every input exists before any output is written
        if not Path(path).is_file():
            raise FileNotFoundError(f"image {str(path)!r} does not exist")
    out = Path(out_dir).resolve()
    planned: dict[Path, Path] = {}
    for src, stem in stems.items():
        for name in [*getattr(model, "tasks", ()), "sheet"]:
            target = out / f"{stem}_{name}.png"
            if target in stems:
                raise ValueError(f"output {target} would overwrite the input image {target}; choose another --out")
            if target in planned:  # impossible by output_stems' naming; checked, never assumed
                raise ValueError(f"inputs {planned[target]} and {src} would both write {target}")
            planned[target] = src
    model.eval()
    written: list[Path] = []
    norm = getattr(model, "input_normalization", None)
    for src, stem in stems.items():
        img, x = load_image(src, norm)
        written += save_predictions(img, predict_tensor(model, x), out_dir, stem)
    return list(dict.fromkeys(written))


def _to_pil(image: Tensor, normalization: tuple[Sequence[float], Sequence[float]] | None = None) -> Image.Image:
    """Undo the normalisation ``(mean, std)`` (None: ImageNet's) of ``(3, H, W)``; an RGB image."""
    mean, std = _stats(normalization)
    rgb = (image.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def predict_dataset(model: nn.Module, dataset: Sequence, out_dir: str | Path, n: int) -> list[Path]:
    """Write the prediction PNGs of the first ``n`` samples of ``dataset`` (stems ``0000``, ...),
    each sheet showing the input and, per task, the ground truth beside the prediction."""
    model.eval()
    written: list[Path] = []
    norm = getattr(model, "input_normalization", None)
    for i in range(min(n, len(dataset))):
        sample = dataset[i]
        image = sample["image"]
        preds = predict_tensor(model, image)
        targets = {t: sample[t] for t in preds if t in sample}
        written += save_predictions(_to_pil(image, norm), preds, out_dir, f"{i:04d}", targets)
    return written

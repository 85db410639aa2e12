"""Prediction images: one PNG per task per image, and a side-by-side sheet.

Colour maps: segmentation and human parts get the PASCAL VOC palette (class index -> colour),
depth a perceptual blue-to-yellow ramp over each image's 2nd..98th percentile, normals the usual
``(n + 1) / 2`` RGB encoding of unit vectors, boundaries and saliency their probability in grey.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor, nn

__all__ = [
    "colorize",
    "load_image",
    "load_model_from_checkpoint",
    "predict_dataset",
    "predict_images",
    "predict_tensor",
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


def _stats(normalization: tuple[Sequence[float], Sequence[float]] | None) -> tuple[Tensor, Tensor]:
    """``(mean, std)`` as ``(3, 1, 1)`` tensors; None gives the ImageNet statistics."""
    from mtssm.data.constants import IMAGENET_MEAN, IMAGENET_STD

    mean, std = normalization if normalization is not None else (IMAGENET_MEAN, IMAGENET_STD)
    return torch.tensor(mean, dtype=torch.float32).view(3, 1, 1), torch.tensor(std, dtype=torch.float32).view(3, 1, 1)


def load_image(
    path: str | Path, normalization: tuple[Sequence[float], Sequence[float]] | None = None
) -> tuple[Image.Image, Tensor]:
    """The RGB image at ``path`` and its tensor ``(3, H, W)`` normalised with ``normalization``
    (``(mean, std)``, the model's ``input_normalization``; None: ImageNet's)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    try:
        img = Image.open(path).convert("RGB")
    except OSError as exc:
        raise ValueError(f"image {str(path)!r} cannot be read: {exc}") from None
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean, std = _stats(normalization)
    return img, (x - mean) / std


@torch.no_grad()
def predict_tensor(model: nn.Module, image: Tensor) -> dict[str, Tensor]:
    """Run ``model`` on one normalised image ``(3, H, W)``; returns ``{task: (C_t, H, W)}``.

    The image is zero-padded (the data pipeline's image padding value) up to a multiple of the
    encoder stride and the outputs are cropped back to ``H, W``.
    """
    h, w = image.shape[-2:]
    ph, pw = -h % _MULTIPLE, -w % _MULTIPLE
    x = F.pad(image[None], (0, pw, 0, ph))
    param = next(model.parameters(), None)
    if param is not None:
        x = x.to(param.device)
    out = model(x)
    return {t: v[0, :, :h, :w].float().cpu() for t, v in dict(out.items()).items()}


def save_predictions(
    image: Image.Image, preds: dict[str, Tensor], out_dir: str | Path, stem: str
) -> list[Path]:
    """Write ``<stem>_<task>.png`` for each task and ``<stem>_sheet.png`` (input + tasks, captioned)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    tiles = [("input", image.convert("RGB"))]
    for task, pred in preds.items():
        tile = colorize(task, pred)
        path = out / f"{stem}_{task}.png"
        tile.save(path)
        written.append(path)
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
    from mtssm.engine.build import build_model
    from mtssm.engine.checkpoint import load_model_weights, read_checkpoint_config
    from mtssm.engine.config import config_from_dict

    data, step = read_checkpoint_config(ckpt)
    cfg = config_from_dict(data)
    # built for real (non-persistent buffers are not in the checkpoint), without the recipe's
    # weights files: the checkpoint holds every weight and the input normalisation
    model = build_model(cfg, load_weights=False, echo=None)
    load_model_weights(model, ckpt)
    return model.to(device).eval(), cfg, step


def predict_images(model: nn.Module, images: Sequence[str | Path], out_dir: str | Path) -> list[Path]:
    """Predict every image file and write its PNGs into ``out_dir``; returns the written paths."""
    model.eval()
    written: list[Path] = []
    norm = getattr(model, "input_normalization", None)
    for path in images:
        img, x = load_image(path, norm)
        written += save_predictions(img, predict_tensor(model, x), out_dir, Path(path).stem)
    return written


def _to_pil(image: Tensor, normalization: tuple[Sequence[float], Sequence[float]] | None = None) -> Image.Image:
    """Undo the normalisation ``(mean, std)`` (None: ImageNet's) of ``(3, H, W)``; an RGB image."""
    mean, std = _stats(normalization)
    rgb = (image.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def predict_dataset(model: nn.Module, dataset: Sequence, out_dir: str | Path, n: int) -> list[Path]:
    """Write the prediction PNGs of the first ``n`` samples of ``dataset`` (stems ``0000``, ...)."""
    model.eval()
    written: list[Path] = []
    norm = getattr(model, "input_normalization", None)
    for i in range(min(n, len(dataset))):
        image = dataset[i]["image"]
        written += save_predictions(_to_pil(image, norm), predict_tensor(model, image), out_dir, f"{i:04d}")
    return written

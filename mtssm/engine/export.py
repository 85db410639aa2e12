"""Export a checkpoint with :func:`torch.export` for deployment.

The saved program takes images ``(B, 3, H, W)`` (ImageNet-normalised, H and W multiples of 32, the
shape given at export time) and returns a plain ``dict`` ``{task: (B, C_t, H, W)}``. Load it with::

    import mtssm, torch          # importing mtssm registers the torch.ops.mtssm custom ops
    program = torch.export.load("model.pt2")
    outputs = program.module()(images)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mtssm.engine.predict import load_model_from_checkpoint

__all__ = ["default_export_size", "export_checkpoint"]


def default_export_size(cfg: object) -> tuple[int, int]:
    """The recipe's image size (train crop, else the rendered size) rounded up to multiples of 32."""
    size = cfg.data.crop_size or cfg.data.render_size  # type: ignore[attr-defined]
    return tuple(-(-int(s) // 32) * 32 for s in size)  # type: ignore[return-value]


def export_checkpoint(
    ckpt: str | Path,
    out: str | Path,
    *,
    size: tuple[int, int] | None = None,
    batch: int = 1,
) -> Path:
    """Export the checkpoint's model for inputs ``(batch, 3, *size)`` to ``out`` (written atomically).

    ``size`` defaults to :func:`default_export_size` of the checkpoint's recipe.
    """
    model, cfg, _ = load_model_from_checkpoint(ckpt)
    h, w = size or default_export_size(cfg)
    if h % 32 or w % 32 or h <= 0 or w <= 0:
        raise ValueError(f"size: expected positive multiples of 32, got {h}x{w}")
    example = torch.zeros(batch, 3, h, w)
    exportable = model.as_exportable().eval() if hasattr(model, "as_exportable") else model.eval()
    with torch.no_grad():
        program = torch.export.export(exportable, (example,))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        torch.export.save(program, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out

"""Export a checkpoint with :func:`torch.export` for deployment.

The saved program takes images ``(B, 3, H, W)`` (normalised with the model's own statistics, H
and W multiples of 32, the shape given at export time) and returns a plain ``dict``
``{task: (B, C_t, H, W)}``. The statistics travel with the program as its extra file
``normalization.json`` (``{"mean": [...], "std": [...]}``).
Load it with::

    import json, mtssm, torch    # importing mtssm registers the torch.ops.mtssm custom ops
    extra = {"normalization.json": ""}
    program = torch.export.load("model.pt2", extra_files=extra)
    stats = json.loads(extra["normalization.json"])   # images = (rgb / 255 - mean) / std
    outputs = program.module()(images)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtssm.engine.predict import load_model_from_checkpoint

__all__ = ["NORMALIZATION_FILE", "default_export_size", "export_checkpoint", "export_model"]

#: The extra file of an exported program holding the model's input statistics.
NORMALIZATION_FILE = "normalization.json"


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
    return export_model(model, cfg, out, size=size, batch=batch)


def export_model(
    model: nn.Module,
    cfg: Any,
    out: str | Path,
    *,
    size: tuple[int, int] | None = None,
    batch: int = 1,
) -> Path:
    """Export ``model`` (built from recipe ``cfg``) for inputs ``(batch, 3, *size)`` to ``out``,
    written atomically, with its input statistics (:data:`NORMALIZATION_FILE`)."""
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
        extra = {}
        stats = getattr(model, "input_normalization", None)
        if stats is not None:
            extra[NORMALIZATION_FILE] = json.dumps({"mean": list(stats[0]), "std": list(stats[1])})
        torch.export.save(program, tmp, extra_files=extra)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out

"""Which model ``mtssm eval``, ``predict`` and ``export`` run: from a checkpoint, or a recipe plus weights.

- an mtssm checkpoint (a run folder, checkpoint folder or ``model.safetensors``) holds its recipe:
  the model is rebuilt from it and its weights loaded (with its input normalisation);
- a recipe (``--recipe NAME``, optionally ``--set k=v``) names the model, and ``--weights FILE``
  gives its trained weights: an mtssm checkpoint or an official trained checkpoint
  (``mtssm eval --recipe nyud_mtmamba --weights mtmamba_nyud.pth.tar --data-root DIR``);
  ``--encoder-weights FILE`` loads an encoder file first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtssm.engine.build import build_model, load_recipe
from mtssm.engine.checkpoint import read_checkpoint_config
from mtssm.engine.config import config_from_dict
from mtssm.engine.predict import load_model_from_checkpoint

__all__ = ["resolve_model"]


def resolve_model(
    checkpoint: str | Path | None = None,
    *,
    recipe: str | Path | None = None,
    weights: str | Path | None = None,
    encoder_weights: str | Path | None = None,
    overrides: Sequence[str] = (),
    device: str | torch.device = "cpu",
    echo: Callable[[str], None] = print,
    before_load: Callable[[Any], None] | None = None,
) -> tuple[nn.Module, Any, int]:
    """The model to run, in eval mode on ``device``, its recipe config, and its training step (0
    when the weights do not say).

    Give ``checkpoint`` (an mtssm checkpoint), or ``weights`` with or without ``recipe``: without a
    recipe, ``weights`` must be an mtssm checkpoint. ``before_load(cfg)`` runs once the recipe is
    known and before any weights are read (to fail on a missing dataset before printing anything).
    Every mistake raises one line.
    """
    if checkpoint is not None and weights is not None:
        raise ValueError("give the checkpoint as CKPT or as --weights FILE, not both")
    source = checkpoint if checkpoint is not None else weights
    if recipe is None:
        if source is None:
            raise ValueError("nothing to load: give a checkpoint (CKPT), or --recipe NAME --weights FILE")
        if encoder_weights is not None or overrides:
            raise ValueError("--encoder-weights and --set apply to a model built from --recipe NAME")
        try:
            cfg = config_from_dict(read_checkpoint_config(source)[0])
        except (ValueError, FileNotFoundError) as exc:
            if not Path(source).exists():
                raise
            raise ValueError(
                f"{source} is not an mtssm checkpoint ({' '.join(str(exc).split())}); pass --recipe NAME "
                f"to say which model its weights are for"
            ) from None
        if before_load is not None:
            before_load(cfg)
        model, cfg, step = load_model_from_checkpoint(source, device=device)
        if checkpoint is None:  # given as --weights: say what it was (a plain CKPT says itself)
            echo(f"weights: {source} (mtssm checkpoint, step {step}); input normalisation {_norm(model)}")
        return model, cfg, step
    if source is None:
        raise ValueError(f"--recipe {recipe} needs --weights FILE: the trained weights to run")
    cfg = load_recipe(str(recipe), tuple(overrides))
    cfg.model.weights = str(source)
    if encoder_weights is not None:
        cfg.model.encoder_weights = str(encoder_weights)
    if before_load is not None:
        before_load(cfg)
    model = build_model(cfg, echo=echo)
    step = _checkpoint_step(source)
    echo(f"input normalisation {_norm(model)}")
    return model.to(device).eval(), cfg, step


def _norm(model: nn.Module) -> str:
    stats = getattr(model, "input_normalization", None)
    return "unknown" if stats is None else f"mean {list(stats[0])}, std {list(stats[1])}"


def _checkpoint_step(source: str | Path) -> int:
    """The step an mtssm checkpoint records, 0 for any other file."""
    try:
        return read_checkpoint_config(source)[1]
    except Exception:  # not an mtssm checkpoint: an official file, a plain state dict
        return 0

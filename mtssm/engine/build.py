"""Turn a validated recipe into the parts a run needs: data root, datasets, model and loss."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from mtssm.engine.config import RecipeConfig
from mtssm.paths import cache_dir

__all__ = [
    "DatasetNotFoundError",
    "build_components",
    "build_eval_set",
    "build_model",
    "model_normalization",
    "recipe_tasks",
    "render_cache_dir",
    "rendered_data_root",
    "resolve_data_root",
]


class DatasetNotFoundError(FileNotFoundError):
    """No dataset at the configured root; the message says where it looked and what to do."""


def recipe_tasks(cfg: RecipeConfig) -> list[str]:
    """The recipe's tasks: ``data.tasks`` or every task of ``data.dataset``."""
    from mtssm.data.constants import TASKS_BY_DATASET

    return list(cfg.data.tasks or TASKS_BY_DATASET[cfg.data.dataset])


def build_model(cfg: RecipeConfig, *, load_weights: bool = True, echo: Any = print) -> nn.Module:
    """The registered model ``model.name`` for the recipe's dataset and tasks, with ``model.args``.

    With ``load_weights`` the files ``model.encoder_weights`` and ``model.weights`` are loaded
    (each load's report goes to ``echo``); without, only the architecture is built (to receive a
    checkpoint's weights).
    """
    from mtssm.nn import create_model, list_models

    if cfg.model.name not in list_models():
        raise ValueError(f"model.name: unknown model {cfg.model.name!r}; valid models: {', '.join(list_models())}")
    args: dict[str, Any] = {"dataset": cfg.data.dataset, "tasks": recipe_tasks(cfg), **cfg.model.args}
    if load_weights:
        args.update(weights=_weights_file(cfg.model.weights), encoder_weights=cfg.model.encoder_weights)
    return create_model(cfg.model.name, echo=echo, **args)


def _weights_file(path: str | None) -> str | None:
    """``model.weights`` as a file: an mtssm run or checkpoint folder becomes its ``model.safetensors``."""
    if path is None or not Path(path).expanduser().is_dir():
        return path
    from mtssm.engine.checkpoint import MODEL_FILE, resolve_checkpoint

    return str(resolve_checkpoint(Path(path).expanduser()) / MODEL_FILE)


def render_cache_dir(cfg: RecipeConfig) -> Path:
    """Where ``--data rendered`` keeps the scenes: ``mtssm.paths.cache_dir()`` (``$MTSSM_CACHE_DIR``
    or ``~/.cache/mtssm``), then ``rendered/<layout>-<H>x<W>-<n>``."""
    base = cache_dir()
    h, w = cfg.data.render_size
    return base / "rendered" / f"{cfg.data.dataset}-{h}x{w}-{cfg.data.render_n}"


def rendered_data_root(cfg: RecipeConfig, echo: Any = print) -> Path:
    """Render the recipe's scenes into the cache on first use (atomically) and return the root."""
    from mtssm.data import render_scenes

    root = render_cache_dir(cfg)
    done = root / ".complete"
    if done.is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    echo(f"rendering {cfg.data.render_n} {cfg.data.dataset} scenes of {cfg.data.render_size} into {root} ...")
    render_scenes(tmp, layout=cfg.data.dataset, n=cfg.data.render_n, seed=0, size=tuple(cfg.data.render_size))
    (tmp / ".complete").write_text("ok\n")
    if root.exists():
        shutil.rmtree(root)
    os.replace(tmp, root)
    return root


def resolve_data_root(cfg: RecipeConfig, data_root: str | Path | None = None, data: str | None = None,
                      echo: Any = print) -> Path:
    """The dataset folder: rendered scenes when ``data == "rendered"``, else ``data_root`` or
    ``data.root``. Raises :class:`DatasetNotFoundError` when that folder does not exist."""
    if data not in (None, "rendered"):
        raise ValueError(f"--data: unknown value {data!r}; valid values: rendered")
    if data == "rendered":
        return rendered_data_root(cfg, echo)
    root = Path(data_root if data_root is not None else cfg.data.root).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(_not_found(cfg, root))
    return root


def _not_found(cfg: RecipeConfig, root: Path, detail: str = "") -> str:
    return (
        f"no {cfg.data.dataset} dataset at {root.resolve()}{detail}; point --data-root DIR "
        f"(or --set data.root=DIR) at it, or pass --data rendered to train on rendered scenes"
    )


def _build_dataset(cfg: RecipeConfig, root: Path, split: str, train: bool, normalization: Any = None) -> Any:
    from mtssm.data import build_dataset

    crop = tuple(cfg.data.crop_size) if (train and cfg.data.crop_size) else None
    try:
        return build_dataset(cfg.data.dataset, root, split, train, crop_size=crop, tasks=recipe_tasks(cfg),
                             normalization=normalization)
    except FileNotFoundError as exc:
        raise DatasetNotFoundError(_not_found(cfg, root, f" ({exc})")) from None


def model_normalization(model: nn.Module) -> Any:
    """The ``(mean, std)`` a model wants its inputs normalised with (None: ImageNet's, for a model
    that does not say)."""
    return getattr(model, "input_normalization", None)


def build_eval_set(cfg: RecipeConfig, root: str | Path, normalization: Any = None) -> Any:
    """The evaluation split of the recipe's dataset, its images normalised with ``normalization``
    (the model's :func:`model_normalization`; None: ImageNet's)."""
    return _build_dataset(cfg, Path(root), cfg.data.eval_split, train=False, normalization=normalization)


def build_components(cfg: RecipeConfig, data_root: str | Path | None = None, echo: Any = print) -> Any:
    """Model, datasets and loss of ``cfg``; call after seeding (the model is initialised here).

    Raises a one-line :class:`~mtssm.engine.config.ConfigError` for a paper model given no
    encoder weights (:func:`~mtssm.engine.config.check_encoder_weights`). The datasets normalise
    images with the model's statistics.
    """
    from mtssm.engine.config import check_encoder_weights
    from mtssm.engine.trainer import Components
    from mtssm.losses import build_task_losses

    check_encoder_weights(cfg)
    root = Path(data_root) if data_root is not None else resolve_data_root(cfg)
    tasks = recipe_tasks(cfg)
    model = build_model(cfg, echo=echo)
    norm = model_normalization(model)
    train_set = _build_dataset(cfg, root, cfg.data.train_split, train=True, normalization=norm)
    eval_set = build_eval_set(cfg, root, norm)
    weights = {t: float(cfg.loss.weights.get(t, 1.0)) for t in tasks}
    loss_fn = build_task_losses(tasks, weights, edge_pos_weight=cfg.loss.edge_pos_weight, scheme=cfg.loss.scheme)
    return Components(model=model, train_set=train_set, eval_set=eval_set, loss_fn=loss_fn, tasks=tasks)

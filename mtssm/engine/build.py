"""From a recipe to the parts a run needs, in the order a run needs them.

1. :func:`load_recipe`: the recipe file, its ``--set`` overrides and the schema
   (:mod:`mtssm.engine.config`), then the model's arguments, checked by building the model on the
   meta device (no memory, no initialisation), so a bad ``model.args`` key fails in a second with
   one line naming it, before any data is read.
2. :func:`resolve_data_root`: the dataset folder (or rendered scenes in the cache).
3. :func:`build_components`: seeded model, datasets, losses -> :class:`Components`.
4. :func:`build_optimizer` and :func:`build_scheduler` over a model.

:func:`mtssm.engine.trainer.train` runs the components; nothing here imports the trainer.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from mtssm.data import build_dataset, make_dataloader, render_scenes
from mtssm.engine.checkpoint import MODEL_FILE, resolve_checkpoint
from mtssm.engine.config import ConfigError, RecipeConfig, check_encoder_weights, load_recipe_file
from mtssm.engine.sanity import check_crop_size
from mtssm.losses import build_task_losses
from mtssm.nn import create_model, list_models, model_config
from mtssm.paths import cache_dir
from mtssm.recipes import find_recipe
from mtssm.tasks import dataset_tasks

__all__ = [
    "Components",
    "DatasetNotFoundError",
    "LossFn",
    "PolyWarmup",
    "build_components",
    "build_eval_set",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "check_model_args",
    "load_recipe",
    "make_train_loader",
    "model_normalization",
    "param_groups",
    "recipe_tasks",
    "render_cache_dir",
    "rendered_data_root",
    "resolve_data_root",
    "seed_everything",
]

#: ``(predictions, batch) -> (total loss, {task: loss})``.
LossFn = Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], tuple[Tensor, dict[str, Tensor]]]


class DatasetNotFoundError(FileNotFoundError):
    """No dataset at the configured root; the message says where it looked and what to do."""


@dataclass
class Components:
    """What a run trains, built from ``cfg``: the model (images (B, 3, H, W) ->
    {task: (B, C_t, H, W)}), the datasets, the loss and the task names.

    ``make_loader(dataset, batch_size, *, train, num_workers, seed)`` makes the resumable loaders
    (default :func:`mtssm.data.make_dataloader`)."""

    cfg: RecipeConfig
    model: nn.Module
    train_set: Dataset
    eval_set: Dataset | None
    loss_fn: LossFn
    tasks: list[str]
    make_loader: Callable[..., Any] = field(default=make_dataloader)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def recipe_tasks(cfg: RecipeConfig) -> list[str]:
    """The recipe's tasks: ``data.tasks`` or every task of ``data.dataset``."""
    return list(cfg.data.tasks or dataset_tasks(cfg.data.dataset))


def _model_args(cfg: RecipeConfig, args: Mapping[str, Any]) -> dict[str, Any]:
    return {"dataset": cfg.data.dataset, "tasks": recipe_tasks(cfg), **args}


def build_model(cfg: RecipeConfig, device: torch.device | str | None = None, *, load_weights: bool = True,
                echo: Any = print) -> nn.Module:
    """The registered model ``model.name`` for the recipe's dataset and tasks, with ``model.args``
    (``device="meta"`` builds it without memory).

    With ``load_weights`` the files ``model.encoder_weights`` and ``model.weights`` are loaded
    (each load's report goes to ``echo``); without, only the architecture is built (to receive a
    checkpoint's weights).
    """
    if cfg.model.name not in list_models():
        raise ConfigError(f"model.name: unknown model {cfg.model.name!r}; valid models: {', '.join(list_models())}")
    args = _model_args(cfg, cfg.model.args)
    if load_weights:
        args.update(weights=_weights_file(cfg.model.weights), encoder_weights=cfg.model.encoder_weights)
    return create_model(cfg.model.name, device=device, echo=echo, **args)


def _weights_file(path: str | None) -> str | None:
    """``model.weights`` as a file: an mtssm run or checkpoint folder becomes its ``model.safetensors``."""
    if path is None or not Path(path).expanduser().is_dir():
        return path
    return str(resolve_checkpoint(Path(path).expanduser()) / MODEL_FILE)


def check_model_args(cfg: RecipeConfig) -> None:
    """Build the recipe's model on the meta device; a failure raises a one-line
    :class:`ConfigError` naming the ``model.args`` key at fault (the first key whose removal lets
    the model build), or ``model.name`` when the registered model itself fails. Also checks
    ``data.crop_size`` against the encoder's stride."""
    if cfg.model.name not in list_models():
        raise ConfigError(f"model.name: unknown model {cfg.model.name!r}; valid models: {', '.join(list_models())}")
    args = dict(cfg.model.args)
    try:
        model = create_model(cfg.model.name, device="meta", **_model_args(cfg, args))
    except (TypeError, ValueError, RuntimeError, KeyError, AssertionError) as exc:
        error = " ".join(str(exc).split()) or type(exc).__name__
    else:
        check_crop_size(cfg, model)
        return
    registered = model_config(cfg.model.name)
    for key in args:
        rest = {k: v for k, v in args.items() if k != key}
        try:
            create_model(cfg.model.name, device="meta", **_model_args(cfg, rest))
        except (TypeError, ValueError, RuntimeError, KeyError, AssertionError):
            continue
        what = "is not a hyperparameter of" if key not in registered else "has a value not accepted by"
        raise ConfigError(f"model.args.{key}: {what} model {cfg.model.name!r} ({error})")
    where = "model.args" if args else f"model.name ({cfg.model.name!r} with data.dataset/data.tasks)"
    raise ConfigError(f"{where}: the model cannot be built: {error}")


def load_recipe(name: str | Path, overrides: Sequence[str] = ()) -> RecipeConfig:
    """Recipe ``name`` (a packaged name or a YAML file) with ``key=value`` overrides, validated
    against the schema and with its model arguments checked (:func:`check_model_args`)."""
    path = find_recipe(name)
    cfg = load_recipe_file(path, tuple(overrides))
    try:
        check_model_args(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{Path(path).name}: {exc}") from None
    return cfg


def render_cache_dir(cfg: RecipeConfig) -> Path:
    """Where ``--data rendered`` keeps the scenes: ``mtssm.paths.cache_dir()`` (``$MTSSM_CACHE_DIR``
    or ``~/.cache/mtssm``), then ``rendered/<layout>-<H>x<W>-<n>``."""
    h, w = cfg.data.render_size
    return cache_dir() / "rendered" / f"{cfg.data.dataset}-{h}x{w}-{cfg.data.render_n}"


def rendered_data_root(cfg: RecipeConfig, echo: Callable[[str], Any] = print) -> Path:
    """Render the recipe's scenes into the cache on first use (atomically) and return the root."""
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
                      echo: Callable[[str], Any] = print) -> Path:
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


def _build_dataset(cfg: RecipeConfig, root: Path, split: str, train: bool, normalization: Any = None) -> Dataset:
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


def build_eval_set(cfg: RecipeConfig, root: str | Path, normalization: Any = None) -> Dataset:
    """The evaluation split of the recipe's dataset, its images normalised with ``normalization``
    (the model's :func:`model_normalization`; None: ImageNet's)."""
    return _build_dataset(cfg, Path(root), cfg.data.eval_split, train=False, normalization=normalization)


def build_components(cfg: RecipeConfig, data_root: str | Path | None = None, echo: Any = print) -> Components:
    """Model, datasets and loss of ``cfg``. The model is initialised right after
    ``seed_everything(train.seed)``, so the same recipe always starts from the same weights; its
    weight files (``model.weights``, ``model.encoder_weights``) are loaded, each load reported to
    ``echo``, and the datasets normalise images with the model's statistics.

    Raises a one-line :class:`~mtssm.engine.config.ConfigError` for a paper model given no
    encoder weights (:func:`~mtssm.engine.config.check_encoder_weights`).
    """
    check_encoder_weights(cfg)
    root = Path(data_root) if data_root is not None else resolve_data_root(cfg)
    tasks = recipe_tasks(cfg)
    seed_everything(cfg.train.seed)
    model = build_model(cfg, echo=echo)
    norm = model_normalization(model)
    train_set = _build_dataset(cfg, root, cfg.data.train_split, train=True, normalization=norm)
    eval_set = build_eval_set(cfg, root, norm)
    weights = {t: float(cfg.loss.weights.get(t, 1.0)) for t in tasks}
    loss_fn = build_task_losses(tasks, weights, edge_pos_weight=cfg.loss.edge_pos_weight, scheme=cfg.loss.scheme)
    return Components(cfg=cfg, model=model, train_set=train_set, eval_set=eval_set, loss_fn=loss_fn, tasks=tasks)


def make_train_loader(components: Components, batch_size: int) -> Any:
    """The resumable training loader of ``components`` for ``batch_size`` images a step."""
    cfg = components.cfg
    return components.make_loader(
        components.train_set, batch_size, train=True, num_workers=cfg.data.num_workers, seed=cfg.train.seed
    )


def param_groups(model: nn.Module, weight_decay: float, no_decay_flagged: bool = True) -> list[dict[str, Any]]:
    """The trainable parameters of ``model`` as optimizer groups.

    With ``no_decay_flagged``, parameters flagged ``_no_weight_decay = True`` (the SSMs' ``A_log``
    and ``D``, as in Mamba) form a second group with ``weight_decay=0``; otherwise (and when
    nothing is flagged) one group holds every parameter with ``weight_decay``.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if no_decay_flagged and getattr(p, "_no_weight_decay", False) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(cfg: RecipeConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer the recipe names, over the trainable parameters of ``model`` (grouped by
    :func:`param_groups`)."""
    o = cfg.optim
    params = param_groups(model, o.weight_decay, o.no_decay_flagged)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


@dataclass
class PolyWarmup:
    """LR factor at optimizer step ``step``: linear warm-up from ``warmup_start`` over ``warmup``
    steps, then ``(1 - (step - warmup) / (total - warmup)) ** power`` (constant when power is 0)."""

    total: int
    power: float = 0.9
    warmup: int = 0
    warmup_start: float = 1e-3

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.warmup_start + (1.0 - self.warmup_start) * step / self.warmup
        span = max(1, self.total - self.warmup)
        return max(0.0, 1.0 - (step - self.warmup) / span) ** self.power


def build_scheduler(cfg: RecipeConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """Poly (or constant) schedule over ``train.steps`` with linear warm-up, stepped once per
    optimizer step."""
    s = cfg.schedule
    power = s.power if s.name == "poly" else 0.0
    fn = PolyWarmup(cfg.train.steps, power, s.warmup_steps, s.warmup_start)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)

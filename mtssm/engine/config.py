"""Recipe configuration: typed dataclasses, YAML loading, ``--set key=value`` overrides, validation.

A recipe is a YAML file with the sections ``model``, ``data``, ``optim``, ``schedule``, ``loss``,
``train`` and ``eval`` (each optional; missing keys take the dataclass defaults). It is checked
against the dataclasses below before anything runs, so a typo fails at once with a one-line
:class:`ConfigError` naming the key and listing the valid ones.

Batch sizes are *global*: ``data.batch_size`` images make one optimizer step, split evenly over
``train.grad_accum`` micro-steps and over the processes of a distributed run.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtssm.nn.pretrained import paper_weights
from mtssm.tasks import DATASETS, dataset_tasks

__all__ = [
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "RecipeConfig",
    "ScheduleConfig",
    "TrainConfig",
    "apply_overrides",
    "check_encoder_weights",
    "config_from_dict",
    "config_to_dict",
    "load_recipe_file",
    "parse_override",
    "valid_keys",
]

#: Upper bound of optim.lr and optim.weight_decay (float32 step factors overflow far beyond it).
MAX_RATE = 1e4


class ConfigError(ValueError):
    """A recipe that does not match the schema: unknown key, wrong type or invalid value."""


@dataclass
class ModelConfig:
    """The registered model (``mtssm models`` lists them), overrides of its hyperparameters, and the
    weights it starts from.

    ``weights``: a whole-model file (an mtssm checkpoint, or an official trained checkpoint).
    ``encoder_weights``: a pretrained encoder file. ``none`` (or leaving a key out) loads nothing;
    a paper model (:mod:`mtssm.nn.pretrained`) trained without ``weights`` needs
    ``encoder_weights``: a path, or ``none`` to train from scratch on purpose.
    """

    name: str = "msm_tiny"
    args: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    encoder_weights: str | None = None


@dataclass
class DataConfig:
    """Dataset, tasks, sizes and loader settings. ``crop_size``/``render_size`` are ``[H, W]``."""

    dataset: str = "nyud"
    root: str = "data/NYUDv2"
    tasks: list[str] | None = None
    train_split: str = "train"
    eval_split: str = "val"
    crop_size: list[int] | None = None
    batch_size: int = 8
    eval_batch_size: int = 8
    num_workers: int = 2
    render_n: int = 64
    render_size: list[int] = field(default_factory=lambda: [96, 128])


@dataclass
class OptimConfig:
    """Optimizer: ``adam`` (L2 weight decay), ``adamw`` (decoupled) or ``sgd``.

    ``no_decay_flagged``: parameters flagged ``_no_weight_decay`` (the SSMs' ``A_log`` and ``D``)
    get no weight decay, as Mamba trains them. The official MTMamba and PAMM code puts every
    parameter in one decayed group, so their paper recipes set it false.
    """

    name: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9
    no_decay_flagged: bool = True


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: ``poly`` ((1 - t/T)^power after a linear warm-up) or ``constant``."""

    name: str = "poly"
    power: float = 0.9
    warmup_steps: int = 0
    warmup_start: float = 1e-3


@dataclass
class LossConfig:
    """Per-task loss weights (a task not listed gets 1.0), the boundary positive weight, how the
    task losses combine (``sum``: ``sum_t w_t L_t``; ``log``: ``sum_t w_t log(L_t + 1e-8)``, MTMamba's
    ``loss_scheme: log``), and the weight of the decoder's expert load-balancing loss (PAMM; 0
    leaves it out of the training loss, where it is still logged)."""

    weights: dict[str, float] = field(default_factory=dict)
    edge_pos_weight: float = 0.95
    scheme: str = "sum"
    load_balancing: float = 0.0


@dataclass
class TrainConfig:
    """The training loop. ``grad_clip`` 0 turns clipping off; ``*_every`` 0 means only at the end;
    ``threads`` sets torch's intra-op CPU threads (0 keeps torch's default); ``sync_bn`` turns every
    batch norm into ``SyncBatchNorm`` in a distributed (CUDA) run."""

    steps: int = 1000
    grad_accum: int = 1
    grad_clip: float = 0.0
    compile: bool = True
    precision: str = "fp32"
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    log_every: int = 20
    eval_every: int = 0
    ckpt_every: int = 500
    keep_ckpts: int = 2
    progress: bool = True
    sync_bn: bool = False


@dataclass
class EvalConfig:
    """Evaluation after training: trivial baselines beside the metrics, prediction PNGs to write."""

    baselines: bool = True
    max_batches: int = 0
    edge_thresholds: int = 99
    predict_samples: int = 4


@dataclass
class RecipeConfig:
    """A whole recipe. ``source`` says where its numbers come from."""

    name: str = "recipe"
    description: str = ""
    source: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Allowed values of the string fields that name one of a fixed set of things.
_CHOICES: dict[str, tuple[str, ...]] = {
    "data.dataset": tuple(DATASETS),
    "optim.name": ("adam", "adamw", "sgd"),
    "schedule.name": ("poly", "constant"),
    "loss.scheme": ("sum", "log"),
    "train.precision": ("fp32", "bf16"),
}


#: The values ``train.device`` accepts.
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


# ---------------------------------------------------------------------------------------------
# Type checking of plain data against the dataclass annotations
# ---------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{args}]"
    if tp is Any:
        return "any"
    return "null" if tp is type(None) else tp.__name__


def _check_finite(value: Any, key: str) -> Any:
    """``value`` itself, after checking that no float in it (nested lists and dicts too) is NaN/inf."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite(v, f"{key}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{key}.{k}")
    return value


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` and return it (ints widen to float; NaN and
    infinities are refused)."""
    if tp is Any:
        return _check_finite(value, key)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (item,) = typing.get_args(tp)
            return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            k_tp, v_tp = typing.get_args(tp)
            return {_coerce(k, k_tp, key): _coerce(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            return _check_finite(number, key)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _from_dict(cls: type, data: Any, prefix: str) -> Any:
    where = prefix or "recipe"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            raise ConfigError(f"unknown key {full!r} in {where}; valid keys: {', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _from_dict(tp, {} if value is None else value, full)
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def _check_values(cfg: RecipeConfig) -> None:
    """Value checks beyond types: choices, ranges, and consistency between sections."""
    flat = config_to_dict(cfg)
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = flat[section][name]
        if value not in choices:
            raise ConfigError(f"{key}: unknown value {value!r}; valid values: {', '.join(choices)}")
    d, t, o, s = cfg.data, cfg.train, cfg.optim, cfg.schedule
    known = dataset_tasks(d.dataset)
    for task in d.tasks or ():
        if task not in known:
            raise ConfigError(
                f"data.tasks: unknown task {task!r} for dataset {d.dataset!r}; "
                f"valid tasks: {', '.join(known)}"
            )
    if d.tasks is not None and (not d.tasks or len(set(d.tasks)) != len(d.tasks)):
        raise ConfigError(f"data.tasks: expected distinct task names, got {d.tasks!r}")
    tasks = d.tasks or list(known)
    for task in cfg.loss.weights:
        if task not in tasks:
            raise ConfigError(
                f"loss.weights: unknown task {task!r}; valid tasks: {', '.join(tasks)}"
            )
    for key, size in (("data.crop_size", d.crop_size), ("data.render_size", d.render_size)):
        if size is not None and (len(size) != 2 or min(size) < 1):
            raise ConfigError(f"{key}: expected [H, W] with positive sizes, got {size!r}")
    positive = {
        "data.batch_size": d.batch_size,
        "data.eval_batch_size": d.eval_batch_size,
        "data.render_n": d.render_n,
        "train.steps": t.steps,
        "train.grad_accum": t.grad_accum,
        "train.keep_ckpts": t.keep_ckpts,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: expected a positive integer, got {value}")
    non_negative = {
        "data.num_workers": d.num_workers,
        "train.log_every": t.log_every,
        "train.eval_every": t.eval_every,
        "train.ckpt_every": t.ckpt_every,
        "train.grad_clip": t.grad_clip,
        "train.threads": t.threads,
        "optim.weight_decay": o.weight_decay,
        "schedule.warmup_steps": s.warmup_steps,
        "schedule.power": s.power,
        "train.seed": t.seed,
        "eval.max_batches": cfg.eval.max_batches,
        "eval.edge_thresholds": cfg.eval.edge_thresholds - 1,
        "eval.predict_samples": cfg.eval.predict_samples,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key}: expected a value >= 0, got {value}")
    if cfg.loss.load_balancing < 0:
        raise ConfigError(f"loss.load_balancing: expected a weight >= 0, got {cfg.loss.load_balancing}")
    for key in ("weights", "encoder_weights"):
        value = getattr(cfg.model, key)
        if value is not None and not value.strip():
            raise ConfigError(f"model.{key}: expected a file path or none, got an empty string")
    if o.lr <= 0:
        raise ConfigError(f"optim.lr: expected a positive learning rate, got {o.lr}")
    # The optimizers turn lr and lr * weight_decay into float32 step factors: far beyond any
    # useful value they overflow inside the step (a traceback), so they are bounded here.
    for key, value in (("optim.lr", o.lr), ("optim.weight_decay", o.weight_decay)):
        if value > MAX_RATE:
            raise ConfigError(f"{key}: expected a value of at most {MAX_RATE:g}, got {value:g}")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"optim.betas: expected two values in [0, 1), got {o.betas!r}")
    unit = {
        "optim.momentum": o.momentum,
        "schedule.warmup_start": s.warmup_start,
        "loss.edge_pos_weight": cfg.loss.edge_pos_weight,
    }
    for key, value in unit.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key}: expected a value in [0, 1], got {value}")
    for task, weight in cfg.loss.weights.items():
        if weight < 0:
            raise ConfigError(f"loss.weights.{task}: expected a weight >= 0, got {weight}")
    if not _DEVICE.fullmatch(t.device):
        raise ConfigError(f"train.device: unknown device {t.device!r}; valid values: auto, cpu, cuda, cuda:N, mps")
    if d.batch_size % t.grad_accum:
        raise ConfigError(
            f"data.batch_size ({d.batch_size}) must be a multiple of train.grad_accum ({t.grad_accum})"
        )


def _given(path: str | None) -> bool:
    return path is not None and path.strip().lower() != "none"


def check_encoder_weights(cfg: RecipeConfig) -> None:
    """Stop a recipe that would train a paper model from a random encoder without saying so.

    A paper model (:data:`mtssm.nn.pretrained.PAPER_WEIGHTS`) given neither ``model.weights`` nor
    ``model.encoder_weights`` raises a one-line :class:`ConfigError` naming the file its paper used
    and how to pass it; ``model.encoder_weights: none`` trains from scratch on purpose.
    """
    paper = paper_weights(cfg.model.name)
    if paper is None or cfg.model.encoder_weights is not None or _given(cfg.model.weights):
        return
    raise ConfigError(
        f"model.encoder_weights: {cfg.model.name} starts from the pretrained encoder {paper.encoder_file} "
        f"in its paper ({paper.encoder_source}); pass --encoder-weights PATH (or --set "
        f"model.encoder_weights=PATH), or --set model.encoder_weights=none to train from scratch"
    )


def config_from_dict(data: dict[str, Any]) -> RecipeConfig:
    """Build and validate a :class:`RecipeConfig` from plain data; raises :class:`ConfigError`."""
    cfg = _from_dict(RecipeConfig, data, "")
    _check_values(cfg)
    return cfg


def config_to_dict(cfg: RecipeConfig) -> dict[str, Any]:
    """The config as plain data (YAML/JSON-ready)."""
    return dataclasses.asdict(cfg)


def load_recipe_file(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RecipeConfig:
    """Read a recipe YAML file, apply ``key=value`` overrides, validate, and return the config."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe file {str(path)!r} is not valid YAML: {' '.join(str(exc).split())}")
    if not isinstance(data, dict):
        raise ConfigError(f"recipe file {str(path)!r} must hold a mapping of sections")
    data.setdefault("name", path.stem)
    try:
        return config_from_dict(apply_overrides(data, overrides))
    except ConfigError as exc:
        raise ConfigError(f"{path.name}: {exc}") from None


def valid_keys() -> list[str]:
    """Every settable dotted key, e.g. ``train.steps``."""
    keys = []
    for f in dataclasses.fields(RecipeConfig):
        tp = typing.get_type_hints(RecipeConfig)[f.name]
        if dataclasses.is_dataclass(tp):
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(tp)]
        else:
            keys.append(f.name)
    return keys


def _resolve_key(key: str) -> list[str]:
    """Dotted path of ``key``; a bare leaf name (``compile``) resolves when it is unambiguous."""
    keys = valid_keys()
    if key in keys:
        return key.split(".")
    head = key.split(".")[0]
    if head in {k.split(".")[0] for k in keys if "." in k}:
        if head == "model" and key.startswith("model.args."):
            return key.split(".")
        if key.startswith("loss.weights."):
            return key.split(".")
        section_keys = [k for k in keys if k.startswith(head + ".")]
        raise ConfigError(f"unknown key {key!r}; valid keys: {', '.join(section_keys)}")
    matches = [k for k in keys if k.split(".")[-1] == key]
    if len(matches) == 1:
        return matches[0].split(".")
    if len(matches) > 1:
        raise ConfigError(f"ambiguous key {key!r}; write one of: {', '.join(matches)}")
    raise ConfigError(f"unknown key {key!r}; valid keys: {', '.join(keys)}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``key=value`` into the dotted key path and the YAML-parsed value."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return _resolve_key(key.strip()), value


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of recipe ``data`` with each ``key=value`` override written into it."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[path[-1]] = value
    return out

"""The one training loop every recipe runs.

``train(components, out_dir)`` runs ``cfg.train.steps`` optimizer steps on what
:func:`mtssm.engine.build.build_components` made from a recipe. It reads top to bottom:

1. :func:`_setup`: device, loader, optimizer, schedule and the (DDP, compiled) forward;
2. :func:`_restore` (``resume=True``): weights, optimizer, schedule, loader position and RNG
   states from the newest complete checkpoint;
3. the loop: :func:`_step` (one optimizer step), :func:`_checkpoint`, :func:`_evaluate`.

Each step consumes ``data.batch_size`` images (global batch) in ``train.grad_accum`` micro-batches,
split evenly over the processes of a ``torchrun`` job: every process draws the same global batch
from an identically seeded loader and keeps its own slice, so a DDP run computes what one process
computes with the same global batch (up to floating-point summation order). A run killed at any
step and resumed ends with the same weights as an uninterrupted run with the same seed.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from mtssm.data.constants import TRAIN_CROP_SIZE
from mtssm.engine import checkpoint as ckpt
from mtssm.engine.build import (
    Components,
    PolyWarmup,
    build_optimizer,
    build_scheduler,
    make_train_loader,
    param_groups,
    seed_everything,
)
from mtssm.engine.config import RecipeConfig, config_to_dict
from mtssm.engine.distributed import DistInfo, all_reduce_sum, barrier, init_distributed
from mtssm.engine.evaluate import evaluate_recipe
from mtssm.engine.lock import lock_run_folder
from mtssm.engine.sanity import check_split_sizes, check_step_memory

__all__ = [
    "RESUMABLE_KEYS",
    "BatchStream",
    "Components",
    "NonFiniteError",
    "NonFiniteLossError",
    "NonFiniteWeightsError",
    "PolyWarmup",
    "TrainResult",
    "build_optimizer",
    "param_groups",
    "pick_device",
    "sync_batchnorm",
    "seed_everything",
    "train",
]


class NonFiniteError(RuntimeError):
    """Training reached NaN or infinite numbers; the message names where and the last checkpoint
    whose weights are finite."""


class NonFiniteLossError(NonFiniteError):
    """The loss became NaN or infinite; names the task and the step."""


class NonFiniteWeightsError(NonFiniteError):
    """A parameter, buffer or optimizer state became NaN or infinite; names the tensor and the
    step. The checkpoint of that step is not written."""


#: Recipe keys a resume may change (``section.*``: every key of the section). They are applied to
#: the restored run: the schedule is rebuilt for the new ``train.steps``, the optimizer takes the
#: new ``optim.*`` values. A change of any other key is refused.
RESUMABLE_KEYS: tuple[str, ...] = (
    "name", "description", "source", "data.root", "data.eval_batch_size", "data.num_workers", "optim.lr",
    "optim.weight_decay",
    "optim.betas", "optim.momentum", "schedule.*", "train.steps", "train.grad_clip", "train.compile",
    "train.device", "train.threads", "train.log_every", "train.eval_every", "train.ckpt_every",
    "train.keep_ckpts", "train.progress", "eval.*",
)


@dataclass
class TrainResult:
    """Where a finished run left things."""

    out_dir: Path
    step: int
    checkpoint: Path | None
    model: nn.Module
    components: Components
    history: list[dict[str, Any]] = field(default_factory=list)


def pick_device(name: str, info: DistInfo) -> torch.device:
    """``auto`` -> this process's CUDA device when there is one, else the CPU; ``cuda`` -> this
    process's CUDA device; ``cuda:N``, ``mps``, ``cpu`` as named (checked to exist)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        device = torch.device("cuda", info.local_rank) if name == "cuda" else torch.device(name)
        if device.index >= count:
            raise ValueError(f"train.device: {name!r} asked for, but torch sees {count} CUDA device(s)")
        return device
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("train.device: 'mps' asked for, but torch sees no MPS device")
    return torch.device(name)


class BatchStream:
    """An endless stream of batches from a resumable loader (``state_dict``/``load_state_dict``),
    starting a new epoch whenever one ends."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self._it: Iterator[Any] | None = None

    def __next__(self) -> Any:
        for _ in range(2):
            if self._it is None:
                # A loader iterator draws its base seed from the global torch RNG; keep that draw
                # out of the training stream so a resumed run sees the same random numbers.
                with torch.random.fork_rng(devices=[]):
                    self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                self._it = None
        raise RuntimeError("the training loader yields no batch; is the dataset empty?")

    def __iter__(self) -> BatchStream:
        return self

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
        self._it = None


def _slice_batch(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, Mapping) and not hasattr(batch, "batch_size"):
        return {k: v[start:stop] for k, v in batch.items()}
    return batch[start:stop]


def _batch_to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Mapping) and not hasattr(batch, "batch_size"):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return batch.to(device, non_blocking=True)


class _Log:
    """Append-only JSONL log (plus TensorBoard when importable), written by the main process."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled
        self.tb = None
        if enabled:
            try:  # tensorboard is optional and slow to import: only here
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(path.parent / "tensorboard"))
            except Exception:
                self.tb = None

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (written by a run killed after its last checkpoint)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):  # a line cut short by a killed process
                continue
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in kept))
        tmp.replace(self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "kind") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


@dataclass
class _Run:
    """The live objects of one run and where it stands (``step`` optimizer steps done)."""

    cfg: RecipeConfig
    components: Components
    out: Path
    info: DistInfo
    device: torch.device
    model: nn.Module
    train_model: nn.Module
    forward: Callable[[Tensor], Any]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    stream: BatchStream
    log: _Log
    per_rank: int
    step: int = 0
    last_ckpt: Path | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"


def _setup(components: Components, out: Path, info: DistInfo, device: torch.device) -> _Run:
    """Move the model, make the loader, optimizer and schedule, and wrap the forward."""
    cfg, t = components.cfg, components.cfg.train
    world = info.world_size
    per_rank, rem = divmod(cfg.data.batch_size, t.grad_accum * world)
    if rem or per_rank == 0:
        raise ValueError(
            f"data.batch_size ({cfg.data.batch_size}) must be a positive multiple of "
            f"train.grad_accum ({t.grad_accum}) x processes ({world})"
        )
    check_split_sizes(cfg, components.train_set, components.eval_set)
    model = components.model.to(device)
    check_step_memory(cfg, model, device, per_rank, tuple(cfg.data.crop_size or TRAIN_CROP_SIZE[cfg.data.dataset]))
    stream = BatchStream(make_train_loader(components, per_rank * world))
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)
    train_model: nn.Module = sync_batchnorm(model, t.sync_bn, world)
    if world > 1:
        train_model = DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    forward = torch.compile(train_model) if t.compile else train_model
    log = _Log(out / "metrics.jsonl", info.is_main)
    return _Run(cfg, components, out, info, device, model, train_model, forward, optimizer, scheduler, stream,
                log, per_rank)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Plain recipe data -> ``{"optim.lr": ..., "model.args.d_state": ...}`` (empty dicts kept)."""
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


def _resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in RESUMABLE_KEYS)


def _config_changes(saved: dict[str, Any], requested: dict[str, Any], where: Path) -> list[str]:
    """``key (old -> new)`` for each key that differs; raises ``ValueError`` listing those that a
    resume cannot change."""
    old, new = _flatten(saved), _flatten(requested)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    text = {k: f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in changed}
    refused = [text[k] for k in changed if not _resumable(k)]
    if refused:
        raise ValueError(
            f"--resume: {where} was trained with other settings that a resume cannot change: "
            f"{', '.join(refused)}; resume with the saved values, or choose another --out"
        )
    return [text[k] for k in changed]


def _restore(run: _Run, echo: Callable[[str], None]) -> None:
    """Load the newest intact checkpoint of ``run.out`` into the run (nothing when none): weights,
    optimizer, schedule, loader position and RNG states. Changes of :data:`RESUMABLE_KEYS` are
    applied; others are refused before anything is loaded."""
    last, skipped = ckpt.newest_intact_checkpoint(run.ckpt_root, repair=run.info.is_main)
    if run.info.is_main:
        for line in skipped:
            echo(f"skipped a damaged checkpoint: {line}")
    if last is None:
        if run.info.is_main:
            echo(f"no {'intact ' if skipped else ''}checkpoint under {run.ckpt_root}; starting from step 0")
        return
    saved, _ = ckpt.read_checkpoint_config(last)
    changes = _config_changes(saved, config_to_dict(run.cfg), run.out)
    state = ckpt.load_train_state(last)
    rng = state["rng"]
    if isinstance(rng, list) and len(rng) != run.info.world_size:
        raise ValueError(
            f"{last} was written by {len(rng)} processes; resume it with the same number "
            f"(this run has {run.info.world_size})"
        )
    # The requested recipe's optimizer and schedule settings, to apply over the restored state.
    groups = [{k: v for k, v in g.items() if k != "params"} for g in run.optimizer.param_groups]
    lambdas = [dict(vars(f)) for f in run.scheduler.lr_lambdas]
    base_lrs = list(run.scheduler.base_lrs)
    ckpt.load_model_weights(run.model, last)  # verifies the checksum and that every weight is finite
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    sched = run.scheduler
    for fn, fresh_fn in zip(sched.lr_lambdas, lambdas):  # LambdaLR restored the saved lambdas' fields
        vars(fn).update(fresh_fn)
    for group, fresh, fn, base in zip(run.optimizer.param_groups, groups, sched.lr_lambdas, base_lrs):
        group.update(fresh)
        group["lr"] = base * fn(sched.last_epoch)  # what LambdaLR computes at this step
    sched.base_lrs = base_lrs
    sched._last_lr = [g["lr"] for g in run.optimizer.param_groups]
    run.stream.load_state_dict(state["loader"])
    ckpt.set_rng_state(rng[run.info.rank] if isinstance(rng, list) else rng)
    run.step, run.last_ckpt = int(state["step"]), last
    if run.info.is_main:
        applied = f"; applied {', '.join(changes)}" if changes else ""
        newest = "the newest intact checkpoint " if skipped else ""
        echo(f"resumed from {newest}{last} at step {run.step}{applied}")


def _first_nonfinite(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> str | None:
    """Name of the first parameter, buffer or optimizer state holding NaN/inf, or None."""
    named: list[tuple[str, Tensor]] = [
        (f"parameter {n!r}", p) for n, p in model.named_parameters()
    ] + [(f"buffer {n!r}", b) for n, b in model.named_buffers()]
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        for p, st in optimizer.state.items():
            for k, v in st.items():
                named.append((f"optimizer state {k!r} of {names.get(id(p), 'a parameter')!r}", v))
    named = [(n, t) for n, t in named if isinstance(t, Tensor) and t.is_floating_point() and t.numel()]
    if not named:
        return None
    finite = torch.stack([torch.isfinite(t).all() for _, t in named]).cpu()
    if bool(finite.all()):
        return None
    return named[int((~finite).nonzero()[0])][0]


def _check_finite(per_task: dict[str, Tensor], step: int, device: torch.device) -> None:
    """Raise :class:`NonFiniteLossError` on every process when any task's loss is NaN/inf anywhere."""
    names = list(per_task)
    bad = torch.stack([(~torch.isfinite(per_task[t].detach().float())).float() for t in names])
    bad = all_reduce_sum(bad.to(device))
    if bool(bad.any()):
        task = names[int(torch.nonzero(bad)[0])]
        raise NonFiniteLossError(f"loss of task {task!r} is not finite at step {step}")


def _step(run: _Run) -> tuple[dict[str, Tensor], float]:
    """One optimizer step over ``train.grad_accum`` micro-batches; returns the mean losses
    (``loss`` and each task's) and the learning rate the step used."""
    t, info = run.cfg.train, run.info
    autocast = (
        torch.autocast(run.device.type, dtype=torch.bfloat16) if t.precision == "bf16" else contextlib.nullcontext()
    )
    run.optimizer.zero_grad(set_to_none=True)
    sums: dict[str, Tensor] = {}
    for micro in range(t.grad_accum):
        batch = next(run.stream)
        if info.world_size > 1:
            batch = _slice_batch(batch, info.rank * run.per_rank, (info.rank + 1) * run.per_rank)
        batch = _batch_to(batch, run.device)
        sync = micro == t.grad_accum - 1 or info.world_size == 1
        with contextlib.nullcontext() if sync else run.train_model.no_sync():
            with autocast:
                preds = run.forward(batch["image"])
            if t.precision != "fp32":  # losses in fp32
                preds = {k: v.float() for k, v in preds.items()}
            total, per_task = run.components.loss_fn(preds, batch)
            aux = _aux_losses(run.model)
            if aux:
                total = total + _weigh_aux(run.cfg, aux)
            (total / t.grad_accum).backward()
        for k, v in {"loss": total, **per_task, **{f"aux/{n}": a for n, a in aux.items()}}.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float() / t.grad_accum
    _check_finite({k: v for k, v in sums.items() if k != "loss"} or sums, run.step + 1, run.device)
    if t.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), t.grad_clip)
    lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.scheduler.step()
    run.step += 1
    return sums, lr


def sync_batchnorm(model: nn.Module, enabled: bool, world_size: int) -> nn.Module:
    """``model`` with every batch norm turned into ``SyncBatchNorm`` when ``enabled`` in a run of
    ``world_size`` > 1 processes (``train.sync_bn``), else ``model`` itself. The conversion keeps
    the parameter and buffer tensors (so an optimizer built before stays valid) and the state-dict
    keys."""
    if not enabled or world_size <= 1:
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def _aux_losses(model: nn.Module) -> dict[str, Tensor]:
    """The model's auxiliary losses of the last forward (``MultiTaskModel.aux_losses``), if any."""
    fn = getattr(model, "aux_losses", None)
    return dict(fn()) if fn is not None else {}


def _weigh_aux(cfg: RecipeConfig, aux: Mapping[str, Tensor]) -> Tensor:
    """``sum_name weight_name * aux_name`` with the recipe's weights (``loss.load_balancing``)."""
    weights = {"load_balancing": cfg.loss.load_balancing}
    unknown = sorted(set(aux) - set(weights))
    if unknown:
        raise ValueError(f"the model returns auxiliary losses {unknown} that no recipe key weighs")
    return torch.stack([weights[n] * v.float() for n, v in aux.items()]).sum()


def _gather_rng(info: DistInfo) -> Any:
    """RNG states of every process (a list indexed by rank in a DDP run)."""
    state = ckpt.rng_state()
    if info.world_size == 1:
        return state
    states: list[Any] = [None] * info.world_size
    dist.all_gather_object(states, state)
    return states


def _checkpoint(run: _Run) -> Path:
    """Write checkpoint ``run.step`` (the main process writes; every process waits for it), after
    checking that every parameter, buffer and optimizer state is finite."""
    bad = _first_nonfinite(run.model, run.optimizer)
    if bad is not None:
        raise NonFiniteWeightsError(f"{bad} is not finite after step {run.step}; its checkpoint was not written")
    state = {
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "loader": run.stream.state_dict(),
        "rng": _gather_rng(run.info),
    }
    path = run.ckpt_root / f"step_{run.step:08d}"
    if run.info.is_main:
        path = ckpt.save_checkpoint(
            run.ckpt_root, run.step, run.model, state, config_to_dict(run.cfg), keep=run.cfg.train.keep_ckpts
        )
    barrier()
    run.last_ckpt = path
    return path


def _evaluate(run: _Run) -> dict[str, Any] | None:
    """Evaluate on the main process (others wait) without touching the training random streams;
    returns the flat log record (None on the other processes)."""
    record = None
    if run.info.is_main:
        rng = ckpt.rng_state()
        result = evaluate_recipe(
            run.cfg, run.model, run.components.eval_set, device=run.device, baselines=False,
            make_loader=run.components.make_loader,
        )
        ckpt.set_rng_state(rng)
        record = {"kind": "eval", "step": run.step, **result.flat()}
    barrier()
    run.model.train()
    return record


def _due(every: int, step: int) -> bool:
    return bool(every) and step % every == 0


def train(
    components: Components,
    out_dir: str | Path,
    *,
    resume: bool = False,
    echo: Callable[[str], None] = print,
) -> TrainResult:
    """Train ``components`` (built from ``components.cfg``) into ``out_dir`` (config, JSONL log,
    checkpoints) and return the result. The run holds the folder's lock
    (:func:`~mtssm.engine.lock.lock_run_folder`) throughout.

    Raises :class:`NonFiniteError` when a loss or a weight is NaN/inf (no checkpoint of that
    state is written), :class:`FileExistsError` when ``out_dir`` already holds checkpoints and
    ``resume`` is False, and ``ValueError`` when a resume changes settings it cannot apply.
    """
    cfg = components.cfg
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    info = init_distributed(t.device)
    device = pick_device(t.device, info)
    out = Path(out_dir)
    with lock_run_folder(out) if info.is_main else contextlib.nullcontext():
        if not resume and ckpt.has_checkpoints(out / "checkpoints"):
            raise FileExistsError(
                f"{out} already holds checkpoints; pass --resume to continue that run, or choose another --out"
            )
        run = _setup(components, out, info, device)
        if resume:
            _restore(run, echo)
        if info.is_main:  # only now that the run is known to start
            out.mkdir(parents=True, exist_ok=True)
            tmp = out / ".config.yaml.tmp"
            tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
            tmp.replace(out / "config.yaml")
        run.log.truncate_after(run.step)  # drop records past the checkpoint (all of them on a fresh start)
        _loop(run)
    return TrainResult(out, run.step, run.last_ckpt, run.model, components, run.history)


def _loop(run: _Run) -> None:
    """Steps until ``train.steps``, logging, checkpointing and evaluating as the recipe says."""
    t, info = run.cfg.train, run.info
    bar = tqdm(total=t.steps, initial=run.step, disable=not (t.progress and info.is_main), desc=run.cfg.name,
               dynamic_ncols=True)
    run.model.train()
    tic = time.perf_counter()
    try:
        while run.step < t.steps:
            losses, lr = _step(run)
            step, loss = run.step, float(losses["loss"])
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)
            if _due(t.log_every, step) or (t.log_every and step == t.steps):
                record = {"kind": "train", "step": step, "lr": lr, "time_s": time.perf_counter() - tic}
                record.update({k if k == "loss" or "/" in k else f"loss/{k}": float(v) for k, v in losses.items()})
                run.log.write(record)
            if _due(t.ckpt_every, step) or step == t.steps:
                _checkpoint(run)
            if _due(t.eval_every, step) and step < t.steps and run.components.eval_set is not None:
                record = _evaluate(run)
                if record is not None:
                    run.log.write(record)
                    run.history.append(record)
    except NonFiniteError as exc:
        where = (
            f"; training stopped; last checkpoint (finite weights): {run.last_ckpt}" if run.last_ckpt
            else "; training stopped; no earlier checkpoint exists"
        )
        raise type(exc)(f"{exc}{where}") from None
    finally:
        bar.close()
        run.log.close()

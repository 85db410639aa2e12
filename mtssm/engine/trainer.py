"""The one training loop every recipe runs.

``train(cfg, out_dir)`` builds the model, data and losses a recipe names (or takes them ready-made
as :class:`Components`), then runs ``cfg.train.steps`` optimizer steps. Each step consumes
``data.batch_size`` images (global batch) in ``train.grad_accum`` micro-batches, split evenly over
the processes of a ``torchrun`` job: every process draws the same global batch from an identically
seeded loader and keeps its own slice, so a DDP run computes what one process computes with the
same global batch (up to floating-point summation order).

Resuming (``resume=True``) restores weights, optimizer, scheduler, loader position and RNG states
from the newest complete checkpoint, so a run killed at any step and resumed ends with the same
weights as an uninterrupted run with the same seed.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from torch.utils.data import Dataset

from mtssm.engine import checkpoint as ckpt
from mtssm.engine.config import RecipeConfig, config_to_dict
from mtssm.engine.distributed import DistInfo, all_reduce_sum, barrier, init_distributed

__all__ = [
    "BatchStream",
    "Components",
    "NonFiniteLossError",
    "PolyWarmup",
    "TrainResult",
    "build_optimizer",
    "param_groups",
    "pick_device",
    "sync_batchnorm",
    "seed_everything",
    "train",
]

LossFn = Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], tuple[Tensor, dict[str, Tensor]]]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; names the task and the step."""


@dataclass
class Components:
    """What a run trains: the model (images (B, 3, H, W) -> {task: (B, C_t, H, W)}), the datasets,
    the loss (predictions, batch) -> (total, {task: weighted loss}) and the task names."""

    model: nn.Module
    train_set: Dataset
    eval_set: Dataset | None
    loss_fn: LossFn
    tasks: list[str]
    make_loader: Callable[..., Any] | None = None


@dataclass
class TrainResult:
    """Where a finished run left things."""

    out_dir: Path
    step: int
    checkpoint: Path | None
    model: nn.Module
    components: Components
    history: list[dict[str, Any]] = field(default_factory=list)


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


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str, info: DistInfo) -> torch.device:
    """``auto`` -> this process's CUDA device when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device: 'cuda' asked for, but torch sees no CUDA device")
        return torch.device("cuda", info.local_rank)
    return torch.device(name)


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


def build_scheduler(cfg: RecipeConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """Poly (or constant) schedule with linear warm-up, stepped once per optimizer step."""
    s = cfg.schedule
    power = s.power if s.name == "poly" else 0.0
    fn = PolyWarmup(cfg.train.steps, power, s.warmup_steps, s.warmup_start)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


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


def _default_make_loader(dataset: Dataset, batch_size: int, *, train: bool, num_workers: int, seed: int) -> Any:
    from mtssm.data import make_dataloader

    return make_dataloader(dataset, batch_size, train=train, num_workers=num_workers, seed=seed)


class _Log:
    """Append-only JSONL log (plus TensorBoard when importable), written by the main process."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(path.parent / "tensorboard"))
            except Exception:  # tensorboard is optional
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


def _check_finite(per_task: dict[str, Tensor], step: int, device: torch.device) -> None:
    """Raise :class:`NonFiniteLossError` on every process when any task's loss is NaN/inf anywhere."""
    names = list(per_task)
    bad = torch.stack([(~torch.isfinite(per_task[t].detach().float())).float() for t in names])
    bad = all_reduce_sum(bad.to(device))
    if bool(bad.any()):
        task = names[int(torch.nonzero(bad)[0])]
        raise NonFiniteLossError(f"loss of task {task!r} is not finite at step {step}; training stopped")


def train(
    cfg: RecipeConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    components: Components | None = None,
    data_root: str | Path | None = None,
    echo: Callable[[str], None] = print,
) -> TrainResult:
    """Run recipe ``cfg`` into ``out_dir`` (config, JSONL log, checkpoints) and return the result.

    ``components`` replaces what the recipe would build (the model must be freshly seeded with
    ``cfg.train.seed`` for exact resumes); ``data_root`` overrides ``cfg.data.root``.
    Raises :class:`NonFiniteLossError` when a loss is NaN/inf (the last good checkpoint stays), and
    :class:`FileExistsError` when ``out_dir`` already holds checkpoints and ``resume`` is False.
    """
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    info = init_distributed(t.device)
    device = pick_device(t.device, info)
    out = Path(out_dir)
    ckpt_root = out / "checkpoints"
    if not resume and ckpt.has_checkpoints(ckpt_root):
        raise FileExistsError(
            f"{out} already holds checkpoints; pass --resume to continue that run, or choose another --out"
        )
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

    seed_everything(t.seed)
    if components is None:
        from mtssm.engine.build import build_components

        components = build_components(cfg, data_root, echo=echo if info.is_main else (lambda _: None))
    model = components.model.to(device)
    world = info.world_size
    per_rank, rem = divmod(cfg.data.batch_size, t.grad_accum * world)
    if rem or per_rank == 0:
        raise ValueError(
            f"data.batch_size ({cfg.data.batch_size}) must be a positive multiple of "
            f"train.grad_accum ({t.grad_accum}) x processes ({world})"
        )
    make_loader = components.make_loader or _default_make_loader
    loader = make_loader(
        components.train_set, per_rank * world, train=True, num_workers=cfg.data.num_workers, seed=t.seed
    )
    stream = BatchStream(loader)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)
    log = _Log(out / "metrics.jsonl", info.is_main)
    config_dict = config_to_dict(cfg)

    step = 0
    last_ckpt: Path | None = None
    if resume:
        last_ckpt, skipped = ckpt.newest_intact_checkpoint(ckpt_root, repair=info.is_main)
        if info.is_main:
            for line in skipped:
                echo(f"skipped a damaged checkpoint: {line}")
        if last_ckpt is None:
            if info.is_main:
                echo(f"no {'intact ' if skipped else ''}checkpoint under {ckpt_root}; starting from step 0")
        else:
            ckpt.load_model_weights(model, last_ckpt)
            state = ckpt.load_train_state(last_ckpt)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            stream.load_state_dict(state["loader"])
            rng = state["rng"]
            if isinstance(rng, list) and len(rng) != world:
                raise ValueError(
                    f"{last_ckpt} was written by {len(rng)} processes; resume it with the same number "
                    f"(this run has {world})"
                )
            ckpt.set_rng_state(rng[info.rank] if isinstance(rng, list) else rng)
            step = int(state["step"])
            if info.is_main:
                newest = "the newest intact checkpoint " if skipped else ""
                echo(f"resumed from {newest}{last_ckpt} at step {step}")
    log.truncate_after(step)  # drop records past the checkpoint (all of them on a fresh start)

    train_model: nn.Module = sync_batchnorm(model, t.sync_bn, world)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    forward = torch.compile(train_model) if t.compile else train_model
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if t.precision == "bf16" else contextlib.nullcontext()
    )

    def save(at: int) -> Path:
        state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "loader": stream.state_dict(),
            "rng": _gather_rng(info),
        }
        path = None
        if info.is_main:
            path = ckpt.save_checkpoint(ckpt_root, at, model, state, config_dict, keep=t.keep_ckpts)
        barrier()
        return path if path is not None else ckpt_root / f"step_{at:08d}"

    from tqdm.auto import tqdm

    bar = tqdm(
        total=t.steps, initial=step, disable=not (t.progress and info.is_main), desc=cfg.name, dynamic_ncols=True
    )
    history: list[dict[str, Any]] = []
    model.train()
    tic = time.perf_counter()
    try:
        while step < t.steps:
            optimizer.zero_grad(set_to_none=True)
            sums: dict[str, Tensor] = {}
            for micro in range(t.grad_accum):
                batch = next(stream)
                if world > 1:
                    batch = _slice_batch(batch, info.rank * per_rank, (info.rank + 1) * per_rank)
                batch = _batch_to(batch, device)
                sync = micro == t.grad_accum - 1 or world == 1
                with contextlib.nullcontext() if sync else train_model.no_sync():
                    with autocast:
                        preds = forward(batch["image"])
                    if t.precision != "fp32":  # losses in fp32
                        preds = {k: v.float() for k, v in preds.items()}
                    total, per_task = components.loss_fn(preds, batch)
                    aux = _aux_losses(model)
                    if aux:
                        total = total + _weigh_aux(cfg, aux)
                    (total / t.grad_accum).backward()
                for k, v in {"loss": total, **per_task, **{f"aux/{n}": a for n, a in aux.items()}}.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float() / t.grad_accum
            _check_finite({k: v for k, v in sums.items() if k != "loss"} or sums, step + 1, device)
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            step += 1
            loss = float(sums["loss"])
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)
            if t.log_every and (step % t.log_every == 0 or step == t.steps):
                record = {"kind": "train", "step": step, "lr": lr, "time_s": time.perf_counter() - tic}
                record.update({k if k == "loss" or "/" in k else f"loss/{k}": float(v) for k, v in sums.items()})
                log.write(record)
            if (t.ckpt_every and step % t.ckpt_every == 0) or step == t.steps:
                last_ckpt = save(step)
            if t.eval_every and step % t.eval_every == 0 and step < t.steps and components.eval_set is not None:
                record = _periodic_eval(cfg, model, components, device, info, step)
                if record is not None:
                    log.write(record)
                    history.append(record)
                model.train()
    except NonFiniteLossError as exc:
        where = f"; last good checkpoint: {last_ckpt}" if last_ckpt else "; no checkpoint was written yet"
        raise NonFiniteLossError(f"{exc}{where}") from None
    finally:
        bar.close()
        log.close()
    return TrainResult(out, step, last_ckpt, model, components, history)


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
    import torch.distributed as dist

    states: list[Any] = [None] * info.world_size
    dist.all_gather_object(states, state)
    return states


def _periodic_eval(
    cfg: RecipeConfig, model: nn.Module, comps: Components, device: torch.device, info: DistInfo, step: int
) -> dict[str, Any] | None:
    """Evaluate on the main process (others wait) and return a flat log record."""
    record = None
    if info.is_main:
        from mtssm.engine.evaluate import evaluate

        rng = ckpt.rng_state()  # evaluation must not shift the training random streams
        result = evaluate(
            model,
            comps.eval_set,
            tasks=comps.tasks,
            dataset_name=cfg.data.dataset,
            batch_size=cfg.data.eval_batch_size,
            device=device,
            precision=cfg.train.precision,
            max_batches=cfg.eval.max_batches,
            baselines=False,
            edge_thresholds=cfg.eval.edge_thresholds,
            make_loader=comps.make_loader,
        )
        ckpt.set_rng_state(rng)
        record = {"kind": "eval", "step": step, **result.flat()}
    barrier()
    return record

"""Sanity bounds checked before a run spends time: sizes against the data and the model, and the
memory a training step needs against the memory the device has.

Each check raises a one-line ``ValueError`` naming the recipe keys at fault.

The step memory is measured, not guessed: a dry forward of the real model at two small sizes
counts the bytes autograd keeps for the backward (the activations), a straight line through the
two points extrapolates them to the run's crop and micro-batch, and the weights, gradients and
optimizer states are added. Memory that grows faster than the pixel count (global attention
computed without a memory-efficient kernel) is underestimated, so the bound never refuses a run
that fits; it stops the ones that cannot (``data.crop_size=[4000, 4000]``) in a second instead of
taking the machine into the out-of-memory killer.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sized
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtssm.engine.config import ConfigError, RecipeConfig

__all__ = [
    "available_memory",
    "check_crop_size",
    "check_split_sizes",
    "check_step_memory",
    "format_bytes",
    "step_memory",
]

_GIB = 2**30
_PROBES = (64, 128)  # square probe sides (multiples of every encoder's stride) of the dry forwards


def format_bytes(n: float) -> str:
    """``n`` bytes in GiB (or MiB below one GiB)."""
    return f"{n / _GIB:.1f} GiB" if n >= _GIB else f"{n / 2**20:.0f} MiB"


def check_crop_size(cfg: RecipeConfig, model: nn.Module) -> None:
    """``data.crop_size`` must be at least the coarsest stride of the model's encoder in both
    dimensions (the deepest feature map needs one pixel); ``model`` may live on the meta device."""
    strides = getattr(getattr(model, "encoder", None), "strides", None)
    if not cfg.data.crop_size or not strides:
        return
    need = max(strides)
    if min(cfg.data.crop_size) < need:
        raise ConfigError(
            f"data.crop_size: {cfg.data.crop_size} is smaller than the encoder's stride {need}; "
            f"use a crop of at least [{need}, {need}]"
        )


def _describe(dataset: Any, key: str, split: str) -> str:
    root = getattr(dataset, "root", None)
    where = f" at {root}" if isinstance(root, (str, Path)) else ""
    return f"{key} {split!r}{where}"


def check_split_sizes(cfg: RecipeConfig, train_set: Any, eval_set: Any | None) -> None:
    """The training split must hold at least one global batch, the evaluation split one sample."""
    d = cfg.data
    if isinstance(train_set, Sized):
        n = len(train_set)
        where = _describe(train_set, "data.train_split", d.train_split)
        if n == 0:
            raise ValueError(f"{where} holds no samples")
        if n < d.batch_size:
            raise ValueError(
                f"data.batch_size: {d.batch_size} is larger than {where} ({n} samples); a training "
                f"step needs one full batch"
            )
    if isinstance(eval_set, Sized) and len(eval_set) == 0:
        raise ValueError(f"{_describe(eval_set, 'data.eval_split', d.eval_split)} holds no samples")


def _saved_bytes(model: nn.Module, side: int, batch: int, device: torch.device, precision: str) -> int:
    """Bytes autograd keeps for the backward of one forward of ``batch`` images ``side`` x ``side``
    (parameters not counted), measured with saved-tensor hooks."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and t.device.type != "meta":
            seen[ptr] = storage.nbytes()
        return t

    x = torch.zeros(batch, 3, side, side, device=device)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    )
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        out = model(x)
    del out
    return sum(seen.values())


def step_memory(
    model: nn.Module, size: tuple[int, int], batch: int, device: torch.device, precision: str = "fp32",
    optimizer_states: int = 2,
) -> tuple[int, int]:
    """``(activations, weights)`` in bytes of one training step of ``batch`` images of ``size``
    (H, W): activations extrapolated from dry forwards at :data:`_PROBES`; weights counts the
    trainable parameters, their gradients and ``optimizer_states`` states per parameter. The
    model's mode and every random stream are left as they were."""
    was_training = model.training
    model.eval()  # no running-statistics updates; autograd still saves what the backward needs
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            small, large = (_saved_bytes(model, s, 1, device, precision) for s in _PROBES)
    finally:
        model.train(was_training)
    p0, p1 = _PROBES[0] ** 2, _PROBES[1] ** 2
    per_pixel = max(0.0, (large - small) / (p1 - p0))
    pixels = size[0] * size[1]
    activations = int(batch * max(small, small + per_pixel * (pixels - p0)))
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return activations, weights * (2 + optimizer_states)


def available_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` for this process: free CUDA memory, or on the CPU the smaller of
    ``MemAvailable`` and the cgroup's limit less its use. None when it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    found: list[int] = []
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            found.append(int(limit) - used)
    return min(found) if found else None


def check_step_memory(cfg: RecipeConfig, model: nn.Module, device: torch.device, micro_batch: int,
                      size: tuple[int, int]) -> None:
    """Refuse a run whose training step needs more memory than ``device`` has free.

    ``micro_batch`` images of ``size`` (H, W) go through the model at once on this process.
    ``MTSSM_SKIP_MEMORY_CHECK=1`` skips the check.
    """
    if os.environ.get("MTSSM_SKIP_MEMORY_CHECK") == "1":
        return
    free = available_memory(device)
    if free is None:
        return
    states = 1 if cfg.optim.name == "sgd" else 2
    activations, weights = step_memory(model, size, micro_batch, device, cfg.train.precision, states)
    if device.type == "cuda":  # the parameters are already in the device's used memory
        weights -= sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    if activations + weights > free:
        raise ValueError(
            f"data.crop_size {list(size)} x {micro_batch} images a micro-step (data.batch_size "
            f"{cfg.data.batch_size} / train.grad_accum {cfg.train.grad_accum}): a training step needs about "
            f"{format_bytes(activations + weights)} ({format_bytes(activations)} activations, "
            f"{format_bytes(weights)} weights, gradients and optimizer state) but {device.type} has "
            f"{format_bytes(free)} free; lower data.crop_size or data.batch_size, or raise train.grad_accum"
        )

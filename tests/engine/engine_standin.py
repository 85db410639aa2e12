"""A stand-in model and dataset for engine tests: tiny, deterministic, fast on 2 CPU cores.

Used by the tests in this folder and by the worker scripts they start in subprocesses.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from mtssm.engine.build import Components, seed_everything
from mtssm.engine.config import RecipeConfig, config_from_dict
from mtssm.losses import build_task_losses

TASKS = ["semseg", "depth"]
H, W = 8, 12
CLASSES = 40  # NYUD semseg classes, so the real evaluator and losses apply


class StandInModel(nn.Module):
    """images (B, 3, H, W) -> {semseg: (B, 40, H, W), depth: (B, 1, H, W)}; optional per-call sleep.

    ``dropout`` > 0 makes the random stream matter (resume tests); DDP equality needs 0, since each
    process draws the masks of its own slice of the batch.
    """

    def __init__(self, dtype: torch.dtype = torch.float32, sleep: float = 0.0, dropout: float = 0.1) -> None:
        super().__init__()
        self.tasks = tuple(TASKS)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, dtype=dtype), nn.GELU(),
                                  nn.Dropout(dropout), nn.Conv2d(8, 8, 3, padding=1, dtype=dtype), nn.GELU())
        self.heads = nn.ModuleDict({"semseg": nn.Conv2d(8, CLASSES, 1, dtype=dtype),
                                    "depth": nn.Conv2d(8, 1, 1, dtype=dtype)})
        self.sleep = sleep

    def forward(self, images: Tensor) -> TensorDict:
        if self.sleep:
            time.sleep(self.sleep)
        f = self.body(images.to(self.heads["depth"].weight.dtype))
        return TensorDict({t: h(f) for t, h in self.heads.items()}, batch_size=[images.shape[0]])


class StandInDataset(torch.utils.data.Dataset):
    """``n`` samples; each is a pure function of its index (labels all valid), noise of its seed."""

    def __init__(self, n: int = 24) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        i, seed = index if isinstance(index, tuple) else (index, 0)
        g = torch.Generator().manual_seed(1000 + i)
        image = torch.randn(3, H, W, generator=g)
        semseg = (image[0] > 0).long() * 3 + (image[1] > 0).long()  # 4 classes in use
        depth = 1.0 + image[2:3].abs()
        image = image + 0.01 * torch.randn(3, H, W, generator=torch.Generator().manual_seed(seed % 2**31))
        return {"image": image, "semseg": semseg, "depth": depth, "meta": {"id": str(i), "size": (H, W)}}


def make_config(**train: Any) -> RecipeConfig:
    """A validated recipe for the stand-in (compile off, no progress bar)."""
    t = {"steps": 8, "compile": False, "progress": False, "log_every": 1, "ckpt_every": 2, "seed": 0}
    t.update(train)
    return config_from_dict({
        "name": "standin",
        "model": {"name": "standin"},
        "data": {"dataset": "nyud", "tasks": TASKS, "batch_size": 4, "eval_batch_size": 4, "num_workers": 0},
        "optim": {"name": "adamw", "lr": 1e-2},
        "schedule": {"name": "poly", "warmup_steps": 2},
        "train": t,
        "eval": {"predict_samples": 0},
    })


def make_components(cfg: RecipeConfig, dtype: torch.dtype = torch.float32, sleep: float = 0.0,
                    n: int = 24, dropout: float = 0.1) -> Components:
    """Stand-in components, the model initialised right after seeding (as build_components does)."""
    seed_everything(cfg.train.seed)
    model = StandInModel(dtype, sleep, dropout)
    return Components(cfg=cfg, model=model, train_set=StandInDataset(n), eval_set=StandInDataset(8),
                      loss_fn=build_task_losses(TASKS), tasks=list(TASKS))

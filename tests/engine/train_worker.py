"""Train the stand-in in its own process (for the SIGKILL-resume and torchrun/DDP tests).

Usage: python train_worker.py OUT [--resume] [--sleep S] [--float64] [--dropout P] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import engine_standin as standin  # noqa: E402
from mtssm.engine.config import apply_overrides, config_from_dict, config_to_dict  # noqa: E402
from mtssm.engine.trainer import train  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--float64", action="store_true")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    a = p.parse_args()
    torch.set_num_threads(1)
    cfg = config_from_dict(apply_overrides(config_to_dict(standin.make_config()), a.overrides))
    dtype = torch.float64 if a.float64 else torch.float32
    comps = standin.make_components(cfg, dtype=dtype, sleep=a.sleep, dropout=a.dropout)
    train(comps, a.out, resume=a.resume)


if __name__ == "__main__":
    main()

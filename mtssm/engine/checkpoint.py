"""Checkpoints: the model in safetensors plus a small state file, written atomically.

Layout of a run directory::

    RUN/config.yaml                      the resolved recipe
    RUN/metrics.jsonl                    training and evaluation records, one JSON object a line
    RUN/checkpoints/step_00000100/       one checkpoint
        model.safetensors                weights; metadata holds the recipe (JSON), the step and the
                                         model's input normalisation (JSON)
        state.pt                         optimizer, scheduler, data-loader position, RNG states, step
    RUN/checkpoints/latest               the name of the newest complete checkpoint

A checkpoint is written into a hidden temporary folder, flushed to disk, and renamed into place;
only then is ``latest`` replaced (again temp file + :func:`os.replace`). A process killed at any
moment leaves ``latest`` naming a complete checkpoint; unfinished temporary folders are ignored
and removed by the next save.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import nn

from mtssm.nn.pretrained import NORMALIZATION_KEY, normalization_metadata, recorded_normalization

__all__ = [
    "MODEL_FILE",
    "STATE_FILE",
    "latest_checkpoint",
    "load_model_weights",
    "load_train_state",
    "read_checkpoint_config",
    "resolve_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
LATEST = "latest"
_PREFIX = "step_"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def rng_state() -> dict[str, Any]:
    """The Python, NumPy and torch (CPU and CUDA) random states, as tensors and plain data."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(
    root: str | Path,
    step: int,
    model: nn.Module,
    state: dict[str, Any],
    config: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically, point ``latest`` at it, prune old ones.

    ``model`` is the plain module (not the DDP or compiled wrapper); ``state`` is the training state
    (optimizer, scheduler, loader, RNG) saved with :func:`torch.save`; ``config`` the resolved recipe.
    Keeps the newest ``keep`` checkpoints. Returns the checkpoint folder.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"{_PREFIX}{step:08d}"
    final = root / name
    tmp = root / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        metadata = {"mtssm_config": json.dumps(config), "step": str(step)}
        stats = getattr(model, "input_normalization", None)
        if stats is not None:
            metadata[NORMALIZATION_KEY] = normalization_metadata(stats)
        safetensors.torch.save_file(_model_tensors(model), str(tmp / MODEL_FILE), metadata=metadata)
        torch.save({**state, "step": step}, tmp / STATE_FILE)
        for f in (MODEL_FILE, STATE_FILE):
            _fsync_file(tmp / f)
        _fsync_dir(tmp)
        if final.exists():  # left over by an interrupted run that got past this step; not `latest`
            trash = root / f".{name}.old-{os.getpid()}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_text_atomic(root / LATEST, name + "\n")
    _prune(root, keep, current=name)
    return final


def _prune(root: Path, keep: int, current: str) -> None:
    steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX))
    for old in steps[: max(0, len(steps) - keep)]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.iterdir():  # temporary folders and files of killed writers
        if stale.name.startswith(".") and (".tmp-" in stale.name or ".old-" in stale.name):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The folder ``latest`` names under ``root``, or ``None`` when no checkpoint was completed."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    return path if (path / MODEL_FILE).is_file() and (path / STATE_FILE).is_file() else None


def resolve_checkpoint(path: str | Path) -> Path:
    """Find the checkpoint folder from a run folder, its ``checkpoints`` folder, a checkpoint
    folder, or a ``model.safetensors`` file."""
    p = Path(path)
    if p.is_file() and p.name.endswith(".safetensors"):
        return p.parent
    for candidate in (p, p / "checkpoints"):
        if (candidate / MODEL_FILE).is_file():
            return candidate
        latest = latest_checkpoint(candidate)
        if latest is not None:
            return latest
    raise FileNotFoundError(
        f"no checkpoint at {str(p)!r}: expected a run folder, a checkpoint folder holding "
        f"{MODEL_FILE}, or a {MODEL_FILE} file"
    )


def read_checkpoint_config(ckpt: str | Path) -> tuple[dict[str, Any], int]:
    """The resolved recipe (plain data) and the step stored in a checkpoint's weights file."""
    path = resolve_checkpoint(ckpt) / MODEL_FILE
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "mtssm_config" not in meta:
        raise ValueError(f"{path} holds no mtssm recipe in its metadata; was it written by mtssm?")
    return json.loads(meta["mtssm_config"]), int(meta.get("step", 0))


def load_model_weights(model: nn.Module, ckpt: str | Path, strict: bool = True) -> None:
    """Load a checkpoint's weights into ``model`` in place, with the input normalisation it records."""
    path = resolve_checkpoint(ckpt) / MODEL_FILE
    tensors = safetensors.torch.load_file(str(path), device="cpu")
    model.load_state_dict(tensors, strict=strict)
    stats = recorded_normalization(path)
    if stats is not None and hasattr(model, "set_input_normalization"):
        model.set_input_normalization(*stats)


def load_train_state(ckpt: str | Path) -> dict[str, Any]:
    """The training state saved beside the weights (``step``, ``optimizer``, ``scheduler``, ...)."""
    path = resolve_checkpoint(ckpt) / STATE_FILE
    return torch.load(path, map_location="cpu", weights_only=True)

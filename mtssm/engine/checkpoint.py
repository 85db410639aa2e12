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
and removed by the next save, which removes only its own process's and those of processes that
no longer run (a run folder has one writer: see :mod:`mtssm.engine.lock`).

What the write protocol cannot prevent (a disk that later flips or loses bytes, a copy cut short,
a file edited by hand) the checksum catches: the weights file's metadata holds ``mtssm_checksum``,
the SHA-256 of ``state.pt``'s bytes and a SHA-256 over the weights file's content (every tensor's
name, dtype, shape and bytes, and the recipe and step in the metadata). Every load verifies it and
raises :class:`CheckpointError`, one line naming the file at fault; so does a checkpoint whose
weights are not all finite. Resuming takes :func:`newest_intact_checkpoint`: ``latest`` if it is
intact, else the newest older checkpoint that is, and says which it skipped and why. Checkpoints
written before checksums existed load without that verification.
"""

from __future__ import annotations

import hashlib
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
    "CheckpointError",
    "has_checkpoints",
    "latest_checkpoint",
    "load_model_weights",
    "load_train_state",
    "newest_intact_checkpoint",
    "read_checkpoint_config",
    "resolve_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "verify_checkpoint",
]

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
LATEST = "latest"
_PREFIX = "step_"
_CHECKSUM_KEY = "mtssm_checksum"


class CheckpointError(ValueError):
    """A checkpoint file is truncated, corrupt, or holds non-finite tensors.

    ``path`` is the file at fault and ``problem`` says what is wrong with it.
    """

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = " ".join(problem.split())
        super().__init__(f"checkpoint file {self.path}: {self.problem}")


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


def _content_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 over the metadata (sorted keys, the checksum itself left out) and every tensor's
    name, dtype, shape and bytes (sorted by name): what a weights file means, not how it is laid out."""
    h = hashlib.sha256()
    for key in sorted(k for k in metadata if k != _CHECKSUM_KEY):
        h.update(json.dumps([key, metadata[key]]).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _nonfinite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    return [
        name for name, t in tensors.items()
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all())
    ]


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
        torch.save({**state, "step": step}, tmp / STATE_FILE)
        tensors = _model_tensors(model)
        metadata = {"mtssm_config": json.dumps(config), "step": str(step)}
        stats = getattr(model, "input_normalization", None)
        if stats is not None:
            metadata[NORMALIZATION_KEY] = normalization_metadata(stats)
        metadata[_CHECKSUM_KEY] = json.dumps({
            "algorithm": "sha256",
            MODEL_FILE: _content_digest(tensors, metadata),
            STATE_FILE: _file_digest(tmp / STATE_FILE),
        })
        safetensors.torch.save_file(tensors, str(tmp / MODEL_FILE), metadata=metadata)
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
    # Folders past `current` (a run resumed from an older checkpoint) are replaced as it gets there.
    steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and p.name <= current)
    for old in steps[: max(0, len(steps) - keep)]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.iterdir():  # temporary folders and files of this process and of killed writers
        if stale.name.startswith(".") and (".tmp-" in stale.name or ".old-" in stale.name) and not _live_other(stale):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def _live_other(path: Path) -> bool:
    """Whether the temporary ``path`` (named ``....tmp-PID`` or ``....old-PID``) belongs to another
    process that is still alive: its writes must be left alone."""
    pid = path.name.rsplit("-", 1)[-1]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def latest_checkpoint(root: str | Path) -> Path | None:
    """The folder ``latest`` names under ``root``, or ``None`` when no checkpoint was completed."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):  # a damaged pointer names nothing
        return None
    path = Path(root) / name
    return path if name and (path / MODEL_FILE).is_file() and (path / STATE_FILE).is_file() else None


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
        if has_checkpoints(candidate):  # checkpoint folders, but `latest` is missing or damaged
            raise CheckpointError(
                candidate / LATEST, f"names no complete checkpoint; name one of the folders (newest: "
                f"{_step_folders(candidate)[0]}), or resume the run, which repairs it"
            )
    raise FileNotFoundError(
        f"no checkpoint at {str(p)!r}: expected a run folder, a checkpoint folder holding "
        f"{MODEL_FILE}, or a {MODEL_FILE} file"
    )


def _why(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:200]


def _read_metadata(path: Path) -> dict[str, str]:
    """The weights file's metadata (its header only)."""
    if not path.is_file():
        raise CheckpointError(path, "file is missing")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error type for a broken header
        raise CheckpointError(path, f"cannot be read; the file is truncated or corrupt ({_why(exc)})") from None


def _checksums(path: Path, meta: dict[str, str]) -> dict[str, str] | None:
    """The recorded digests, or ``None`` for a checkpoint written before checksums existed."""
    raw = meta.get(_CHECKSUM_KEY)
    if raw is None:
        return None
    try:
        sums = json.loads(raw)
        if sums["algorithm"] != "sha256" or not all(isinstance(sums[f], str) for f in (MODEL_FILE, STATE_FILE)):
            raise ValueError(sums["algorithm"])
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(path, f"its {_CHECKSUM_KEY} metadata is corrupt") from None
    return sums


def _read_weights(folder: Path, finite: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The verified tensors and metadata of ``folder``'s weights file."""
    path = folder / MODEL_FILE
    meta = _read_metadata(path)
    sums = _checksums(path, meta)
    try:
        tensors = safetensors.torch.load_file(str(path), device="cpu")
    except Exception as exc:
        raise CheckpointError(path, f"cannot be read; the file is truncated or corrupt ({_why(exc)})") from None
    if sums is not None and _content_digest(tensors, meta) != sums[MODEL_FILE]:
        raise CheckpointError(path, "checksum mismatch: its content changed after it was written (corrupt file)")
    if finite:
        bad = _nonfinite(tensors)
        if bad:
            raise CheckpointError(
                path, f"{len(bad)} of {len(tensors)} tensors hold NaN or infinite values (first: {bad[0]}); "
                "these weights are unusable, take an earlier checkpoint"
            )
    return tensors, meta


def _read_state(folder: Path, meta: dict[str, str]) -> dict[str, Any]:
    """The verified training state of ``folder`` (``meta``: its weights file's metadata)."""
    path = folder / STATE_FILE
    if not path.is_file():
        raise CheckpointError(path, "file is missing")
    sums = _checksums(folder / MODEL_FILE, meta)
    if sums is not None and _file_digest(path) != sums[STATE_FILE]:
        raise CheckpointError(path, "checksum mismatch: its bytes changed after it was written (corrupt file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(path, f"cannot be read; the file is truncated or corrupt ({_why(exc)})") from None


def _nonfinite_state(obj: Any, where: str = "") -> str | None:
    """The key path of the first floating-point tensor in nested ``obj`` holding NaN or inf."""
    if isinstance(obj, torch.Tensor):
        return where if _nonfinite({where: obj}) else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = _nonfinite_state(value, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


def verify_checkpoint(ckpt: str | Path) -> None:
    """Check that both files of checkpoint ``ckpt`` read back as written (checksums) and that every
    weight and optimizer state is finite; raises :class:`CheckpointError` naming the file."""
    _verify_folder(resolve_checkpoint(ckpt))


def _verify_folder(folder: Path) -> None:
    _, meta = _read_weights(folder, finite=True)
    state = _read_state(folder, meta)
    bad = _nonfinite_state(state.get("optimizer", {}))
    if bad is not None:
        raise CheckpointError(folder / STATE_FILE, f"optimizer state {bad} holds NaN or infinite values")


def _step_folders(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)), reverse=True)


def has_checkpoints(root: str | Path) -> bool:
    """Whether ``root`` holds any checkpoint folder, intact or not (what a fresh run must not
    overwrite, even where ``latest`` is missing or damaged)."""
    root = Path(root)
    return root.is_dir() and bool(_step_folders(root))


def newest_intact_checkpoint(root: str | Path, repair: bool = False) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from under ``root``, and one line per newer checkpoint it skipped.

    That is the one ``latest`` names when :func:`verify_checkpoint` passes, else the newest older
    one that passes (all of them, newest first, when ``latest`` is missing or names no folder).
    Folders newer than ``latest`` are never taken: they belong to a run killed before it named them.
    With ``repair``, ``latest`` is pointed (atomically) at the checkpoint found when anything was
    skipped, so that eval and predict on the run folder take it too. Returns ``(None, skipped)`` when
    no checkpoint is intact.
    """
    root = Path(root)
    if not root.is_dir():
        return None, []
    skipped: list[str] = []
    folders = _step_folders(root)
    pointer = root / LATEST
    if pointer.is_file():
        try:
            name = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        if (root / name).is_dir() and name.startswith(_PREFIX):
            folders = [p for p in folders if p.name <= name]
        else:
            skipped.append(f"{pointer}: names no checkpoint folder ({name[:40]!r})")
    for folder in folders:
        try:
            _verify_folder(folder)
        except CheckpointError as exc:
            skipped.append(str(exc))
            continue
        if repair and skipped:
            _write_text_atomic(pointer, folder.name + "\n")
        return folder, skipped
    return None, skipped


def read_checkpoint_config(ckpt: str | Path) -> tuple[dict[str, Any], int]:
    """The resolved recipe (plain data) and the step stored in a checkpoint's weights file."""
    path = resolve_checkpoint(ckpt) / MODEL_FILE
    meta = _read_metadata(path)
    if "mtssm_config" not in meta:
        raise ValueError(f"{path} holds no mtssm recipe in its metadata; was it written by mtssm?")
    try:
        return json.loads(meta["mtssm_config"]), int(meta.get("step", 0))
    except ValueError as exc:
        raise CheckpointError(path, f"its recipe metadata is corrupt ({_why(exc)})") from None


def load_model_weights(model: nn.Module, ckpt: str | Path, strict: bool = True) -> None:
    """Load a checkpoint's weights into ``model`` in place, after verifying them (checksum, and every
    tensor finite): a failure raises :class:`CheckpointError` naming the file. The input
    normalisation the checkpoint records becomes the model's."""
    folder = resolve_checkpoint(ckpt)
    tensors, _ = _read_weights(folder, finite=True)
    model.load_state_dict(tensors, strict=strict)
    stats = recorded_normalization(folder / MODEL_FILE)
    if stats is not None and hasattr(model, "set_input_normalization"):
        model.set_input_normalization(*stats)


def load_train_state(ckpt: str | Path) -> dict[str, Any]:
    """The training state saved beside the weights (``step``, ``optimizer``, ``scheduler``, ...),
    verified against the checksum in the weights file's metadata."""
    folder = resolve_checkpoint(ckpt)
    return _read_state(folder, _read_metadata(folder / MODEL_FILE))

"""Read a weights file into a flat ``{name: tensor}`` dict, recognising the container by its bytes.

Containers: a PyTorch file (zip archive or legacy pickle: ``.pth``, ``.pt``, ``.pth.tar``, ``.bin``,
read with ``torch.load(weights_only=True)``), a ``.safetensors`` file, and a NumPy ``.npz`` archive
(Google's ViT releases). The suffix is not trusted: ``mtmamba_nyud.pth.tar`` is a torch zip archive.
Every failure is one ``ValueError`` line naming the file (``FileNotFoundError`` for a missing one).
"""

from __future__ import annotations

import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mtssm.nn.weights.report import format_names

__all__ = ["WeightsFile", "read_weights"]

_WRAPPER_KEYS = ("model", "state_dict", "model_state", "module", "params")
_EXPECTED = "expected a PyTorch .pth/.pt/.tar, a .safetensors or a NumPy .npz weights file"


@dataclass
class WeightsFile:
    """A weights file's tensors.

    Attributes:
        path: the file.
        container: ``"torch"``, ``"safetensors"`` or ``"npz"``.
        tensors: ``{name: tensor}`` after unwrapping a ``{"model": ...}`` / ``{"state_dict": ...}``
            entry; names as in the file (no prefix removed).
    """

    path: Path
    container: str
    tensors: dict[str, Tensor]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:160] if text else type(err).__name__


def _container(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise ValueError(f"{path}: truncated or corrupt archive ({_first_line(err)})") from None
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        return "torch"
    if head[:1] == b"\x80":  # pickle protocol 2+: a legacy (non-zip) torch.save file
        return "torch"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 0 < n < path.stat().st_size:
            return "safetensors"
    if not head:
        raise ValueError(f"{path}: the file is empty; {_EXPECTED}")
    raise ValueError(f"{path}: not a weights file; {_EXPECTED}")


def _read_torch(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path}: cannot be read with torch.load(weights_only=True) (it holds non-tensor "
            f"objects: {_first_line(err)}); re-save only its state dict"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise ValueError(f"{path}: truncated or corrupt PyTorch file ({_first_line(err)})") from None


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path}: truncated or corrupt safetensors file ({_first_line(err)})") from None


def _read_npz(path: Path) -> dict[str, Tensor]:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: truncated or corrupt .npz archive ({_first_line(err)})") from None
    bad = [k for k, a in arrays.items() if a.dtype.kind not in "fiub"]
    if bad:
        raise ValueError(f"{path}: .npz entries that are not numeric arrays: {format_names(bad)}")
    return {k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in arrays.items()}


def _unwrap(path: Path, obj: object) -> dict[str, Tensor]:
    # {"model": {...}} (official releases), {"state_dict": {...}, "epoch": 3} (trainers)
    while isinstance(obj, dict) and not any(isinstance(v, Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ValueError(f"{path}: holds no tensors (keys {format_names(sorted(map(str, obj)))})")
    return tensors


def read_weights(path: str | Path) -> WeightsFile:
    """Read ``path`` (a file, or a folder holding ``model.safetensors``) into a :class:`WeightsFile`."""
    path = Path(path)
    if path.is_dir() and (path / "model.safetensors").is_file():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    container = _container(path)
    if container == "npz":
        return WeightsFile(path, container, _read_npz(path))
    if container == "safetensors":
        return WeightsFile(path, container, _read_safetensors(path))
    return WeightsFile(path, container, _unwrap(path, _read_torch(path)))

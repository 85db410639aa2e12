"""File readers that turn any decoding or validation failure into a one-line :class:`DataFileError`.

Every reader names the file and what was expected, so a broken copy of a dataset is diagnosed
from the message alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "DataFileError", "check_depth_range", "check_finite", "check_size", "read_image", "read_label_png",
    "read_lines", "read_mat", "read_npy",
]


class DataFileError(ValueError):
    """A dataset file is missing, unreadable, mis-sized or holds out-of-range values.

    ``path`` is the file and ``problem`` says what is wrong and what was expected.
    """

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise DataFileError(path, "file is missing")
    try:
        img = Image.open(path)
        img.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        raise DataFileError(path, f"cannot decode image ({type(exc).__name__}: {exc})") from None
    return img


def read_image(path: Path) -> np.ndarray:
    """Read an RGB image (PNG or JPEG) as uint8 ``(H, W, 3)``; grey or RGBA files are converted."""
    img = _open(path)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img)


def read_label_png(path: Path, channels: int = 1) -> np.ndarray:
    """Read a label PNG as ``(H, W)`` (``channels=1``, first channel of a colour file) or
    ``(H, W, 3)`` (``channels=3``) without any palette conversion."""
    img = _open(path)
    arr = np.asarray(img)
    if channels == 1:
        if arr.ndim == 3:
            arr = arr[..., 0]
        return arr
    if arr.ndim != 3 or arr.shape[2] < 3:
        raise DataFileError(path, f"expected a 3-channel PNG, got array of shape {arr.shape}")
    return arr[..., :3]


def read_npy(path: Path) -> np.ndarray:
    """Read a ``.npy`` array."""
    if not path.is_file():
        raise DataFileError(path, "file is missing")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DataFileError(path, f"cannot read .npy ({type(exc).__name__}: {exc})") from None


def read_mat(path: Path, key: str) -> np.ndarray:
    """Read variable ``key`` of a MATLAB ``.mat`` file with :func:`scipy.io.loadmat`."""
    from scipy.io import loadmat

    if not path.is_file():
        raise DataFileError(path, "file is missing")
    try:
        mat = loadmat(path, variable_names=[key])
    except Exception as exc:
        raise DataFileError(path, f"cannot read .mat ({type(exc).__name__}: {exc})") from None
    if key not in mat:
        raise DataFileError(path, f"variable {key!r} not found in .mat file")
    return mat[key]


def check_size(path: Path, arr: np.ndarray, size: tuple[int, int]) -> None:
    """Raise if ``arr``'s first two dimensions differ from the image ``size`` (H, W)."""
    if tuple(arr.shape[:2]) != tuple(size):
        raise DataFileError(
            path, f"size {tuple(arr.shape[:2])} does not match the image size {tuple(size)}"
        )


def check_finite(path: Path, arr: np.ndarray, what: str) -> None:
    """Raise if float ``arr`` (decoded from ``path``) holds a NaN or an infinity."""
    if arr.size and not (np.isfinite(arr.min()) and np.isfinite(arr.max())):  # NaN propagates to min
        raise DataFileError(path, f"{what} holds NaN or infinite values")


def check_depth_range(path: Path, depth: np.ndarray, max_depth: float) -> None:
    """Raise unless float depth ``(H, W)`` in metres is finite and 0 (no reading) or in
    ``(0, max_depth]``, the range of the dataset's sensor."""
    if not depth.size:
        return
    lo, hi = depth.min(), depth.max()  # two reductions (NaN propagates), no full-size masks
    if lo >= 0 and hi <= max_depth:
        return
    if lo >= 0 and np.isfinite(hi):
        raise DataFileError(
            path,
            f"depth up to {hi:.4g} m is beyond the sensor's range (expected 0 = no reading, or up to "
            f"{max_depth:g} m; a fill value, or not in metres?)",
        )
    raise DataFileError(
        path, f"depth holds negative or non-finite values (min {lo:.4g}, max {hi:.4g}; expected 0..{max_depth:g} m)"
    )


def read_lines(path: Path) -> list[str]:
    """The non-empty lines of text file ``path``, stripped (UTF-8, a leading byte-order mark
    ignored); a line that is not UTF-8 raises naming its number."""
    if not path.is_file():
        raise DataFileError(path, "file is missing")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataFileError(path, f"cannot be read ({type(exc).__name__}: {exc})") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    lines, bad = [], []
    for number, line in enumerate(raw.splitlines(), 1):
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError:
            bad.append(number)
            continue
        if text:
            lines.append(text)
    if bad:
        which = f"line {bad[0]} is" if len(bad) == 1 else f"lines {', '.join(map(str, bad[:10]))}{' ...' if len(bad) > 10 else ''} are"
        raise DataFileError(path, f"{which} not UTF-8 text (expected one sample id a line)")
    return lines

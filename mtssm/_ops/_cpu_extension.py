"""Build-on-first-use loader of the C++ CPU scan kernels (``csrc/selective_scan_cpu.cpp``).

The extension is compiled with :func:`torch.utils.cpp_extension.load` the first time a CPU scan
runs, into a cache folder keyed by a hash of the source, the compiler flags and the torch version
(``mtssm.paths.cache_dir()``: ``$MTSSM_CACHE_DIR`` or ``~/.cache/mtssm``). Building takes about a minute on 2 cores and prints
one line saying so. Where no C++ compiler is available (or ``MTSSM_DISABLE_CPP=1``), :func:`load`
returns ``None`` and the ops run their pure-PyTorch implementation instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

from mtssm.paths import cache_dir

__all__ = ["load", "is_available"]

_log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("csrc") / "selective_scan_cpu.cpp"
_CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-std=c++17"]
_LDFLAGS = ["-fopenmp"]
_lock = threading.Lock()
_module: ModuleType | None = None
_tried = False


def _build_key() -> str:
    h = hashlib.sha256()
    h.update(_SOURCE.read_bytes())
    h.update(" ".join(_CFLAGS + _LDFLAGS).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    try:  # -march=native: a build is only valid on the CPU it was made for
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
        h.update(flags.encode())
    except OSError:
        pass
    return h.hexdigest()[:16]


def load() -> ModuleType | None:
    """Return the compiled extension, building it on first use; ``None`` if it cannot be built."""
    global _module, _tried
    if _module is not None or _tried:
        return _module
    with _lock:
        if _module is not None or _tried:
            return _module
        _tried = True
        if os.environ.get("MTSSM_DISABLE_CPP", "0") == "1":
            return None
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            _log.warning("mtssm: no C++ compiler found; CPU scans use the pure-PyTorch path")
            return None
        from torch.utils import cpp_extension

        build_dir = cache_dir() / "extensions" / f"selective_scan_cpu-{_build_key()}"
        build_dir.mkdir(parents=True, exist_ok=True)
        if not any(build_dir.glob("*.so")):
            print(
                "mtssm: building the C++ CPU scan kernels (once, about a minute) in "
                f"{build_dir}",
                file=sys.stderr,
                flush=True,
            )
        try:
            _module = cpp_extension.load(
                name="mtssm_selective_scan_cpu",
                sources=[str(_SOURCE)],
                extra_cflags=_CFLAGS,
                extra_ldflags=_LDFLAGS,
                build_directory=str(build_dir),
                verbose=False,
            )
        except Exception as exc:  # compiler present but the build failed
            _log.warning("mtssm: building the C++ scan kernels failed (%s); using PyTorch", exc)
            _module = None
        return _module


def is_available() -> bool:
    """True when the C++ CPU kernels are (or can be) loaded."""
    return load() is not None

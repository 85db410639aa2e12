"""Which implementation the scan ops run: the dispatcher's choice, or ``with scan_backend(name):``.

By default the dispatcher picks a kernel by device: on CPU the C++ kernel of the op library
(``csrc/``; the pure-PyTorch path where the library could not be built), on CUDA the Triton
kernel (the pure-PyTorch path where triton is not installed), on any other device the pure-PyTorch
path. :func:`scan_backend` overrides that choice for a block of code, for tests and benchmarks:

    with mtssm.scan_backend("torch"):   # "cpp" | "torch" | "triton"
        y = selective_scan(...)

It registers the chosen implementation as the CPU and CUDA kernels of ``mtssm::selective_scan``
and ``mtssm::selective_scan_backward`` for the duration of the block (a ``torch.library``
registration that is removed on exit, which restores the previous kernels); the op bodies never
look at it. ``"cpp"`` keeps the C++ kernel on CPU (it is the default there) and fails if the
library is missing; ``"triton"`` on CPU tensors needs ``TRITON_INTERPRET=1`` (Triton's
interpreter, for tests). Blocks do not nest. Compiled graphs call the op, so the override applies
to them too.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator

import torch

from mtssm._ops import _library
from mtssm._ops.selective_scan import (
    LIBRARY_PATH,
    TRITON_INSTALLED,
    backward_kernel,
    forward_kernel,
    scan_bwd_torch,
    scan_fwd_torch,
    triton_bwd,
    triton_fwd,
)

__all__ = ["SCAN_BACKENDS", "scan_backend", "scan_kernels"]

SCAN_BACKENDS = ("cpp", "torch", "triton")
_INSTALL_TRITON = "triton is not installed; pip install 'mtssm[gpu]' (or pip install triton)"
_guard = threading.Lock()


_KERNELS = {
    "torch": (scan_fwd_torch, scan_bwd_torch),
    "triton": (triton_fwd, triton_bwd),
}


@contextlib.contextmanager
def scan_backend(name: str) -> Iterator[None]:
    """Run the scan ops with the implementation ``name`` inside the block (module docstring)."""
    if name not in SCAN_BACKENDS:
        raise ValueError(f"scan backend: unknown {name!r}; expected one of {', '.join(SCAN_BACKENDS)}")
    if name == "cpp" and LIBRARY_PATH is None:
        raise RuntimeError(f"scan backend 'cpp': the C++ op library is not available "
                           f"({_library.failure()}); install a C++ compiler, e.g. `apt-get install g++`")
    if name == "triton" and not TRITON_INSTALLED:
        raise RuntimeError(f"scan backend 'triton': {_INSTALL_TRITON}")
    if not _guard.acquire(blocking=False):
        raise RuntimeError("scan_backend blocks do not nest (and are not for concurrent threads)")
    try:
        if name == "cpp":
            yield
            return
        fwd, bwd = _KERNELS[name]
        with torch.library._scoped_library("mtssm", "IMPL") as lib, warnings.catch_warnings():
            # Registering over the library's CPU kernel is the point; the dispatcher warns.
            warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
            for device in ("CPU", "CUDA"):
                lib.impl("selective_scan", forward_kernel(fwd), device)
                lib.impl("selective_scan_backward", backward_kernel(bwd), device)
            yield
    finally:
        _guard.release()


def scan_kernels() -> dict[str, str]:
    """Each scan implementation and whether it runs on this machine (one line each)."""
    if LIBRARY_PATH is not None:
        cpp = "available (C++ CPU kernel; the default on CPU)"
    else:
        cpp = f"unavailable: {_library.failure()}"
    if not TRITON_INSTALLED:
        triton = f"unavailable: {_INSTALL_TRITON}"
    elif torch.cuda.is_available():
        triton = f"available on {torch.cuda.get_device_name()} (the default on CUDA)"
    else:
        triton = "installed; no CUDA device (runs on CPU only in Triton's interpreter, TRITON_INTERPRET=1)"
    default_cpu = "" if LIBRARY_PATH is not None else "; the default on CPU"
    return {
        "cpp": cpp,
        "torch": f"available (pure PyTorch, any device{default_cpu})",
        "triton": triton,
    }

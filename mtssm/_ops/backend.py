"""Which implementation the scan ops run: ``mtssm.set_scan_backend(...)``.

``"auto"`` (default) picks, per call and device: on CPU the C++ kernel (built on first use), or the
pure-PyTorch chunked scan where no compiler is present; on CUDA the Triton kernel, or mamba-ssm's
CUDA kernel for the plain 1-D scan when Triton is missing. ``"cpp"``, ``"torch"``, ``"triton"``,
``"mamba_ssm"`` force one; ``"reference"`` (an alias of ``"torch"``) runs the pure-PyTorch scan,
on any device.
"""

from __future__ import annotations

__all__ = ["SCAN_BACKENDS", "set_scan_backend", "get_scan_backend"]

SCAN_BACKENDS = ("auto", "cpp", "torch", "triton", "mamba_ssm", "reference")
_backend = "auto"


def set_scan_backend(name: str) -> None:
    """Choose the scan implementation for every later call (see the module docstring)."""
    global _backend
    if name not in SCAN_BACKENDS:
        raise ValueError(f"scan backend: unknown {name!r}; expected one of {', '.join(SCAN_BACKENDS)}")
    if name == "cpp":
        from mtssm._ops import _cpu_extension

        if not _cpu_extension.is_available():
            raise RuntimeError(
                "scan backend 'cpp': the C++ CPU kernels could not be built; install a C++ "
                "compiler (e.g. `apt-get install g++`) and ninja (`pip install ninja`)"
            )
    if name == "triton":
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            raise RuntimeError("scan backend 'triton': triton is not installed; `pip install mtssm[gpu]`")
    if name == "mamba_ssm":
        import importlib.util

        if importlib.util.find_spec("selective_scan_cuda") is None:
            raise RuntimeError(
                "scan backend 'mamba_ssm': mamba-ssm's CUDA kernels are not importable; on a CUDA "
                "machine `pip install mamba-ssm --no-build-isolation` (it builds selective_scan_cuda)"
            )
    _backend = name


def get_scan_backend() -> str:
    """The backend set by :func:`set_scan_backend` (``"auto"`` unless changed)."""
    return _backend

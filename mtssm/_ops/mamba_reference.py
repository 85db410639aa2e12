"""Load mamba-ssm's pure-PyTorch ``selective_scan_ref`` without CUDA.

mamba-ssm's package ``__init__`` and its ``ops/selective_scan_interface.py`` import CUDA extensions
unconditionally. On a CPU machine (mamba-ssm installed with ``MAMBA_SKIP_CUDA_BUILD=TRUE
MAMBA_FORCE_BUILD=TRUE pip install --no-deps --no-build-isolation mamba-ssm``) this loader runs
only that one file, with the package ``__init__`` bypassed and the CUDA-only imports stubbed, and
returns its ``selective_scan_ref``. It is the outside anchor of the tests and benchmarks.

On a CUDA machine with mamba-ssm built, :func:`mamba_selective_scan_cuda` calls its CUDA
``selective_scan_fn``, the anchor of the GPU tests and benchmarks of the Triton kernels.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

__all__ = ["load_mamba_selective_scan_ref", "mamba_cuda_available", "mamba_selective_scan_cuda"]


@lru_cache(maxsize=1)
def load_mamba_selective_scan_ref() -> Callable:
    """Return mamba-ssm's ``selective_scan_ref``; ``ImportError`` saying how to install it."""
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "mamba-ssm is not installed; on a CPU machine: MAMBA_SKIP_CUDA_BUILD=TRUE "
            "MAMBA_FORCE_BUILD=TRUE pip install --no-deps --no-build-isolation "
            "mamba-ssm==2.3.2.post1 einops"
        )
    root = Path(spec.submodule_search_locations[0])
    source = root / "ops" / "selective_scan_interface.py"
    saved = {name: sys.modules.get(name) for name in _STUBS}
    try:
        for name, attrs in _STUBS.items():
            if name in sys.modules and name not in ("mamba_ssm",):
                continue
            module = types.ModuleType(name)
            module.__dict__.update(attrs)
            if name == "mamba_ssm":
                module.__path__ = [str(root)]  # submodules resolve, __init__ never runs
            sys.modules[name] = module
        file_spec = importlib.util.spec_from_file_location("_mtssm_mamba_ssi", source)
        module = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(module)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    return module.selective_scan_ref


def _identity_decorator(*args, **kwargs):
    if args and callable(args[0]) and len(args) == 1 and not kwargs:
        return args[0]
    return lambda fn: fn


_STUBS: dict[str, dict] = {
    "mamba_ssm": {},
    "selective_scan_cuda": {},
    "mamba_ssm.utils": {},
    "mamba_ssm.utils.torch": {"custom_fwd": _identity_decorator, "custom_bwd": _identity_decorator},
    "mamba_ssm.ops": {},
    "mamba_ssm.ops.triton": {},
    "mamba_ssm.ops.triton.layer_norm": {"_layer_norm_fwd": None},
}


def mamba_cuda_available() -> bool:
    """Whether mamba-ssm's compiled CUDA scan (``selective_scan_cuda``) imports here."""
    try:
        import selective_scan_cuda  # noqa: F401
    except (ImportError, OSError):  # not built, or built against another torch
        return False
    return True


def mamba_selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                              delta_softplus=False, return_last_state=False):
    """mamba-ssm's CUDA ``selective_scan_fn`` (an outside anchor for GPU tests and benchmarks; not
    a backend of mtssm's op). Shapes as in mamba-ssm: u, delta, z (batch, dim, L); A (dim, N);
    B, C (batch, G, N, L); D, delta_bias (dim,). ``ImportError`` saying how to install it."""
    try:
        import selective_scan_cuda  # noqa: F401
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except (ImportError, OSError) as e:
        raise ImportError(
            "mamba-ssm's CUDA kernels are not importable; on a CUDA machine: pip install "
            f"--no-build-isolation mamba-ssm causal-conv1d ({e})"
        ) from e
    if not u.is_cuda:
        raise ValueError(f"mamba_selective_scan_cuda needs CUDA tensors, got u on {u.device}")
    return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                             return_last_state)

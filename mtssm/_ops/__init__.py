"""Custom ops of mtssm (``torch.ops.mtssm.*``), their references and kernels.

Importing this package registers the ops (loading the C++ op library, built on first use);
modules call them through :mod:`mtssm.nn.functional`.
"""


from mtssm._ops import orders, selective_scan  # noqa: F401  (register mtssm::scan_order, mtssm::selective_scan*)
from mtssm._ops._library import library_path
from mtssm._ops.backend import SCAN_BACKENDS, scan_backend, scan_kernels

__all__ = ["SCAN_BACKENDS", "library_path", "scan_backend", "scan_kernels"]

"""Custom ops of mtssm (``torch.ops.mtssm.*``), their references and kernels.

Importing this package registers the ops; modules call them through :mod:`mtssm.nn.functional`.
"""

from mtssm._ops import orders, selective_scan  # noqa: F401  (register mtssm::scan_order, mtssm::selective_scan*)
from mtssm._ops.backend import get_scan_backend, set_scan_backend

__all__ = ["set_scan_backend", "get_scan_backend"]

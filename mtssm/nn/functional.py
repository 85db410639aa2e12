"""Functional API of mtssm: the selective scans and the scan orders.

Everything here calls the ``torch.ops.mtssm.*`` custom ops (or is a pure index computation), so
it runs under ``torch.compile(fullgraph=True)`` and ``torch.export``.

Scans:
- :func:`selective_scan` — mamba-ssm's ``selective_scan_fn`` signature, plus ``initial_state``.
- :func:`selective_scan_2d` — fused K-direction scan of a (batch, dim, H, W) map (SS2D core).

Orders (row-major index tables of shape (K, H*W)):
- :func:`scan_order`, :func:`ss2d_orders`, :func:`hilbert_order`, :func:`hilbert_orders`,
  :func:`cropped_hilbert_orders`, :func:`invert_order`, :func:`apply_order`, :func:`restore_order`.
- MSM's window tokenisation :func:`window_tokenize` / :func:`window_untokenize` and channel split
  :func:`channel_split` / :func:`channel_merge`.
"""

from mtssm._ops.orders import (
    apply_order,
    channel_merge,
    channel_split,
    cropped_hilbert_orders,
    hilbert_order,
    hilbert_orders,
    invert_order,
    restore_order,
    scan_order,
    ss2d_orders,
    window_tokenize,
    window_untokenize,
)
from mtssm._ops.selective_scan import selective_scan, selective_scan_2d

__all__ = [
    "selective_scan",
    "selective_scan_2d",
    "scan_order",
    "ss2d_orders",
    "hilbert_order",
    "hilbert_orders",
    "cropped_hilbert_orders",
    "invert_order",
    "apply_order",
    "restore_order",
    "window_tokenize",
    "window_untokenize",
    "channel_split",
    "channel_merge",
]

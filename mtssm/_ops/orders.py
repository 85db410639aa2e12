"""Scan orders: the ways a 2-D feature map is turned into 1-D sequences, and back.

An *order* over an ``H x W`` map is a LongTensor whose entries are row-major spatial indices
(``i * W + j`` for the cell in row ``i``, column ``j``) listed in visit order. A stack of ``K``
orders has shape ``(K, L)`` with ``L = H * W``; row ``k`` is direction ``k``. Every order is a
permutation of ``range(L)``.

- :func:`ss2d_orders`: VMamba SS2D's four directions (row-major, column-major, both reversed).
- :func:`hilbert_order` / :func:`hilbert_orders`: a generalised Hilbert curve for any ``H x W``
  whose consecutive cells are always 4-neighbours, and PAMM's four rotated variants of it
  (Multi-Directional Hilbert Scanning).
- :func:`cropped_hilbert_orders`: PAMM's code's four directions, rotations of a power-of-two
  Hilbert curve cropped to ``H x W`` (what its published models were trained with).
- :func:`scan_order`: the orders by name (``"ss2d"``, ``"hilbert"``, ``"hilbert_cropped"``,
  ``"row"``, ``"col"``, ``"hilbert1"``).
- :func:`invert_order`, :func:`apply_order`, :func:`restore_order`: the inverse permutation,
  gathering a row-major sequence into visit order, and scattering it back.
- :func:`window_tokenize` / :func:`window_untokenize` (MSM's window tokenisation ``W_s`` and its
  inverse) and :func:`channel_split` / :func:`channel_merge` (MSM's ``S`` and ``S^-1``).

Order tables depend only on ``(name, H, W)``: they are computed once in Python, cached, and
returned as CPU LongTensors (a fresh copy on every call, so callers may move or modify them).
They come through the custom op ``torch.ops.mtssm.scan_order(name, H, W)``, so
``torch.compile(fullgraph=True)`` and ``torch.export`` trace through them, with symbolic ``H``
and ``W`` under dynamic shapes; inside a hot loop, keep the moved-to-device table (e.g. as a
buffer) rather than asking for it again.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ORDER_NAMES",
    "apply_order",
    "channel_merge",
    "channel_split",
    "cropped_hilbert_orders",
    "hilbert_order",
    "hilbert_orders",
    "invert_order",
    "restore_order",
    "scan_order",
    "ss2d_orders",
    "window_tokenize",
    "window_untokenize",
]


# ----------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------


def _positive_int(value: object, name: str) -> int:
    """``value`` as an int >= 1, or a one-line TypeError/ValueError naming ``name``.

    Traced sizes (SymInts under torch.export, symbolic ints under torch.compile) pass through
    without being specialised to their current value.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a positive int, got bool {value!r}")
    if isinstance(value, torch.SymInt):
        torch._check(value >= 1, lambda: f"{name} must be a positive int")
        return value  # type: ignore[return-value]
    if isinstance(value, int):  # also a size traced by Dynamo; operator.index would specialise it
        ivalue = value
    else:
        try:
            ivalue = operator.index(value)  # numpy integer, 0-d integer tensor
        except TypeError:
            raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}") from None
    if ivalue < 1:
        raise ValueError(f"{name} must be a positive int, got {ivalue}")
    return ivalue


def _check_perm(perm: object, name: str = "perm") -> Tensor:
    if not isinstance(perm, Tensor):
        raise TypeError(f"{name} must be a LongTensor of shape (L,) or (K, L), got {type(perm).__name__}")
    if perm.dtype != torch.long:
        raise TypeError(f"{name} must be a LongTensor (torch.int64), got dtype {perm.dtype}")
    if perm.ndim not in (1, 2) or perm.shape[-1] == 0:
        raise ValueError(f"{name} must have shape (L,) or (K, L) with L >= 1, got {tuple(perm.shape)}")
    return perm


# ----------------------------------------------------------------------------------------------
# order tables (cached; the public functions return copies)
# ----------------------------------------------------------------------------------------------


def _ss2d_table(H: int, W: int) -> Tensor:
    grid = torch.arange(H * W).view(H, W)
    row = grid.flatten()
    col = grid.t().flatten()
    return torch.stack([row, col, row.flip(0), col.flip(0)])


def _gilbert(out: list[int], W: int, x: int, y: int, ax: int, ay: int, bx: int, by: int) -> None:
    """Append to ``out`` the row-major indices of the generalised Hilbert curve of one rectangle.

    The rectangle has corner ``(x, y)`` (column, row), major side vector ``(ax, ay)`` and minor
    side vector ``(bx, by)`` (both axis-aligned). The curve starts at the corner and ends at the
    corner one major side away; it is 4-connected when the major side has even length or both
    sides are odd (see :func:`hilbert_order`). This is J. Červený's recursive "gilbert2d"
    construction (BSD-2-Clause), which halves the sides while keeping the halves even.
    """
    w = abs(ax + ay)  # major length
    h = abs(bx + by)  # minor length
    dax, day = (ax > 0) - (ax < 0), (ay > 0) - (ay < 0)  # unit major step
    dbx, dby = (bx > 0) - (bx < 0), (by > 0) - (by < 0)  # unit minor step

    if h == 1:  # a single line along the major side
        out.extend((y + i * day) * W + (x + i * dax) for i in range(w))
        return
    if w == 1:  # a single line along the minor side
        out.extend((y + i * dby) * W + (x + i * dbx) for i in range(h))
        return

    ax2, ay2 = ax // 2, ay // 2
    bx2, by2 = bx // 2, by // 2
    w2 = abs(ax2 + ay2)
    h2 = abs(bx2 + by2)

    if 2 * w > 3 * h:
        # long rectangle: two halves along the major side, the first of even length
        if w2 % 2 and w > 2:
            ax2, ay2 = ax2 + dax, ay2 + day
        _gilbert(out, W, x, y, ax2, ay2, bx, by)
        _gilbert(out, W, x + ax2, y + ay2, ax - ax2, ay - ay2, bx, by)
    else:
        # Hilbert template: up the minor side, along the whole major side, back down
        if h2 % 2 and h > 2:
            bx2, by2 = bx2 + dbx, by2 + dby
        _gilbert(out, W, x, y, bx2, by2, ax2, ay2)
        _gilbert(out, W, x + bx2, y + by2, ax, ay, bx - bx2, by - by2)
        _gilbert(
            out, W,
            x + (ax - dax) + (bx2 - dbx), y + (ay - day) + (by2 - dby),
            -bx2, -by2, -(ax - ax2), -(ay - ay2),
        )  # fmt: skip


def _hilbert_table(H: int, W: int) -> Tensor:
    out: list[int] = []
    # The curve runs from the top-left corner to the adjacent corner at the far end of its major
    # side. Such a Hamiltonian path exists only if the major side is even or both sides are odd
    # (grid colouring), so the major side is chosen by parity first, length second.
    along_w = (W % 2 == 0) if (H % 2) != (W % 2) else (W >= H)
    if along_w:
        _gilbert(out, W, 0, 0, W, 0, 0, H)
    else:
        _gilbert(out, W, 0, 0, 0, H, W, 0)
    return torch.tensor(out, dtype=torch.long).view(1, -1)


def _hilbert_multi_table(H: int, W: int) -> Tensor:
    grid = torch.arange(H * W).view(H, W)
    rows = []
    for k in range(4):
        # src is the map's index grid turned back by k quarter turns, (H, W) or (W, H); since
        # rot90(src, k) == grid, cell p of src lands on the map cell whose index is src[p].
        src = torch.rot90(grid, -k, dims=(0, 1))
        hk, wk = src.shape
        rows.append(src.flatten()[_cached_table("hilbert1", hk, wk)[0]])
    return torch.stack(rows)


def _hilbert_distances(p: int) -> Tensor:
    """``(2**p, 2**p)`` LongTensor: entry ``[x, y]`` is the step at which the standard Hilbert curve
    of the ``2**p x 2**p`` grid visits the cell ``(x, y)`` (the usual ``xy2d`` numbering); the
    curve starts at ``(0, 0)`` and ends at ``(2**p - 1, 0)``."""
    n = 1 << p
    x, y = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    x, y = x.clone(), y.clone()
    d = torch.zeros_like(x)
    s = n >> 1
    while s > 0:
        rx, ry = (x & s) > 0, (y & s) > 0
        d += s * s * ((3 * rx.long()) ^ ry.long())
        x, y = x & (s - 1), y & (s - 1)
        # the quadrant's curve turned into the standard orientation: reflected when rx and not ry,
        # transposed when not ry
        flip = rx & ~ry
        x, y = torch.where(flip, s - 1 - x, x), torch.where(flip, s - 1 - y, y)
        x, y = torch.where(ry, x, y), torch.where(ry, y, x)
        s >>= 1
    return d


def _hilbert_cropped_table(H: int, W: int) -> Tensor:
    p = (max(H, W) - 1).bit_length()  # the smallest 2**p >= max(H, W)
    steps = _hilbert_distances(p).t()  # steps[i, j]: the visit step of row i, column j
    rows = []
    for k in range(4):
        # cells visited in the order of their steps on the turned curve; a crop keeps the order
        # of the remaining cells and skips the others
        rows.append(torch.rot90(steps, k, dims=(0, 1))[:H, :W].flatten().argsort())
    return torch.stack(rows)


def _row_table(H: int, W: int) -> Tensor:
    return torch.arange(H * W).view(1, -1)


def _col_table(H: int, W: int) -> Tensor:
    return torch.arange(H * W).view(H, W).t().reshape(1, -1)


_TABLES: dict[str, Callable[[int, int], Tensor]] = {
    "ss2d": _ss2d_table,
    "hilbert": _hilbert_multi_table,
    "row": _row_table,
    "col": _col_table,
    "hilbert1": _hilbert_table,
    "hilbert_cropped": _hilbert_cropped_table,
}

#: Names accepted by :func:`scan_order`, with the number of directions ``K`` each gives.
ORDER_NAMES: dict[str, int] = {"ss2d": 4, "hilbert": 4, "hilbert_cropped": 4, "row": 1, "col": 1, "hilbert1": 1}


def _check_name(name: object) -> str:
    if not isinstance(name, str) or name not in ORDER_NAMES:
        raise ValueError(f"unknown scan order {name!r}; valid names: {', '.join(ORDER_NAMES)}")
    return name


@functools.lru_cache(maxsize=256)
def _cached_table(name: str, H: int, W: int) -> Tensor:
    return _TABLES[name](H, W)


# The tables are built in Python, so under torch.compile / torch.export they come from an opaque
# op: a traced graph calls it at run time (cheap after the first call for a shape, thanks to the
# cache), which keeps H and W symbolic under dynamic shapes. Eager calls skip the op.
@torch.library.custom_op("mtssm::scan_order", mutates_args=())
def _scan_order_op(name: str, H: int, W: int) -> Tensor:
    """``(K, H * W)`` LongTensor on the CPU: the scan orders called ``name`` (see :func:`scan_order`)."""
    return _cached_table(_check_name(name), H, W).clone()


@_scan_order_op.register_fake
def _(name: str, H: int, W: int) -> Tensor:
    return torch.empty((ORDER_NAMES[_check_name(name)], H * W), dtype=torch.long, device="cpu")


def _table(name: str, H: object, W: object) -> Tensor:
    name = _check_name(name)
    H, W = _positive_int(H, "H"), _positive_int(W, "W")
    if torch.compiler.is_compiling():
        return _scan_order_op(name, H, W)
    return _cached_table(name, H, W).clone()  # eager: the same result without the op dispatch


# ----------------------------------------------------------------------------------------------
# public orders
# ----------------------------------------------------------------------------------------------


def ss2d_orders(H: int, W: int) -> Tensor:
    """VMamba SS2D's four scan orders (CrossScan) over an ``H x W`` map.

    Returns a LongTensor of shape ``(4, H * W)`` on the CPU whose row ``k`` lists row-major
    spatial indices in visit order: ``k=0`` row-major, ``k=1`` column-major (the row-major order
    of the transposed map), ``k=2`` row-major reversed, ``k=3`` column-major reversed.
    """
    return _table("ss2d", H, W)


def hilbert_order(H: int, W: int) -> Tensor:
    """A generalised Hilbert curve over an ``H x W`` map, for any ``H, W >= 1``.

    Returns a LongTensor of shape ``(H * W,)`` on the CPU: the row-major indices of the cells in
    visit order. The curve is Červený's "gilbert2d" (the standard Hilbert curve when ``H == W``
    is a power of two). It starts at the top-left cell ``(0, 0)`` and ends at the other end of
    its major side: the top-right cell if it runs along ``W``, else the bottom-left cell.

    Guarantee: consecutive cells are always 4-neighbours (no diagonal steps) for every
    ``H, W >= 1``. A corner-to-adjacent-corner path through every cell exists only when the side
    it runs along is even or both sides are odd (colour the grid like a chessboard), and
    gilbert2d's recursion, which splits sides into even parts, keeps that condition in every
    sub-rectangle. Plain gilbert2d runs along the longer
    side and so takes one diagonal step whenever the longer side is odd and the shorter even
    (e.g. 5 x 4); here the major side is the even one when exactly one side is even, and the
    longer one otherwise (checked exhaustively for all ``H, W <= 128``).
    """
    return _table("hilbert1", H, W)[0]


def hilbert_orders(H: int, W: int) -> Tensor:
    """PAMM's Multi-Directional Hilbert Scanning: four rotations of the Hilbert curve.

    Returns a LongTensor of shape ``(4, H * W)`` on the CPU. Row ``k`` is the curve of
    :func:`hilbert_order` turned by ``k * 90`` degrees counter-clockwise: the curve is built for
    the ``H x W`` (``k`` even) or ``W x H`` (``k`` odd) grid, and its table of visit steps,
    turned with ``torch.rot90(table, k)``, is the visit-step table of row ``k``
    (``invert_order(row_k).view(H, W)``). This is how PAMM builds its four directions
    (``torch.rot90`` of its Hilbert index table by ``k = 0, 1, 2, 3``), except that PAMM crops a
    power-of-two curve to ``H x W``, which breaks adjacency, while every row here is a
    4-connected curve of the whole map. Row ``2`` is row ``0`` turned by 180 degrees (not row
    ``0`` reversed).
    """
    return _table("hilbert", H, W)


def cropped_hilbert_orders(H: int, W: int) -> Tensor:
    """The four Hilbert scans of PAMM's code: rotations of a power-of-two curve cropped to ``H x W``.

    Returns a LongTensor of shape ``(4, H * W)`` on the CPU. With ``n = 2**p`` the smallest power
    of two >= ``max(H, W)`` and ``steps`` the visit-step table of the standard Hilbert curve of the
    ``n x n`` grid as PAMM's ``Horder`` numbers it (``steps[i, j]``: the step of row ``i``, column
    ``j``; the curve starts at the top-left cell and ends at the top-right one), row ``k`` visits the cells of
    ``torch.rot90(steps, k)[:H, :W]`` in increasing step order (``models/transformers/order_h.py``,
    ``get_h_order_4``). Where ``H`` or ``W`` is not a power of two the crop cuts the curve, so
    consecutive cells of a row need not be neighbours; :func:`hilbert_orders` is the 4-connected
    alternative. PAMM's published models were trained with these orders.
    """
    return _table("hilbert_cropped", H, W)


def scan_order(name: str, H: int, W: int) -> Tensor:
    """The stack of scan orders called ``name`` over an ``H x W`` map.

    Returns a LongTensor of shape ``(K, H * W)`` on the CPU, row ``k`` listing row-major spatial
    indices in the visit order of direction ``k``:

    - ``"ss2d"`` (K=4): :func:`ss2d_orders`, row-major, column-major and both reversed;
    - ``"hilbert"`` (K=4): :func:`hilbert_orders`, four rotations of a generalised Hilbert curve;
    - ``"hilbert_cropped"`` (K=4): :func:`cropped_hilbert_orders`, PAMM's code's four orders;
    - ``"row"`` (K=1): row-major; ``"col"`` (K=1): column-major;
    - ``"hilbert1"`` (K=1): the single curve of :func:`hilbert_order`.

    An unknown name raises a ValueError listing the valid ones (:data:`ORDER_NAMES`).
    """
    return _table(name, H, W)


# ----------------------------------------------------------------------------------------------
# applying orders
# ----------------------------------------------------------------------------------------------


def invert_order(perm: Tensor) -> Tensor:
    """The inverse permutation of ``perm`` along its last dimension.

    ``perm``: LongTensor ``(L,)`` or ``(K, L)``, each row a permutation of ``range(L)``.
    Returns a LongTensor of the same shape and device with ``inv[..., perm[..., t]] = t``, so
    ``perm[..., inv] == inv[..., perm] == arange(L)``: ``inv[..., i]`` is the step at which
    cell ``i`` is visited. Rows that are not permutations raise a ValueError (checked in eager
    mode only).
    """
    perm = _check_perm(perm)
    L = perm.shape[-1]
    steps = torch.arange(L, device=perm.device).expand_as(perm)
    if not torch.compiler.is_compiling():
        if not torch.equal(perm.sort(dim=-1).values, steps):
            raise ValueError(f"perm must hold a permutation of range({L}) in every row")
    return torch.empty_like(perm).scatter_(-1, perm, steps)


def _check_seq(x: object, perm: Tensor, name: str, stacked: bool) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
    want = tuple(perm.shape) if stacked else tuple(perm.shape[-1:])
    if x.ndim < len(want) or tuple(x.shape[x.ndim - len(want):]) != want:
        shape = "(..., K, L)" if stacked else "(..., L)"
        dims = ", ".join(map(str, want))
        raise ValueError(f"{name} must have shape {shape} = (..., {dims}) to match perm, got {tuple(x.shape)}")
    return x


def apply_order(x: Tensor, perm: Tensor) -> Tensor:
    """Gather a row-major sequence into visit order.

    ``x``: ``(..., L)``, the flattened map in row-major order (e.g. ``(B, C, H * W)``).
    ``perm``: LongTensor ``(L,)`` or ``(K, L)`` (any device; moved to ``x.device``).
    Returns ``(..., L)`` for ``perm`` of shape ``(L,)`` and ``(..., K, L)`` for ``(K, L)``, with
    ``out[..., k, t] = x[..., perm[k, t]]``. Differentiable in ``x``.
    """
    perm = _check_perm(perm)
    _check_seq(x, perm, "x", stacked=False)
    perm = perm.to(x.device)
    return x.index_select(-1, perm.reshape(-1)).unflatten(-1, tuple(perm.shape))


def restore_order(y: Tensor, perm: Tensor) -> Tensor:
    """Scatter a sequence in visit order back to row-major order (the inverse of :func:`apply_order`).

    ``y``: ``(..., L)`` for ``perm`` of shape ``(L,)``, or ``(..., K, L)`` for ``perm`` of shape
    ``(K, L)``. Returns a tensor of ``y``'s shape with ``out[..., k, perm[k, t]] = y[..., k, t]``;
    the ``K`` directions are kept apart (sum over dim ``-2`` to merge them as SS2D does).
    Differentiable in ``y``.
    """
    perm = _check_perm(perm)
    _check_seq(y, perm, "y", stacked=True)
    index = perm.to(y.device).expand_as(y)
    return torch.empty_like(y).scatter(-1, index, y)


# ----------------------------------------------------------------------------------------------
# MSM multi-scale tokenisation
# ----------------------------------------------------------------------------------------------


def _check_map(x: object, name: str, what: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a Tensor of shape {what}, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape {what}, got {tuple(x.shape)}")
    return x


def window_tokenize(x: Tensor, s: int) -> Tensor:
    """MSM's window tokenisation ``W_s``: each ``s x s`` patch becomes one token.

    ``x``: ``(B, C, H, W)``. Returns ``(B, C * s * s, ceil(H / s), ceil(W / s))``.

    Policy for ``H`` or ``W`` not divisible by ``s``: the map is first padded with zeros at the
    bottom and right up to multiples of ``s``; the padded cells then take part in the scan like
    any other token, and :func:`window_untokenize` crops them away. Channel order (that of
    :func:`torch.nn.functional.pixel_unshuffle`): output channel ``(c * s + i) * s + j`` of
    token ``(p, q)`` holds ``x[:, c, p * s + i, q * s + j]``, i.e. channel-major, then the row,
    then the column inside the patch. ``s == 1`` returns ``x`` unchanged.
    """
    _check_map(x, "x", "(B, C, H, W)")
    s = _positive_int(s, "s")
    if x.shape[-2] == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have H, W >= 1, got shape {tuple(x.shape)}")
    if s == 1:
        return x
    H, W = x.shape[-2:]
    hs, ws = (H + s - 1) // s, (W + s - 1) // s
    # padding by zero cells is a no-op; padding unconditionally keeps traced graphs shape-generic
    x = F.pad(x, (0, ws * s - W, 0, hs * s - H))
    return F.pixel_unshuffle(x, s)


def window_untokenize(y: Tensor, s: int, H: int, W: int) -> Tensor:
    """MSM's token windowing ``W_s^-1``: the inverse of :func:`window_tokenize`.

    ``y``: ``(B, C * s * s, ceil(H / s), ceil(W / s))`` with channels ordered as
    :func:`window_tokenize` writes them. Returns ``(B, C, H, W)``: each token is unfolded back
    into its ``s x s`` patch and the zero padding at the bottom/right is cropped off.
    """
    _check_map(y, "y", "(B, C * s * s, ceil(H / s), ceil(W / s))")
    s = _positive_int(s, "s")
    H = _positive_int(H, "H")
    W = _positive_int(W, "W")
    hs, ws = (H + s - 1) // s, (W + s - 1) // s
    if y.shape[1] % (s * s) or tuple(y.shape[-2:]) != (hs, ws):
        raise ValueError(
            f"y must have shape (B, C * {s * s}, {hs}, {ws}) for s={s}, H={H}, W={W}, got {tuple(y.shape)}"
        )
    if s == 1:
        return y
    return F.pixel_shuffle(y, s)[..., :H, :W]


def channel_split(x: Tensor, n: int) -> tuple[Tensor, ...]:
    """MSM's channel split ``S``: ``x`` ``(B, C, H, W)`` into ``n`` views ``(B, C / n, H, W)``.

    ``C`` must be divisible by ``n``. The parts are views of ``x`` in channel order.
    """
    _check_map(x, "x", "(B, C, H, W)")
    n = _positive_int(n, "n")
    C = x.shape[1]
    if C % n:
        raise ValueError(f"x has C={C} channels, which n={n} does not divide")
    return tuple(x.split(C // n, dim=1))


def channel_merge(xs: Sequence[Tensor]) -> Tensor:
    """MSM's channel concatenation ``S^-1``: ``n`` maps ``(B, C_i, H, W)`` into ``(B, sum C_i, H, W)``."""
    if isinstance(xs, Tensor) or not isinstance(xs, Sequence) or len(xs) == 0:
        raise ValueError("xs must be a non-empty sequence of (B, C_i, H, W) tensors")
    for i, t in enumerate(xs):
        _check_map(t, f"xs[{i}]", "(B, C_i, H, W)")
    return torch.cat(list(xs), dim=1)

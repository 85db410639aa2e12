"""Boundary detection: optimal-dataset-scale F-measure (odsF) with the SEISM protocol.

For every threshold ``t`` and every image, the predicted edge probabilities are binarised
(``prob >= t``), thinned to one-pixel-wide edges (MATLAB ``bwmorph(E, 'thin', Inf)``), and matched
one-to-one to the ground-truth edge pixels within ``max_dist`` times the image diagonal. The counts
(matched predicted pixels, predicted pixels, matched ground-truth pixels, ground-truth pixels) are
summed over the dataset per threshold; odsF is the largest dataset-level F1 over the thresholds.

The one-to-one correspondence uses pyEdgeEval's port of the benchmark's C++ ``correspondPixels``
when it is installed, otherwise scipy's sparse minimum-cost perfect matching on the same graph (pixel
pairs within the radius plus outlier nodes). The benchmark minimises a cost in which an unmatched
pixel costs far more than any pair; the C++ code solves it approximately on a thinned-out graph and
may match a few pixels fewer (about 0.2 % on 448x576 maps), scipy solves it exactly.

Determinism: correspondPixels draws from one global generator that the C++ library seeds from the
time of day when it is loaded, so the same maps could be matched differently from one process to the
next. Before each call the generator is reseeded from a digest of the call's inputs (both maps and
the radius), which makes every count, and so odsF, a function of the inputs alone, in any process
and in any order of calls.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse.csgraph import min_weight_full_bipartite_matching
from scipy.spatial import cKDTree

__all__ = [
    "boundary_counts",
    "edge_thresholds",
    "ods_f",
    "thin",
]

Matcher = Literal["auto", "pyedgeeval", "scipy"]


def _thin_luts() -> tuple[np.ndarray, np.ndarray]:
    """Lookup tables of the two sub-iterations of Guo and Hall's parallel thinning (MATLAB's 'thin').

    Index ``n`` is the 8-neighbourhood as bits x1..x8 counter-clockwise from east
    (bit 0 = E, 1 = NE, 2 = N, 3 = NW, 4 = W, 5 = SW, 6 = S, 7 = SE); True means "delete".
    """
    g1 = np.zeros(256, bool)
    g2 = np.zeros(256, bool)
    g3 = np.zeros(256, bool)
    g3p = np.zeros(256, bool)
    for n in range(256):
        x = [(n >> i) & 1 for i in range(8)]
        crossings = sum(1 for i in (0, 2, 4, 6) if not x[i] and (x[i + 1] or x[(i + 2) % 8]))
        n1 = sum(1 for k in (1, 3, 5, 7) if x[k] or x[k - 1])
        n2 = sum(1 for k in (1, 3, 5, 7) if x[k] or x[(k + 1) % 8])
        g1[n] = crossings == 1
        g2[n] = 2 <= min(n1, n2) <= 3
        g3[n] = not ((x[1] or x[2] or not x[7]) and x[0])
        g3p[n] = not ((x[5] or x[6] or not x[3]) and x[4])
    return g1 & g2 & g3, g1 & g2 & g3p


_THIN_LUTS = _thin_luts()
# Correlation weights giving each neighbour its bit (rows: north to south, columns: west to east).
_NEIGHBOUR_BITS = np.array([[8, 4, 2], [16, 0, 1], [32, 64, 128]], dtype=np.uint8)


def thin(edges: np.ndarray) -> np.ndarray:
    """Morphological thinning to one-pixel-wide curves (MATLAB ``bwmorph(edges, 'thin', Inf)``).

    Args:
        edges: (H, W) binary map.

    Returns:
        (H, W) bool map, thinned until it no longer changes.
    """
    skel = np.asarray(edges).astype(np.uint8)
    if skel.ndim != 2:
        raise ValueError(f"thin: edges must be a 2-D (H, W) map, got shape {skel.shape}")
    while True:
        before = int(skel.sum())
        for lut in _THIN_LUTS:
            neighbourhood = ndimage.correlate(skel, _NEIGHBOUR_BITS, mode="constant", cval=0)
            skel[lut[neighbourhood]] = 0
        if int(skel.sum()) == before:
            return skel.astype(bool)


def edge_thresholds(thresholds: int | Sequence[float] | np.ndarray = 99) -> np.ndarray:
    """The thresholds of the evaluation: ``n`` gives SEISM's ``linspace(1/(n+1), 1-1/(n+1), n)``.

    Args:
        thresholds: a count ``n >= 1`` or an explicit increasing sequence of values in [0, 1].

    Returns:
        (T,) float64 array.
    """
    if isinstance(thresholds, (int, np.integer)) and not isinstance(thresholds, bool):
        n = int(thresholds)
        if n < 1:
            raise ValueError(f"thresholds: expected a count >= 1, got {n}")
        return np.linspace(1.0 / (n + 1), 1.0 - 1.0 / (n + 1), n)
    values = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if values.size == 0 or np.any(np.diff(values) <= 0) or values[0] < 0 or values[-1] > 1:
        raise ValueError("thresholds: expected a count or a strictly increasing sequence in [0, 1]")
    return values


@functools.cache
def _correspond_pixels_reseed() -> Callable[[int], None]:
    """A function that reseeds the global generator (``Random::rand``) of pyEdgeEval's compiled
    correspondPixels with a non-zero 48-bit seed (0 would mean "from the clock")."""
    import importlib

    ext = importlib.import_module("pyEdgeEval._lib.correspond_pixels")  # the extension module
    lib = ctypes.CDLL(ext.__file__)  # the already loaded library: the same global generator
    generator = ctypes.c_void_p.in_dll(lib, "_ZN6Random4randE")  # Random Random::rand
    reseed = lib._ZN6Random6reseedEm  # void Random::reseed(u_int64_t), ``this`` first
    reseed.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
    reseed.restype = None
    address = ctypes.addressof(generator)
    return lambda seed: reseed(address, seed)


def _input_seed(pred: np.ndarray, gt: np.ndarray, max_dist: float) -> int:
    """A non-zero 48-bit seed digested from the two maps and the radius."""
    h = hashlib.blake2b(digest_size=8)
    for arr in (pred, gt):
        h.update(np.asarray(arr.shape, np.int64).tobytes())
        h.update(np.packbits(np.asarray(arr, dtype=bool)).tobytes())
    h.update(np.float64(max_dist).tobytes())
    return (int.from_bytes(h.digest(), "little") & 0xFFFFFFFFFFFF) or 1


def _match_pyedgeeval(pred: np.ndarray, gt: np.ndarray, max_dist: float) -> tuple[int, int]:
    from pyEdgeEval import correspond_pixels

    _correspond_pixels_reseed()(_input_seed(pred, gt, max_dist))
    match_pred, match_gt, _, _ = correspond_pixels(pred, gt, max_dist=max_dist)
    return int((match_pred > 0).sum()), int((match_gt > 0).sum())


def _match_scipy(pred: np.ndarray, gt: np.ndarray, max_dist: float) -> tuple[int, int]:
    """The benchmark's objective solved exactly: a minimum-cost perfect matching in which every
    predicted or ground-truth pixel either pairs with one of the other map within the radius (cost:
    their distance) or with an outlier node (cost: 100 radii), as in correspondPixels. An extra
    match always lowers the cost, so the number of pairs is the largest possible."""
    radius = max_dist * float(np.hypot(*pred.shape))
    pred_xy, gt_xy = np.argwhere(pred), np.argwhere(gt)
    n, m = len(pred_xy), len(gt_xy)
    pairs = cKDTree(pred_xy).query_ball_tree(cKDTree(gt_xy), r=radius)
    i = np.repeat(np.arange(n), [len(p) for p in pairs])
    j = np.fromiter((k for p in pairs for k in p), dtype=np.int64, count=i.size)
    if i.size == 0:
        return 0, 0
    eps = 1e-3 * radius  # keeps zero-distance pairs as stored entries of the sparse matrix
    dist = np.linalg.norm(pred_xy[i] - gt_xy[j], axis=1) + eps
    outlier = 100.0 * radius
    # rows: predicted pixels, then ground-truth outlier nodes; columns: ground-truth pixels, then
    # predicted outlier nodes. Outlier-outlier edges mirror the real ones so a perfect matching
    # exists whatever pairs are chosen.
    rows = np.concatenate([i, np.arange(n), n + np.arange(m), n + j])
    cols = np.concatenate([j, m + np.arange(n), np.arange(m), m + i])
    cost = np.concatenate([dist, np.full(n, outlier), np.full(m, outlier), np.full(i.size, eps)])
    graph = sparse.csr_matrix((cost, (rows, cols)), shape=(n + m, n + m))
    _, col_of_row = min_weight_full_bipartite_matching(graph)
    matched = int((col_of_row[:n] < m).sum())
    return matched, matched


def _matcher(name: Matcher):
    """The matching function named ``name`` ('auto': pyEdgeEval when installed, else scipy)."""
    if name not in ("auto", "pyedgeeval", "scipy"):
        raise ValueError(f"matcher: expected 'auto', 'pyedgeeval' or 'scipy', got {name!r}")
    if name == "scipy":
        return _match_scipy
    try:
        import pyEdgeEval  # noqa: F401
    except ImportError:
        if name == "pyedgeeval":
            raise ImportError("matcher='pyedgeeval' needs pyEdgeEval: pip install pyEdgeEval") from None
        return _match_scipy
    return _match_pyedgeeval


def boundary_counts(
    prob: np.ndarray,
    gt: np.ndarray,
    thresholds: np.ndarray,
    max_dist: float,
    *,
    apply_thinning: bool = True,
    matcher: Matcher = "auto",
) -> np.ndarray:
    """Per-threshold match counts of one image.

    Args:
        prob: (H, W) edge probabilities in [0, 1].
        gt: (H, W) binary ground-truth edges (already cleared at ignored pixels).
        thresholds: (T,) increasing thresholds; a pixel is an edge at ``t`` when ``prob >= t``.
        max_dist: matching radius as a fraction of the image diagonal.
        apply_thinning: thin each binarised prediction first (SEISM does).
        matcher: 'pyedgeeval' (C++ correspondPixels, the benchmark's approximate assignment, its
            generator seeded from the inputs), 'scipy' (exact minimum-cost matching), or 'auto'
            (the first if installed). Both are deterministic functions of the inputs.

    Returns:
        (4, T) int64 array: rows are matched predicted pixels, predicted pixels, matched
        ground-truth pixels, ground-truth pixels.
    """
    if prob.shape != gt.shape or prob.ndim != 2:
        raise ValueError(f"boundary: prediction {prob.shape} and label {gt.shape} must be equal (H, W)")
    if max_dist <= 0:
        raise ValueError(f"max_dist: expected a positive fraction of the diagonal, got {max_dist}")
    match = _matcher(matcher)
    gt = np.asarray(gt, dtype=bool)
    n_gt = int(gt.sum())
    counts = np.zeros((4, len(thresholds)), dtype=np.int64)
    counts[3] = n_gt
    previous: np.ndarray | None = None
    for i, t in enumerate(thresholds):
        edges = prob >= t
        if previous is not None and np.array_equal(edges, previous):
            counts[:3, i] = counts[:3, i - 1]  # same binary map as the last threshold
            continue
        previous = edges
        if apply_thinning and edges.any():
            edges = thin(edges)
        n_pred = int(edges.sum())
        counts[1, i] = n_pred
        if n_pred and n_gt:
            counts[0, i], counts[2, i] = match(edges, gt, max_dist)
    return counts


def ods_f(counts: np.ndarray) -> float:
    """ODS F-measure in percent from dataset-summed (4, T) counts (see ``boundary_counts``).

    Recall ``R_t`` and precision ``P_t`` are the dataset-level ratios at each threshold; the result
    is ``max_t 2 P_t R_t / (P_t + R_t)`` (without BSDS's interpolation between thresholds).
    """
    matched_p, n_p, matched_r, n_r = (c.astype(np.float64) for c in counts)
    precision = np.divide(matched_p, n_p, out=np.zeros_like(matched_p), where=n_p > 0)
    recall = np.divide(matched_r, n_r, out=np.zeros_like(matched_r), where=n_r > 0)
    denom = precision + recall
    f = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(100.0 * f.max())

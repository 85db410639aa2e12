"""Boundary odsF (SEISM protocol): thinning, tolerance, dataset-level counts, both matchers."""

import functools
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mtssm.metrics import boundary_odsf, edge_thresholds, thin
from mtssm.metrics.boundary import _match_pyedgeeval, _match_scipy

HAS_PYEDGEEVAL = importlib.util.find_spec("pyEdgeEval") is not None
MATCHERS = ["scipy", pytest.param("pyedgeeval", marks=pytest.mark.skipif(not HAS_PYEDGEEVAL, reason="pyEdgeEval"))]
SIZE = 32  # diagonal 45.25 px: max_dist 0.0075 -> 0.34 px, 0.05 -> 2.26 px


def expect(value: float, matcher: str):
    """``value`` exactly for the exact matcher. pyEdgeEval's correspondPixels is an approximate
    assignment (seeded from its inputs): on these maps it may leave one of the 32 pixels of a line
    unmatched."""
    return pytest.approx(value, abs=1e-6 if matcher == "scipy" else 100 / SIZE + 1e-6)


def vertical_line(col: int, value: float = 1.0) -> torch.Tensor:
    x = torch.zeros(SIZE, SIZE)
    x[:, col] = value
    return x


@pytest.mark.parametrize("matcher", MATCHERS)
def test_perfect_shifted_within_and_beyond_tolerance(matcher):
    gt = vertical_line(10)
    assert boundary_odsf(gt, gt, max_dist=0.0075, matcher=matcher) == expect(100.0, matcher)
    shifted = vertical_line(11)
    assert boundary_odsf(shifted, gt, max_dist=0.0075, matcher=matcher) == 0.0
    assert boundary_odsf(shifted, gt, max_dist=0.05, matcher=matcher) == expect(100.0, matcher)
    assert boundary_odsf(vertical_line(13), gt, max_dist=0.05, matcher=matcher) == 0.0


def thick_line_scores(matcher: str) -> list[float]:
    """odsF of a 3-pixel-wide line against its centre line, thinned and unthinned."""
    gt = vertical_line(10)
    thick = vertical_line(9) + vertical_line(10) + vertical_line(11)
    return [boundary_odsf(thick, gt, max_dist=0.05, apply_thinning=thinning, matcher=matcher)
            for thinning in (False, True)]  # fmt: skip


@pytest.mark.parametrize("matcher", MATCHERS)
def test_one_to_one_and_thinning(matcher):
    unthinned, thinned_score = thick_line_scores(matcher)
    # without thinning each gt pixel matches one of three predicted pixels: P = 1/3, R = 1
    assert unthinned == expect(100 * 2 * (1 / 3) / (1 / 3 + 1), matcher)
    thinned = thin((vertical_line(9) + vertical_line(10) + vertical_line(11)).numpy() > 0)
    assert thinned.sum(1).max() == 1 and thinned[:, 10].sum() == thinned.sum()
    assert thinned_score > 95.0


_SCORE_IN_A_FRESH_PROCESS = """
import json, sys
sys.path.insert(0, {tests!r})
from metrics.test_metric_boundary import thick_line_scores
print(json.dumps(thick_line_scores("pyedgeeval")))
"""


@pytest.mark.skipif(not HAS_PYEDGEEVAL, reason="pyEdgeEval")
def test_pyedgeeval_odsf_is_the_same_in_every_process():
    """correspondPixels' generator is seeded from the clock when its library loads; odsF reseeds it
    from the inputs, so two fresh processes (and this one) give the same numbers."""
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = _SCORE_IN_A_FRESH_PROCESS.format(tests=tests)
    runs = [json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                      text=True, env=os.environ.copy()).stdout)  # fmt: skip
            for _ in range(2)]
    assert runs[0] == runs[1] == thick_line_scores("pyedgeeval")
    unthinned, thinned = runs[0]
    assert unthinned == pytest.approx(50.0)
    assert thinned > 95.0


def test_pyedgeeval_matching_is_a_function_of_its_inputs():
    """Many random maps, each matched twice in different orders: the same counts every time."""
    if not HAS_PYEDGEEVAL:
        pytest.skip("pyEdgeEval")
    rng = np.random.default_rng(1)
    maps = [(rng.random((40, 56)) > 0.9, rng.random((40, 56)) > 0.9) for _ in range(12)]
    first = [_match_pyedgeeval(a, b, 0.05) for a, b in maps]
    second = [_match_pyedgeeval(a, b, 0.05) for a, b in reversed(maps)][::-1]
    assert first == second


def test_thin_keeps_one_pixel_curves_and_reduces_blobs():
    line = vertical_line(4).numpy() > 0
    assert np.array_equal(thin(line), line)
    square = np.zeros((7, 7), bool)
    square[1:-1, 2:-2] = True
    square[0, 1] = True
    expected = np.zeros((7, 7), bool)
    expected[[0, 1, 2, 3, 4], [1, 2, 3, 3, 3]] = True  # MATLAB bwmorph(..., 'thin', Inf)
    assert np.array_equal(thin(square), expected)


@pytest.mark.parametrize("matcher", MATCHERS)
def test_counts_accumulate_over_the_dataset(matcher):
    gt = vertical_line(10)
    # image 2 predicts nothing: dataset P = 32/32, R = 32/64 -> F = 2/3 (the image mean would be 1/2)
    f = boundary_odsf([gt, torch.zeros_like(gt)], [gt, gt], max_dist=0.0075, matcher=matcher)
    assert f == expect(100 * 2 / 3, matcher)


def test_thresholds_and_ignore():
    # The exact matcher: this checks thresholds and ignored pixels, not the matching.
    odsf = functools.partial(boundary_odsf, matcher="scipy")
    gt = vertical_line(10)
    weak = vertical_line(10, 0.3)
    assert odsf(weak, gt) == pytest.approx(100.0)  # thresholds <= 0.3 reproduce it
    assert odsf(weak, gt, thresholds=[0.5, 0.7]) == 0.0
    label = gt.clone()
    label[:, 20:] = 255
    noisy = gt + vertical_line(25)  # a spurious edge inside the ignored region
    assert odsf(noisy, label) == pytest.approx(100.0)
    assert odsf(noisy, gt) < 100.0
    assert odsf(noisy[None, None], label[None, None]) == pytest.approx(100.0)
    np.testing.assert_allclose(edge_thresholds(3), [0.25, 0.5, 0.75])
    with pytest.raises(ValueError, match="thresholds"):
        edge_thresholds([0.5, 0.2])
    with pytest.raises(ValueError, match="max_dist"):
        boundary_odsf(gt, gt, max_dist=0.0)


@pytest.mark.skipif(not HAS_PYEDGEEVAL, reason="pyEdgeEval")
def test_scipy_matching_agrees_with_correspond_pixels():
    """The exact minimum-cost matching never pairs fewer pixels than the benchmark's approximate
    one, and at most one more on these small maps."""
    rng = np.random.default_rng(0)
    for _ in range(10):
        a, b = rng.random((24, 40)) > 0.95, rng.random((24, 40)) > 0.95
        for max_dist in (0.02, 0.05):
            exact, approx = _match_scipy(a, b, max_dist), _match_pyedgeeval(a, b, max_dist)
            assert exact[0] == exact[1] and approx[0] == approx[1]
            assert exact[0] >= approx[0] >= exact[0] - 1


def test_unknown_matcher_fails_fast():
    from mtssm.metrics import EdgeAccumulator

    with pytest.raises(ValueError, match="matcher: expected"):
        EdgeAccumulator(matcher="hungarian")
    with pytest.raises(ValueError, match="matcher: expected"):
        boundary_odsf(vertical_line(3), vertical_line(3), matcher="hungarian")

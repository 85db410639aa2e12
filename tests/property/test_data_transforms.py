"""Invariants of the data augmentations over random sizes, scales and crops."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mtssm.data.transforms import PadTo, RandomCrop, RandomHorizontalFlip, RandomScale, RandomScaleCrop


def _sample(h: int, w: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    cls = rng.integers(0, 40, (h, w)).astype(np.uint8)
    n = rng.normal(size=(h, w, 3)).astype(np.float32)
    return {
        "image": rng.integers(0, 256, (h, w, 3)).astype(np.uint8),
        "semseg": cls,
        "depth": rng.uniform(0.5, 10, (h, w)).astype(np.float32),
        "normals": n / np.linalg.norm(n, axis=-1, keepdims=True),
        "edge": (cls % 2).astype(np.uint8),
        "meta": {"id": "p", "size": (h, w)},
    }


sizes = st.tuples(st.integers(4, 40), st.integers(4, 40))


@settings(max_examples=20, deadline=None)
@given(size=sizes, crop=sizes, seed=st.integers(0, 2**16))
def test_fused_scale_crop_equals_scale_then_crop(size, crop, seed) -> None:
    s = _sample(*size, seed)
    fused = RandomScaleCrop(crop)(s, np.random.default_rng(seed))
    rng = np.random.default_rng(seed)
    two = PadTo(crop)(RandomCrop(crop)(RandomScale()(s, rng), rng))
    for key in ("semseg", "depth", "normals", "edge"):
        np.testing.assert_array_equal(fused[key], two[key])
    assert fused["image"].shape == (*crop, 3)
    # same filter positions; PIL's fixed-point weights may round differently by a level or two
    diff = np.abs(fused["image"].astype(int) - two["image"])
    assert diff.max() <= 2 and diff.mean() < 0.5


@settings(max_examples=20, deadline=None)
@given(size=sizes, seed=st.integers(0, 2**16))
def test_flip_twice_is_identity(size, seed) -> None:
    s = _sample(*size, seed)
    flip = RandomHorizontalFlip(1.0)
    twice = flip(flip(s, np.random.default_rng(0)), np.random.default_rng(0))
    for key in ("image", "semseg", "depth", "normals", "edge"):
        np.testing.assert_array_equal(twice[key], s[key])


@settings(max_examples=20, deadline=None)
@given(size=sizes, pad=sizes, seed=st.integers(0, 2**16))
def test_pad_then_crop_back_is_identity(size, pad, seed) -> None:
    s = _sample(*size, seed)
    out = PadTo(pad)(s, np.random.default_rng(0))
    h, w = size
    top, left = out["meta"].get("offset", (0, 0))
    assert (top, left) == (max(pad[0] - h, 0) // 2, max(pad[1] - w, 0) // 2)  # centred
    for key in ("image", "semseg", "depth", "normals", "edge"):
        np.testing.assert_array_equal(out[key][top : top + h, left : left + w], s[key])


@settings(max_examples=20, deadline=None)
@given(size=sizes, seed=st.integers(0, 2**16))
def test_scale_divides_depth_and_keeps_normals_unit(size, seed) -> None:
    s = _sample(*size, seed)
    out = RandomScale()(s, np.random.default_rng(seed))
    scale = np.random.default_rng(seed).uniform(0.5, 2.0)
    assert out["depth"].shape == (max(int(size[0] * scale), 1), max(int(size[1] * scale), 1))
    ratio = scale
    # every output depth is some input depth divided by the drawn scale
    src = np.sort(s["depth"].ravel())
    got = (out["depth"] * ratio).ravel()
    idx = np.clip(np.searchsorted(src, got), 1, len(src) - 1)
    nearest = np.minimum(np.abs(src[idx] - got), np.abs(src[idx - 1] - got))
    assert (nearest < 1e-4 * got).all()
    np.testing.assert_allclose(np.linalg.norm(out["normals"], axis=-1), 1.0, atol=1e-5)

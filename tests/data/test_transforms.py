"""Every augmentation keeps every task consistent with the image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mtssm.data import IMAGENET_MEAN, IMAGENET_STD, NYUDv2, build_dataset
from mtssm.data.datasets import encode_normals
from mtssm.data.render import random_scene, render_scene
from mtssm.data.transforms import (
    PadTo,
    PhotometricDistortion,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScale,
    RandomScaleCrop,
    ToTensor,
    eval_transforms,
    normalize_image,
    train_transforms,
)

LABEL_KEYS = ("semseg", "human_parts", "sal", "edge")


def block_sample(h: int, w: int, seed: int = 0, block: int = 12) -> dict:
    """A raw sample whose every task is a function of a blocky class map, so any geometric
    transform can be checked pixel by pixel: image = palette[c], depth = c + 1, normals = unit
    vector of class c, edge = c % 2, human_parts = c % 7, sal = c % 2."""
    rng = np.random.default_rng(seed)
    hb, wb = -(-h // block), -(-w // block)
    classes = rng.integers(0, 20, (hb, wb)).repeat(block, 0).repeat(block, 1)[:h, :w].astype(np.uint8)
    return {
        "image": PALETTE[classes],
        "semseg": classes.copy(),
        "depth": (classes + 1).astype(np.float32),
        "normals": NORMALS[classes],
        "edge": (classes % 2).astype(np.uint8),
        "human_parts": (classes % 7).astype(np.uint8),
        "sal": (classes % 2).astype(np.uint8),
        "meta": {"id": f"block{seed}", "size": (h, w)},
    }


PALETTE = np.random.default_rng(0).integers(0, 256, (20, 3)).astype(np.uint8)
PALETTE[:, 0] = np.arange(20) * 12 + 8  # red channel alone identifies the class
_n = np.random.default_rng(1).normal(size=(20, 3))
NORMALS = (_n / np.linalg.norm(_n, axis=1, keepdims=True)).astype(np.float32)


def assert_consistent(out: dict, scale: float = 1.0, flipped: bool = False) -> None:
    """In a transformed block sample, every valid pixel's tasks agree with the class read off the
    image's red channel (padding excepted: labels 255, depth 0, normals 0, image 0)."""
    cls = out["semseg"].astype(np.int64)
    pad = cls == 255
    for key in LABEL_KEYS:
        assert (out[key][pad] == 255).all(), key
    assert (out["depth"][pad] == 0).all() and (out["normals"][pad] == 0).all()
    valid = ~pad
    c = cls[valid]
    np.testing.assert_array_equal(out["human_parts"][valid], c % 7)
    np.testing.assert_array_equal(out["sal"][valid], c % 2)
    np.testing.assert_array_equal(out["edge"][valid], c % 2)
    np.testing.assert_allclose(out["depth"][valid], (c + 1) / scale, rtol=1e-5)
    expected_n = NORMALS[c].copy()
    if flipped:
        expected_n[:, 0] *= -1
    np.testing.assert_allclose(out["normals"][valid], expected_n, atol=1e-6)
    # The image is bilinear at pixel centres, the labels OpenCV's nearest (top-left rule, as the
    # official RandomScaling): they may sit a pixel apart, so compare only where the 5x5
    # neighbourhood has one class.
    h, w = cls.shape
    padded = np.pad(cls, 2, constant_values=-1)  # the window continues unseen past its border
    uniform = np.ones_like(valid)
    for dy in range(5):
        for dx in range(5):
            uniform &= padded[dy : dy + h, dx : dx + w] == cls
    inner = uniform & valid
    assert inner.sum() > 0.05 * valid.sum()
    red = out["image"][..., 0].astype(np.int64)[inner]
    np.testing.assert_allclose(red, PALETTE[cls[inner], 0], atol=2)


@pytest.mark.parametrize("seed", range(4))
def test_random_scale_keeps_tasks_aligned(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sample = block_sample(40, 56, seed)
    out = RandomScale((0.5, 2.0))(sample, rng)
    s = np.random.default_rng(seed).uniform(0.5, 2.0)
    assert out["image"].shape[:2] == (int(40 * s), int(56 * s))  # truncated, as the official
    assert_consistent(out, scale=s)


@pytest.mark.parametrize("seed", range(4))
def test_random_crop_then_pad_centres_with_ignore_values(seed: int) -> None:
    sample = block_sample(40, 56, seed)
    cropped = RandomCrop((48, 48))(sample, np.random.default_rng(seed))
    assert cropped["image"].shape == (40, 48, 3)  # a short side stays short
    out = PadTo((48, 48))(cropped)
    assert out["image"].shape == (48, 48, 3) and out["meta"]["offset"] == (4, 0)
    assert (out["semseg"][:4] == 255).all() and (out["semseg"][44:] == 255).all()
    assert (out["image"][:4] == 0).all()
    assert_consistent(out)


@pytest.mark.parametrize("seed", range(6))
def test_fused_scale_crop_equals_scale_then_crop(seed: int) -> None:
    sample = block_sample(40, 56, seed)
    fused = RandomScaleCrop((32, 48))(sample, np.random.default_rng(seed))
    rng = np.random.default_rng(seed)
    two_step = PadTo((32, 48))(RandomCrop((32, 48))(RandomScale()(sample, rng), rng))
    for key in ("semseg", "human_parts", "sal", "edge", "depth", "normals"):
        np.testing.assert_array_equal(fused[key], two_step[key], err_msg=key)
    assert np.abs(fused["image"].astype(int) - two_step["image"]).max() <= 1
    assert_consistent(fused, scale=1.0 if fused["depth"].max() == 0 else _scale_of(fused, sample))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("encoded", [False, True])
def test_fused_flip_equals_scale_crop_then_flip(seed: int, encoded: bool) -> None:
    """``RandomScaleCrop(flip_p=p)`` is the official order: scale, crop, RandomHorizontalFlip(p)
    (its draw after the crop's), then centred padding; crops larger than the scaled image make
    every other seed pad."""
    sample = block_sample(40, 56, seed)
    if encoded:  # normals as stored uint8 codes with the flag channel
        sample["normals"] = encode_normals(np.rint((sample["normals"] + 1) * 127.5).astype(np.uint8))
    crop = (32, 48) if seed % 2 else (73, 101)
    fused = RandomScaleCrop(crop, flip_p=0.5)(sample, np.random.default_rng(seed))
    rng = np.random.default_rng(seed)
    scaled = RandomScale()(sample, rng)
    two_step = PadTo(crop)(RandomHorizontalFlip(0.5)(RandomCrop(crop)(scaled, rng), rng))
    for key in ("semseg", "human_parts", "sal", "edge", "depth", "normals"):
        np.testing.assert_array_equal(fused[key], two_step[key], err_msg=key)
    assert np.abs(fused["image"].astype(int) - two_step["image"]).max() <= 1  # one resampling vs two


def test_fused_flip_draws_both_ways_over_the_seeds_above() -> None:
    sample = block_sample(40, 56, 0)
    flipped = set()
    for seed in range(8):  # crops never larger than the scaled image: no padding
        plain = RandomScaleCrop((16, 24))(sample, np.random.default_rng(seed))
        fused = RandomScaleCrop((16, 24), flip_p=0.5)(sample, np.random.default_rng(seed))
        flipped.add(not np.array_equal(plain["semseg"], fused["semseg"]))
        if not np.array_equal(plain["semseg"], fused["semseg"]):
            np.testing.assert_array_equal(fused["semseg"], plain["semseg"][:, ::-1])
    assert flipped == {False, True}


def _scale_of(out: dict, sample: dict) -> float:
    valid = out["depth"] > 0
    return float(np.median((out["semseg"][valid] + 1.0) / out["depth"][valid]))


def test_flip_negates_normals_x_and_mirrors_everything() -> None:
    sample = block_sample(40, 56, 1)
    out = RandomHorizontalFlip(1.0)(sample, np.random.default_rng(0))
    np.testing.assert_array_equal(out["semseg"], sample["semseg"][:, ::-1])
    np.testing.assert_array_equal(out["image"], sample["image"][:, ::-1])
    assert_consistent(out, flipped=True)
    assert np.array_equal(sample["normals"], NORMALS[sample["semseg"]])  # input untouched
    assert RandomHorizontalFlip(0.0)(sample, np.random.default_rng(0)) is sample


@pytest.mark.parametrize("seed", [0, 1])
def test_flip_of_a_render_equals_the_mirrored_render(seed: int) -> None:
    """Flipping a rendered scene through the transform gives the render of the mirrored scene."""
    scene = random_scene(seed, people=1.0)
    r, m = render_scene(scene, (48, 64)), render_scene(scene.mirrored(), (48, 64))

    def as_sample(x: dict) -> dict:
        return {"image": x["image"], "semseg": x["label"], "depth": x["depth"], "normals": x["normals"],
                "edge": x["edge"], "human_parts": x["part"], "meta": {"id": "s", "size": (48, 64)}}  # fmt: skip

    flipped = RandomHorizontalFlip(1.0)(as_sample(r), np.random.default_rng(0))
    mirrored = as_sample(m)
    for key in ("image", "semseg", "edge", "human_parts"):
        assert (flipped[key] == mirrored[key]).mean() > 0.995, key
    assert (np.abs(flipped["depth"] - mirrored["depth"]) < 1e-3).mean() > 0.995
    assert (np.abs(flipped["normals"] - mirrored["normals"]).max(-1) < 1e-3).mean() > 0.995


def test_encoded_normals_follow_the_same_rules(nyud_root: Path) -> None:
    """uint8 normal codes (what build_dataset streams) give the same tensors as float normals."""
    ds = NYUDv2(nyud_root, "train")
    enc = NYUDv2(nyud_root, "train")
    enc.encoded_normals = True
    pipe = train_transforms((40, 40))
    for seed in range(4):
        a = pipe(ds.load(seed), np.random.default_rng(seed))
        b = pipe(enc.load(seed), np.random.default_rng(seed))
        for key in a:
            if key != "meta":
                torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)


def test_photometric_changes_only_the_image() -> None:
    sample = block_sample(32, 32, 2)
    changed = 0
    for seed in range(8):
        out = PhotometricDistortion()(sample, np.random.default_rng(seed))
        for key in ("semseg", "depth", "normals", "edge", "human_parts", "sal"):
            assert out[key] is sample[key]
        assert out["image"].dtype == np.uint8 and out["image"].shape == sample["image"].shape
        changed += not np.array_equal(out["image"], sample["image"])
    assert changed >= 6


def test_pad_never_resizes() -> None:
    sample = block_sample(30, 20, 0)
    out = PadTo((32, 32))(sample, np.random.default_rng(0))
    np.testing.assert_array_equal(out["semseg"][1:31, 6:26], sample["semseg"])  # centred
    assert (out["semseg"][[0, 31]] == 255).all() and (out["depth"][:, 26:] == 0).all()
    assert (out["depth"][:, :6] == 0).all() and out["meta"]["offset"] == (1, 6)
    assert PadTo((16, 16))(sample, np.random.default_rng(0)) is sample


def test_to_tensor_layout_and_normalisation() -> None:
    sample = block_sample(24, 32, 0)
    t = ToTensor()(sample)
    assert t["image"].shape == (3, 24, 32) and t["image"].dtype == torch.float32
    expected = (sample["image"][..., 1] / 255.0 - IMAGENET_MEAN[1]) / IMAGENET_STD[1]
    torch.testing.assert_close(t["image"][1], torch.from_numpy(expected).float())
    assert t["semseg"].dtype == torch.int64 and t["semseg"].shape == (24, 32)
    assert t["depth"].shape == (1, 24, 32) and t["edge"].shape == (1, 24, 32)
    assert t["normals"].shape == (3, 24, 32)


@pytest.mark.parametrize("seed", range(3))
def test_train_pipeline_on_rendered_data_keeps_geometry(nyud_root: Path, seed: int) -> None:
    """Through the whole train pipeline: normals stay unit up to their code step (0 exactly in
    the padding), labels stay in range, and crop size is exact."""
    ds = build_dataset("nyud", nyud_root, "train", train=True, crop_size=(40, 56))
    out = ds[(seed, seed)]
    assert out["image"].shape == (3, 40, 56)
    n = out["normals"].norm(dim=0)
    pad = out["semseg"] == 255
    assert torch.allclose(n[~pad & (out["depth"][0] > 0)], torch.ones(()), atol=0.01)
    assert ((out["semseg"] < 40) | pad).all()
    assert set(out["edge"].unique().tolist()) <= {0.0, 1.0, 255.0}
    assert out["meta"]["size"] == (48, 64)
    again = ds[(seed, seed)]
    for key in ("image", "semseg", "depth", "normals", "edge"):
        assert torch.equal(out[key], again[key])  # the seed fixes the augmentation


def test_eval_pipeline_is_the_raw_sample(nyud_root: Path) -> None:
    raw = NYUDv2(nyud_root, "val")[0]
    ev = build_dataset("nyud", nyud_root, "val", train=False)[0]
    assert torch.equal(ev["semseg"], torch.from_numpy(raw["semseg"].astype(np.int64)))
    assert torch.equal(ev["depth"][0], torch.from_numpy(raw["depth"]))
    torch.testing.assert_close(ev["normals"], torch.from_numpy(raw["normals"]).permute(2, 0, 1))
    padded = eval_transforms((64, 64))(NYUDv2(nyud_root, "val").load(0), np.random.default_rng(0))
    assert padded["image"].shape == (3, 64, 64) and padded["meta"]["offset"] == (8, 0)
    assert (padded["semseg"][:8] == 255).all() and (padded["semseg"][56:] == 255).all()


def test_compact_to_tensor_keeps_levels_and_codes(nyud_root: Path) -> None:
    ds = NYUDv2(nyud_root, "train")
    ds.encoded_normals = True
    raw = ds.load(0)
    compact = ToTensor(compact=True)(raw)
    full = ToTensor()(raw)
    assert compact["image"].dtype == torch.uint8 and compact["image"].shape == (3, 48, 64)
    assert torch.equal(compact["image"], torch.from_numpy(raw["image"]).permute(2, 0, 1))
    assert compact["semseg"].dtype == torch.uint8 and compact["edge"].shape == (1, 48, 64)
    assert compact["normals"].dtype == torch.uint8 and compact["normals"].shape == (4, 48, 64)
    assert torch.equal(normalize_image(compact["image"]), full["image"])
    assert torch.equal(compact["semseg"].long(), full["semseg"]) and torch.equal(compact["depth"], full["depth"])


def test_normalize_image_and_flip_p_reject_bad_input() -> None:
    with pytest.raises(TypeError, match="uint8"):
        normalize_image(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, H, W\)"):
        normalize_image(torch.zeros(4, 4, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="out must be"):
        normalize_image(torch.zeros(3, 4, 4, dtype=torch.uint8), out=torch.empty(3, 4, 5))
    with pytest.raises(ValueError, match="flip_p"):
        RandomScaleCrop(8, flip_p=1.5)


@pytest.mark.parametrize("s, loc, flip", [(0.5, (0, 0), False), (0.73, (3, 5), True), (1.0, (10, 30), False),
                                          (1.37, (20, 2), True), (1.9, (50, 60), True), (2.0, (0, 70), False)])  # fmt: skip
def test_scale_crop_flip_pad_equal_the_official_transforms(s: float, loc: tuple[int, int], flip: bool) -> None:
    """For the same draws, every target equals what the official RandomScaling (OpenCV nearest,
    truncated size, depth / s), RandomCrop, RandomHorizontalFlip, PadImage (centred) and
    AddIgnoreRegions make, bit for bit; normals also when they travel as codes."""
    from mtssm.data.datasets import decode_normals
    from mtssm.data.transforms import IgnoreEmptyParts, _resample, _scaled_size
    from tests.data import official

    rng = np.random.default_rng(5)
    h, w, size = 37, 53, (32, 48)
    codes = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    parts = np.zeros((h, w), np.uint8)
    parts[2:12, 3:9] = rng.integers(1, 7, (10, 6))  # a person near the top-left corner
    sample = {
        "image": rng.integers(0, 256, (h, w, 3)).astype(np.uint8),
        "semseg": rng.integers(0, 21, (h, w)).astype(np.uint8),
        "depth": rng.uniform(0, 10, (h, w)).astype(np.float32) * (rng.random((h, w)) > 0.1),
        "normals": decode_normals(codes),
        "edge": (rng.random((h, w)) > 0.8).astype(np.uint8),
        "human_parts": parts,
        "meta": {"id": "x", "size": (h, w)},
    }
    hs, ws = _scaled_size(h, w, s)
    box = (loc[0], loc[1], min(size[0], hs - loc[0]), min(size[1], ws - loc[1]))
    assert box[2] > 0 and box[3] > 0
    ours = IgnoreEmptyParts()(_resample(sample, (hs, ws), box, size, flip, depth_scale=s))
    dense = {k: v.astype(np.float32) for k, v in sample.items() if k not in ("image", "meta")}
    ref = official.scale_crop_flip_pad(dense, s, loc, size, flip)
    for key in ("semseg", "edge", "human_parts"):
        np.testing.assert_array_equal(ours[key].astype(np.float32), ref[key], err_msg=key)
    np.testing.assert_array_equal(np.where(ours["depth"] == 0, 255, ours["depth"]), ref["depth"])
    np.testing.assert_array_equal(ours["normals"], np.where(ref["normals"] == 255, 0, ref["normals"]))
    coded = _resample({**sample, "normals": encode_normals(codes)}, (hs, ws), box, size, flip, depth_scale=s)
    np.testing.assert_array_equal(decode_normals(coded["normals"]), ours["normals"])
    if loc == (50, 60):  # a window beside the person: its parts map is ignored
        assert (ours["human_parts"] == 255).all()

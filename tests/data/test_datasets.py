"""Reading each layout through the public datasets, against the renderer's ground truth, and
every kind of broken file."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtssm.data import (
    NUM_CLASSES,
    TASKS_BY_DATASET,
    Cityscapes,
    DataFileError,
    NYUDv2,
    PASCALContext,
)
from mtssm.data.datasets import decode_normals, label_edges
from mtssm.data.render import random_scene, render_scene


def _truth(root_seed: int, index: int, size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Re-render scene ``index`` of ``render_scenes(seed=root_seed)``."""
    seed = int(np.random.SeedSequence([root_seed, index]).generate_state(1)[0])
    rng = np.random.default_rng(seed)
    return render_scene(random_scene(rng, people=0.3), size)


def test_nyud_raw_samples_match_the_renderer(nyud_root: Path) -> None:
    ds = NYUDv2(nyud_root, "train")
    assert len(ds) == 6 and ds.tasks == TASKS_BY_DATASET["nyud"]
    for i in range(2):
        s = ds[i]
        truth = _truth(3, int(s["meta"]["id"]), (48, 64))
        assert s["meta"]["size"] == (48, 64)
        assert s["image"].dtype == np.uint8 and s["image"].shape == (48, 64, 3)
        np.testing.assert_array_equal(s["image"], truth["image"])
        expected = truth["label"].astype(np.int64) - 1
        expected[expected < 0] = 255
        np.testing.assert_array_equal(s["semseg"], expected)
        assert s["semseg"][s["semseg"] != 255].max() < NUM_CLASSES["nyud"]["semseg"]
        np.testing.assert_array_equal(s["depth"], truth["depth"])
        valid = np.linalg.norm(truth["normals"], axis=-1) > 0
        np.testing.assert_allclose(s["normals"][valid], truth["normals"][valid], atol=0.01)
        np.testing.assert_allclose(np.linalg.norm(s["normals"][valid], axis=-1), 1.0, atol=1e-5)
        assert (s["normals"][~valid] == 0).all()
        np.testing.assert_array_equal(s["edge"], truth["edge"])


def test_tasks_subset_and_argument_errors(nyud_root: Path, tmp_path: Path) -> None:
    s = NYUDv2(nyud_root, "val", tasks=["depth"])[0]
    assert set(s) == {"image", "depth", "meta"}
    with pytest.raises(ValueError, match="human_parts"):
        NYUDv2(nyud_root, "train", tasks=["human_parts"])
    with pytest.raises(ValueError, match="split"):
        NYUDv2(nyud_root, "test")
    with pytest.raises(ValueError, match="on_error"):
        NYUDv2(nyud_root, "train", on_error="ignore")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        NYUDv2(tmp_path / "missing", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/images"):
        NYUDv2(tmp_path / "empty", "train")
    with pytest.raises(FileNotFoundError, match=r"JPEGImages"):
        PASCALContext(nyud_root, "train")
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit/train"):
        Cityscapes(nyud_root, "train")


def test_pascal_samples(pascal_root: Path) -> None:
    ds = PASCALContext(pascal_root, "train")
    seen_people = 0
    for i in range(len(ds)):
        s = ds[i]
        h, w = s["meta"]["size"]
        assert s["image"].shape == (h, w, 3) and 42 <= h <= 48 and 56 <= w <= 64
        sem = s["semseg"]
        assert ((sem < NUM_CLASSES["pascal"]["semseg"]) | (sem == 255)).all()
        hp = s["human_parts"]
        people = (sem == 15).any()
        if people and (hp != 255).any():
            seen_people += 1
            assert set(np.unique(hp)) <= set(range(7))
            # every person pixel carries a part, and parts lie on person pixels
            assert ((hp > 0) == (sem == 15)).mean() > 0.99
        else:
            assert (hp == 255).all()
        assert set(np.unique(s["sal"])) <= {0, 1}
        np.testing.assert_array_equal(s["sal"], ((sem != 0) & (sem != 255)).astype(np.uint8))
        assert set(np.unique(s["edge"])) <= {0, 1} and s["edge"].any()
        valid = np.linalg.norm(s["normals"], axis=-1) > 0
        np.testing.assert_allclose(np.linalg.norm(s["normals"][valid], axis=-1), 1.0, atol=1e-5)
    assert seen_people >= 2


def test_pascal_edges_are_thin_label_discontinuities(pascal_root: Path) -> None:
    from scipy.io import loadmat

    ds = PASCALContext(pascal_root, "val", tasks=["edge"])
    sid = ds.ids[0]
    labels = loadmat(pascal_root / "pascal-context" / "trainval" / f"{sid}.mat")["LabelMap"].astype(int)
    edge = ds[0]["edge"].astype(bool)
    boundary = np.zeros_like(edge)
    boundary[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    boundary[:, :-1] |= labels[:, 1:] != labels[:, :-1]
    boundary[1:] |= labels[1:] != labels[:-1]
    boundary[:-1] |= labels[1:] != labels[:-1]
    assert edge.any() and not (edge & ~boundary).any()  # edges only at discontinuities
    # every discontinuity has one of its two pixels marked, and the line is thinner than the
    # two-sided boundary
    cross = labels[:, 1:] != labels[:, :-1]
    assert (edge[:, 1:] | edge[:, :-1])[cross].all()
    down = labels[1:] != labels[:-1]
    assert (edge[1:] | edge[:-1])[down].all()
    assert edge.sum() < 0.6 * boundary.sum()


def test_label_edges_marks_one_side() -> None:
    labels = np.zeros((6, 8), int)
    labels[:, 4:] = 3
    edge = label_edges(labels).astype(bool)
    assert edge[:, 4].all() and edge.sum() == 6


def test_pascal_parts_mat_is_parsed_with_scipy(pascal_root: Path, tmp_path: Path) -> None:
    """The renderer writes PASCAL-Part ``anno`` structs; the loader maps part names to the 6 parts."""
    from scipy.io import loadmat

    ds = PASCALContext(pascal_root, "train", tasks=["human_parts"])
    for i, sid in enumerate(ds.ids):
        anno = loadmat(pascal_root / "human_parts" / f"{sid}.mat")["anno"]
        objects = anno[0, 0]["objects"]
        persons = [o for o in objects[0] if int(o["class_ind"][0, 0]) == 15] if objects.size else []
        hp = ds[i]["human_parts"]
        if persons:
            names = {str(p["part_name"][0]) for o in persons for p in o["parts"][0]}
            assert names <= {"head", "torso", "luarm", "ruarm", "llarm", "rlarm", "luleg", "ruleg", "llleg", "rlleg"}
            head = sum(p["mask"].astype(bool) for o in persons for p in o["parts"][0] if p["part_name"][0] == "head")
            if np.any(head):
                assert (hp[head.astype(bool)] == 1).all()
        else:
            assert (hp == 255).all()


def test_cityscapes_depth_from_disparity(cityscapes_root: Path) -> None:
    ds = Cityscapes(cityscapes_root, "train")
    assert len(ds) == 3 and ds.ids[0].startswith("aachen/")
    s = ds[0]
    idx = int(ds.ids[0].split("_")[1])
    truth = _truth(7, idx, (48, 96))
    d = s["depth"]
    assert d.dtype == np.float32 and ((d == 0) | ((d > 0) & (d < 80))).all()
    valid = (d > 0) & (truth["depth"] > 0)
    assert valid.mean() > 0.8
    np.testing.assert_allclose(d[valid], truth["depth"][valid], rtol=0.01)
    sem = s["semseg"]
    assert ((sem < NUM_CLASSES["cityscapes"]["semseg"]) | (sem == 255)).all()
    # floor -> road (0), wall -> wall (3), ceiling -> sky (10)
    np.testing.assert_array_equal(sem[truth["label"] == 2], 0)
    np.testing.assert_array_equal(sem[truth["label"] == 1], 3)


# ---------------------------------------------------------------------------- corrupt copies


def _first_train_id(root: Path) -> str:
    return (root / "gt_sets" / "train.txt").read_text().split()[0]


def test_missing_file_is_named(corruptible_nyud: Path) -> None:
    sid = _first_train_id(corruptible_nyud)
    path = corruptible_nyud / "depth" / f"{sid}.npy"
    path.unlink()
    with pytest.raises(DataFileError, match=f"{path}: file is missing"):
        NYUDv2(corruptible_nyud, "train")[0]


def test_truncated_png_is_named(corruptible_nyud: Path) -> None:
    sid = _first_train_id(corruptible_nyud)
    path = corruptible_nyud / "images" / f"{sid}.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFileError, match=f"{path}: cannot decode"):
        NYUDv2(corruptible_nyud, "train")[0]


def test_wrong_size_label_is_named(corruptible_nyud: Path) -> None:
    sid = _first_train_id(corruptible_nyud)
    path = corruptible_nyud / "segmentation" / f"{sid}.png"
    Image.fromarray(np.ones((40, 64), np.uint8)).save(path)
    with pytest.raises(DataFileError, match=r"size \(40, 64\) does not match the image size \(48, 64\)"):
        NYUDv2(corruptible_nyud, "train")[0]


@pytest.mark.parametrize("folder, value, match", [("segmentation", 41, "out of range"), ("edge", 128, "out of range")])
def test_out_of_range_values_are_named(corruptible_nyud: Path, folder: str, value: int, match: str) -> None:
    sid = _first_train_id(corruptible_nyud)
    path = corruptible_nyud / folder / f"{sid}.png"
    arr = np.asarray(Image.open(path)).copy()
    arr[3, 3] = value
    Image.fromarray(arr).save(path)
    with pytest.raises(DataFileError, match=f"{path}: .*{value}.*{match}"):
        NYUDv2(corruptible_nyud, "train")[0]


@pytest.mark.parametrize("bad", [-1.0, np.nan, np.inf, -np.inf])
def test_negative_or_non_finite_depth_is_named(corruptible_nyud: Path, bad: float) -> None:
    sid = _first_train_id(corruptible_nyud)
    path = corruptible_nyud / "depth" / f"{sid}.npy"
    depth = np.full((48, 64), 2.0, np.float32)
    depth[5, 7] = bad
    np.save(path, depth)
    with pytest.raises(DataFileError, match=f"{path}: .*negative or non-finite"):
        NYUDv2(corruptible_nyud, "train")[0]


def test_float64_depth_is_read_as_float32(corruptible_nyud: Path) -> None:
    sid = _first_train_id(corruptible_nyud)
    np.save(corruptible_nyud / "depth" / f"{sid}.npy", np.full((48, 64), 1.5, np.float64))
    depth = NYUDv2(corruptible_nyud, "train")[0]["depth"]
    assert depth.dtype == np.float32 and (depth == 1.5).all()


def test_skip_option_counts_and_warns(corruptible_nyud: Path) -> None:
    sid = _first_train_id(corruptible_nyud)
    (corruptible_nyud / "edge" / f"{sid}.png").unlink()
    ds = NYUDv2(corruptible_nyud, "train", on_error="skip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ds[0] is None
    assert ds.skipped == 1 and any(sid in str(w.message) for w in caught)
    assert ds[1] is not None and ds.skipped == 1


def test_missing_split_file_is_named(corruptible_nyud: Path) -> None:
    (corruptible_nyud / "gt_sets" / "val.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"gt_sets/val.txt"):
        NYUDv2(corruptible_nyud, "val")


def test_never_writes_into_the_dataset_folder(pascal_root: Path) -> None:
    before = sorted(p for p in pascal_root.rglob("*"))
    ds = PASCALContext(pascal_root, "val")
    for i in range(len(ds)):
        ds[i]
    assert sorted(p for p in pascal_root.rglob("*")) == before


def test_decode_normals_matches_the_formula_and_layouts() -> None:
    """n = 2 v / 255 - 1 renormalised, 0 where the raw norm is below 0.1; both layouts and ``out``
    agree, and a mis-shaped ``out`` is refused."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (64, 80, 3)).astype(np.uint8)
    codes[:4] = 128  # the invalid code
    codes[4:6] = (127, 128, 129)  # tiny, invalid
    codes[6, :3] = [(255, 128, 128), (0, 0, 0), (255, 255, 255)]
    raw = codes.astype(np.float64) * 2 / 255 - 1
    norm = np.linalg.norm(raw, axis=-1, keepdims=True)
    expected = np.where(norm >= 0.1, raw / np.maximum(norm, 1e-12), 0.0)
    got = decode_normals(codes)
    assert got.dtype == np.float32 and got.shape == (64, 80, 3)
    np.testing.assert_allclose(got, expected, atol=2e-6, rtol=0)
    assert (got[:6] == 0).all()
    out = np.full((3, 64, 80), np.nan, np.float32)
    assert decode_normals(codes, channels_first=True, out=out) is out
    np.testing.assert_array_equal(out, got.transpose(2, 0, 1))
    with pytest.raises(ValueError, match="out must be"):
        decode_normals(codes, channels_first=True, out=np.empty((3, 64, 81), np.float32))

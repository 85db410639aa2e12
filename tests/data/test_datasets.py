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
from tests.data import official
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
        # decoded as stored (2 v / 255 - 1): within a code step of the unit normals rendered
        np.testing.assert_allclose(s["normals"], truth["normals"], atol=1 / 255 + 1e-6)
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
    from scipy.io import loadmat

    from mtssm.data.constants import PASCAL_NORMALS_VALID_CLASSES

    ds = PASCALContext(pascal_root, "train")
    seen_people, kept_any, dropped_any = 0, False, False
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
        # normals only on the NYU-compatible PASCAL-Context classes of the LabelMap
        label_map = loadmat(pascal_root / "pascal-context" / "trainval" / f"{ds.ids[i]}.mat")["LabelMap"]
        kept = np.isin(label_map, PASCAL_NORMALS_VALID_CLASSES)
        assert (np.linalg.norm(s["normals"][kept], axis=-1) > 0.99).all() and (s["normals"][~kept] == 0).all()
        kept_any, dropped_any = kept_any or kept.any(), dropped_any or (~kept).any()
    assert seen_people >= 2 and kept_any and dropped_any


def test_pascal_edges_are_thin_label_discontinuities(pascal_root: Path) -> None:
    from scipy.io import loadmat

    sid = PASCALContext(pascal_root, "val", tasks=["edge"]).ids[0]
    labels = loadmat(pascal_root / "pascal-context" / "trainval" / f"{sid}.mat")["LabelMap"].astype(int)
    boundary = np.zeros(labels.shape, bool)
    boundary[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    boundary[:, :-1] |= labels[:, 1:] != labels[:, :-1]
    boundary[1:] |= labels[1:] != labels[:-1]
    boundary[:-1] |= labels[1:] != labels[:-1]
    for rule in ("official", "neighbour4"):
        edge = PASCALContext(pascal_root, "val", tasks=["edge"], edge_rule=rule)[0]["edge"].astype(bool)
        assert edge.any() and not (edge & ~boundary).any()  # edges only at discontinuities
        assert edge.sum() < 0.6 * boundary.sum()  # thinner than the two-sided boundary
    # the 4-neighbour rule marks one of the two pixels of every discontinuity
    cross = labels[:, 1:] != labels[:, :-1]
    assert (edge[:, 1:] | edge[:, :-1])[cross].all()
    down = labels[1:] != labels[:-1]
    assert (edge[1:] | edge[:-1])[down].all()


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
    import json

    ds = Cityscapes(cityscapes_root, "train")
    assert len(ds) == 3 and ds.ids[0].startswith("aachen/")
    s = ds[0]
    idx = int(ds.ids[0].split("_")[1])
    truth = _truth(7, idx, (48, 96))
    d = s["depth"]  # disparity in pixels, 0 invalid
    png = np.asarray(Image.open(cityscapes_root / "disparity" / "train" / f"{ds.ids[0]}_disparity.png"))
    np.testing.assert_array_equal(d, np.where(png > 0, (png.astype(np.float32) - 1) / 256, 0))
    city, stem = ds.ids[0].split("/")
    cam = json.loads((cityscapes_root / "camera" / "train" / city / f"{stem}_camera.json").read_text())
    valid = (d > 0) & (truth["depth"] > 0)
    assert valid.mean() > 0.8
    focal = cam["extrinsic"]["baseline"] * cam["intrinsic"]["fx"]
    np.testing.assert_allclose(focal / d[valid], truth["depth"][valid], rtol=0.01)
    metres = Cityscapes(cityscapes_root, "train", depth_target="metres")[0]["depth"]
    both = (metres > 0) & valid
    np.testing.assert_allclose(metres[both], truth["depth"][both], rtol=0.01)
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
    """n = 2 v / 255 - 1 in float32 as the official loaders compute it, for every code; the flag
    channel marks invalid (0) and x-negated (254) pixels; both layouts and ``out`` agree, and a
    mis-shaped ``out`` is refused."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (64, 80, 3)).astype(np.uint8)
    codes[0, :3] = [(128, 128, 128), (0, 0, 0), (255, 255, 255)]
    expected = 2 * codes.astype(np.float32) / 255.0 - 1
    got = decode_normals(codes)
    assert got.dtype == np.float32 and got.shape == (64, 80, 3)
    np.testing.assert_array_equal(got, expected)
    flagged = np.concatenate([codes, np.full((64, 80, 1), 255, np.uint8)], -1)
    flagged[1, :, 3] = 0
    flagged[2, :, 3] = 254
    with_flags = decode_normals(flagged)
    assert (with_flags[1] == 0).all()
    np.testing.assert_array_equal(with_flags[2, :, 0], -expected[2, :, 0])
    np.testing.assert_array_equal(with_flags[3:], expected[3:])
    out = np.full((3, 64, 80), np.nan, np.float32)
    assert decode_normals(codes, channels_first=True, out=out) is out
    np.testing.assert_array_equal(out, got.transpose(2, 0, 1))
    with pytest.raises(ValueError, match="out must be"):
        decode_normals(codes, channels_first=True, out=np.empty((3, 64, 81), np.float32))


# ------------------------------------------------ hand-written official layouts vs the official semantics


def _official_labels(mtssm: np.ndarray, official: np.ndarray) -> None:
    np.testing.assert_array_equal(mtssm.astype(np.float32), official.reshape(mtssm.shape))


def _nyud_by_hand(root: Path) -> Path:
    rng = np.random.default_rng(11)
    samples = {}
    for sid in ("0001", "0002"):
        normals = rng.integers(0, 256, (12, 16, 3)).astype(np.uint8)
        normals[0, :4] = [(128, 128, 128), (0, 0, 0), (255, 255, 255), (127, 128, 129)]
        depth = rng.uniform(0.5, 9.0, (12, 16)).astype(np.float32)
        depth[2:4, 3:6] = 0.0
        samples[sid] = {
            "image": rng.integers(0, 256, (12, 16, 3)).astype(np.uint8),
            "segmentation": rng.integers(0, 41, (12, 16)).astype(np.uint8),
            "depth": depth,
            "normals": normals,
            "edge": (rng.random((12, 16)) > 0.8).astype(np.uint8) * 255,
        }
    return official.write_nyud(root, samples)


def test_nyud_official_layout_decodes_as_the_official_loader(tmp_path: Path) -> None:
    root = _nyud_by_hand(tmp_path / "nyud")
    ds = NYUDv2(root, "train")
    for i, sid in enumerate(ds.ids):
        s, ref = ds[i], official.nyud_official(root, sid)
        np.testing.assert_array_equal(s["image"], ref["image"])
        _official_labels(s["semseg"], ref["semseg"])
        _official_labels(s["edge"], ref["edge"])
        # depth: official 255 (AddIgnoreRegions of 0) is mtssm's invalid 0
        np.testing.assert_array_equal(s["depth"], np.where(ref["depth"] == 255, 0, ref["depth"]))
        # normals 2 v / 255 - 1 as stored, bit for bit, every pixel valid (even 128, 128, 128)
        np.testing.assert_array_equal(s["normals"], ref["normals"])
        assert s["normals"].dtype == np.float32 and (np.abs(s["normals"]).sum(-1) > 0).all()
    # the stricter rule is an option: renormalised, short codes invalid
    strict = NYUDv2(root, "train", normals_rule="unit")[0]["normals"]
    assert (strict[0, 0] == 0).all() and (strict[0, 3] == 0).all()
    valid = np.linalg.norm(strict, axis=-1) > 0
    np.testing.assert_allclose(np.linalg.norm(strict[valid], axis=-1), 1.0, atol=1e-6)


def _pascal_by_hand(root: Path) -> Path:
    rng = np.random.default_rng(12)
    h, w = 24, 32
    C = official.CONTEXT
    label_map = np.full((h, w), C["wall"], np.uint16)
    label_map[16:] = C["grass"]
    label_map[:6] = C["sky"]
    label_map[8:14, 4:12] = C["person"]
    label_map[8:14, 20:30] = C["tvmonitor"]
    label_map[2:5, 14:17] = [1, 2, 3]  # neighbours 1 and 3 around 2 cancel in the Laplacian
    person = np.zeros((h, w), bool)
    person[8:14, 4:12] = True
    head, torso = person.copy(), person.copy()
    head[10:] = False
    torso[:10] = False
    luarm = np.zeros((h, w), bool)
    luarm[11:13, 4:6] = True
    chair = np.zeros((h, w), bool)
    chair[18:22, 20:26] = True
    empty = np.zeros((h, w), bool)
    objects = {
        "2008_000001": [("chair", 9, chair, []),
                        ("person", 15, person, [("head", head), ("torso", torso), ("luarm", luarm)])],
        "2008_000002": [("chair", 9, chair, [])],  # no person
        "2008_000003": [("person", 15, person, [])],  # a person without parts
        "2008_000004": [("person", 15, empty, [("head", head)])],  # parts, but no person area
        "2008_000005": [("person", 15, person, [("head", empty)])],  # parts covering nothing
    }  # fmt: skip
    samples = {}
    for sid, objs in objects.items():
        semseg = np.zeros((h, w), np.uint8)
        semseg[person] = 15
        semseg[chair] = 9
        semseg[0, 0] = 255
        samples[sid] = {
            "image": rng.integers(0, 256, (h, w, 3)).astype(np.uint8),
            "semseg": semseg,
            "objects": objs,
            "normals": rng.integers(0, 256, (h, w, 3)).astype(np.uint8),
            "sal": rng.integers(0, 256, (h, w)).astype(np.uint8),
            "label_map": label_map,
        }
    return official.write_pascal(root, samples)


def test_pascal_official_layout_decodes_as_the_official_loader(tmp_path: Path) -> None:
    root = _pascal_by_hand(tmp_path / "pascal")
    ds = PASCALContext(root, "train")
    parts_kept = []
    for i, sid in enumerate(ds.ids):
        s, ref = ds[i], official.pascal_official(root, sid)
        np.testing.assert_array_equal(s["image"], ref["image"])
        for task in ("semseg", "sal", "edge", "human_parts"):
            _official_labels(s[task], ref[task])
        # normals kept on the NYU-compatible LabelMap classes only; official 255 is mtssm's 0
        ignored = (ref["normals"] == 255).all(-1)
        np.testing.assert_array_equal(s["normals"][~ignored], ref["normals"][~ignored])
        assert (s["normals"][ignored] == 0).all()
        parts_kept.append(bool((s["human_parts"] != 255).any()))
        if i == 0:
            label_map = official.loadmat(root / "pascal-context" / "trainval" / f"{sid}.mat")["LabelMap"]
            assert ignored[label_map == official.CONTEXT["sky"]].all() and ignored[label_map == 1].all()
            assert not ignored[label_map == official.CONTEXT["tvmonitor"]].any()
            assert not ignored[label_map == official.CONTEXT["person"]].any()
            assert s["edge"][3, 15] == 0  # the cancelling discontinuity is no official edge
    assert parts_kept == [True, False, False, False, False]
    # the one-pixel 4-neighbour rule is an option, and it marks the cancelling discontinuity
    alt = PASCALContext(root, "train", tasks=["edge"], edge_rule="neighbour4")[0]["edge"]
    assert alt[3, 15] == 1 and not np.array_equal(alt, ds[0]["edge"])


def test_pascal_encoded_normals_decode_to_the_same_values(tmp_path: Path) -> None:
    from mtssm.data.transforms import ToTensor

    root = _pascal_by_hand(tmp_path / "pascal")
    plain = PASCALContext(root, "train", tasks=["normals"])[0]["normals"]
    ds = PASCALContext(root, "train", tasks=["normals"])
    ds.encoded_normals = True
    codes = ds[0]["normals"]
    assert codes.dtype == np.uint8 and codes.shape == plain.shape[:2] + (4,)
    decoded = ToTensor()({"image": np.zeros(plain.shape, np.uint8), "normals": codes, "meta": {}})["normals"]
    np.testing.assert_array_equal(decoded.permute(1, 2, 0).numpy(), plain)


def test_normals_valid_classes_are_the_official_list() -> None:
    from mtssm.data.constants import PASCAL_NORMALS_VALID_CLASSES as valid

    assert len(valid) == len(set(valid)) == 170
    C = official.CONTEXT
    assert {C["wall"], C["floor"], C["person"], C["tvmonitor"], C["chair"]} <= set(valid)
    assert not {C["sky"], C["grass"], C["tree"], C["water"], C["accordion"], C["aeroplane"]} & set(valid)


def test_cityscapes_official_layout_decodes_as_mtmamba_pp(tmp_path: Path) -> None:
    from mtssm.data import build_dataset
    from mtssm.data.transforms import ResizeImage

    h, w = 1024, 2048
    yy, xx = np.mgrid[0:h, 0:w]
    label_ids = ((xx // 128 + yy // 128) % 34).astype(np.uint8)
    label_ids[:64] = 10  # rail track: MTMamba++ gives it disparity 0
    disparity = ((xx * 37 + yy * 11) % 30000 + 1).astype(np.uint16)
    disparity[100:140] = 0  # invalid
    disparity[140:150] = 1  # disparity exactly 0
    image = np.stack([(xx // 8) % 256, (yy // 4) % 256, (xx + yy) % 256], -1).astype(np.uint8)
    root = official.write_cityscapes(tmp_path / "cs", {"aachen/aachen_000000_000019": {
        "image": image, "label_ids": label_ids, "disparity": disparity}})  # fmt: skip
    ref = official.cityscapes_official(root, "aachen/aachen_000000_000019")
    raw = Cityscapes(root, "train")[0]
    _official_labels(raw["semseg"], ref["semseg"])
    d = raw["depth"]
    positive = ref["depth"] > 0
    np.testing.assert_array_equal(d[positive], ref["depth"][positive])
    assert (d[~positive] == 0).all()  # official -1 (invalid) and 0 (labelId 10, v = 1): never scored
    np.testing.assert_array_equal(ResizeImage((512, 1024))(raw)["image"], ref["image"])
    # the pipeline: image 512x1024, labels at 1024x2048, no augmentation
    s = build_dataset("cityscapes", root, "train", train=True)[(0, 123)]
    assert s["image"].shape == (3, 512, 1024) and s["semseg"].shape == (h, w) and s["depth"].shape == (1, h, w)
    np.testing.assert_array_equal(s["depth"][0].numpy(), d)
    np.testing.assert_array_equal(s["semseg"].numpy(), raw["semseg"])
    metres = Cityscapes(root, "train", depth_target="metres")[0]["depth"]
    assert ((metres == 0) | ((metres > 0) & (metres < 80))).all()

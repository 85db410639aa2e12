"""The renderer: deterministic, geometrically exact, mirror-consistent, layouts complete."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from mtssm.data import render_scenes
from mtssm.data.render import _camera_rays, random_scene, render_scene


def test_render_is_deterministic_per_seed() -> None:
    a = render_scene(random_scene(11), (40, 56))
    b = render_scene(random_scene(11), (40, 56))
    c = render_scene(random_scene(12), (40, 56))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["image"], c["image"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mirrored_scene_renders_the_flipped_image(seed: int) -> None:
    scene = random_scene(seed, people=1.0)
    r, m = render_scene(scene, (60, 80)), render_scene(scene.mirrored(), (60, 80))
    for key in ("image", "label", "edge", "part", "depth"):
        agree = np.isclose(m[key].astype(np.float64), r[key][:, ::-1].astype(np.float64), atol=1e-3)
        assert agree.mean() > 0.995, key
    flipped = r["normals"][:, ::-1].copy()
    flipped[..., 0] *= -1
    assert (np.abs(m["normals"] - flipped).max(-1) < 1e-3).mean() > 0.995


@pytest.mark.parametrize("seed", [3, 4])
def test_depth_and_normals_agree_with_geometry(seed: int) -> None:
    """Normals equal the normalised cross product of neighbouring back-projected depth points,
    and floor pixels lie on the floor plane."""
    scene = random_scene(seed)
    size = (96, 128)
    r = render_scene(scene, size)
    rays, rot = _camera_rays(scene, size)
    pts = rays * r["depth"][..., None]  # camera frame
    dx = pts[1:-1, 2:] - pts[1:-1, :-2]
    dy = pts[2:, 1:-1] - pts[:-2, 1:-1]
    est = np.cross(dx, dy)
    est /= np.linalg.norm(est, axis=-1, keepdims=True) + 1e-12
    inst = r["instance"]
    same = np.ones_like(inst[1:-1, 1:-1], bool)
    for sl in ((slice(0, -2), slice(1, -1)), (slice(2, None), slice(1, -1)), (slice(1, -1), slice(0, -2)),
               (slice(1, -1), slice(2, None))):  # fmt: skip
        same &= inst[sl] == inst[1:-1, 1:-1]
    same &= r["depth"][1:-1, 1:-1] > 0
    cos = np.abs((est * r["normals"][1:-1, 1:-1]).sum(-1))[same]
    assert np.median(cos) > 0.999 and (cos > 0.95).mean() > 0.95
    world = pts @ rot.T
    floor = r["label"] == 2
    assert floor.any()
    np.testing.assert_allclose(world[floor][:, 1], scene.floor, atol=1e-3)
    # normals face the camera
    valid = r["depth"] > 0
    assert ((r["normals"] * rays).sum(-1)[valid] < 0).mean() > 0.999
    np.testing.assert_allclose(np.linalg.norm(r["normals"][valid], axis=-1), 1.0, atol=1e-4)


@pytest.mark.parametrize("seed", [5, 6])
def test_shading_follows_normals(seed: int) -> None:
    """Each surface's linear radiance divided by the Lambertian shading computed from the rendered
    normals and depth takes only the two texture levels (1 and 0.6) of its albedo."""
    scene = random_scene(seed)
    r = render_scene(scene, (96, 128))
    rays, rot = _camera_rays(scene, (96, 128))
    world = (rays * r["depth"][..., None]) @ rot.T
    n_world = r["normals"] @ rot.T
    to_light = np.asarray(scene.light) - world
    dist = np.linalg.norm(to_light, axis=-1)
    shade = 0.25 + 0.9 * np.clip((n_world * to_light).sum(-1) / dist, 0, None) * 3 / (2 + dist)
    linear = (r["image"].astype(np.float64) / 255.0) ** 2.2
    checked = 0
    for inst in np.unique(r["instance"]):
        sel = (r["instance"] == inst) & (r["depth"] > 0) & (r["image"].max(-1) < 250) & (r["edge"] == 0)
        if sel.sum() < 50:
            continue
        q = linear[sel].sum(-1) / shade[sel]
        q = q / q.max()
        near_level = np.minimum(np.abs(q - 1.0), np.abs(q - 0.6)) < 0.06
        assert near_level.mean() > 0.95, inst
        checked += 1
    assert checked >= 3


def test_render_scenes_layouts_and_splits(nyud_root: Path, pascal_root: Path, cityscapes_root: Path) -> None:
    train = (nyud_root / "gt_sets" / "train.txt").read_text().split()
    val = (nyud_root / "gt_sets" / "val.txt").read_text().split()
    assert len(train) + len(val) == 8 and not set(train) & set(val) and len(val) >= 1
    for i in train + val:
        for sub, ext in (("images", "png"), ("segmentation", "png"), ("depth", "npy"), ("normals", "png"),
                         ("edge", "png")):  # fmt: skip
            assert (nyud_root / sub / f"{i}.{ext}").is_file()
    ids = (pascal_root / "ImageSets" / "Context" / "train.txt").read_text().split()
    pascal_files = (("JPEGImages", "jpg"), ("semseg/VOC12", "png"), ("human_parts", "mat"),
                    ("normals_distill", "png"), ("sal_distill", "png"), ("pascal-context/trainval", "mat"))  # fmt: skip
    for i in ids:
        for sub, ext in pascal_files:
            assert (pascal_root / sub / f"{i}.{ext}").is_file()
    assert sorted((cityscapes_root / "leftImg8bit" / "val").glob("*/*_leftImg8bit.png"))
    assert sorted((cityscapes_root / "disparity" / "train").glob("*/*_disparity.png"))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"layout": "coco"}, "layout"), ({"n": 0}, "n must be"), ({"size": (4, 64)}, "size")],
)
def test_render_scenes_rejects_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        render_scenes(tmp_path, **kwargs)


def test_camera_uses_nyud_intrinsics() -> None:
    scene = random_scene(0)
    rays, _ = _camera_rays(scene, (480, 640))
    fov = 2 * math.degrees(math.atan((rays[0, -1, 0] - rays[0, 0, 0]) / 2))
    assert 60 < fov < 65  # NYUD Kinect: about 63 degrees horizontally


def test_rendered_layouts_are_the_official_ones(nyud_root: Path, pascal_root: Path, cityscapes_root: Path) -> None:
    """The files the renderer writes have the official formats (PNG modes, dtypes, the PASCAL
    ``.mat`` structures as the official loader indexes them), nothing else beside them but the
    render marker, and the official decoding of them equals mtssm's, target by target."""
    from PIL import Image

    from mtssm.data import Cityscapes, NYUDv2, PASCALContext
    from mtssm.data.constants import RENDER_MARKER
    from tests.data import official

    assert sorted(p.name for p in nyud_root.iterdir()) == sorted(
        ["images", "segmentation", "depth", "normals", "edge", "gt_sets", RENDER_MARKER])
    assert sorted(p.name for p in pascal_root.iterdir()) == sorted(
        ["JPEGImages", "semseg", "human_parts", "normals_distill", "sal_distill", "pascal-context", "ImageSets",
         RENDER_MARKER])  # fmt: skip
    assert sorted(p.name for p in cityscapes_root.iterdir()) == sorted(
        ["leftImg8bit", "gtFine", "disparity", "camera", RENDER_MARKER])
    assert official.read_json(nyud_root / RENDER_MARKER)["layout"] == "nyud"

    ds = NYUDv2(nyud_root, "train")
    assert ds.rendered
    sid = ds.ids[0]
    assert Image.open(nyud_root / "segmentation" / f"{sid}.png").mode == "L"
    assert Image.open(nyud_root / "normals" / f"{sid}.png").mode == "RGB"
    edge = np.asarray(Image.open(nyud_root / "edge" / f"{sid}.png"))
    assert edge.dtype == np.uint8 and set(np.unique(edge)) <= {0, 255}
    depth = np.load(nyud_root / "depth" / f"{sid}.npy")
    assert depth.dtype == np.float32 and depth.ndim == 2
    s, ref = ds[0], official.nyud_official(nyud_root, sid)
    np.testing.assert_array_equal(s["normals"], ref["normals"])
    np.testing.assert_array_equal(s["semseg"].astype(np.float32), ref["semseg"])
    np.testing.assert_array_equal(s["edge"].astype(np.float32), ref["edge"])
    np.testing.assert_array_equal(s["depth"], np.where(ref["depth"] == 255, 0, ref["depth"]))

    ds = PASCALContext(pascal_root, "train")
    for i, sid in enumerate(ds.ids):
        label_map = official.loadmat(pascal_root / "pascal-context" / "trainval" / f"{sid}.mat")["LabelMap"]
        assert label_map.dtype == np.uint16 and label_map.shape == ds[i]["image"].shape[:2]
        s, ref = ds[i], official.pascal_official(pascal_root, sid)
        for task in ("semseg", "sal", "edge", "human_parts"):
            np.testing.assert_array_equal(s[task].astype(np.float32), ref[task], err_msg=task)
        ignored = (ref["normals"] == 255).all(-1)
        np.testing.assert_array_equal(s["normals"][~ignored], ref["normals"][~ignored])
        assert (s["normals"][ignored] == 0).all()

    ds = Cityscapes(cityscapes_root, "train")
    city, stem = ds.ids[0].split("/")
    disparity = official.cv2.imread(str(cityscapes_root / "disparity" / "train" / city / f"{stem}_disparity.png"),
                                    official.cv2.IMREAD_UNCHANGED)  # fmt: skip
    assert disparity.dtype == np.uint16 and disparity.ndim == 2
    assert Image.open(cityscapes_root / "gtFine" / "train" / city / f"{stem}_gtFine_labelIds.png").mode == "L"
    s = ds[0]
    positive = (disparity > 1)
    np.testing.assert_array_equal(s["depth"][positive], (disparity[positive].astype(np.float32) - 1) / 256)

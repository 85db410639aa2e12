"""The official semantics, for the tests: small datasets written by hand in the official layouts,
and the targets the official loaders and transforms make of them.

The readers below restate, step by step, what the official code does (InvPT / MTMamba / PAMM
``data/nyud.py``, ``data/pascal_context.py``, ``data/transforms.py``; MTMamba++
``data/cityscapes.py``), with the libraries it uses (OpenCV, scikit-image, scipy.io, PIL), and
return float arrays with the official ignore values (255 for labels, depth and normals after
``AddIgnoreRegions``; -1 for invalid Cityscapes disparity). The tests compare mtssm's decoded
arrays with them target by target.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2  # opencv-python-headless and scikit-image: the test extra
import numpy as np
from PIL import Image
from scipy.io import loadmat, savemat
from skimage.morphology import thin as skimage_thin

# Official human-part map with 6 parts (``HUMAN_PART[6]``).
HUMAN_PART_6 = {"hair": 1, "head": 1, "lear": 1, "lebrow": 1, "leye": 1, "lfoot": 6, "lhand": 4, "llarm": 4,
                "llleg": 6, "luarm": 3, "luleg": 5, "mouth": 1, "neck": 2, "nose": 1, "rear": 1, "rebrow": 1,
                "reye": 1, "rfoot": 6, "rhand": 4, "rlarm": 4, "rlleg": 6, "ruarm": 3, "ruleg": 5, "torso": 2}  # fmt: skip
# A few PASCAL-Context ids of context_classes.json, by name.
CONTEXT = {"wall": 440, "floor": 158, "person": 284, "tvmonitor": 427, "chair": 72, "sky": 360, "grass": 187,
           "tree": 420, "water": 445, "accordion": 1, "aeroplane": 2}  # fmt: skip


# --------------------------------------------------------------------------- writing by hand


def _png(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def write_nyud(root: Path, samples: dict[str, dict[str, np.ndarray]], split: str = "train") -> Path:
    """NYUD-MT: images/, segmentation/ (0..40), depth/*.npy, normals/ (RGB codes), edge/ (0/255),
    gt_sets/{split}.txt. ``samples``: id -> image, segmentation, depth, normals, edge."""
    for sid, s in samples.items():
        _png(s["image"], root / "images" / f"{sid}.png")
        _png(s["segmentation"], root / "segmentation" / f"{sid}.png")
        (root / "depth").mkdir(parents=True, exist_ok=True)
        np.save(root / "depth" / f"{sid}.npy", s["depth"])
        _png(s["normals"], root / "normals" / f"{sid}.png")
        _png(s["edge"], root / "edge" / f"{sid}.png")
    (root / "gt_sets").mkdir(parents=True, exist_ok=True)
    (root / "gt_sets" / f"{split}.txt").write_text("".join(f"{sid}\n" for sid in samples))
    return root


def parts_anno(imname: str, objects: list[tuple[str, int, np.ndarray, list[tuple[str, np.ndarray]]]]) -> dict:
    """A PASCAL-Part ``anno`` struct: fields imname, objects; each object class, class_ind, mask,
    parts (part_name, mask), in the order the official loader indexes them."""
    objs = np.zeros((1, len(objects)), dtype=[("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")])
    for i, (name, ind, mask, parts) in enumerate(objects):
        if parts:
            parr = np.zeros((1, len(parts)), dtype=[("part_name", "O"), ("mask", "O")])
            for j, (pname, pmask) in enumerate(parts):
                parr[0, j] = (pname, pmask.astype(np.uint8))
        else:
            parr = np.zeros((0, 0))
        objs[0, i] = (name, np.array([[ind]], np.uint8), mask.astype(np.uint8), parr)
    return {"anno": {"imname": imname, "objects": objs}}


def write_pascal(root: Path, samples: dict[str, dict], split: str = "train") -> Path:
    """PASCAL-MT: JPEGImages/, semseg/VOC12/, human_parts/*.mat, normals_distill/, sal_distill/,
    pascal-context/trainval/*.mat (LabelMap), ImageSets/Context/{split}.txt. ``samples``: id ->
    image, semseg, objects (for :func:`parts_anno`), normals, sal, label_map."""
    for sid, s in samples.items():
        (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.fromarray(s["image"]).save(root / "JPEGImages" / f"{sid}.jpg", quality=95)
        _png(s["semseg"], root / "semseg" / "VOC12" / f"{sid}.png")
        (root / "human_parts").mkdir(parents=True, exist_ok=True)
        savemat(root / "human_parts" / f"{sid}.mat", parts_anno(sid, s["objects"]))
        _png(s["normals"], root / "normals_distill" / f"{sid}.png")
        _png(s["sal"], root / "sal_distill" / f"{sid}.png")
        (root / "pascal-context" / "trainval").mkdir(parents=True, exist_ok=True)
        savemat(root / "pascal-context" / "trainval" / f"{sid}.mat", {"LabelMap": s["label_map"]})
    (root / "ImageSets" / "Context").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Context" / f"{split}.txt").write_text("".join(f"{sid}\n" for sid in samples))
    return root


def write_cityscapes(root: Path, samples: dict[str, dict], split: str = "train") -> Path:
    """Cityscapes: leftImg8bit/, gtFine/ (labelIds), disparity/ (uint16) under {split}/{city}/.
    ``samples``: "city/stem" -> image, label_ids, disparity."""
    for sid, s in samples.items():
        city, stem = sid.split("/")
        _png(s["image"], root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
        _png(s["label_ids"], root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
        _png(s["disparity"], root / "disparity" / split / city / f"{stem}_disparity.png")
    return root


# --------------------------------------------------------------------------- official readers


def nyud_official(root: Path, sid: str) -> dict[str, np.ndarray]:
    """``NYUD_MT.__getitem__`` then ``AddIgnoreRegions``."""
    image = np.array(Image.open(root / "images" / f"{sid}.png").convert("RGB"), dtype=np.float32)
    semseg = np.array(Image.open(root / "segmentation" / f"{sid}.png"), dtype=np.float32) - 1
    semseg[semseg == -1] = 255
    depth = np.load(root / "depth" / f"{sid}.npy").astype(np.float32)
    normals = 2 * np.array(Image.open(root / "normals" / f"{sid}.png"), dtype=np.float32) / 255.0 - 1
    edge = np.array(Image.open(root / "edge" / f"{sid}.png"), dtype=np.float32) / 255.0
    return add_ignore_regions({"image": image, "semseg": semseg, "depth": depth, "normals": normals, "edge": edge})


def normals_valid_classes() -> list[int]:
    from mtssm.data.constants import PASCAL_NORMALS_VALID_CLASSES

    return list(PASCAL_NORMALS_VALID_CLASSES)


def pascal_official(root: Path, sid: str) -> dict[str, np.ndarray]:
    """``PASCALContext.__getitem__`` (6 parts, area_thres 0) then ``AddIgnoreRegions``."""
    image = np.array(Image.open(root / "JPEGImages" / f"{sid}.jpg").convert("RGB")).astype(np.float32)
    label_map = loadmat(root / "pascal-context" / "trainval" / f"{sid}.mat")["LabelMap"]
    lap = cv2.Laplacian(label_map, cv2.CV_64F)
    edge = skimage_thin(np.abs(lap) > 0).astype(np.float32)
    # person presence, as _preprocess_parts: objects of class 15 with a non-empty instance mask
    part_mat = loadmat(root / "human_parts" / f"{sid}.mat")
    objects = part_mat["anno"][0][0][1][0]
    cats = [int(objects[j][1].item()) if np.sum(objects[j][2]) > 0 else -1 for j in range(len(objects))]
    if 15 in cats:
        target = None
        for obj in objects:
            if obj[1][0][0] == 15 and len(obj[3]) != 0:
                if target is None:
                    target = np.zeros(obj[2].shape)
                for part_i in range(len(obj[3][0])):
                    name = str(obj[3][0][part_i][0][0])
                    target[obj[3][0][part_i][1].astype(bool)] = HUMAN_PART_6[name]
        parts = np.zeros(image.shape[:2], np.float32) if target is None else target.astype(np.float32)
    else:
        parts = np.zeros(image.shape[:2], np.float32)
    semseg = np.array(Image.open(root / "semseg" / "VOC12" / f"{sid}.png")).astype(np.float32)
    tmp = np.array(Image.open(root / "normals_distill" / f"{sid}.png")).astype(np.float32)
    tmp = 2.0 * tmp / 255.0 - 1.0
    normals = np.zeros(tmp.shape)
    valid = normals_valid_classes()
    for x in np.unique(label_map):
        if x in valid:
            normals[label_map == x, :] = tmp[label_map == x, :]
    sal = np.array(Image.open(root / "sal_distill" / f"{sid}.png")).astype(np.float32) / 255.0
    sal = (sal > 0.5).astype(np.float32)
    return add_ignore_regions({"image": image, "edge": edge, "human_parts": parts, "semseg": semseg,
                               "normals": normals.astype(np.float32), "sal": sal})  # fmt: skip


CITYSCAPES_VOID = [0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30, -1]
CITYSCAPES_VALID = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]


def cityscapes_official(root: Path, sid: str, split: str = "train") -> dict[str, np.ndarray]:
    """MTMamba++ ``CITYSCAPES.__getitem__`` with ``is_transform`` (image resized to 512x1024)."""
    city, stem = sid.split("/")
    img = cv2.cvtColor(cv2.imread(str(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"))
                       .astype(np.float32), cv2.COLOR_BGR2RGB)  # fmt: skip
    lbl = np.array(Image.open(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"))
    depth = cv2.imread(str(root / "disparity" / split / city / f"{stem}_disparity.png"),
                       cv2.IMREAD_UNCHANGED).astype(np.float32)  # fmt: skip
    depth[depth > 0] = (depth[depth > 0] - 1) / 256
    depth[depth == 0] = -1
    depth[lbl == 10] = 0
    mask = lbl.copy()
    for c in CITYSCAPES_VOID:
        mask[mask == (c % 256)] = 255  # -1 (license plate) is 255 in a uint8 PNG
    old = mask.copy()
    for i, c in enumerate(CITYSCAPES_VALID):
        mask[old == c] = i
    image = np.array(Image.fromarray(img.astype(np.uint8)).resize((1024, 512), Image.BILINEAR))
    return {"image": image, "semseg": mask.astype(np.float32), "depth": depth}


# --------------------------------------------------------------------------- official transforms


def add_ignore_regions(sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``AddIgnoreRegions``: zero normals -> 255, an all-(0 or 255) parts map -> 255, depth 0 -> 255."""
    out = dict(sample)
    if "normals" in out:
        n = out["normals"].copy()
        n[np.sqrt((n**2).sum(-1)) == 0, :] = 255
        out["normals"] = n
    if "human_parts" in out and ((out["human_parts"] == 0) | (out["human_parts"] == 255)).all():
        out["human_parts"] = np.full(out["human_parts"].shape, 255, np.float32)
    if "depth" in out:
        d = out["depth"].copy()
        d[d == 0] = 255
        out["depth"] = d
    return out


def scale_crop_flip_pad(sample: dict[str, np.ndarray], s: float, loc: tuple[int, int], size: tuple[int, int],
                        flip: bool) -> dict[str, np.ndarray]:  # fmt: skip
    """``RandomScaling`` (scale ``s``), ``RandomCrop`` at offset ``loc``, ``RandomHorizontalFlip``
    (when ``flip``), ``PadImage(size)`` on the dense targets (H, W) or (H, W, C), float."""
    out = {}
    for key, val in sample.items():
        h, w = val.shape[:2]
        new = (int(h * s), int(w * s))
        arr = np.squeeze(val)
        arr = cv2.resize(arr, new[::-1], interpolation=cv2.INTER_NEAREST)
        if arr.ndim == 2:
            arr = arr[..., None]
        if key == "depth":
            arr /= s
        arr = arr[loc[0] : loc[0] + size[0], loc[1] : loc[1] + size[1], :]
        if flip:
            arr = np.fliplr(arr).copy()
            if key == "normals":
                arr[:, :, 0] *= -1
        fill = {"depth": 0, "normals": 0}.get(key, 255)
        dh, dw = max(size[0] - arr.shape[0], 0), max(size[1] - arr.shape[1], 0)
        padded = np.full((max(size[0], arr.shape[0]), max(size[1], arr.shape[1]), arr.shape[2]), fill, np.float32)
        padded[dh // 2 : dh // 2 + arr.shape[0], dw // 2 : dw // 2 + arr.shape[1]] = arr
        out[key] = padded[..., 0] if key != "normals" else padded
    return add_ignore_regions(out)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())

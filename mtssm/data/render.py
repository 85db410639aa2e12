"""Procedural indoor scenes, ray cast with numpy and written in the NYUDv2, PASCAL-Context or
Cityscapes on-disk layout, so every loader runs and every recipe trains without a download.

A scene is a room (floor, walls, ceiling) holding boxes, spheres and vertical cylinders, each with a
class from the NYUDv2 40-class list, plus people built from parts (head, torso, upper and lower
arms and legs). A pinhole camera with NYUDv2's intrinsics (scaled to the requested size) casts one
ray per pixel; all rays start at the camera centre, so each primitive is intersected with a handful
of vectorised numpy operations over the pixels inside its projected bounding box.

Every pixel gets: an RGB colour (per-class base colour and texture, Lambertian shading from a point
light with the true surface normal, gamma 2.2), the z-depth in metres (0 where glass - windows and
mirrors - gives no depth reading, as Kinect does), the camera-frame unit normal (x right, y down,
z forward; valid on glass too, as NYUD-MT's dense normals are), the class, the object instance, the human part, and
boundaries (pixels of the nearer object where two instances meet). Scenes are deterministic per
seed, and :meth:`Scene.mirrored` gives the exact mirror image, which tests use to check that the
flip augmentation keeps every task consistent.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from mtssm.data.constants import PASCAL_PERSON_CLASS, RENDER_MARKER

__all__ = ["Primitive", "Scene", "random_scene", "render_scene", "render_scenes"]

# NYUDv2 Kinect intrinsics (fx, fy, cx, cy) for 640x480 images.
_NYUD_FX, _NYUD_FY, _NYUD_CX, _NYUD_CY = 518.857901, 519.469611, 325.582449, 253.736166

# NYUD class ids (stored values 1..40; 0 = unlabelled).
WALL, FLOOR, CEILING, PERSON, WINDOW, MIRROR = 1, 2, 22, 31, 9, 19
_GLASS = (WINDOW, MIRROR)

# Floor objects: class -> (kind, half-extent ranges (x, y, z) in metres; sphere/cylinder use x=r).
_FLOOR_OBJECTS: dict[int, tuple[str, tuple[tuple[float, float], ...]]] = {
    3: ("box", ((0.3, 0.6), (0.4, 0.9), (0.2, 0.35))),  # cabinet
    4: ("box", ((0.5, 0.9), (0.2, 0.3), (0.8, 1.0))),  # bed
    5: ("box", ((0.2, 0.28), (0.25, 0.45), (0.2, 0.28))),  # chair
    6: ("box", ((0.6, 1.0), (0.2, 0.4), (0.3, 0.45))),  # sofa
    7: ("box", ((0.4, 0.8), (0.35, 0.4), (0.3, 0.5))),  # table
    10: ("box", ((0.3, 0.6), (0.8, 1.0), (0.15, 0.2))),  # bookshelf
    14: ("box", ((0.4, 0.7), (0.35, 0.4), (0.3, 0.4))),  # desk
    17: ("box", ((0.3, 0.5), (0.35, 0.5), (0.2, 0.3))),  # dresser
    24: ("box", ((0.3, 0.4), (0.8, 0.9), (0.3, 0.35))),  # refrigerator
    29: ("box", ((0.1, 0.3), (0.1, 0.3), (0.1, 0.3))),  # box
    32: ("box", ((0.2, 0.25), (0.25, 0.3), (0.2, 0.25))),  # night stand
    39: ("box", ((0.2, 0.5), (0.2, 0.6), (0.2, 0.4))),  # otherfurniture
    33: ("cylinder", ((0.18, 0.22), (0.18, 0.22), (0.0, 0.0))),  # toilet
    35: ("cylinder", ((0.05, 0.08), (0.5, 0.8), (0.0, 0.0))),  # lamp
    37: ("cylinder", ((0.12, 0.2), (0.15, 0.25), (0.0, 0.0))),  # bag
    40: ("sphere", ((0.1, 0.3), (0.0, 0.0), (0.0, 0.0))),  # otherprop
    18: ("sphere", ((0.12, 0.2), (0.0, 0.0), (0.0, 0.0))),  # pillow
}
# Flat things on walls: class -> half-extent ranges (width, height).
_WALL_OBJECTS: dict[int, tuple[tuple[float, float], tuple[float, float]]] = {
    8: ((0.4, 0.5), (0.9, 1.0)),  # door
    9: ((0.4, 0.8), (0.4, 0.6)),  # window
    11: ((0.2, 0.4), (0.15, 0.3)),  # picture
    19: ((0.2, 0.35), (0.3, 0.5)),  # mirror
    25: ((0.3, 0.5), (0.2, 0.3)),  # television
    30: ((0.5, 0.8), (0.3, 0.45)),  # whiteboard
}
# NYUD class -> PASCAL VOC class (others are background; unlabelled -> 255).
_NYUD_TO_VOC = {5: 9, 6: 18, 7: 11, 14: 11, 25: 20, 31: 15, 35: 5, 40: 16}
# NYUD class -> Cityscapes labelId (others -> 0 "unlabeled", mapped to 255).
_NYUD_TO_CITYSCAPES = {FLOOR: 7, WALL: 12, CEILING: 23, PERSON: 24, 3: 11, 4: 26, 6: 26, 24: 27,
                       10: 13, 35: 17, 33: 21, 37: 20, 29: 19, 5: 25}  # fmt: skip
# NYUD class -> PASCAL-Context class id of the same name (context_classes.json of the official
# loaders; television -> tvmonitor); the others -> 0, a class without distilled normals.
_NYUD_TO_CONTEXT = {1: 440, 2: 158, 3: 46, 4: 18, 5: 72, 6: 368, 7: 397, 8: 115, 9: 454, 11: 287,
                    12: 96, 15: 349, 16: 105, 18: 290, 19: 252, 22: 68, 23: 33, 25: 427, 26: 273,
                    27: 412, 29: 37, 31: 284, 33: 408, 34: 357, 36: 17, 37: 9}  # fmt: skip
_PART_NAMES = {1: "head", 2: "torso", 3: ("luarm", "ruarm"), 4: ("llarm", "rlarm"),
               5: ("luleg", "ruleg"), 6: ("llleg", "rlleg")}  # fmt: skip


def _class_palette() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per NYUD class (index 0..40): base RGB albedo, texture kind (0..3) and texture frequency."""
    rng = np.random.default_rng(20240611)
    hue = (np.arange(41) * 0.61803398875) % 1.0
    sat = rng.uniform(0.35, 0.85, 41)
    val = rng.uniform(0.45, 0.9, 41)
    i = np.floor(hue * 6).astype(int) % 6
    f = hue * 6 - np.floor(hue * 6)
    p, q, t = val * (1 - sat), val * (1 - f * sat), val * (1 - (1 - f) * sat)
    rgb = np.select(
        [i[:, None] == k for k in range(6)],
        [np.stack(c, 1) for c in ((val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q))],
    )
    texture = np.arange(41) % 4
    freq = rng.uniform(8.0, 20.0, 41)
    return rgb.astype(np.float32), texture, freq.astype(np.float32)


_PALETTE, _TEXTURE, _FREQ = _class_palette()


@dataclass(frozen=True)
class Primitive:
    """A box, sphere or vertical cylinder in world coordinates (x right, y down, z forward, metres).

    ``half``: box half-extents (x, y, z) before the rotation ``yaw`` about the vertical axis; for a
    sphere ``half[0]`` is the radius; for a cylinder ``half[0]`` is the radius and ``half[1]`` the
    half-height. ``label`` is the NYUD class (0 = unlabelled), ``instance`` the object it belongs to
    (a person's parts share one), ``part`` its human part (0 = none), ``person`` the person index
    (-1 = none), ``tint`` a per-object colour factor.
    """

    kind: Literal["box", "sphere", "cylinder"]
    center: tuple[float, float, float]
    half: tuple[float, float, float]
    label: int
    instance: int
    yaw: float = 0.0
    part: int = 0
    person: int = -1
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def mirrored(self) -> Primitive:
        """The primitive reflected through the plane x = 0."""
        cx, cy, cz = self.center
        return replace(self, center=(-cx, cy, cz), yaw=-self.yaw)


@dataclass(frozen=True)
class Scene:
    """A room ``x0 < x < x1``, ``ceiling < y < floor``, ``z < back`` seen from the origin.

    ``pitch`` tilts the camera down (radians); ``light`` is the point light; ``cx_offset`` is the
    principal point's horizontal offset from the image centre as a fraction of the width.
    """

    x0: float
    x1: float
    floor: float
    ceiling: float
    back: float
    pitch: float
    light: tuple[float, float, float]
    objects: tuple[Primitive, ...]
    room_tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    cx_offset: float = (_NYUD_CX - 319.5) / 640.0

    def mirrored(self) -> Scene:
        """The scene reflected through x = 0, seen by the mirrored camera: its render is exactly the
        horizontal flip of this scene's render (normals' x component negated)."""
        lx, ly, lz = self.light
        return replace(
            self,
            x0=-self.x1,
            x1=-self.x0,
            light=(-lx, ly, lz),
            objects=tuple(o.mirrored() for o in self.objects),
            cx_offset=-self.cx_offset,
        )


def _rot_y(yaw: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]], dtype=np.float32)


def _person(rng: np.random.Generator, x: float, z: float, floor: float, instance: int,
            person: int) -> list[Primitive]:  # fmt: skip
    """A standing person made of 10 primitives with PASCAL-Part part ids."""
    h = rng.uniform(1.5, 1.85)
    yaw = rng.uniform(-0.6, 0.6)
    rot = _rot_y(yaw)
    tint = tuple(rng.uniform(0.85, 1.15, 3))
    prims: list[Primitive] = []

    def add(kind: str, dx: float, y_top: float, y_bot: float, r: float, part: int, hz: float = 0.0):
        off = rot @ np.array([dx, 0.0, 0.0], dtype=np.float32)
        cy = floor - (y_top + y_bot) / 2 * h
        half = (r, (y_top - y_bot) / 2 * h, hz)
        prims.append(Primitive(kind, (x + float(off[0]), cy, z + float(off[2])), half, PERSON,
                               instance, yaw, part, person, tint))  # fmt: skip

    for side in (-1, 1):
        add("cylinder", side * 0.075 * h, 0.27, 0.0, 0.035 * h, 6)  # lower legs
        add("cylinder", side * 0.075 * h, 0.5, 0.27, 0.045 * h, 5)  # upper legs
        add("cylinder", side * 0.14 * h, 0.81, 0.63, 0.028 * h, 3)  # upper arms
        add("cylinder", side * 0.14 * h, 0.63, 0.45, 0.024 * h, 4)  # lower arms
    add("box", 0.0, 0.82, 0.5, 0.11 * h, 2, hz=0.06 * h)  # torso
    r = 0.065 * h
    prims.append(Primitive("sphere", (x, floor - 0.82 * h - r * 0.95, z), (r, r, r), PERSON,
                           instance, yaw, 1, person, tint))  # fmt: skip
    return prims


def random_scene(seed: int | np.random.Generator, people: float = 0.3) -> Scene:
    """A random room with furniture, wall objects and (with probability ``people``) people."""
    rng = np.random.default_rng(seed)
    x0, x1 = -rng.uniform(1.6, 3.0), rng.uniform(1.6, 3.0)
    floor, ceiling, back = rng.uniform(1.0, 1.5), -rng.uniform(1.0, 1.6), rng.uniform(4.0, 7.0)
    objects: list[Primitive] = []
    inst = 0
    # Flat objects on the back and side walls.
    for _ in range(rng.integers(1, 4)):
        label = int(rng.choice(list(_WALL_OBJECTS)))
        (wlo, whi), (hlo, hhi) = _WALL_OBJECTS[label]
        w, hh = rng.uniform(wlo, whi), rng.uniform(hlo, hhi)
        yc = floor - hh - 0.02 if label == 8 else rng.uniform(ceiling + hh + 0.2, floor - hh - 0.6)
        wall = rng.integers(0, 3)
        if wall == 0:  # back wall
            c, half = (rng.uniform(x0 + w, x1 - w), yc, back - 0.03), (w, hh, 0.03)
        else:  # side wall
            xs = x0 + 0.03 if wall == 1 else x1 - 0.03
            c, half = (xs, yc, rng.uniform(1.5 + w, back - w)), (0.03, hh, w)
        objects.append(Primitive("box", c, half, label, inst, tint=tuple(rng.uniform(0.9, 1.1, 3))))
        inst += 1
    # Furniture standing on the floor.
    for _ in range(rng.integers(3, 9)):
        label = int(rng.choice(list(_FLOOR_OBJECTS)))
        if rng.random() < 0.1:
            label = 0  # unlabelled clutter
        kind, ranges = _FLOOR_OBJECTS[label or 29]
        half = tuple(float(rng.uniform(lo, hi)) for lo, hi in ranges)
        if kind == "sphere":
            half = (half[0], half[0], half[0])
        reach = max(half[0], half[2])
        x = rng.uniform(x0 + reach, x1 - reach) if x1 - x0 > 2 * reach else 0.5 * (x0 + x1)
        z = rng.uniform(1.3 + reach, back - reach)
        yc = floor - half[1]
        objects.append(Primitive(kind, (float(x), float(yc), float(z)), half, label, inst,
                                 float(rng.uniform(-0.7, 0.7)) if kind == "box" else 0.0,
                                 tint=tuple(rng.uniform(0.85, 1.15, 3))))  # fmt: skip
        inst += 1
    n_people = int(rng.random() < people) * int(rng.integers(1, 3))
    for p in range(n_people):
        x = rng.uniform(x0 + 0.4, x1 - 0.4)
        z = rng.uniform(1.8, back - 0.5)
        objects.extend(_person(rng, float(x), float(z), floor, inst, p))
        inst += 1
    light = (float(rng.uniform(x0, x1) * 0.6), ceiling + 0.1, float(rng.uniform(1.0, back - 1.0)))
    return Scene(x0, x1, floor, ceiling, back, float(rng.uniform(-0.05, 0.3)), light,
                 tuple(objects), tuple(rng.uniform(0.85, 1.15, 3)))  # fmt: skip


def _camera_rays(scene: Scene, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Camera-frame rays ``(H, W, 3)`` with z = 1 (so the hit distance t is the z-depth) and the
    camera-to-world rotation (pitch about x)."""
    h, w = size
    fx, fy = _NYUD_FX * w / 640.0, _NYUD_FY * h / 480.0
    cx = (w - 1) / 2 + scene.cx_offset * w
    cy = _NYUD_CY * h / 480.0
    u = (np.arange(w, dtype=np.float32) - cx) / fx
    v = (np.arange(h, dtype=np.float32) - cy) / fy
    rays = np.empty((h, w, 3), np.float32)
    rays[..., 0] = u[None, :]
    rays[..., 1] = v[:, None]
    rays[..., 2] = 1.0
    c, s = math.cos(scene.pitch), math.sin(scene.pitch)
    rot = np.array([[1, 0, 0], [0, c, s], [0, -s, c]], dtype=np.float32)
    return rays, rot


def _bbox(prim: Primitive, rot: np.ndarray, size: tuple[int, int], scene: Scene) -> tuple[slice, slice]:
    """Pixel rows/cols that can see ``prim`` (projection of its bounding sphere)."""
    h, w = size
    r = float(np.linalg.norm(prim.half)) + 1e-3
    c = rot.T @ np.asarray(prim.center, np.float32)
    if c[2] - r <= 0.05:
        return slice(0, h), slice(0, w)
    fx, fy = _NYUD_FX * w / 640.0, _NYUD_FY * h / 480.0
    cx = (w - 1) / 2 + scene.cx_offset * w
    cy = _NYUD_CY * h / 480.0
    zs = (c[2] - r, c[2] + r)
    xs = [(c[0] + a) / z for a in (-r, r) for z in zs]
    ys = [(c[1] + a) / z for a in (-r, r) for z in zs]
    u0, u1 = int(math.floor(cx + fx * min(xs))), int(math.ceil(cx + fx * max(xs))) + 1
    v0, v1 = int(math.floor(cy + fy * min(ys))), int(math.ceil(cy + fy * max(ys))) + 1
    return slice(max(v0, 0), max(min(v1, h), 0)), slice(max(u0, 0), max(min(u1, w), 0))


def _intersect(prim: Primitive, d: np.ndarray) -> np.ndarray:
    """Distance t along rays ``d (..., 3)`` from the origin to ``prim`` (inf where missed)."""
    c = np.asarray(prim.center, np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if prim.kind == "box":
            rot = _rot_y(prim.yaw)
            o = -(rot.T @ c)
            dl = d @ rot  # rows of R^T d
            inv = 1.0 / dl
            half = np.asarray(prim.half, np.float32)
            t1, t2 = (-half - o) * inv, (half - o) * inv
            tn = np.minimum(t1, t2).max(-1)
            tf = np.maximum(t1, t2).min(-1)
            return np.where((tf >= tn) & (tn > 1e-4), tn, np.inf)
        if prim.kind == "sphere":
            r = prim.half[0]
            a = (d * d).sum(-1)
            b = d @ c
            disc = b * b - a * (float(c @ c) - r * r)
            t = (b - np.sqrt(disc)) / a
            return np.where((disc >= 0) & (t > 1e-4), t, np.inf)
        # vertical cylinder: side surface plus top and bottom caps
        r, hh = prim.half[0], prim.half[1]
        dx, dy, dz = d[..., 0], d[..., 1], d[..., 2]
        a = dx * dx + dz * dz
        b = dx * c[0] + dz * c[2]
        disc = b * b - a * (c[0] ** 2 + c[2] ** 2 - r * r)
        ts = (b - np.sqrt(disc)) / a
        ys = ts * dy
        ok = (disc >= 0) & (ts > 1e-4) & (ys >= c[1] - hh) & (ys <= c[1] + hh)
        t = np.where(ok, ts, np.inf)
        for yc in (c[1] - hh, c[1] + hh):
            tc = yc / dy
            inside = (tc * dx - c[0]) ** 2 + (tc * dz - c[2]) ** 2 <= r * r
            t = np.where(inside & (tc > 1e-4) & (tc < t), tc, t)
        return t


def _surface(prim: Primitive, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World normal and object-local coordinates at hit points ``p (n, 3)`` on ``prim``."""
    c = np.asarray(prim.center, np.float32)
    rot = _rot_y(prim.yaw)
    local = (p - c) @ rot  # R^T (p - c)
    if prim.kind == "box":
        q = np.abs(local) / np.asarray(prim.half, np.float32)
        axis = q.argmax(-1)
        nl = np.zeros_like(local)
        nl[np.arange(len(p)), axis] = np.sign(local[np.arange(len(p)), axis])
        return nl @ rot.T, local
    if prim.kind == "sphere":
        n = (p - c) / prim.half[0]
        return n, local
    r, hh = prim.half[0], prim.half[1]
    rel = p - c
    radial = np.hypot(rel[:, 0], rel[:, 2])
    on_cap = np.abs(np.abs(rel[:, 1]) - hh) * r < np.abs(radial - r) * hh
    n = np.zeros_like(rel)
    n[:, 0] = np.where(on_cap, 0.0, rel[:, 0] / r)
    n[:, 2] = np.where(on_cap, 0.0, rel[:, 2] / r)
    n[:, 1] = np.where(on_cap, np.sign(rel[:, 1]), 0.0)
    return n, local


def _texture(kind: np.ndarray | int, freq: np.ndarray | float, local: np.ndarray) -> np.ndarray:
    """Texture factor in [0.6, 1] from object-local coordinates; even in local x, so that a
    mirrored object shows the mirrored texture."""
    lx, ly, lz = local[:, 0], local[:, 1], local[:, 2]
    kind = np.broadcast_to(kind, lx.shape)
    freq = np.broadcast_to(freq, lx.shape)
    stripes = np.cos(freq * ly) > 0
    checker = (np.cos(freq * lx) * np.cos(freq * ly) * np.cos(freq * lz)) > 0
    rings = np.cos(freq * np.sqrt(lx * lx + lz * lz)) > 0
    pattern = np.select([kind == 1, kind == 2, kind == 3], [stripes, checker, rings], True)
    return np.where(pattern, 1.0, 0.6).astype(np.float32)


def render_scene(scene: Scene, size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Ray cast ``scene`` at ``size`` (H, W).

    Returns ``image`` uint8 (H, W, 3); ``label`` uint8 (H, W) NYUD class 0..40 (0 unlabelled);
    ``depth`` float32 (H, W) z-depth in metres, 0 = invalid; ``normals`` float32 (H, W, 3) camera
    frame unit normals facing the camera (every pixel); ``edge`` uint8 (H, W) in {0, 1};
    ``instance`` int32 (H, W) (negative for the faces of the room); ``part`` uint8 (H, W) human
    part 0..6; ``person`` int32 (H, W) person index (-1 = none).
    """
    h, w = size
    rays, rot = _camera_rays(scene, size)
    d = rays @ rot.T  # world directions
    # Room: the ray leaves the box through one of its 5 faces (x0, x1, floor, ceiling, back).
    with np.errstate(divide="ignore", invalid="ignore"):
        tx = np.where(d[..., 0] > 0, scene.x1, scene.x0) / d[..., 0]
        ty = np.where(d[..., 1] > 0, scene.floor, scene.ceiling) / d[..., 1]
        tz = np.where(d[..., 2] > 0, scene.back, -1.0) / d[..., 2]
    tx = np.where(np.isfinite(tx) & (tx > 0), tx, np.inf)
    ty = np.where(np.isfinite(ty) & (ty > 0), ty, np.inf)
    tz = np.where(np.isfinite(tz) & (tz > 0), tz, np.inf)
    t_room = np.stack([tx, ty, tz], -1)
    face = t_room.argmin(-1)
    best_t = np.take_along_axis(t_room, face[..., None], -1)[..., 0]
    best = np.full((h, w), -1, np.int32)  # primitive index, -1 = room
    boxes = [_bbox(p, rot, size, scene) for p in scene.objects]
    for k, (prim, (rs, cs)) in enumerate(zip(scene.objects, boxes)):
        if rs.start >= rs.stop or cs.start >= cs.stop:
            continue
        t = _intersect(prim, d[rs, cs])
        closer = t < best_t[rs, cs]
        best_t[rs, cs] = np.where(closer, t, best_t[rs, cs])
        best[rs, cs] = np.where(closer, k, best[rs, cs])

    p = d * best_t[..., None]
    normal = np.zeros((h, w, 3), np.float32)
    local = p.copy()
    label = np.zeros((h, w), np.uint8)
    instance = np.full((h, w), -1, np.int32)
    part = np.zeros((h, w), np.uint8)
    person = np.full((h, w), -1, np.int32)
    albedo = np.empty((h, w, 3), np.float32)
    tex_kind = np.zeros((h, w), np.int64)
    tex_freq = np.ones((h, w), np.float32)

    room = best < 0
    sx, sy = np.sign(d[..., 0]), np.sign(d[..., 1])
    room_normal = np.stack(
        [np.where(face == 0, -sx, 0), np.where(face == 1, -sy, 0), np.where(face == 2, -1.0, 0)], -1
    ).astype(np.float32)
    room_label = np.where(face == 1, np.where(sy > 0, FLOOR, CEILING), WALL).astype(np.uint8)
    normal[room] = room_normal[room]
    label[room] = room_label[room]
    # Room texture coordinates relative to the room's centre line (mirror-symmetric).
    local[..., 0] -= 0.5 * (scene.x0 + scene.x1)
    side = np.choose(face, [sx > 0, sy > 0, np.ones_like(sx, bool)])
    instance[room] = (-2 - (2 * face + side))[room]  # one id per face of the room
    albedo[room] = _PALETTE[room_label[room]] * np.asarray(scene.room_tint, np.float32)
    tex_kind[room] = _TEXTURE[room_label[room]]
    tex_freq[room] = _FREQ[room_label[room]] * 0.5

    for k, (prim, (rs, cs)) in enumerate(zip(scene.objects, boxes)):
        m = best[rs, cs] == k
        if not m.any():
            continue
        n, loc = _surface(prim, p[rs, cs][m])
        normal[rs, cs][m] = n
        local[rs, cs][m] = loc
        label[rs, cs][m] = prim.label
        instance[rs, cs][m] = prim.instance
        part[rs, cs][m] = prim.part
        person[rs, cs][m] = prim.person
        albedo[rs, cs][m] = _PALETTE[prim.label] * np.asarray(prim.tint, np.float32)
        tex_kind[rs, cs][m] = _TEXTURE[prim.label]
        tex_freq[rs, cs][m] = _FREQ[prim.label]

    # Normals face the camera; Lambertian shading from the point light plus ambient light.
    flip = (normal * d).sum(-1, keepdims=True) > 0
    normal = np.where(flip, -normal, normal)
    to_light = np.asarray(scene.light, np.float32) - p
    dist = np.linalg.norm(to_light, axis=-1, keepdims=True)
    lambert = np.clip((normal * to_light).sum(-1, keepdims=True) / dist, 0.0, None)
    tex = _texture(tex_kind.reshape(-1), tex_freq.reshape(-1), local.reshape(-1, 3)).reshape(h, w, 1)
    radiance = albedo * tex * (0.25 + 0.9 * lambert * (3.0 / (2.0 + dist)))
    image = (np.clip(radiance, 0.0, 1.0) ** (1 / 2.2) * 255.0 + 0.5).astype(np.uint8)

    depth = best_t.astype(np.float32)
    glass = np.isin(label, _GLASS)
    depth[glass] = 0.0
    normal_cam = normal @ rot  # R^T n, rows
    normal_cam /= np.maximum(np.linalg.norm(normal_cam, axis=-1, keepdims=True), 1e-12)

    # Boundaries: pixels of the nearer instance where two instances touch (4-neighbourhood); the
    # instance id breaks exact depth ties so the rule is mirror-symmetric.
    key = best_t.astype(np.float64) + instance * 1e-9
    edge = np.zeros((h, w), bool)
    differ = instance[:, :-1] != instance[:, 1:]
    left_near = key[:, :-1] < key[:, 1:]
    edge[:, :-1] |= differ & left_near
    edge[:, 1:] |= differ & ~left_near
    differ = instance[:-1, :] != instance[1:, :]
    top_near = key[:-1, :] < key[1:, :]
    edge[:-1, :] |= differ & top_near
    edge[1:, :] |= differ & ~top_near
    return {
        "image": image,
        "label": label,
        "depth": depth,
        "normals": normal_cam.astype(np.float32),
        "edge": edge.astype(np.uint8),
        "instance": instance,
        "part": part,
        "person": person,
    }


# ---------------------------------------------------------------------------------------------
# Writing the on-disk layouts.

Layout = Literal["nyud", "pascal", "cityscapes"]


def _scene_size(layout: str, size: tuple[int, int], rng: np.random.Generator) -> tuple[int, int]:
    if layout != "pascal":
        return size
    # PASCAL images come in many sizes; shrink each side by up to 1/8 so eval batches need padding.
    h, w = size
    return h - int(rng.integers(0, max(h // 8, 1))), w - int(rng.integers(0, max(w // 8, 1)))


def _normals_png(normals: np.ndarray) -> np.ndarray:
    return np.clip(np.rint((normals + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _save_png(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(arr).save(path, compress_level=1)


def _write_pascal_parts(path: Path, sample_id: str, r: dict[str, np.ndarray]) -> None:
    """PASCAL-Part ``anno`` struct: imname and objects (class, class_ind, mask, parts)."""
    from scipy.io import savemat

    entries = []
    for pid in np.unique(r["person"][r["person"] >= 0]):
        mask = r["person"] == pid
        parts = []
        for part_id, names in _PART_NAMES.items():
            pm = mask & (r["part"] == part_id)
            if not pm.any():
                continue
            if isinstance(names, tuple):  # split left/right halves by the person's mean column
                cols = np.nonzero(mask)[1].mean()
                col_idx = np.arange(pm.shape[1])[None, :]
                for name, side in zip(names, (col_idx < cols, col_idx >= cols)):
                    if (pm & side).any():
                        parts.append((name, (pm & side).astype(np.uint8)))
            else:
                parts.append((names, pm.astype(np.uint8)))
        entries.append(("person", PASCAL_PERSON_CLASS, mask.astype(np.uint8), parts))
    voc = np.vectorize(lambda v: _NYUD_TO_VOC.get(int(v), 0))(np.arange(41))[r["label"]]
    for cls in (9, 18):  # chairs and sofas: objects without parts
        if (voc == cls).any():
            entries.append(("chair" if cls == 9 else "sofa", cls, (voc == cls).astype(np.uint8), []))
    objects = np.zeros((1, len(entries)), dtype=[("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")])
    for i, (name, ind, mask, parts) in enumerate(entries):
        if parts:
            parr = np.zeros((1, len(parts)), dtype=[("part_name", "O"), ("mask", "O")])
            for j, part in enumerate(parts):
                parr[0, j] = part
        else:
            parr = np.zeros((0, 0))
        objects[0, i] = (name, np.array([[ind]], np.uint8), mask, parr)
    savemat(path, {"anno": {"imname": sample_id, "objects": objects}}, do_compression=True)


def _write_one(args: tuple[str, Path, str, str, int, tuple[int, int]]) -> None:
    layout, out, sample_id, split, seed, size = args
    rng = np.random.default_rng(seed)
    scene = random_scene(rng, people=0.8 if layout == "pascal" else 0.3)
    r = render_scene(scene, _scene_size(layout, size, rng))
    if layout == "nyud":
        _save_png(r["image"], out / "images" / f"{sample_id}.png")
        _save_png(r["label"], out / "segmentation" / f"{sample_id}.png")
        np.save(out / "depth" / f"{sample_id}.npy", r["depth"])
        _save_png(_normals_png(r["normals"]), out / "normals" / f"{sample_id}.png")
        _save_png(r["edge"] * np.uint8(255), out / "edge" / f"{sample_id}.png")
    elif layout == "pascal":
        from scipy.io import savemat

        Image.fromarray(r["image"]).save(out / "JPEGImages" / f"{sample_id}.jpg", quality=92)
        lut = np.array([_NYUD_TO_VOC.get(v, 0) for v in range(41)], np.uint8)
        lut[0] = 255
        _save_png(lut[r["label"]], out / "semseg" / "VOC12" / f"{sample_id}.png")
        _save_png(_normals_png(r["normals"]), out / "normals_distill" / f"{sample_id}.png")
        salient = (lut[r["label"]] != 0) & (lut[r["label"]] != 255)
        _save_png(salient.astype(np.uint8) * np.uint8(255), out / "sal_distill" / f"{sample_id}.png")
        _write_pascal_parts(out / "human_parts" / f"{sample_id}.mat", sample_id, r)
        context = np.array([_NYUD_TO_CONTEXT.get(v, 0) for v in range(41)], np.uint16)
        savemat(out / "pascal-context" / "trainval" / f"{sample_id}.mat",
                {"LabelMap": context[r["label"]]}, do_compression=True)  # fmt: skip
    else:  # cityscapes
        city, stem = sample_id.split("/")
        lut = np.array([_NYUD_TO_CITYSCAPES.get(v, 0) for v in range(41)], np.uint8)
        fx = _NYUD_FX * size[1] / 640.0
        baseline = 0.209313
        depth = r["depth"]
        disp = np.where(depth > 0, baseline * fx / np.maximum(depth, 1e-6), 0.0)
        png = np.where(depth > 0, np.clip(np.rint(disp * 256.0) + 1, 1, 65535), 0).astype(np.uint16)
        d = {k: out / k / split / city for k in ("leftImg8bit", "gtFine", "disparity", "camera")}
        _save_png(r["image"], d["leftImg8bit"] / f"{stem}_leftImg8bit.png")
        _save_png(lut[r["label"]], d["gtFine"] / f"{stem}_gtFine_labelIds.png")
        Image.fromarray(png).save(d["disparity"] / f"{stem}_disparity.png", compress_level=1)
        camera = {"extrinsic": {"baseline": baseline}, "intrinsic": {"fx": fx, "fy": fx}}
        (d["camera"] / f"{stem}_camera.json").write_text(json.dumps(camera))


def render_scenes(
    out_dir: str | os.PathLike,
    layout: Layout = "nyud",
    n: int = 200,
    seed: int = 0,
    size: tuple[int, int] = (448, 576),
    val_fraction: float = 0.2,
    processes: int | None = None,
) -> Path:
    """Render ``n`` scenes into ``out_dir`` in the ``layout`` of a real dataset and return its path.

    ``nyud``: ``images/*.png``, ``segmentation/*.png``, ``depth/*.npy``, ``normals/*.png``,
    ``edge/*.png``, ``gt_sets/{train,val}.txt``. ``pascal``: ``JPEGImages/*.jpg``,
    ``semseg/VOC12/*.png``, ``human_parts/*.mat`` (PASCAL-Part ``anno`` structs),
    ``normals_distill/*.png``, ``sal_distill/*.png``, ``pascal-context/trainval/*.mat``
    (``LabelMap`` of PASCAL-Context class ids), ``ImageSets/Context/{train,val}.txt``; each image
    is up to 1/8 smaller than ``size`` per side. ``cityscapes``: ``leftImg8bit``, ``gtFine``
    (``labelIds``), ``disparity`` (uint16, ``256 * disparity + 1``, 0 where the depth is invalid)
    and ``camera`` under ``{train,val}/{city}/``. Every layout also gets
    :data:`~mtssm.data.constants.RENDER_MARKER` (the arguments, as JSON) at its root, which tells
    evaluation that the scenes are rendered.

    The last ``round(n * val_fraction)`` scenes (at least 1 when n >= 2 and ``val_fraction`` > 0)
    form the val split. Scene
    i uses seed ``(seed, i)``, so the output depends only on the arguments. ``processes``
    (default: up to 2) render in parallel.
    """
    if layout not in ("nyud", "pascal", "cityscapes"):
        raise ValueError(f"layout must be 'nyud', 'pascal' or 'cityscapes', got {layout!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if len(size) != 2 or min(size) < 8:
        raise ValueError(f"size must be (H, W) with H, W >= 8, got {size!r}")
    size = (int(size[0]), int(size[1]))
    out = Path(out_dir)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = min(max(round(n * val_fraction), 1 if n >= 2 and val_fraction > 0 else 0), n - 1)
    splits = ["train"] * (n - n_val) + ["val"] * n_val
    if layout == "nyud":
        ids = [f"{i:05d}" for i in range(n)]
        dirs = ["images", "segmentation", "depth", "normals", "edge", "gt_sets"]
    elif layout == "pascal":
        ids = [f"2008_{i:06d}" for i in range(n)]
        dirs = ["JPEGImages", "semseg/VOC12", "human_parts", "normals_distill", "sal_distill",
                "pascal-context/trainval", "ImageSets/Context"]  # fmt: skip
    else:
        ids = [f"{'aachen' if s == 'train' else 'frankfurt'}/{'aachen' if s == 'train' else 'frankfurt'}"
               f"_{i:06d}_000019" for i, s in enumerate(splits)]  # fmt: skip
        dirs = [f"{k}/{s}/{c}" for k in ("leftImg8bit", "gtFine", "disparity", "camera")
                for s, c in (("train", "aachen"), ("val", "frankfurt"))]  # fmt: skip
    for sub in dirs:
        (out / sub).mkdir(parents=True, exist_ok=True)
    jobs = [(layout, out, sid, s, int(np.random.SeedSequence([seed, i]).generate_state(1)[0]), size)
            for i, (sid, s) in enumerate(zip(ids, splits))]  # fmt: skip
    procs = min(processes or min(os.cpu_count() or 1, 2), len(jobs))
    if procs > 1 and len(jobs) > 2:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(procs) as pool:
            pool.map(_write_one, jobs, chunksize=max(1, len(jobs) // (4 * procs)))
    else:
        for job in jobs:
            _write_one(job)
    if layout != "cityscapes":
        split_dir = out / ("gt_sets" if layout == "nyud" else "ImageSets/Context")
        for name in ("train", "val"):
            chosen = [i for i, s in zip(ids, splits) if s == name]
            (split_dir / f"{name}.txt").write_text("".join(f"{i}\n" for i in chosen))
    marker = {"layout": layout, "n": n, "seed": seed, "size": list(size), "val_fraction": val_fraction}
    (out / RENDER_MARKER).write_text(json.dumps(marker) + "\n")
    return out

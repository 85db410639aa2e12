"""Export (loaded in a fresh process after ``import mtssm``) and prediction images."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from mtssm.engine.checkpoint import save_checkpoint
from mtssm.engine.config import config_to_dict, load_recipe_file
from mtssm.engine.predict import colorize, load_model_from_checkpoint, voc_palette
from mtssm.recipes import find_recipe

ROOT = Path(__file__).resolve().parents[2]


def _checkpoint(tmp_path: Path) -> Path:
    from mtssm.engine.build import build_model

    cfg = load_recipe_file(find_recipe("nyud_msm_tiny"), ["data.render_size=[64, 64]", "data.crop_size=[64, 64]"])
    torch.manual_seed(0)
    model = build_model(cfg)
    return save_checkpoint(tmp_path / "ckpts", 1, model, {}, config_to_dict(cfg))


@pytest.mark.slow
def test_export_loads_in_fresh_process_and_matches_checkpoint(tmp_path):
    from mtssm.cli import main

    ckpt = _checkpoint(tmp_path)
    out = tmp_path / "model.pt2"
    res = CliRunner().invoke(main, ["export", str(ckpt), "--out", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    model, _, _ = load_model_from_checkpoint(ckpt)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = {k: v for k, v in model(x).items()}
    torch.save({"x": x, "ref": ref}, tmp_path / "ref.pt")
    code = (
        "import sys, torch, mtssm\n"
        "p = torch.export.load(sys.argv[1])\n"
        "d = torch.load(sys.argv[2])\n"
        "out = p.module()(d['x'])\n"
        "assert isinstance(out, dict) and out.keys() == d['ref'].keys(), (type(out), list(out))\n"
        "for k in out: torch.testing.assert_close(out[k], d['ref'][k], rtol=1e-4, atol=1e-5)\n"
        "print('ok', sorted(out))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "ref.pt")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("ok"), res.stderr[-3000:]


def test_predict_writes_each_task_and_a_sheet(tmp_path):
    from mtssm.cli import main

    ckpt = _checkpoint(tmp_path)
    img = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(img)
    res = CliRunner().invoke(main, ["predict", str(ckpt), str(img), "--out", str(tmp_path / "pred")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    files = {p.name: Image.open(p) for p in (tmp_path / "pred").iterdir()}
    assert set(files) == {f"scene_{t}.png" for t in ("semseg", "depth", "normals", "edge", "sheet")}
    assert all(files[f"scene_{t}.png"].size == (50, 40) for t in ("semseg", "depth", "normals", "edge"))
    assert files["scene_sheet.png"].size == (50 * 5, 40 + 14)
    res = CliRunner().invoke(main, ["predict", str(ckpt), str(tmp_path / "nope.png"), "--out", str(tmp_path)])
    assert res.exit_code == 1 and "nope.png" in res.output and len(res.output.strip().splitlines()) == 1


def test_colour_maps():
    pal = voc_palette()
    assert len({tuple(c) for c in pal}) == 256 and tuple(pal[0]) == (0, 0, 0) and tuple(pal[1]) == (128, 0, 0)
    logits = torch.zeros(40, 2, 3)
    logits[1, 0, 0] = logits[2, 1, 2] = 5.0
    seg = np.asarray(colorize("semseg", logits))
    assert tuple(seg[0, 0]) == tuple(pal[1]) and tuple(seg[1, 2]) == tuple(pal[2]) and tuple(seg[0, 1]) == (0, 0, 0)
    normals = torch.tensor([0.0, 0.0, 2.0]).view(3, 1, 1).expand(3, 2, 2)
    assert tuple(np.asarray(colorize("normals", normals))[0, 0]) == (128, 128, 255)
    depth = np.asarray(colorize("depth", torch.linspace(0, 1, 20).view(1, 4, 5)))
    assert depth[0, 0].sum() < depth[-1, -1].sum()  # near dark blue, far bright yellow
    edge = np.asarray(colorize("edge", torch.tensor([[[-20.0, 20.0]]])))
    assert edge[0, 0, 0] == 0 and edge[0, 1, 0] == 255


def _saved(tmp_path: Path, img: Image.Image, name: str) -> Path:
    path = tmp_path / name
    img.save(path)
    return path


def test_read_rgb_converts_every_mode(tmp_path):
    from mtssm.data.constants import IMAGENET_MEAN
    from mtssm.engine.predict import read_rgb

    grey16 = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    path = _saved(tmp_path, Image.fromarray(grey16), "grey16.png")
    assert Image.open(path).mode == "I;16"
    rgb = read_rgb(path)
    assert rgb.shape == (1, 4, 3) and rgb.dtype == np.float32
    np.testing.assert_allclose(rgb[..., 0], grey16 / 65535.0, rtol=1e-6)  # not clipped to white
    assert np.array_equal(rgb[..., 0], rgb[..., 2])
    np.testing.assert_allclose(read_rgb(_saved(tmp_path, Image.fromarray(grey16.astype(np.int32), "I"), "i.tif"))[..., 1],
                               grey16 / 65535.0, rtol=1e-6)  # fmt: skip
    f = np.array([[0.0, 0.25, 1.5, -1.0]], dtype=np.float32)
    np.testing.assert_allclose(read_rgb(_saved(tmp_path, Image.fromarray(f, "F"), "f.tif"))[..., 0], [[0, 0.25, 1, 0]])

    colours = np.array([[[255, 0, 0], [0, 128, 255]]], dtype=np.uint8)
    base = Image.fromarray(colours)
    expect = colours / np.float32(255.0)
    np.testing.assert_array_equal(read_rgb(_saved(tmp_path, base, "rgb.png")), expect)
    np.testing.assert_array_equal(read_rgb(_saved(tmp_path, base.convert("L"), "l.png"))[..., 0],
                                  np.asarray(base.convert("L")) / np.float32(255.0))  # fmt: skip
    np.testing.assert_array_equal(read_rgb(_saved(tmp_path, base.quantize(4), "p.png")),
                                  np.asarray(base.quantize(4).convert("RGB")) / np.float32(255.0))  # fmt: skip
    cmyk = read_rgb(_saved(tmp_path, base.convert("CMYK"), "c.jpg"))
    assert cmyk.shape == (1, 2, 3) and abs(cmyk[0, 0, 0] - 1.0) < 0.05 and cmyk[0, 0, 1] < 0.05

    # transparency: opaque pixels keep their colour, transparent ones take the padding colour
    rgba = np.concatenate([colours, np.array([[[255], [0]]], np.uint8)], axis=2)
    out = read_rgb(_saved(tmp_path, Image.fromarray(rgba, "RGBA"), "rgba.png"))
    np.testing.assert_allclose(out[0, 0], [1, 0, 0])
    np.testing.assert_allclose(out[0, 1], IMAGENET_MEAN, rtol=1e-6)
    la = read_rgb(_saved(tmp_path, Image.fromarray(rgba, "RGBA").convert("LA"), "la.png"))
    np.testing.assert_allclose(la[0, 1], IMAGENET_MEAN, rtol=1e-6)
    pal = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    pal.putpalette([10, 20, 30, 200, 100, 0])
    pal.info["transparency"] = 1
    out = read_rgb(_saved(tmp_path, pal, "pt.png"))
    np.testing.assert_allclose(out[0, 0], np.array([10, 20, 30]) / 255.0, rtol=1e-6)
    np.testing.assert_allclose(out[0, 1], IMAGENET_MEAN, rtol=1e-6)

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match="bad.png' cannot be read"):
        read_rgb(bad)


def test_read_rgb_applies_exif_orientation(tmp_path):
    from mtssm.engine.predict import read_rgb

    img = Image.fromarray(np.zeros((2, 3, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: displayed 3 high, 2 wide
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif)
    assert read_rgb(path).shape == (3, 2, 3)


def test_output_stems_never_collide(tmp_path):
    from mtssm.engine.predict import output_stems

    for rel in ("a/x.png", "b/x.png", "b/x.jpg", "c/y.png", "z.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    p = lambda rel: (tmp_path / rel).resolve()  # noqa: E731
    assert output_stems([tmp_path / "a/x.png", tmp_path / "c/y.png"]) == {p("a/x.png"): "a/x", p("c/y.png"): "c/y"}
    assert output_stems([tmp_path / "c/y.png"]) == {p("c/y.png"): "y"}
    assert output_stems([tmp_path / "b/x.png", tmp_path / "b/x.jpg"]) == {p("b/x.png"): "x.png", p("b/x.jpg"): "x.jpg"}
    twice = output_stems([tmp_path / "z.png", tmp_path / "a/../z.png"])  # one file named twice
    assert twice == {p("z.png"): "z"}

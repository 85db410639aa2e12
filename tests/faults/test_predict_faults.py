"""``mtssm predict``: inputs with the same name, image modes, outputs that would overwrite inputs,
unreadable images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mtssm.engine import checkpoint as ckpt
from tests.faults.conftest import assert_one_line_error, cli, snapshot

_OUTPUTS = ("semseg", "depth", "normals", "edge", "sheet")


def _rgb(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
    return path


def test_same_file_name_in_two_folders_keeps_both_outputs(trained_run, tmp_path):
    a, b = _rgb(tmp_path / "in" / "a" / "scene.png", 1), _rgb(tmp_path / "in" / "b" / "scene.png", 2)
    out = tmp_path / "out"
    res = cli("predict", trained_run, a, b, a, "--out", out)  # a named twice: predicted once
    assert res.exit_code == 0, res.output + repr(res.exception)
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == sorted(f"{d}/scene_{t}.png" for d in "ab" for t in _OUTPUTS)
    assert res.output.strip() == f"wrote 10 files for 2 images to {out}"
    sheet_a = np.asarray(Image.open(out / "a" / "scene_sheet.png"))
    sheet_b = np.asarray(Image.open(out / "b" / "scene_sheet.png"))
    assert np.array_equal(sheet_a[14:, :48], np.asarray(Image.open(a)))  # each sheet shows its own input
    assert np.array_equal(sheet_b[14:, :48], np.asarray(Image.open(b)))


def test_same_stem_with_two_suffixes_keeps_both_outputs(trained_run, tmp_path):
    png = _rgb(tmp_path / "scene.png", 1)
    bmp = tmp_path / "scene.bmp"
    Image.open(_rgb(tmp_path / "tmp.png", 2)).save(bmp)
    res = cli("predict", trained_run, png, bmp, "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output + repr(res.exception)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == sorted(f"scene.{s}_{t}.png" for s in ("png", "bmp") for t in _OUTPUTS)
    assert "wrote 10 files for 2 images" in res.output


def test_16bit_grey_png_is_scaled_not_white(trained_run, tmp_path):
    ramp = np.linspace(0, 65535, 40 * 48).reshape(40, 48).astype(np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(ramp).save(path)
    res = cli("predict", trained_run, path, "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output + repr(res.exception)
    shown = np.asarray(Image.open(tmp_path / "out" / "grey16_sheet.png"))[14:, :48]
    expected = np.round(ramp / 65535.0 * 255.0)
    assert np.abs(shown[..., 0].astype(float) - expected).max() <= 1 and shown.min() == 0


def test_outputs_that_would_overwrite_an_input_are_refused(trained_run, tmp_path):
    folder = tmp_path / "in"
    scene = _rgb(folder / "scene.png", 1)
    victim = _rgb(folder / "scene_depth.png", 2)  # also an input: predicting scene.png would overwrite it
    before = snapshot(folder)
    res = cli("predict", trained_run, scene, victim, "--out", folder)
    assert_one_line_error(res, victim.resolve(), "overwrite")
    assert snapshot(folder) == before


def test_unreadable_image_is_one_line_and_loses_nothing(trained_run, tmp_path):
    good = _rgb(tmp_path / "in" / "good.png", 1)
    out = tmp_path / "out"
    assert cli("predict", trained_run, good, "--out", out).exit_code == 0
    before = snapshot(out)
    bad = tmp_path / "in" / "bad.png"
    bad.write_bytes(good.read_bytes()[:60])  # a cut-off download
    assert_one_line_error(cli("predict", trained_run, bad, "--out", out), bad, "cannot be read")
    missing = tmp_path / "in" / "missing.png"
    assert_one_line_error(cli("predict", trained_run, good, missing, "--out", out), missing, "does not exist")
    assert snapshot(out) == before
    ckpt.verify_checkpoint(trained_run)

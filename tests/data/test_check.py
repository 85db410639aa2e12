"""``check_dataset`` and the ``mtssm data`` CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mtssm.cli import main
from mtssm.data import check_dataset


def test_clean_copies_have_no_problems(nyud_root: Path, pascal_root: Path, cityscapes_root: Path) -> None:
    assert check_dataset(nyud_root, "nyud") == []
    assert check_dataset(pascal_root, "pascal") == []
    assert check_dataset(cityscapes_root, "cityscapes") == []


def test_every_problem_is_listed_with_its_path(corruptible_nyud: Path) -> None:
    ids = (corruptible_nyud / "gt_sets" / "train.txt").read_text().split()
    missing = corruptible_nyud / "depth" / f"{ids[0]}.npy"
    missing.unlink()
    truncated = corruptible_nyud / "normals" / f"{ids[1]}.png"
    truncated.write_bytes(truncated.read_bytes()[:100])
    small = corruptible_nyud / "edge" / f"{ids[2]}.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(small)
    bad = corruptible_nyud / "segmentation" / f"{ids[3]}.png"
    arr = np.asarray(Image.open(bad)).copy()
    arr[0, 0] = 99
    Image.fromarray(arr).save(bad)
    problems = check_dataset(corruptible_nyud, "nyud")
    assert len(problems) == 4
    text = "\n".join(problems)
    for path, what in ((missing, "missing"), (truncated, "cannot decode"), (small, "does not match"),
                       (bad, "out of range")):  # fmt: skip
        assert f"{path}: " in text and what in text


def test_wrong_root_is_a_problem(tmp_path: Path) -> None:
    assert check_dataset(tmp_path / "nope", "nyud") == [f"{tmp_path / 'nope'}: root folder not found"]
    problems = check_dataset(tmp_path, "pascal")
    assert problems and all("JPEGImages" in p for p in problems)
    with pytest.raises(ValueError, match="layout"):
        check_dataset(tmp_path, "coco")


def test_cli_render_then_check(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "r"
    res = runner.invoke(main, ["data", "render", "--layout", "nyud", "--out", str(out), "--n", "3",
                               "--size", "24x32", "--processes", "1"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert len(list((out / "images").glob("*.png"))) == 3
    res = runner.invoke(main, ["data", "check", str(out), "--layout", "nyud"])
    assert res.exit_code == 0 and "no problems" in res.output
    (out / "depth" / "00000.npy").unlink()
    res = runner.invoke(main, ["data", "check", str(out), "--layout", "nyud"])
    assert res.exit_code == 1 and "00000.npy: file is missing" in res.output
    res = runner.invoke(main, ["data", "render", "--out", str(out), "--size", "big"])
    assert res.exit_code != 0 and "HxW" in res.output

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


@pytest.mark.parametrize(
    ("fill", "what"),
    [(1e30, "beyond the sensor's range"), (2500.0, "beyond the sensor's range"), (np.nan, "non-finite"),
     (np.inf, "non-finite"), (-3.0, "negative")],
)  # fmt: skip
def test_implausible_depth_is_named(corruptible_nyud: Path, fill: float, what: str) -> None:
    ids = (corruptible_nyud / "gt_sets" / "val.txt").read_text().split()
    path = corruptible_nyud / "depth" / f"{ids[0]}.npy"
    depth = np.load(path)
    depth[2:5, 3:9] = fill  # a patch, as a fill value or a unit mistake would leave
    np.save(path, depth)
    problems = check_dataset(corruptible_nyud, "nyud")
    assert len(problems) == 1 and problems[0].startswith(f"{path}: ") and what in problems[0]
    assert "0..10 m" in problems[0] or "up to 10 m" in problems[0]


def test_depth_at_the_sensor_limits_is_plausible(corruptible_nyud: Path) -> None:
    ids = (corruptible_nyud / "gt_sets" / "train.txt").read_text().split()
    path = corruptible_nyud / "depth" / f"{ids[0]}.npy"
    depth = np.load(path)
    depth[0, 0], depth[0, 1] = 0.0, 10.0
    np.save(path, depth)
    assert check_dataset(corruptible_nyud, "nyud") == []


def test_non_finite_normals_are_named(tmp_path: Path) -> None:
    from mtssm.data.io import DataFileError, check_finite

    normals = np.zeros((4, 5, 3), np.float32)
    check_finite(tmp_path / "n.png", normals, "normals")
    normals[1, 2, 0] = np.nan
    with pytest.raises(DataFileError, match=f"{tmp_path / 'n.png'}: normals holds NaN or infinite"):
        check_finite(tmp_path / "n.png", normals, "normals")


def test_split_file_lines_that_are_not_utf8_are_named_by_number(corruptible_nyud: Path, pascal_root: Path) -> None:
    split = corruptible_nyud / "gt_sets" / "train.txt"
    ids = split.read_text().split()
    split.write_bytes(b"\xef\xbb\xbf" + "\n".join(ids).encode() + b"\ncaf\xe9\n\n\xff\xfe\n")
    problems = check_dataset(corruptible_nyud, "nyud")
    assert problems == [f"{split}: lines {len(ids) + 1}, {len(ids) + 3} are not UTF-8 text "
                        "(expected one sample id a line)"]  # fmt: skip
    split.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(ids).encode())  # a byte-order mark and CRLF are fine
    assert check_dataset(corruptible_nyud, "nyud") == []


def test_cli_check_reports_bad_split_file_in_one_line(corruptible_nyud: Path) -> None:
    split = corruptible_nyud / "gt_sets" / "val.txt"
    split.write_bytes(split.read_bytes() + b"\x80bad\n")
    res = CliRunner().invoke(main, ["data", "check", str(corruptible_nyud), "--layout", "nyud"])
    assert res.exit_code == 1 and (res.exception is None or isinstance(res.exception, SystemExit))
    assert f"{split}: line " in res.output and "Traceback" not in res.output

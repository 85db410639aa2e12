"""Implausible targets and broken split files: ``mtssm data check`` names each by file (and line),
and training on them stops in one line naming the file before any step is taken."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.faults.conftest import assert_one_line_error, cli, run_recipe, snapshot


@pytest.fixture()
def data_copy(tiny_data: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_data, tmp_path / "data"))


def _ids(root: Path, split: str) -> list[str]:
    return (root / "gt_sets" / f"{split}.txt").read_text().split()


def _check(root: Path) -> list[str]:
    res = cli("data", "check", root, "--layout", "nyud")
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output + repr(res.exception)
    return res.output.strip().splitlines()


@pytest.mark.parametrize(("fill", "what"), [(1e30, "beyond the sensor's range"), (np.nan, "non-finite")])
def test_implausible_depth_is_reported_and_stops_training(data_copy, tmp_path, fill, what):
    bad = []
    for sid in _ids(data_copy, "train"):
        path = data_copy / "depth" / f"{sid}.npy"
        np.save(path, np.full_like(np.load(path), fill))
        bad.append(path)
    lines = _check(data_copy)
    assert lines[-1] == f"{len(bad)} problem(s) found in {data_copy}"
    assert sorted(ln.split(": ")[0] for ln in lines[:-1]) == sorted(map(str, bad))
    assert all(what in ln for ln in lines[:-1])
    before = snapshot(data_copy)
    out = tmp_path / "run"
    line = assert_one_line_error(run_recipe(data_copy, out), what)
    assert any(str(p) in line for p in bad)
    assert not (out / "checkpoints").exists()  # no step was taken on such targets
    assert snapshot(data_copy) == before


def test_non_utf8_split_line_is_reported_by_number_and_stops_training(data_copy, tmp_path):
    split = data_copy / "gt_sets" / "train.txt"
    ids = _ids(data_copy, "train")
    split.write_bytes("\n".join(ids).encode() + b"\nsc\xe8ne_7\n")
    lines = _check(data_copy)
    assert lines[0] == f"{split}: line {len(ids) + 1} is not UTF-8 text (expected one sample id a line)"
    assert_one_line_error(run_recipe(data_copy, tmp_path / "run"), split, f"line {len(ids) + 1}")

"""Tiny rendered datasets in each real layout, shared by the data tests (rendered once per session).

Tests that corrupt files copy a dataset first (``corruptible_nyud``) so the shared ones stay sound.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mtssm.data import render_scenes

SIZE = (48, 64)


@pytest.fixture(scope="session")
def nyud_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render_scenes(tmp_path_factory.mktemp("nyud"), layout="nyud", n=8, seed=3, size=SIZE, processes=1)


@pytest.fixture(scope="session")
def pascal_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render_scenes(tmp_path_factory.mktemp("pascal"), layout="pascal", n=6, seed=5, size=SIZE, processes=1)


@pytest.fixture(scope="session")
def cityscapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render_scenes(tmp_path_factory.mktemp("cityscapes"), layout="cityscapes", n=4, seed=7,
                         size=(48, 96), processes=1)  # fmt: skip


@pytest.fixture()
def corruptible_nyud(nyud_root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "nyud_copy"
    shutil.copytree(nyud_root, dst)
    return dst

"""Fault injection through the real CLI: one tiny run on tiny rendered data, trained once per session.

Each test copies what it damages, runs ``mtssm`` as a user would (click's runner, in process), and
asserts the exit status, that the error is one line naming the file at fault, and that nothing
else was lost or changed (:func:`snapshot` before and after).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from mtssm.cli import main
from mtssm.data import render_scenes

#: The tiny recipe cut to three steps with a checkpoint at each, a one-batch final evaluation and
#: no prediction images.
SETS = (
    "train.steps=3", "train.ckpt_every=1", "train.keep_ckpts=3", "train.log_every=1", "train.progress=false",
    "data.crop_size=[64, 64]", "data.batch_size=2", "data.eval_batch_size=2", "eval.max_batches=1",
    "eval.edge_thresholds=3", "eval.predict_samples=0", "eval.baselines=false",
)  # fmt: skip


def cli(*args: object) -> Result:
    """``mtssm ARGS...`` in process."""
    return CliRunner().invoke(main, [str(a) for a in args])


def run_recipe(data: Path, out: Path, *extra: str) -> Result:
    """``mtssm recipe run nyud_msm_tiny`` with :data:`SETS` on ``data`` into ``out``."""
    sets = [x for s in SETS for x in ("--set", s)]
    return cli("recipe", "run", "nyud_msm_tiny", "--data-root", data, "--out", out, *sets, *extra)


def assert_one_line_error(res: Result, *names: object) -> str:
    """Exit status 1 and one ``Error: ...`` line holding every one of ``names``; returns the line."""
    assert res.exit_code == 1, res.output + repr(res.exception)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four rendered NYUDv2-layout scenes of 64x64 (three train, one val)."""
    return render_scenes(tmp_path_factory.mktemp("faults_data"), layout="nyud", n=4, seed=1, size=(64, 64),
                         processes=1)  # fmt: skip


@pytest.fixture(scope="session")
def trained_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished three-step run with checkpoints at steps 1, 2, 3 (do not modify: copy it)."""
    out = tmp_path_factory.mktemp("faults_run") / "run"
    res = run_recipe(tiny_data, out)
    assert res.exit_code == 0, res.output + repr(res.exception)
    return out


@pytest.fixture()
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    """A copy of :func:`trained_run` to damage."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


def step(run: Path, n: int) -> Path:
    return run / "checkpoints" / f"step_{n:08d}"

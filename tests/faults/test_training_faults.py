"""Training faults through the real CLI: each ends in one line naming the key, file or folder at
fault, and loses or corrupts nothing that was there.

Every case runs ``mtssm recipe run nyud_msm_tiny`` on six rendered 64x64 scenes with a few steps.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
from click.testing import CliRunner

from mtssm.cli import main
from mtssm.data import build_dataset, make_dataloader, render_scenes
from mtssm.engine import sanity, trainer
from mtssm.engine.build import PolyWarmup, build_model, load_recipe
from mtssm.engine.checkpoint import MODEL_FILE, latest_checkpoint

BASE = [
    "train.steps=2", "train.log_every=1", "train.ckpt_every=1", "train.progress=false", "data.crop_size=[64, 64]",
    "data.batch_size=2", "data.eval_batch_size=2", "eval.edge_thresholds=3", "eval.predict_samples=0",
    "eval.baselines=false", "eval.max_batches=1",
]
TRAIN_SAMPLES = 5  # of the 6 rendered scenes, the last is the val split


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "nyud"
    render_scenes(root, layout="nyud", n=6, seed=0, size=(64, 64))
    return root


def run(root: Path, out: Path, *sets: str, resume: bool = False):
    args = ["recipe", "run", "nyud_msm_tiny", "--data-root", str(root), "--out", str(out)]
    args += [x for s in (*BASE, *sets) for x in ("--set", s)]
    return CliRunner().invoke(main, args + (["--resume"] if resume else []))


def one_line_error(res) -> str:
    """The error line of a failed run, after checking it is the only line and the exit status."""
    assert res.exit_code == 1, res.output + repr(res.exception)
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
    return lines[0]


def snapshot(out: Path) -> dict[str, str]:
    """Hash of every file under ``out`` (what must not change)."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".lock"}


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(ckpt / MODEL_FILE))


# --- 1. validation and non-finite states --------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=.inf", "optim.lr: expected a finite number, got inf"),
        ("optim.lr=.nan", "optim.lr: expected a finite number, got nan"),
        ("optim.lr=1e45", "optim.lr: expected a value of at most 10000, got 1e+45"),
        ("optim.weight_decay=1e30", "optim.weight_decay: expected a value of at most 10000, got 1e+30"),
        ("optim.betas=[2, 3]", "optim.betas: expected two values in [0, 1), got [2.0, 3.0]"),
        ("train.seed=-1", "train.seed: expected a value >= 0, got -1"),
        ("train.device=tpu", "train.device: unknown device 'tpu'"),
        ("loss.weights.depth=.nan", "loss.weights.depth: expected a finite number"),
        ("model.args.drop_path_rate=.inf", "model.args.drop_path_rate: expected a finite number"),
        ("data.crop_size=[16, 16]", "data.crop_size: [16, 16] is smaller than the encoder's stride 32"),
    ],
)
def test_invalid_values_are_refused_naming_the_key(data_root, tmp_path, override, message):
    line = one_line_error(run(data_root, tmp_path / "run", override))
    assert message in line
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_non_finite_weights_are_never_checkpointed(data_root, tmp_path, monkeypatch):
    """The second optimizer step leaves an infinite weight: its checkpoint is refused and the
    error points at the step-1 checkpoint, whose weights are finite."""
    real = trainer.build_optimizer

    def poisoned(cfg, model):
        optimizer = real(cfg, model)
        step, calls = type(optimizer).step, []

        def poisoned_step(self, *args, **kwargs):
            out = step(self, *args, **kwargs)
            calls.append(1)
            if len(calls) == 2:
                with torch.no_grad():
                    next(model.parameters()).view(-1)[0] = float("inf")
            return out

        optimizer.step = types.MethodType(poisoned_step, optimizer)  # a bound method, as the scheduler wants
        return optimizer

    monkeypatch.setattr(trainer, "build_optimizer", poisoned)
    out = tmp_path / "run"
    line = one_line_error(run(data_root, out, "train.steps=3"))
    first = next(n for n, _ in build_model(load_recipe("nyud_msm_tiny"), device="meta").named_parameters())
    assert f"parameter {first!r} is not finite after step 2; its checkpoint was not written" in line
    assert f"last checkpoint (finite weights): {out / 'checkpoints' / 'step_00000001'}" in line
    last = latest_checkpoint(out / "checkpoints")
    assert last.name == "step_00000001"
    assert all(torch.isfinite(w).all() for w in weights(last).values())
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_00000001"]


# --- 2. resume with changed settings -------------------------------------------------------------


def test_resume_applies_a_longer_schedule_and_a_new_lr(data_root, tmp_path):
    out = tmp_path / "run"
    assert run(data_root, out).exit_code == 0
    res = run(data_root, out, "train.steps=4", "optim.lr=1e-3", resume=True)
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "applied optim.lr (0.002 -> 0.001), train.steps (2 -> 4)" in res.output
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    schedule = PolyWarmup(total=4, power=0.9, warmup=20, warmup_start=1e-3)
    assert records[2]["lr"] == pytest.approx(1e-3 * schedule(2), rel=1e-12)
    assert records[3]["lr"] == pytest.approx(1e-3 * schedule(3), rel=1e-12)
    saved = (out / "config.yaml").read_text()
    assert "steps: 4" in saved and "lr: 0.001" in saved


def test_resume_with_another_model_is_refused_and_changes_nothing(data_root, tmp_path):
    out = tmp_path / "run"
    assert run(data_root, out).exit_code == 0
    before = snapshot(out)
    line = one_line_error(run(data_root, out, "model.name=mtmamba_tiny", "data.batch_size=4", resume=True))
    assert "model.name ('msm_tiny' -> 'mtmamba_tiny')" in line and "data.batch_size (2 -> 4)" in line
    assert str(out) in line
    assert snapshot(out) == before  # config.yaml and the checkpoints untouched


# --- 3. one run per folder ----------------------------------------------------------------------

_HOLD = (
    "import sys; from mtssm.engine.lock import lock_run_folder\n"
    "with lock_run_folder(sys.argv[1]):\n"
    "    print('locked', flush=True); sys.stdin.read()\n"
)


def test_a_second_run_on_a_locked_folder_stops_naming_folder_and_process(data_root, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = one_line_error(run(data_root, out))
        assert f"{out.resolve()} is in use by another run (process {holder.pid})" in line
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.communicate("")
    assert run(data_root, out).exit_code == 0  # free again once the holder is gone


def test_cleanup_removes_only_temporary_folders_of_dead_processes(data_root, tmp_path):
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    ckpts.mkdir(parents=True)
    alive = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        (ckpts / f".step_00000009.tmp-{alive.pid}").mkdir()
        (ckpts / f".step_00000009.tmp-{dead.pid}").mkdir()
        res = run(data_root, out, "train.steps=1")
        assert res.exit_code == 0, res.output + repr(res.exception)
        names = {p.name for p in ckpts.iterdir()}
        assert f".step_00000009.tmp-{alive.pid}" in names and f".step_00000009.tmp-{dead.pid}" not in names
    finally:
        alive.communicate(b"")


# --- 5. sanity bounds ---------------------------------------------------------------------------


def test_a_step_that_cannot_fit_in_memory_is_refused(data_root, tmp_path, monkeypatch):
    monkeypatch.setattr(sanity, "available_memory", lambda device: 8 * 2**30)  # the same on every machine
    line = one_line_error(run(data_root, tmp_path / "run", "data.crop_size=[4000, 4000]"))
    assert "data.crop_size [4000, 4000] x 2 images a micro-step" in line
    assert "but cpu has 8.0 GiB free" in line and "lower data.crop_size or data.batch_size" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_batch_larger_than_the_split_is_refused(data_root, tmp_path):
    line = one_line_error(run(data_root, tmp_path / "run", f"data.batch_size={TRAIN_SAMPLES + 1}"))
    assert f"data.batch_size: {TRAIN_SAMPLES + 1} is larger than data.train_split 'train' at {data_root}" in line
    assert f"({TRAIN_SAMPLES} samples)" in line


def test_an_empty_split_is_refused(data_root, tmp_path):
    root = tmp_path / "nyud"
    shutil.copytree(data_root, root)
    (root / "gt_sets" / "train.txt").write_text("")
    line = one_line_error(run(root, tmp_path / "run"))
    assert f"data.train_split 'train' at {root} holds no samples" in line


# --- 7. file errors in loader workers -----------------------------------------------------------


def test_a_bad_file_gives_the_same_line_with_and_without_workers(data_root, tmp_path):
    root = tmp_path / "nyud"
    shutil.copytree(data_root, root)
    for image in (root / "images").glob("*.png"):
        image.write_bytes(b"not a png")
    lines = [one_line_error(run(root, tmp_path / f"run{n}", f"data.num_workers={n}")) for n in (0, 2)]
    assert lines[0] == lines[1]
    assert str(root / "images") in lines[0] and "cannot decode image" in lines[0]


# --- 9. no deprecation noise from torchdata -----------------------------------------------------


def test_the_loader_prints_no_set_vital_warning(data_root):
    ds = build_dataset("nyud", data_root, "train", train=True, crop_size=(64, 64))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        next(iter(make_dataloader(ds, 2, train=True, num_workers=0)))
    assert not [w for w in caught if "set_vital" in str(w.message)]

"""Damaged checkpoints: eval, predict and export refuse them in one line naming the file; a fresh
run will not overwrite them; ``--resume`` falls back to the newest intact one, says so, and ends
with the same weights as the undamaged run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from mtssm.engine import checkpoint as ckpt
from mtssm.engine.predict import load_model_from_checkpoint
from tests.faults.conftest import assert_one_line_error, cli, run_recipe, snapshot, step


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _poison(run: Path) -> Path:
    """Rewrite the newest checkpoint with NaN weights and a valid checksum, as a diverged run wrote them."""
    folder = step(run, 3)
    model, _, _ = load_model_from_checkpoint(folder)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    config, at = ckpt.read_checkpoint_config(folder)
    state = ckpt.load_train_state(folder)
    state.pop("step")
    ckpt.save_checkpoint(run / "checkpoints", at, model, state, config, keep=3)
    return folder / ckpt.MODEL_FILE


def _image(tmp_path: Path) -> Path:
    path = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("damage", ["truncated weights", "flipped weights byte", "NaN weights"])
def test_eval_predict_export_refuse_a_damaged_checkpoint_in_one_line(run_copy, tiny_data, tmp_path, damage):
    if damage == "NaN weights":
        bad = _poison(run_copy)
        what = "NaN"
    else:
        bad = step(run_copy, 3) / ckpt.MODEL_FILE
        (_truncate if damage.startswith("truncated") else _flip_byte)(bad)
        what = "truncated or corrupt" if damage.startswith("truncated") else "checksum mismatch"
    before = snapshot(run_copy)
    for target in (run_copy, step(run_copy, 3), bad):  # the run, the checkpoint, its weights file
        assert_one_line_error(cli("eval", target, "--data-root", tiny_data, "--out", tmp_path / "e"), bad, what)
    assert_one_line_error(cli("predict", run_copy, _image(tmp_path), "--out", tmp_path / "p"), bad, what)
    assert_one_line_error(cli("export", run_copy, "--out", tmp_path / "m.pt2"), bad, what)
    assert snapshot(run_copy) == before
    assert not (tmp_path / "e").exists() and not (tmp_path / "p").exists() and not (tmp_path / "m.pt2").exists()
    ckpt.verify_checkpoint(step(run_copy, 2))  # the older checkpoints are intact and usable


@pytest.mark.parametrize(
    ("damage", "file"),
    [("truncate", ckpt.MODEL_FILE), ("flip", ckpt.STATE_FILE), ("nan", ckpt.MODEL_FILE), ("pointer", None)],
)
def test_resume_falls_back_to_the_newest_intact_checkpoint(run_copy, trained_run, tiny_data, damage, file):
    pointer = run_copy / "checkpoints" / "latest"
    if damage == "truncate":
        _truncate(step(run_copy, 3) / file)
    elif damage == "flip":
        _flip_byte(step(run_copy, 3) / file)
    elif damage == "nan":
        _poison(run_copy)
    else:  # a `latest` that names nothing: every checkpoint folder is a candidate, the newest intact wins
        pointer.write_bytes(b"\xff\xfe\x00")
        assert_one_line_error(cli("eval", run_copy, "--data-root", tiny_data), pointer, "names no complete checkpoint")
    older = {k: v for k, v in snapshot(run_copy).items() if "step_00000003" not in k and k.startswith("checkpoints/")}
    older.pop("checkpoints/latest")

    fresh = run_recipe(tiny_data, run_copy)  # a fresh run must not overwrite the damaged run's checkpoints
    assert_one_line_error(fresh, run_copy, "--resume")

    res = run_recipe(tiny_data, run_copy, "--resume")
    assert res.exit_code == 0, res.output + repr(res.exception)
    if file is not None:
        expected = step(run_copy, 3) / file
        assert f"skipped a damaged checkpoint: checkpoint file {expected}: " in res.output
        assert f"resumed from the newest intact checkpoint {step(run_copy, 2)} at step 2" in res.output
    else:  # step 3 is intact: nothing skipped but the pointer
        assert f"skipped a damaged checkpoint: {pointer}: names no checkpoint folder" in res.output
        assert f"resumed from the newest intact checkpoint {step(run_copy, 3)} at step 3" in res.output
    assert "Traceback" not in res.output
    after = snapshot(run_copy)
    assert all(after.get(k) == v for k, v in older.items())  # steps 1 and 2 untouched
    assert ckpt.latest_checkpoint(run_copy / "checkpoints") == step(run_copy, 3)
    ckpt.verify_checkpoint(step(run_copy, 3))
    # resuming is exact: the rewritten step 3 equals the undamaged run's
    got = safetensors.torch.load_file(str(step(run_copy, 3) / ckpt.MODEL_FILE))
    want = safetensors.torch.load_file(str(step(trained_run, 3) / ckpt.MODEL_FILE))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_resume_with_no_intact_checkpoint_starts_over(run_copy, tiny_data):
    for n in (1, 2, 3):
        _truncate(step(run_copy, n) / ckpt.MODEL_FILE)
    res = run_recipe(tiny_data, run_copy, "--resume")
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert res.output.count("skipped a damaged checkpoint") == 3
    assert f"no intact checkpoint under {run_copy / 'checkpoints'}; starting from step 0" in res.output
    for n in (1, 2, 3):
        ckpt.verify_checkpoint(step(run_copy, n))

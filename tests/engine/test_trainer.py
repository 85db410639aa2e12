"""The training loop: exact resume after SIGKILL, DDP equals one process, NaN stop, accumulation."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from tests.engine import engine_standin as standin
from mtssm.engine import checkpoint as ckpt
from mtssm.engine.trainer import NonFiniteLossError, PolyWarmup, train

WORKER = Path(__file__).resolve().parent / "train_worker.py"
ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    return env


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(ckpt.latest_checkpoint(run / "checkpoints") / ckpt.MODEL_FILE))


def _steps_logged(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(ln)["step"] for ln in path.read_text().splitlines() if ln.strip().endswith("}")]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def test_poly_warmup_schedule():
    f = PolyWarmup(total=10, power=1.0, warmup=2, warmup_start=0.0)
    assert [f(s) for s in (0, 1, 2)] == [0.0, 0.5, 1.0]
    assert f(6) == pytest.approx(0.5) and f(10) == 0.0
    assert PolyWarmup(total=10, power=0.0)(7) == 1.0


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    steps, ckpt_every = 10, 3
    sets = [f"train.steps={steps}", f"train.ckpt_every={ckpt_every}"]
    cfg = standin.make_config(steps=steps, ckpt_every=ckpt_every)
    train(standin.make_components(cfg), tmp_path / "a")

    b = tmp_path / "b"
    cmd = [sys.executable, str(WORKER), str(b), "--sleep", "0.15"] + [x for s in sets for x in ("--set", s)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and max(_steps_logged(b), default=0) < 5:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done = ckpt.load_train_state(b / "checkpoints")["step"]
    assert 3 <= done < steps  # killed mid-run, after at least one checkpoint
    assert max(_steps_logged(b)) > done  # and after steps that the resume must redo
    with open(b / "metrics.jsonl", "a") as f:  # a record the kill cut short
        f.write('{"kind": "train", "st')

    train(standin.make_components(cfg), b, resume=True)
    _assert_same(_final_weights(tmp_path / "a"), _final_weights(b))
    assert _steps_logged(b) == list(range(1, steps + 1))  # records past the checkpoint were replaced


def test_resume_with_another_worker_count_matches_uninterrupted_run(tmp_path):
    """A run stopped after its step-3 checkpoint and resumed with data.num_workers 2 instead of 0
    (another machine) ends with the weights of the uninterrupted run: 10 steps over 6-batch
    epochs, so the resumed part crosses an epoch."""
    cfg = standin.make_config(steps=10, ckpt_every=3)
    train(standin.make_components(cfg), tmp_path / "a")
    comps = standin.make_components(cfg)
    real_loss, calls = comps.loss_fn, {"n": 0}

    def crash_at_step_5(preds, batch):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_loss(preds, batch)

    comps.loss_fn = crash_at_step_5
    with pytest.raises(KeyboardInterrupt):
        train(comps, tmp_path / "b")
    assert ckpt.latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step_00000003"
    more = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=2))
    train(standin.make_components(more), tmp_path / "b", resume=True)
    _assert_same(_final_weights(tmp_path / "a"), _final_weights(tmp_path / "b"))


def test_ddp_two_processes_equal_one_process(tmp_path):
    sets = ["train.steps=4", "train.ckpt_every=0", "data.batch_size=4", "train.grad_accum=1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(WORKER), str(tmp_path / "ddp"), "--float64", "--dropout", "0"] + [x for s in sets for x in ("--set", s)]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = standin.make_config(steps=4, ckpt_every=0)
    train(standin.make_components(cfg, dtype=torch.float64, dropout=0), tmp_path / "one")
    ddp, one = _final_weights(tmp_path / "ddp"), _final_weights(tmp_path / "one")
    _assert_same(ddp, one, atol=1e-10)
    start = standin.make_components(cfg, dtype=torch.float64, dropout=0).model.state_dict()
    assert any(not torch.allclose(start[k], one[k]) for k in one)  # training moved the weights


def test_grad_accumulation_equals_full_batch(tmp_path):
    cfg1 = standin.make_config(steps=3, ckpt_every=0)
    cfg2 = standin.make_config(steps=3, ckpt_every=0, grad_accum=2)
    train(standin.make_components(cfg1, dtype=torch.float64, dropout=0), tmp_path / "full")
    train(standin.make_components(cfg2, dtype=torch.float64, dropout=0), tmp_path / "accum")
    _assert_same(_final_weights(tmp_path / "full"), _final_weights(tmp_path / "accum"), atol=1e-10)


def test_nan_loss_stops_naming_task_and_step_and_keeps_last_good_checkpoint(tmp_path):
    cfg = standin.make_config(steps=6, ckpt_every=1)
    comps = standin.make_components(cfg)
    real_loss = comps.loss_fn
    calls = {"n": 0}

    def poisoned(preds, batch):
        calls["n"] += 1
        if calls["n"] == 4:  # the 4th step's depth output turns to NaN
            preds = preds.clone()
            preds["depth"] = preds["depth"] * float("nan")
        return real_loss(preds, batch)

    comps.loss_fn = poisoned
    with pytest.raises(NonFiniteLossError, match=r"task 'depth' is not finite at step 4") as info:
        train(comps, tmp_path)
    assert "step_00000003" in str(info.value)
    latest = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    assert latest.name == "step_00000003"
    weights = safetensors.torch.load_file(str(latest / ckpt.MODEL_FILE))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_bf16_autocast_trains(tmp_path):
    cfg = standin.make_config(steps=2, ckpt_every=0, precision="bf16")
    result = train(standin.make_components(cfg), tmp_path)
    records = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # weights stay fp32


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    cfg = standin.make_config(steps=2, ckpt_every=0, compile=True)
    train(standin.make_components(cfg, dropout=0), tmp_path / "compiled")
    eager = standin.make_config(steps=2, ckpt_every=0)
    train(standin.make_components(eager, dropout=0), tmp_path / "eager")
    _assert_same(_final_weights(tmp_path / "compiled"), _final_weights(tmp_path / "eager"), atol=1e-5)


def test_running_into_a_used_folder_needs_resume(tmp_path):
    cfg = standin.make_config(steps=1)
    train(standin.make_components(cfg), tmp_path)
    with pytest.raises(FileExistsError, match="--resume"):
        train(standin.make_components(cfg), tmp_path)

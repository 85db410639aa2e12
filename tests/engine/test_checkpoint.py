"""Checkpoints: round trip, atomic replacement, stale temporary folders, pruning."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from torch import nn

from mtssm.engine import checkpoint as ckpt


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip_weights_state_config_and_rng(tmp_path):
    model = _model(0)
    torch.manual_seed(123)
    rng = ckpt.rng_state()
    expected = torch.rand(3)
    path = ckpt.save_checkpoint(tmp_path, 5, model, {"rng": rng, "extra": torch.ones(2)}, {"name": "x"})
    assert ckpt.latest_checkpoint(tmp_path) == path
    other = _model(1)
    assert not _same(model, other)
    ckpt.load_model_weights(other, path)
    assert _same(model, other)
    state = ckpt.load_train_state(tmp_path)
    assert state["step"] == 5 and torch.equal(state["extra"], torch.ones(2))
    ckpt.set_rng_state(state["rng"])
    assert torch.equal(torch.rand(3), expected)
    assert ckpt.read_checkpoint_config(path / ckpt.MODEL_FILE) == ({"name": "x"}, 5)
    for where in (tmp_path, tmp_path.parent / tmp_path.name, path, path / ckpt.MODEL_FILE):
        assert ckpt.resolve_checkpoint(where) == path


def test_failed_write_never_replaces_the_good_checkpoint(tmp_path, monkeypatch):
    good = _model(0)
    first = ckpt.save_checkpoint(tmp_path, 1, good, {}, {})

    def half_write(tensors, filename, metadata=None):  # dies half-way through the weights file
        with open(filename, "wb") as f:
            f.write(b"\x00" * 7)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, _model(1), {}, {})
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(tmp_path) == first
    assert not (tmp_path / "step_00000002").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    loaded = _model(2)
    ckpt.load_model_weights(loaded, tmp_path)
    assert _same(good, loaded)


def test_killed_writer_leftovers_are_ignored_then_removed(tmp_path):
    first = ckpt.save_checkpoint(tmp_path, 1, _model(0), {}, {})
    stale = tmp_path / ".step_00000002.tmp-99999"  # what kill -9 during a save leaves behind
    stale.mkdir()
    (stale / ckpt.MODEL_FILE).write_bytes(b"partial")
    half_done = tmp_path / "step_00000003"  # renamed into place, but `latest` was never updated
    half_done.mkdir()
    assert ckpt.latest_checkpoint(tmp_path) == first
    ckpt.save_checkpoint(tmp_path, 4, _model(0), {}, {}, keep=5)
    assert not stale.exists()


def test_keeps_only_the_newest(tmp_path):
    for step in range(1, 6):
        ckpt.save_checkpoint(tmp_path, step, _model(step), {}, {}, keep=2)
    kept = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_"))
    assert kept == ["step_00000004", "step_00000005"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000005"


def test_resolve_missing_checkpoint_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        ckpt.resolve_checkpoint(tmp_path)

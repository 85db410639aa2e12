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


def _flip_last_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_checksums_are_recorded_and_match_the_files(tmp_path):
    import hashlib
    import json

    path = ckpt.save_checkpoint(tmp_path, 3, _model(0), {"extra": torch.ones(2)}, {"name": "x"})
    with safetensors.safe_open(str(path / ckpt.MODEL_FILE), framework="pt") as f:
        sums = json.loads(f.metadata()["mtssm_checksum"])
    assert sums["algorithm"] == "sha256"
    assert sums[ckpt.STATE_FILE] == hashlib.sha256((path / ckpt.STATE_FILE).read_bytes()).hexdigest()
    ckpt.verify_checkpoint(path)  # passes on what was just written


@pytest.mark.parametrize("damage", ["truncate", "flip"])
@pytest.mark.parametrize("name", [ckpt.MODEL_FILE, ckpt.STATE_FILE])
def test_damaged_file_is_one_error_naming_it(tmp_path, damage, name):
    path = ckpt.save_checkpoint(tmp_path, 1, _model(0), {"extra": torch.ones(2)}, {"name": "x"})
    target = path / name
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    else:
        _flip_last_byte(target)
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.verify_checkpoint(path)
    assert info.value.path == str(target) and str(target) in str(info.value) and "\n" not in str(info.value)
    load = (lambda: ckpt.load_model_weights(_model(1), path)) if name == ckpt.MODEL_FILE else (
        lambda: ckpt.load_train_state(path))
    with pytest.raises(ckpt.CheckpointError, match="checkpoint file .*" + name):
        load()


def test_non_finite_weights_are_refused_naming_the_file(tmp_path):
    model = _model(0)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    path = ckpt.save_checkpoint(tmp_path, 1, model, {}, {})
    with pytest.raises(ckpt.CheckpointError, match=r"step_00000001/model.safetensors: 1 of 7 tensors .*NaN.*0\.weight"):
        ckpt.load_model_weights(_model(1), path)


def test_checkpoint_without_checksum_still_loads(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 1, _model(0), {}, {"name": "x"})
    tensors = safetensors.torch.load_file(str(path / ckpt.MODEL_FILE))
    safetensors.torch.save_file(tensors, str(path / ckpt.MODEL_FILE), metadata={"mtssm_config": "{}", "step": "1"})
    loaded = _model(1)
    ckpt.load_model_weights(loaded, path)
    assert _same(loaded, _model(0))
    ckpt.verify_checkpoint(path)


def test_newest_intact_checkpoint_skips_damaged_ones_and_says_why(tmp_path):
    paths = [ckpt.save_checkpoint(tmp_path, s, _model(s), {}, {}, keep=4) for s in (1, 2, 3, 4)]
    assert ckpt.newest_intact_checkpoint(tmp_path) == (paths[3], [])
    truncated = paths[3] / ckpt.MODEL_FILE
    truncated.write_bytes(truncated.read_bytes()[:100])
    _flip_last_byte(paths[2] / ckpt.STATE_FILE)
    found, skipped = ckpt.newest_intact_checkpoint(tmp_path)
    assert found == paths[1]
    assert len(skipped) == 2 and str(truncated) in skipped[0] and str(paths[2] / ckpt.STATE_FILE) in skipped[1]
    (tmp_path / "latest").write_bytes(b"\xff\xfe garbage")  # a damaged pointer: every folder is a candidate
    assert ckpt.latest_checkpoint(tmp_path) is None
    with pytest.raises(ckpt.CheckpointError, match=f"{tmp_path / 'latest'}: names no complete checkpoint"):
        ckpt.resolve_checkpoint(tmp_path)
    found, skipped = ckpt.newest_intact_checkpoint(tmp_path, repair=True)
    assert found == paths[1] and "names no checkpoint" in skipped[0]
    assert ckpt.latest_checkpoint(tmp_path) == paths[1]  # repaired: eval on the run folder takes it
    for p in paths:
        (p / ckpt.MODEL_FILE).unlink()
    assert ckpt.newest_intact_checkpoint(tmp_path)[0] is None


def test_resumed_run_keeps_newer_folders_until_it_rewrites_them(tmp_path):
    for step in (2, 4, 6):
        ckpt.save_checkpoint(tmp_path, step, _model(step), {}, {}, keep=2)
    (tmp_path / "latest").write_text("step_00000004\n")  # as after resuming from step 4
    ckpt.save_checkpoint(tmp_path, 5, _model(5), {}, {}, keep=2)
    kept = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_"))
    assert kept == ["step_00000004", "step_00000005", "step_00000006"]
    ckpt.save_checkpoint(tmp_path, 6, _model(0), {}, {}, keep=2)
    kept = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_"))
    assert kept == ["step_00000005", "step_00000006"]
    loaded = _model(1)
    ckpt.load_model_weights(loaded, tmp_path)
    assert _same(loaded, _model(0))

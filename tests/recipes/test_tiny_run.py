"""One tiny recipe end to end through the real CLI: train on rendered scenes, evaluate, predict."""

from __future__ import annotations

import json

from click.testing import CliRunner
from PIL import Image

from mtssm.engine.checkpoint import latest_checkpoint


def test_tiny_recipe_runs_through_the_cli(tmp_path):
    from mtssm.cli import main

    env = {"MTSSM_CACHE_DIR": str(tmp_path / "cache")}
    out = tmp_path / "run"
    sets = ["train.steps=3", "train.log_every=1", "train.ckpt_every=2", "data.render_n=6",
            "data.render_size=[64, 64]", "data.crop_size=[64, 64]", "data.batch_size=2", "data.eval_batch_size=2",
            "eval.edge_thresholds=3", "eval.predict_samples=1", "train.progress=false"]
    args = ["recipe", "run", "nyud_msm_tiny", "--data", "rendered", "--out", str(out)]
    args += [x for s in sets for x in ("--set", s)]
    res = CliRunner().invoke(main, args, env=env)
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "rendering 6 nyud scenes" in res.output and "trivial baseline" in res.output
    assert latest_checkpoint(out / "checkpoints").name == "step_00000003"
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    result = json.loads((out / "eval.json").read_text())
    assert set(result["metrics"]) == {"semseg", "depth", "normals", "edge"}
    assert set(result["trivial_baselines"]) == {"semseg", "depth", "normals"}
    sheet = Image.open(out / "predictions" / "0000_sheet.png")
    assert sheet.size == (64 * 9, 64 + 14)  # input + (gt, prediction) of 4 tasks, caption strip
    assert result["delta_m"] is None and "rendered" in result["delta_m_note"]
    assert result["protocol"].startswith("nyud protocol")

    # the cache is reused; eval and predict read the checkpoint
    res = CliRunner().invoke(main, ["eval", str(out), "--data", "rendered", "--max-batches", "1"],
                             env=env)
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "rendering" not in res.output and "mIoU" in res.output and "Δm" in res.output
    assert "nyud protocol" in res.output and "left out: the data are rendered scenes" in res.output
    image = next((tmp_path / "cache").rglob("images/*.png"))
    res = CliRunner().invoke(main, ["predict", str(out), str(image), "--out", str(tmp_path / "pred")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    names = sorted(p.name for p in (tmp_path / "pred").iterdir())
    assert names == sorted(f"{image.stem}_{t}.png" for t in ("semseg", "depth", "normals", "edge", "sheet"))

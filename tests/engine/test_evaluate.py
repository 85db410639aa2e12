"""Evaluation: the trivial constant baselines and the metric table."""

from __future__ import annotations

import torch

from tests.engine import engine_standin as standin
from mtssm.data import make_dataloader
from mtssm.engine.evaluate import EvalResult, evaluate, format_table, trivial_baselines
from mtssm.metrics import build_evaluator


def test_trivial_baselines_are_the_best_constants():
    data = standin.StandInDataset(8)
    loader = make_dataloader(data, 3, train=False, num_workers=0)
    base = trivial_baselines(loader, ["semseg", "depth"], lambda: build_evaluator(["semseg", "depth"], "nyud"))
    depth = torch.stack([data[i]["depth"] for i in range(8)]).double()
    assert abs(base["depth"]["rmse"] - torch.std(depth, correction=0).item()) < 1e-5  # RMSE of the mean
    labels = torch.stack([data[i]["semseg"] for i in range(8)])
    counts = torch.bincount(labels.flatten())
    present = int((counts > 0).sum())
    expected = 100 * counts.max().item() / labels.numel() / present  # IoU of the majority class only
    assert abs(base["semseg"]["mIoU"] - expected) < 1e-4


def test_evaluate_reports_metrics_and_baselines_and_table():
    cfg = standin.make_config()
    comps = standin.make_components(cfg)
    result = evaluate(comps.model, comps.eval_set, tasks=comps.tasks, dataset_name="nyud", batch_size=4)
    assert set(result.metrics) == {"semseg", "depth"} and result.images == 8
    assert set(result.baselines) == {"semseg", "depth"}
    assert result.delta_m is not None  # the NYUD single-task baseline is built in
    table = format_table(result)
    assert "mean depth" in table and "majority class" in table and "Δm" in table
    flat = result.flat()
    assert {"semseg/mIoU", "depth/rmse", "depth/rmse/trivial", "delta_m"} <= set(flat)


def test_table_says_whether_the_model_beats_the_baseline():
    r = EvalResult(metrics={"depth": {"rmse": 0.5}, "semseg": {"mIoU": 1.0}},
                   baselines={"depth": {"rmse": 1.0}, "semseg": {"mIoU": 2.0}})
    lines = format_table(r).splitlines()
    assert "beats it" in next(ln for ln in lines if ln.startswith("depth"))
    assert "DOES NOT beat it" in next(ln for ln in lines if ln.startswith("semseg"))


def test_each_image_is_scored_on_its_own_pixels():
    """A centred-padded image (meta offset) is scored on its window only: its boundaries are
    matched within max_dist of its own diagonal, not of the padded one."""
    from tensordict import NonTensorData, NonTensorStack, TensorDict

    from mtssm.engine.evaluate import _update_at_original_size

    h, w, pad = 20, 20, 100
    top, left = (pad - h) // 2, (pad - w) // 2
    gt = torch.full((1, 1, pad, pad), 255.0)
    gt[..., top : top + h, left : left + w] = 0
    gt[..., top : top + h, left + 8] = 1  # a vertical boundary inside the window
    logits = torch.full((1, 1, pad, pad), -10.0)
    logits[..., top : top + h, left + 10] = 10.0  # two pixels off: within 0.04 x 141 px, not 0.04 x 28
    batch = TensorDict({"image": torch.zeros(1, 3, pad, pad), "edge": gt}, batch_size=[1])
    batch["meta"] = NonTensorStack(NonTensorData({"id": "a", "size": (h, w), "offset": (top, left)}))
    own = build_evaluator(["edge"], "nyud", edge_max_dist=0.04, edge_thresholds=3)
    _update_at_original_size(own, {"edge": logits}, batch, ["edge"])
    padded = build_evaluator(["edge"], "nyud", edge_max_dist=0.04, edge_thresholds=3)
    padded.update({"edge": logits}, {"edge": gt})
    assert own.compute()["edge"]["odsF"] == 0.0 and padded.compute()["edge"]["odsF"] > 99.0

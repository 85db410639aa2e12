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

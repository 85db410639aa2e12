"""Streaming accumulators fed with raw model outputs and mtssm label batches."""

import pytest
import torch
import torch.nn.functional as F

from mtssm.metrics import (
    DepthAccumulator,
    EdgeAccumulator,
    SaliencyAccumulator,
    boundary_odsf,
    build_evaluator,
    depth_rmse,
    miou,
    normals_mean_angle,
    saliency_maxf,
)

B, H, W = 2, 16, 16


def make_labels(seed: int, num_classes: int = 40) -> dict:
    g = torch.Generator().manual_seed(seed)
    semseg = torch.randint(0, num_classes, (B, H, W), generator=g)
    semseg[:, 0] = 255
    depth = torch.rand(B, 1, H, W, generator=g) + 0.5
    depth[:, :, :2] = 0
    normals = F.normalize(torch.randn(B, 3, H, W, generator=g), dim=1)
    normals[:, :, -1] = 0
    edge = torch.zeros(B, 1, H, W)
    edge[:, :, :, 5] = 1
    edge[:, :, 0] = 255
    sal = (torch.rand(B, H, W, generator=g) > 0.5).long()
    sal[:, 1] = 255
    human_parts = torch.randint(0, 7, (B, H, W), generator=g)
    return {"semseg": semseg, "human_parts": human_parts, "depth": depth, "normals": normals, "edge": edge, "sal": sal}


def perfect_outputs(labels: dict, num_classes: int = 40) -> dict:
    seg = labels["semseg"].clamp(max=num_classes - 1)
    edge = labels["edge"].clamp(max=1)
    return {
        "semseg": 5.0 * F.one_hot(seg, num_classes).permute(0, 3, 1, 2).float(),
        "human_parts": F.one_hot(labels["human_parts"], 7).permute(0, 3, 1, 2).float(),
        "depth": labels["depth"].clone(),
        "normals": 3.0 * labels["normals"],
        "edge": 20.0 * edge - 10.0,
        "sal": 10.0 * F.one_hot(labels["sal"].clamp(max=1), 2).permute(0, 3, 1, 2).float(),
    }


def test_perfect_outputs_nyud():
    # The exact matcher: pyEdgeEval's correspondPixels is randomised and may miss a pixel.
    evaluator = build_evaluator(["semseg", "depth", "normals", "edge"], "nyud", edge_thresholds=9,
                                edge_matcher="scipy")
    labels = make_labels(0)
    evaluator.update(perfect_outputs(labels), labels)
    result = evaluator.compute()
    assert result["semseg"]["mIoU"] == pytest.approx(100.0)
    assert result["depth"]["rmse"] == pytest.approx(0.0, abs=1e-6)
    assert result["normals"]["mErr"] == pytest.approx(0.0, abs=1e-3)
    assert result["edge"]["odsF"] == pytest.approx(100.0)
    assert evaluator["edge"].max_dist == 0.011
    assert evaluator.delta_m() == pytest.approx(evaluator.delta_m(result))
    assert evaluator.delta_m() > 0


def test_streaming_equals_functions_on_the_whole_dataset():
    tasks = ["semseg", "human_parts", "depth", "normals", "sal", "edge"]
    # The exact (scipy) matcher on both sides: pyEdgeEval's matcher is approximate.
    evaluator = build_evaluator(tasks, "pascal", num_classes={"semseg": 40}, edge_thresholds=9,
                                edge_matcher="scipy")
    assert evaluator.delta_m() is None  # no PASCAL-Context single-task baseline built in
    batches = []
    for seed in (1, 2):
        labels = make_labels(seed)
        g = torch.Generator().manual_seed(10 + seed)
        outputs = {k: v + torch.randn(v.shape, generator=g) for k, v in perfect_outputs(labels).items()}
        evaluator.update(outputs, labels)
        batches.append((outputs, labels))
    result = evaluator.compute()
    cat = lambda task, which: torch.cat([b[which][task] for b in batches])  # noqa: E731
    assert result["semseg"]["mIoU"] == pytest.approx(miou(cat("semseg", 0).argmax(1), cat("semseg", 1), 40))
    assert result["human_parts"]["mIoU"] == pytest.approx(miou(cat("human_parts", 0).argmax(1), cat("human_parts", 1), 7))
    assert result["depth"]["rmse"] == pytest.approx(depth_rmse(cat("depth", 0), cat("depth", 1)))
    assert result["normals"]["mErr"] == pytest.approx(normals_mean_angle(cat("normals", 0), cat("normals", 1)))
    sal_probs = cat("sal", 0).softmax(1)[:, 1]
    assert result["sal"]["maxF"] == pytest.approx(saliency_maxf(sal_probs.sigmoid(), cat("sal", 1)))
    edge_probs = cat("edge", 0).sigmoid()
    assert result["edge"]["odsF"] == pytest.approx(boundary_odsf(edge_probs, cat("edge", 1), 0.0075, 9,
                                                                matcher="scipy"))
    evaluator.reset()
    assert evaluator["depth"].state.sum() == 0


def test_outputs_resized_to_label_size_and_single_channel_saliency():
    labels = make_labels(3)
    depth = DepthAccumulator()
    depth.update(torch.full((B, 1, H // 2, W // 2), 1.0), labels["depth"])
    assert depth.compute()["rmse"] == pytest.approx(depth_rmse(torch.ones_like(labels["depth"]), labels["depth"]))
    sal = SaliencyAccumulator()
    logits = torch.randn(B, 1, H, W)
    sal.update(logits, labels["sal"])
    assert sal.compute()["maxF"] == pytest.approx(saliency_maxf(logits[:, 0].sigmoid().sigmoid(), labels["sal"]))
    plain = SaliencyAccumulator(squash=False)
    plain.update(logits, labels["sal"])
    assert plain.compute()["maxF"] == pytest.approx(saliency_maxf(logits[:, 0].sigmoid(), labels["sal"]))


def test_bad_input_messages():
    with pytest.raises(ValueError, match="unknown task 'segm'"):
        build_evaluator(["segm"], "nyud")
    with pytest.raises(ValueError, match="unknown 'imagenet'"):
        build_evaluator(["depth"], "imagenet")

    class Rendered:
        name = "rendered"

    with pytest.raises(ValueError, match="no class count for task 'semseg'"):
        build_evaluator(["semseg"], Rendered())
    Rendered.num_classes = 6
    assert build_evaluator(["semseg"], Rendered())["semseg"].num_classes == 6
    evaluator = build_evaluator(["depth", "edge"], "nyud")
    labels = make_labels(0)
    with pytest.raises(KeyError, match="outputs: missing task 'edge'"):
        evaluator.update({"depth": labels["depth"]}, labels)
    with pytest.raises(ValueError, match=r"expected model output \(B, 1, H, W\)"):
        EdgeAccumulator().update(torch.zeros(B, 2, H, W), labels["edge"])


def test_all_reduce_single_process(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        acc = DepthAccumulator()
        labels = make_labels(4)
        acc.update(labels["depth"] * 1.1, labels["depth"])
        before = acc.compute()
        acc.all_reduce()
        assert acc.compute() == before
    finally:
        dist.destroy_process_group()


def test_saliency_maxf_as_the_official_meter():
    """The official SaliencyMeter (beta^2 0.3, thresholds arange(0.05, 1, 0.05)) applied to the
    probabilities get_output gives: it squashes them with a sigmoid, counts over the dataset."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 2, 9, 11, generator=g) * 3
    label = (torch.rand(2, 9, 11, generator=g) > 0.6).long()
    label[0, 0] = 255
    p = torch.nn.functional.softmax(logits.permute(0, 2, 3, 1), dim=3)[..., 1] * 255  # get_output
    preds = torch.sigmoid(p.float() / 255.0)
    valid = label != 255
    best = 0.0
    for t in torch.arange(0.05, 1, 0.05):
        f_pred = torch.masked_select((preds >= t).long(), valid)
        f_tgt = torch.masked_select(label, valid)
        tp = float((f_pred * f_tgt).sum())
        prec, rec = tp / max(float(f_pred.sum()), 1e-8), tp / max(float(f_tgt.sum()), 1e-8)
        best = max(best, (1 + 0.3) * prec * rec / max(0.3 * prec + rec, 1e-8))
    acc = SaliencyAccumulator()
    acc.update(logits, label)
    assert acc.compute()["maxF"] == pytest.approx(100 * best, abs=1e-3)

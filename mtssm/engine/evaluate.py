"""Evaluation: the papers' metrics over a dataset split, trivial baselines beside them, and Δm.

The trivial baselines are constant predictions fitted on the evaluated labels themselves (so they
are the strongest constant predictors on that data): the majority class for segmentation
(``semseg``, ``human_parts``), the mean valid depth for ``depth``, and the normalised mean valid
normal for ``normals``. A model that learned anything beats them.

The metrics follow the dataset's :class:`mtssm.data.Protocol` (printed at the top of the table).
Δm compares with the papers' single-task numbers, so it is given only where those were measured:
on the real dataset (not on rendered scenes) and where a baseline is built in (NYUDv2); otherwise
the table says why it is left out.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtssm.data import make_dataloader
from mtssm.data.protocol import protocol
from mtssm.engine.build import recipe_tasks
from mtssm.engine.config import RecipeConfig
from mtssm.metrics import HIGHER_IS_BETTER, METRIC_NAMES, build_evaluator

__all__ = ["EvalResult", "evaluate", "evaluate_recipe", "format_table", "trivial_baselines", "write_result"]

_BASELINE_NAMES = {
    "semseg": "majority class",
    "human_parts": "majority class",
    "depth": "mean depth",
    "normals": "mean normal",
}


@dataclass
class EvalResult:
    """``metrics``/``baselines``: task -> {metric name: value}; ``delta_m`` in percent, or None with
    ``delta_m_note`` saying why it is left out; ``main``: task -> its headline metric name;
    ``protocol``: the line of :meth:`mtssm.data.Protocol.describe` the metrics followed."""

    metrics: dict[str, dict[str, float]]
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)
    delta_m: float | None = None
    main: dict[str, str] = field(default_factory=dict)
    images: int = 0
    protocol: str = ""
    delta_m_note: str = ""

    def flat(self) -> dict[str, float]:
        """``{"semseg/mIoU": ..., "delta_m": ...}`` for logs."""
        out = {f"{t}/{k}": v for t, m in self.metrics.items() for k, v in m.items()}
        out.update({f"{t}/{k}/trivial": v for t, m in self.baselines.items() for k, v in m.items()})
        if self.delta_m is not None:
            out["delta_m"] = self.delta_m
        return out

    def to_json(self) -> str:
        return json.dumps(
            {"metrics": self.metrics, "trivial_baselines": self.baselines, "delta_m": self.delta_m,
             "delta_m_note": self.delta_m_note, "protocol": self.protocol, "images": self.images},
            indent=2,
        )


def _batches(loader: Any, max_batches: int) -> Any:
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            return
        yield batch


def _squeeze(label: Tensor) -> Tensor:
    return label[:, 0] if label.ndim == 4 else label


def trivial_baselines(
    loader: Any, tasks: Sequence[str], evaluator_factory: Callable[[], Any], max_batches: int = 0
) -> dict[str, dict[str, float]]:
    """Metrics of the constant predictors (see the module docstring) on ``loader``'s labels."""
    tasks = [t for t in tasks if t in _BASELINE_NAMES]
    if not tasks:
        return {}
    hist: dict[str, Tensor] = {}
    depth_sum, depth_n = 0.0, 0
    normal_sum = torch.zeros(3, dtype=torch.float64)
    for batch in _batches(loader, max_batches):  # pass 1: fit the constants
        for t in tasks:
            label = batch[t]
            if t in ("semseg", "human_parts"):
                lab = _squeeze(label).long()
                lab = lab[lab != 255]
                counts = torch.bincount(lab.flatten(), minlength=1)
                prev = hist.get(t, torch.zeros(0, dtype=torch.int64))
                size = max(len(prev), len(counts))
                hist[t] = F.pad(prev, (0, size - len(prev))) + F.pad(counts, (0, size - len(counts)))
            elif t == "depth":
                d = _squeeze(label).double()
                depth_sum += float(d[d > 0].sum())
                depth_n += int((d > 0).sum())
            elif t == "normals":
                n = label.double()
                valid = n.norm(dim=1) > 0
                normal_sum += n.permute(0, 2, 3, 1)[valid].sum(0)
    evaluator = evaluator_factory()
    for batch in _batches(loader, max_batches):  # pass 2: score them with the real metrics
        outputs, labels = {}, {}
        for t in tasks:
            label = batch[t]
            b, (h, w) = label.shape[0], label.shape[-2:]
            if t in ("semseg", "human_parts"):
                classes = evaluator[t].num_classes
                majority = int(hist[t].argmax()) if t in hist and hist[t].sum() > 0 else 0
                out = torch.zeros(b, classes, h, w)
                out[:, majority] = 1.0
            elif t == "depth":
                out = torch.full((b, 1, h, w), depth_sum / max(depth_n, 1))
            else:
                mean = F.normalize(normal_sum, dim=0).float()
                out = mean.view(1, 3, 1, 1).expand(b, 3, h, w).contiguous()
            outputs[t], labels[t] = out, label
        for t in tasks:
            evaluator[t].update(outputs[t], labels[t])
    return {t: evaluator[t].compute() for t in tasks}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Any,
    *,
    tasks: Sequence[str],
    dataset_name: str,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    max_batches: int = 0,
    baselines: bool = True,
    edge_thresholds: int = 99,
    make_loader: Callable[..., Any] | None = None,
) -> EvalResult:
    """Evaluate ``model`` (images (B, 3, H, W) -> {task: (B, C_t, H, W)}) on ``dataset``.

    ``max_batches`` 0 means every batch; ``baselines`` adds the trivial constant predictors.
    """
    device = torch.device(device)

    def new_evaluator() -> Any:
        return build_evaluator(list(tasks), dataset_name, edge_thresholds=edge_thresholds)

    loader = (make_loader or make_dataloader)(dataset, batch_size, train=False, num_workers=0, seed=0)
    evaluator = new_evaluator()
    was_training = model.training
    model.eval()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    images = 0
    for batch in _batches(loader, max_batches):
        with autocast:
            out = model(batch["image"].to(device))
        _update_at_original_size(evaluator, {t: out[t].float().cpu() for t in tasks}, batch, tasks)
        images += batch["image"].shape[0]
    model.train(was_training)
    metrics = evaluator.compute()
    dm, note = _delta_m(evaluator, metrics, dataset, dataset_name)
    base = trivial_baselines(loader, tasks, new_evaluator, max_batches) if baselines else {}
    main = {t: METRIC_NAMES[t] for t in tasks}
    return EvalResult(metrics=metrics, baselines=base, delta_m=dm, main=main, images=images,
                      protocol=protocol(dataset_name).describe(tasks), delta_m_note=note)  # fmt: skip


def _update_at_original_size(evaluator: Any, outputs: dict[str, Tensor], batch: Any, tasks: Sequence[str]) -> None:
    """Score each image on its original pixels only: outputs are resized (bilinearly) to the
    label maps' size, then outputs and labels are cropped to the image's own window: ``meta["size"]``
    (its stored size) from ``meta["offset"]`` (where its pixels start after centred padding,
    default (0, 0)) when the labels share the image's frame, from (0, 0) when they keep their
    stored size. Padding never counts, and edge matching uses the image's own diagonal."""
    metas = list(batch["meta"]) if "meta" in batch.keys() else None
    label_hw = {t: tuple(batch[t].shape[-2:]) for t in tasks}
    if metas is None or all(
        tuple(m.get("offset", (0, 0))) == (0, 0) and all(tuple(m["size"]) == label_hw[t] for t in tasks)
        for m in metas
    ):
        evaluator.update(outputs, {t: batch[t] for t in tasks})
        return
    for i, meta in enumerate(metas):
        top, left = meta.get("offset", (0, 0))
        h, w = meta["size"]
        preds, labels = {}, {}
        for t in tasks:
            label = batch[t][i : i + 1]
            pred = outputs[t][i : i + 1]
            if tuple(pred.shape[-2:]) != label_hw[t]:
                pred = F.interpolate(pred, size=label_hw[t], mode="bilinear", align_corners=False)
            if label_hw[t] == tuple(batch["image"].shape[-2:]):  # labels in the image's frame
                window = (slice(top, top + h), slice(left, left + w))
            else:  # labels at their stored size (an image resized alone, see ResizeImage)
                window = (slice(0, h), slice(0, w))
            preds[t], labels[t] = pred[..., window[0], window[1]], label[..., window[0], window[1]]
        evaluator.update(preds, labels)


def _delta_m(evaluator: Any, metrics: dict[str, dict[str, float]], dataset: Any, name: str) -> tuple[float | None, str]:
    """Δm and, when it is left out, why."""
    if getattr(dataset, "rendered", False):
        return None, (f"left out: the data are rendered scenes, and the single-task baselines are the "
                      f"papers' numbers on the real {name} dataset")  # fmt: skip
    try:
        dm = evaluator.delta_m(metrics)
    except ValueError as exc:
        return None, f"left out: {exc}"
    if dm is None:
        return None, f"left out: no single-task baseline of these tasks is built in for {name}"
    return dm, ""


def evaluate_recipe(
    cfg: RecipeConfig,
    model: nn.Module,
    dataset: Any,
    *,
    device: str | torch.device | None = None,
    max_batches: int | None = None,
    baselines: bool | None = None,
    make_loader: Callable[..., Any] | None = None,
) -> EvalResult:
    """:func:`evaluate` with the settings of recipe ``cfg`` (tasks, dataset, eval batch size,
    precision, ``eval.*``); ``max_batches`` and ``baselines`` override the recipe's when given.
    ``device`` defaults to the model's."""
    tasks = list(getattr(model, "tasks", None) or recipe_tasks(cfg))
    return evaluate(
        model, dataset, tasks=tasks, dataset_name=cfg.data.dataset, batch_size=cfg.data.eval_batch_size,
        device=next(model.parameters()).device if device is None else device, precision=cfg.train.precision,
        max_batches=cfg.eval.max_batches if max_batches is None else max_batches,
        baselines=cfg.eval.baselines if baselines is None else baselines,
        edge_thresholds=cfg.eval.edge_thresholds, make_loader=make_loader,
    )


def format_table(result: EvalResult) -> str:
    """A plain-text table: task, metric, value, trivial baseline, and whether the model beats it."""
    rows = [("task", "metric", "value", "trivial baseline", "")]
    for task, metrics in result.metrics.items():
        for name, value in metrics.items():
            base = result.baselines.get(task, {}).get(name)
            if base is None:
                rows.append((task, name, f"{value:.4f}", "-", ""))
                continue
            better = value > base if HIGHER_IS_BETTER.get(task, True) else value < base
            rows.append((task, name, f"{value:.4f}", f"{base:.4f} ({_BASELINE_NAMES[task]})",
                         "beats it" if better else "DOES NOT beat it"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    if result.delta_m is None:
        lines.append(f"Δm vs single-task baseline: {result.delta_m_note or 'left out'}   ({result.images} images)")
    else:
        lines.append(f"Δm vs single-task baseline: {result.delta_m:+.2f} %   ({result.images} images)")
    if result.protocol:
        lines.insert(0, result.protocol)
    return "\n".join(lines)


def write_result(result: EvalResult, out_dir: str | Path, stem: str = "eval") -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.txt`` (the table) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    j, t = out / f"{stem}.json", out / f"{stem}.txt"
    j.write_text(result.to_json() + "\n")
    t.write_text(format_table(result) + "\n")
    return j, t

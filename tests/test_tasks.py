"""The task table is the one copy of the task facts that every part of the package reads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtssm import tasks
from mtssm.data import constants
from mtssm.data.check import DATASETS as CHECK_DATASETS
from mtssm.engine import config
from mtssm.losses import SegmentationCELoss, build_task_losses
from mtssm.metrics import delta, evaluator
from mtssm.nn import create_model
from mtssm.nn import tasks as nn_tasks

ROOT = Path(__file__).resolve().parents[1]


def test_the_table_imports_nothing_but_the_standard_library():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('t', {str(ROOT / 'mtssm' / 'tasks.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['t'] = m; spec.loader.exec_module(m)\n"
        "heavy = [n for n in ('torch', 'numpy', 'mtssm') if n in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_reader_holds_the_table_itself():
    assert constants.TASKS_BY_DATASET is tasks.DATASET_TASKS and constants.NUM_CLASSES is tasks.NUM_CLASSES
    assert constants.IGNORE_INDEX == tasks.IGNORE_INDEX
    assert nn_tasks.task_channels is tasks.task_channels and nn_tasks.DATASET_TASKS is tasks.DATASET_TASKS
    assert delta.METRIC_NAMES is tasks.METRIC_NAMES and delta.HIGHER_IS_BETTER is tasks.HIGHER_IS_BETTER
    assert set(CHECK_DATASETS) == set(tasks.DATASETS) == set(evaluator.DATASETS)
    for name in tasks.DATASETS:
        assert evaluator.DATASETS[name]["num_classes"] == tasks.NUM_CLASSES[name]
    assert config._CHOICES["data.dataset"] == tuple(tasks.DATASETS)
    assert constants.PAD_VALUES == {"image": 0.0, "semseg": 255, "depth": 0.0, "normals": 0.0, "edge": 255,
                                     "human_parts": 255, "sal": 255}


def test_views_agree_with_the_entries():
    assert tasks.NUM_CLASSES == {"nyud": {"semseg": 40}, "pascal": {"semseg": 21, "human_parts": 7},
                                 "cityscapes": {"semseg": 19}}
    assert constants.NYUD_CLASSES[0] == "wall" and len(constants.CITYSCAPES_CLASSES) == 19
    assert tasks.resolve_tasks(None, "pascal") == {"semseg": 21, "human_parts": 7, "sal": 2, "normals": 3, "edge": 1}
    assert {t for t, s in tasks.TASKS.items() if not s.higher_is_better} == {"depth", "normals"}
    with pytest.raises(ValueError, match="'depth' is not a segmentation task"):
        tasks.num_classes("depth", "nyud")


@pytest.mark.parametrize("dataset", sorted(tasks.DATASETS))
def test_model_losses_and_metrics_read_the_same_widths(dataset):
    model = create_model("mtmamba_tiny", dataset=dataset, device="meta")
    out = model(torch.empty(1, 3, 64, 64, device="meta"))
    assert {t: v.shape[1] for t, v in out.items()} == tasks.resolve_tasks(None, dataset)
    ev = evaluator.build_evaluator(tasks.dataset_tasks(dataset), dataset)
    losses = build_task_losses(tasks.dataset_tasks(dataset)).losses
    for task, spec in ((t, tasks.TASKS[t]) for t in tasks.dataset_tasks(dataset)):
        if spec.kind == "segmentation":
            assert ev[task].num_classes == tasks.task_channels(task, dataset)
            assert isinstance(losses[task], SegmentationCELoss)

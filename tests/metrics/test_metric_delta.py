"""Δm against the built-in NYUDv2 single-task baseline (MTMamba, ECCV 2024)."""

import math

import pytest

from mtssm.metrics import HIGHER_IS_BETTER, NYUD_SINGLE_TASK_BASELINE, delta_m

TASKS = ("semseg", "depth", "normals", "edge")
# (mIoU, RMSE, mErr, odsF) -> published Δm [%], MTMamba Tables 2-5.
PUBLISHED = [
    ((55.82, 0.5066, 18.63, 78.70), 2.38),  # MTMamba
    ((53.72, 0.5239, 19.97, 76.50), -1.87),  # multi-task Swin baseline
    ((54.61, 0.5059, 19.00, 77.40), 0.95),
    ((54.66, 0.4984, 18.81, 78.20), 1.84),
    ((54.75, 0.5054, 18.81, 78.20), 1.55),
    ((54.57, 0.5109, 19.95, 76.60), -0.79),
    ((55.01, 0.4990, 18.73, 78.20), 2.08),
    ((55.37, 0.5087, 18.76, 78.30), 1.77),
    ((54.50, 0.4981, 18.83, 78.20), 1.76),
]


def test_reproduces_mtmamba_plus_2_38():
    scores = dict(zip(TASKS, PUBLISHED[0][0]))
    assert delta_m(scores) == pytest.approx(2.38, abs=0.005)
    assert delta_m(scores, "nyud", HIGHER_IS_BETTER) == delta_m(scores, NYUD_SINGLE_TASK_BASELINE)


@pytest.mark.parametrize("values, published", PUBLISHED)
def test_reproduces_published_table_rows(values, published):
    # the paper's two decimals are the exact value truncated toward zero
    assert math.trunc(delta_m(dict(zip(TASKS, values))) * 100) / 100 == pytest.approx(published)


def test_baseline_is_zero_and_signs():
    assert delta_m(dict(NYUD_SINGLE_TASK_BASELINE)) == 0.0
    # +10 % mIoU alone over one task; lower RMSE is better
    assert delta_m({"semseg": 54.32 * 1.1}) == pytest.approx(10.0)
    assert delta_m({"depth": 0.5166 * 1.1}) == pytest.approx(-10.0)
    evaluator_style = {"semseg": {"mIoU": 54.32 * 1.1}, "depth": {"rmse": 0.5166 * 0.9}}
    assert delta_m(evaluator_style) == pytest.approx(10.0)


def test_bad_input():
    with pytest.raises(ValueError, match="no value for task 'sal'"):
        delta_m({"sal": 80.0})
    with pytest.raises(ValueError, match="unknown 'pascal'"):
        delta_m({"semseg": 1.0}, "pascal")
    with pytest.raises(ValueError, match="mIoU"):
        delta_m({"semseg": {"rmse": 1.0}})

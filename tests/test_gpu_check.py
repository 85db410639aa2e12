"""The prepared GPU check (scripts/gpu_check) rehearsed on the CPU, so it cannot rot without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check"), "--dry-run", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    report = json.loads((out / "gpu_check.json").read_text())
    return proc, report


def test_dry_run_passes_every_section(dry_run):
    proc, report = dry_run
    failed = {name: sec.get("error", sec) for name, sec in report["sections"].items() if not sec["ok"]}
    assert not failed, failed
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert list(report["sections"]) == ["tests", "scan", "train", "recipe"]


def test_dry_run_reports_every_figure(dry_run):
    _, report = dry_run
    sections = report["sections"]
    assert sections["tests"]["pytest"]["returncode"] == 0
    assert " tests collected" in sections["tests"]["pytest"]["summary"]  # the GPU run's selection
    compile_check = sections["tests"]["compile"]
    assert compile_check["max_rel_err_outputs"] <= 1e-3 and compile_check["max_rel_err_grads"] <= 1e-3

    (row,) = sections["scan"]["scan"]
    for base in ("mamba_ref", "torch"):
        for mode in ("fwd", "fwd_bwd"):
            assert row[f"x_vs_{base}_{mode}"] > 0
    assert row["max_abs_err_vs_mamba_ref"] < 1e-4  # the op agrees with mamba-ssm's reference
    (fused,) = sections["scan"]["fused_2d"]
    assert fused["speedup"] > 0 and not sections["scan"]["skipped"]

    steps = sections["train"]["steps"]
    assert {r["mode"] for r in steps if "mode" in r} == {"eager", "compiled"}
    assert any("compiled_speedup" in r for r in steps)
    assert sections["recipe"]["checkpoints"], sections["recipe"]["tail"]


def test_refuses_to_run_without_a_gpu_unless_dry():
    if __import__("torch").cuda.is_available():
        pytest.skip("a CUDA device is present")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "gpu_check: no CUDA device here; use --dry-run for the CPU rehearsal"
    ]

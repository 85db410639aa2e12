"""The prepared GPU check: one run proves the Triton scan kernels and times the GPU path.

Run through ``bash scripts/gpu_check`` (which installs the wheels carried in ``.whl/`` first), or
directly with ``python scripts/gpu_check.py [--dry-run] [--out DIR]``. Sections, in order, each
recorded in ``DIR/gpu_check.json`` even when an earlier one failed:

1. ``tests``: the CUDA tests of the Triton kernels (``tests/ops/test_triton_scan.py``: forward,
   backward, every input's gradient and the last state against the reference, fp32 and bf16, the
   fused 2-D scan with every order), then ``torch.compile(fullgraph=True)`` of a tiny model on the
   device with no graph break, its outputs and gradients checked against eager.
2. ``scan``: forward and forward+backward of the scan at the paper shapes (batch 4, N 16,
   d = 384 / 768 / 1536, L = 28x36 / 56x72 / 112x144 tokens), the op (Triton on CUDA) against
   mamba-ssm's ``selective_scan_ref`` and against the pure-PyTorch chunked path, and the fused
   4-direction scan against four single-direction scans with flipped/transposed copies.
3. ``train``: one training step of each paper recipe's model (``nyud_mtmamba``, ``nyud_msm``: Swin-L,
   batch 4, 448x576, bf16 autocast), eager and compiled, with peak memory.
4. ``recipe``: one step of the tiny recipe end to end through ``mtssm recipe run``.

``--dry-run`` runs every section on the CPU at tiny shapes (Triton in its interpreter), so the
script is exercised by the test suite while no GPU is at hand. The whole GPU run is planned for
under 8 minutes; each section stops starting new measurements once its time budget is spent and
records what it skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout that is not pip-installed (the GPU machine)
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


@dataclass(frozen=True)
class Plan:
    """Sizes and budgets of one run (the GPU plan, or the tiny CPU dry run)."""

    device: str
    dims: tuple[int, ...]
    grids: tuple[tuple[int, int], ...]
    batch: int
    d_state: int
    train_recipes: tuple[str, ...]
    train_models: tuple[str, ...]  # models of the recipes (read from the recipe files when empty)
    train_batch: int
    train_size: tuple[int, int]
    train_steps: int
    tiny_model: str
    tiny_size: tuple[int, int]
    compile_backend: str  # "inductor" on the GPU; the dry run checks capture only ("aot_eager")
    budget_s: dict[str, float]
    pytest_args: tuple[str, ...]


GPU_PLAN = Plan(
    device="cuda",
    dims=(384, 768, 1536),
    grids=((28, 36), (56, 72), (112, 144)),
    batch=4,
    d_state=16,
    train_recipes=("nyud_mtmamba", "nyud_msm"),
    train_models=(),
    train_batch=4,
    train_size=(448, 576),
    train_steps=5,
    tiny_model="msm_tiny",
    tiny_size=(64, 96),
    compile_backend="inductor",
    budget_s={"tests": 90.0, "scan": 150.0, "train": 200.0, "recipe": 60.0},
    pytest_args=("tests/ops/test_triton_scan.py", "-q", "-x", "-p", "no:cacheprovider"),
)

DRY_PLAN = Plan(
    device="cpu",
    dims=(8,),
    grids=((3, 4),),
    batch=1,
    d_state=4,
    train_recipes=("nyud_msm_tiny",),
    train_models=("msm_tiny",),
    train_batch=1,
    train_size=(32, 48),
    train_steps=1,
    tiny_model="msm_tiny",
    tiny_size=(32, 48),
    # Inductor's C++ code generation for a whole model takes minutes on 2 cores; capture with
    # fullgraph=True, the fakes and the registered autograd are what can rot here.
    compile_backend="aot_eager",
    budget_s={"tests": 120.0, "scan": 60.0, "train": 240.0, "recipe": 120.0},
    # The interpreter runs the Triton kernels in the normal suite already: here only the selection
    # that the GPU run uses is collected, so a renamed test file breaks the dry run.
    pytest_args=("tests/ops/test_triton_scan.py", "-q", "--collect-only", "-p", "no:cacheprovider"),
)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], device: str, warmup: int = 1, reps: int = 3) -> float:
    """Median wall time of ``fn`` in ms, synchronising the device around each call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def peak_memory_mb(device: str) -> float | None:
    if device != "cuda":
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class Budget:
    """Wall-clock budget of one section: ``spent`` once its seconds have run out."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.t0 = time.perf_counter()

    @property
    def spent(self) -> bool:
        return time.perf_counter() - self.t0 > self.seconds


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def section_tests(plan: Plan) -> dict[str, Any]:
    """The Triton kernel tests on the device, then a compiled tiny model against eager."""
    env = dict(os.environ)
    if plan.device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *plan.pytest_args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=plan.budget_s["tests"] * 3,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    result: dict[str, Any] = {
        "pytest": {"returncode": proc.returncode, "summary": lines[-1] if lines else "",
                   "seconds": round(time.perf_counter() - t0, 1)},
    }
    if proc.returncode != 0:
        result["pytest"]["tail"] = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    result["compile"] = compile_check(plan)
    result["ok"] = proc.returncode == 0 and result["compile"]["ok"]
    return result


def _tiny_batch(model: Any, plan: Plan, size: tuple[int, int], batch: int) -> tuple[Any, Any]:
    """A random image batch and labels of the model's tasks, on the plan's device."""
    g = torch.Generator().manual_seed(0)
    H, W = size
    images = torch.randn(batch, 3, H, W, generator=g)
    labels: dict[str, torch.Tensor] = {}
    for task in model.tasks:
        if task in ("semseg", "human_parts", "sal"):  # classes 0 and 1 exist in every task
            labels[task] = torch.randint(0, 2, (batch, H, W), generator=g)
        elif task == "edge":
            labels[task] = (torch.rand(batch, 1, H, W, generator=g) > 0.9).float()
        elif task == "depth":
            labels[task] = torch.rand(batch, 1, H, W, generator=g) * 9 + 0.5
        else:  # normals
            n = torch.randn(batch, 3, H, W, generator=g)
            labels[task] = n / n.norm(dim=1, keepdim=True)
    return images.to(plan.device), {t: v.to(plan.device) for t, v in labels.items()}


def _loss_fn(model: Any) -> Any:
    from mtssm.losses import build_task_losses

    return build_task_losses(list(model.tasks)).to(next(model.parameters()).device)


def compile_check(plan: Plan) -> dict[str, Any]:
    """``torch.compile(fullgraph=True)`` of the tiny model on the device: no graph break, outputs
    and every parameter gradient equal to eager (relative L2 error <= 1e-3). In eval mode, so that
    drop-path draws nothing and both runs compute the same function; gradients flow all the same."""
    from mtssm.nn import create_model

    torch.manual_seed(0)
    model = create_model(plan.tiny_model).to(plan.device).eval()
    images, labels = _tiny_batch(model, plan, plan.tiny_size, 1)
    loss_fn = _loss_fn(model)

    def step(m: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        out = m(images)
        loss, _ = loss_fn(out, labels)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        return {t: out[t].detach() for t in model.tasks}, grads

    torch._dynamo.reset()
    t0 = time.perf_counter()
    compiled = torch.compile(model, fullgraph=True, backend=plan.compile_backend)
    try:
        out_c, grads_c = step(compiled)
    except Exception as exc:  # a graph break under fullgraph=True raises
        return {"ok": False, "error": " ".join(str(exc).split())[:500]}
    seconds = time.perf_counter() - t0
    out_e, grads_e = step(model)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))

    worst_out = max(rel(out_c[t], out_e[t]) for t in out_e)
    worst_grad = max(rel(grads_c[n], grads_e[n]) for n in grads_e)
    ok = worst_out <= 1e-3 and worst_grad <= 1e-3 and set(grads_c) == set(grads_e)
    return {"ok": ok, "model": plan.tiny_model, "backend": plan.compile_backend, "compile_seconds": round(seconds, 1),
            "max_rel_err_outputs": worst_out, "max_rel_err_grads": worst_grad}


def _scan_inputs(plan: Plan, dim: int, L: int, K: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    b, n, dev = plan.batch, plan.d_state, plan.device

    def r(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dev)

    return {
        "u": r(b, dim, L), "delta": r(b, K, dim, L, scale=0.5),
        "A": -torch.rand(K, dim, n, generator=g).add(0.5).to(dev),
        "B": r(b, K, n, L), "C": r(b, K, n, L), "D": r(K, dim), "delta_bias": r(K, dim, scale=0.1),
        "z": r(b, dim, L),
    }


def section_scan(plan: Plan) -> dict[str, Any]:
    """The op against mamba-ssm's reference and the pure-PyTorch path; fused 4-direction vs 4 scans."""
    import mtssm
    from mtssm._ops.mamba_reference import load_mamba_selective_scan_ref
    from mtssm._ops.orders import scan_order
    from mtssm.nn import functional as F

    mamba_ref = load_mamba_selective_scan_ref()
    budget = Budget(plan.budget_s["scan"])
    g = torch.Generator().manual_seed(0)
    rows: list[dict[str, Any]] = []
    fused: list[dict[str, Any]] = []
    skipped: list[str] = []
    for H, W in plan.grids:
        L = H * W
        for dim in plan.dims:
            if budget.spent:
                skipped.append(f"d={dim} L={H}x{W}")
                continue
            x = _scan_inputs(plan, dim, L, 1, g)
            leaf = {k: v.requires_grad_(True) for k, v in x.items()}

            def op() -> torch.Tensor:
                return F.selective_scan(leaf["u"], leaf["delta"][:, 0], leaf["A"][0],
                                        leaf["B"], leaf["C"], leaf["D"][0], leaf["z"],
                                        leaf["delta_bias"][0], delta_softplus=True)

            def ref() -> torch.Tensor:
                return mamba_ref(leaf["u"], leaf["delta"][:, 0], leaf["A"][0], leaf["B"], leaf["C"],
                                 leaf["D"][0], leaf["z"], leaf["delta_bias"][0], delta_softplus=True)

            def fwd_bwd(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
                def run() -> None:
                    fn().float().square().mean().backward()
                return run

            def fwd(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
                def run() -> None:
                    with torch.no_grad():
                        fn()
                return run

            row: dict[str, Any] = {"dim": dim, "grid": f"{H}x{W}", "L": L}
            row["op_fwd_ms"] = time_call(fwd(op), plan.device, warmup=2, reps=10)
            row["op_fwd_bwd_ms"] = time_call(fwd_bwd(op), plan.device, warmup=2, reps=10)
            with torch.no_grad():
                want, got = ref(), op()
            row["max_abs_err_vs_mamba_ref"] = float((got.float() - want.float()).abs().max())
            row["mamba_ref_fwd_ms"] = time_call(fwd(ref), plan.device, warmup=1, reps=1)
            row["mamba_ref_fwd_bwd_ms"] = time_call(fwd_bwd(ref), plan.device, warmup=0, reps=1)
            with mtssm.scan_backend("torch"):
                row["torch_fwd_ms"] = time_call(fwd(op), plan.device, warmup=1, reps=1)
                row["torch_fwd_bwd_ms"] = time_call(fwd_bwd(op), plan.device, warmup=0, reps=1)
            for base in ("mamba_ref", "torch"):
                for mode in ("fwd", "fwd_bwd"):
                    row[f"x_vs_{base}_{mode}"] = row[f"{base}_{mode}_ms"] / row[f"op_{mode}_ms"]
            rows.append(row)
            del x, leaf

        if budget.spent:
            skipped.append(f"fused 4-direction at {H}x{W}")
            continue
        fused.append(_fused_vs_single(plan, F, scan_order, H, W, plan.dims[0], g))
    return {"ok": True, "scan": rows, "fused_2d": fused, "skipped": skipped}


def _fused_vs_single(plan: Plan, F: Any, scan_order: Any, H: int, W: int, dim: int,
                     g: torch.Generator) -> dict[str, Any]:
    """Fused 4-direction scan vs four single scans on flipped/transposed copies, fwd+bwd."""
    L, K = H * W, 4
    x = _scan_inputs(plan, dim, L, K, g)
    img = x["u"].reshape(plan.batch, dim, H, W).detach().requires_grad_(True)
    delta = x["delta"].detach().requires_grad_(True)
    A = x["A"].reshape(K * dim, -1).detach().requires_grad_(True)
    B, C = (x[k].detach().requires_grad_(True) for k in ("B", "C"))
    D, bias = (x[k].reshape(K * dim).detach().requires_grad_(True) for k in ("D", "delta_bias"))
    perm = scan_order("ss2d", H, W).to(plan.device)

    def fused() -> None:
        F.selective_scan_2d(img, delta, A, B, C, D, bias, order="ss2d").square().mean().backward()

    def single() -> None:
        u = img.reshape(plan.batch, dim, L)
        y = torch.zeros_like(u)
        for k in range(K):
            p = perm[k]
            sl = slice(k * dim, (k + 1) * dim)
            yk = F.selective_scan(u[..., p].contiguous(), delta[:, k][..., p].contiguous(), A[sl],
                                  B[:, k : k + 1][..., p].contiguous(),
                                  C[:, k : k + 1][..., p].contiguous(),
                                  D[sl], None, bias[sl], delta_softplus=True)
            y = y.index_add(-1, p, yk)
        y.square().mean().backward()

    t_fused = time_call(fused, plan.device, warmup=2, reps=10)
    t_single = time_call(single, plan.device, warmup=2, reps=10)
    return {"grid": f"{H}x{W}", "dim": dim, "fused_fwd_bwd_ms": t_fused,
            "four_single_fwd_bwd_ms": t_single, "speedup": t_single / t_fused}


def _recipe_model(recipe: str) -> str:
    import yaml

    from mtssm.recipes import find_recipe

    return yaml.safe_load(find_recipe(recipe).read_text())["model"]["name"]


def section_train(plan: Plan) -> dict[str, Any]:
    """Training steps of the recipes' models at their paper size, eager and compiled, bf16 autocast."""
    from mtssm.nn import create_model

    budget = Budget(plan.budget_s["train"])
    models = plan.train_models or tuple(_recipe_model(r) for r in plan.train_recipes)
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for recipe, name in zip(plan.train_recipes, models):
        for mode in ("eager", "compiled"):
            if budget.spent:
                skipped.append(f"{recipe} {mode}")
                continue
            torch.manual_seed(0)
            torch._dynamo.reset()
            reset_peak(plan.device)
            model = create_model(name).to(plan.device).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
            images, labels = _tiny_batch(model, plan, plan.train_size, plan.train_batch)
            loss_fn = _loss_fn(model)
            fwd = (torch.compile(model, fullgraph=True, backend=plan.compile_backend)
                   if mode == "compiled" else model)

            def step() -> None:
                opt.zero_grad(set_to_none=True)
                with torch.autocast(plan.device, dtype=torch.bfloat16):
                    out = fwd(images)
                loss, _ = loss_fn({t: out[t].float() for t in model.tasks}, labels)
                loss.backward()
                opt.step()

            t0 = time.perf_counter()
            step()
            _sync(plan.device)
            first = time.perf_counter() - t0
            ms = time_call(step, plan.device, warmup=1, reps=plan.train_steps)
            rows.append({"recipe": recipe, "model": name, "mode": mode, "batch": plan.train_batch,
                         "size": list(plan.train_size), "step_ms": ms,
                         "first_step_s": round(first, 1), "peak_memory_mb": peak_memory_mb(plan.device),
                         "params_m": sum(p.numel() for p in model.parameters()) / 1e6})
            del model, opt, fwd
    for recipe in plan.train_recipes:
        pair = {r["mode"]: r["step_ms"] for r in rows if r["recipe"] == recipe}
        if len(pair) == 2:
            rows.append({"recipe": recipe, "compiled_speedup": pair["eager"] / pair["compiled"]})
    return {"ok": True, "steps": rows, "skipped": skipped}


def section_recipe(plan: Plan) -> dict[str, Any]:
    """One training step of the tiny recipe end to end through the CLI, on the device."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        cmd = [sys.executable, "-m", "mtssm.cli", "recipe", "run", "nyud_msm_tiny", "--data", "rendered",
               "--out", str(Path(tmp) / "run"), "--set", "train.steps=1", "--set",
               f"train.device={plan.device}", "--set", "data.render_n=16", "--set",
               "data.batch_size=2", "--set", "data.eval_batch_size=2", "--set", "eval.max_batches=1",
               "--set", "eval.predict_samples=1", "--set", "train.ckpt_every=1"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=plan.budget_s["recipe"] * 3)
        seconds = time.perf_counter() - t0
        ckpts = sorted(p.name for p in (Path(tmp) / "run").glob("checkpoints/*") if p.is_dir())
    out = (proc.stdout + proc.stderr).splitlines()
    return {"ok": proc.returncode == 0 and bool(ckpts), "returncode": proc.returncode,
            "seconds": round(seconds, 1), "checkpoints": ckpts, "tail": "\n".join(out[-15:])}


SECTIONS: dict[str, Callable[[Plan], dict[str, Any]]] = {
    "tests": section_tests,
    "scan": section_scan,
    "train": section_train,
    "recipe": section_recipe,
}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def environment(plan: Plan) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "device": plan.device, "date": time.strftime("%Y-%m-%d")}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if plan.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def table(report: dict[str, Any]) -> str:
    """A short plain-text summary of the report."""
    lines = [f"device: {report['environment'].get('gpu', report['environment']['device'])}, "
             f"torch {report['environment']['torch']}"]
    for name, sec in report["sections"].items():
        lines.append(f"[{name}] {'ok' if sec.get('ok') else 'FAILED'} ({sec.get('seconds', 0):.0f} s)")
        if "error" in sec:
            lines.append("  " + sec["error"].splitlines()[-1])
    tests = report["sections"].get("tests", {})
    if "pytest" in tests:
        lines.append(f"  pytest: {tests['pytest']['summary']}")
    for row in report["sections"].get("scan", {}).get("scan", []):
        lines.append(
            f"  scan d={row['dim']:5d} L={row['grid']:>7}: op fwd {row['op_fwd_ms']:8.2f} ms "
            f"({row['x_vs_mamba_ref_fwd']:6.1f}x mamba ref, {row['x_vs_torch_fwd']:5.1f}x torch), "
            f"fwd+bwd {row['op_fwd_bwd_ms']:8.2f} ms ({row['x_vs_mamba_ref_fwd_bwd']:6.1f}x, "
            f"{row['x_vs_torch_fwd_bwd']:5.1f}x)")
    for row in report["sections"].get("scan", {}).get("fused_2d", []):
        lines.append(f"  fused 4-direction {row['grid']} d={row['dim']}: {row['speedup']:.2f}x four scans")
    for row in report["sections"].get("train", {}).get("steps", []):
        if "step_ms" in row:
            mem = row["peak_memory_mb"]
            lines.append(f"  step {row['recipe']:>14} {row['mode']:>8}: {row['step_ms']:9.1f} ms"
                         + (f", peak {mem / 1024:.1f} GiB" if mem else ""))
        else:
            lines.append(f"  step {row['recipe']:>14} compiled/eager speed-up {row['compiled_speedup']:.2f}x")
    return "\n".join(lines)


def run(plan: Plan, only: tuple[str, ...]) -> dict[str, Any]:
    report: dict[str, Any] = {"environment": environment(plan), "sections": {}}
    for name, fn in SECTIONS.items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            sec = fn(plan)
        except Exception as exc:  # keep going: one report tells everything in one run
            sec = {"ok": False, "error": "".join(traceback.format_exception(exc))[-3000:]}
        sec["seconds"] = round(time.perf_counter() - t0, 1)
        report["sections"][name] = sec
        print(f"[{name}] {'ok' if sec['ok'] else 'FAILED'} in {sec['seconds']} s", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on the CPU, Triton in its interpreter (what the tests run)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")),
                        help="folder for gpu_check.json (default: $OUT, else the current folder)")
    parser.add_argument("--only", default="", help=f"comma-separated sections of {','.join(SECTIONS)}")
    args = parser.parse_args(argv)
    only = tuple(s for s in args.only.split(",") if s)
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"--only: unknown sections {unknown}; expected some of {list(SECTIONS)}")
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        # Inductor's pool of compile processes buys nothing on a small CPU machine: compile in-process.
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
        torch.set_num_threads(1)  # tiny shapes: a second thread only adds waiting on a busy machine
        plan = DRY_PLAN
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device here; use --dry-run for the CPU rehearsal", file=sys.stderr)
            return 2
        plan = GPU_PLAN
    report = run(plan, only)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu_check.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    print(table(report))
    print(f"wrote {path}")
    return 0 if all(s.get("ok") for s in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Forward+backward time of every tiny registered model, eager vs ``torch.compile``.

Run from the repository root::

    python benchmarks/decoders.py                      # every *_tiny model, 448x576, batch 1
    python benchmarks/decoders.py --models mtmamba_tiny --size 448 576 --iters 3

Freed memory is kept for reuse, as ``mtssm recipe run`` does (:func:`mtssm.runtime.keep_freed_memory`;
``--default-allocator`` to measure without: then the 448x576 outputs above 32 MiB are page-faulted
in afresh on every step). Prints, per model, the median eager and compiled step times (the steps alternate between the
two), the compiled speed-up (eager / compiled, measured in the same run) and the one-off compile
time (the first compiled step). Compiling with Inductor
takes minutes per model on a 2-core CPU.

It also prints, profiled, the share of the eager step spent in the ``mtssm::`` scan ops, and
("shared") in those plus ATen's matrix products and convolutions: Inductor calls these same kernels
as they are, so ``1 / shared`` ("bound") is the speed-up compiling would give if it made everything
else free. The last column checks the compiled model against eager (drop-path off): the relative L2
error of the outputs and of the parameter gradients, the larger of the two.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mtssm.nn import create_model, list_models
from mtssm.nn.layers import DropPath
from mtssm.runtime import keep_freed_memory


def _loss(out) -> torch.Tensor:
    return sum(v.float().square().mean() for v in out.values())


def _step(model: torch.nn.Module, x: torch.Tensor) -> None:
    _loss(model(x)).backward()
    for p in model.parameters():
        p.grad = None


#: ATen kernels that eager mode and Inductor's CPU code both call as they are (matrix products and
#: convolutions are extern kernels for Inductor, as are the ``mtssm::`` ops).
_EXTERN_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::mkldnn_convolution",
               "aten::convolution_backward")


def _shares(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Fractions of one eager step's CPU time spent in the ``mtssm::`` scan ops, and in those plus
    the matrix products and convolutions (profiled)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _step(model, x)
    events = prof.key_averages()
    total = max(sum(e.self_cpu_time_total for e in events), 1e-9)
    # The forward op's own time is listed under its autograd node in eager mode.
    scan = sum(e.self_cpu_time_total for e in events if "mtssm" in e.key and "scan" in e.key)
    extern = sum(e.self_cpu_time_total for e in events if e.key in _EXTERN_OPS)
    return scan / total, (scan + extern) / total


def _deterministic(model: torch.nn.Module) -> torch.nn.Module:
    """Drop-path, dropout and noisy expert gating off, so the eager and compiled steps compute the
    same function."""
    for m in model.modules():
        if isinstance(m, (DropPath, torch.nn.Dropout)):
            m.p = 0.0
        if getattr(m, "noisy_gating", False):
            m.noisy_gating = False
    return model


def _rel_error(model: torch.nn.Module, compiled: torch.nn.Module, x: torch.Tensor) -> float:
    """Relative L2 error of the compiled step against eager: ``||c - e|| / ||e||`` over all outputs
    and, separately, over all parameter gradients; the larger of the two.

    (Whole vectors, because some gradients are zero up to rounding, e.g. a conv bias followed by
    batch norm, and a per-tensor relative error of those is meaningless.)
    """

    def run(fn):
        out = fn(x)
        _loss(out).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        for p in model.parameters():
            p.grad = None
        return torch.cat([v.detach().flatten() for v in out.values()]), grads

    (out_e, grad_e), (out_c, grad_c) = run(model), run(compiled)
    return max(float((out_c - out_e).norm() / out_e.norm()), float((grad_c - grad_e).norm() / grad_e.norm()))


def _timed_step(model: torch.nn.Module, x: torch.Tensor) -> float:
    t = time.perf_counter()
    _step(model, x)
    return time.perf_counter() - t


def _time_pair(eager: torch.nn.Module, compiled: torch.nn.Module, x: torch.Tensor, iters: int) -> tuple[float, float]:
    """Median seconds of ``iters`` eager and compiled steps, run alternately so that both see the
    same machine (on a shared VM, slow phases last seconds and would bias two separate series)."""
    t_eager, t_compiled = [], []
    for _ in range(iters):
        t_eager.append(_timed_step(eager, x))
        t_compiled.append(_timed_step(compiled, x))
    return statistics.median(t_eager), statistics.median(t_compiled)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=None, help="model names (default: every *_tiny model)")
    parser.add_argument("--size", nargs=2, type=int, default=(448, 576), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--default-allocator", action="store_true",
                        help="keep glibc's default allocator (training keeps freed memory for reuse)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reused = not args.default_allocator and keep_freed_memory()  # False where libc is not glibc
    allocator = "freed memory reused" if reused else "default"
    names = args.models or list_models("*_tiny")
    unknown = sorted(set(names) - set(list_models()))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; registered: {', '.join(list_models())}")
    x = torch.randn(args.batch, 3, *args.size)
    print(f"input {tuple(x.shape)}, {torch.get_num_threads()} threads, backend {args.backend}, "
          f"torch {torch.__version__}, allocator: {allocator}")
    print(f"{'model':<22} {'params':>8} {'eager s':>9} {'compiled s':>11} {'speed-up':>9} {'compile s':>10} "
          f"{'scan share':>11} {'shared':>7} {'bound':>7} {'rel error':>10}")
    for name in names:
        torch.manual_seed(0)
        model = _deterministic(create_model(name).train())
        n = sum(p.numel() for p in model.parameters())
        for _ in range(args.warmup):
            _step(model, x)
        scan_share, shared = _shares(model, x)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend=args.backend)
        build = sum(_timed_step(compiled, x) for _ in range(max(args.warmup, 1)))
        eager, comp = _time_pair(model, compiled, x, args.iters)
        print(f"{name:<22} {n / 1e6:>7.2f}M {eager:>9.3f} {comp:>11.3f} {eager / comp:>8.2f}x {build:>10.1f} "
              f"{100 * scan_share:>10.0f}% {100 * shared:>6.0f}% {1 / shared:>6.2f}x "
              f"{_rel_error(model, compiled, x):>10.1e}", flush=True)


if __name__ == "__main__":
    main()

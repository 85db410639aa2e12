"""Benchmark of the CPU scan ops against baselines measured in the same run.

    python benchmarks/scan.py            # all sections (a few minutes on 2 cores)
    python benchmarks/scan.py --quick    # smaller shapes, for a smoke run

Prints, for batch=2, dim=256, L=4096, N=16, fp32:
  1. forward of torch.ops.mtssm.selective_scan vs mamba-ssm's selective_scan_ref (target >= 20x);
  2. forward+backward vs a lean PyTorch loop (exp(dA) and dBu precomputed, one addcmul per step)
     (target >= 20x);
  3. forward+backward at L = 1024, 4096, 16384: time ratio per 4x of L (target <= 4.5x); once with
     glibc's default allocator, which maps every tensor above 32 MiB afresh from the OS (at
     L = 16384 each (b, d, L) tensor is 32 MiB, so the op's five outputs are page-faulted on every
     call), and once with freed memory kept for reuse (M_MMAP_THRESHOLD / M_TRIM_THRESHOLD raised
     by :func:`mtssm.runtime.keep_freed_memory`, which ``mtssm recipe run`` calls);
  4. peak extra memory of forward+backward vs storing every state (batch*dim*L*N floats)
     (target <= 25 %), measured in a fresh subprocess per implementation;
  5. the 4-direction 2-D scan on a 56x72 map, dim=384, batch 2: fused vs four single scans with
     flipped/transposed copies (forward+backward).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable

import torch

import mtssm  # noqa: F401  (registers the ops)
from mtssm.nn.functional import selective_scan, selective_scan_2d
from mtssm.runtime import keep_freed_memory


def timeit(fn: Callable[[], object], repeat: int = 3, warmup: int = 1) -> float:
    """Best wall time of ``repeat`` runs, in seconds."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def make_inputs(batch: int, dim: int, L: int, N: int, grad: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, dim, L, generator=g)
    delta = torch.randn(batch, dim, L, generator=g) * 0.5
    A = -torch.exp(torch.log(torch.arange(1, N + 1).float()).repeat(dim, 1))
    B = torch.randn(batch, 1, N, L, generator=g)
    C = torch.randn(batch, 1, N, L, generator=g)
    D = torch.ones(dim)
    bias = torch.rand(dim, generator=g) * 0.1
    xs = [u, delta, A, B, C, D, bias]
    return [x.requires_grad_(grad) for x in xs]


def lean_loop(u, delta, A, B, C, D, bias):
    """The baseline: plain PyTorch, exp(dA) and dBu precomputed, one addcmul per step."""
    dt = torch.nn.functional.softplus(delta + bias[:, None])  # (b, d, L)
    dA = torch.exp(dt.unsqueeze(-1) * A[:, None, :])  # (b, d, L, N)
    dBu = (dt * u).unsqueeze(-1) * B[:, 0].transpose(1, 2).unsqueeze(1)  # (b, d, L, N)
    Ct = C[:, 0].transpose(1, 2)  # (b, L, N)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    hs = []
    # unbind (not indexing) so autograd stacks the step gradients once instead of writing a
    # full-size zero gradient per step, which would make the backward quadratic in L.
    for a_t, bu_t in zip(dA.unbind(2), dBu.unbind(2)):
        h = torch.addcmul(bu_t, a_t, h)
        hs.append(h)
    y = torch.einsum("bdln,bln->bdl", torch.stack(hs, 2), Ct)
    return y + u * D[:, None]


def ours(u, delta, A, B, C, D, bias):
    return selective_scan(u, delta, A, B, C, D, None, bias, True)


def fwd_bwd(fn, xs):
    def run():
        for x in xs:
            x.grad = None
        fn(*xs).sum().backward()

    return run


def section_forward_vs_mamba(batch, dim, L, N):
    from mtssm._ops.mamba_reference import load_mamba_selective_scan_ref

    try:
        ref = load_mamba_selective_scan_ref()
    except ImportError as exc:
        print(f"1. skipped: {exc}")
        return
    xs = make_inputs(batch, dim, L, N)
    with torch.no_grad():
        t_ref = timeit(lambda: ref(*xs[:5], D=xs[5], delta_bias=xs[6], delta_softplus=True),
                       repeat=1)
        t_ours = timeit(lambda: ours(*xs), repeat=5)
    print(f"1. forward  b={batch} d={dim} L={L} N={N}: mamba-ssm selective_scan_ref {t_ref:.3f}s, "
          f"mtssm {t_ours * 1e3:.1f}ms -> {t_ref / t_ours:.1f}x (target >= 20x)")


def section_fwd_bwd_vs_loop(batch, dim, L, N):
    xs = make_inputs(batch, dim, L, N, grad=True)
    t_loop = timeit(fwd_bwd(lean_loop, xs), repeat=1)
    t_ours = timeit(fwd_bwd(ours, xs), repeat=5)
    print(f"2. fwd+bwd  b={batch} d={dim} L={L} N={N}: lean PyTorch loop {t_loop:.3f}s, "
          f"mtssm {t_ours * 1e3:.1f}ms -> {t_loop / t_ours:.1f}x (target >= 20x)")


def section_linear_in_L(batch, dim, N, lengths):
    def growth(label):
        times = []
        for L in lengths:
            xs = make_inputs(batch, dim, L, N, grad=True)
            times.append(timeit(fwd_bwd(ours, xs), repeat=7))  # best of 7: the VM is noisy
        parts = ", ".join(f"L={L}: {t * 1e3:.0f}ms" for L, t in zip(lengths, times))
        ratios = ", ".join(f"{b / a:.2f}x" for a, b in zip(times, times[1:]))
        print(f"3. fwd+bwd growth ({label}): {parts}; per 4x of L: {ratios} (target <= 4.5x)")

    growth("default allocator")
    if keep_freed_memory():
        growth("freed memory reused")


_MEMORY_CHILD = r"""
import json, resource, sys, torch
sys.path.insert(0, {root!r})
from benchmarks.scan import make_inputs, ours, lean_loop
torch.set_num_threads({threads})
batch, dim, L, N, which = {batch}, {dim}, {L}, {N}, {which!r}
xs = make_inputs(batch, dim, L, N, grad=True)
fn = ours if which == "mtssm" else lean_loop
fn(*make_inputs(1, 2, 8, N, grad=True)).sum().backward()  # load kernels before measuring
def status_kb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))
with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
    f.write("5")
before = status_kb("VmRSS")
out = fn(*xs)
out.sum().backward()
print(json.dumps({{"before_kb": before, "peak_kb": status_kb("VmHWM")}}))
"""


def section_memory(batch, dim, L, N):
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    states_bytes = batch * dim * L * N * 4
    # What every implementation allocates during fwd+bwd whatever its scan: the output, the
    # incoming gradient (materialised from .sum()), and the gradients of u and delta.
    io_bytes = 4 * batch * dim * L * 4
    extra = {}
    for which in ("mtssm", "loop"):
        code = _MEMORY_CHILD.format(root=root, threads=torch.get_num_threads(), batch=batch,
                                    dim=dim, L=L, N=N, which=which)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"4. memory ({which}) failed: {proc.stderr[-500:]}")
            return
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        # Extra memory = peak RSS during fwd+bwd above the RSS with the inputs allocated.
        extra[which] = max(0, r["peak_kb"] - r["before_kb"]) * 1024

    def fmt(name):
        work = max(0, extra[name] - io_bytes)
        return (f"{name} {extra[name] / 2**20:.0f} MiB in all ({100 * extra[name] / states_bytes:.0f} %), "
                f"{work / 2**20:.0f} MiB beyond outputs and gradients ({100 * work / states_bytes:.0f} %)")

    print(f"4. peak extra memory of fwd+bwd (b={batch} d={dim} L={L} N={N}) vs storing every state "
          f"({states_bytes / 2**20:.0f} MiB); outputs and gradients alone are "
          f"{io_bytes / 2**20:.0f} MiB ({100 * io_bytes / states_bytes:.0f} %): {fmt('mtssm')}; "
          f"{fmt('loop')} (target <= 25 %)")


def section_2d(batch, dim, H, W, N):
    from mtssm.nn.functional import ss2d_orders

    L, K = H * W, 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, dim, H, W, generator=g).requires_grad_()
    delta = (torch.randn(batch, K, dim, L, generator=g) * 0.5).requires_grad_()
    A = (-torch.exp(torch.log(torch.arange(1, N + 1).float()).repeat(K * dim, 1))).requires_grad_()
    B = torch.randn(batch, K, N, L, generator=g).requires_grad_()
    C = torch.randn(batch, K, N, L, generator=g).requires_grad_()
    D = torch.ones(K * dim, requires_grad=True)
    bias = torch.zeros(K * dim, requires_grad=True)
    xs = [x, delta, A, B, C, D, bias]

    def fused():
        return selective_scan_2d(x, delta, A, B, C, D, bias, order="ss2d")

    perm = ss2d_orders(H, W)
    inv = torch.argsort(perm, dim=1)

    def unfused():
        """VMamba's CrossScan: four copies (row-major, transposed, both flipped), four scans,
        CrossMerge back."""
        flat = x.flatten(2)
        y = 0
        for k in range(K):
            sl = slice(k * dim, (k + 1) * dim)
            order = perm[k]
            yk = selective_scan(flat[..., order], delta[:, k][..., order], A[sl],
                                B[:, k : k + 1][..., order], C[:, k : k + 1][..., order], D[sl],
                                None, bias[sl], True)
            y = y + yk[..., inv[k]]
        return y.view(batch, dim, H, W)

    t_fused = timeit(fwd_bwd(lambda *_: fused(), xs), repeat=3)
    t_unfused = timeit(fwd_bwd(lambda *_: unfused(), xs), repeat=3)
    print(f"5. 4-direction 2-D scan fwd+bwd b={batch} d={dim} {H}x{W} N={N}: four single scans "
          f"with copies {t_unfused * 1e3:.0f}ms, fused {t_fused * 1e3:.0f}ms -> "
          f"{t_unfused / t_fused:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    parser.add_argument("--sections", default="12345", help="which sections to run, e.g. 125")
    args = parser.parse_args()
    batch, dim, L, N = (2, 64, 1024, 16) if args.quick else (2, 256, 4096, 16)
    print(f"mtssm scan benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"ops library: {mtssm._ops.selective_scan.LIBRARY_PATH or 'none (pure-PyTorch path)'}")
    if "1" in args.sections:
        section_forward_vs_mamba(batch, dim, L, N)
    if "2" in args.sections:
        section_fwd_bwd_vs_loop(batch, dim, L, N)
    if "3" in args.sections:
        section_linear_in_L(batch, dim, N, [256, 1024, 4096] if args.quick else [1024, 4096, 16384])
    if "4" in args.sections:
        section_memory(batch, dim, L, N)
    if "5" in args.sections:
        section_2d(2, 96 if args.quick else 384, 28 if args.quick else 56, 36 if args.quick else 72, 16)


if __name__ == "__main__":
    main()

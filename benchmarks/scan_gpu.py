"""GPU benchmark of the Triton selective-scan kernels (run: ``python benchmarks/scan_gpu.py``).

Prints, measured in one run on one GPU (times are forward + backward, median of
``triton.testing.do_bench``):

1. The 1-D selective scan (batch 8, dim 384, L 56*72, N 16, bf16, D, delta_bias, softplus):
   Triton kernel vs mamba-ssm's CUDA ``selective_scan_fn`` (target: Triton >= 0.8x its speed).
2. The fused 4-direction 2-D scan (SS2D orders on a 56x72 map) vs the unfused path: flipped and
   transposed copies of the input, four mamba-ssm calls (four Triton K=1 calls without mamba-ssm)
   and the merge back (target: fused >= 1.3x faster). VMamba's own unfused form, one grouped
   mamba-ssm call over the K*dim channels, is printed as well.

``--sweep`` first times the 1-D scan over tile sizes, to check the defaults on new hardware;
``--smoke`` runs every path once on CPU in Triton's interpreter at tiny shapes.
On a machine without CUDA (or without triton) it says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def _ss2d_orders(H: int, W: int, device: torch.device) -> torch.Tensor:
    """(4, H*W) visit orders: row-major, column-major, and both reversed."""
    try:
        from mtssm._ops.orders import scan_order

        return scan_order("ss2d", H, W).to(device)
    except (ImportError, AttributeError):
        idx = torch.arange(H * W, device=device).view(H, W)
        row, col = idx.flatten(), idx.t().flatten()
        return torch.stack([row, col, row.flip(0), col.flip(0)])


def _bench(fn, warmup: int = 5, rep: int = 50) -> float:
    """Median time of ``fn`` in ms (on CPU, the smoke run: one timed call)."""
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--height", type=int, default=56)
    parser.add_argument("--width", type=int, default=72)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--sweep", action="store_true",
                        help="first time the 1-D scan over chunk sizes, block_d and warps")
    parser.add_argument("--smoke", action="store_true",
                        help="run every path once on CPU in Triton's interpreter at tiny shapes "
                             "(checks the script, times mean nothing)")
    args = parser.parse_args()
    bf16 = torch.bfloat16

    if args.smoke:
        if "triton" in sys.modules:
            print("scan_gpu --smoke: triton was imported before TRITON_INTERPRET=1 could be set")
            return 1
        os.environ["TRITON_INTERPRET"] = "1"
        args.batch, args.dim, args.height, args.width, args.d_state = 1, 8, 4, 6, 4
        args.chunk_size, args.sweep = 8, False
        bf16 = torch.float32  # exact comparison of the fused and unfused paths
    elif not torch.cuda.is_available():
        print("scan_gpu: no CUDA device here; run this benchmark on a machine with an NVIDIA GPU.")
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        print("scan_gpu: triton is not installed; pip install 'mtssm[gpu]' (or triton).")
        return 0
    from mtssm._ops import triton_scan as ts
    from mtssm._ops.mamba_reference import mamba_cuda_available, mamba_selective_scan_cuda
    from mtssm._ops.scan_inputs import ScanInputs

    dev = torch.device("cpu" if args.smoke else "cuda")
    batch, dim, N = args.batch, args.dim, args.d_state
    H, W = args.height, args.width
    L = H * W
    chunk = args.chunk_size
    torch.manual_seed(0)
    gpu = "CPU (interpreter smoke run)" if args.smoke else torch.cuda.get_device_name()
    print(f"device: {gpu} | torch {torch.__version__} | "
          f"triton {triton.__version__} | mamba-ssm CUDA: {mamba_cuda_available()}")
    print(f"shape: batch {batch}, dim {dim}, L {H}x{W}={L}, N {N}, {str(bf16)[6:]}, "
          f"chunk_size {chunk}")

    # ---- 1-D selective scan ------------------------------------------------------------------
    u = torch.randn(batch, dim, L, device=dev, dtype=bf16)
    delta = (torch.randn(batch, dim, L, device=dev) * 0.5 - 2.0).to(bf16)
    A = -torch.exp(torch.randn(dim, N, device=dev) * 0.5)
    B = torch.randn(batch, 1, N, L, device=dev, dtype=bf16)
    C = torch.randn(batch, 1, N, L, device=dev, dtype=bf16)
    D = torch.randn(dim, device=dev)
    dbias = torch.randn(dim, device=dev) * 0.1
    dout = torch.randn(batch, dim, L, device=dev, dtype=bf16)

    def triton_1d(chunk_size=chunk, **tiles):
        def run():
            x = ScanInputs(u, delta[:, None], A[None], B[:, None], C[:, None], D[None], None,
                           dbias[None], None, None, True, chunk_size)
            out, _, cs = ts.selective_scan_fwd_triton(x, **tiles)
            ts.selective_scan_bwd_triton(x, dout, None, cs, **tiles)
        return run

    if args.sweep:
        print("\ntile sweep, 1-D scan fwd+bwd (ms):")
        for cs in (32, 64, 128):
            for bd in (1, 2, 4):
                for nw in (4, 8):
                    try:
                        ms = _bench(triton_1d(cs, block_d=bd, num_warps=nw), rep=20)
                        print(f"  chunk {cs:4d} block_d {bd:2d} warps {nw}: {ms:8.3f}")
                    except Exception as e:  # noqa: BLE001  (e.g. out of shared memory)
                        print(f"  chunk {cs:4d} block_d {bd:2d} warps {nw}: failed "
                              f"({type(e).__name__})")

    t_triton = _bench(triton_1d())
    print(f"\n1-D selective scan, fwd+bwd: Triton kernels {t_triton:.3f} ms")
    try:  # the same through the package's op and autograd, as models call it
        import mtssm
        from mtssm.nn.functional import selective_scan

        op_leaves = [t.detach().clone().requires_grad_() for t in (u, delta, A, B, C, D, dbias)]

        def op_1d():
            uu, dd, AA, BB, CC, DD, bb = op_leaves
            selective_scan(uu, dd, AA, BB, CC, DD, None, bb, delta_softplus=True).backward(dout)

        with mtssm.scan_backend("triton"):
            t_op = _bench(op_1d)
        print(f"1-D selective scan, fwd+bwd: mtssm.nn.functional.selective_scan (triton backend) "
              f"{t_op:.3f} ms")
    except Exception as e:  # noqa: BLE001  (the package op may not be wired to Triton yet)
        print(f"1-D selective scan through mtssm.nn.functional: not measured ({type(e).__name__}: "
              f"{str(e)[:120]})")
    if mamba_cuda_available() and not args.smoke:
        leaves = [t.detach().clone().requires_grad_() for t in (u, delta, A, B, C, D, dbias)]

        def mamba_1d():
            uu, dd, AA, BB, CC, DD, bb = leaves
            out = mamba_selective_scan_cuda(uu, dd, AA, BB, CC, DD, None, bb, True)
            out.backward(dout)

        out_t, _, _ = ts.selective_scan_fwd_triton(ScanInputs(
            u, delta[:, None], A[None], B[:, None], C[:, None], D[None], None, dbias[None], None,
            None, True, chunk))
        out_m = mamba_selective_scan_cuda(u, delta, A, B, C, D, None, dbias, True)
        t_mamba = _bench(mamba_1d)
        print(f"1-D selective scan, fwd+bwd: mamba-ssm {t_mamba:.3f} ms | Triton speed / mamba-ssm "
              f"= {t_mamba / t_triton:.2f}x (target >= 0.8x) | max |out diff| "
              f"{(out_t.float() - out_m.float()).abs().max().item():.3g}")
    else:
        print("1-D selective scan: mamba-ssm's CUDA kernels are not importable here, no comparison "
              "(pip install --no-build-isolation mamba-ssm on this machine to get it)")

    # ---- fused 4-direction 2-D scan vs the unfused path --------------------------------------
    K = 4
    perm = _ss2d_orders(H, W, dev)
    delta4 = (torch.randn(batch, K, dim, L, device=dev) * 0.5 - 2.0).to(bf16)
    A4 = -torch.exp(torch.randn(K, dim, N, device=dev) * 0.5)
    B4 = torch.randn(batch, K, 1, N, L, device=dev, dtype=bf16)
    C4 = torch.randn(batch, K, 1, N, L, device=dev, dtype=bf16)
    D4 = torch.randn(K, dim, device=dev)
    dbias4 = torch.randn(K, dim, device=dev) * 0.1

    def fused_4d():
        x = ScanInputs(u, delta4, A4, B4, C4, D4, None, dbias4, None, perm, True, chunk)
        out, _, cs = ts.selective_scan_fwd_triton(x)
        ts.selective_scan_bwd_triton(x, dout, None, cs)

    # The unfused path gets delta/B/C already in each direction's visit order (in VMamba they are
    # projected from the flipped/transposed copies), so only the input is copied and merged.
    delta_v = torch.stack([delta4[:, k][..., perm[k]] for k in range(K)], 1).contiguous()
    B_v = torch.stack([B4[:, k, 0][..., perm[k]] for k in range(K)], 1).contiguous()
    C_v = torch.stack([C4[:, k, 0][..., perm[k]] for k in range(K)], 1).contiguous()
    x_map = u.view(batch, dim, H, W)

    def cross_scan(x):  # (batch, dim, H, W) -> (batch, K, dim, L), VMamba's CrossScan
        row = x.flatten(2)
        col = x.transpose(2, 3).flatten(2)
        return torch.stack([row, col, row.flip(-1), col.flip(-1)], 1)

    def cross_merge(ys):  # (batch, K, dim, L) -> (batch, dim, L)
        def t_back(y):
            return y.view(batch, dim, W, H).transpose(2, 3).flatten(2)
        return ys[:, 0] + t_back(ys[:, 1]) + ys[:, 2].flip(-1) + t_back(ys[:, 3].flip(-1))

    use_mamba = mamba_cuda_available() and not args.smoke
    leaves4 = [t.detach().clone().requires_grad_() for t in (x_map, delta_v, A4, B_v, C_v, D4,
                                                             dbias4)]

    def unfused_4_calls():
        x, dv, AA, BB, CC, DD, bb = leaves4
        xs = cross_scan(x)
        if use_mamba:
            ys = [mamba_selective_scan_cuda(xs[:, k], dv[:, k], AA[k], BB[:, k, None],
                                               CC[:, k, None], DD[k], None, bb[k], True)
                  for k in range(K)]
            cross_merge(torch.stack(ys, 1)).backward(dout)
        else:  # four Triton K=1 scans on the copies, the merge, and the way back
            xd = xs.detach()
            ys, states = [], []
            for k in range(K):
                y, _, cs = ts.selective_scan_fwd_triton(ScanInputs(
                    xd[:, k], dv[:, k, None], AA[k, None], BB[:, k, None, None],
                    CC[:, k, None, None], DD[k, None], None, bb[k, None], None, None, True, chunk))
                ys.append(y)
                states.append(cs)
            y_all = torch.stack(ys, 1).requires_grad_()
            cross_merge(y_all).backward(dout)
            g = y_all.grad
            dxs = []
            for k in range(K):
                xk = ScanInputs(xd[:, k], dv[:, k, None], AA[k, None], BB[:, k, None, None],
                                CC[:, k, None, None], DD[k, None], None, bb[k, None], None, None,
                                True, chunk)
                dxs.append(ts.selective_scan_bwd_triton(xk, g[:, k], None, states[k])[0])
            xs.backward(torch.stack(dxs, 1))

    def unfused_grouped():  # VMamba: one call over K*dim channels with K groups
        x, dv, AA, BB, CC, DD, bb = leaves4
        xs = cross_scan(x).reshape(batch, K * dim, L)
        ys = mamba_selective_scan_cuda(xs, dv.reshape(batch, K * dim, L),
                                          AA.reshape(K * dim, N), BB, CC, DD.reshape(-1), None,
                                          bb.reshape(-1), True)
        cross_merge(ys.view(batch, K, dim, L)).backward(dout)

    # Same values both ways (the unfused forward, taken once without autograd).
    with torch.no_grad():
        fused_out, _, _ = ts.selective_scan_fwd_triton(
            ScanInputs(u, delta4, A4, B4, C4, D4, None, dbias4, None, perm, True, chunk))
        xs = cross_scan(x_map)
        ys = []
        for k in range(K):
            y, _, _ = ts.selective_scan_fwd_triton(ScanInputs(
                xs[:, k], delta_v[:, k, None], A4[k, None], B_v[:, k, None, None],
                C_v[:, k, None, None], D4[k, None], None, dbias4[k, None], None, None, True, chunk))
            ys.append(y)
        ref = cross_merge(torch.stack(ys, 1).float())
        diff = ((fused_out.float() - ref).abs().max() / ref.abs().max()).item()

    t_fused = _bench(fused_4d)
    t_unfused = _bench(unfused_4_calls)
    name = "4 mamba-ssm calls" if use_mamba else "4 Triton calls"
    print(f"\n4-direction 2-D scan (SS2D), fwd+bwd: fused Triton {t_fused:.3f} ms | unfused "
          f"(copies + {name} + merge) {t_unfused:.3f} ms | speed-up {t_unfused / t_fused:.2f}x "
          f"(target >= 1.3x) | max |fused - unfused| / max |unfused| {diff:.2g}")
    if use_mamba:
        t_grouped = _bench(unfused_grouped)
        print(f"  VMamba's grouped form (copies + 1 mamba-ssm call over {K}*dim channels + merge): "
              f"{t_grouped:.3f} ms | fused speed-up {t_grouped / t_fused:.2f}x")

    if args.smoke:
        return 0 if diff < 1e-5 else 1
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fused_4d()
    torch.cuda.synchronize()
    peak_fused = torch.cuda.max_memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    unfused_4_calls()
    torch.cuda.synchronize()
    peak_unfused = torch.cuda.max_memory_allocated() - base
    print(f"  peak extra memory fwd+bwd: fused {peak_fused / 2**20:.0f} MiB, unfused "
          f"{peak_unfused / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

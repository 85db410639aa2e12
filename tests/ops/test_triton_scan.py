"""Triton scan kernels (mtssm._ops.triton_scan) against a sequential PyTorch oracle.

Without a GPU the kernels run on CPU tensors in Triton's interpreter, which must be switched on
before triton is first imported; shapes are kept tiny because the interpreter is slow. With CUDA
the tiny cases run on the GPU, and further checks at realistic sizes in bf16.
"""

from __future__ import annotations

import itertools
import os
import sys

import pytest
import torch
import torch.nn.functional as F

if ("TRITON_INTERPRET" not in os.environ and "triton" not in sys.modules
        and not torch.cuda.is_available()):
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton", reason="triton is not installed (pip install 'mtssm[gpu]')")

from mtssm import scan_backend  # noqa: E402
from mtssm._ops import triton_scan as ts  # noqa: E402
from mtssm._ops.mamba_reference import mamba_cuda_available, mamba_selective_scan_cuda  # noqa: E402
from mtssm._ops.scan_inputs import ScanInputs  # noqa: E402
from mtssm._ops.selective_scan import selective_scan, selective_scan_ref  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available() and not INTERPRET
DEVICE = "cuda" if CUDA else "cpu"

GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def scan_oracle(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None,
                perm=None, delta_softplus=False, chunk_size=None):
    """Sequential reference of the unified scan, in the dtype of its inputs (use fp64).

    u, z: (batch, dim, L); delta: (batch, K, dim, L); A: (K, dim, N); B, C: (batch, K, G, N, L)
    or (K, dim, N) constant; D, delta_bias: (K, dim); initial_state: (batch, K, dim, N);
    perm: (K, L).
    Returns out (batch, dim, L), last_state (batch, K, dim, N) and, if chunk_size is given, the
    states before every chunk (batch, K, dim, n_chunks, N).
    """
    batch, dim, L = u.shape
    K, N = delta.shape[1], A.shape[-1]
    dt = delta if delta_bias is None else delta + delta_bias[None, :, :, None]
    if delta_softplus:
        dt = F.softplus(dt)

    def per_channel(M):  # (batch, K, dim, N, L)
        if M.dim() == 3:  # constant (K, dim, N)
            return M[None, ..., None].expand(batch, K, dim, N, L)
        return M.repeat_interleave(dim // M.shape[2], dim=2)

    Bx, Cx = per_channel(B), per_channel(C)
    y = u * D.sum(0)[:, None] if D is not None else torch.zeros_like(u)
    lasts, chunk_states = [], []
    for k in range(K):
        order = perm[k] if perm is not None else torch.arange(L)
        h = initial_state[:, k] if initial_state is not None else u.new_zeros(batch, dim, N)
        ys, hs_k = [], []
        for t in range(L):
            if chunk_size is not None and t % chunk_size == 0:
                hs_k.append(h)
            p = int(order[t])
            h = (torch.exp(dt[:, k, :, p, None] * A[k]) * h
                 + (dt[:, k, :, p] * u[:, :, p])[..., None] * Bx[:, k, :, :, p])
            ys.append((h * Cx[:, k, :, :, p]).sum(-1))
        inv = torch.argsort(order)
        y = y + torch.stack(ys, dim=-1)[..., inv]
        lasts.append(h)
        if chunk_size is not None:
            chunk_states.append(torch.stack(hs_k, dim=2))
    if z is not None:
        y = y * F.silu(z)
    last = torch.stack(lasts, dim=1)
    if chunk_size is None:
        return y, last
    return y, last, torch.stack(chunk_states, dim=1)


def make_inputs(batch, K, dim, L, N, G, *, D, z, bias, init, perm, dtype, device, seed=0,
                const_bc=False):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen) * scale + shift).to(device)

    inp = dict(
        u=rnd(batch, dim, L),
        delta=rnd(batch, K, dim, L, scale=0.5, shift=-1.0 if bias else 0.0),
        A=-torch.exp(rnd(K, dim, N, scale=0.5)),
        B=rnd(K, dim, N) if const_bc else rnd(batch, K, G, N, L),
        C=rnd(K, dim, N) if const_bc else rnd(batch, K, G, N, L),
        D=rnd(K, dim) if D else None,
        z=rnd(batch, dim, L) if z else None,
        delta_bias=rnd(K, dim, scale=0.3) if bias else None,
        initial_state=rnd(batch, K, dim, N) if init else None,
    )
    if not bias:  # positive step sizes when there is no softplus to make them so
        inp["delta"] = inp["delta"].abs() * 0.3
    keep_fp32 = ("A",) if dtype != torch.float64 else ()  # A stays fp32 as in Mamba
    inp = {k: (v.to(dtype) if v is not None and k not in keep_fp32 else v) for k, v in inp.items()}
    order = (torch.stack([torch.randperm(L, generator=gen) for _ in range(K)]).to(device)
             if perm else None)
    return inp, order


TOL = {  # (values, gradients) as (rtol, atol)
    torch.float64: ((1e-9, 1e-9), (1e-8, 1e-8)),
    torch.float32: ((1e-4, 1e-4), (1e-3, 1e-3)),
    torch.float16: ((1e-2, 1e-2), (3e-2, 3e-2)),
    torch.bfloat16: ((3e-2, 3e-2), (6e-2, 6e-2)),
}


def assert_close(name, got, want, dtype, grad=False):
    rtol, atol = TOL[dtype][1 if grad else 0]
    scale = max(1.0, want.abs().max().item())  # gradients summed over many terms are large
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol * scale,
                               msg=lambda m: f"{name}: {m}")


def check_against_oracle(batch, K, dim, L, N, G, *, D=False, z=False, bias=False, init=False,
                         perm=False, softplus=False, chunk_size=16, dtype=torch.float32,
                         device="cpu", noncontig=False, dlast=True, const_bc=False, **blocks):
    inp, order = make_inputs(batch, K, dim, L, N, G, D=D, z=z, bias=bias, init=init, perm=perm,
                             dtype=dtype, device=device, const_bc=const_bc)
    args = dict(inp)
    if noncontig:  # same values, transposed memory
        args = {k: (v.transpose(-1, -2).contiguous().transpose(-1, -2) if v is not None else v)
                for k, v in args.items()}
        assert not args["u"].is_contiguous()
    x = ScanInputs(**args, perm=order, delta_softplus=softplus, chunk_size=chunk_size)
    out, last, cstates, pregate = ts.selective_scan_fwd_triton(x, return_pregate=True, **blocks)

    leaves = {k: v.double().requires_grad_() for k, v in inp.items() if v is not None}
    full = {k: leaves.get(k) for k in inp}
    ref_out, ref_last, ref_cs = scan_oracle(**full, perm=order, delta_softplus=softplus,
                                            chunk_size=chunk_size)
    assert out.dtype == inp["u"].dtype and out.shape == inp["u"].shape
    assert_close("out", out, ref_out, dtype)
    assert_close("last_state", last, ref_last, dtype)
    assert_close("chunk_states", cstates, ref_cs, dtype)
    if z:  # the output before the gate, kept by the op for its backward
        with torch.no_grad():
            ref_pre, _ = scan_oracle(**{**full, "z": None}, perm=order, delta_softplus=softplus)
        assert_close("pregate", pregate, ref_pre, dtype)
    else:
        assert pregate.numel() == 0

    gen = torch.Generator().manual_seed(1)
    gout = torch.randn(out.shape, generator=gen).to(device=device, dtype=dtype)
    glast = torch.randn(last.shape, generator=gen).to(device) if dlast else None
    loss = (ref_out * gout.double()).sum()
    if dlast:
        loss = loss + (ref_last * glast.double()).sum()
    ref_grads = torch.autograd.grad(loss, list(leaves.values()))
    ref_grads = dict(zip(leaves, ref_grads))
    grads = ts.selective_scan_bwd_triton(x, gout, glast, cstates, **blocks)
    for name, g in zip(GRAD_NAMES, grads):
        if inp[name] is None:
            assert g is None, f"d{name} should be None when {name} is None"
            continue
        assert g.shape == inp[name].shape and g.dtype == inp[name].dtype, name
        assert_close(f"d{name}", g, ref_grads[name], dtype, grad=True)


# ------------------------------------------------------------------------------------------------
# Tiny shapes (Triton's interpreter on CPU, or the GPU)
# ------------------------------------------------------------------------------------------------

needs_kernels = pytest.mark.skipif(
    not INTERPRET and not CUDA,
    reason="no GPU, and triton was imported before TRITON_INTERPRET=1 could be set; run this "
           "file alone or export TRITON_INTERPRET=1 to test the kernels on CPU")

CASES = {
    # name: (batch, K, dim, L, N, G, options)
    "k1_plain": (1, 1, 4, 40, 4, 1, dict(chunk_size=16)),
    "k1_all_options": (2, 1, 8, 36, 4, 2, dict(D=True, z=True, bias=True, init=True,
                                                softplus=True, chunk_size=8)),
    "k1_no_dlast_chunk_not_pow2": (1, 1, 4, 30, 4, 1, dict(D=True, bias=True, softplus=True,
                                                           chunk_size=12, dlast=False)),
    "k1_nblocks_atomics": (1, 1, 4, 20, 8, 1, dict(z=True, D=True, chunk_size=8, block_n=4)),
    "k1_odd_state_split_groups": (1, 1, 8, 24, 5, 2, dict(init=True, chunk_size=16, block_d=2)),
    "k1_chunk_longer_than_L": (1, 1, 4, 10, 4, 1, dict(z=True, chunk_size=32)),
    "k4_perm_all_options": (1, 4, 4, 24, 4, 2, dict(D=True, z=True, bias=True, init=True,
                                                     perm=True, softplus=True, chunk_size=8,
                                                     noncontig=True)),
    "k4_perm_plain": (1, 4, 4, 20, 4, 1, dict(perm=True, chunk_size=16)),
    "k1_constant_bc": (2, 1, 4, 20, 4, 1, dict(const_bc=True, D=True, z=True, chunk_size=8)),
    "k2_constant_bc_nblocks": (1, 2, 4, 12, 8, 1, dict(const_bc=True, perm=True, chunk_size=8,
                                                        block_n=4)),
    "k2_tiny_edges": (1, 2, 3, 5, 1, 1, dict(chunk_size=1, init=True, D=True, perm=True)),
    "k2_fp64": (1, 2, 4, 20, 4, 2, dict(D=True, z=True, bias=True, init=True, perm=True,
                                         softplus=True, chunk_size=8, dtype=torch.float64)),
}


@needs_kernels
@pytest.mark.parametrize("case", list(CASES))
def test_matches_oracle_tiny(case):
    batch, K, dim, L, N, G, opts = CASES[case]
    check_against_oracle(batch, K, dim, L, N, G, device=DEVICE, **opts)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_tiny(dtype):
    check_against_oracle(1, 1, 4, 16, 4, 1, D=True, z=True, bias=True, softplus=True,
                         chunk_size=8, dtype=dtype, device=DEVICE)


@needs_kernels
def test_empty_sequence():
    inp, _ = make_inputs(1, 2, 4, 0, 4, 1, D=True, z=True, bias=False, init=True, perm=False,
                         dtype=torch.float32, device=DEVICE)
    x = ScanInputs(**inp, perm=None, delta_softplus=False, chunk_size=8)
    out, last, cs = ts.selective_scan_fwd_triton(x)
    assert out.shape == (1, 4, 0) and cs.shape == (1, 2, 4, 1, 4)
    torch.testing.assert_close(last, inp["initial_state"])
    dlast = torch.randn_like(last)
    grads = ts.selective_scan_bwd_triton(x, torch.zeros_like(out), dlast, cs)
    torch.testing.assert_close(grads[-1], dlast)  # the state passes through unchanged
    assert all(g.abs().sum() == 0 for g in grads[:-1] if g is not None)


@needs_kernels
def test_k_directions_equal_sum_of_single_scans():
    """The fused K-direction scan equals the sum of K single K=1 scans of permuted copies."""
    inp, order = make_inputs(1, 3, 4, 16, 4, 1, D=False, z=False, bias=True, init=False, perm=True,
                             dtype=torch.float32, device=DEVICE, seed=3)
    fused, _, _ = ts.selective_scan_fwd_triton(
        ScanInputs(**inp, perm=order, delta_softplus=True, chunk_size=8))
    total = torch.zeros_like(fused)
    for k in range(3):
        o = order[k]
        y, _, _ = ts.selective_scan_fwd_triton(ScanInputs(
            inp["u"][..., o], inp["delta"][:, k:k + 1, :, o], inp["A"][k:k + 1],
            inp["B"][:, k:k + 1, ..., o], inp["C"][:, k:k + 1, ..., o], None, None,
            inp["delta_bias"][k:k + 1], None, None, True, 8))
        total[..., o] += y
    torch.testing.assert_close(fused, total, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_matches_package_reference_k1():
    """Against the package's own reference (mamba-ssm semantics), when it exists."""
    inp, _ = make_inputs(2, 1, 4, 20, 4, 2, D=True, z=True, bias=True, init=False, perm=False,
                         dtype=torch.float32, device=DEVICE)
    out, last, _ = ts.selective_scan_fwd_triton(
        ScanInputs(**inp, perm=None, delta_softplus=True, chunk_size=8))
    want, want_last = selective_scan_ref(inp["u"], inp["delta"][:, 0], inp["A"][0], inp["B"][:, 0],
                          inp["C"][:, 0], inp["D"][0], inp["z"], inp["delta_bias"][0],
                          delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last[:, 0], want_last.float(), rtol=1e-4, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("bad, error, match", [
    (dict(u=torch.zeros(1, 4)), ValueError, "u must be"),
    (dict(u=torch.zeros(1, 4, 8, dtype=torch.int32)), TypeError, "u must be float"),
    (dict(delta=torch.zeros(1, 1, 4, 7)), ValueError, "delta must be"),
    (dict(B=torch.zeros(1, 1, 3, 4, 8), C=torch.zeros(1, 1, 3, 4, 8)), ValueError, "divisible"),
    (dict(C=torch.zeros(1, 4, 5)), ValueError, "C must be"),
    (dict(D=torch.zeros(4)), ValueError, "D must be"),
    (dict(perm=torch.zeros(1, 8)), ValueError, "perm must be"),
])
def test_bad_input_one_line_error(bad, error, match):
    inp, _ = make_inputs(1, 1, 4, 8, 4, 1, D=True, z=False, bias=False, init=False, perm=False,
                         dtype=torch.float32, device=DEVICE)
    inp.update({k: v.to(DEVICE) for k, v in bad.items()})
    perm = inp.pop("perm", None)
    with pytest.raises(error, match=match) as info:
        ts.selective_scan_fwd_triton(ScanInputs(**inp, perm=perm, chunk_size=4))
    assert "\n" not in str(info.value)


def test_mamba_cuda_anchor_reports_how_to_install():
    if mamba_cuda_available():
        pytest.skip("mamba-ssm CUDA kernels are importable here")
    x = torch.zeros(1, 2, 4)
    with pytest.raises(ImportError, match="pip install"):
        mamba_selective_scan_cuda(x, x, torch.zeros(2, 4), x, x)


@needs_kernels
def test_registered_triton_kernel_runs_the_op():
    """``scan_backend("triton")`` dispatches the op (forward and backward) to the launchers: the
    public wrapper then matches the package reference, values and gradients."""
    g = torch.Generator().manual_seed(2)
    u, delta = torch.randn(1, 4, 12, generator=g), torch.rand(1, 4, 12, generator=g)
    A = -torch.rand(4, 3, generator=g) - 0.5
    B, C = torch.randn(1, 2, 3, 12, generator=g), torch.randn(1, 2, 3, 12, generator=g)
    D, z = torch.randn(4, generator=g), torch.randn(1, 4, 12, generator=g)
    leaves = [t.to(DEVICE).requires_grad_() for t in (u, delta, A, B, C, D, z)]
    with scan_backend("triton"):
        out = selective_scan(*leaves, delta_softplus=True, chunk_size=4)
        got = torch.autograd.grad(out.sum(), leaves)
    want = selective_scan_ref(*leaves, delta_softplus=True)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    for name, a, b in zip("u delta A B C D z".split(), got, torch.autograd.grad(want.sum(), leaves)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3, msg=lambda m, n=name: f"d{n}: {m}")


def test_tile_choice():
    """Blocks never straddle a group, cover a chunk, and stay within the register budget."""
    for cpg, d_state, chunk_size in itertools.product([1, 3, 48, 384], [1, 5, 16, 256],
                                                      [1, 12, 64, 256, 1024]):
        for per_thread in (ts._FWD_ELEMS_PER_THREAD, ts._BWD_ELEMS_PER_THREAD):
            tiles = ts._pick_tiles(cpg, d_state, chunk_size, per_thread, None, None, None)
            bd, bn, bt, nw = tiles
            assert all(size & (size - 1) == 0 for size in tiles), tiles
            assert cpg % bd == 0 and bt >= chunk_size and bn <= ts._next_pow2(d_state), tiles
            assert bd * bn * bt <= max(per_thread * 32 * nw, 4 * bt), tiles


_COMPILE_SCRIPT = r"""
import sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mtssm._ops import triton_scan as ts


def build(kernel, ptr_type, constexprs):
    sig = {name: "constexpr" if name in constexprs else (ptr_type(name) if name.endswith("_ptr")
           else "i32") for name in kernel.arg_names}
    src = ASTSource(fn=kernel, signature=sig,
                    constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


def io(dtype):
    return lambda name: ("*i64" if name == "perm_ptr" else dtype if name in (
        "u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr", "y_ptr") else "*fp32")


tiles = dict(BLOCK_D=2, BLOCK_N=16, BLOCK_T=32)
fused_1d = dict(K=1, CDT=tl.float32, B_CONST=True, C_CONST=False, HAS_PERM=False,
                HAS_DBIAS=True, SOFTPLUS=True, HAS_Z=True, **tiles)
fused_4d = dict(K=4, CDT=tl.float32, B_CONST=False, C_CONST=False, HAS_PERM=True,
                HAS_DBIAS=True, SOFTPLUS=True, HAS_Z=True, **tiles)
build(ts._scan_fwd_kernel, io("*bf16"), dict(fused_1d, HAS_INIT=False, FUSED_EPILOGUE=True,
                                              HAS_D=True, STORE_PREGATE=True))
build(ts._scan_fwd_kernel, io("*fp64"), dict(fused_4d, CDT=tl.float64, HAS_INIT=True,
                                              FUSED_EPILOGUE=False, HAS_D=False,
                                              STORE_PREGATE=False))
build(ts._scan_bwd_kernel, io("*bf16"), dict(fused_1d, HAS_DLAST=False, ATOMIC_ROW=False,
                                              ATOMIC_DELTA=False))
build(ts._scan_bwd_kernel, io("*fp16"), dict(fused_4d, HAS_DLAST=True, ATOMIC_ROW=True,
                                              ATOMIC_DELTA=True))
print("compiled")
"""


def test_kernels_compile_for_h100():
    """The kernels lower to sm_90 machine code (Triton's bundled ptxas; no GPU needed), for a
    fused 1-D and a K-direction variant of each: catches what the interpreter does not check."""
    import pathlib
    import subprocess
    import sys

    ptxas = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("triton's bundled ptxas is not there")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(pathlib.Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]


# ------------------------------------------------------------------------------------------------
# GPU tests (realistic sizes)
# ------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (without TRITON_INTERPRET)")


@needs_cuda
@pytest.mark.parametrize("K, perm", [(1, False), (4, True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_matches_oracle_cuda(K, perm, dtype):
    check_against_oracle(2, K, 64, 256, 16, 2, D=True, z=True, bias=True, init=True, perm=perm,
                         softplus=True, chunk_size=64, dtype=dtype, device="cuda")


@needs_cuda
def test_large_state_cuda():
    check_against_oracle(1, 1, 32, 128, 128, 1, D=True, bias=True, softplus=True, chunk_size=64,
                         device="cuda")


@needs_cuda
@pytest.mark.skipif(not mamba_cuda_available(), reason="mamba-ssm CUDA kernels not importable")
def test_matches_mamba_ssm_cuda():
    inp, _ = make_inputs(2, 1, 128, 1024, 16, 1, D=True, z=True, bias=True, init=False, perm=False,
                         dtype=torch.bfloat16, device="cuda")
    out, last, _ = ts.selective_scan_fwd_triton(
        ScanInputs(**inp, perm=None, delta_softplus=True, chunk_size=64))
    want, want_last = mamba_selective_scan_cuda(
        inp["u"], inp["delta"][:, 0], inp["A"][0], inp["B"][:, 0], inp["C"][:, 0], inp["D"][0],
        inp["z"], inp["delta_bias"][0].float(), delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(out.float(), want.float(), rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(last[:, 0], want_last.float(), rtol=3e-2, atol=3e-2)

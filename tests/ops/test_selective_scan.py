"""mtssm::selective_scan against the package reference, mamba-ssm's reference and gradcheck."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mtssm
from mtssm._ops.selective_scan import selective_scan_2d_ref, selective_scan_ref
from mtssm.nn.functional import selective_scan, selective_scan_2d
from tests.ops.scan_cases import ScanCase, assert_close

ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def run_op(case_inputs, softplus, chunk_size=5, return_last_state=True):
    t = case_inputs
    return selective_scan(
        t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], softplus,
        return_last_state, t["initial_state"], chunk_size=chunk_size,
    )


def compare_with_reference(case: ScanCase, chunk_size: int) -> None:
    inputs = case.inputs()
    out, last = run_op(inputs, case.softplus, chunk_size)
    ref_out, ref_last = selective_scan_ref(
        *(inputs[k] for k in ARGS), case.softplus, True, inputs["initial_state"]
    )
    assert out.dtype == inputs["u"].dtype and out.shape == inputs["u"].shape
    assert last.shape == (case.batch, case.dim, case.N)
    assert_close(out, ref_out, case.dtype, "out")
    assert_close(last, ref_last, case.dtype, "last_state")
    w, wl = torch.randn_like(out, dtype=torch.float32), torch.randn_like(last)
    present = {k: v for k, v in inputs.items() if v is not None}
    loss = (out.float() * w).sum() + (last * wl).sum()
    ref_loss = (ref_out.float() * w).sum() + (ref_last * wl).sum()
    got = torch.autograd.grad(loss, list(present.values()))
    want = torch.autograd.grad(ref_loss, list(present.values()))
    for name, g, r in zip(present, got, want):
        assert g.shape == present[name].shape and g.dtype == present[name].dtype, name
        assert_close(g, r, case.dtype, f"grad {name}", grad=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"variable_B": False, "variable_C": False},
        {"variable_B": False},
        {"has_D": False, "has_z": False, "has_bias": False, "softplus": False},
        {"has_init": True},
        {"groups": 1, "L": 1},
        {"groups": 3, "dim": 9, "L": 64},
        # The C++ kernel has two layouts: channels as vector lanes for variable B, C and N <= 16
        # (lane groups of 8 inside each B/C group, the last one partial) and state-size vectors.
        {"groups": 1, "dim": 19, "L": 40},
        {"groups": 2, "dim": 22, "N": 16},
        {"groups": 2, "dim": 12, "N": 17},
    ],
    ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) or "default",
)
def test_matches_package_reference(scan_backend, dtype, variant):
    case = ScanCase(dtype=dtype, **variant)
    compare_with_reference(case, chunk_size=5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.integers(1, 2),
    dim_per_group=st.integers(1, 5),
    groups=st.integers(1, 3),
    L=st.integers(1, 48),
    N=st.integers(1, 8),
    flags=st.tuples(*(st.booleans() for _ in range(6))),
    chunk=st.integers(1, 20),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)
def test_matches_mamba_ssm_reference(mamba_ref, scan_backend, batch, dim_per_group, groups, L, N,
                                     flags, chunk, seed, dtype):
    """Values and gradients of every input equal mamba-ssm's own selective_scan_ref. Its reference
    computes in fp32 whatever the input dtype, so fp64 is compared at fp32 tolerance."""
    tol = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    has_D, has_z, has_bias, softplus, variable, last = flags
    case = ScanCase(batch=batch, dim=dim_per_group * groups, groups=groups, L=L, N=N,
                    has_D=has_D, has_z=has_z, has_bias=has_bias, softplus=softplus,
                    variable_B=variable, variable_C=variable, dtype=dtype, seed=seed)
    inputs = case.inputs()
    args = [inputs[k] for k in ARGS]
    ours = selective_scan(*args, softplus, last, chunk_size=chunk)
    # mamba-ssm's reference cannot mix fp64 A with its fp32 compute: hand it fp32 views (the
    # gradients still reach the fp64 leaves).
    their_args = [a.float() if a is not None and dtype == torch.float64 else a for a in args]
    theirs = mamba_ref(*their_args, delta_softplus=softplus, return_last_state=last)
    ours, theirs = (ours if last else (ours,)), (theirs if last else (theirs,))
    w = [torch.randn_like(t, dtype=torch.float32) for t in theirs]
    for o, t, name in zip(ours, theirs, ("out", "last_state")):
        assert_close(o.float(), t.float(), tol, name)
    present = {k: v for k, v in inputs.items() if v is not None}
    got = torch.autograd.grad((ours[0].float() * w[0]).sum(), list(present.values()))
    want = torch.autograd.grad((theirs[0].float() * w[0]).sum(), list(present.values()))
    for name, g, r in zip(present, got, want):
        assert_close(g.float(), r.float(), tol, f"grad {name}", grad=True)


@pytest.mark.parametrize("variant", [{}, {"variable_B": False, "variable_C": False, "has_init": True},
                                     {"softplus": False, "has_z": False, "groups": 1}])
def test_gradcheck_fp64(scan_backend, variant):
    case = ScanCase(batch=1, dim=4, L=7, N=3, **variant)
    inputs = case.inputs()
    names = [k for k, v in inputs.items() if v is not None]

    def fn(*xs):
        t = dict(inputs, **dict(zip(names, xs)))
        out, last = run_op(t, case.softplus, chunk_size=3)
        return out, last

    assert torch.autograd.gradcheck(fn, [inputs[k] for k in names])


def test_gradcheck_2d_fp64(scan_backend):
    b, d, H, W, N, K = 1, 2, 3, 4, 3, 4
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, d, H, W, generator=g, dtype=torch.float64)
    delta = torch.randn(b, K, d, H * W, generator=g, dtype=torch.float64) * 0.5
    A = -(torch.rand(K * d, N, generator=g, dtype=torch.float64) + 0.5)
    B, C = (torch.randn(b, K, N, H * W, generator=g, dtype=torch.float64) for _ in range(2))
    D, bias = torch.randn(K * d, dtype=torch.float64), torch.randn(K * d, dtype=torch.float64)
    xs = [t.requires_grad_() for t in (x, delta, A, B, C, D, bias)]
    assert torch.autograd.gradcheck(
        lambda *a: selective_scan_2d(*a, order="ss2d", chunk_size=5), xs
    )


@pytest.mark.parametrize("order", ["ss2d", "hilbert"])
def test_2d_matches_reference(scan_backend, order):
    from mtssm.nn.functional import scan_order

    b, d, H, W, N = 2, 5, 5, 7, 4
    perm = scan_order(order, H, W)
    K = perm.shape[0]
    x = torch.randn(b, d, H, W, dtype=torch.float64)
    delta = torch.randn(b, K, d, H * W, dtype=torch.float64) * 0.5
    A = -(torch.rand(K * d, N, dtype=torch.float64) + 0.3)
    B, C = torch.randn(b, K, N, H * W, dtype=torch.float64), torch.randn(b, K, N, H * W, dtype=torch.float64)
    D, bias = torch.randn(K * d, dtype=torch.float64), torch.randn(K * d, dtype=torch.float64)
    xs = [t.requires_grad_() for t in (x, delta, A, B, C, D, bias)]
    y = selective_scan_2d(*xs, order=order, chunk_size=6)
    r = selective_scan_2d_ref(*xs, perm=perm)
    assert_close(y, r, torch.float64, "y")
    w = torch.randn_like(y)
    for name, g1, g2 in zip("x delta A B C D bias".split(), torch.autograd.grad((y * w).sum(), xs),
                            torch.autograd.grad((r * w).sum(), xs)):
        assert_close(g1, g2, torch.float64, f"grad {name}", grad=True)


def test_cross_scan_is_the_plain_op(scan_backend):
    """S-CTM's cross SSM (u from one source, delta/B/C from another) is the plain 2-D op: the
    gradient w.r.t. the task input flows only through u, the shared input only through delta/B/C."""
    b, d, H, W, N, K = 1, 3, 4, 4, 2, 4
    task = torch.randn(b, d, H, W, dtype=torch.float64, requires_grad=True)
    shared = torch.randn(b, d, H, W, dtype=torch.float64, requires_grad=True)
    proj = torch.randn(K, d + 2 * N, d, dtype=torch.float64)
    dbc = torch.einsum("bcl,kjc->bkjl", shared.flatten(2), proj)
    delta = dbc[:, :, :d]
    B, C = dbc[:, :, d : d + N], dbc[:, :, d + N :]
    A = -torch.ones(K * d, N, dtype=torch.float64)
    y = selective_scan_2d(task, delta, A, B, C)
    ref = selective_scan_2d_ref(task, delta, A, B, C, perm=mtssm.nn.functional.ss2d_orders(H, W))
    assert_close(y, ref, torch.float64, "cross scan")
    g_task, g_shared = torch.autograd.grad(y.sum(), [task, shared])
    assert g_task.abs().sum() > 0 and g_shared.abs().sum() > 0
    # Linear in the task input once the shared input is fixed.
    y2 = selective_scan_2d(2 * task, delta, A, B, C)
    assert_close(y2, 2 * y, torch.float64, "linearity in u")


def test_last_state_gradient_flows(scan_backend):
    case = ScanCase(has_z=False)
    inputs = case.inputs()
    _, last = run_op(inputs, case.softplus)
    (g,) = torch.autograd.grad(last.sum(), [inputs["B"]])
    assert g.abs().sum() > 0


def test_fp64_is_computed_in_fp64(scan_backend):
    case = ScanCase(dtype=torch.float64)
    out, last = run_op(case.inputs(), True)
    assert out.dtype == torch.float64 and last.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_fp32(scan_backend, dtype):
    case = ScanCase(dtype=dtype, L=64)
    inputs = case.inputs()
    out, last = run_op(inputs, True)
    ref = selective_scan_ref(*(inputs[k] for k in ARGS), True)
    assert out.dtype == dtype and last.dtype == torch.float32
    assert_close(out.float(), ref.float(), torch.bfloat16, "out")


def test_opcheck(scan_backend):
    case = ScanCase(has_init=True)
    t = case.inputs()
    args = (t["u"], t["delta"].unsqueeze(1), t["A"].unsqueeze(0), t["B"].unsqueeze(1),
            t["C"].unsqueeze(1), t["D"].unsqueeze(0), t["z"], t["delta_bias"].unsqueeze(0),
            t["initial_state"].unsqueeze(1), None, True, 4)
    torch.library.opcheck(torch.ops.mtssm.selective_scan.default, args)
    perm = torch.stack([torch.randperm(case.L) for _ in range(3)])
    args2d = (t["u"], t["delta"].unsqueeze(1).expand(-1, 3, -1, -1).contiguous(),
              t["A"].unsqueeze(0).expand(3, -1, -1).contiguous(),
              t["B"][:, :1].unsqueeze(1).expand(-1, 3, -1, -1, -1).contiguous(),
              t["C"][:, :1].unsqueeze(1).expand(-1, 3, -1, -1, -1).contiguous(),
              None, None, None, None, perm, True, 4)
    torch.library.opcheck(torch.ops.mtssm.selective_scan.default, args2d)


# --------------------------------------------------------------------------------------------
# Bad input: one line naming the argument and the expected shape.
# --------------------------------------------------------------------------------------------


def _good():
    t = ScanCase(has_init=True).inputs()
    return {k: v.detach() for k, v in t.items()}


@pytest.mark.parametrize(
    "mutate, exc, pattern",
    [
        (lambda t: t.update(u=t["u"][0]), ValueError, r"u must be \(batch, dim, L\)"),
        (lambda t: t.update(delta=t["delta"][..., :-1]), ValueError, r"delta must be \(batch, dim, L\)"),
        (lambda t: t.update(A=t["A"][:-1]), ValueError, r"A must be \(dim, N\) with dim=6"),
        (lambda t: t.update(B=t["B"][..., :-1]), ValueError, r"B must be \(batch, G, N, L\)"),
        (lambda t: t.update(C=torch.randn(2, 4, 4, 17, dtype=torch.float64)), ValueError,
         r"dim=6 must be divisible by the groups G=4 of C"),
        (lambda t: t.update(D=t["D"][:-1]), ValueError, r"D must be \(dim,\)"),
        (lambda t: t.update(z=t["z"][:1]), ValueError, r"z must be"),
        (lambda t: t.update(initial_state=t["initial_state"][..., :-1]), ValueError,
         r"initial_state must be \(batch, dim, N\)"),
        (lambda t: t.update(u=t["u"].long()), TypeError, r"u must be a floating-point tensor"),
        (lambda t: t.update(B=torch.randn(5, dtype=torch.float64)), ValueError, r"B must be \(dim, N\)"),
    ],
)
def test_bad_input_messages(mutate, exc, pattern):
    t = _good()
    mutate(t)
    with pytest.raises(exc, match=pattern) as info:
        selective_scan(*(t[k] for k in ARGS), True, False, t["initial_state"])
    assert "\n" not in str(info.value)


def test_bad_2d_input_messages():
    x = torch.randn(1, 3, 4, 5)
    delta = torch.randn(1, 4, 3, 20)
    A, B, C = torch.randn(12, 2), torch.randn(1, 4, 2, 20), torch.randn(1, 4, 2, 20)
    with pytest.raises(ValueError, match=r"delta must be \(batch, K, dim, H\*W\) = \(1, 4, 3, 20\)"):
        selective_scan_2d(x, delta[..., :-1], A, B, C)
    with pytest.raises(ValueError, match=r"B must be \(batch, K, N, H\*W\)"):
        selective_scan_2d(x, delta, A, B[:, :2], C)
    with pytest.raises(ValueError, match=r"unknown scan order 'zigzag'"):
        selective_scan_2d(x, delta, A, B, C, order="zigzag")
    with pytest.raises(ValueError, match=r"order must be an int64 tensor \(K, H\*W\)"):
        selective_scan_2d(x, delta, A, B, C, order=torch.zeros(4, 19, dtype=torch.long))


def test_unknown_backend_message():
    with pytest.raises(ValueError, match="unknown 'cuda-magic'"):
        with mtssm.scan_backend("cuda-magic"):
            pass


def test_torch_and_cpp_agree_exactly_enough():
    """The two CPU implementations give the same forward and backward in fp64."""
    if mtssm._ops.selective_scan.LIBRARY_PATH is None:
        pytest.skip("the C++ op library is not available")
    case = ScanCase(has_init=True, L=40)
    results = []
    for backend in ("cpp", "torch"):
        with mtssm.scan_backend(backend):
            inputs = case.inputs()
            out, last = run_op(inputs, True, chunk_size=7)
            present = [v for v in inputs.values() if v is not None]
            results.append((out, last, *torch.autograd.grad(out.sum() + last.sum(), present)))
    for a, b in zip(*results):
        assert_close(a, b, torch.float64, "cpp vs torch")

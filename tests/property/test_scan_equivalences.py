"""Invariants of the scan ops across chunkings, splits, orders and scales (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtssm.nn.functional import (
    scan_order,
    selective_scan,
    selective_scan_2d,
    ss2d_orders,
    window_tokenize,
    window_untokenize,
)
from tests.ops.scan_cases import ScanCase, assert_close

SETTINGS = settings(max_examples=20, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
F64 = torch.float64


def _scan(t, **kw):
    return selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"],
                          t["delta_bias"], True, True, t["initial_state"], **kw)


@SETTINGS
@given(L=st.integers(1, 40), chunk=st.integers(1, 45), seed=st.integers(0, 999))
def test_chunked_equals_sequential(scan_backend, L, chunk, seed):
    """Any chunk size gives the result of one chunk spanning the sequence (values and grads)."""
    t = ScanCase(L=L, has_init=True, seed=seed).inputs()
    leaves = [v for v in t.values() if v is not None]
    a_out, a_last = _scan(t, chunk_size=chunk)
    b_out, b_last = _scan(t, chunk_size=L)
    assert_close(a_out, b_out, F64, "out")
    assert_close(a_last, b_last, F64, "last")
    ga = torch.autograd.grad(a_out.sum() + a_last.sum(), leaves)
    gb = torch.autograd.grad(b_out.sum() + b_last.sum(), leaves)
    for x, y in zip(ga, gb):
        assert_close(x, y, F64, "grad", grad=True)


@SETTINGS
@given(L=st.integers(2, 40), cut=st.floats(0.05, 0.95), seed=st.integers(0, 999))
def test_split_scan_continues_from_last_state(scan_backend, L, cut, seed):
    """Scanning [x1, x2] equals scanning x1, then x2 from x1's last state (values and grads)."""
    k = min(L - 1, max(1, int(L * cut)))
    t = ScanCase(L=L, seed=seed).inputs()
    leaves = [v for v in t.values() if v is not None]
    full, full_last = _scan(t)

    def part(sl, init):
        p = {name: (v[..., sl] if v is not None and v.dim() >= 3 and v.shape[-1] == L else v)
             for name, v in t.items()}
        p["initial_state"] = init
        return _scan(p)

    first, mid = part(slice(0, k), None)
    second, last = part(slice(k, L), mid)
    assert_close(torch.cat([first, second], -1), full, F64, "out")
    assert_close(last, full_last, F64, "last")
    w = torch.randn_like(full)
    g_full = torch.autograd.grad((full * w).sum() + full_last.sum(), leaves)
    g_split = torch.autograd.grad(
        (torch.cat([first, second], -1) * w).sum() + last.sum(), leaves
    )
    for x, y in zip(g_split, g_full):
        assert_close(x, y, F64, "grad", grad=True)


def _map_inputs(b, d, H, W, N, K, seed):
    g = torch.Generator().manual_seed(seed)
    L = H * W
    x = torch.randn(b, d, H, W, generator=g, dtype=F64)
    delta = torch.randn(b, K, d, L, generator=g, dtype=F64) * 0.5
    A = -(torch.rand(K * d, N, generator=g, dtype=F64) + 0.3)
    B = torch.randn(b, K, N, L, generator=g, dtype=F64)
    C = torch.randn(b, K, N, L, generator=g, dtype=F64)
    D = torch.randn(K * d, generator=g, dtype=F64)
    bias = torch.randn(K * d, generator=g, dtype=F64)
    return x, delta, A, B, C, D, bias


dims = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 6), st.integers(1, 6),
                 st.integers(1, 4), st.integers(0, 999))


@SETTINGS
@given(dims=dims, chunk=st.integers(1, 40))
def test_reversed_order_is_flip_scan_flip(scan_backend, dims, chunk):
    b, d, H, W, N, seed = dims
    leaves = tuple(t.requires_grad_() for t in _map_inputs(b, d, H, W, N, 1, seed))
    x, delta, A, B, C, D, bias = leaves
    L = H * W
    rev = torch.arange(L - 1, -1, -1).unsqueeze(0)
    y = selective_scan_2d(x, delta, A, B, C, D, bias, order=rev, chunk_size=chunk)
    seq = selective_scan(
        x.flatten(2).flip(-1), delta[:, 0].flip(-1), A, B.flip(-1), C.flip(-1), D, None, bias, True,
        chunk_size=chunk,
    ).flip(-1)
    assert_close(y.flatten(2), seq, F64, "reverse")
    w = torch.randn_like(seq)
    for got, want, name in zip(torch.autograd.grad((y.flatten(2) * w).sum(), leaves),
                               torch.autograd.grad((seq * w).sum(), leaves), "x delta A B C D bias".split()):
        assert_close(got, want, F64, f"reverse grad {name}", grad=True)


@SETTINGS
@given(dims=dims)
def test_column_major_is_scan_of_transposed_map(scan_backend, dims):
    b, d, H, W, N, seed = dims
    x, delta, A, B, C, D, bias = _map_inputs(b, d, H, W, N, 1, seed)
    col = ss2d_orders(H, W)[1:2]
    y = selective_scan_2d(x, delta, A, B, C, D, bias, order=col)

    def t(m):  # (..., H*W) row-major -> (..., W*H) row-major of the transposed map
        return m.unflatten(-1, (H, W)).transpose(-1, -2).flatten(-2)

    y_t = selective_scan_2d(x.transpose(-1, -2), t(delta), A, t(B), t(C), D, bias,
                            order=torch.arange(H * W).unsqueeze(0))
    assert_close(y, y_t.transpose(-1, -2), F64, "column-major")


@SETTINGS
@given(dims=dims, name=st.sampled_from(["ss2d", "hilbert"]))
def test_fused_equals_sum_of_single_scans(scan_backend, dims, name):
    b, d, H, W, N, seed = dims
    perm = scan_order(name, H, W)
    K = perm.shape[0]
    x, delta, A, B, C, D, bias = _map_inputs(b, d, H, W, N, K, seed)
    fused = selective_scan_2d(x, delta, A, B, C, D, bias, order=perm)
    total = torch.zeros_like(fused)
    for k in range(K):
        sl = slice(k * d, (k + 1) * d)
        total += selective_scan_2d(x, delta[:, k : k + 1], A[sl], B[:, k : k + 1], C[:, k : k + 1],
                                   D[sl], bias[sl], order=perm[k : k + 1])
    assert_close(fused, total, F64, "fused vs singles")


@SETTINGS
@given(dims=dims, scale=st.floats(-3, 3))
def test_linear_in_u_when_delta_B_C_fixed(scan_backend, dims, scale):
    b, d, H, W, N, seed = dims
    x, delta, A, B, C, D, bias = _map_inputs(b, d, H, W, N, 4, seed)
    x2 = torch.randn_like(x)
    y = lambda inp: selective_scan_2d(inp, delta, A, B, C, D, bias)  # noqa: E731
    assert_close(y(x + scale * x2), y(x) + scale * y(x2), F64, "linearity")


@SETTINGS
@given(dims=dims)
def test_scale_one_tokenisation_is_the_plain_scan(scan_backend, dims):
    """W_1 is the identity, so a multi-scale scan with scales {1} is the plain 2-D scan."""
    b, d, H, W, N, seed = dims
    x, delta, A, B, C, D, bias = _map_inputs(b, d, H, W, N, 4, seed)
    tok = window_tokenize(x, 1)
    y = window_untokenize(selective_scan_2d(tok, delta, A, B, C, D, bias), 1, H, W)
    assert_close(y, selective_scan_2d(x, delta, A, B, C, D, bias), F64, "scale 1")


@pytest.mark.parametrize("s", [2, 3])
def test_window_scan_sees_each_patch_as_one_token(scan_backend, s):
    """After W_s the map has ceil(H/s) x ceil(W/s) tokens of C*s*s channels; the scan runs there
    and W_s^-1 brings the result back to (H, W)."""
    b, d, H, W, N = 1, 2, 5, 7, 3
    x = torch.randn(b, d, H, W, dtype=F64)
    tok = window_tokenize(x, s)
    h, w = tok.shape[-2:]
    assert (h, w) == (-(-H // s), -(-W // s)) and tok.shape[1] == d * s * s
    _, delta, A, B, C, D, bias = _map_inputs(b, d * s * s, h, w, N, 4, 0)
    y = window_untokenize(selective_scan_2d(tok, delta, A, B, C, D, bias), s, H, W)
    assert y.shape == x.shape and torch.isfinite(y).all()

"""SS2D and CrossSS2D against a VMamba-style oracle (flipped / transposed copies, 1-D reference scan)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mtssm._ops.selective_scan import selective_scan_ref
from mtssm.nn import functional as MF
from mtssm.nn.ss2d import SS2D, CrossSS2D, DirectionalScan, mamba_init_

# (forward atol, rtol), (gradient atol, rtol)
TOL = {
    torch.float32: ((2e-5, 1e-4), (1e-4, 1e-3)),
    torch.float64: ((1e-10, 1e-9), (1e-9, 1e-8)),
}


def _vmamba_core(m: SS2D, u: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """VMamba's ``forward_corev0``: four copies (row-major, column-major, both reversed) scanned
    as one 1-D grouped scan with the reference, then flipped / transposed back and summed.

    u, src: (B, D, H, W) -> (B, H, W, D) after out_norm.
    """
    b, d, h, w = u.shape
    L = h * w

    def copies(t: torch.Tensor) -> torch.Tensor:
        hwwh = torch.stack([t.reshape(b, d, L), t.transpose(2, 3).reshape(b, d, L)], dim=1)
        return torch.cat([hwwh, hwwh.flip(-1)], dim=1)  # (B, 4, D, L)

    xs, srcs = copies(u), copies(src)
    x_dbl = torch.einsum("bkdl,kcd->bkcl", srcs, m.x_proj_weight)
    dts, bs, cs = torch.split(x_dbl, [m.dt_rank, m.d_state, m.d_state], dim=2)
    dts = torch.einsum("bkrl,kdr->bkdl", dts, m.dt_projs_weight)
    y = selective_scan_ref(
        xs.reshape(b, -1, L),
        dts.reshape(b, -1, L),
        -torch.exp(m.A_logs.to(u.dtype)),
        bs,
        cs,
        m.Ds.to(u.dtype),
        delta_bias=m.dt_projs_bias,
        delta_softplus=True,
    ).reshape(b, 4, d, L)
    inv = y[:, 2:4].flip(-1)
    wh = y[:, 1].reshape(b, d, w, h).transpose(2, 3).reshape(b, d, L)
    invwh = inv[:, 1].reshape(b, d, w, h).transpose(2, 3).reshape(b, d, L)
    out = (y[:, 0] + inv[:, 0] + wh + invwh).reshape(b, d, h, w)
    return m.out_norm(out.permute(0, 2, 3, 1))


def _oracle(m: SS2D, x: torch.Tensor, shared: torch.Tensor | None = None) -> torch.Tensor:
    """The module's forward with the VMamba-style core."""
    if m.gated:
        u, z = m.in_proj(x).chunk(2, dim=-1)
    else:
        u, z = m.in_proj(x), None
    u = m.act(m.conv2d(u.permute(0, 3, 1, 2)))
    src = u if shared is None else m.in_proj_cross(shared).permute(0, 3, 1, 2)
    y = _vmamba_core(m, u, src)
    return m.out_proj(y * F.silu(z)) if m.gated else y


def _compare(m, inputs, dtype):
    (fa, fr), (ga, gr) = TOL[dtype]
    out = m(*inputs)
    ref = _oracle(m, *inputs)
    torch.testing.assert_close(out, ref, atol=fa, rtol=fr)
    g = torch.randn_like(out)
    params = [p for p in m.parameters()]
    grads = torch.autograd.grad(out, [*inputs, *params], g)
    ref_grads = torch.autograd.grad(ref, [*inputs, *params], g)
    names = [f"input{i}" for i in range(len(inputs))] + [n for n, _ in m.named_parameters()]
    for name, a, b in zip(names, grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=ga, rtol=gr, msg=lambda s, name=name: f"grad of {name}: {s}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("hw", [(5, 7), (4, 4)])
def test_ss2d_matches_vmamba_oracle(dtype, gated, hw):
    torch.manual_seed(0)
    m = SS2D(12, d_state=4, gated=gated, in_dim=20 if not gated else None, dtype=dtype)
    x = torch.randn(2, *hw, m.in_dim, dtype=dtype, requires_grad=True)
    _compare(m, (x,), dtype)
    assert m(x).shape == (2, *hw, 12 if gated else m.d_inner)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_ss2d_matches_oracle(dtype):
    torch.manual_seed(1)
    m = CrossSS2D(8, d_state=4, cross_dim=6, dtype=dtype)
    x = torch.randn(2, 3, 5, 8, dtype=dtype, requires_grad=True)
    shared = torch.randn(2, 3, 5, 6, dtype=dtype, requires_grad=True)
    _compare(m, (x, shared), dtype)


def test_cross_ss2d_selection_comes_from_shared():
    """Changing the shared feature changes the output; delta/B/C never read the task's u."""
    torch.manual_seed(2)
    m = CrossSS2D(8, d_state=4)
    x = torch.randn(1, 4, 4, 8)
    s1, s2 = torch.randn(2, 1, 4, 4, 8)
    assert not torch.allclose(m(x, s1), m(x, s2))
    with torch.no_grad():
        m.in_proj_cross.weight.zero_()  # delta = softplus(dt_bias), B = C = 0 -> only the D skip
    u = m.act(m.conv2d(m.in_proj(x).chunk(2, dim=-1)[0].permute(0, 3, 1, 2)))
    y = m.out_norm((u * m.Ds.view(4, -1).sum(0)[:, None, None]).permute(0, 2, 3, 1))
    z = m.in_proj(x).chunk(2, dim=-1)[1]
    torch.testing.assert_close(m(x, s1), m.out_proj(y * F.silu(z)), atol=1e-5, rtol=1e-4)


def test_ss2d_initialisation():
    torch.manual_seed(3)
    c, n = 40, 16
    m = SS2D(c, d_state=n, dt_min=1e-3, dt_max=0.1, dt_init_floor=1e-4)
    d, r, k = 2 * c, math.ceil(c / 16), 4
    assert (m.d_inner, m.dt_rank, m.K) == (d, r, k)
    assert m.in_proj.weight.shape == (2 * d, c) and m.in_proj.bias is None
    assert m.conv2d.weight.shape == (d, 1, 3, 3) and m.conv2d.bias is not None
    assert m.x_proj_weight.shape == (k, r + 2 * n, d)
    assert m.dt_projs_weight.shape == (k, d, r) and m.dt_projs_bias.shape == (k * d,)
    assert m.dt_projs_weight.abs().max() <= r**-0.5
    dt = F.softplus(m.dt_projs_bias)
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    # log-uniform: the median step is near the geometric mean of the range
    assert abs(dt.log().median().item() - 0.5 * (math.log(1e-3) + math.log(0.1))) < 0.5
    torch.testing.assert_close(m.A_logs, torch.log(torch.arange(1, n + 1.0)).expand(k * d, n))
    torch.testing.assert_close(m.Ds, torch.ones(k * d))
    assert m.out_proj.weight.shape == (c, d)
    assert SS2D(c, gated=False).out_proj is None


def test_ss2d_dt_floor_applies():
    m = SS2D(8, dt_min=1e-6, dt_max=2e-6, dt_init_floor=1e-4)
    torch.testing.assert_close(F.softplus(m.dt_projs_bias), torch.full((64,), 1e-4), rtol=1e-4, atol=0)


def test_ss2d_order_tensor_equals_named_order():
    torch.manual_seed(4)
    h, w = 4, 6
    named = SS2D(8, d_state=4, order="ss2d")
    table = SS2D(8, d_state=4, order=MF.scan_order("ss2d", h, w))
    table.load_state_dict(named.state_dict())
    x = torch.randn(2, h, w, 8)
    torch.testing.assert_close(table(x), named(x))
    hil = SS2D(8, d_state=4, order="hilbert")
    hil.load_state_dict(named.state_dict())
    assert not torch.allclose(hil(x), named(x))  # a different visit order is a different model


def test_ss2d_meta_device_and_parameter_count():
    c, n = 96, 16
    m = SS2D(c, d_state=n, device="meta")
    assert all(p.is_meta for p in m.parameters())
    d, r, k = 2 * c, math.ceil(c / 16), 4
    expected = c * 2 * d + d * 9 + d + k * (r + 2 * n) * d + k * d * r + k * d + k * d * n + k * d + 2 * d + d * c
    assert sum(p.numel() for p in m.parameters()) == expected


@pytest.mark.parametrize(
    ("make", "call", "match"),
    [
        (lambda: SS2D(8), lambda m: m(torch.randn(1, 4, 4, 6)), r"SS2D expects x channels-last \(B, H, W, 8\)"),
        (lambda: CrossSS2D(8), lambda m: m(torch.randn(1, 4, 4, 8), torch.randn(1, 4, 5, 8)), "same"),
        (lambda: SS2D(8, order="zigzag"), None, "unknown scan order 'zigzag'"),
        (lambda: SS2D(8, dt_rank=0), None, "dt_rank"),
        (lambda: SS2D(8, d_conv=4), None, "d_conv"),
        (lambda: CrossSS2D(8, gated=False), None, "always gated"),
        (lambda: SS2D(8), lambda m: m(torch.randn(1, 4, 4, 8), torch.randn(1, 4, 4, 8)), "exactly when built with cross_dim"),
        (lambda: CrossSS2D(8), lambda m: m(torch.randn(1, 4, 4, 8)), "exactly when built with cross_dim"),
        (lambda: SS2D(8, dt_min=0.2, dt_max=0.1), None, "dt_min <= dt_max"),
    ],
)
def test_ss2d_errors_are_one_line(make, call, match):
    with pytest.raises(ValueError, match=match) as info:
        m = make()
        call(m)
    assert "\n" not in str(info.value)


def test_mamba_init_any_leading_shape():
    """One initialisation for SS2D's stacked (K, D, R) projections and PAMM's per-task (D, R) ones."""
    torch.manual_seed(5)
    for w_shape, b_shape, a_shape in (((4, 6, 3), (24,), (24, 5)), ((6, 3), (6,), (6, 5))):
        w, b, a, d = torch.empty(w_shape), torch.empty(b_shape), torch.empty(a_shape), torch.empty(a_shape[0])
        mamba_init_(w, b, a, d, dt_min=1e-3, dt_max=0.1, dt_init_floor=1e-4)
        assert w.abs().max() <= 3**-0.5
        dt = F.softplus(b)
        assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
        torch.testing.assert_close(a, torch.log(torch.arange(1, 6.0)).expand(a_shape))
        torch.testing.assert_close(d, torch.ones(a_shape[0]))
    with pytest.raises(ValueError, match="dt_min <= dt_max"):
        mamba_init_(w, b, a, d, dt_min=0.0)


@pytest.mark.parametrize("cross", [False, True])
def test_ss2d_with_directional_scan_core_is_ss2d(cross):
    """The plain scan as a pluggable core (``scan_layer=DirectionalScan``) computes SS2D's default scan."""
    kw = {"d_state": 4, "cross_dim": 8 if cross else None}
    torch.manual_seed(6)
    ref = SS2D(8, **kw)
    m = SS2D(8, scan_layer=DirectionalScan, **kw)
    assert m.scan_core_name == "scan" and isinstance(m.scan_core, DirectionalScan)
    assert m.scan_core.K == ref.K == 4
    ref_state = ref.state_dict()
    renamed = {(f"scan.{k}" if hasattr(m.scan_core, k) else k): v for k, v in ref_state.items()}
    assert set(renamed) == set(m.state_dict())
    m.load_state_dict(renamed)
    x = torch.randn(2, 4, 5, 8)
    args = (x, torch.randn(2, 4, 5, 8)) if cross else (x,)
    torch.testing.assert_close(m(*args), ref(*args), rtol=0, atol=0)

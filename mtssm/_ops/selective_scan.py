"""The selective scan (Mamba's S6) and its fused multi-direction 2-D form, as ``torch.library`` ops.

Contents, in order:

1. ``selective_scan_ref`` / ``selective_scan_2d_ref``: pure PyTorch, sequential, readable; the
   oracle of the tests. Computed in fp32 (fp64 for fp64 inputs) and cast back.
2. The fast implementations: the C++ CPU kernel (``csrc/selective_scan_cpu.cpp``), a chunked
   pure-PyTorch implementation with a hand-written reverse scan (used where no compiler is
   available and on devices without a kernel), and the Triton / mamba-ssm GPU kernels
   (``triton_scan.py``).
3. ``mtssm::selective_scan`` and ``mtssm::selective_scan_backward`` custom ops with their fake
   kernels and the registered autograd.
4. Typed public wrappers: :func:`selective_scan` (mamba-ssm's ``selective_scan_fn`` signature) and
   :func:`selective_scan_2d` (the fused K-direction scan of a map).

The one op covers both the 1-D scan and the K-direction 2-D scan. Its rows are (batch, k, channel):
row (b, k, c) scans the positions of ``u[b, c]`` in the visit order ``perm[k]`` (identity when
``perm`` is absent) with its own step sizes ``delta[b, k, c]``, state matrix ``A[k, c]`` and input/
output projections ``B[b, k, g]``, ``C[b, k, g]`` (``g`` the group of channel ``c``), and adds its
output back at the positions it visited::

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * u_p * B_p,   y_p += <C_p, h_t>,   p = perm[k, t]
    out = (sum_k y_k + sum_k D_k * u) * silu(z)

Shapes of the op (the wrappers build them as views): ``u, z: (batch, dim, L)``,
``delta: (batch, K, dim, L)``, ``A: (K, dim, N)``, ``B, C: (batch, K, G, N, L)`` or ``(K, dim, N)``
(constant over batch and time), ``D, delta_bias: (K, dim)``, ``initial_state: (batch, K, dim, N)``,
``perm: (K, L)`` int64.

Memory: the forward keeps states only at chunk starts (``chunk_states: (batch, K, dim, n_chunks,
N)``); the backward recomputes each chunk's states and runs the adjoint recurrence backwards, so
time is linear in L and the workspace is ``1 / chunk_size`` of storing every state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mtssm._ops import _cpu_extension
from mtssm._ops.backend import get_scan_backend

__all__ = [
    "selective_scan_ref",
    "selective_scan_2d_ref",
    "selective_scan",
    "selective_scan_2d",
    "DEFAULT_CHUNK_SIZE",
]

DEFAULT_CHUNK_SIZE = 64


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """fp64 when any input is fp64, else fp32 (half and bfloat16 are accumulated in fp32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else (
        torch.float32
    )


# --------------------------------------------------------------------------------------------
# 1. References
# --------------------------------------------------------------------------------------------


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Sequential selective scan in plain PyTorch, with mamba-ssm's ``selective_scan_ref`` semantics.

    Args:
        u: (batch, dim, L) input sequence.
        delta: (batch, dim, L) step sizes (before ``delta_bias`` and softplus).
        A: (dim, N) real state matrix (diagonal per channel).
        B: (dim, N) constant, or (batch, G, N, L) / (batch, N, L) input-dependent, dim % G == 0.
        C: like ``B``.
        D: (dim,) skip connection, optional.
        z: (batch, dim, L) gate, optional: ``out = y * silu(z)``.
        delta_bias: (dim,) added to ``delta`` before the softplus, optional.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        return_last_state: also return the final state (batch, dim, N).
        initial_state: (batch, dim, N) state before the first step (default zeros).

    Returns:
        out (batch, dim, L) in ``u.dtype``, and the last state (batch, dim, N) in the compute dtype
        (fp32, or fp64 for fp64 inputs) when ``return_last_state``.
    """
    dtype_in = u.dtype
    cdt = _compute_dtype(u, delta, A, B, C)
    u, delta, A, B, C = (t.to(cdt) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, L = u.shape
    N = A.shape[1]

    def per_channel(M: Tensor) -> Tensor:  # -> (batch, dim, N, L)
        if M.dim() == 2:
            return M[None, :, :, None].expand(batch, dim, N, L)
        if M.dim() == 3:
            M = M[:, None]
        return M.repeat_interleave(dim // M.shape[1], dim=1)

    Bc, Cc = per_channel(B), per_channel(C)
    h = u.new_zeros(batch, dim, N) if initial_state is None else initial_state.to(cdt).clone()
    ys = []
    for t in range(L):
        dt = delta[:, :, t, None]
        h = torch.exp(dt * A) * h + dt * u[:, :, t, None] * Bc[..., t]
        ys.append((h * Cc[..., t]).sum(-1))
    out = torch.stack(ys, dim=-1)
    if D is not None:
        out = out + u * D.to(cdt)[:, None]
    if z is not None:
        out = out * F.silu(z.to(cdt))
    out = out.to(dtype_in)
    return (out, h) if return_last_state else out


def selective_scan_2d_ref(
    x: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = True,
    perm: Tensor | None = None,
) -> Tensor:
    """K-direction 2-D scan as K separate permuted copies and K calls of :func:`selective_scan_ref`.

    Args:
        x: (batch, dim, H, W) feature map.
        delta: (batch, K, dim, H*W) step sizes in row-major spatial order.
        A: (K*dim, N); D, delta_bias: (K*dim,).
        B, C: (batch, K, N, H*W) in row-major spatial order.
        perm: (K, H*W) visit orders (row k: row-major indices in the order direction k visits them).

    Returns:
        y: (batch, dim, H, W), the sum over k of direction k's output put back at its positions.
    """
    batch, dim, H, W = x.shape
    K = delta.shape[1]
    if perm is None:
        raise ValueError("selective_scan_2d_ref: perm (K, H*W) is required")
    u = x.reshape(batch, dim, H * W)
    y = torch.zeros_like(u, dtype=_compute_dtype(x, delta))
    for k in range(K):
        order = perm[k].to(x.device)
        sl = slice(k * dim, (k + 1) * dim)
        yk = selective_scan_ref(
            u[..., order],
            delta[:, k][..., order],
            A[sl],
            B[:, k : k + 1][..., order],
            C[:, k : k + 1][..., order],
            D=None if D is None else D[sl],
            delta_bias=None if delta_bias is None else delta_bias[sl],
            delta_softplus=delta_softplus,
        )
        y[..., order] += yk.to(y.dtype)
    return y.to(x.dtype).reshape(batch, dim, H, W)


# --------------------------------------------------------------------------------------------
# 2. Fast implementations of the unified op
# --------------------------------------------------------------------------------------------

_Grads = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _n_chunks(L: int, chunk_size: int) -> int:
    return max(1, math.ceil(L / max(1, chunk_size)))


def _to(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype).contiguous()


def _scan_fwd_cpp(ext, u, delta, A, B, C, D, z, delta_bias, initial_state, perm, softplus, chunk):
    cdt = _compute_dtype(u, delta, A, B, C)
    empty = u.new_empty(0, dtype=cdt)
    Bt = B.to(cdt).transpose(-1, -2).contiguous() if B.dim() == 5 else B.to(cdt).contiguous()
    Ct = C.to(cdt).transpose(-1, -2).contiguous() if C.dim() == 5 else C.to(cdt).contiguous()
    out, last, chunk_states, pregate = ext.scan_fwd(
        u.to(cdt).contiguous(),
        delta.to(cdt).contiguous(),
        A.to(cdt).contiguous(),
        Bt,
        Ct,
        *(empty if t is None else t.to(cdt).contiguous() for t in (D, z, delta_bias, initial_state)),
        empty.long() if perm is None else perm.contiguous(),
        softplus,
        chunk,
    )
    return out.to(u.dtype), last, chunk_states, pregate


def _scan_bwd_cpp(ext, dout, dlast, u, delta, A, B, C, D, z, delta_bias, initial_state, perm,
                  chunk_states, pregate, softplus, chunk) -> _Grads:
    cdt = chunk_states.dtype
    empty = u.new_empty(0, dtype=cdt)
    Bt = B.to(cdt).transpose(-1, -2).contiguous() if B.dim() == 5 else B.to(cdt).contiguous()
    Ct = C.to(cdt).transpose(-1, -2).contiguous() if C.dim() == 5 else C.to(cdt).contiguous()
    grads = ext.scan_bwd(
        dout.to(cdt).contiguous(),
        empty if dlast is None else dlast.to(cdt).contiguous(),
        u.to(cdt).contiguous(),
        delta.to(cdt).contiguous(),
        A.to(cdt).contiguous(),
        Bt,
        Ct,
        *(empty if t is None else t.to(cdt).contiguous() for t in (D, z, delta_bias, initial_state)),
        empty.long() if perm is None else perm.contiguous(),
        chunk_states,
        pregate,
        softplus,
        chunk,
    )
    du, ddelta, dA, dB, dC, dD, dz, dbias, dinit = grads
    if B.dim() == 5:
        dB = dB.transpose(-1, -2)
    if C.dim() == 5:
        dC = dC.transpose(-1, -2)
    return du, ddelta, dA, dB, dC, dD, dz, dbias, dinit


def _gather_rows(u, delta, B, C, perm, K):
    """Per-direction views in visit order: u (b, K, d, L), delta (b, K, d, L), B/C (b, K, G, N, L)."""
    batch, dim, L = u.shape
    if perm is None:
        uk = u[:, None].expand(batch, K, dim, L)
        return uk, delta, B, C
    idx = perm[None, :, None, :]
    uk = u[:, None].expand(batch, K, dim, L).gather(-1, idx.expand(batch, K, dim, L))
    dk = delta.gather(-1, idx.expand(batch, K, dim, L))

    def g(M):
        if M.dim() != 5:
            return M
        return M.gather(-1, perm[None, :, None, None, :].expand(M.shape))

    return uk, dk, g(B), g(C)


def _expand_bc(M: Tensor, batch: int, dim: int, t0: int, t1: int) -> Tensor:
    """B or C for steps [t0, t1) per row: (b, K, d, N, t1-t0) as a broadcastable view."""
    if M.dim() == 5:
        G = M.shape[2]
        return M[..., t0:t1].repeat_interleave(dim // G, dim=2)
    return M[None, ..., None]


def _scan_fwd_torch(u, delta, A, B, C, D, z, delta_bias, initial_state, perm, softplus, chunk):
    """Chunked forward in PyTorch, vectorised over (batch, K, dim); loops over L."""
    cdt = _compute_dtype(u, delta, A, B, C)
    batch, dim, L = u.shape
    K, N = A.shape[0], A.shape[-1]
    uc, dc, Bc, Cc = (t.to(cdt) for t in (u, delta, B, C))
    Ac = A.to(cdt)
    uk, dk, Bk, Ck = _gather_rows(uc, dc, Bc, Cc, perm, K)
    if delta_bias is not None:
        dk = dk + delta_bias.to(cdt)[None, :, :, None]
    if softplus:
        dk = F.softplus(dk)
    h = uc.new_zeros(batch, K, dim, N) if initial_state is None else initial_state.to(cdt).clone()
    nc = _n_chunks(L, chunk)
    chunk_states = uc.new_empty(batch, K, dim, nc, N)
    yk = uc.new_empty(batch, K, dim, L)
    for j in range(nc):
        t0, t1 = j * chunk, min(L, (j + 1) * chunk)
        chunk_states[:, :, :, j] = h
        dt = dk[..., t0:t1, None]  # (b, K, d, c, 1)
        a = torch.exp(dt * Ac[None, :, :, None, :])
        bu = dt * uk[..., t0:t1, None] * _expand_bc(Bk, batch, dim, t0, t1).transpose(-1, -2)
        Cs = _expand_bc(Ck, batch, dim, t0, t1).transpose(-1, -2)
        for t in range(t1 - t0):
            h = torch.addcmul(bu[..., t, :], a[..., t, :], h)
            yk[..., t0 + t] = (h * Cs[..., min(t, Cs.shape[-2] - 1), :]).sum(-1)
    if perm is not None:  # back to positions: y[b, c, perm[k, t]] += yk[b, k, c, t]
        y = uc.new_zeros(batch, K, dim, L).scatter_(
            -1, perm[None, :, None, :].expand(batch, K, dim, L), yk
        ).sum(1)
    else:
        y = yk.sum(1)
    o = y
    if D is not None:
        o = o + D.to(cdt).sum(0)[None, :, None] * uc
    pregate = _empty(o)
    if z is not None:
        pregate = o
        o = o * F.silu(z.to(cdt))
    return o.to(u.dtype), h, chunk_states, pregate


def _scan_bwd_torch(dout, dlast, u, delta, A, B, C, D, z, delta_bias, initial_state, perm,
                    chunk_states, pregate, softplus, chunk) -> _Grads:
    """Reverse scan in PyTorch mirroring the C++ kernel: recompute each chunk, then the adjoint."""
    cdt = chunk_states.dtype
    batch, dim, L = u.shape
    K, N = A.shape[0], A.shape[-1]
    uc, dc, Bc, Cc, Ac = (t.to(cdt) for t in (u, delta, B, C, A))
    go = dout.to(cdt)
    dz = _empty(go)
    if z is not None:
        zc = z.to(cdt)
        sg = torch.sigmoid(zc)
        dz = go * pregate * sg * (1 + zc * (1 - sg))
        go = go * zc * sg
    du = go * (D.to(cdt).sum(0)[None, :, None] if D is not None else 0.0)
    dD = (go * uc).sum((0, 2))[None].expand(K, dim).clone() if D is not None else _empty(go)
    uk, dk_raw, Bk, Ck = _gather_rows(uc, dc, Bc, Cc, perm, K)
    if delta_bias is not None:
        dk_raw = dk_raw + delta_bias.to(cdt)[None, :, :, None]
    dk = F.softplus(dk_raw) if softplus else dk_raw
    dyk, _, _, _ = _gather_rows(go, dc, Bc, Cc, perm, K)  # dy in visit order (b, K, d, L)
    g = uc.new_zeros(batch, K, dim, N) if dlast is None else dlast.to(cdt).clone()
    d_dt = uc.new_empty(batch, K, dim, L)
    d_uk = uc.new_empty(batch, K, dim, L)
    dA = torch.zeros_like(Ac)
    dBk = torch.zeros_like(Bk)
    dCk = torch.zeros_like(Ck)
    groups = Bk.shape[2] if Bk.dim() == 5 else (Ck.shape[2] if Ck.dim() == 5 else 1)
    rep = dim // groups
    for j in reversed(range(_n_chunks(L, chunk))):
        t0, t1 = j * chunk, min(L, (j + 1) * chunk)
        dt = dk[..., t0:t1, None]
        a = torch.exp(dt * Ac[None, :, :, None, :])  # (b, K, d, c, N)
        Bs = _expand_bc(Bk, batch, dim, t0, t1).transpose(-1, -2)
        Cs = _expand_bc(Ck, batch, dim, t0, t1).transpose(-1, -2)
        bu_coef = dt * uk[..., t0:t1, None]
        hs = [chunk_states[:, :, :, j]]
        for t in range(t1 - t0):
            Bt = Bs[..., min(t, Bs.shape[-2] - 1), :]
            hs.append(a[..., t, :] * hs[-1] + bu_coef[..., t, :] * Bt)
        dB_chunk = torch.empty_like(a)
        dC_chunk = torch.empty_like(a)
        for t in reversed(range(t1 - t0)):
            Ct = Cs[..., min(t, Cs.shape[-2] - 1), :]
            Bt = Bs[..., min(t, Bs.shape[-2] - 1), :]
            dy = dyk[..., t0 + t, None]
            gn = g + Ct * dy
            dC_chunk[..., t, :] = dy * hs[t + 1]
            dB_chunk[..., t, :] = gn * bu_coef[..., t, :]
            d_bu = (gn * Bt).sum(-1)
            da = gn * hs[t] * a[..., t, :]
            d_uk[..., t0 + t] = d_bu * dt[..., t, 0]
            d_dt[..., t0 + t] = (da * Ac[None]).sum(-1) + d_bu * uk[..., t0 + t]
            dA += (da * dt[..., t, :]).sum(0)
            g = gn * a[..., t, :]
        if Bk.dim() == 5:
            dBk[..., t0:t1] += dB_chunk.transpose(-1, -2).unflatten(2, (-1, rep)).sum(3)
        else:
            dBk += dB_chunk.sum((0, 3))
        if Ck.dim() == 5:
            dCk[..., t0:t1] += dC_chunk.transpose(-1, -2).unflatten(2, (-1, rep)).sum(3)
        else:
            dCk += dC_chunk.sum((0, 3))
    d_raw = d_dt * torch.sigmoid(dk_raw) if softplus else d_dt
    dbias = d_raw.sum((0, 3)) if delta_bias is not None else _empty(go)
    dinit = g if initial_state is not None else _empty(go)
    if perm is None:
        du = du + d_uk.sum(1)
        ddelta, dB, dC = d_raw, dBk, dCk
    else:
        idx = perm[None, :, None, :].expand(batch, K, dim, L)
        du = du + torch.zeros_like(d_uk).scatter_(-1, idx, d_uk).sum(1)
        ddelta = torch.zeros_like(d_raw).scatter_(-1, idx, d_raw)

        def unperm(M):
            if M.dim() != 5:
                return M
            return torch.zeros_like(M).scatter_(-1, perm[None, :, None, None, :].expand(M.shape), M)

        dB, dC = unperm(dBk), unperm(dCk)
    return du, ddelta, dA, dB, dC, dD, dz, dbias, dinit


def _triton_module():
    try:
        from mtssm._ops import triton_scan
    except ImportError:
        return None
    return triton_scan if triton_scan.is_available() else None


def _forward_impl(u, delta, A, B, C, D, z, delta_bias, initial_state, perm, softplus, chunk):
    backend = get_scan_backend()
    if u.device.type == "cuda" and backend in ("auto", "triton", "mamba_ssm"):
        tri = _triton_module()
        if tri is not None and backend != "mamba_ssm":
            return tri.selective_scan_fwd_triton(
                u, delta, A, B, C, D, z, delta_bias, initial_state, perm, softplus, chunk,
                return_pregate=True,
            )
    if u.device.type == "cpu" and backend in ("auto", "cpp"):
        ext = _cpu_extension.load()
        if ext is not None:
            return _scan_fwd_cpp(
                ext, u, delta, A, B, C, D, z, delta_bias, initial_state, perm, softplus, chunk
            )
    return _scan_fwd_torch(u, delta, A, B, C, D, z, delta_bias, initial_state, perm, softplus, chunk)


def _backward_impl(dout, dlast, u, delta, A, B, C, D, z, delta_bias, initial_state, perm,
                   chunk_states, pregate, softplus, chunk) -> _Grads:
    backend = get_scan_backend()
    args = (u, delta, A, B, C, D, z, delta_bias, initial_state, perm)
    if u.device.type == "cuda" and backend in ("auto", "triton", "mamba_ssm"):
        tri = _triton_module()
        if tri is not None and backend != "mamba_ssm":
            grads = tri.selective_scan_bwd_triton(dout, dlast, *args, chunk_states, softplus, chunk)
            return tuple(g if g is not None else _empty(u) for g in grads)  # type: ignore[return-value]
    if u.device.type == "cpu" and backend in ("auto", "cpp"):
        ext = _cpu_extension.load()
        if ext is not None:
            return _scan_bwd_cpp(ext, dout, dlast, *args, chunk_states, pregate, softplus, chunk)
    return _scan_bwd_torch(dout, dlast, *args, chunk_states, pregate, softplus, chunk)


# --------------------------------------------------------------------------------------------
# 3. Custom ops, fakes and autograd
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("mtssm::selective_scan", mutates_args=())
def _selective_scan_op(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    initial_state: Tensor | None,
    perm: Tensor | None,
    delta_softplus: bool,
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Unified scan (see the module docstring). Returns (out, last_state, chunk_states, pregate);
    the last two are saved for the backward (``pregate`` is empty without ``z``)."""
    return _forward_impl(u, delta, A, B, C, D, z, delta_bias, initial_state, perm,
                         delta_softplus, chunk_size)


@_selective_scan_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, perm, delta_softplus, chunk_size):
    torch._check(u.dim() == 3 and delta.dim() == 4 and A.dim() == 3)
    batch, dim, L = u.shape
    K, N = A.shape[0], A.shape[2]
    cdt = _compute_dtype(u, delta, A, B, C)
    nc = _n_chunks(L, chunk_size)
    out = u.new_empty(batch, dim, L)
    last = u.new_empty(batch, K, dim, N, dtype=cdt)
    chunk_states = u.new_empty(batch, K, dim, nc, N, dtype=cdt)
    pregate = u.new_empty(batch, dim, L, dtype=cdt) if z is not None else u.new_empty(0, dtype=cdt)
    return out, last, chunk_states, pregate


@torch.library.custom_op("mtssm::selective_scan_backward", mutates_args=())
def _selective_scan_backward_op(
    dout: Tensor,
    dlast_state: Tensor | None,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    initial_state: Tensor | None,
    perm: Tensor | None,
    chunk_states: Tensor,
    pregate: Tensor,
    delta_softplus: bool,
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state) of the scan, in the
    inputs' shapes and dtypes; absent optional inputs give empty tensors."""
    grads = _backward_impl(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state,
                           perm, chunk_states, pregate, delta_softplus, chunk_size)
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    return tuple(
        g.to(x.dtype).contiguous() if x is not None else _empty(u) for g, x in zip(grads, inputs)
    )  # type: ignore[return-value]


@_selective_scan_backward_op.register_fake
def _(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, perm, chunk_states,
      pregate, delta_softplus, chunk_size):
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    # The kernels return contiguous gradients whatever the inputs' strides.
    return tuple(x.new_empty(x.shape) if x is not None else u.new_empty(0) for x in inputs)


def _setup_context(ctx, inputs, output):
    (u, delta, A, B, C, D, z, delta_bias, initial_state, perm, delta_softplus, chunk_size) = inputs
    _, _, chunk_states, pregate = output
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, perm, chunk_states,
                          pregate)
    ctx.delta_softplus = delta_softplus
    ctx.chunk_size = chunk_size


def _backward(ctx, dout, dlast, _dchunk, _dpregate):
    u, delta, A, B, C, D, z, delta_bias, initial_state, perm, chunk_states, pregate = (
        ctx.saved_tensors
    )
    grads = torch.ops.mtssm.selective_scan_backward(
        dout, dlast, u, delta, A, B, C, D, z, delta_bias, initial_state, perm, chunk_states,
        pregate, ctx.delta_softplus, ctx.chunk_size,
    )
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    return (*(g if x is not None else None for g, x in zip(grads, inputs)), None, None, None)


_selective_scan_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# 4. Public wrappers
# --------------------------------------------------------------------------------------------


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _check_float(name: str, t: Tensor | None) -> None:
    if t is not None and not t.is_floating_point():
        raise TypeError(f"selective_scan: {name} must be a floating-point tensor, got {t.dtype}")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _validate_1d(u, delta, A, B, C, D, z, delta_bias, initial_state) -> None:
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                    ("delta_bias", delta_bias), ("initial_state", initial_state)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"selective_scan: {name} must be a Tensor, got {type(t).__name__}")
        _check_float(name, t)
    _check(u.dim() == 3, f"selective_scan: u must be (batch, dim, L), got shape {_shape(u)}")
    batch, dim, L = u.shape
    _check(delta.shape == u.shape,
           f"selective_scan: delta must be (batch, dim, L) = {_shape(u)} like u, got {_shape(delta)}")
    _check(A.dim() == 2 and A.shape[0] == dim,
           f"selective_scan: A must be (dim, N) with dim={dim}, got {_shape(A)}")
    _check(not A.is_complex(), "selective_scan: A must be real (complex A is not supported)")
    N = A.shape[1]
    for name, M in (("B", B), ("C", C)):
        if M.dim() == 2:
            _check(M.shape == (dim, N),
                   f"selective_scan: {name} must be (dim, N) = ({dim}, {N}) or (batch, G, N, L), "
                   f"got {_shape(M)}")
        elif M.dim() == 3:
            _check(M.shape == (batch, N, L),
                   f"selective_scan: {name} must be (batch, N, L) = ({batch}, {N}, {L}), got {_shape(M)}")
        elif M.dim() == 4:
            _check(M.shape[0] == batch and M.shape[2] == N and M.shape[3] == L,
                   f"selective_scan: {name} must be (batch, G, N, L) = ({batch}, G, {N}, {L}), "
                   f"got {_shape(M)}")
            _check(dim % M.shape[1] == 0,
                   f"selective_scan: dim={dim} must be divisible by the groups G={M.shape[1]} of {name}")
        else:
            raise ValueError(
                f"selective_scan: {name} must be (dim, N) or (batch, G, N, L), got {_shape(M)}"
            )
    if B.dim() >= 3 and C.dim() >= 3:
        gb = 1 if B.dim() == 3 else B.shape[1]
        gc = 1 if C.dim() == 3 else C.shape[1]
        _check(gb == gc, f"selective_scan: B has {gb} groups but C has {gc}")
    if D is not None:
        _check(D.shape == (dim,), f"selective_scan: D must be (dim,) = ({dim},), got {_shape(D)}")
    if delta_bias is not None:
        _check(delta_bias.shape == (dim,),
               f"selective_scan: delta_bias must be (dim,) = ({dim},), got {_shape(delta_bias)}")
    if z is not None:
        _check(z.shape == u.shape, f"selective_scan: z must be {_shape(u)} like u, got {_shape(z)}")
    if initial_state is not None:
        _check(initial_state.shape == (batch, dim, N),
               f"selective_scan: initial_state must be (batch, dim, N) = ({batch}, {dim}, {N}), "
               f"got {_shape(initial_state)}")


def _as_groups(M: Tensor) -> Tensor:
    """B/C to the op layout: (batch, 1, G, N, L) for variable, (1, dim, N) for constant."""
    if M.dim() == 2:
        return M.unsqueeze(0)
    if M.dim() == 3:
        return M[:, None, None]
    return M.unsqueeze(1)


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan with mamba-ssm's ``selective_scan_fn`` signature and semantics.

    Shapes as in :func:`selective_scan_ref`: ``u, delta, z: (batch, dim, L)``, ``A: (dim, N)``,
    ``B, C: (dim, N)`` or ``(batch, G, N, L)`` (``dim % G == 0``), ``D, delta_bias: (dim,)``,
    ``initial_state: (batch, dim, N)``. Returns ``out (batch, dim, L)`` and, with
    ``return_last_state``, the state after the last step ``(batch, dim, N)`` (fp32; fp64 for fp64
    inputs). Unlike mamba-ssm, gradients flow through the last state and the initial state, so a
    long sequence can be scanned in pieces. ``chunk_size`` trades backward recomputation for
    memory (states are stored every ``chunk_size`` steps).
    """
    _validate_1d(u, delta, A, B, C, D, z, delta_bias, initial_state)
    _check(isinstance(chunk_size, int) and chunk_size >= 1,
           f"selective_scan: chunk_size must be a positive int, got {chunk_size!r}")
    out, last, _, _ = torch.ops.mtssm.selective_scan(
        u,
        delta.unsqueeze(1),
        A.unsqueeze(0),
        _as_groups(B),
        _as_groups(C),
        None if D is None else D.unsqueeze(0),
        z,
        None if delta_bias is None else delta_bias.unsqueeze(0),
        None if initial_state is None else initial_state.unsqueeze(1),
        None,
        delta_softplus,
        chunk_size,
    )
    return (out, last.squeeze(1)) if return_last_state else out


def _resolve_order(order: str | Tensor, H: int, W: int, device: torch.device) -> Tensor:
    from mtssm._ops import orders

    if isinstance(order, str):
        perm = orders.scan_order(order, H, W)
    elif isinstance(order, Tensor):
        perm = order
    else:
        raise TypeError(
            f"selective_scan_2d: order must be a name or a LongTensor (K, H*W), got {type(order).__name__}"
        )
    _check(perm.dim() == 2 and perm.shape[1] == H * W and perm.dtype == torch.int64,
           f"selective_scan_2d: order must be an int64 tensor (K, H*W) = (K, {H * W}), "
           f"got {perm.dtype} {_shape(perm)}")
    return perm.to(device)


def selective_scan_2d(
    x: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = True,
    order: str | Tensor = "ss2d",
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Fused K-direction selective scan of a 2-D map (VMamba's SS2D core), merged back in place.

    Every direction reads the one map through its visit order (no flipped or transposed copies).

    Args:
        x: (batch, dim, H, W) feature map, the scanned input ``u`` of every direction.
        delta: (batch, K, dim, H*W) per-direction step sizes, row-major spatial order.
        A: (K*dim, N) state matrices, direction-major (rows k*dim .. (k+1)*dim - 1 are direction k).
        B, C: (batch, K, N, H*W) per-direction projections, row-major spatial order.
        D, delta_bias: (K*dim,) optional.
        order: a scan-order name (``"ss2d"``: row-major, column-major and both reversed;
            ``"hilbert"``: four generalised-Hilbert orders) or a LongTensor (K, H*W) whose row k
            lists the row-major indices in the order direction k visits them.

    Returns:
        y: (batch, dim, H, W) = sum over k of direction k's output at the positions it visited.
    """
    for name, t in (("x", x), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D),
                    ("delta_bias", delta_bias)):
        _check_float(name, t)
    _check(x.dim() == 4, f"selective_scan_2d: x must be (batch, dim, H, W), got {_shape(x)}")
    batch, dim, H, W = x.shape
    L = H * W
    perm = _resolve_order(order, H, W, x.device)
    K = perm.shape[0]
    _check(delta.shape == (batch, K, dim, L),
           f"selective_scan_2d: delta must be (batch, K, dim, H*W) = ({batch}, {K}, {dim}, {L}), "
           f"got {_shape(delta)}")
    _check(A.dim() == 2 and A.shape[0] == K * dim,
           f"selective_scan_2d: A must be (K*dim, N) with K*dim={K * dim}, got {_shape(A)}")
    N = A.shape[1]
    for name, M in (("B", B), ("C", C)):
        _check(M.shape == (batch, K, N, L),
               f"selective_scan_2d: {name} must be (batch, K, N, H*W) = ({batch}, {K}, {N}, {L}), "
               f"got {_shape(M)}")
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None:
            _check(v.shape == (K * dim,),
                   f"selective_scan_2d: {name} must be (K*dim,) = ({K * dim},), got {_shape(v)}")
    y, _, _, _ = torch.ops.mtssm.selective_scan(
        x.reshape(batch, dim, L),
        delta,
        A.reshape(K, dim, N),
        B.unsqueeze(2),
        C.unsqueeze(2),
        None if D is None else D.reshape(K, dim),
        None,
        None if delta_bias is None else delta_bias.reshape(K, dim),
        None,
        perm,
        delta_softplus,
        chunk_size,
    )
    return y.reshape(batch, dim, H, W)

"""The selective scan (Mamba's S6) and its fused multi-direction 2-D form, as ``torch.library`` ops.

Contents, in order:

1. ``selective_scan_ref`` / ``selective_scan_2d_ref``: pure PyTorch, sequential, readable; the
   oracle of the tests. Computed in fp32 (fp64 for fp64 inputs) and cast back.
2. The pure-PyTorch implementation of the unified op (chunked, with a hand-written reverse scan):
   the kernel of every device without a compiled one. The C++ CPU kernel is in
   ``csrc/selective_scan_cpu.cpp``, the Triton CUDA kernels in ``triton_scan.py``.
3. The ops ``mtssm::selective_scan`` and ``mtssm::selective_scan_backward``: schemas and CPU
   kernels from the C++ op library (``_library.py``; where it cannot be built, the same schemas
   are defined here), the pure-PyTorch path as the CompositeExplicitAutograd kernel, Triton's for
   CUDA, the fakes (every shape checked) and the registered autograd. Implementations take one
   :class:`~mtssm._ops.scan_inputs.ScanInputs`.
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

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mtssm._ops import _library
from mtssm._ops.scan_inputs import (
    DEFAULT_CHUNK_SIZE,
    ScanInputs,
    check_scan_inputs,
    check_shape,
    compute_dtype,
    n_chunks,
)

__all__ = [
    "selective_scan_ref",
    "selective_scan_2d_ref",
    "selective_scan",
    "selective_scan_2d",
    "DEFAULT_CHUNK_SIZE",
]


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
    cdt = compute_dtype(u, delta, A, B, C)
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
    y = torch.zeros_like(u, dtype=compute_dtype(x, delta))
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
# 2. The pure-PyTorch implementation of the unified op (the C++ kernel is csrc/, Triton's is
#    triton_scan.py)
# --------------------------------------------------------------------------------------------

ScanOutputs = tuple[Tensor, Tensor, Tensor, Tensor]  # out, last_state, chunk_states, pregate
ScanGrads = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


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


def scan_fwd_torch(x: ScanInputs) -> ScanOutputs:
    """Chunked forward of the unified op in PyTorch, vectorised over (batch, K, dim); loops over L."""
    cdt = x.compute_dtype
    batch, K, dim, L, N, _ = x.dims
    perm = None if x.perm is None else x.perm.long()
    uc, dc, Bc, Cc = (t.to(cdt) for t in (x.u, x.delta, x.B, x.C))
    Ac = x.A.to(cdt)
    chunk = x.chunk_size
    uk, dk, Bk, Ck = _gather_rows(uc, dc, Bc, Cc, perm, K)
    if x.delta_bias is not None:
        dk = dk + x.delta_bias.to(cdt)[None, :, :, None]
    if x.delta_softplus:
        dk = F.softplus(dk)
    h = uc.new_zeros(batch, K, dim, N) if x.initial_state is None else x.initial_state.to(cdt).clone()
    nc = n_chunks(L, chunk)
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
    if x.D is not None:
        o = o + x.D.to(cdt).sum(0)[None, :, None] * uc
    pregate = _empty(o)
    if x.z is not None:
        pregate = o
        o = o * F.silu(x.z.to(cdt))
    return o.to(x.u.dtype), h, chunk_states, pregate


def scan_bwd_torch(x: ScanInputs, dout: Tensor, dlast: Tensor | None, chunk_states: Tensor,
                   pregate: Tensor) -> ScanGrads:
    """Reverse scan in PyTorch mirroring the C++ kernel: recompute each chunk, then the adjoint.

    Returns the gradients of :data:`GRAD_NAMES` in the inputs' shapes and dtypes (contiguous),
    empty tensors for absent inputs.
    """
    cdt = chunk_states.dtype
    batch, K, dim, L, N, _ = x.dims
    perm = None if x.perm is None else x.perm.long()
    chunk = x.chunk_size
    uc, dc, Bc, Cc, Ac = (t.to(cdt) for t in (x.u, x.delta, x.B, x.C, x.A))
    go = dout.to(cdt)
    dz = _empty(go)
    if x.z is not None:
        zc = x.z.to(cdt)
        sg = torch.sigmoid(zc)
        dz = go * pregate * sg * (1 + zc * (1 - sg))
        go = go * zc * sg
    D = x.D
    du = go * (D.to(cdt).sum(0)[None, :, None] if D is not None else 0.0)
    dD = (go * uc).sum((0, 2))[None].expand(K, dim).clone() if D is not None else _empty(go)
    uk, dk_raw, Bk, Ck = _gather_rows(uc, dc, Bc, Cc, perm, K)
    if x.delta_bias is not None:
        dk_raw = dk_raw + x.delta_bias.to(cdt)[None, :, :, None]
    dk = F.softplus(dk_raw) if x.delta_softplus else dk_raw
    dyk, _, _, _ = _gather_rows(go, dc, Bc, Cc, perm, K)  # dy in visit order (b, K, d, L)
    g = uc.new_zeros(batch, K, dim, N) if dlast is None else dlast.to(cdt).clone()
    d_dt = uc.new_empty(batch, K, dim, L)
    d_uk = uc.new_empty(batch, K, dim, L)
    dA = torch.zeros_like(Ac)
    dBk = torch.zeros_like(Bk)
    dCk = torch.zeros_like(Ck)
    groups = Bk.shape[2] if Bk.dim() == 5 else (Ck.shape[2] if Ck.dim() == 5 else 1)
    rep = dim // groups
    for j in reversed(range(n_chunks(L, chunk))):
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
    d_raw = d_dt * torch.sigmoid(dk_raw) if x.delta_softplus else d_dt
    dbias = d_raw.sum((0, 3)) if x.delta_bias is not None else _empty(go)
    dinit = g if x.initial_state is not None else _empty(go)
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
    return grads_as_inputs(x, (du, ddelta, dA, dB, dC, dD, dz, dbias, dinit))


def grads_as_inputs(x: ScanInputs, grads) -> ScanGrads:
    """The backward op's outputs: each gradient in its input's dtype, contiguous; an empty tensor
    (``u``'s dtype) where the input is absent or its gradient is ``None``."""
    return tuple(
        g.to(t.dtype).contiguous() if t is not None and g is not None else _empty(x.u)
        for g, t in zip(grads, x.grad_inputs())
    )  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# 3. The ops: schemas and CPU kernels from the C++ library (or defined here from the same
#    schemas where it cannot be built), the pure-PyTorch path as the kernel of every other device,
#    Triton's on CUDA, fakes and autograd
# --------------------------------------------------------------------------------------------


def _split_backward_args(args) -> tuple[ScanInputs, Tensor, Tensor | None, Tensor, Tensor]:
    """The backward op's arguments as (inputs, dout, dlast_state, chunk_states, pregate)."""
    dout, dlast, *inputs, chunk_states, pregate, softplus, chunk = args
    return ScanInputs(*inputs, softplus, chunk), dout, dlast, chunk_states, pregate


def forward_kernel(impl: Callable[[ScanInputs], ScanOutputs]) -> Callable[..., ScanOutputs]:
    """``impl(ScanInputs)`` as a kernel of ``mtssm::selective_scan`` (the op's arguments)."""

    def kernel(*args):
        return impl(ScanInputs(*args))

    return kernel


def backward_kernel(impl: Callable[..., ScanGrads]) -> Callable[..., ScanGrads]:
    """``impl(inputs, dout, dlast, chunk_states, pregate)`` as a kernel of
    ``mtssm::selective_scan_backward``."""

    def kernel(*args):
        return impl(*_split_backward_args(args))

    return kernel


LIBRARY_PATH = _library.load()
if LIBRARY_PATH is None:  # same schemas, defined from Python
    _python_defs = torch.library.Library("mtssm", "FRAGMENT")
    for _schema in _library.schemas():
        _python_defs.define(_schema)

torch.library.impl("mtssm::selective_scan", "CompositeExplicitAutograd")(
    forward_kernel(scan_fwd_torch)
)
torch.library.impl("mtssm::selective_scan_backward", "CompositeExplicitAutograd")(
    backward_kernel(scan_bwd_torch)
)


def triton_fwd(x: ScanInputs) -> ScanOutputs:
    """The Triton forward kernel (imported on first use)."""
    from mtssm._ops import triton_scan

    return triton_scan.selective_scan_fwd_triton(x, return_pregate=True)


def triton_bwd(x: ScanInputs, dout, dlast, chunk_states, pregate) -> ScanGrads:
    """The Triton backward kernel (imported on first use)."""
    from mtssm._ops import triton_scan

    return grads_as_inputs(x, triton_scan.selective_scan_bwd_triton(x, dout, dlast, chunk_states))


TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
if TRITON_INSTALLED:
    torch.library.register_kernel("mtssm::selective_scan", "cuda", forward_kernel(triton_fwd))
    torch.library.register_kernel("mtssm::selective_scan_backward", "cuda", backward_kernel(triton_bwd))


@torch.library.register_fake("mtssm::selective_scan")
def _(*args):
    x = ScanInputs(*args)
    batch, K, dim, L, N, _ = check_scan_inputs(x)
    cdt = x.compute_dtype
    out = x.u.new_empty(batch, dim, L)
    last = x.u.new_empty(batch, K, dim, N, dtype=cdt)
    chunk_states = x.u.new_empty(batch, K, dim, n_chunks(L, x.chunk_size), N, dtype=cdt)
    pregate = x.u.new_empty((batch, dim, L) if x.z is not None else (0,), dtype=cdt)
    return out, last, chunk_states, pregate


@torch.library.register_fake("mtssm::selective_scan_backward")
def _(*args):
    x, dout, dlast, chunk_states, pregate = _split_backward_args(args)
    batch, K, dim, L, N, _ = check_scan_inputs(x)
    check_shape(dout, "dout", "(batch, dim, L) like u", (batch, dim, L))
    if dlast is not None:
        check_shape(dlast, "dlast_state", "(batch, K, dim, N)", (batch, K, dim, N))
    check_shape(chunk_states, "chunk_states", "(batch, K, dim, n_chunks, N)",
                (batch, K, dim, n_chunks(L, x.chunk_size), N))
    check_shape(pregate, "pregate", "(batch, dim, L) with z, else (0,)",
                (batch, dim, L) if x.z is not None else (0,))
    # The kernels return contiguous gradients whatever the inputs' strides.
    return tuple(t.new_empty(t.shape) if t is not None else x.u.new_empty(0)
                 for t in x.grad_inputs())


def _setup_context(ctx, inputs, output):
    x = ScanInputs(*inputs)
    _, _, chunk_states, pregate = output
    ctx.save_for_backward(*x.grad_inputs(), x.perm, chunk_states, pregate)
    ctx.delta_softplus = x.delta_softplus
    ctx.chunk_size = x.chunk_size


def _backward(ctx, dout, dlast, _dchunk, _dpregate):
    *inputs, perm, chunk_states, pregate = ctx.saved_tensors
    grads = torch.ops.mtssm.selective_scan_backward(
        dout, dlast, *inputs, perm, chunk_states, pregate, ctx.delta_softplus, ctx.chunk_size
    )
    return (*(g if t is not None else None for g, t in zip(grads, inputs)), None, None, None)


torch.library.register_autograd("mtssm::selective_scan", _backward, setup_context=_setup_context)


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

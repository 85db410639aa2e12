"""Triton kernels for the selective-scan family.

The unified scan runs K scan directions over one input. Rows are (batch, k, channel); direction k
visits position ``perm[k, t]`` at step ``t`` (identity order when ``perm`` is None), so the 1-D
selective scan is K=1 without ``perm`` and the multi-direction 2-D scan is the same kernel with the
flattened map ``u: (batch, dim, H*W)`` and one visit order per direction. For row (b, k, c) with
``p = perm[k, t]`` and ``g = c // (dim // G)``::

    dt   = softplus?(delta[b, k, c, p] + delta_bias[k, c])
    h    = exp(dt * A[k, c, :]) * h + dt * B[b, k, g, :, p] * u[b, c, p]
    y_k  = sum_n C[b, k, g, n, p] * h[n]
    out[b, c, p] = (sum_k y_k + sum_k D[k, c] * u[b, c, p]) * silu(z[b, c, p])

Design (one program per (batch, k, block of BLOCK_D channels, block of BLOCK_N states)):

- The state block (BLOCK_D, BLOCK_N) lives in registers; L is walked in chunks of ``chunk_size``
  positions. A chunk is one register tile (BLOCK_D, BLOCK_N, BLOCK_T) scanned in parallel with
  ``tl.associative_scan``; the state at the start of every chunk is written to ``chunk_states``.
- u, delta, B, C, z are read through ``perm`` (a gather), and per-direction outputs are added
  back at their positions with atomics, so no flipped or transposed copy is ever made.
- The backward walks the chunks from last to first, recomputes the states of a chunk from its
  ``chunk_states`` entry, and runs the adjoint recurrence ``g_t = a_{t+1} g_{t+1} + C_t dy_t`` as a
  reverse associative scan: O(L) work and O(chunk) registers per program. Channel and batch
  reductions (dB, dC, dA) are summed over the block in registers, then added with atomics.

B and C may also be constant matrices (K, dim, N). Inputs may be fp16, bf16 or fp32 (computed in
fp32) or fp64 (computed in fp64: slow on GPUs, meant for checks). Sums done with atomics (outputs
of K > 1 directions, dB, dC, dA) are not bitwise deterministic from run to run.

CPU tensors run through Triton's interpreter, which needs ``TRITON_INTERPRET=1`` in the
environment before ``triton`` is first imported; it is slow and meant for tests at tiny shapes.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from mtssm._ops.scan_inputs import ScanInputs, check_scan_inputs

try:
    import triton
    import triton.language as tl
except ImportError:  # the GPU extra is not installed
    triton = None
    tl = None

__all__ = [
    "is_available",
    "selective_scan_fwd_triton",
    "selective_scan_bwd_triton",
]

_INSTALL_TRITON = "install the GPU extra: pip install 'mtssm[gpu]' (or pip install triton)"


def is_available() -> bool:
    """Whether ``triton`` is importable (the kernels can then run on CUDA tensors)."""
    return triton is not None


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _linear_combine(a1, b1, a2, b2):
        # Composition of the affine maps h -> a1*h + b1 then h -> a2*h + b2.
        return a1 * a2, a2 * b1 + b2

    @triton.jit
    def _scan_fwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dbias_ptr, h0_ptr, perm_ptr,
        y_ptr, pre_ptr, last_ptr, cs_ptr,
        s_ub, s_ud, s_ul,
        s_db, s_dk, s_dd, s_dl,
        s_ak, s_ad, s_an,
        s_bb, s_bk, s_bg, s_bn, s_bl,
        s_cb, s_ck, s_cg, s_cn, s_cl,
        s_Dk, s_Dd,
        s_zb, s_zd, s_zl,
        s_bik, s_bid,
        s_hb, s_hk, s_hd, s_hn,
        s_pk, s_pl,
        L, N, CPG, CHUNK, N_CHUNKS,
        K: tl.constexpr, CDT: tl.constexpr,
        B_CONST: tl.constexpr, C_CONST: tl.constexpr,
        HAS_PERM: tl.constexpr, HAS_DBIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        HAS_INIT: tl.constexpr, FUSED_EPILOGUE: tl.constexpr, HAS_D: tl.constexpr,
        HAS_Z: tl.constexpr, STORE_PREGATE: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        # y (and pregate) are contiguous (batch, dim, L): the output in u's dtype when
        # FUSED_EPILOGUE (K == 1, one state block), else a zeroed CDT buffer that every
        # (k, state block) program adds its y_k into. last: (batch, K, dim, N) and
        # chunk states: (batch, K, dim, N_CHUNKS, N), contiguous CDT.
        pid_bk = tl.program_id(0)
        pid_d = tl.program_id(1)
        pid_n = tl.program_id(2)
        b = (pid_bk // K).to(tl.int64)
        k = (pid_bk % K).to(tl.int64)
        d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        g = (pid_d * BLOCK_D) // CPG
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        dn_ok = n_ok[None, :]
        ar_t = tl.arange(0, BLOCK_T)
        dim = tl.num_programs(1) * BLOCK_D

        A = tl.load(A_ptr + k * s_ak + d[:, None] * s_ad + n[None, :] * s_an,
                    mask=dn_ok, other=0.0).to(CDT)
        if B_CONST:  # B: (K, dim, N)
            B3 = tl.load(B_ptr + k * s_bk + d[:, None] * s_bg + n[None, :] * s_bn,
                         mask=dn_ok, other=0.0).to(CDT)[:, :, None]
        if C_CONST:
            C3 = tl.load(C_ptr + k * s_ck + d[:, None] * s_cg + n[None, :] * s_cn,
                         mask=dn_ok, other=0.0).to(CDT)[:, :, None]
        if HAS_DBIAS:
            dbias = tl.load(dbias_ptr + k * s_bik + d * s_bid).to(CDT)
        if FUSED_EPILOGUE:
            if HAS_D:
                Dk = tl.load(D_ptr + k * s_Dk + d * s_Dd).to(CDT)
        if HAS_INIT:
            h = tl.load(h0_ptr + b * s_hb + k * s_hk + d[:, None] * s_hd + n[None, :] * s_hn,
                        mask=dn_ok, other=0.0).to(CDT)
        else:
            h = tl.zeros((BLOCK_D, BLOCK_N), dtype=CDT)

        row = ((b * K + k) * dim + d[:, None])
        cs_row = cs_ptr + row * (N_CHUNKS * N) + n[None, :]
        y_row = b * dim * L + d[:, None] * L
        for j in range(N_CHUNKS):
            tl.store(cs_row + j * N, h, mask=dn_ok)
            t = j * CHUNK + ar_t
            t_ok = (ar_t < CHUNK) & (t < L)
            if HAS_PERM:
                p = tl.load(perm_ptr + k * s_pk + t * s_pl, mask=t_ok, other=0)
            else:
                p = t
            u = tl.load(u_ptr + b * s_ub + d[:, None] * s_ud + p[None, :] * s_ul,
                        mask=t_ok[None, :], other=0.0).to(CDT)
            dt = tl.load(delta_ptr + b * s_db + k * s_dk + d[:, None] * s_dd + p[None, :] * s_dl,
                         mask=t_ok[None, :], other=0.0).to(CDT)
            if HAS_DBIAS:
                dt = dt + dbias[:, None]
            if SOFTPLUS:
                dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
            dt = tl.where(t_ok[None, :], dt, 0.0)  # padded steps are the identity map
            bc_ok = n_ok[:, None] & t_ok[None, :]
            if not B_CONST:  # B: (batch, K, G, N, L), read through the visit order
                B3 = tl.load(B_ptr + b * s_bb + k * s_bk + g * s_bg + n[:, None] * s_bn
                             + p[None, :] * s_bl, mask=bc_ok, other=0.0).to(CDT)[None, :, :]
            if not C_CONST:
                C3 = tl.load(C_ptr + b * s_cb + k * s_ck + g * s_cg + n[:, None] * s_cn
                             + p[None, :] * s_cl, mask=bc_ok, other=0.0).to(CDT)[None, :, :]

            a = tl.exp(dt[:, None, :] * A[:, :, None])  # (BLOCK_D, BLOCK_N, BLOCK_T)
            x = (dt * u)[:, None, :] * B3
            a_cum, h_loc = tl.associative_scan((a, x), axis=2, combine_fn=_linear_combine)
            hs = a_cum * h[:, :, None] + h_loc
            y = tl.sum(C3 * hs, axis=1)  # (BLOCK_D, BLOCK_T)
            h = tl.sum(tl.where(ar_t[None, None, :] == BLOCK_T - 1, hs, 0.0), axis=2)

            y_ptrs = y_row + p[None, :]
            if FUSED_EPILOGUE:
                if HAS_D:
                    y = y + Dk[:, None] * u
                if STORE_PREGATE:
                    tl.store(pre_ptr + y_ptrs, y, mask=t_ok[None, :])
                if HAS_Z:
                    zt = tl.load(z_ptr + b * s_zb + d[:, None] * s_zd + p[None, :] * s_zl,
                                 mask=t_ok[None, :], other=0.0).to(CDT)
                    y = y * zt / (1.0 + tl.exp(-zt))
                tl.store(y_ptr + y_ptrs, y.to(y_ptr.dtype.element_ty), mask=t_ok[None, :])
            else:
                tl.atomic_add(y_ptr + y_ptrs, y, mask=t_ok[None, :])

        tl.store(last_ptr + row * N + n[None, :], h, mask=dn_ok)

    @triton.jit
    def _scan_bwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, dbias_ptr, perm_ptr, cs_ptr, dlast_ptr,
        dy_ptr, w_ptr,
        du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dz_ptr, dh0_ptr,
        s_ub, s_ud, s_ul,
        s_db, s_dk, s_dd, s_dl,
        s_ak, s_ad, s_an,
        s_bb, s_bk, s_bg, s_bn, s_bl,
        s_cb, s_ck, s_cg, s_cn, s_cl,
        s_bik, s_bid,
        s_pk, s_pl,
        s_csb, s_csk, s_csd, s_csj, s_csn,
        s_lb, s_lk, s_ld, s_ln,
        L, N, CPG, CHUNK, N_CHUNKS,
        K: tl.constexpr, CDT: tl.constexpr,
        B_CONST: tl.constexpr, C_CONST: tl.constexpr,
        HAS_PERM: tl.constexpr, HAS_DBIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        HAS_DLAST: tl.constexpr, HAS_Z: tl.constexpr, ATOMIC_ROW: tl.constexpr,
        ATOMIC_DELTA: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        # dy = dout * silu(z) and w = dout * silu'(z): contiguous CDT (batch, dim, L).
        # Outputs, contiguous CDT: du, dz (batch, dim, L); ddelta (batch, K, dim, L);
        # dA (K, dim, N); dB, dC (batch, K, G, N, L), or (K, dim, N) when constant;
        # dh0 (batch, K, dim, N). Buffers written with atomics are zeroed by the launcher.
        pid_bk = tl.program_id(0)
        pid_d = tl.program_id(1)
        pid_n = tl.program_id(2)
        b = (pid_bk // K).to(tl.int64)
        k = (pid_bk % K).to(tl.int64)
        d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        g = (pid_d * BLOCK_D) // CPG
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        dn_ok = n_ok[None, :]
        ar_t = tl.arange(0, BLOCK_T)
        dim = tl.num_programs(1) * BLOCK_D
        G = dim // CPG

        A = tl.load(A_ptr + k * s_ak + d[:, None] * s_ad + n[None, :] * s_an,
                    mask=dn_ok, other=0.0).to(CDT)
        if B_CONST:
            B3 = tl.load(B_ptr + k * s_bk + d[:, None] * s_bg + n[None, :] * s_bn,
                         mask=dn_ok, other=0.0).to(CDT)[:, :, None]
            dB_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=CDT)
        if C_CONST:
            C3 = tl.load(C_ptr + k * s_ck + d[:, None] * s_cg + n[None, :] * s_cn,
                         mask=dn_ok, other=0.0).to(CDT)[:, :, None]
            dC_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=CDT)
        if HAS_DBIAS:
            dbias = tl.load(dbias_ptr + k * s_bik + d * s_bid).to(CDT)
        if HAS_DLAST:
            carry = tl.load(dlast_ptr + b * s_lb + k * s_lk + d[:, None] * s_ld + n[None, :] * s_ln,
                            mask=dn_ok, other=0.0).to(CDT)
        else:
            carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=CDT)
        dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=CDT)

        row_L = b * dim * L + d[:, None] * L  # contiguous (batch, dim, L) buffers
        drow_L = ((b * K + k) * dim + d[:, None]) * L  # contiguous (batch, K, dim, L)
        bc_L = ((b * K + k) * G + g) * N * L + n[:, None] * L  # contiguous (batch, K, G, N, L)
        for jj in range(N_CHUNKS):
            j = N_CHUNKS - 1 - jj
            t = j * CHUNK + ar_t
            t_ok = (ar_t < CHUNK) & (t < L)
            t1 = t + 1
            t1_ok = (ar_t + 1 < CHUNK) & (t1 < L)
            if HAS_PERM:
                p = tl.load(perm_ptr + k * s_pk + t * s_pl, mask=t_ok, other=0)
                p1 = tl.load(perm_ptr + k * s_pk + t1 * s_pl, mask=t1_ok, other=0)
            else:
                p = t
                p1 = t1
            h0 = tl.load(cs_ptr + b * s_csb + k * s_csk + d[:, None] * s_csd + j * s_csj
                         + n[None, :] * s_csn, mask=dn_ok, other=0.0).to(CDT)
            u = tl.load(u_ptr + b * s_ub + d[:, None] * s_ud + p[None, :] * s_ul,
                        mask=t_ok[None, :], other=0.0).to(CDT)
            delta_row = delta_ptr + b * s_db + k * s_dk + d[:, None] * s_dd
            dt_raw = tl.load(delta_row + p[None, :] * s_dl, mask=t_ok[None, :],
                             other=0.0).to(CDT)
            dt1 = tl.load(delta_row + p1[None, :] * s_dl, mask=t1_ok[None, :], other=0.0).to(CDT)
            if HAS_DBIAS:
                dt_raw = dt_raw + dbias[:, None]
                dt1 = dt1 + dbias[:, None]
            if SOFTPLUS:
                dt = tl.where(dt_raw <= 20.0, tl.log(1.0 + tl.exp(dt_raw)), dt_raw)
                dt1 = tl.where(dt1 <= 20.0, tl.log(1.0 + tl.exp(dt1)), dt1)
            else:
                dt = dt_raw
            dt = tl.where(t_ok[None, :], dt, 0.0)
            bc_ok = n_ok[:, None] & t_ok[None, :]
            if not B_CONST:
                B3 = tl.load(B_ptr + b * s_bb + k * s_bk + g * s_bg + n[:, None] * s_bn
                             + p[None, :] * s_bl, mask=bc_ok, other=0.0).to(CDT)[None, :, :]
            if not C_CONST:
                C3 = tl.load(C_ptr + b * s_cb + k * s_ck + g * s_cg + n[:, None] * s_cn
                             + p[None, :] * s_cl, mask=bc_ok, other=0.0).to(CDT)[None, :, :]
            dy = tl.load(dy_ptr + row_L + p[None, :], mask=t_ok[None, :], other=0.0)

            # Recompute the states of this chunk.
            a = tl.exp(dt[:, None, :] * A[:, :, None])
            dtu = dt * u
            x = dtu[:, None, :] * B3
            a_cum, h_loc = tl.associative_scan((a, x), axis=2, combine_fn=_linear_combine)
            hs = a_cum * h0[:, :, None] + h_loc

            # Adjoint g_t = dL/dh_t = a_{t+1} g_{t+1} + C_t dy_t, closed at the chunk's last
            # step by the carry from the next chunk (dlast_state for the last chunk).
            t_last = tl.minimum(CHUNK, L - j * CHUNK) - 1
            alpha = tl.where(t1_ok[None, None, :], tl.exp(dt1[:, None, :] * A[:, :, None]), 0.0)
            beta = C3 * dy[:, None, :] + tl.where(ar_t[None, None, :] == t_last,
                                                  carry[:, :, None], 0.0)
            _, gs = tl.associative_scan((alpha, beta), axis=2, combine_fn=_linear_combine,
                                        reverse=True)
            carry = tl.sum(tl.where(ar_t[None, None, :] == 0, a * gs, 0.0), axis=2)

            row_mask = t_ok[None, :]
            if HAS_Z:  # dz = w * pregate, pregate = sum_k y_k + D u; the D u part is added outside
                w = tl.load(w_ptr + row_L + p[None, :], mask=row_mask, other=0.0)
                dz_part = w * tl.sum(C3 * hs, axis=1)
                if ATOMIC_ROW:
                    tl.atomic_add(dz_ptr + row_L + p[None, :], dz_part, mask=row_mask)
                else:
                    tl.store(dz_ptr + row_L + p[None, :], dz_part, mask=row_mask)
            if C_CONST:
                dC_acc += tl.sum(dy[:, None, :] * hs, axis=2)
            else:
                tl.atomic_add(dC_ptr + bc_L + p[None, :], tl.sum(dy[:, None, :] * hs, axis=0),
                              mask=bc_ok)
            if B_CONST:
                dB_acc += tl.sum(gs * dtu[:, None, :], axis=2)
            else:
                tl.atomic_add(dB_ptr + bc_L + p[None, :], tl.sum(gs * dtu[:, None, :], axis=0),
                              mask=bc_ok)

            gB = tl.sum(gs * B3, axis=1)  # (BLOCK_D, BLOCK_T)
            if ATOMIC_ROW:
                tl.atomic_add(du_ptr + row_L + p[None, :], gB * dt, mask=row_mask)
            else:
                tl.store(du_ptr + row_L + p[None, :], gB * dt, mask=row_mask)
            gah = gs * (hs - x)  # g_t * a_t * h_{t-1}
            ddt = tl.sum(gah * A[:, :, None], axis=1) + gB * u
            if SOFTPLUS:
                ddt = ddt / (1.0 + tl.exp(-dt_raw))
            if ATOMIC_DELTA:
                tl.atomic_add(ddelta_ptr + drow_L + p[None, :], ddt, mask=row_mask)
            else:
                tl.store(ddelta_ptr + drow_L + p[None, :], ddt, mask=row_mask)
            dA_acc += tl.sum(gah * dt[:, None, :], axis=2)

        row = (b * K + k) * dim + d[:, None]
        tl.store(dh0_ptr + row * N + n[None, :], carry, mask=dn_ok)
        kdn = (k * dim + d[:, None]) * N + n[None, :]
        tl.atomic_add(dA_ptr + kdn, dA_acc, mask=dn_ok)
        if B_CONST:
            tl.atomic_add(dB_ptr + kdn, dB_acc, mask=dn_ok)
        if C_CONST:
            tl.atomic_add(dC_ptr + kdn, dC_acc, mask=dn_ok)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


# Tile elements per thread: compiled for sm_90 with ptxas, the forward at 16 elements per thread
# takes about 170 registers and the backward at 8 about 240 with no spills; twice that spills.
_FWD_ELEMS_PER_THREAD = 16
_BWD_ELEMS_PER_THREAD = 8


def _pick_blocks(cpg: int, d_state: int, chunk_size: int, budget: int, block_d: int | None,
                 block_n: int | None) -> tuple[int, int, int]:
    """Tile sizes (BLOCK_D, BLOCK_N, BLOCK_T). BLOCK_T covers one chunk; BLOCK_D is a power of two
    dividing the channels per group ``cpg`` (a block never straddles two groups); the tile
    BLOCK_D * BLOCK_N * BLOCK_T stays within ``budget`` elements where it can."""
    block_t = _next_pow2(chunk_size)
    if block_n is None:
        block_n = min(_next_pow2(d_state), 32, max(4, _next_pow2(budget // block_t + 1) // 2))
    elif block_n < 1 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two, got {block_n}")
    if block_d is None:
        block_d = max(1, min(16, budget // (block_n * block_t)))
        block_d = 1 << (block_d.bit_length() - 1)  # round down to a power of two
        while cpg % block_d:
            block_d //= 2
    elif block_d < 1 or block_d & (block_d - 1) or cpg % block_d:
        raise ValueError(f"block_d must be a power of two dividing the {cpg} channels per group, "
                         f"got {block_d}")
    return block_d, block_n, block_t


def _pick_tiles(cpg: int, d_state: int, chunk_size: int, elems_per_thread: int,
                block_d: int | None, block_n: int | None,
                num_warps: int | None) -> tuple[int, int, int, int]:
    """(BLOCK_D, BLOCK_N, BLOCK_T, num_warps): 4 warps unless a long chunk needs more threads to
    keep ``elems_per_thread`` tile elements per thread (up to 16 warps)."""
    if num_warps is not None:
        return (*_pick_blocks(cpg, d_state, chunk_size, elems_per_thread * 32 * num_warps,
                              block_d, block_n), num_warps)
    for nw in (4, 8, 16):
        bd, bn, bt = _pick_blocks(cpg, d_state, chunk_size, elems_per_thread * 32 * nw,
                                  block_d, block_n)
        if bd * bn * bt <= elems_per_thread * 32 * nw:
            break
    return bd, bn, bt, nw


def _check_runnable(u: torch.Tensor) -> None:
    if triton is None:
        raise ImportError(f"the Triton scan kernels need triton; {_INSTALL_TRITON}")
    if u.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the Triton scan kernels got CPU tensors: set TRITON_INTERPRET=1 before "
                           "triton is first imported to run them in Triton's interpreter")


def _strides(t: torch.Tensor | None, ndim: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * ndim


def _bc_strides(t: torch.Tensor) -> tuple[int, ...]:
    """Strides as (batch, k, group, n, l); a constant (K, dim, N) matrix maps dim to group."""
    if t.dim() == 3:
        return (0, t.stride(0), t.stride(1), t.stride(2), 0)
    return tuple(t.stride())


def selective_scan_fwd_triton(
    x: ScanInputs,
    *,
    return_pregate: bool = False,
    block_d: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """Forward of the unified K-direction selective scan (see the module docstring).

    Shapes as in :class:`~mtssm._ops.scan_inputs.ScanInputs`: u, z (batch, dim, L); delta
    (batch, K, dim, L); A (K, dim, N); B, C (batch, K, G, N, L) or (K, dim, N) (constant over
    batch and time); D, delta_bias (K, dim); initial_state (batch, K, dim, N); perm (K, L)
    integer, row k the positions visited by direction k.

    Returns ``(out, last_state, chunk_states)``: out (batch, dim, L) in u's dtype, last_state
    (batch, K, dim, N) and chunk_states (batch, K, dim, n_chunks, N), the state before step
    ``j * chunk_size``, both fp32 (fp64 when an input is fp64). With ``return_pregate`` a fourth
    tensor follows: ``sum_k y_k + sum_k D_k u`` before the gate, (batch, dim, L) in the compute
    dtype when z is given, else empty. ``block_d``, ``block_n``, ``num_warps`` override the tile
    choice (for tuning; powers of two, ``block_d`` dividing dim // G).
    """
    _check_runnable(x.u)
    batch, K, dim, L, N, groups = check_scan_inputs(x)
    u, delta, A, B, C, D, z, delta_bias, initial_state, perm = x.op_args()[:10]
    cpg = dim // groups
    delta_softplus, chunk_size = x.delta_softplus, int(x.chunk_size)
    n_chunks = max(1, triton.cdiv(L, chunk_size))
    cdt = x.compute_dtype
    BD, BN, BT, num_warps = _pick_tiles(cpg, N, chunk_size, _FWD_ELEMS_PER_THREAD, block_d,
                                        block_n, num_warps)
    n_blocks_n = triton.cdiv(N, BN)
    fused = K == 1 and n_blocks_n == 1
    store_pregate = return_pregate and z is not None
    dev = u.device
    out = torch.empty(batch, dim, L, device=dev, dtype=u.dtype) if fused else \
        torch.zeros(batch, dim, L, device=dev, dtype=cdt)
    pregate = torch.empty(batch, dim, L, device=dev, dtype=cdt) if store_pregate and fused else \
        torch.empty(0, device=dev, dtype=cdt)
    last = torch.empty(batch, K, dim, N, device=dev, dtype=cdt)
    chunk_states = torch.empty(batch, K, dim, n_chunks, N, device=dev, dtype=cdt)
    if L > 0:
        dummy = u  # stands for absent optional tensors; never read
        _scan_fwd_kernel[(batch * K, dim // BD, n_blocks_n)](
            u, delta, A, B, C,
            D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy,
            initial_state if initial_state is not None else dummy,
            perm if perm is not None else dummy,
            out, pregate if pregate.numel() else dummy, last, chunk_states,
            *u.stride(), *delta.stride(), *A.stride(), *_bc_strides(B), *_bc_strides(C),
            *_strides(D, 2), *_strides(z, 3), *_strides(delta_bias, 2),
            *_strides(initial_state, 4), *_strides(perm, 2),
            L, N, cpg, chunk_size, n_chunks,
            K=K, CDT=tl.float64 if cdt == torch.float64 else tl.float32,
            B_CONST=B.dim() == 3, C_CONST=C.dim() == 3,
            HAS_PERM=perm is not None, HAS_DBIAS=delta_bias is not None,
            SOFTPLUS=bool(delta_softplus), HAS_INIT=initial_state is not None,
            FUSED_EPILOGUE=fused, HAS_D=D is not None, HAS_Z=z is not None,
            STORE_PREGATE=store_pregate and fused,
            BLOCK_D=BD, BLOCK_N=BN, BLOCK_T=BT, num_warps=num_warps,
        )
    else:
        last.copy_(initial_state if initial_state is not None else torch.zeros_like(last))
        chunk_states.copy_(last[:, :, :, None, :])
    if not fused:
        if D is not None:
            out = out + D.to(cdt).sum(0)[:, None] * u.to(cdt)
        if store_pregate:
            pregate = out
        if z is not None:
            out = out * F.silu(z.to(cdt))
        out = out.to(u.dtype)
    if return_pregate:
        return out, last, chunk_states, pregate
    return out, last, chunk_states


def selective_scan_bwd_triton(
    x: ScanInputs,
    dout: torch.Tensor,
    dlast_state: torch.Tensor | None,
    chunk_states: torch.Tensor,
    *,
    block_d: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Backward of :func:`selective_scan_fwd_triton`.

    ``dout`` is (batch, dim, L), ``dlast_state`` (batch, K, dim, N) or None, ``chunk_states`` the
    forward's (batch, K, dim, n_chunks, N). Returns ``(du, ddelta, dA, dB, dC, dD, dz,
    ddelta_bias, dinitial_state)`` with the shapes and dtypes of the inputs; an entry whose input
    was None is None.
    """
    _check_runnable(x.u)
    batch, K, dim, L, N, groups = check_scan_inputs(x)
    u, delta, A, B, C, D, z, delta_bias, initial_state, perm = x.op_args()[:10]
    cpg = dim // groups
    delta_softplus, chunk_size = x.delta_softplus, int(x.chunk_size)
    n_chunks = max(1, triton.cdiv(L, chunk_size))
    if dout.shape != u.shape:
        raise ValueError(f"dout must be (batch, dim, L) = {tuple(u.shape)}, "
                         f"got {tuple(dout.shape)}")
    if chunk_states.shape != (batch, K, dim, n_chunks, N):
        raise ValueError(f"chunk_states must be (batch, K, dim, n_chunks, N) = "
                         f"({batch}, {K}, {dim}, {n_chunks}, {N}), got {tuple(chunk_states.shape)}")
    if dlast_state is not None and dlast_state.shape != (batch, K, dim, N):
        raise ValueError(f"dlast_state must be (batch, K, dim, N) = ({batch}, {K}, {dim}, {N}), "
                         f"got {tuple(dlast_state.shape)}")
    cdt = x.compute_dtype
    BD, BN, BT, num_warps = _pick_tiles(cpg, N, chunk_size, _BWD_ELEMS_PER_THREAD, block_d,
                                        block_n, num_warps)
    n_blocks_n = triton.cdiv(N, BN)
    dev = u.device
    opts = dict(device=dev, dtype=cdt)

    dout_c = dout.to(cdt)
    if z is not None:
        zc = z.to(cdt)
        sz = torch.sigmoid(zc)
        dy = (dout_c * zc * sz).contiguous()  # dout * silu(z)
        w = (dout_c * sz * (1.0 + zc * (1.0 - sz))).contiguous()  # dout * silu'(z)
    else:
        dy = dout_c.contiguous()
        w = None
    atomic_row = K > 1 or n_blocks_n > 1
    row_buf = torch.zeros if atomic_row else torch.empty
    du = row_buf(batch, dim, L, **opts)
    dz = row_buf(batch, dim, L, **opts) if z is not None else None
    ddelta = (torch.zeros if n_blocks_n > 1 else torch.empty)(batch, K, dim, L, **opts)
    dA = torch.zeros(K, dim, N, **opts)
    dB = torch.zeros(B.shape if B.dim() == 3 else (batch, K, B.shape[2], N, L), **opts)
    dC = torch.zeros(C.shape if C.dim() == 3 else (batch, K, C.shape[2], N, L), **opts)
    dh0 = torch.empty(batch, K, dim, N, **opts)
    if L > 0:
        dummy = dy
        _scan_bwd_kernel[(batch * K, dim // BD, n_blocks_n)](
            u, delta, A, B, C,
            delta_bias if delta_bias is not None else dummy,
            perm if perm is not None else dummy,
            chunk_states,
            dlast_state if dlast_state is not None else dummy,
            dy, w if w is not None else dummy,
            du, ddelta, dA, dB, dC, dz if dz is not None else dummy, dh0,
            *u.stride(), *delta.stride(), *A.stride(), *_bc_strides(B), *_bc_strides(C),
            *_strides(delta_bias, 2), *_strides(perm, 2), *chunk_states.stride(),
            *_strides(dlast_state, 4),
            L, N, cpg, chunk_size, n_chunks,
            K=K, CDT=tl.float64 if cdt == torch.float64 else tl.float32,
            B_CONST=B.dim() == 3, C_CONST=C.dim() == 3,
            HAS_PERM=perm is not None, HAS_DBIAS=delta_bias is not None,
            SOFTPLUS=bool(delta_softplus), HAS_DLAST=dlast_state is not None,
            HAS_Z=z is not None, ATOMIC_ROW=atomic_row, ATOMIC_DELTA=n_blocks_n > 1,
            BLOCK_D=BD, BLOCK_N=BN, BLOCK_T=BT, num_warps=num_warps,
        )
    else:
        dh0 = dlast_state.to(cdt) if dlast_state is not None else dh0.zero_()

    uc = u.to(cdt)
    d_sum = D.to(cdt).sum(0) if D is not None else None
    if d_sum is not None:
        du = du + d_sum[:, None] * dy
        if dz is not None:
            dz = dz + w * d_sum[:, None] * uc
    dD = (dy * uc).sum((0, 2)).to(D.dtype).unsqueeze(0).repeat(K, 1) if D is not None else None
    ddelta_bias = ddelta.sum((0, 3)).to(delta_bias.dtype) if delta_bias is not None else None
    return (
        du.to(u.dtype),
        ddelta.to(delta.dtype),
        dA.to(A.dtype),
        dB.to(B.dtype),
        dC.to(C.dtype),
        dD,
        dz.to(z.dtype) if dz is not None else None,
        ddelta_bias,
        dh0.to(initial_state.dtype) if initial_state is not None else None,
    )

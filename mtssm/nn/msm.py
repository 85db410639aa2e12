"""MSM: Multi-Scale Mamba for multi-task dense prediction (blocks, stages, decoder).

MSM extends MTMamba by replacing the single-scale 2-D selective scan inside its Mamba feature
extractors with the Multi-Scale Scan (MS-Scan):

- :class:`MSScan` splits the ``D`` scanned channels into one group per scale ``s``, turns each
  ``s x s`` window of a group into one token (``m*s*s`` channels on an ``(H/s) x (W/s)`` grid),
  runs a 4-direction selective scan per branch, and puts windows and groups back.
- :class:`MSSS2D` is :class:`~mtssm.nn.ss2d.SS2D` with its scan replaced by an :class:`MSScan`
  (in_proj, depthwise conv, SiLU, MS-Scan, LayerNorm[, SiLU gate, out_proj]); with
  ``scales=(1,)`` it is exactly SS2D.
- :class:`TSMSMBlock` (task-specific): ``x + DropPath(MSSS2D(LN(x)))`` — MTMamba's STM block with
  MS-Scan (the paper's eq. 4).
- :class:`CTMSMBlock` (cross-task): a shared gate-less MSSS2D over ``LN(concat_t x_t)`` merged
  into every task with MTMamba's Merge (the paper's eq. 5 and eqs. 11-14 of its Appendix A.1).
- :class:`MFRStage`: per task PatchExpand, concat with the encoder skip, Linear, ``depth``
  TS-MSM blocks; then one CT-MSM block.
- :class:`MSMDecoder`: three MFR stages (per-stage scales, default ``{1, 4}`` everywhere — the
  paper's best); :func:`build_msm` adds per task an Expand + Linear head (MTMamba's).

The branch scans keep the ``dt_rank`` and ``d_state`` of the extractor, so MS-Scan costs the same
FLOPs as a plain scan while its projections grow with ``s*s`` (as the paper's Table 6 reports:
+0.01 GFLOPs, 307.99 M -> 396.54 M parameters with a Swin-L encoder on NYUDv2).

Layout: decoder features are channels-last ``(B, H, W, C)``; scans and encoder features are
channels-first ``(B, C, H, W)``. ``B`` batch, ``C`` model channels, ``D = expand*C`` scanned
channels, ``N`` d_state, ``R`` dt_rank, ``K = 4`` scan directions, ``T`` tasks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import Tensor, nn

from mtssm.nn import functional as MF
from mtssm.nn.heads import ExpandHead
from mtssm.nn.layers import DropPath, PatchExpand, drop_path_rates
from mtssm.nn.mtmamba import check_features
from mtssm.nn.ss2d import SS2D

__all__ = [
    "MSM_SCALE_PRESETS",
    "CTMSMBlock",
    "MFRStage",
    "MSMDecoder",
    "MSSS2D",
    "MSScan",
    "ScanCore2D",
    "TSMSMBlock",
    "build_msm",
]

#: Per-stage scan scales of the paper's ablations (Fig. 5 and Table 4), by name.
MSM_SCALE_PRESETS: dict[str, tuple[tuple[int, ...], ...]] = {
    "1-4": ((1, 4), (1, 4), (1, 4)),  # the paper's final configuration
    "1-2": ((1, 2), (1, 2), (1, 2)),  # Fig. 5, type 1
    "1-2/1-4/1-6": ((1, 2), (1, 4), (1, 6)),  # Fig. 5, type 2
    "1-2-4": ((1, 2, 4), (1, 2, 4), (1, 2, 4)),  # Table 4
    "1-2/1-2-4/1-2-4-6": ((1, 2), (1, 2, 4), (1, 2, 4, 6)),  # Table 4 (the statistics of Fig. 4)
    "1": ((1,), (1,), (1,)),  # single scale: MTMamba
}

def _check_scales(scales: Sequence[int]) -> tuple[int, ...]:
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence) or len(scales) == 0:
        raise ValueError(f"scales must be a non-empty sequence of positive ints, got {scales!r}")
    out = tuple(scales)
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in out):
        raise ValueError(f"scales must be positive ints, got {scales!r}")
    return out


class ScanCore2D(nn.Module):
    """The parameters and call of SS2D's K-direction selective scan, without projections or norm.

    ``(B, D, H, W) -> (B, D, H, W)``: the per-direction ``x_proj`` (D -> R + 2N) and ``dt_proj``
    (R -> D), ``A = -exp(A_logs)`` and ``D`` skip, summed over the ``K`` directions of ``order``.
    Parameter names and initialisation are those of :class:`~mtssm.nn.ss2d.SS2D`.

    Args:
        d_inner: scanned channels D.
        d_state: N.
        dt_rank: R.
        order: scan order name or a ``(K, H*W)`` LongTensor (see ``selective_scan_2d``).
        dt_min, dt_max, dt_init_floor: initial step range, as in SS2D.
    """

    def __init__(
        self,
        d_inner: int,
        d_state: int = 16,
        dt_rank: int = 1,
        order: str = "ss2d",
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("d_inner", d_inner), ("d_state", d_state), ("dt_rank", dt_rank)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        fk = {"device": device, "dtype": dtype}
        k = 4
        self.d_inner, self.d_state, self.dt_rank, self.order, self.K = d_inner, d_state, dt_rank, order, k
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.x_proj_weight = nn.Parameter(torch.empty(k, dt_rank + 2 * d_state, d_inner, **fk))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d_inner, dt_rank, **fk))
        self.dt_projs_bias = nn.Parameter(torch.empty(k * d_inner, **fk))
        self.A_logs = nn.Parameter(torch.empty(k * d_inner, d_state, device=device, dtype=torch.float32))
        self.Ds = nn.Parameter(torch.empty(k * d_inner, device=device, dtype=torch.float32))
        self.A_logs._no_weight_decay = True  # type: ignore[attr-defined]
        self.Ds._no_weight_decay = True  # type: ignore[attr-defined]
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba's initialisation (x_proj as nn.Linear, dt via inverse softplus, S4D-real A, D = 1)."""
        bound = self.d_inner**-0.5
        self.x_proj_weight.uniform_(-bound, bound)
        std = self.dt_rank**-0.5
        self.dt_projs_weight.uniform_(-std, std)
        lo, hi = math.log(self.dt_min), math.log(self.dt_max)
        dt = torch.exp(torch.rand_like(self.dt_projs_bias, dtype=torch.float32) * (hi - lo) + lo)
        dt = dt.clamp(min=self.dt_init_floor)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_logs.device)
        self.A_logs.copy_(torch.log(a).expand_as(self.A_logs))
        self.Ds.fill_(1.0)

    def forward(self, u: Tensor) -> Tensor:
        """u: (B, D, H, W) -> (B, D, H, W), the sum of the K directional scans."""
        b, d, h, w = u.shape
        x_dbl = torch.einsum("bdl,kcd->bkcl", u.reshape(b, d, h * w), self.x_proj_weight)
        dts, bs, cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)
        y = MF.selective_scan_2d(
            u,
            dts,
            -torch.exp(self.A_logs.float()),
            bs,
            cs,
            self.Ds,
            delta_bias=self.dt_projs_bias,
            delta_softplus=True,
            order=self.order,
        )
        return y.to(u.dtype)

    def extra_repr(self) -> str:
        return f"d_inner={self.d_inner}, d_state={self.d_state}, dt_rank={self.dt_rank}, order={self.order!r}"


class MSScan(nn.Module):
    """Multi-Scale Scan (MSM eqs. 7-9): channel split, window tokenisation, scan, inverse, concat.

    ``(B, D, H, W) -> (B, D, H, W)``. Group ``i`` (``m = D / len(scales)`` channels) is tokenised at
    scale ``s_i`` into ``(B, m*s_i*s_i, ceil(H/s_i), ceil(W/s_i))`` (zero padding at the bottom and
    right when ``s_i`` does not divide H or W; the padded cells are scanned like any other token
    and cropped afterwards), scanned by its own :class:`ScanCore2D`, and windowed back.

    Args:
        d_inner: D, divisible by ``len(scales)``.
        scales: scan scale of each branch, e.g. ``(1, 4)``.
        d_state: N of every branch.
        dt_rank: R of every branch (MSM keeps the extractor's ``ceil(C/16)``).
        dt_min, dt_max, dt_init_floor: initial step range.
    """

    def __init__(
        self,
        d_inner: int,
        scales: Sequence[int] = (1, 4),
        d_state: int = 16,
        dt_rank: int = 1,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.scales = _check_scales(scales)
        n = len(self.scales)
        if d_inner % n:
            raise ValueError(f"d_inner={d_inner} must be divisible by the number of scales {n} ({self.scales})")
        self.d_inner, self.group = d_inner, d_inner // n
        self.branches = nn.ModuleList(
            ScanCore2D(
                self.group * s * s, d_state, dt_rank, "ss2d", dt_min, dt_max, dt_init_floor,
                device=device, dtype=dtype,
            )
            for s in self.scales
        )

    def forward(self, u: Tensor) -> Tensor:
        """u: (B, D, H, W) -> (B, D, H, W)."""
        if u.ndim != 4 or u.shape[1] != self.d_inner:
            raise ValueError(f"MSScan expects u of shape (B, {self.d_inner}, H, W), got {tuple(u.shape)}")
        h, w = u.shape[-2:]
        outs = []
        for s, core, part in zip(self.scales, self.branches, u.split(self.group, dim=1)):
            tokens = MF.window_tokenize(part, s)  # (B, m*s*s, ceil(H/s), ceil(W/s))
            outs.append(MF.window_untokenize(core(tokens), s, h, w))
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]

    def extra_repr(self) -> str:
        return f"d_inner={self.d_inner}, scales={self.scales}"


class MSSS2D(nn.Module):
    """SS2D with a Multi-Scale Scan: ``(B, H, W, C_in) -> (B, H, W, C)`` (gated) or ``(B, H, W, D)``.

    in_proj (C_in -> 2D as (x, z) when gated, else C_in -> D; no bias) -> depthwise ``d_conv``
    conv (bias) -> SiLU -> :class:`MSScan` -> LayerNorm(D) [-> * silu(z) -> out_proj D -> C].
    Parameter names follow :class:`~mtssm.nn.ss2d.SS2D` (the scan's live in ``ms_scan.branches``);
    with ``scales=(1,)`` it computes exactly SS2D.

    Args:
        d_model: C; sets D = expand*C and R = ceil(C/16) (``dt_rank="auto"``), shared by every branch.
        scales: MS-Scan scales.
        d_state, expand, dt_rank, d_conv, gated, dt_min, dt_max, dt_init_floor, dropout, in_dim:
            as in :class:`~mtssm.nn.ss2d.SS2D`.
    """

    def __init__(
        self,
        d_model: int,
        scales: Sequence[int] = (1, 4),
        d_state: int = 16,
        expand: float = 2,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        gated: bool = True,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dropout: float = 0.0,
        in_dim: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dt_rank != "auto" and not (isinstance(dt_rank, int) and dt_rank > 0):
            raise ValueError(f"dt_rank must be a positive int or 'auto', got {dt_rank!r}")
        if d_conv % 2 != 1:
            raise ValueError(f"d_conv must be odd to keep the map size, got {d_conv}")
        fk = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.in_dim = d_model if in_dim is None else in_dim
        self.d_inner = d = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.gated = gated
        self.in_proj = nn.Linear(self.in_dim, 2 * d if gated else d, bias=False, **fk)
        self.conv2d = nn.Conv2d(d, d, d_conv, padding=(d_conv - 1) // 2, groups=d, bias=True, **fk)
        self.act = nn.SiLU()
        self.ms_scan = MSScan(d, scales, d_state, self.dt_rank, dt_min, dt_max, dt_init_floor, **fk)
        self.out_norm = nn.LayerNorm(d, **fk)
        self.out_proj = nn.Linear(d, d_model, bias=False, **fk) if gated else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def scales(self) -> tuple[int, ...]:
        return self.ms_scan.scales

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, H, W, C_in) -> (B, H, W, C) if gated else (B, H, W, D)."""
        if x.ndim != 4 or x.shape[-1] != self.in_dim:
            raise ValueError(f"MSSS2D expects x channels-last (B, H, W, {self.in_dim}), got {tuple(x.shape)}")
        z = None
        if self.gated:
            u, z = self.in_proj(x).chunk(2, dim=-1)
        else:
            u = self.in_proj(x)
        u = self.act(self.conv2d(u.permute(0, 3, 1, 2)))  # (B, D, H, W)
        y = self.out_norm(self.ms_scan(u).permute(0, 2, 3, 1))  # (B, H, W, D)
        if self.out_proj is not None:
            y = self.out_proj(y * F.silu(z))
        return self.dropout(y)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, in_dim={self.in_dim}, d_inner={self.d_inner}, "
            f"dt_rank={self.dt_rank}, gated={self.gated}"
        )


class TSMSMBlock(nn.Module):
    """Task-specific multi-scale Mamba block: ``x + DropPath(MSSS2D(LN(x)))`` on (B, H, W, C).

    The scan branch (in_proj, conv, SiLU, MS-Scan, LN), the gating branch (``silu(z)``), the linear
    projection and the residual of the paper's eq. 4.
    """

    def __init__(
        self,
        dim: int,
        scales: Sequence[int] = (1, 4),
        d_state: int = 16,
        expand: float = 2,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        drop_path: float = 0.0,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.norm = norm_layer(dim, **fk)
        self.op = MSSS2D(dim, scales, d_state, expand, dt_rank, d_conv, gated=True, **fk)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        return x + self.drop_path(self.op(self.norm(x)))


class CTMSMBlock(nn.Module):
    """Cross-task multi-scale Mamba block: shared MS-Scan feature merged into every task.

    For tasks ``t`` with features ``x_t`` (B, H, W, C)::

        F_ms  = MSSS2D_gateless(LN(concat_t x_t))          # (B, H, W, D), eq. 5
        z_t   = LN_t(x_t)                                   # eq. 11
        G_t   = sigmoid(P_t(z_t))                           # eq. 12 (P_t: Linear C -> D)
        F^_t  = SS2D_gateless_t(z_t)                        # eq. 13 (LN o SS2D o SiLU o Conv o P)
        out_t = x_t + DropPath(out_proj_t(G_t * F_ms + (1 - G_t) * F^_t))   # eq. 14 + projection

    i.e. MTMamba's CTM block with its shared extractor's scan replaced by MS-Scan.
    """

    def __init__(
        self,
        dim: int,
        tasks: Sequence[str],
        scales: Sequence[int] = (1, 4),
        d_state: int = 16,
        expand: float = 2,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        drop_path: float = 0.0,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.tasks = list(tasks)
        if not self.tasks:
            raise ValueError("tasks must name at least one task")
        fk = {"device": device, "dtype": dtype}
        t = len(self.tasks)
        self.norm_share = norm_layer(t * dim, **fk)
        self.op_share = MSSS2D(dim, scales, d_state, expand, dt_rank, d_conv, gated=False, in_dim=t * dim, **fk)
        d = self.op_share.d_inner
        self.norm = nn.ModuleDict({k: norm_layer(dim, **fk) for k in self.tasks})
        self.op = nn.ModuleDict(
            {k: SS2D(dim, d_state, expand, dt_rank, d_conv, gated=False, **fk) for k in self.tasks}
        )
        self.gate = nn.ModuleDict({k: nn.Linear(dim, d, bias=False, **fk) for k in self.tasks})
        self.out_proj = nn.ModuleDict({k: nn.Linear(d, dim, bias=False, **fk) for k in self.tasks})
        self.drop_path = DropPath(drop_path)

    def forward(self, xs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """xs {task: (B, H, W, C)} -> {task: (B, H, W, C)}."""
        missing = [k for k in self.tasks if k not in xs]
        if missing:
            raise ValueError(f"CTMSMBlock is missing features of tasks {missing}; expected {self.tasks}")
        shared = self.op_share(self.norm_share(torch.cat([xs[k] for k in self.tasks], dim=-1)))
        out = {}
        for k in self.tasks:
            z = self.norm[k](xs[k])
            g = torch.sigmoid(self.gate[k](z))
            merged = g * shared + (1 - g) * self.op[k](z)
            out[k] = xs[k] + self.drop_path(self.out_proj[k](merged))
        return out



class MFRStage(nn.Module):
    """Multi-scale Mamba Feature Refinement block (one decoder stage).

    Per task: PatchExpand (``in_dim -> in_dim/2`` at twice the size), concat with the encoder skip
    (``skip_dim`` channels; the expanded map is cropped when the encoder rounded odd sizes up),
    Linear(``in_dim/2 + skip_dim -> dim``), ``depth`` :class:`TSMSMBlock`; then one
    :class:`CTMSMBlock` over all tasks.

    ``forward({task: (B, H, W, in_dim)}, skip (B, 2H, 2W, skip_dim)) -> {task: (B, 2H, 2W, dim)}``.

    Args:
        tasks: task names.
        in_dim: channels of the incoming task features (the deepest encoder map for stage 1).
        skip_dim: channels of the encoder skip at this stage's resolution.
        dim: this stage's channels (MTMamba and MSM use ``skip_dim``).
        scales: MS-Scan scales of every block of this stage.
        depth: TS-MSM blocks per task (the paper: 2).
        drop_path: ``depth + 1`` stochastic-depth rates (TS-MSM blocks, then CT-MSM).
        d_state, expand, dt_rank, d_conv: extractor hyperparameters.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        in_dim: int,
        skip_dim: int,
        dim: int,
        scales: Sequence[int] = (1, 4),
        depth: int = 2,
        drop_path: Sequence[float] | None = None,
        d_state: int = 16,
        expand: float = 2,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.tasks = tuple(tasks)
        rates = [0.0] * (depth + 1) if drop_path is None else [float(p) for p in drop_path]
        if len(rates) != depth + 1:
            raise ValueError(f"drop_path needs depth + 1 = {depth + 1} rates for this stage, got {len(rates)}")
        if in_dim % 2:
            raise ValueError(f"stage input channels must be even for PatchExpand, got {in_dim}")
        self.in_dim, self.skip_dim, self.dim = in_dim, skip_dim, dim
        ssm = {"d_state": d_state, "expand": expand, "dt_rank": dt_rank, "d_conv": d_conv}
        self.expand = nn.ModuleDict({t: PatchExpand(in_dim, norm_layer=norm_layer, **fk) for t in self.tasks})
        self.fuse = nn.ModuleDict({t: nn.Linear(in_dim // 2 + skip_dim, dim, **fk) for t in self.tasks})
        self.blocks = nn.ModuleDict(
            {
                t: nn.Sequential(
                    *(
                        TSMSMBlock(dim, scales, drop_path=rates[j], norm_layer=norm_layer, **ssm, **fk)
                        for j in range(depth)
                    )
                )
                for t in self.tasks
            }
        )
        self.cross = CTMSMBlock(
            dim, self.tasks, scales, drop_path=rates[depth], norm_layer=norm_layer, **ssm, **fk
        )

    def forward(self, xs: Mapping[str, Tensor], skip: Tensor) -> dict[str, Tensor]:
        h, w = skip.shape[1], skip.shape[2]
        out = {}
        for t in self.tasks:
            y = self.expand[t](xs[t])
            if y.shape[1] < h or y.shape[2] < w:
                raise ValueError(f"upsampled feature {tuple(y.shape)} is smaller than the skip {tuple(skip.shape)}")
            y = torch.cat([y[:, :h, :w], skip], dim=-1)
            out[t] = self.blocks[t](self.fuse[t](y))
        return self.cross(out)


def _stage_scales(scales: str | Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    if isinstance(scales, str):
        if scales not in MSM_SCALE_PRESETS:
            raise ValueError(f"unknown scales preset {scales!r}; expected one of {sorted(MSM_SCALE_PRESETS)}")
        scales = MSM_SCALE_PRESETS[scales]
    out = [_check_scales(s) for s in scales]
    if len(out) != 3:
        raise ValueError(f"scales must give one scale set per stage (3), got {len(out)}: {scales!r}")
    return out


class MSMDecoder(nn.Module):
    """The MSM decoder over a 4-level encoder: 3 MFR stages at strides 16, 8, 4.

    ``forward([f_1..f_4] with f_i (B, C_i, H/s_i, W/s_i)) -> TensorDict {task: (B, C, H/4, W/4)}``
    (batch size ``[B]``, channels-first, ``C = dims[-1]``; the heads turn it into predictions).

    Args:
        in_channels: encoder channels ``[C_1, C_2, C_3, C_4]`` (strides 4, 8, 16, 32).
        tasks: task names.
        scales: scan scales of each stage (three sequences), or a key of
            :data:`MSM_SCALE_PRESETS` (default ``"1-4"``: ``{1, 4}`` in all three, the paper's best).
        dims: channels of the 3 stages (default the skips' channels ``[C_3, C_2, C_1]``).
        depths: TS-MSM blocks per task in each stage (the paper: 2).
        drop_path_rate: stochastic depth, decreasing linearly to 0 over all blocks in order.
        d_state, expand, dt_rank, d_conv: extractor hyperparameters of every block.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        tasks: Sequence[str],
        scales: str | Sequence[Sequence[int]] = "1-4",
        dims: Sequence[int] | None = None,
        depths: Sequence[int] = (2, 2, 2),
        drop_path_rate: float = 0.2,
        d_state: int = 16,
        expand: float = 2,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        if len(in_channels) != 4:
            raise ValueError(f"in_channels must list 4 encoder levels, got {list(in_channels)}")
        self.in_channels = tuple(int(c) for c in in_channels)
        self.tasks = tuple(tasks)
        if not self.tasks:
            raise ValueError("tasks must name at least one task")
        dims = tuple(self.in_channels[2::-1]) if dims is None else tuple(int(d) for d in dims)
        if len(dims) != 3 or len(depths) != 3:
            raise ValueError(f"dims and depths must have 3 entries (one per stage), got {dims} and {tuple(depths)}")
        self.stage_scales = _stage_scales(scales)
        self.dims = dims
        n_per_stage = [d + 1 for d in depths]
        rates = drop_path_rates(drop_path_rate, sum(n_per_stage))
        stages, in_dim, start = [], self.in_channels[3], 0
        for i in range(3):
            stages.append(
                MFRStage(
                    self.tasks, in_dim, self.in_channels[2 - i], dims[i], self.stage_scales[i], depths[i],
                    rates[start : start + n_per_stage[i]], d_state, expand, dt_rank, d_conv, norm_layer, **fk,
                )
            )
            start += n_per_stage[i]
            in_dim = dims[i]
        self.stages = nn.ModuleList(stages)
        self.out_channels = {t: dims[-1] for t in self.tasks}
        self.out_stride = 4

    def forward(self, features: Sequence[Tensor]) -> TensorDict:
        check_features(features, self.in_channels, type(self).__name__)
        feats = [f.permute(0, 2, 3, 1) for f in features]  # channels-last
        x: dict[str, Tensor] = {t: feats[3] for t in self.tasks}
        for i, stage in enumerate(self.stages):
            x = stage(x, feats[2 - i])
        return TensorDict({t: v.permute(0, 3, 1, 2) for t, v in x.items()}, batch_size=[features[0].shape[0]])


def build_msm(
    encoder_channels: Sequence[int],
    tasks: Mapping[str, int],
    **decoder_kwargs,
) -> tuple[MSMDecoder, nn.ModuleDict]:
    """The MSM decoder and its heads (Expand + Linear: FinalPatchExpand4x + 1x1 conv per task)."""
    device, dtype = decoder_kwargs.get("device"), decoder_kwargs.get("dtype")
    decoder = MSMDecoder(encoder_channels, list(tasks), **decoder_kwargs)
    heads = nn.ModuleDict(
        {t: ExpandHead(decoder.out_channels[t], c, device=device, dtype=dtype) for t, c in tasks.items()}
    )
    return decoder, heads

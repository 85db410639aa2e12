"""SS2D, the 2-D selective-scan feature extractor of VMamba/MTMamba, and its cross variant.

Shapes: ``B`` batch, ``H, W`` spatial size, ``L = H*W``, ``C`` model channels, ``D = expand*C``
(``d_inner``), ``N`` state size (``d_state``), ``R`` the rank of the step projection (``dt_rank``),
``K`` the number of scan directions. Inputs and outputs are channels-last ``(B, H, W, C)``.

All ``K`` directions run in ONE call of :func:`mtssm.nn.functional.selective_scan_2d`; the
per-direction projections are pointwise, so ``delta``, ``B`` and ``C`` are computed once in
row-major spatial order and the op visits them in each direction's order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtssm.nn import functional as MF

__all__ = ["SS2D", "CrossSS2D", "num_directions"]

#: Number of scan directions of each named scan order.
ORDER_DIRECTIONS: dict[str, int] = {"ss2d": 4, "hilbert": 4}

ScanOrder = str | Tensor


def num_directions(order: ScanOrder) -> int:
    """``K`` of a scan order: a name in :data:`ORDER_DIRECTIONS` or a LongTensor ``(K, H*W)``."""
    if isinstance(order, Tensor):
        if order.ndim != 2 or order.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"order tensor must be an integer (K, H*W) tensor, got {order.dtype} {tuple(order.shape)}"
            )
        return int(order.shape[0])
    if order not in ORDER_DIRECTIONS:
        raise ValueError(
            f"unknown scan order {order!r}; expected one of {sorted(ORDER_DIRECTIONS)} or a (K, H*W) LongTensor"
        )
    return ORDER_DIRECTIONS[order]


class SS2D(nn.Module):
    """Mamba feature extractor over a 2-D map, scanned in ``K`` directions.

    ``(B, H, W, C_in) -> (B, H, W, C)`` when ``gated`` (MTMamba's MFE with its SiLU gate and output
    projection), ``(B, H, W, D)`` when not (the gate-less MFE of the CTM block):

    in_proj (C_in -> 2D as (x, z) when gated, else C_in -> D; no bias) -> depthwise ``d_conv`` conv
    (bias) -> SiLU -> K-direction selective scan -> LayerNorm(D) [-> * silu(z) -> out_proj D -> C].

    Args:
        d_model: model channels ``C``; sets ``D = expand*C`` and ``R = ceil(C/16)``.
        d_state: state size ``N``.
        expand: ``D / C``.
        dt_rank: rank ``R`` of the step projection, or ``"auto"`` for ``ceil(C/16)``.
        d_conv: depthwise convolution kernel size.
        gated: with the ``z`` gate and the output projection (``False`` gives MTMamba's gate-less
            extractor, which returns ``D`` channels).
        order: scan order: ``"ss2d"`` (row-major, column-major and both reversed), ``"hilbert"``, or
            a LongTensor ``(K, H*W)`` of row-major indices in visit order (then only maps of that
            size are accepted).
        dt_min, dt_max, dt_init_floor: the step ``softplus(dt_bias)`` starts log-uniform in
            ``[dt_min, dt_max]``, at least ``dt_init_floor``.
        dropout: dropout on the output.
        in_dim: input channels ``C_in`` (default ``C``; the CTM's shared extractor reads ``T*C``).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        expand: float = 2,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        gated: bool = True,
        order: ScanOrder = "ss2d",
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dropout: float = 0.0,
        in_dim: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dt_rank != "auto" and not (isinstance(dt_rank, int) and dt_rank > 0):
            raise ValueError(f"dt_rank must be a positive int or 'auto', got {dt_rank!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        if d_conv % 2 != 1:
            raise ValueError(f"d_conv must be odd to keep the map size, got {d_conv}")
        fk = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.in_dim = d_model if in_dim is None else in_dim
        self.d_state = d_state
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.gated = gated
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.K = num_directions(order)
        if isinstance(order, Tensor):
            self.register_buffer("order", order.to(device=device, dtype=torch.long), persistent=False)
        else:
            self.order = order
        d, k = self.d_inner, self.K

        self.in_proj = nn.Linear(self.in_dim, 2 * d if gated else d, bias=False, **fk)
        self.conv2d = nn.Conv2d(d, d, d_conv, padding=(d_conv - 1) // 2, groups=d, bias=True, **fk)
        self.act = nn.SiLU()
        self.x_proj_weight = nn.Parameter(torch.empty(k, self.dt_rank + 2 * d_state, d, **fk))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d, self.dt_rank, **fk))
        self.dt_projs_bias = nn.Parameter(torch.empty(k * d, **fk))
        # A and D stay fp32 whatever the module dtype (as in Mamba).
        self.A_logs = nn.Parameter(torch.empty(k * d, d_state, device=device, dtype=torch.float32))
        self.Ds = nn.Parameter(torch.empty(k * d, device=device, dtype=torch.float32))
        self.A_logs._no_weight_decay = True  # type: ignore[attr-defined]
        self.Ds._no_weight_decay = True  # type: ignore[attr-defined]
        self.out_norm = nn.LayerNorm(d, **fk)
        self.out_proj = nn.Linear(d, d_model, bias=False, **fk) if gated else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba's initialisation of the scan parameters (the linear layers keep PyTorch's).

        ``x_proj`` as ``nn.Linear(D, R + 2N)``; ``dt_proj`` weight uniform in ``±R^-0.5``;
        ``dt_bias`` the inverse softplus of a step log-uniform in ``[dt_min, dt_max]`` (floored);
        ``A_log = log(1..N)`` (S4D-real); ``D = 1``.
        """
        bound = self.d_inner**-0.5  # nn.Linear's default: kaiming_uniform(a=sqrt(5)) == U(±1/sqrt(fan_in))
        self.x_proj_weight.uniform_(-bound, bound)
        std = self.dt_rank**-0.5
        self.dt_projs_weight.uniform_(-std, std)
        lo, hi = math.log(self.dt_min), math.log(self.dt_max)
        dt = torch.exp(torch.rand_like(self.dt_projs_bias, dtype=torch.float32) * (hi - lo) + lo)
        dt = dt.clamp(min=self.dt_init_floor)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_logs.device)
        self.A_logs.copy_(torch.log(a).expand_as(self.A_logs))
        self.Ds.fill_(1.0)

    def ssm(self, u: Tensor, src: Tensor) -> Tensor:
        """The K-direction selective scan of ``u`` with ``delta, B, C`` computed from ``src``.

        Args:
            u: scanned input ``(B, D, H, W)``.
            src: ``(B, D, H, W)`` the step and ``B, C`` projections read (``u`` itself in SS2D).

        Returns:
            ``(B, H, W, D)``: the sum over directions, layer-normalised.
        """
        b, d, h, w = u.shape
        x_dbl = torch.einsum("bdl,kcd->bkcl", src.reshape(b, d, h * w), self.x_proj_weight)
        dts, bs, cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)  # (B, K, D, L)
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
        )  # (B, D, H, W)
        return self.out_norm(y.permute(0, 2, 3, 1).to(u.dtype))

    def _gate_out(self, y: Tensor, z: Tensor | None) -> Tensor:
        if self.out_proj is not None:
            y = self.out_proj(y * F.silu(z))
        return self.dropout(y)

    def _check_input(self, x: Tensor, name: str, channels: int) -> None:
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(
                f"{type(self).__name__} expects {name} channels-last (B, H, W, {channels}), got {tuple(x.shape)}"
            )

    def _conv(self, u: Tensor) -> Tensor:
        """Depthwise conv + SiLU: channels-last ``(B, H, W, D)`` -> channels-first ``(B, D, H, W)``."""
        return self.act(self.conv2d(u.permute(0, 3, 1, 2)))

    def forward(self, x: Tensor) -> Tensor:
        """``x: (B, H, W, C_in)`` -> ``(B, H, W, C)`` if gated else ``(B, H, W, D)``."""
        self._check_input(x, "x", self.in_dim)
        z = None
        if self.gated:
            u, z = self.in_proj(x).chunk(2, dim=-1)
        else:
            u = self.in_proj(x)
        u = self._conv(u)
        return self._gate_out(self.ssm(u, u), z)

    def extra_repr(self) -> str:
        order = "tensor" if isinstance(self.order, Tensor) else repr(self.order)
        return (
            f"d_model={self.d_model}, in_dim={self.in_dim}, d_inner={self.d_inner}, d_state={self.d_state}, "
            f"dt_rank={self.dt_rank}, K={self.K}, gated={self.gated}, order={order}"
        )


class CrossSS2D(SS2D):
    """Cross SS2D of MTMamba++'s S-CTM: scans a task feature under a shared feature's selection.

    The task feature ``x`` gives the scanned input ``u`` (in_proj, depthwise conv, SiLU), the ``D``
    skip and the ``z`` gate; the shared feature gives the step ``delta`` and ``B``, ``C``, through
    its own projection ``in_proj_cross`` (``C_shared -> D``, no conv) and the per-direction
    ``x_proj`` / ``dt_proj``.

    ``forward(x (B, H, W, C), shared (B, H, W, C_shared)) -> (B, H, W, C)``. Same arguments as
    :class:`SS2D` plus ``cross_dim`` (``C_shared``, default ``C``); always gated.
    """

    def __init__(self, d_model: int, *args, cross_dim: int | None = None, **kwargs) -> None:
        if kwargs.get("gated", True) is not True:
            raise ValueError("CrossSS2D is always gated (it needs the z gate and out_proj)")
        super().__init__(d_model, *args, **kwargs)
        self.cross_dim = d_model if cross_dim is None else cross_dim
        self.in_proj_cross = nn.Linear(
            self.cross_dim, self.d_inner, bias=False, device=self.in_proj.weight.device, dtype=self.in_proj.weight.dtype
        )

    def forward(self, x: Tensor, shared: Tensor) -> Tensor:  # type: ignore[override]
        """``x: (B, H, W, C)``, ``shared: (B, H, W, C_shared)`` -> ``(B, H, W, C)``."""
        self._check_input(x, "x", self.in_dim)
        self._check_input(shared, "shared", self.cross_dim)
        if shared.shape[:3] != x.shape[:3]:
            raise ValueError(
                "CrossSS2D needs x and shared of the same (B, H, W), "
                f"got {tuple(x.shape[:3])} and {tuple(shared.shape[:3])}"
            )
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u = self._conv(u)
        src = self.in_proj_cross(shared).permute(0, 3, 1, 2)
        return self._gate_out(self.ssm(u, src), z)

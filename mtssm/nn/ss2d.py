"""SS2D, the 2-D selective-scan feature extractor of VMamba/MTMamba, with a pluggable scan core.

Shapes: ``B`` batch, ``H, W`` spatial size, ``L = H*W``, ``C`` model channels, ``D = expand*C``
(``d_inner``), ``N`` state size (``d_state``), ``R`` the rank of the step projection (``dt_rank``),
``K`` the number of scan directions. Inputs and outputs are channels-last ``(B, H, W, C)``.

The decoders compose one extractor, :class:`SS2D` (in_proj, depthwise conv, SiLU, scan core,
LayerNorm, optional SiLU gate and out_proj), with a scan core:

- the plain K-direction scan (default): ``x_proj``/``dt_proj`` per direction, ``A`` and ``D``, all
  ``K`` directions in ONE call of :func:`mtssm.nn.functional.selective_scan_2d` (the projections are
  pointwise, so ``delta``, ``B`` and ``C`` are computed once in row-major order and the op visits them
  in each direction's order). Its parameters are SS2D's own (the layout of VMamba/MTMamba
  checkpoints); :class:`DirectionalScan` is the same core as a module of its own;
- any ``scan_layer`` module ``(u, src) -> y`` on ``(B, D, H, W)`` maps, e.g. MSM's
  :class:`~mtssm.nn.msm.MSScan`;
- the cross scan (``cross_dim``, MTMamba++'s S-CTM): the step and ``B``, ``C`` are read from a
  second, shared feature (:class:`CrossSS2D`).

Mamba's initialisation of the scan parameters is :func:`mamba_init_` (also used by PAMM).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtssm._ops.orders import ORDER_NAMES
from mtssm.nn import functional as MF

__all__ = ["SS2D", "CrossSS2D", "DirectionalScan", "ScanLayer", "mamba_init_", "num_directions"]

ScanOrder = str | Tensor

#: A scan core factory: ``scan_layer(d_inner, *, d_state, dt_rank, order, dt_min, dt_max,
#: dt_init_floor, device, dtype)`` -> a module ``(u (B, D, H, W), src (B, D, H, W)) -> (B, D, H, W)``
#: that scans ``u`` with ``delta``, ``B``, ``C`` computed from ``src``.
ScanLayer = Callable[..., nn.Module]


def num_directions(order: ScanOrder) -> int:
    """``K`` of a scan order: a name of :func:`mtssm.nn.functional.scan_order` or a LongTensor ``(K, H*W)``."""
    if isinstance(order, Tensor):
        if order.ndim != 2 or order.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"order tensor must be an integer (K, H*W) tensor, got {order.dtype} {tuple(order.shape)}"
            )
        return int(order.shape[0])
    if order not in ORDER_NAMES:
        raise ValueError(
            f"unknown scan order {order!r}; expected one of {sorted(ORDER_NAMES)} or a (K, H*W) LongTensor"
        )
    return ORDER_NAMES[order]


def check_dt_range(dt_min: float, dt_max: float) -> None:
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")


@torch.no_grad()
def mamba_init_(
    dt_weight: Tensor,
    dt_bias: Tensor,
    A_log: Tensor,
    D: Tensor,
    dt_min: float = 1e-3,
    dt_max: float = 0.1,
    dt_init_floor: float = 1e-4,
) -> None:
    """Mamba's initialisation of a selective scan's parameters, in place (any leading shapes).

    ``dt_weight (..., R)`` uniform in ``±R^-0.5``; ``dt_bias`` the inverse softplus of a step
    log-uniform in ``[dt_min, dt_max]``, at least ``dt_init_floor``; ``A_log (..., N) = log(1..N)``
    (S4D-real); ``D = 1``. The random draws are made in this order.
    """
    check_dt_range(dt_min, dt_max)
    std = dt_weight.shape[-1] ** -0.5
    dt_weight.uniform_(-std, std)
    lo, hi = math.log(dt_min), math.log(dt_max)
    dt = torch.exp(torch.rand_like(dt_bias, dtype=torch.float32) * (hi - lo) + lo)
    dt = dt.clamp(min=dt_init_floor)
    dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
    a = torch.arange(1, A_log.shape[-1] + 1, dtype=torch.float32, device=A_log.device)
    A_log.copy_(torch.log(a).expand_as(A_log))
    D.fill_(1.0)


def _register_scan_parameters(
    host: nn.Module,
    d_inner: int,
    d_state: int,
    dt_rank: int,
    order: ScanOrder,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> None:
    """Create the plain K-direction scan's parameters on ``host`` (uninitialised; see :func:`_reset_scan`)."""
    fk = {"device": device, "dtype": dtype}
    host.K = k = num_directions(order)
    if isinstance(order, Tensor):
        host.register_buffer("order", order.to(device=device, dtype=torch.long), persistent=False)
    else:
        host.order = order
    host.x_proj_weight = nn.Parameter(torch.empty(k, dt_rank + 2 * d_state, d_inner, **fk))
    host.dt_projs_weight = nn.Parameter(torch.empty(k, d_inner, dt_rank, **fk))
    host.dt_projs_bias = nn.Parameter(torch.empty(k * d_inner, **fk))
    # A and D stay fp32 whatever the module dtype (as in Mamba).
    host.A_logs = nn.Parameter(torch.empty(k * d_inner, d_state, device=device, dtype=torch.float32))
    host.Ds = nn.Parameter(torch.empty(k * d_inner, device=device, dtype=torch.float32))
    host.A_logs._no_weight_decay = True  # type: ignore[attr-defined]
    host.Ds._no_weight_decay = True  # type: ignore[attr-defined]


@torch.no_grad()
def _reset_scan(host: nn.Module, dt_min: float, dt_max: float, dt_init_floor: float) -> None:
    """``x_proj`` as ``nn.Linear(D, R + 2N)`` (``U(±D^-0.5)``), then :func:`mamba_init_`."""
    bound = host.x_proj_weight.shape[-1] ** -0.5  # nn.Linear's default: kaiming_uniform(a=sqrt(5))
    host.x_proj_weight.uniform_(-bound, bound)
    mamba_init_(host.dt_projs_weight, host.dt_projs_bias, host.A_logs, host.Ds, dt_min, dt_max, dt_init_floor)


def _directional_scan(host: nn.Module, u: Tensor, src: Tensor) -> Tensor:
    """The K-direction selective scan of ``u (B, D, H, W)`` with ``delta, B, C`` from ``src (B, D, H, W)``,
    with ``host``'s scan parameters: ``(B, D, H, W)`` in ``u``'s dtype, the sum over directions."""
    b, d, h, w = u.shape
    n, r = host.A_logs.shape[-1], host.dt_projs_weight.shape[-1]
    x_dbl = torch.einsum("bdl,kcd->bkcl", src.reshape(b, d, h * w), host.x_proj_weight)
    dts, bs, cs = torch.split(x_dbl, [r, n, n], dim=2)
    dts = torch.einsum("bkrl,kdr->bkdl", dts, host.dt_projs_weight)  # (B, K, D, L)
    y = MF.selective_scan_2d(
        u,
        dts,
        -torch.exp(host.A_logs.float()),
        bs,
        cs,
        host.Ds,
        delta_bias=host.dt_projs_bias,
        delta_softplus=True,
        order=host.order,
    )  # (B, D, H, W)
    return y.to(u.dtype)


def _order_repr(order: ScanOrder) -> str:
    return "tensor" if isinstance(order, Tensor) else repr(order)


class DirectionalScan(nn.Module):
    """The plain K-direction selective scan as a module: ``(u, src) (B, D, H, W) -> (B, D, H, W)``.

    The per-direction ``x_proj`` (D -> R + 2N) and ``dt_proj`` (R -> D), ``A = -exp(A_logs)`` and
    the ``D`` skip, summed over the ``K = num_directions(order)`` directions: SS2D's default core,
    with the same parameter names and initialisation (SS2D keeps them as its own parameters).

    Args:
        d_inner: scanned channels D.
        d_state: N.
        dt_rank: R.
        order: scan order name or a ``(K, H*W)`` LongTensor (see ``selective_scan_2d``).
        dt_min, dt_max, dt_init_floor: initial step range (see :func:`mamba_init_`).
    """

    def __init__(
        self,
        d_inner: int,
        *,
        d_state: int = 16,
        dt_rank: int = 1,
        order: ScanOrder = "ss2d",
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("d_inner", d_inner), ("d_state", d_state), ("dt_rank", dt_rank)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, dt_rank
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        _register_scan_parameters(self, d_inner, d_state, dt_rank, order, device, dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _reset_scan(self, self.dt_min, self.dt_max, self.dt_init_floor)

    def forward(self, u: Tensor, src: Tensor | None = None) -> Tensor:
        """``u (B, D, H, W)``, ``src (B, D, H, W)`` (default ``u``) -> ``(B, D, H, W)``."""
        return _directional_scan(self, u, u if src is None else src)

    def extra_repr(self) -> str:
        return (
            f"d_inner={self.d_inner}, d_state={self.d_state}, dt_rank={self.dt_rank}, K={self.K}, "
            f"order={_order_repr(self.order)}"
        )


class SS2D(nn.Module):
    """Mamba feature extractor over a 2-D map around a scan core.

    ``(B, H, W, C_in) -> (B, H, W, C)`` when ``gated`` (MTMamba's MFE with its SiLU gate and output
    projection), ``(B, H, W, D)`` when not (the gate-less MFE of the CTM block):

    in_proj (C_in -> 2D as (x, z) when gated, else C_in -> D; no bias) -> depthwise ``d_conv`` conv
    (bias) -> SiLU -> scan core -> LayerNorm(D) [-> * silu(z) -> out_proj D -> C].

    The scan core is the plain K-direction scan over ``order`` (its parameters ``x_proj_weight``,
    ``dt_projs_weight``, ``dt_projs_bias``, ``A_logs``, ``Ds`` are SS2D's own), or the module
    ``scan_layer`` builds (registered as its ``module_name``, default ``"scan"``). With
    ``cross_dim`` it is the cross scan: ``forward(x, shared)`` takes the step and ``B``, ``C`` from
    ``shared`` through ``in_proj_cross`` (``C_shared -> D``, no conv), see :class:`CrossSS2D`.

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
        scan_layer: a :data:`ScanLayer` replacing the plain scan (e.g. MSM's ``MSScan``), or ``None``.
        cross_dim: channels ``C_shared`` of the shared feature of the cross scan, or ``None``.
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
        scan_layer: ScanLayer | None = None,
        cross_dim: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dt_rank != "auto" and not (isinstance(dt_rank, int) and dt_rank > 0):
            raise ValueError(f"dt_rank must be a positive int or 'auto', got {dt_rank!r}")
        check_dt_range(dt_min, dt_max)
        if d_conv % 2 != 1:
            raise ValueError(f"d_conv must be odd to keep the map size, got {d_conv}")
        if cross_dim is not None and not gated:
            raise ValueError("the cross scan (cross_dim) needs gated=True (the z gate and out_proj)")
        fk = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.in_dim = d_model if in_dim is None else in_dim
        self.d_state = d_state
        self.d_inner = d = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.gated = gated
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor

        self.in_proj = nn.Linear(self.in_dim, 2 * d if gated else d, bias=False, **fk)
        self.conv2d = nn.Conv2d(d, d, d_conv, padding=(d_conv - 1) // 2, groups=d, bias=True, **fk)
        self.act = nn.SiLU()
        self.scan_core_name: str | None = None  # the attribute of a scan_layer core
        if scan_layer is None:
            _register_scan_parameters(self, d, d_state, self.dt_rank, order, device, dtype)
        else:
            core = scan_layer(
                d, d_state=d_state, dt_rank=self.dt_rank, order=order,
                dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor, **fk,
            )
            self.scan_core_name = getattr(core, "module_name", "scan")
            self.add_module(self.scan_core_name, core)
        self.out_norm = nn.LayerNorm(d, **fk)
        self.out_proj = nn.Linear(d, d_model, bias=False, **fk) if gated else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if self.scan_core is None:  # a scan_layer core initialises itself
            self.reset_ssm_parameters()
        self.cross_dim = cross_dim
        if cross_dim is not None:
            self.in_proj_cross = nn.Linear(cross_dim, d, bias=False, **fk)

    @property
    def scan_core(self) -> nn.Module | None:
        """The ``scan_layer`` core, or ``None`` for the plain scan (whose parameters are SS2D's)."""
        return None if self.scan_core_name is None else getattr(self, self.scan_core_name)

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba's initialisation of the scan parameters (the linear layers keep PyTorch's).

        ``x_proj`` as ``nn.Linear(D, R + 2N)``; the rest by :func:`mamba_init_`. A ``scan_layer``
        core initialises itself (its ``reset_parameters``).
        """
        if self.scan_core is None:
            _reset_scan(self, self.dt_min, self.dt_max, self.dt_init_floor)
        else:
            self.scan_core.reset_parameters()

    def ssm(self, u: Tensor, src: Tensor) -> Tensor:
        """The scan of ``u`` with ``delta, B, C`` computed from ``src``, layer-normalised.

        Args:
            u: scanned input ``(B, D, H, W)``.
            src: ``(B, D, H, W)`` the step and ``B, C`` projections read (``u`` itself in SS2D).

        Returns:
            ``(B, H, W, D)``.
        """
        core = self.scan_core
        y = _directional_scan(self, u, src) if core is None else core(u, src)
        return self.out_norm(y.permute(0, 2, 3, 1))

    def _check_input(self, x: Tensor, name: str, channels: int) -> None:
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(
                f"{type(self).__name__} expects {name} channels-last (B, H, W, {channels}), got {tuple(x.shape)}"
            )

    def forward(self, x: Tensor, shared: Tensor | None = None) -> Tensor:
        """``x: (B, H, W, C_in)`` [, ``shared: (B, H, W, C_shared)`` with ``cross_dim``] ->
        ``(B, H, W, C)`` if gated else ``(B, H, W, D)``."""
        self._check_input(x, "x", self.in_dim)
        if (shared is None) != (self.cross_dim is None):
            raise ValueError(
                f"{type(self).__name__} takes a shared feature exactly when built with cross_dim "
                f"(cross_dim={self.cross_dim}, shared {'given' if shared is not None else 'missing'})"
            )
        if shared is not None:
            self._check_input(shared, "shared", self.cross_dim)
            if shared.shape[:3] != x.shape[:3]:
                raise ValueError(
                    f"{type(self).__name__} needs x and shared of the same (B, H, W), "
                    f"got {tuple(x.shape[:3])} and {tuple(shared.shape[:3])}"
                )
        z = None
        if self.gated:
            u, z = self.in_proj(x).chunk(2, dim=-1)
        else:
            u = self.in_proj(x)
        u = self.act(self.conv2d(u.permute(0, 3, 1, 2)))  # (B, D, H, W)
        src = u if shared is None else self.in_proj_cross(shared).permute(0, 3, 1, 2)
        y = self.ssm(u, src)
        if self.out_proj is not None:
            y = self.out_proj(y * F.silu(z))
        return self.dropout(y)

    def extra_repr(self) -> str:
        s = (
            f"d_model={self.d_model}, in_dim={self.in_dim}, d_inner={self.d_inner}, d_state={self.d_state}, "
            f"dt_rank={self.dt_rank}, gated={self.gated}"
        )
        if self.scan_core is None:
            s += f", K={self.K}, order={_order_repr(self.order)}"
        return s + (f", cross_dim={self.cross_dim}" if self.cross_dim is not None else "")


class CrossSS2D(SS2D):
    """Cross SS2D of MTMamba++'s S-CTM: scans a task feature under a shared feature's selection.

    :class:`SS2D` with the cross scan (``cross_dim`` defaults to ``C``): the task feature ``x``
    gives the scanned input ``u`` (in_proj, depthwise conv, SiLU), the ``D`` skip and the ``z``
    gate; the shared feature gives the step ``delta`` and ``B``, ``C``, through its own projection
    ``in_proj_cross`` (``C_shared -> D``, no conv) and the per-direction ``x_proj`` / ``dt_proj``.

    ``forward(x (B, H, W, C), shared (B, H, W, C_shared)) -> (B, H, W, C)``.
    """

    def __init__(self, d_model: int, *args, cross_dim: int | None = None, **kwargs) -> None:
        if kwargs.get("gated", True) is not True:
            raise ValueError("CrossSS2D is always gated (it needs the z gate and out_proj)")
        super().__init__(d_model, *args, cross_dim=d_model if cross_dim is None else cross_dim, **kwargs)

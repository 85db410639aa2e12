"""Parameter experts: a per-task routed mixture of low-rank experts (PAMM's B/C projections).

PAMM (Yu et al., "Parameter Aware Mamba Model for Multi-task Dense Prediction") computes the
selective-scan parameters B and C of every task with a mixture of low-rank 1x1-conv experts that
all tasks share. Each task has its own router that picks the top-k of E experts per image, its own
low-rank path scaled by a router output, and all tasks share one generic projection.

Everything here is compile-friendly: top-k routing is ``torch.topk`` + ``scatter`` on a dense
(batch, E) gate matrix and every expert is evaluated (they are tiny and batched into two einsums),
so there is no data-dependent Python control flow and ``torch.compile(fullgraph=True)`` holds.

Shapes: B batch, C channels, H, W spatial, E experts, R expert rank, T tasks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LowRankExperts",
    "ROUTER_POOLS",
    "TaskRouter",
    "ParameterExperts",
    "topk_gates",
    "load_balancing_loss",
]


def topk_gates(logits: Tensor, k: int, softmax_before_topk: bool = True) -> Tensor:
    """Dense top-k gates from router logits.

    Args:
        logits: (B, E) router logits.
        k: number of experts kept per row, 1 <= k <= E.
        softmax_before_topk: True (default, PAMM's official gating on both datasets,
            ``models/transformers/MoE_mamba.py:550-556``): softmax over all E logits, then zero
            the E-k smallest probabilities without renormalising, so a row sums to at most 1.
            False: softmax over the k kept logits only, so each row sums to 1 (the
            ``pre_softmax: True`` branch of PAMM's ``MOEBlock``, ``PAME.py:277-283``, which the
            published model never runs). Kept as an option for gates whose scale does not depend
            on the mass of the dropped experts; off in the paper models.

    Returns:
        gates: (B, E), zero outside each row's top-k.
    """
    num_experts = logits.shape[-1]
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must be in [1, {num_experts}] (the number of experts), got {k}")
    if softmax_before_topk:
        probs = logits.softmax(dim=-1)
        top_vals, top_idx = probs.topk(k, dim=-1)
        return torch.zeros_like(probs).scatter(-1, top_idx, top_vals)
    top_vals, top_idx = logits.topk(k, dim=-1)
    return torch.zeros_like(logits).scatter(-1, top_idx, top_vals.softmax(dim=-1))


def load_balancing_loss(gates: Tensor) -> Tensor:
    """Squared coefficient of variation of the experts' importance (the MLoRE/PAMM balance loss).

    Args:
        gates: (..., E) routing weights; every leading dimension (batch, tasks) is averaged.

    Returns:
        A scalar ``var(importance) / mean(importance)**2`` with ``importance`` (E,) the mean gate of
        each expert. Its minimum, 0, is reached exactly when every expert has the same importance
        (uniform routing).
    """
    importance = gates.reshape(-1, gates.shape[-1]).mean(dim=0)
    mean = importance.mean()
    return importance.var(correction=0) / (mean * mean).clamp_min(1e-12)


def _uniform_fan_in_(weight: Tensor, fan_in: int) -> None:
    # Same bound as nn.init.kaiming_uniform_(a=sqrt(5)) on a conv weight: 1/sqrt(fan_in).
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(weight, -bound, bound)


class LowRankExperts(nn.Module):
    """E low-rank convolutions ``up_e(down_e(x))`` mixed with per-image gates.

    Each expert is PAMM's ``LoraConv``: a k x k conv C_in -> R (padding k // 2) then a 1x1 conv
    R -> C_out, both with biases, initialised as ``LoraConv`` does. All experts run as one
    convolution (an einsum when k = 1) and one einsum.

    Args:
        in_channels: C_in.
        out_channels: C_out.
        num_experts: E.
        rank: R.
        kernel_size: k of the down projection (odd).

    Parameters: ``down_weight (E, R, C_in, k, k)``, ``down_bias (E, R)``, ``up_weight (E, C_out, R)``,
    ``up_bias (E, C_out)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_experts: int,
        rank: int,
        kernel_size: int = 1,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("num_experts", num_experts), ("rank", rank), ("kernel_size", kernel_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same-size output), got {kernel_size}")
        fk = {"device": device, "dtype": dtype}
        self.num_experts, self.rank, self.kernel_size = num_experts, rank, kernel_size
        k = kernel_size
        self.down_weight = nn.Parameter(torch.empty(num_experts, rank, in_channels, k, k, **fk))
        self.down_bias = nn.Parameter(torch.zeros(num_experts, rank, **fk))
        self.up_weight = nn.Parameter(torch.empty(num_experts, out_channels, rank, **fk))
        self.up_bias = nn.Parameter(torch.zeros(num_experts, out_channels, **fk))
        _uniform_fan_in_(self.down_weight, in_channels * k * k)
        _uniform_fan_in_(self.up_weight, rank)

    def forward(self, x: Tensor, gates: Tensor) -> Tensor:
        """x: (B, C_in, H, W); gates: (B, E) -> (B, C_out, H, W) = sum_e gates[:, e] * expert_e(x)."""
        e, r, k = self.num_experts, self.rank, self.kernel_size
        if k == 1:
            h = torch.einsum("bchw,erc->berhw", x, self.down_weight[..., 0, 0])
            h = h + self.down_bias[None, :, :, None, None]
        else:
            w = self.down_weight.reshape(e * r, -1, k, k)
            h = F.conv2d(x, w, self.down_bias.reshape(-1), padding=k // 2)
            h = h.unflatten(1, (e, r))
        h = h * gates[:, :, None, None, None]
        out = torch.einsum("berhw,eor->bohw", h, self.up_weight)
        return out + (gates @ self.up_bias)[:, :, None, None]


ROUTER_POOLS = ("linear", "attention")


class TaskRouter(nn.Module):
    """One task's router: image feature -> (gate logits, noise scale logits, task-path weight).

    Two descriptors of ``x``, concatenated and projected to ``2E + 1`` outputs:

    - channel: Conv1x1(C -> hidden), LayerNorm, activation, Linear(hidden -> hidden), mean over
      positions;
    - spatial: ``x`` pooled over its positions into (B, C), LayerNorm, activation,
      Linear(C -> hidden).

    ``pool`` chooses the spatial pooling:

    - ``"linear"`` (PAMM's ``SpatialAtt``, ``models/transformers/MoE_mamba.py:467,482``): learned
      weights per position and a bias, ``Linear(H*W, 1)``, which ties the router to one input size
      (``positions = H*W``); the paper models use it.
    - ``"attention"``: weights from a 1x1 conv followed by a softmax over the positions, so the
      router works at any input size (an mtssm option, e.g. for a model evaluated on images of
      another size than it was trained on).

    Args:
        in_channels: C of the routed feature.
        num_experts: E.
        hidden: width of each descriptor (default ``max(in_channels // 4, 8)``; PAMM: C // 4).
        pool: ``"linear"`` or ``"attention"``.
        positions: H*W of the routed feature (``pool="linear"`` only).

    Forward: x (B, C, H, W) -> (B, 2E + 1): E gate logits, E noise-scale logits, 1 task-path weight.
    """

    def __init__(
        self,
        in_channels: int,
        num_experts: int,
        hidden: int | None = None,
        *,
        pool: str = "attention",
        positions: int | None = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if pool not in ROUTER_POOLS:
            raise ValueError(f"router pool must be one of {ROUTER_POOLS}, got {pool!r}")
        if pool == "linear" and not (isinstance(positions, int) and positions >= 1):
            raise ValueError(f"a 'linear' router pool needs positions = H*W of its feature map, got {positions!r}")
        fk = {"device": device, "dtype": dtype}
        hidden = hidden or max(in_channels // 4, 8)
        self.pool, self.positions = pool, positions if pool == "linear" else None
        self.channel_proj = nn.Conv2d(in_channels, hidden, 1, **fk)
        self.channel_norm = nn.LayerNorm(hidden, **fk)
        self.channel_out = nn.Linear(hidden, hidden, **fk)
        if pool == "linear":
            self.spatial_pool = nn.Linear(positions, 1, **fk)
        else:
            self.spatial_logits = nn.Conv2d(in_channels, 1, 1, **fk)
        self.spatial_norm = nn.LayerNorm(in_channels, **fk)
        self.spatial_out = nn.Linear(in_channels, hidden, **fk)
        self.act = act_layer()
        self.head = nn.Linear(2 * hidden, 2 * num_experts + 1, **fk)

    def forward(self, x: Tensor) -> Tensor:
        feat = self.channel_proj(x).permute(0, 2, 3, 1)  # (B, H, W, hidden)
        feat = self.channel_out(self.act(self.channel_norm(feat))).mean(dim=(1, 2))  # (B, hidden)
        if self.pool == "linear":
            if x.shape[2] * x.shape[3] != self.positions:
                raise ValueError(
                    f"TaskRouter: built for feature maps of {self.positions} positions (PAMM's Linear(H*W, 1) "
                    f"pooling), got {x.shape[2]}x{x.shape[3]}; run at the model's input size, or build it "
                    f"with router_pool='attention' for any size"
                )
            pooled = self.spatial_pool(x.flatten(2))[..., 0]  # (B, C)
        else:
            attn = self.spatial_logits(x).flatten(2).softmax(dim=-1)  # (B, 1, HW)
            pooled = torch.einsum("bcl,bl->bc", x.flatten(2), attn[:, 0])  # (B, C)
        pooled = self.spatial_out(self.act(self.spatial_norm(pooled)))  # (B, hidden)
        return self.head(torch.cat([feat, pooled], dim=-1))


class ParameterExperts(nn.Module):
    """PAMM's parameter experts: per-task routed low-rank experts + task path + generic path.

    For task t with input x_t (B, C_in, H, W)::

        logits, noise, mix = router_t(x_t)
        g = topk_gates(logits + noise_in_training, k)                     # (B, E)
        out_t = norm_t(norm_mix_t(experts(x_t, g))
                       + mix * task_path_t(x_t) + shared_path(x_t'))     # (B, C_out, H, W)

    with ``x_t' = x_t.detach()`` when ``detach_shared_input`` (as in PAMM's code: the generic path
    learns from every task without sending that gradient back into the task features).

    Args:
        in_channels: C_in.
        out_channels: C_out (d_state when producing B or C).
        tasks: task names; one router, task path and two norms each.
        num_experts: E (PAMM: 15).
        rank: expert rank R (PAMM: 4 for B and C).
        top_k: experts kept per image (PAMM: 9).
        task_rank: rank of the task path (PAMM: the first expert rank, 4).
        kernel_size: k of the experts' and the task path's down convolution and of the shared
            path (PAMM's code: 9 for B and C; see :class:`~mtssm.nn.pamm.PAMEBlock`).
        softmax_before_topk: see :func:`topk_gates` (PAMM: True on both datasets).
        noisy_gating: add ``randn * scale`` to the gate logits in training, ``scale`` the router's
            noise output as it is (PAMM, ``MoE_mamba.py:546``; its sign does not change the noise's
            distribution), or its softplus when ``softplus_noise``.
        softplus_noise: a softplus noise scale (noisy top-k gating as Shazeer et al. write it: the
            scale is positive by construction); off in the paper models.
        detach_shared_input: stop the generic path's gradient into the input (PAMM's choice).
        router_pool, router_positions: the routers' spatial pooling and H*W of the routed feature
            (see :class:`TaskRouter`).
        norm_layer: normalisation over C_out channels of (B, C_out, H, W) (PAMM: BatchNorm2d).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        tasks: Sequence[str],
        num_experts: int = 15,
        rank: int = 4,
        top_k: int = 9,
        task_rank: int = 4,
        kernel_size: int = 1,
        *,
        softmax_before_topk: bool = True,
        noisy_gating: bool = True,
        softplus_noise: bool = False,
        detach_shared_input: bool = True,
        router_pool: str = "attention",
        router_positions: int | None = None,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        tasks = list(tasks)
        if not tasks:
            raise ValueError("tasks must name at least one task, got an empty list")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        fk = {"device": device, "dtype": dtype}
        self.tasks = tasks
        self.num_experts, self.top_k = num_experts, top_k
        self.softmax_before_topk = softmax_before_topk
        self.noisy_gating, self.softplus_noise = noisy_gating, softplus_noise
        self.detach_shared_input = detach_shared_input
        k = kernel_size
        self.experts = LowRankExperts(in_channels, out_channels, num_experts, rank, k, **fk)
        self.routers = nn.ModuleDict(
            {t: TaskRouter(in_channels, num_experts, pool=router_pool, positions=router_positions, **fk) for t in tasks}
        )
        self.task_paths = nn.ModuleDict(
            {t: LowRankExperts(in_channels, out_channels, 1, task_rank, k, **fk) for t in tasks}
        )
        self.shared_path = nn.Conv2d(in_channels, out_channels, k, padding=k // 2, **fk)
        self.mix_norms = nn.ModuleDict({t: norm_layer(out_channels, **fk) for t in tasks})
        self.out_norms = nn.ModuleDict({t: norm_layer(out_channels, **fk) for t in tasks})

    def route(self, task: str, x: Tensor) -> tuple[Tensor, Tensor]:
        """Gates (B, E) and task-path weight (B, 1) of ``task`` for x (B, C_in, H, W)."""
        out = self.routers[task](x)
        e = self.num_experts
        logits, noise_logits, mix = out[:, :e], out[:, e : 2 * e], out[:, 2 * e :]
        if self.training and self.noisy_gating:
            scale = F.softplus(noise_logits) if self.softplus_noise else noise_logits
            logits = logits + torch.randn_like(logits) * scale
        return topk_gates(logits, self.top_k, self.softmax_before_topk), mix

    def forward_task(self, task: str, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, C_in, H, W) -> (out (B, C_out, H, W), gates (B, E)) for one task."""
        gates, mix = self.route(task, x)
        mixed = self.mix_norms[task](self.experts(x, gates))
        ones = torch.ones_like(mix)
        task_out = self.task_paths[task](x, ones) * mix[:, :, None, None]
        shared_out = self.shared_path(x.detach() if self.detach_shared_input else x)
        return self.out_norms[task](mixed + task_out + shared_out), gates

    def forward(self, xs: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        """xs {task: (B, C_in, H, W)} -> ({task: (B, C_out, H, W)}, gates (T, B, E))."""
        missing = [t for t in self.tasks if t not in xs]
        if missing:
            raise ValueError(f"ParameterExperts is missing inputs of tasks {missing}; expected {self.tasks}")
        outs: dict[str, Tensor] = {}
        all_gates = []
        for t in self.tasks:
            outs[t], gates = self.forward_task(t, xs[t])
            all_gates.append(gates)
        return outs, torch.stack(all_gates)

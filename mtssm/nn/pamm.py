"""PAMM: Parameter Aware Mamba Model for multi-task dense prediction (block, decoder, builder).

PAMM (Yu et al.) decodes each of four ViT-L/16 feature levels with a Parameter Aware Mamba Experts
(PAME) block and fuses the levels per task:

- :class:`PAMEBlock`: shared 3x3 conv + GroupNorm, then per task a 3x3 task conv and a Mamba
  layer whose selective scan takes its ``B`` and ``C`` from :class:`~mtssm.nn.experts.
  ParameterExperts` (a routed mixture of low-rank experts shared by all tasks, plus a task path),
  adds task priors to ``B`` and ``C``, has its own ``A``, ``D`` and step projection per task, and
  scans in the four Multi-Directional Hilbert orders, gated by a SiLU branch and added to the
  input.
- :class:`PAMMDecoder`: one PAME block per level; per task a softmax mask over the levels
  (Conv1x1 + BN + GELU + Conv3x3) weights them, and the sum is upsampled (4x for ViT) to stride 4.
- :func:`build_pamm`: the decoder and its heads (Conv3x3 + BN + GELU, Conv1x1, as PAMM's
  ``ConvHead``).

The defaults are what PAMM's code (CQC-gogopro/PAMM, ``models/transformers/MoE_mamba.py``)
computes; where it departs from the paper's text or where mtssm offers more, the choice is an
argument (the paper models keep the official value):

- ``scan_input``: ``"silu"`` (official: the scan reads ``SiLU(GN(x_t))``; the code computes a
  conv of it and discards the result, ``MoE_mamba.py:238-243``) or ``"dwconv"`` (the paper's
  Fig. 3: a depthwise-separable conv first).
- ``order``: ``"hilbert_cropped"`` (official: a power-of-two Hilbert curve cropped to the map,
  ``order_h.py``), ``"hilbert"`` (4-connected generalised curves) or ``"ss2d"``.
- ``router_pool``: ``"linear"`` (official ``Linear(H*W, 1)``; fixes the input size) or
  ``"attention"`` (any size); see :class:`~mtssm.nn.experts.TaskRouter`.
- ``train_scan_constants``: the official code keeps ``A_log``, ``D`` (``MoE_mamba.py:123-124``)
  and the task priors (``:66-75``) in plain dicts, so its optimizer never updates them: ``A`` and
  ``D`` stay at Mamba's initial values and the priors at random values drawn at construction.
  ``False`` (official) keeps them fixed too; unlike the official code they are registered
  (``requires_grad=False``), so checkpoints hold them and an evaluation sees the priors the model
  was trained with. ``True`` trains them.

The routers' load-balancing loss of the last forward is :meth:`PAMMDecoder.aux_loss`
(``MultiTaskModel.aux_losses()["load_balancing"]``); the trainer adds it to the training loss with
the recipe's ``loss.load_balancing`` weight and logs it. PAMM's configs give it a weight (0.0005 on
NYUDv2, 0.0001 on PASCAL-Context, ``configs/nyu_PAME.yml:80``, ``configs/pascal_PAME.yml:83``) but its
code never adds it: ``losses/loss_schemes.py:21`` needs ``route_1_prob`` in the outputs, which
``PAME.forward`` (``info = {}``, ``PAME.py:157``) and ``PAMEWrapper`` (``PAME_wrapper.py:39-41``) never
provide; the paper recipes therefore weigh it 0.

Shapes: ``B`` batch, ``C`` channels (``dim``), ``D = expand*C`` scanned channels, ``N`` d_state,
``R`` dt_rank, ``E`` experts, ``T`` tasks, ``K`` scan directions (of ``order``); maps are channels-first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import Tensor, nn

from mtssm.nn import functional as MF
from mtssm.nn.experts import ParameterExperts, load_balancing_loss
from mtssm.nn.heads import ConvHead
from mtssm.nn.mtmamba import check_features
from mtssm.nn.ss2d import check_dt_range, mamba_init_, num_directions

__all__ = ["DWConv", "PAMEBlock", "PAMMDecoder", "build_pamm"]


def _group_count(channels: int, max_groups: int = 32) -> int:
    """GroupNorm groups: the largest count <= max_groups dividing ``channels`` with >= 2 channels
    per group when possible (32 for PAMM's widths; never one value per group on a 1x1 map)."""
    return max(g for g in range(1, max(1, min(max_groups, channels // 2)) + 1) if channels % g == 0)


class DWConv(nn.Module):
    """Depthwise-separable conv: depthwise k x k, pointwise 1x1, LayerNorm over channels, SiLU.

    ``(B, C_in, H, W) -> (B, C_out, H, W)`` (PAMM's ``DWConv``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        act_layer: Callable[[], nn.Module] = nn.SiLU,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.depth_conv = nn.Conv2d(
            in_channels, in_channels, kernel_size, padding=kernel_size // 2, groups=in_channels, **fk
        )
        self.point_conv = nn.Conv2d(in_channels, out_channels, 1, **fk)
        self.norm = nn.LayerNorm(out_channels, eps=1e-6, **fk)
        self.act = act_layer()

    def forward(self, x: Tensor) -> Tensor:
        y = self.point_conv(self.depth_conv(x))
        return self.act(self.norm(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


class PAMEBlock(nn.Module):
    """Parameter Aware Mamba Experts block on one encoder level.

    ``forward(x (B, C_in, H, W)) -> ({task: (B, C, H, W)}, gates (2, T, B, E))`` with the routing
    gates of the B experts (``gates[0]``) and the C experts (``gates[1]``). Per task ``t``::

        f     = GN(Conv3x3(x))                                   # shared
        x_t   = TaskConv3x3_t(f);  h = GN_t(x_t)
        z     = SiLU(Conv1x1_t(h))                               # gate
        u     = Conv1x1_t(SiLU(h))  or  Conv1x1_t(DWConv_t(h))   # (B, D, H, W), see scan_input
        delta = dt_proj_t(x2dt_t(u));  B = experts_B(u, t) + prior_B_t;  C = experts_C(u, t) + prior_C_t
        y     = selective_scan_2d(u, delta, -exp(A_log_t), B, C, D_t, dt_bias_t, order)  # K orders
        out_t = x_t + Conv1x1_t(y) * z

    The same ``delta, B, C, A_t, D_t`` serve the four directions, as in PAMM. GroupNorms have 32
    groups at PAMM's widths (the official ``GroupNorm(32, C)``; fewer below 64 channels).

    Args:
        in_dim: encoder channels C_in of this level.
        dim: decoder channels C (PAMM: 768 on NYUDv2, 1024 on PASCAL-Context).
        tasks: task names.
        d_state: N (PAMM: 16 on NYUDv2, 64 on PASCAL-Context).
        expand: D / C.
        dt_rank: R or ``"auto"`` (``ceil(C/16)``).
        order: scan orders, 4 directions: ``"hilbert_cropped"`` (official), ``"hilbert"`` or ``"ss2d"``.
        num_experts, expert_rank, top_k, task_rank, softmax_before_topk, noisy_gating, softplus_noise:
            :class:`~mtssm.nn.experts.ParameterExperts` settings (PAMM: 15, 4, 9, 4, True, True, False).
        expert_kernel_size: kernel of the B/C experts' down convolutions, their task paths and their
            shared path. 9 is what PAMM's code builds and what its published numbers were trained
            with: ``MoE(p, d_inner, d_state, self.topk, ranklist=...)`` (``MoE_mamba.py:137,141``)
            passes ``topk`` = 9 in the place of ``kernal`` (``MoE_mamba.py:494``), an argument slip;
            the paper's text describes 1x1 experts (1 here). The paper models use 9.
        use_priors: add the task priors to B and C.
        scan_input: ``"silu"`` (official) or ``"dwconv"`` (the paper's figure); see the module docstring.
        router_pool: the routers' spatial pooling, ``"linear"`` (official) or ``"attention"``.
        router_grid: ``(H, W)`` of this block's feature map, needed by ``router_pool="linear"``.
        train_scan_constants: train ``A_log``, ``D`` and the priors (``False``: fixed, as officially).
        dt_min, dt_max, dt_init_floor: initial step range (Mamba's).
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        tasks: Sequence[str],
        d_state: int = 16,
        expand: float = 2,
        dt_rank: int | str = "auto",
        order: str = "hilbert_cropped",
        num_experts: int = 15,
        expert_rank: int = 4,
        top_k: int = 9,
        task_rank: int = 4,
        softmax_before_topk: bool = True,
        noisy_gating: bool = True,
        softplus_noise: bool = False,
        expert_kernel_size: int = 9,
        use_priors: bool = True,
        scan_input: str = "silu",
        router_pool: str = "linear",
        router_grid: tuple[int, int] | None = None,
        train_scan_constants: bool = False,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        if not self.tasks:
            raise ValueError("tasks must name at least one task")
        if dt_rank != "auto" and not (isinstance(dt_rank, int) and dt_rank > 0):
            raise ValueError(f"dt_rank must be a positive int or 'auto', got {dt_rank!r}")
        if order not in ("hilbert_cropped", "hilbert", "ss2d"):
            raise ValueError(f"order must be 'hilbert_cropped', 'hilbert' or 'ss2d' (4 directions), got {order!r}")
        if scan_input not in ("silu", "dwconv"):
            raise ValueError(f"scan_input must be 'silu' or 'dwconv', got {scan_input!r}")
        if router_pool == "linear" and router_grid is None:
            raise ValueError("router_pool='linear' (PAMM's router) needs router_grid=(H, W) of the block's feature map")
        check_dt_range(dt_min, dt_max)
        fk = {"device": device, "dtype": dtype}
        self.in_dim, self.dim, self.d_state, self.order = in_dim, dim, d_state, order
        self.K = num_directions(order)
        self.d_inner = d = int(expand * dim)
        self.dt_rank = r = math.ceil(dim / 16) if dt_rank == "auto" else dt_rank
        self.use_priors, self.scan_input = use_priors, scan_input
        groups = _group_count(dim)
        ts = self.tasks

        self.input_proj = nn.Conv2d(in_dim, dim, 3, padding=1, **fk)
        self.input_norm = nn.GroupNorm(groups, dim, **fk)
        self.task_conv = nn.ModuleDict({t: nn.Conv2d(dim, dim, 3, padding=1, **fk) for t in ts})
        self.task_norm = nn.ModuleDict({t: nn.GroupNorm(groups, dim, **fk) for t in ts})
        self.gate_proj = nn.ModuleDict({t: nn.Conv2d(dim, dim, 1, **fk) for t in ts})
        if scan_input == "dwconv":
            self.local_conv = nn.ModuleDict({t: DWConv(dim, dim, **fk) for t in ts})
        self.in_proj = nn.ModuleDict({t: nn.Conv2d(dim, d, 1, **fk) for t in ts})
        self.x2dt = nn.ModuleDict({t: nn.Linear(d, r, bias=False, **fk) for t in ts})
        self.dt_proj = nn.ModuleDict({t: nn.Linear(r, d, **fk) for t in ts})
        self.A_log = nn.ParameterDict(
            {t: nn.Parameter(torch.empty(d, d_state, device=device, dtype=torch.float32)) for t in ts}
        )
        self.D = nn.ParameterDict({t: nn.Parameter(torch.empty(d, device=device, dtype=torch.float32)) for t in ts})
        experts = {
            "num_experts": num_experts, "rank": expert_rank, "top_k": top_k, "task_rank": task_rank,
            "kernel_size": expert_kernel_size, "softmax_before_topk": softmax_before_topk,
            "noisy_gating": noisy_gating, "softplus_noise": softplus_noise, "router_pool": router_pool,
            "router_positions": router_grid[0] * router_grid[1] if router_grid is not None else None,
        }
        self.B_experts = ParameterExperts(d, d_state, ts, **experts, **fk)
        self.C_experts = ParameterExperts(d, d_state, ts, **experts, **fk)
        if use_priors:
            self.prior_B = nn.ParameterDict({t: nn.Parameter(torch.empty(d_state, **fk)) for t in ts})
            self.prior_C = nn.ParameterDict({t: nn.Parameter(torch.empty(d_state, **fk)) for t in ts})
        self.out_proj = nn.ModuleDict({t: nn.Conv2d(d, dim, 1, **fk) for t in ts})
        self.act = nn.SiLU()
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.reset_ssm_parameters()
        if not train_scan_constants:
            constants = [self.A_log, self.D] + ([self.prior_B, self.prior_C] if use_priors else [])
            for p in (p for group in constants for p in group.values()):
                p.requires_grad_(False)

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba's initialisation per task (:func:`~mtssm.nn.ss2d.mamba_init_` of ``dt_proj``,
        ``A_log`` and ``D``); priors truncated-normal (std 0.02)."""
        for t in self.tasks:
            mamba_init_(
                self.dt_proj[t].weight, self.dt_proj[t].bias, self.A_log[t], self.D[t],
                self.dt_min, self.dt_max, self.dt_init_floor,
            )
            if self.use_priors:
                nn.init.trunc_normal_(self.prior_B[t], std=0.02)
                nn.init.trunc_normal_(self.prior_C[t], std=0.02)

    def _scan(self, t: str, u: Tensor, B: Tensor, C: Tensor) -> Tensor:
        """u (B, D, H, W), B and C (B, N, H, W) -> y (B, D, H, W), summed over the K orders."""
        b, d, h, w = u.shape
        seq = u.flatten(2).transpose(1, 2)  # (B, L, D)
        delta = self.dt_proj[t].weight @ self.x2dt[t](seq).transpose(1, 2)  # (B, D, L)
        n, k = self.d_state, self.K
        y = MF.selective_scan_2d(
            u,
            delta.unsqueeze(1).expand(b, k, d, h * w),
            (-torch.exp(self.A_log[t].float())).repeat(k, 1),
            B.reshape(b, 1, n, h * w).expand(b, k, n, h * w),
            C.reshape(b, 1, n, h * w).expand(b, k, n, h * w),
            self.D[t].repeat(k),
            delta_bias=self.dt_proj[t].bias.repeat(k),
            delta_softplus=True,
            order=self.order,
        )
        return y.to(u.dtype)

    def forward(self, x: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """x (B, C_in, H, W) -> ({task: (B, C, H, W)}, gates (2, T, B, E))."""
        if x.ndim != 4 or x.shape[1] != self.in_dim:
            raise ValueError(f"PAMEBlock expects x of shape (B, {self.in_dim}, H, W), got {tuple(x.shape)}")
        f = self.input_norm(self.input_proj(x))
        out: dict[str, Tensor] = {}
        gates_b, gates_c = [], []
        for t in self.tasks:
            xt = self.task_conv[t](f)
            h = self.task_norm[t](xt)
            z = self.act(self.gate_proj[t](h))
            u = self.in_proj[t](self.local_conv[t](h) if self.scan_input == "dwconv" else self.act(h))
            B, gb = self.B_experts.forward_task(t, u)
            C, gc = self.C_experts.forward_task(t, u)
            if self.use_priors:
                B = B + self.prior_B[t][None, :, None, None]
                C = C + self.prior_C[t][None, :, None, None]
            y = self._scan(t, u, B, C)
            out[t] = xt + self.out_proj[t](y) * z
            gates_b.append(gb)
            gates_c.append(gc)
        return out, torch.stack([torch.stack(gates_b), torch.stack(gates_c)])


def _level_grids(grid: Sequence | None, levels: int) -> list[tuple[int, int] | None]:
    """One ``(H, W)`` (or None) per level from a single pair or a list of ``levels`` pairs."""
    if grid is None:
        return [None] * levels
    grid = list(grid)
    if len(grid) == 2 and all(isinstance(v, int) for v in grid):
        return [(grid[0], grid[1])] * levels
    if len(grid) == levels and all(len(g) == 2 for g in grid):
        return [(int(g[0]), int(g[1])) for g in grid]
    raise ValueError(f"router_grid must be (H, W) or {levels} such pairs, got {grid!r}")


class PAMMDecoder(nn.Module):
    """The PAMM decoder: one :class:`PAMEBlock` per encoder level and a per-task level fusion.

    ``forward([f_1..f_4] with f_i (B, C_i, H_i, W_i)) -> TensorDict {task: (B, C, up*H_1, up*W_1)}``
    (batch size ``[B]``, channels-first). Levels of another size than ``f_1`` are resized to it
    (bilinear) before the fusion (the ViT levels all share one size). Per task a softmax over the
    levels from Conv1x1(4C -> C) + BN + GELU + Conv3x3(C -> 4) weights the level features; their sum
    is upsampled ``upsample`` times (bilinear; PAMM: 4, from ViT's stride 16 to stride 4).

    The routers' load-balancing loss of the last forward (the sum over the 8 expert mixtures of
    :func:`~mtssm.nn.experts.load_balancing_loss`) is returned by :meth:`aux_loss`.

    Args:
        in_channels: channels of the 4 encoder levels.
        tasks: task names.
        dim: decoder channels C.
        upsample: final upsampling factor (the output stride is the first level's stride / upsample).
        norm_layer: normalisation of the fusion mask branch (PAMM: BatchNorm2d).
        router_grid: ``(H, W)`` of the encoder levels (PAMM: the ViT's token grid, the same for all
            four), for ``router_pool="linear"``; or one ``(H, W)`` per level.
        **block_kwargs: :class:`PAMEBlock` settings (d_state, expand, dt_rank, order, num_experts,
            expert_rank, top_k, task_rank, softmax_before_topk, noisy_gating, softplus_noise,
            expert_kernel_size, use_priors, scan_input, router_pool, train_scan_constants).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        tasks: Sequence[str],
        dim: int = 768,
        upsample: int = 4,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
        router_grid: Sequence[int] | Sequence[Sequence[int]] | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **block_kwargs,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        if len(in_channels) != 4:
            raise ValueError(f"in_channels must list 4 encoder levels, got {list(in_channels)}")
        if not isinstance(upsample, int) or upsample < 1:
            raise ValueError(f"upsample must be a positive int, got {upsample!r}")
        self.in_channels = tuple(int(c) for c in in_channels)
        self.tasks = tuple(tasks)
        if not self.tasks:
            raise ValueError("tasks must name at least one task")
        self.dim, self.upsample = dim, upsample
        n = len(self.in_channels)
        grids = _level_grids(router_grid, n)
        linear = block_kwargs.get("router_pool", "linear") == "linear"
        #: (H, W) of every level when the routers pool with Linear(H*W, 1) (the model runs at one
        #: input size only), else None.
        self.fixed_grids: list[tuple[int, int]] | None = grids if linear and grids[0] is not None else None  # type: ignore[assignment]
        self.blocks = nn.ModuleList(
            PAMEBlock(c, dim, self.tasks, router_grid=g, **block_kwargs, **fk) for c, g in zip(self.in_channels, grids)
        )
        self.fusion = nn.ModuleDict(
            {
                t: nn.Sequential(
                    nn.Conv2d(n * dim, dim, 1, **fk),
                    norm_layer(dim, **fk),
                    nn.GELU(),
                    nn.Conv2d(dim, n, 3, padding=1, **fk),
                )
                for t in self.tasks
            }
        )
        self.out_channels = {t: dim for t in self.tasks}
        self.last_aux_loss: Tensor | None = None

    def aux_loss(self) -> Tensor:
        """The routers' load-balancing loss of the last forward (differentiable; 0 is its minimum).

        Set by every eager or ``torch.compile`` forward (not inside ``torch.export``)::

            preds = model(images); loss = task_loss + weight * model.decoder.aux_loss()
        """
        if self.last_aux_loss is None:
            raise RuntimeError("PAMMDecoder.aux_loss() needs a forward pass first")
        return self.last_aux_loss

    def forward(self, features: Sequence[Tensor]) -> TensorDict:
        check_features(features, self.in_channels, type(self).__name__)
        size = features[0].shape[-2:]
        levels: list[dict[str, Tensor]] = []
        aux = features[0].new_zeros(())
        for block, f in zip(self.blocks, features):
            out, gates = block(f)
            if out[self.tasks[0]].shape[-2:] != size:
                out = {t: F.interpolate(v, size=size, mode="bilinear", align_corners=False) for t, v in out.items()}
            levels.append(out)
            aux = aux + load_balancing_loss(gates[0]) + load_balancing_loss(gates[1])
        if not torch.compiler.is_exporting():
            self.last_aux_loss = aux
        result = {}
        for t in self.tasks:
            feats = [lv[t] for lv in levels]
            mask = self.fusion[t](torch.cat(feats, dim=1)).softmax(dim=1)  # (B, n_levels, H, W)
            fused = sum(mask[:, i : i + 1] * v for i, v in enumerate(feats))
            if self.upsample != 1:
                fused = F.interpolate(fused, scale_factor=self.upsample, mode="bilinear", align_corners=False)
            result[t] = fused
        return TensorDict(result, batch_size=[features[0].shape[0]])


def build_pamm(
    encoder_channels: Sequence[int],
    tasks: dict[str, int],
    **decoder_kwargs,
) -> tuple[PAMMDecoder, nn.ModuleDict]:
    """The PAMM decoder and its heads (Conv3x3 C->C + BN + GELU, then Conv1x1 to C_t per task)."""
    device, dtype = decoder_kwargs.get("device"), decoder_kwargs.get("dtype")
    decoder = PAMMDecoder(encoder_channels, list(tasks), **decoder_kwargs)
    heads = nn.ModuleDict(
        {
            t: ConvHead(decoder.out_channels[t], c, hidden=decoder.out_channels[t], act_layer=nn.GELU,
                        device=device, dtype=dtype)
            for t, c in tasks.items()
        }
    )
    return decoder, heads

"""MTMamba (Lin et al., ECCV 2024): self-task (STM) and cross-task (CTM) Mamba blocks and decoder.

Shapes: ``B`` batch, ``H, W`` a stage's spatial size, ``C`` a stage's channels, ``D = expand*C``,
``T`` the number of tasks. Block features are channels-last ``(B, H, W, C)``; per-task features
travel in mappings keyed by task name (a ``TensorDict`` at the decoder's boundary).

The decoder has 3 stages (strides 16, 8, 4). Stage ``i`` of task ``t``: PatchExpand (2x up, half the
channels) of the previous stage's feature (the deepest encoder map for stage 1), concat with the
encoder skip of the same stride, Linear to ``C``, ``depth`` STM blocks; then one block shared by all
tasks (CTM in MTMamba). Each task's head turns its stride-4 feature into predictions.

The decoder family is built by composition: blocks take their Mamba layer as a factory
(``ssm_layer``, default :class:`~mtssm.nn.ss2d.SS2D`, whose scan core is itself pluggable), the
decoder takes one per stage and the block closing each stage as a factory (``cross``). MTMamba++
plugs in its S-CTM (the cross scan), MSM plugs MS-Scan into the SS2D of every stage.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from mtssm.nn.heads import ExpandHead
from mtssm.nn.layers import DropPath, PatchExpand, drop_path_rates
from mtssm.nn.ss2d import SS2D, ScanOrder

__all__ = [
    "CTMBlock",
    "MTMambaDecoder",
    "MTMambaStage",
    "STMBlock",
    "build_mtmamba",
    "check_features",
]

NormLayer = Callable[..., nn.Module]
#: A Mamba layer factory: ``ssm_layer(dim, *, gated=..., in_dim=..., cross_dim=..., device, dtype)``
#: -> a module on channels-last maps (:class:`~mtssm.nn.ss2d.SS2D` and its partials).
SSMLayer = Callable[..., nn.Module]


class STMBlock(nn.Module):
    """Self-task Mamba block: ``x + DropPath(SS2D(LN(x)))`` on ``(B, H, W, C)``.

    The gated SS2D is the paper's MFE with its input-dependent SiLU gate and output Linear
    (Eqs. 14-18). ``ssm_layer`` builds it as ``ssm_layer(dim, **ssm_kwargs)`` (e.g. ``d_state=16``).
    """

    def __init__(
        self,
        dim: int,
        drop_path: float = 0.0,
        ssm_layer: SSMLayer = SS2D,
        norm_layer: NormLayer = nn.LayerNorm,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **ssm_kwargs: object,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.norm = norm_layer(dim, **fk)
        self.op = ssm_layer(dim, **ssm_kwargs, **fk)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        """``x: (B, H, W, C)`` -> ``(B, H, W, C)``."""
        return x + self.drop_path(self.op(self.norm(x)))


class CTMBlock(nn.Module):
    """Cross-task Mamba block (Eqs. 19-25 and the official code), on T task features ``(B, H, W, C)``.

    shared = gate-less SS2D(LN(concat_t x_t)) ``(B, H, W, D)``; per task, ``x~_t`` = gate-less
    SS2D(LN x_t), ``g_t = sigmoid(Linear(LN x_t))``, ``y_t = g_t * shared + (1 - g_t) * x~_t``, and
    ``x_t + DropPath(Linear_{D->C}(y_t))``. (The paper's Eq. 24 puts ``g_t`` on the task feature; the
    released code, followed here, puts it on the shared one: the two differ by ``g -> 1 - g``.)

    The per-task extractors are ``ssm_layer(dim, gated=False, **ssm_kwargs)``, the shared one
    ``shared_ssm_layer(dim, in_dim=T*dim, gated=False, **ssm_kwargs)`` (default ``ssm_layer``; MSM
    gives it MS-Scan).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        dim: int,
        drop_path: float = 0.0,
        ssm_layer: SSMLayer = SS2D,
        shared_ssm_layer: SSMLayer | None = None,
        norm_layer: NormLayer = nn.LayerNorm,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **ssm_kwargs: object,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.tasks = tuple(tasks)
        if not self.tasks:
            raise ValueError("tasks must name at least one task")
        shared_ssm_layer = ssm_layer if shared_ssm_layer is None else shared_ssm_layer
        t = len(self.tasks)
        self.norm_share = norm_layer(t * dim, **fk)
        self.op_share = shared_ssm_layer(dim, in_dim=t * dim, gated=False, **ssm_kwargs, **fk)
        d = self.op_share.d_inner
        self.norm = nn.ModuleDict({k: norm_layer(dim, **fk) for k in self.tasks})
        self.op = nn.ModuleDict({k: ssm_layer(dim, gated=False, **ssm_kwargs, **fk) for k in self.tasks})
        self.gate = nn.ModuleDict({k: nn.Linear(dim, d, bias=False, **fk) for k in self.tasks})
        self.out_proj = nn.ModuleDict({k: nn.Linear(d, dim, bias=False, **fk) for k in self.tasks})
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``x: {task: (B, H, W, C)}`` -> ``{task: (B, H, W, C)}``."""
        shared = self.op_share(self.norm_share(torch.cat([x[t] for t in self.tasks], dim=-1)))
        out = {}
        for t in self.tasks:
            xt = self.norm[t](x[t])
            g = torch.sigmoid(self.gate[t](xt))
            y = g * shared + (1 - g) * self.op[t](xt)
            out[t] = x[t] + self.drop_path(self.out_proj[t](y))
        return out


def check_features(features: Sequence[Tensor], in_channels: Sequence[int], owner: str = "decoder") -> None:
    """One-line ``ValueError`` unless ``features`` are ``len(in_channels)`` maps ``(B, C_i, H_i, W_i)``."""
    if len(features) != len(in_channels):
        raise ValueError(f"{owner} expects {len(in_channels)} feature maps, got {len(features)}")
    for i, (f, c) in enumerate(zip(features, in_channels)):
        if f.ndim != 4 or f.shape[1] != c:
            raise ValueError(
                f"{owner} feature level {i} must be (B, {c}, H, W), got {tuple(f.shape)} "
                f"(expected channels {list(in_channels)})"
            )


class MTMambaStage(nn.Module):
    """One decoder stage: per task PatchExpand, skip concat, Linear fuse, ``depth`` STM blocks;
    then an optional cross-task block built by ``cross_block(tasks, dim, drop_path)``.

    ``forward({task: (B, H, W, C_in)}, skip (B, 2H, 2W, C_skip)) -> {task: (B, 2H, 2W, C)}``
    (the expanded map is cropped when the encoder rounded odd sizes up).

    Args:
        tasks: task names.
        in_dim: channels of the incoming task features (the deepest encoder map for stage 1).
        skip_dim: channels of the encoder skip at this stage's resolution.
        dim: this stage's channels.
        depth: STM blocks per task.
        drop_path: ``depth`` (+ 1 with a cross block) stochastic-depth rates, in block order.
        cross_block: factory of the block closing the stage, or ``None``.
        ssm_layer: the STM blocks' Mamba layer (:data:`SSMLayer`).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        in_dim: int,
        skip_dim: int,
        dim: int,
        depth: int,
        drop_path: Sequence[float],
        cross_block: Callable[[Sequence[str], int, float], nn.Module] | None,
        ssm_layer: SSMLayer = SS2D,
        norm_layer: NormLayer = nn.LayerNorm,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.tasks = tuple(tasks)
        n_blocks = depth + (cross_block is not None)
        if len(drop_path) != n_blocks:
            raise ValueError(f"drop_path needs {n_blocks} rates for this stage, got {len(drop_path)}")
        self.expand = nn.ModuleDict({t: PatchExpand(in_dim, norm_layer=norm_layer, **fk) for t in self.tasks})
        self.fuse = nn.ModuleDict({t: nn.Linear(in_dim // 2 + skip_dim, dim, **fk) for t in self.tasks})
        self.blocks = nn.ModuleDict(
            {
                t: nn.Sequential(
                    *(STMBlock(dim, drop_path[j], ssm_layer, norm_layer, **fk) for j in range(depth))
                )
                for t in self.tasks
            }
        )
        self.cross = cross_block(self.tasks, dim, drop_path[-1]) if cross_block is not None else None

    def forward(self, x: Mapping[str, Tensor], skip: Tensor) -> dict[str, Tensor]:
        h, w = skip.shape[1], skip.shape[2]
        out = {}
        for t in self.tasks:
            y = self.expand[t](x[t])
            if y.shape[1] < h or y.shape[2] < w:
                raise ValueError(f"upsampled feature {tuple(y.shape)} is smaller than the skip {tuple(skip.shape)}")
            y = torch.cat([y[:, :h, :w], skip], dim=-1)  # crop when the encoder rounded odd sizes up
            out[t] = self.blocks[t](self.fuse[t](y))
        return self.cross(out) if self.cross is not None else out


class MTMambaDecoder(nn.Module):
    """The MTMamba decoder over a 4-level encoder: 3 stages at strides 16, 8, 4.

    ``forward([f_1..f_4] with f_i (B, C_i, H/s_i, W/s_i)) -> TensorDict {task: (B, C, H/4, W/4)}``
    (batch size ``[B]``, channels-first, ``C = dims[-1]``; heads turn it into predictions).

    Args:
        in_channels: encoder channels ``[C_1, C_2, C_3, C_4]`` (strides 4, 8, 16, 32).
        tasks: task names.
        dims: channels of the 3 stages (default the skips' channels ``[C_3, C_2, C_1]``).
        depths: STM blocks per stage.
        cross: the shared block closing each stage: ``"ctm"``, ``None`` for none, or a factory
            ``cross(tasks, dim, *, drop_path, ssm_layer, norm_layer, device, dtype)`` (MTMamba++'s
            S-CTM, MSM's CT-MSM) that receives the stage's Mamba layer.
        drop_path_rate: stochastic depth, decreasing linearly to 0 over all blocks in order.
        d_state, expand, dt_rank, d_conv, order: SS2D settings of every block.
        ssm_layer: the Mamba layer of every stage, or one per stage (MSM: SS2D with each stage's
            MS-Scan); the settings above are bound to it where it does not bind them itself.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        tasks: Sequence[str],
        dims: Sequence[int] | None = None,
        depths: Sequence[int] = (2, 2, 2),
        cross: str | Callable[..., nn.Module] | None = "ctm",
        drop_path_rate: float = 0.2,
        d_state: int = 16,
        expand: float = 2,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        order: ScanOrder = "ss2d",
        ssm_layer: SSMLayer | Sequence[SSMLayer] = SS2D,
        norm_layer: NormLayer = nn.LayerNorm,
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
        for d in (self.in_channels[3], *dims[:2]):
            if d % 2:
                raise ValueError(f"stage input channels must be even for PatchExpand, got {d}")
        if isinstance(cross, str):
            if cross not in _CROSS_BLOCKS:
                raise ValueError(f"unknown cross-task block {cross!r}; expected one of {sorted(_CROSS_BLOCKS)} or None")
            cross = _CROSS_BLOCKS[cross]
        layers = list(ssm_layer) if isinstance(ssm_layer, Sequence) else [ssm_layer] * 3
        if len(layers) != 3:
            raise ValueError(f"ssm_layer must be one layer or one per stage (3), got {len(layers)}")
        settings = {"d_state": d_state, "expand": expand, "dt_rank": dt_rank, "d_conv": d_conv, "order": order}
        self.dims = dims
        n_per_stage = [d + (cross is not None) for d in depths]
        rates = drop_path_rates(drop_path_rate, sum(n_per_stage))
        stages, in_dim, start = [], self.in_channels[3], 0
        for i in range(3):
            rate_i = rates[start : start + n_per_stage[i]]
            start += n_per_stage[i]
            layer_i = _bind_defaults(layers[i], settings)
            cross_i = None
            if cross is not None:
                cross_i = partial(_cross_block, cross, ssm_layer=layer_i, norm_layer=norm_layer, **fk)
            stages.append(
                MTMambaStage(
                    self.tasks, in_dim, self.in_channels[2 - i], dims[i], depths[i], rate_i, cross_i,
                    layer_i, norm_layer=norm_layer, **fk,
                )
            )
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


def _bind_defaults(layer: SSMLayer, settings: Mapping[str, object]) -> SSMLayer:
    """``layer`` with the decoder's SS2D ``settings`` bound, except those it already binds itself."""
    own = layer.keywords if isinstance(layer, partial) else {}
    return partial(layer, **{k: v for k, v in settings.items() if k not in own})


def _cross_block(cross: Callable[..., nn.Module], tasks: Sequence[str], dim: int, drop_path: float, **kwargs) -> nn.Module:
    return cross(tasks, dim, drop_path=drop_path, **kwargs)


_CROSS_BLOCKS: dict[str, Callable[..., nn.Module]] = {"ctm": CTMBlock}


def build_mtmamba(
    encoder_channels: Sequence[int],
    tasks: Mapping[str, int],
    **decoder_kwargs,
) -> tuple[MTMambaDecoder, nn.ModuleDict]:
    """The MTMamba decoder and its heads (FinalPatchExpand4x + 1x1 conv per task)."""
    device, dtype = decoder_kwargs.get("device"), decoder_kwargs.get("dtype")
    decoder = MTMambaDecoder(encoder_channels, list(tasks), **decoder_kwargs)
    heads = nn.ModuleDict(
        {t: ExpandHead(decoder.out_channels[t], c, device=device, dtype=dtype) for t, c in tasks.items()}
    )
    return decoder, heads

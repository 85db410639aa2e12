"""Swin Transformer encoder (Liu et al., 2021) in its dense-prediction form.

Four stages at strides 4, 8, 16, 32 with channels ``embed_dim * 2**i``; each output goes through
its own LayerNorm and is returned channels-first, as in the official detection/segmentation Swin.
Any input size works: the image is padded to a multiple of the patch size, every block pads its
map to a multiple of the window size (and crops back), and patch merging pads odd sizes.

Everything shape-dependent (padding, the shifted-window mask, window counts) is computed from the
static tensor shapes with tensor ops, so the module compiles with ``torch.compile(fullgraph=True)``
and exports with ``torch.export`` without graph breaks. Attention runs through
``F.scaled_dot_product_attention`` with the relative position bias (and the shift mask) as an
additive float mask.

Internal layout: maps travel channels-last ``(B, H, W, C)`` between blocks. Module names:
``patch_embed.{proj,norm}``, ``stages.{i}.downsample.{norm,reduction}`` (stages 1..3; the merge
that starts stage i), ``stages.{i}.blocks.{j}.{norm1,attn.{qkv,proj,relative_position_bias_table},
norm2,mlp.{fc1,fc2}}``, ``norms.{i}`` (the per-output LayerNorms). Checkpoints in the official
Swin, timm or mmseg layouts are mapped onto these names by :func:`mtssm.nn.weights.load_encoder_weights`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtssm.nn.encoders.common import Encoder, FeatureInfo, Mlp, check_images, init_transformer_weights, increasing_rates
from mtssm.nn.layers import DropPath

__all__ = [
    "PatchEmbed",
    "PatchMerging",
    "SwinBlock",
    "SwinEncoder",
    "SwinStage",
    "WindowAttention",
    "relative_position_index",
    "shifted_window_mask",
]

_MASK_VALUE = -100.0  # the value the official Swin puts between tokens of different shift regions


def relative_position_index(window_size: int, device: torch.device | str | None = None) -> Tensor:
    """Index into the ``((2w-1)**2, heads)`` bias table for every token pair of a w x w window.

    Returns a LongTensor (N, N), N = w*w, tokens in row-major order inside the window.
    """
    coords = torch.stack(
        torch.meshgrid(
            torch.arange(window_size, device=device), torch.arange(window_size, device=device), indexing="ij"
        )
    ).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :] + (window_size - 1)  # (2, N, N), each in [0, 2w-2]
    return rel[0] * (2 * window_size - 1) + rel[1]


def shifted_window_mask(hp: int, wp: int, window_size: int, shift: int, device: torch.device | None = None) -> Tensor:
    """Additive attention mask of the shifted windows of a padded (hp, wp) map.

    After the cyclic shift by ``shift``, tokens of one window may come from up to 3 x 3 regions of
    the unshifted map; pairs from different regions get ``-100`` (the official value), others 0.
    ``hp`` and ``wp`` must be multiples of ``window_size``. Returns (nW, N, N) with
    nW = (hp/w)*(wp/w), N = w*w, windows in row-major order. Built from static sizes with tensor
    ops only (no data-dependent control flow).
    """
    rows = torch.arange(hp, device=device)
    cols = torch.arange(wp, device=device)
    row_region = (rows >= hp - window_size).long() + (rows >= hp - shift).long()
    col_region = (cols >= wp - window_size).long() + (cols >= wp - shift).long()
    region = row_region[:, None] * 3 + col_region[None, :]  # (hp, wp)
    region = region.view(hp // window_size, window_size, wp // window_size, window_size)
    region = region.permute(0, 2, 1, 3).reshape(-1, window_size * window_size)  # (nW, N)
    different = region[:, :, None] != region[:, None, :]
    return different.float() * _MASK_VALUE


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """(B, Hp, Wp, C) -> (B, nW, N, C), windows row-major, tokens row-major inside a window."""
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, -1, window_size * window_size, c)


def window_reverse(windows: Tensor, window_size: int, h: int, w: int) -> Tensor:
    """(B, nW, N, C) -> (B, h, w, C), the inverse of :func:`window_partition`."""
    b, _, _, c = windows.shape
    x = windows.view(b, h // window_size, w // window_size, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches: (B, C_in, H, W) -> (B, ceil(H/p), ceil(W/p), C), then LayerNorm.

    The image is zero-padded at the bottom/right to a multiple of p.
    """

    def __init__(
        self,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        norm_layer: type[nn.Module] | None = nn.LayerNorm,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size, device=device, dtype=dtype)
        self.norm = norm_layer(embed_dim, device=device, dtype=dtype) if norm_layer is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch_size
        pad_h, pad_w = (-x.shape[2]) % p, (-x.shape[3]) % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.proj(x).permute(0, 2, 3, 1)
        return self.norm(x)


class PatchMerging(nn.Module):
    """2 x 2 patch merging: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C).

    Concatenates the four pixels of each 2 x 2 cell in the official order (top-left, bottom-left,
    top-right, bottom-right), then LayerNorm(4C) and a bias-free Linear(4C, 2C). Odd sizes are
    zero-padded at the bottom/right.
    """

    def __init__(
        self,
        dim: int,
        out_dim: int | None = None,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        out_dim = out_dim or 2 * dim
        self.norm = norm_layer(4 * dim, device=device, dtype=dtype)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        pad_h, pad_w = x.shape[1] % 2, x.shape[2] % 2
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside w x w windows with a learned relative position bias.

    ``forward(x, mask)``: x (B, nW, N, C) with N = w*w; mask (nW, N, N) additive or None.
    Returns (B, nW, N, C).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"WindowAttention: dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.window_size = window_size
        self.attn_drop = attn_drop
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads, device=device, dtype=dtype)
        )
        self.register_buffer(
            "relative_position_index",
            relative_position_index(window_size, device=device),
            persistent=False,
        )
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, device=device, dtype=dtype)
        self.proj = nn.Linear(dim, dim, device=device, dtype=dtype)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def position_bias(self) -> Tensor:
        """The relative position bias of every head: (heads, N, N)."""
        n = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        b, nw, n, c = x.shape
        qkv = self.qkv(x).view(b, nw, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each (B, nW, heads, N, d)
        bias = self.position_bias().to(q.dtype)  # (heads, N, N)
        if mask is not None:
            bias = bias + mask.to(q.dtype)[:, None]  # (nW, heads, N, N)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_drop if self.training else 0.0
        )  # (B, nW, heads, N, d)
        y = y.transpose(2, 3).reshape(b, nw, n, c)
        return self.proj_drop(self.proj(y))


class SwinBlock(nn.Module):
    """Swin block: x + DropPath(W-MSA(LN x)), then x + DropPath(MLP(LN x)); x is (B, H, W, C).

    With ``shift > 0`` the windows are cyclically shifted by ``shift`` (SW-MSA) and the caller
    passes the mask of :func:`shifted_window_mask` for the padded size. The normed map is padded
    to a multiple of the window size at the bottom/right and cropped back after attention.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        shift: int = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= shift < window_size:
            raise ValueError(f"SwinBlock: shift must be in [0, window_size={window_size}), got {shift}")
        self.window_size = window_size
        self.shift = shift
        self.norm1 = norm_layer(dim, device=device, dtype=dtype)
        self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias, attn_drop, drop, device=device, dtype=dtype)
        self.drop_path = DropPath(drop_path)
        self.norm2 = norm_layer(dim, device=device, dtype=dtype)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop, device=device, dtype=dtype)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        _, h, w, _ = x.shape
        ws, s = self.window_size, self.shift
        y = self.norm1(x)
        pad_h, pad_w = (-h) % ws, (-w) % ws
        if pad_h or pad_w:
            y = F.pad(y, (0, 0, 0, pad_w, 0, pad_h))
        hp, wp = h + pad_h, w + pad_w
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        y = window_reverse(self.attn(window_partition(y, ws), mask if s else None), ws, hp, wp)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        if pad_h or pad_w:
            y = y[:, :h, :w].contiguous()
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SwinStage(nn.Module):
    """Optional patch merging (dim_in -> dim, stride 2), then ``depth`` Swin blocks alternating
    regular and shifted windows: (B, H, W, dim_in) -> (B, H', W', dim)."""

    def __init__(
        self,
        dim_in: int,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int = 7,
        downsample: bool = False,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: Sequence[float] = (),
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        drop_path = list(drop_path) or [0.0] * depth
        if len(drop_path) != depth:
            raise ValueError(f"SwinStage: got {len(drop_path)} drop_path rates for depth {depth}")
        if not downsample and dim_in != dim:
            raise ValueError(f"SwinStage: dim_in={dim_in} != dim={dim} needs downsample=True")
        self.window_size = window_size
        self.shift = window_size // 2
        self.downsample = (
            PatchMerging(dim_in, dim, norm_layer=norm_layer, device=device, dtype=dtype)
            if downsample
            else nn.Identity()
        )
        self.blocks = nn.ModuleList(
            SwinBlock(
                dim,
                num_heads,
                window_size,
                shift=0 if j % 2 == 0 else self.shift,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop=drop,
                attn_drop=attn_drop,
                drop_path=drop_path[j],
                act_layer=act_layer,
                norm_layer=norm_layer,
                device=device,
                dtype=dtype,
            )
            for j in range(depth)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        _, h, w, _ = x.shape
        ws = self.window_size
        hp, wp = h + (-h) % ws, w + (-w) % ws
        mask = shifted_window_mask(hp, wp, ws, self.shift, device=x.device) if len(self.blocks) > 1 else None
        for block in self.blocks:
            x = block(x, mask)
        return x


class SwinEncoder(Encoder):
    """Swin Transformer returning four LayerNormed maps at strides p, 2p, 4p, 8p (p = patch size).

    Args:
        in_chans: input image channels.
        patch_size: p, the stride of the first level (4 in every released model).
        embed_dim: C, channels of the first level; level i has C * 2**i.
        depths: blocks per stage (four stages).
        num_heads: attention heads per stage.
        window_size: w, the attention window side (7 for 224 models, 12 for 384 models).
        mlp_ratio: MLP hidden width / channels.
        qkv_bias: bias in the qkv projection.
        drop_rate: dropout after attention/MLP projections.
        attn_drop_rate: dropout on attention weights.
        drop_path_rate: stochastic depth, rising linearly from 0 to this over all blocks.
        act_layer, norm_layer: the activation and norm types.

    ``forward(x)``: x (B, in_chans, H, W) -> list of 4 maps (B, C * 2**i, ceil(H / (p 2**i)),
    ceil(W / (p 2**i))), contract in ``feature_info``.
    """

    def __init__(
        self,
        in_chans: int = 3,
        patch_size: int = 4,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        depths, num_heads = tuple(depths), tuple(num_heads)
        if len(depths) != 4 or len(num_heads) != 4:
            raise ValueError(f"SwinEncoder: depths and num_heads need 4 entries, got {depths} and {num_heads}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"SwinEncoder: drop_path_rate must be in [0, 1), got {drop_path_rate}")
        if window_size < 1:
            raise ValueError(f"SwinEncoder: window_size must be >= 1, got {window_size}")
        self.in_chans = in_chans
        self.window_size = window_size
        self.patch_size = patch_size
        dims = [embed_dim * 2**i for i in range(4)]
        self.feature_info = [FeatureInfo(dims[i], patch_size * 2**i) for i in range(4)]
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm_layer, device=device, dtype=dtype)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = increasing_rates(drop_path_rate, sum(depths))
        starts = [sum(depths[:i]) for i in range(4)]
        self.stages = nn.ModuleList(
            SwinStage(
                dims[max(i - 1, 0)],
                dims[i],
                depths[i],
                num_heads[i],
                window_size,
                downsample=i > 0,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop=drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=rates[starts[i] : starts[i] + depths[i]],
                act_layer=act_layer,
                norm_layer=norm_layer,
                device=device,
                dtype=dtype,
            )
            for i in range(4)
        )
        self.norms = nn.ModuleList(norm_layer(d, device=device, dtype=dtype) for d in dims)
        self.apply(init_transformer_weights)

    def forward(self, x: Tensor) -> list[Tensor]:
        check_images(x, self.in_chans, "SwinEncoder")
        x = self.pos_drop(self.patch_embed(x))
        outs = []
        for stage, norm in zip(self.stages, self.norms, strict=True):
            x = stage(x)
            outs.append(norm(x).permute(0, 3, 1, 2).contiguous())
        return outs

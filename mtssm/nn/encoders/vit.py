"""Plain Vision Transformer encoder (Dosovitskiy et al., 2021) giving four maps at stride 16.

The four outputs are the patch tokens after blocks ``out_indices`` (by default evenly spaced:
depth/4, depth/2, 3 depth/4 and depth, i.e. 6, 12, 18, 24 for ViT-L/16), the last one after the
final LayerNorm when it is the last block, reshaped channels-first to (B, C, ceil(H/p), ceil(W/p)).
This is the feature set PAMM reads from ViT-L/16.

Module names follow timm's ``VisionTransformer`` (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.{i}.{norm1,attn.{qkv,proj},norm2,mlp.{fc1,fc2}}``, ``norm``), so timm
checkpoints load with few renames. The position embedding is stored for the grid of ``img_size``
and resampled (bicubic, as timm does) for other input sizes; images whose sides are not multiples
of the patch size are zero-padded at the bottom/right.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtssm.nn.encoders.common import Encoder, FeatureInfo, Mlp, check_images, init_transformer_weights, increasing_rates
from mtssm.nn.layers import DropPath

__all__ = ["Attention", "ViTBlock", "ViTEncoder", "default_out_indices", "resample_pos_embed", "vit_layer_norm"]


def vit_layer_norm(
    dim: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> nn.LayerNorm:
    """LayerNorm with eps 1e-6, the ViT default (timm, big_vision)."""
    return nn.LayerNorm(dim, eps=1e-6, device=device, dtype=dtype)


def default_out_indices(depth: int, num: int = 4) -> tuple[int, ...]:
    """``num`` evenly spaced block counts ending at ``depth``: (6, 12, 18, 24) for depth 24."""
    if depth < num:
        raise ValueError(f"depth must be >= {num} to give {num} feature maps, got {depth}")
    return tuple(round(depth * (k + 1) / num) for k in range(num))


def resample_pos_embed(
    pos_embed: Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int], num_prefix_tokens: int = 1
) -> Tensor:
    """Bicubic resampling of a position embedding (1, prefix + gh*gw, C) to another grid.

    The first ``num_prefix_tokens`` rows (class token) are kept; the grid rows are read row-major
    as (old_grid[0], old_grid[1]) and resampled (align_corners=False, antialiased when shrinking,
    like timm) to (1, prefix + new_grid[0] * new_grid[1], C).
    """
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    c = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], c).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, c).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


class Attention(nn.Module):
    """Global multi-head self-attention: (B, L, C) -> (B, L, C)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, device=device, dtype=dtype)
        self.proj = nn.Linear(dim, dim, device=device, dtype=dtype)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(b, n, c)))


class ViTBlock(nn.Module):
    """Pre-norm transformer block on tokens (B, L, C): attention then MLP, each residual."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: Callable[..., nn.Module] = vit_layer_norm,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim, device=device, dtype=dtype)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop, device=device, dtype=dtype)
        self.norm2 = norm_layer(dim, device=device, dtype=dtype)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop, device=device, dtype=dtype)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class _PatchProj(nn.Module):
    """Holds the patch projection under the name ``patch_embed.proj`` (timm's key)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, device=None, dtype=None) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class ViTEncoder(Encoder):
    """ViT returning four stride-p maps from evenly spaced blocks.

    Args:
        img_size: the training image side, or its (height, width); fixes the stored position grid
            (height / p, width / p) (PAMM trains on NYUDv2 at (448, 576): a 28 x 36 grid).
        patch_size: p, the stride of every output.
        in_chans: input image channels.
        embed_dim: C, channels of every output.
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / C.
        qkv_bias: bias in the qkv projection.
        class_token: prepend a learned class token (timm's default, kept for weight compatibility;
            it is not returned).
        out_indices: block counts after which tokens are taken (1-based; default evenly spaced,
            see :func:`default_out_indices`); the output at ``depth`` goes through the final norm.
        drop_rate, attn_drop_rate, drop_path_rate: dropouts and the maximum stochastic depth
            (rising linearly over the blocks).

    ``forward(x)``: x (B, in_chans, H, W) -> 4 maps (B, C, ceil(H/p), ceil(W/p)).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 384,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        class_token: bool = True,
        out_indices: Sequence[int] | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: Callable[..., nn.Module] = vit_layer_norm,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        out_indices = tuple(out_indices) if out_indices is not None else default_out_indices(depth)
        valid = len(out_indices) == 4 and all(1 <= i <= depth for i in out_indices)
        if not valid or list(out_indices) != sorted(set(out_indices)):
            raise ValueError(
                f"ViTEncoder: out_indices must be 4 increasing block counts in [1, {depth}], got {out_indices}"
            )
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if len(size) != 2 or size[0] % patch_size or size[1] % patch_size:
            raise ValueError(f"ViTEncoder: img_size={img_size} is not (a pair of) multiples of patch_size={patch_size}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"ViTEncoder: drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.out_indices = out_indices
        self.grid_size = (size[0] // patch_size, size[1] // patch_size)
        self.num_prefix_tokens = 1 if class_token else 0
        self.feature_info = [FeatureInfo(embed_dim, patch_size) for _ in range(4)]
        self.patch_embed = _PatchProj(in_chans, embed_dim, patch_size, device=device, dtype=dtype)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, device=device, dtype=dtype)) if class_token else None
        n_pos = self.grid_size[0] * self.grid_size[1] + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, embed_dim, device=device, dtype=dtype))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = increasing_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            ViTBlock(
                embed_dim,
                num_heads,
                mlp_ratio,
                qkv_bias,
                drop_rate,
                attn_drop_rate,
                rates[i],
                act_layer,
                norm_layer,
                device=device,
                dtype=dtype,
            )
            for i in range(depth)
        )
        self.norm = norm_layer(embed_dim, device=device, dtype=dtype)
        self.apply(init_transformer_weights)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)

    def forward(self, x: Tensor) -> list[Tensor]:
        check_images(x, self.in_chans, "ViTEncoder")
        p = self.patch_size
        pad_h, pad_w = (-x.shape[2]) % p, (-x.shape[3]) % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.patch_embed(x)  # (B, C, gh, gw)
        b, c, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, gh*gw, C)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        pos = resample_pos_embed(self.pos_embed, (gh, gw), self.grid_size, self.num_prefix_tokens)
        x = self.pos_drop(x + pos)
        outs = []
        take = set(self.out_indices)
        for i, block in enumerate(self.blocks, start=1):
            x = block(x)
            if i in take:
                y = self.norm(x) if i == len(self.blocks) else x
                y = y[:, self.num_prefix_tokens :].transpose(1, 2).reshape(b, c, gh, gw)
                outs.append(y)
                if len(outs) == len(self.out_indices):
                    break
        return outs

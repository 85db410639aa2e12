"""MTMamba++ (Lin et al., 2024): feature-level (F-CTM) and semantic-aware (S-CTM) cross-task blocks.

Shapes as in :mod:`mtssm.nn.mtmamba`: channels-last ``(B, H, W, C)`` block features, ``T`` tasks.
The decoder is MTMamba's (3 stages of PatchExpand, skip fuse and 2 STM blocks per task) closed by
one S-CTM (default) or F-CTM per stage, with a convolutional head at stride 4.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mtssm.nn.heads import BATCH_NORMS, ConvHead
from mtssm.nn.layers import DropPath
from mtssm.nn.mtmamba import CTMBlock, MTMambaDecoder
from mtssm.nn.ss2d import SS2D

__all__ = ["FCTMBlock", "SCTMBlock", "build_mtmamba_pp"]


class FCTMBlock(CTMBlock):
    """Feature-level cross-task Mamba block (F-CTM): MTMamba's CTM block.

    A shared gate-less SS2D over the concatenated task features and one per task, fused per task by
    an input-dependent sigmoid gate; see :class:`~mtssm.nn.mtmamba.CTMBlock`.
    """


class SCTMBlock(nn.Module):
    """Semantic-aware cross-task Mamba block (S-CTM) with the cross SSM.

    ``shared = Conv3x3(Conv1x1_{T*C -> C}(LN(concat_t x_t)))`` ``(B, H, W, C)``; per task
    ``x_t + DropPath(CrossSS2D(LN x_t, shared))``, where the task feature is the scanned input (and
    gives the ``D`` skip and ``z`` gate) while the step and ``B``, ``C`` come from ``shared``. The
    cross extractors are ``ssm_layer(dim, cross_dim=dim, **ssm_kwargs)`` (SS2D's cross scan).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        dim: int,
        drop_path: float = 0.0,
        ssm_layer: Callable[..., nn.Module] = SS2D,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **ssm_kwargs: object,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.tasks = tuple(tasks)
        t = len(self.tasks)
        self.norm_share = norm_layer(t * dim, **fk)
        self.conv_share = nn.Sequential(
            nn.Conv2d(t * dim, dim, 1, **fk),
            nn.Conv2d(dim, dim, 3, padding=1, **fk),
        )
        self.norm = nn.ModuleDict({k: norm_layer(dim, **fk) for k in self.tasks})
        # the cross scan: the Mamba layer reading its selection from the shared feature
        self.op = nn.ModuleDict({k: ssm_layer(dim, cross_dim=dim, **ssm_kwargs, **fk) for k in self.tasks})
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``x: {task: (B, H, W, C)}`` -> ``{task: (B, H, W, C)}``."""
        shared = self.norm_share(torch.cat([x[t] for t in self.tasks], dim=-1))
        shared = self.conv_share(shared.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return {t: x[t] + self.drop_path(self.op[t](self.norm[t](x[t]), shared)) for t in self.tasks}


_PP_CROSS: dict[str, Callable[..., nn.Module]] = {"sctm": SCTMBlock, "fctm": FCTMBlock}


def build_mtmamba_pp(
    encoder_channels: Sequence[int],
    tasks: Mapping[str, int],
    cross: str = "sctm",
    head_hidden: int | None = None,
    head_norm: str = "batchnorm",
    **decoder_kwargs,
) -> tuple[MTMambaDecoder, nn.ModuleDict]:
    """The MTMamba++ decoder (``cross`` = ``"sctm"`` or ``"fctm"``) and its conv heads at stride 4.

    ``head_hidden``: the heads' hidden width (default half the stride-4 channels; the official
    model hard-codes 96, ``models/MTMamba_plus.py:299``). ``head_norm``: ``"batchnorm"`` or
    ``"syncbatchnorm"`` (official, ``models/MTMamba_plus.py:300``; plain batch norm outside DDP).
    """
    if cross not in _PP_CROSS:
        raise ValueError(f"unknown MTMamba++ cross-task block {cross!r}; expected one of {sorted(_PP_CROSS)}")
    if head_norm not in BATCH_NORMS:
        raise ValueError(f"head_norm: unknown value {head_norm!r}; expected one of {sorted(BATCH_NORMS)}")
    device, dtype = decoder_kwargs.get("device"), decoder_kwargs.get("dtype")
    decoder = MTMambaDecoder(encoder_channels, list(tasks), cross=_PP_CROSS[cross], **decoder_kwargs)
    heads = nn.ModuleDict(
        {
            t: ConvHead(decoder.out_channels[t], c, hidden=head_hidden, norm_layer=BATCH_NORMS[head_norm],
                        device=device, dtype=dtype)
            for t, c in tasks.items()
        }
    )
    return decoder, heads

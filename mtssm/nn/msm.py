"""MSM: Multi-Scale Mamba for multi-task dense prediction, composed from MTMamba's parts.

MSM extends MTMamba by replacing the single-scale 2-D selective scan inside its Mamba feature
extractors with the Multi-Scale Scan (MS-Scan). Nothing else changes, so MSM is MTMamba's decoder
(:class:`~mtssm.nn.mtmamba.MTMambaDecoder`) with :class:`MSScan` plugged into the SS2D of each stage:

- :class:`MSScan`, SS2D's scan core for MSM: splits the ``D`` scanned channels into one group per
  scale ``s``, turns each ``s x s`` window of a group into one token (``m*s*s`` channels on an
  ``(H/s) x (W/s)`` grid), runs the plain K-direction scan (:class:`~mtssm.nn.ss2d.DirectionalScan`,
  ``K`` from ``order``) per branch, and puts windows and groups back; with ``scales=(1,)`` SS2D
  with it is exactly the plain SS2D;
- TS-MSM (task-specific, the paper's eq. 4): MTMamba's :class:`~mtssm.nn.mtmamba.STMBlock` whose
  SS2D has the stage's MS-Scan;
- CT-MSM (cross-task, eq. 5 and eqs. 11-14 of Appendix A.1): :func:`msm_cross_block`, MTMamba's
  :class:`~mtssm.nn.mtmamba.CTMBlock` whose shared extractor has the MS-Scan (the per-task ones keep
  the plain scan);
- MFR stage: :class:`~mtssm.nn.mtmamba.MTMambaStage` with those blocks; per-stage scales (default
  ``{1, 4}`` everywhere, the paper's best); :func:`build_msm` builds the decoder and MTMamba's
  Expand + Linear heads.

The branch scans keep the ``dt_rank`` and ``d_state`` of the extractor, so MS-Scan costs the same
FLOPs as a plain scan while its projections grow with ``s*s`` (as the paper's Table 6 reports:
+0.01 GFLOPs, 307.99 M -> 396.54 M parameters with a Swin-L encoder on NYUDv2).

Layout: decoder features are channels-last ``(B, H, W, C)``; scans and encoder features are
channels-first ``(B, C, H, W)``. ``B`` batch, ``C`` model channels, ``D = expand*C`` scanned
channels, ``N`` d_state, ``R`` dt_rank, ``T`` tasks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from mtssm.nn import functional as MF
from mtssm.nn.mtmamba import CTMBlock, MTMambaDecoder, SSMLayer, build_mtmamba
from mtssm.nn.ss2d import SS2D, DirectionalScan, ScanOrder

__all__ = ["MSM_SCALE_PRESETS", "MSScan", "build_msm", "msm_cross_block", "msm_stage_scales"]

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


class MSScan(nn.Module):
    """Multi-Scale Scan (MSM eqs. 7-9): channel split, window tokenisation, scan, inverse, concat.

    ``(u, src) (B, D, H, W) -> (B, D, H, W)``, an SS2D scan core (``SS2D(..., scan_layer=MSScan)``,
    where it lives as ``ms_scan``). Group ``i`` (``m = D / len(scales)`` channels) is tokenised at
    scale ``s_i`` into ``(B, m*s_i*s_i, ceil(H/s_i), ceil(W/s_i))`` (zero padding at the bottom and
    right when ``s_i`` does not divide H or W; the padded cells are scanned like any other token
    and cropped afterwards), scanned by its own :class:`~mtssm.nn.ss2d.DirectionalScan`, and
    windowed back. ``src`` (the step and ``B``, ``C`` source, default ``u``) is tokenised alike.

    Args:
        d_inner: D, divisible by ``len(scales)``.
        scales: scan scale of each branch, e.g. ``(1, 4)``.
        order: scan order name of every branch (its number of directions is the branches' ``K``).
        **scan_kwargs: the branches' :class:`~mtssm.nn.ss2d.DirectionalScan` settings (``d_state``,
            ``dt_rank``: MSM keeps the extractor's, ``dt_min``, ``dt_max``, ``dt_init_floor``).
    """

    module_name = "ms_scan"  # its name inside SS2D (the checkpoints' keys)

    def __init__(
        self,
        d_inner: int,
        scales: Sequence[int] = (1, 4),
        *,
        order: ScanOrder = "ss2d",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **scan_kwargs: Any,
    ) -> None:
        super().__init__()
        self.scales = _check_scales(scales)
        if not isinstance(order, str):
            raise ValueError("MSScan needs a scan order name (its branches scan grids of different sizes)")
        n = len(self.scales)
        if d_inner % n:
            raise ValueError(f"d_inner={d_inner} must be divisible by the number of scales {n} ({self.scales})")
        self.d_inner, self.group = d_inner, d_inner // n
        self.branches = nn.ModuleList(
            DirectionalScan(self.group * s * s, order=order, device=device, dtype=dtype, **scan_kwargs)
            for s in self.scales
        )

    def reset_parameters(self) -> None:
        for branch in self.branches:
            branch.reset_parameters()

    def forward(self, u: Tensor, src: Tensor | None = None) -> Tensor:
        """``u (B, D, H, W)``, ``src (B, D, H, W)`` (default ``u``) -> ``(B, D, H, W)``."""
        if u.ndim != 4 or u.shape[1] != self.d_inner:
            raise ValueError(f"MSScan expects u of shape (B, {self.d_inner}, H, W), got {tuple(u.shape)}")
        same = src is None or src is u
        h, w = u.shape[-2:]
        srcs = u.split(self.group, dim=1) if same else src.split(self.group, dim=1)
        outs = []
        for s, core, part, spart in zip(self.scales, self.branches, u.split(self.group, dim=1), srcs):
            tokens = MF.window_tokenize(part, s)  # (B, m*s*s, ceil(H/s), ceil(W/s))
            stokens = tokens if same else MF.window_tokenize(spart, s)
            outs.append(MF.window_untokenize(core(tokens, stokens), s, h, w))
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]

    def extra_repr(self) -> str:
        return f"d_inner={self.d_inner}, scales={self.scales}"


def msm_cross_block(tasks: Sequence[str], dim: int, *, ssm_layer: SSMLayer = SS2D, **kwargs) -> CTMBlock:
    """CT-MSM: MTMamba's CTM block whose shared extractor is ``ssm_layer`` (the stage's SS2D with
    MS-Scan) while the per-task extractors keep the plain scan (the paper's eqs. 5 and 11-14)."""
    return CTMBlock(tasks, dim, ssm_layer=partial(ssm_layer, scan_layer=None), shared_ssm_layer=ssm_layer, **kwargs)


def msm_stage_scales(scales: str | Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """The scan scales of the 3 stages: a key of :data:`MSM_SCALE_PRESETS` or three sequences."""
    if isinstance(scales, str):
        if scales not in MSM_SCALE_PRESETS:
            raise ValueError(f"unknown scales preset {scales!r}; expected one of {sorted(MSM_SCALE_PRESETS)}")
        scales = MSM_SCALE_PRESETS[scales]
    out = [_check_scales(s) for s in scales]
    if len(out) != 3:
        raise ValueError(f"scales must give one scale set per stage (3), got {len(out)}: {scales!r}")
    return out


def build_msm(
    encoder_channels: Sequence[int],
    tasks: Mapping[str, int],
    scales: str | Sequence[Sequence[int]] = "1-4",
    **decoder_kwargs,
) -> tuple[MTMambaDecoder, nn.ModuleDict]:
    """The MSM decoder and its heads: MTMamba's decoder with each stage's SS2D scanning with MS-Scan
    at that stage's ``scales`` (:func:`msm_stage_scales`), CT-MSM blocks and MTMamba's heads.

    ``decoder_kwargs`` go to :class:`~mtssm.nn.mtmamba.MTMambaDecoder` (dims, depths, drop path,
    SS2D settings).
    """
    layers = [partial(SS2D, scan_layer=partial(MSScan, scales=s)) for s in msm_stage_scales(scales)]
    return build_mtmamba(encoder_channels, tasks, cross=msm_cross_block, ssm_layer=layers, **decoder_kwargs)

"""The full multi-task network: a shared encoder, a multi-task decoder and one head per task.

Contract between the parts (``B`` batch, ``H, W`` input size):

- encoder: ``images (B, 3, H, W) -> [f_1, f_2, f_3, f_4]``, ``f_i (B, C_i, H_i, W_i)`` at strides
  4, 8, 16, 32; ``encoder.feature_info`` lists ``(C_i, stride_i)``.
- decoder: ``features -> TensorDict {task: (B, C_dec, h, w)}`` with batch size ``[B]`` (channels
  first); ``decoder.in_channels`` (the ``C_i`` it accepts, a wrong one is a one-line error naming the
  level) and ``decoder.tasks``.
- heads: ``nn.ModuleDict`` ``{task: head}``, ``head((B, C_dec, h, w)) -> (B, C_t, h', w')``.
- the model resizes each head output to ``(H, W)`` (bilinear): ``{task: (B, C_t, H, W)}``, ``C_t``
  from :mod:`mtssm.nn.tasks`.

Images enter normalised: ``(rgb / 255 - mean) / std`` with the model's own statistics,
:attr:`MultiTaskModel.input_normalization`, which the data pipeline, ``predict`` and ``export`` read
from the model. They are metadata, not weights: kept in non-persistent buffers (outside
``state_dict``, so every weights file loads unchanged) and saved in a checkpoint's metadata
(:data:`mtssm.nn.pretrained.NORMALIZATION_KEY`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from mtssm.nn.layers import resize_bilinear

__all__ = ["ExportableModel", "MultiTaskModel", "feature_channels"]

_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def feature_channels(encoder: nn.Module) -> list[int]:
    """The channels ``C_i`` listed by ``encoder.feature_info`` (``FeatureInfo`` or ``(C_i, s_i)`` pairs)."""
    info = getattr(encoder, "feature_info", None)
    if info is None:
        raise TypeError(f"encoder {type(encoder).__name__} has no feature_info listing (channels, stride) per level")
    return [int(f.channels) if hasattr(f, "channels") else int(f[0]) for f in info]


class MultiTaskModel(nn.Module):
    """Encoder + decoder + per-task heads: ``images (B, 3, H, W) -> TensorDict {task: (B, C_t, H, W)}``.

    Args:
        encoder: returns 4 feature maps and exposes ``feature_info`` ``[(C_i, stride_i)]``.
        decoder: takes the feature list, returns a ``TensorDict`` of per-task features.
        heads: one head per task.
        tasks: task names, or ``{task: C_t}``; must match the heads' keys.
        normalization: ``(mean, std)`` per RGB channel the inputs are normalised with (ImageNet's
            by default); see :attr:`input_normalization`.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        heads: nn.ModuleDict,
        tasks: Sequence[str] | Mapping[str, int],
        normalization: tuple[Sequence[float], Sequence[float]] = _IMAGENET,
    ) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        if set(heads.keys()) != set(self.tasks):
            raise ValueError(f"heads {sorted(heads.keys())} do not match tasks {sorted(self.tasks)}")
        enc_channels = feature_channels(encoder)
        dec_channels = list(getattr(decoder, "in_channels", enc_channels))
        if enc_channels != dec_channels:
            raise ValueError(f"encoder gives channels {enc_channels} but the decoder expects {dec_channels}")
        self.encoder = encoder
        self.decoder = decoder
        self.heads = heads
        # float32 on the model's device, outside state_dict (see the module docstring)
        device = next((p.device for p in self.parameters()), None)
        self.register_buffer("input_mean", torch.empty(3, device=device), persistent=False)
        self.register_buffer("input_std", torch.empty(3, device=device), persistent=False)
        self.set_input_normalization(*normalization)

    @property
    def input_normalization(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """``(mean, std)`` per RGB channel: inputs are ``(rgb / 255 - mean) / std`` (stored in float32,
        read back to 7 significant digits, so 0.485 reads 0.485)."""
        mean = tuple(float(f"{v:.7g}") for v in self.input_mean.tolist())
        std = tuple(float(f"{v:.7g}") for v in self.input_std.tolist())
        return mean, std  # type: ignore[return-value]

    @torch.no_grad()
    def set_input_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Set the ``(mean, std)`` per RGB channel the model expects its inputs normalised with."""
        mean, std = [float(v) for v in mean], [float(v) for v in std]
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"normalization: expected 3 means and 3 positive stds, got mean={mean}, std={std}")
        self.input_mean.copy_(torch.tensor(mean))
        self.input_std.copy_(torch.tensor(std))

    @property
    def fixed_input_size(self) -> tuple[int, int] | None:
        """``(H, W)``, the only input size the model runs at, or None when it runs at any size
        (the input sizes a decoder fixes: PAMM's official routers, ``Linear(H*W, 1)`` per level)."""
        grids = getattr(self.decoder, "fixed_grids", None)
        if not grids:
            return None
        info = self.encoder.feature_info[0]
        stride = int(info.stride) if hasattr(info, "stride") else int(info[1])
        return grids[0][0] * stride, grids[0][1] * stride

    def aux_losses(self) -> dict[str, Tensor]:
        """Auxiliary training losses of the last forward, by name (``{"load_balancing": ...}`` for
        a decoder with routed experts; empty otherwise). The trainer adds them to the task loss
        with the recipe's weights."""
        aux = getattr(self.decoder, "aux_loss", None)
        if aux is None or getattr(self.decoder, "last_aux_loss", None) is None:
            return {}
        return {"load_balancing": aux()}

    def forward_dict(self, images: Tensor) -> dict[str, Tensor]:
        """``images (B, 3, H, W)`` -> plain ``{task: (B, C_t, H, W)}`` (what :meth:`as_exportable` runs)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        size = (images.shape[-2], images.shape[-1])
        feats = self.decoder(self.encoder(images))
        out = {}
        for t in self.tasks:
            y = self.heads[t](feats[t])
            out[t] = resize_bilinear(y, size)
        return out

    def forward(self, images: Tensor) -> TensorDict | dict[str, Tensor]:
        """``images (B, 3, H, W)`` -> ``TensorDict {task: (B, C_t, H, W)}`` with batch size ``[B]``.

        Under ``torch.export`` the same tensors come back as a plain ``dict``: ``torch.export.save``
        cannot serialise a ``TensorDict`` (tensordict registers no serialised pytree name for it),
        while a ``dict`` output saves, loads in a fresh process after ``import mtssm`` and compiles
        with AOTInductor. So the direct path works::

            ep = torch.export.export(model.eval(), (images,))
            torch.export.save(ep, "model.pt2")
            # elsewhere: ``import mtssm`` first (registers the ops), then torch.export.load
        """
        out = self.forward_dict(images)
        if torch.compiler.is_exporting():
            return out
        return TensorDict(out, batch_size=[images.shape[0]])

    def as_exportable(self) -> ExportableModel:
        """A view of this model whose forward always returns a plain ``dict`` of tensors.

        Exporting the model itself gives the same program (see :meth:`forward`); this view is for
        callers that want a ``dict`` in eager mode too.
        """
        return ExportableModel(self)


class ExportableModel(nn.Module):
    """Wraps a :class:`MultiTaskModel` (sharing its parameters) to return ``{task: (B, C_t, H, W)}``."""

    def __init__(self, model: MultiTaskModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.model.forward_dict(images)

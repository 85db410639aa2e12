"""What a weights load did: :class:`WeightsReport`, and the key mapping the converters return."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

__all__ = ["IMAGENET", "INCEPTION", "Mapping", "WeightsReport", "format_names"]

#: Input normalisation (mean, std) of ImageNet-trained weights (Swin, and every official model here).
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
#: Input normalisation of Google's ViT / AugReg weights ("Inception" statistics).
INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

_MAX_NAMES = 8


def format_names(keys: list[str], limit: int = _MAX_NAMES) -> str:
    """``[a, b, ... (+n more)]``: at most ``limit`` names, for one-line messages."""
    shown = ", ".join(keys[:limit])
    more = f", ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"[{shown}{more}]"


@dataclass
class Mapping:
    """A file's tensors renamed to a module's keys by a layout converter (shapes not yet checked).

    Attributes:
        layout: the layout's name.
        tensors: ``{model_key: (file_key, tensor)}``.
        ignored: file keys dropped on purpose (classifier heads, cached masks and indices, modules
            the producing code never runs).
        unplaced: file keys the converter has no place for.
        absent: model keys this layout cannot hold (left as they are, not counted as missing).
        defaults: ``{model_key: tensor}`` for keys the layout never stores because the producing
            code keeps them at a fixed value; they are set to it.
        reshaped: model keys whose tensor the converter reshaped or reordered (losslessly).
        mean, std: the input normalisation the weights were trained with, where the layout says.
    """

    layout: str
    tensors: dict[str, tuple[str, Tensor]] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    unplaced: list[str] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)
    defaults: dict[str, Tensor] = field(default_factory=dict)
    reshaped: set[str] = field(default_factory=set)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def put(self, model_key: str, file_key: str, value: Tensor, reshaped: bool = False) -> None:
        self.tensors[model_key] = (file_key, value)
        if reshaped:
            self.reshaped.add(model_key)

    def merge(self, other: Mapping, prefix: str = "") -> None:
        """Add ``other``'s entries, its model keys under ``prefix``."""
        for k, (fk, v) in other.tensors.items():
            self.put(prefix + k, fk, v, reshaped=k in other.reshaped)
        self.ignored += other.ignored
        self.unplaced += other.unplaced
        self.absent += [prefix + k for k in other.absent]
        self.defaults.update({prefix + k: v for k, v in other.defaults.items()})


@dataclass
class WeightsReport:
    """What :func:`~mtssm.nn.weights.load_encoder_weights` or ``load_model_weights`` did.

    Attributes:
        path: the file read.
        layout: the layout detected in it (``"swin-mmseg"``, ``"mtmamba-official"``, ``"mtssm"``, ...).
        loaded: model keys given a value from the file.
        missing: model keys the file should hold but does not (left at their current values).
        unexpected: file keys (as named in the file) with no place in the model.
        mismatched: ``"key: file shape vs model shape"`` for tensors that cannot be fitted.
        reshaped: model keys whose tensor was reshaped or reordered to mtssm's layout (lossless).
        resampled: model keys interpolated to another size (relative position tables, position
            embeddings).
        ignored: file keys dropped on purpose (classifier heads, cached buffers, unused modules).
        absent: model keys the layout cannot hold (e.g. the first three output norms of a
            classification Swin), left as they were; not counted as missing.
        defaults: model keys the layout never stores, set to the fixed value its code uses.
        mean, std: the input normalisation the weights were trained with when the layout tells,
            else None.
    """

    path: str
    layout: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    reshaped: list[str] = field(default_factory=list)
    resampled: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)
    defaults: list[str] = field(default_factory=list)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @property
    def ok(self) -> bool:
        """True when every model key got a value and every file key was used or deliberately dropped."""
        return not (self.missing or self.unexpected or self.mismatched)

    def problems(self) -> str:
        """The missing, unexpected and mismatched keys in one line ('' when :attr:`ok`)."""
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing keys {format_names(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected keys {format_names(self.unexpected)}")
        if self.mismatched:
            parts.append(f"{len(self.mismatched)} shape mismatches {format_names(self.mismatched)}")
        return "; ".join(parts)

    def summary(self) -> str:
        """A one-line account: file, layout, counts, and what was reshaped or left alone."""
        name = Path(self.path).name
        counts = [f"{len(self.loaded)} loaded"]
        for label, keys in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("mismatched", self.mismatched),
            ("reshaped", self.reshaped),
            ("resampled", self.resampled),
            ("ignored", self.ignored),
            ("set to the layout's fixed value", self.defaults),
            ("not held by this layout", self.absent),
        ):
            if keys:
                counts.append(f"{len(keys)} {label}")
        line = f"{name}: {self.layout} layout, {', '.join(counts)}"
        if self.mean is not None:
            line += f"; input mean {_fmt(self.mean)} std {_fmt(self.std)}"
        problems = self.problems()
        return line + (f" ({problems})" if problems else "")


def _fmt(values: tuple[float, ...] | None) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")" if values is not None else "None"

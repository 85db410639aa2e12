"""The inputs of ``mtssm::selective_scan`` as one typed structure, and their checks.

Every implementation of the op (the C++ kernel's Python twin, the pure-PyTorch path, the Triton
launchers) and its fake take a :class:`ScanInputs`; :func:`check_scan_inputs` checks every shape
with ``torch._check*`` (so it runs on fake tensors with symbolic sizes as well as on real ones) and
names the tensor in its one-line message.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "GRAD_NAMES",
    "ScanDims",
    "ScanInputs",
    "check_scan_inputs",
    "check_shape",
    "compute_dtype",
    "n_chunks",
]

DEFAULT_CHUNK_SIZE = 64
# The differentiable inputs, in the order of the backward op's outputs.
GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """fp64 when any input is fp64, else fp32 (half and bfloat16 are accumulated in fp32)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def n_chunks(L, chunk_size: int):
    """Number of stored chunk states: ``ceil(L / chunk_size)``, at least 1 (``L`` may be symbolic)."""
    return torch.sym_max(1, (L + chunk_size - 1) // chunk_size)


@dataclass(frozen=True)
class ScanInputs:
    """The arguments of ``mtssm::selective_scan``, in the op's order (``ScanInputs(*args)``).

    Shapes: ``u, z: (batch, dim, L)``; ``delta: (batch, K, dim, L)``; ``A: (K, dim, N)``;
    ``B, C: (batch, K, G, N, L)`` (input-dependent, ``dim % G == 0``) or ``(K, dim, N)``
    (constant); ``D, delta_bias: (K, dim)``; ``initial_state: (batch, K, dim, N)``;
    ``perm: (K, L)`` integer, row k the positions visited by direction k (identity when None).
    """

    u: Tensor
    delta: Tensor
    A: Tensor
    B: Tensor
    C: Tensor
    D: Tensor | None = None
    z: Tensor | None = None
    delta_bias: Tensor | None = None
    initial_state: Tensor | None = None
    perm: Tensor | None = None
    delta_softplus: bool = False
    chunk_size: int = DEFAULT_CHUNK_SIZE

    def op_args(self) -> tuple:
        """The op's positional arguments."""
        return tuple(getattr(self, f.name) for f in fields(self))

    def grad_inputs(self) -> tuple[Tensor | None, ...]:
        """The differentiable inputs, in :data:`GRAD_NAMES` order."""
        return tuple(getattr(self, name) for name in GRAD_NAMES)

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.u, self.delta, self.A, self.B, self.C)

    @property
    def dims(self) -> ScanDims:
        batch, dim, L = self.u.shape
        K, N = self.A.shape[0], self.A.shape[2]
        groups = next((M.shape[2] for M in (self.B, self.C) if M.dim() == 5), 1)
        return ScanDims(batch, K, dim, L, N, groups)


class ScanDims(NamedTuple):
    batch: int
    K: int
    dim: int
    L: int
    N: int
    groups: int


def check_shape(t: Tensor, name: str, layout: str, want: tuple) -> None:
    """``t`` has ``len(want)`` dims, each equal to its ``want`` entry (``None``: any)."""
    shape = tuple(t.shape)
    torch._check_value(
        t.dim() == len(want), lambda: f"{name} must be {layout}, got shape {shape}"
    )
    for actual, expected in zip(shape, want):
        if expected is not None:
            torch._check_value(actual == expected, lambda: f"{name} must be {layout}, got shape {shape}")


def _fmt(*sizes) -> str:
    return "(" + ", ".join("?" if s is None else str(s) for s in sizes) + ")"


def check_scan_inputs(x: ScanInputs) -> ScanDims:
    """Check the dtype and every size of every input of the op; returns its dimensions.

    Raises ``TypeError`` (non-float input) or ``ValueError`` (a shape) with one line naming the
    tensor and the expected shape. Works on real and fake (symbolic) tensors.
    """
    for name in GRAD_NAMES:
        t = getattr(x, name)
        if t is not None:
            torch._check_type(
                t.dtype in _FLOAT_DTYPES,
                lambda: f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}",
            )
    torch._check_value(x.u.dim() == 3, lambda: f"u must be (batch, dim, L), got shape {tuple(x.u.shape)}")
    batch, dim, L = x.u.shape
    check_shape(x.delta, "delta", f"(batch, K, dim, L) = {_fmt(batch, 'K', dim, L)}",
                 (batch, None, dim, L))
    K = x.delta.shape[1]
    check_shape(x.A, "A", f"real (K, dim, N) = {_fmt(K, dim, 'N')}", (K, dim, None))
    N = x.A.shape[2]
    groups = []
    for name in ("B", "C"):
        M = getattr(x, name)
        if M.dim() == 3:
            check_shape(M, name, f"(K, dim, N) = {_fmt(K, dim, N)} or (batch, K, G, N, L)",
                         (K, dim, N))
            continue
        check_shape(M, name, f"(batch, K, G, N, L) = {_fmt(batch, K, 'G', N, L)} or (K, dim, N)",
                     (batch, K, None, N, L))
        G = M.shape[2]
        torch._check_value(G >= 1, lambda: f"{name} must have at least one group, got G = {G}")
        torch._check_value(dim % G == 0,
                           lambda: f"dim = {dim} must be divisible by the groups G = {G} of {name}")
        groups.append(G)
    if len(groups) == 2:
        torch._check_value(groups[0] == groups[1], lambda: f"B and C must have the same number of "
                           f"groups, got {groups[0]} and {groups[1]}")
    for name in ("D", "delta_bias"):
        t = getattr(x, name)
        if t is not None:
            check_shape(t, name, f"(K, dim) = {_fmt(K, dim)}", (K, dim))
    if x.z is not None:
        check_shape(x.z, "z", f"(batch, dim, L) = {_fmt(batch, dim, L)} like u", (batch, dim, L))
    if x.initial_state is not None:
        check_shape(x.initial_state, "initial_state",
                     f"(batch, K, dim, N) = {_fmt(batch, K, dim, N)}", (batch, K, dim, N))
    if x.perm is not None:
        perm = x.perm
        torch._check_value(
            perm.dtype in (torch.int64, torch.int32),
            lambda: f"perm must be an integer tensor (K, L) = {_fmt(K, L)}, got {perm.dtype}",
        )
        check_shape(perm, "perm", f"an integer tensor (K, L) = {_fmt(K, L)}", (K, L))
    torch._check_value(
        isinstance(x.chunk_size, (int, torch.SymInt)) and x.chunk_size >= 1,
        lambda: f"chunk_size must be a positive int, got {x.chunk_size!r}",
    )
    return ScanDims(batch, K, dim, L, N, groups[0] if groups else 1)

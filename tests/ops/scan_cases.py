"""Shared builders for the scan tests: random inputs in mamba-ssm's layout and tolerances."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# (rtol, atol) per dtype for outputs; gradients use GRAD_TOL.
TOL = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (3e-2, 3e-2),
}
GRAD_TOL = {
    torch.float64: (1e-8, 1e-9),
    torch.float32: (1e-3, 1e-3),
    torch.bfloat16: (8e-2, 8e-2),
}


@dataclass
class ScanCase:
    batch: int = 2
    dim: int = 6
    L: int = 17
    N: int = 4
    groups: int = 2
    variable_B: bool = True
    variable_C: bool = True
    has_D: bool = True
    has_z: bool = True
    has_bias: bool = True
    softplus: bool = True
    has_init: bool = False
    dtype: torch.dtype = torch.float64
    seed: int = 0

    def inputs(self) -> dict[str, torch.Tensor | None]:
        """Leaf tensors requiring grad (None for absent optional inputs)."""
        g = torch.Generator().manual_seed(self.seed)
        b, d, L, N, G = self.batch, self.dim, self.L, self.N, self.groups

        def r(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale)

        t = {
            "u": r(b, d, L),
            "delta": r(b, d, L, scale=0.5),
            "A": -(torch.rand(d, N, generator=g, dtype=torch.float64) + 0.5),
            "B": r(b, G, N, L) if self.variable_B else r(d, N),
            "C": r(b, G, N, L) if self.variable_C else r(d, N),
            "D": r(d) if self.has_D else None,
            "z": r(b, d, L) if self.has_z else None,
            "delta_bias": r(d, scale=0.5) if self.has_bias else None,
            "initial_state": r(b, d, N) if self.has_init else None,
        }
        if not self.softplus:  # keep steps positive so the recurrence stays stable
            t["delta"] = t["delta"].abs() + 0.05
            if t["delta_bias"] is not None:
                t["delta_bias"] = t["delta_bias"].abs()
        return {
            k: None if v is None else v.to(self.dtype).requires_grad_() for k, v in t.items()
        }


def assert_close(actual, expected, dtype, what: str, grad: bool = False) -> None:
    rtol, atol = (GRAD_TOL if grad else TOL)[dtype]
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")

"""Every tiny model computes what its fixture pinned: same weights, same input, same outputs and gradients.

The fixtures (``tests/nn/make_refactor_fixtures.py`` writes them) hold the state dict's keys and
shapes, the input, the eval and training outputs, the loss and gradients computed by the code of
the time they were made; a refactor of the modules must leave them unchanged. Driven by the
registry: a tiny model without a fixture fails (generate it).
"""

from __future__ import annotations

import pytest
import torch

from mtssm.nn import create_model, list_models
from tests.nn.make_refactor_fixtures import (
    FIXTURES,
    grad_summary,
    load_fixture,
    run,
    weights_from_fixture,
)

RTOL = 1e-5  # relative to each value, and to the largest magnitude of its tensor (as the floor)
# Gradients below this fraction of the model's largest gradient are rounding noise (a mathematically
# zero gradient, e.g. of a bias before a normalisation, comes out ~1e-10 and varies with the
# reduction order of the threaded kernels): they are compared to that floor.
GRAD_FLOOR = 1e-7


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, floor: float = 0.0) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double(), expected.double()
    atol = max(RTOL * e.abs().max().item() if e.numel() else 0.0, floor)
    torch.testing.assert_close(a, e, rtol=RTOL, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", list_models("*_tiny"))
def test_tiny_model_matches_its_fixture(name):
    assert (FIXTURES / f"{name}.safetensors").exists(), f"no fixture for {name}: run python -m tests.nn.make_refactor_fixtures {name}"
    fx, meta = load_fixture(name)
    torch.manual_seed(0)
    model = create_model(name)
    model.load_state_dict(weights_from_fixture(fx, meta), strict=True)
    names = [n for n, _ in model.named_parameters()]
    assert names == meta["params"], f"{name}: the parameters are not those of the fixture"
    got = run(model, fx["input"])
    assert sorted(got) == meta["outputs"]
    floor = GRAD_FLOOR * fx["grad_summary"][:, 2].max().item()
    for key in meta["outputs"]:
        if key == "grad_summary":
            continue
        _assert_close(got[key], fx[key], f"{name} {key}", floor if key.startswith("grad/") else 0.0)
    # Every parameter's gradient: its sum and absolute sum (to the absolute sum), its largest
    # magnitude and a few entries (to that magnitude).
    params = dict(model.named_parameters())
    for i, n in enumerate(meta["params"]):
        ref = fx["grad_summary"][i]
        now = grad_summary(n, params[n].grad, params[n].numel())
        scale = torch.tensor([ref[1], ref[1], ref[2]] + [ref[2]] * (len(ref) - 3), dtype=torch.float64)
        bad = (now - ref).abs() > RTOL * (ref.abs() + scale) + floor
        assert not bad.any(), f"{name}: gradient of {n} changed: {now.tolist()} vs {ref.tolist()}"
    for n in meta["full_grads"]:
        g = params[n].grad
        _assert_close(torch.zeros_like(params[n]) if g is None else g, fx[f"full_grad/{n}"], f"{name} grad of {n}", floor)

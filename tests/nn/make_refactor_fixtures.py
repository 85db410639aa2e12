"""Fixtures that pin every tiny model's outputs and gradients: ``python -m tests.nn.make_refactor_fixtures``.

For every registered ``*_tiny`` model (driven by the registry) this writes
``tests/nn/fixtures/<name>.safetensors`` with what the current code computes:

- the state dict's keys and shapes, and per floating tensor its mean and spread (``stats``): the
  weights themselves are :func:`fill_weights`'s pure function of (key, shape, mean, spread), so a
  fixture stays small (the tiny models hold 4 M numbers) and does not depend on the order in which
  modules create and initialise their parameters; integer buffers are stored as they are;
- the input ``(1, 3, 32, 40)`` (every map of the tiny encoder has a side that MSM's scale 4 does
  not divide, and stage 1 crops the expanded map: the odd-size paths all run);
- eval mode: every task's output;
- training mode, from :data:`TRAIN_SEED` (drop path and PAMM's noisy gates draw from it): every
  output, the loss :func:`loss_fn`, the input's gradient, the full gradient of a few parameters and,
  for every parameter, a summary of its gradient (sum, absolute sum, largest magnitude and a few
  entries at fixed positions).

``tests/nn/test_refactor_parity.py`` rebuilds each model from the registry, loads the weights with
``strict=True`` and asserts that it computes the same. Regenerate the fixtures only when a model's
computation changes on purpose (and say so in the commit).
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mtssm.nn import create_model, list_models

FIXTURES = Path(__file__).resolve().parent / "fixtures"
INPUT_SHAPE = (1, 3, 32, 40)
TRAIN_SEED = 1234
N_FULL_GRADS = 6  # parameters whose whole gradient is stored
MAX_FULL_GRAD_NUMEL = 4096
N_SAMPLES = 4  # entries of every parameter's gradient stored at fixed positions

_MASK = 0xFFFFFFFF


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer hash, elementwise on int64 (exact on every platform: no product exceeds 2**60)."""
    x = x & _MASK
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK
    return (x >> 16) ^ x


def uniform(key: str, shape: tuple[int, ...]) -> Tensor:
    """Deterministic U[0, 1) float64 numbers of ``shape``, a function of ``key`` and position only."""
    n = 1
    for s in shape:
        n *= s
    seed = zlib.crc32(key.encode())
    x = _hash32(_hash32(torch.arange(n, dtype=torch.int64)) ^ seed)
    return (x.double() / 2.0**32).reshape(shape)


def fill_weights(key: str, shape: tuple[int, ...], mean: float, spread: float) -> Tensor:
    """The float32 weights stored under ``key``: uniform with the given mean and standard deviation."""
    u = uniform(key, shape)
    return (mean + spread * 3.0**0.5 * (2.0 * u - 1.0)).float()


def model_input() -> Tensor:
    return (2.0 * uniform("input", INPUT_SHAPE) - 1.0).float()


def loss_fn(outputs: dict[str, Tensor]) -> Tensor:
    """A fixed loss that weighs each task's output by a fixed map (so no gradient is trivial)."""
    total = torch.zeros(())
    for t in sorted(outputs):
        y = outputs[t].float()
        w = 2.0 * uniform(f"loss/{t}", tuple(y.shape)).float() - 1.0
        total = total + (y * w).mean() + 0.1 * y.square().mean()
    return total


def sample_positions(name: str, numel: int) -> Tensor:
    return (uniform(f"grad/{name}", (N_SAMPLES,)) * numel).long().clamp(max=numel - 1)


def grad_summary(name: str, grad: Tensor | None, numel: int) -> Tensor:
    """``[sum, sum |g|, max |g|, g at N_SAMPLES fixed positions]`` (zeros for a parameter without a gradient)."""
    if grad is None:
        return torch.zeros(3 + N_SAMPLES, dtype=torch.float64)
    g = grad.detach().double().flatten()
    head = torch.stack([g.sum(), g.abs().sum(), g.abs().max()])
    return torch.cat([head, g[sample_positions(name, numel)]])


def full_grad_names(names: list[str], numels: list[int]) -> list[str]:
    """``N_FULL_GRADS`` parameters spread evenly over the model, among those of at most ``MAX_FULL_GRAD_NUMEL``."""
    small = [n for n, k in zip(names, numels) if k <= MAX_FULL_GRAD_NUMEL]
    if len(small) <= N_FULL_GRADS:
        return small
    step = (len(small) - 1) / (N_FULL_GRADS - 1)
    return [small[round(i * step)] for i in range(N_FULL_GRADS)]


def weights_from_fixture(fx: dict[str, Tensor], meta: dict) -> dict[str, Tensor]:
    """The state dict a fixture describes (see the module docstring)."""
    state = {}
    for i, (key, shape) in enumerate(meta["float_keys"]):
        mean, spread = fx["stats"][i].tolist()
        state[key] = fill_weights(key, tuple(shape), mean, spread)
    for key in meta["int_keys"]:
        state[key] = fx[f"int/{key}"]
    return state


def run(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """Eval outputs, then a training forward/backward from ``TRAIN_SEED``: every tensor the fixture pins."""
    out: dict[str, Tensor] = {}
    model.eval()
    with torch.no_grad():
        for t, y in model(x).items():
            out[f"eval/{t}"] = y
    model.train()
    model.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_(True)
    torch.manual_seed(TRAIN_SEED)
    preds = dict(model(xg).items())
    loss = loss_fn(preds)
    loss.backward()
    for t, y in preds.items():
        out[f"train/{t}"] = y.detach()
    out["train/loss"] = loss.detach()
    out["grad/input"] = xg.grad
    params = dict(model.named_parameters())
    out["grad_summary"] = torch.stack([grad_summary(n, p.grad, p.numel()) for n, p in params.items()])
    return out


def make_fixture(name: str) -> tuple[dict[str, Tensor], dict]:
    torch.manual_seed(0)
    model = create_model(name)
    state = model.state_dict()
    float_keys, stats, int_keys, tensors = [], [], [], {}
    for key, v in state.items():
        if v.is_floating_point():
            float_keys.append([key, list(v.shape)])
            spread = v.double().std(correction=0).item() if v.numel() > 1 else 0.0
            stats.append([v.double().mean().item(), spread])
        else:
            int_keys.append(key)
            tensors[f"int/{key}"] = v.clone()
    tensors["stats"] = torch.tensor(stats, dtype=torch.float64).reshape(-1, 2)
    names = [n for n, _ in model.named_parameters()]
    numels = [p.numel() for _, p in model.named_parameters()]
    meta = {
        "float_keys": float_keys,
        "int_keys": int_keys,
        "params": names,
        "full_grads": full_grad_names(names, numels),
    }
    model.load_state_dict(weights_from_fixture(tensors, meta), strict=True)
    x = model_input()
    tensors["input"] = x
    results = run(model, x)
    tensors.update(results)
    params = dict(model.named_parameters())
    for n in meta["full_grads"]:
        g = params[n].grad
        tensors[f"full_grad/{n}"] = torch.zeros_like(params[n]) if g is None else g.detach().clone()
    meta["outputs"] = sorted(results)
    return {k: v.contiguous() for k, v in tensors.items()}, meta


def load_fixture(name: str) -> tuple[dict[str, Tensor], dict]:
    from safetensors import safe_open

    path = FIXTURES / f"{name}.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["fixture"])
    return load_file(str(path)), meta


def main(names: list[str]) -> None:
    FIXTURES.mkdir(exist_ok=True)
    for name in names or list_models("*_tiny"):
        tensors, meta = make_fixture(name)
        path = FIXTURES / f"{name}.safetensors"
        save_file(tensors, str(path), metadata={"fixture": json.dumps(meta)})
        print(f"{path}: {path.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main(sys.argv[1:])

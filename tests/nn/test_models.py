"""Every registered model: sizes against the papers, and the tiny ones through eager, compile and export.

Driven by the registry (``list_models()``), not by a hand-kept list.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict

from mtssm.nn import create_model, list_models, model_config, register_model
from mtssm.nn.model import MultiTaskModel
from mtssm.nn.registry import MODEL_CONFIGS
from mtssm.nn.tasks import DATASET_TASKS, dataset_tasks, resolve_tasks, task_channels

REPO = Path(__file__).resolve().parents[2]
TINY = list_models("*_tiny")
TINY_INPUT = (2, 3, 32, 64)

# Parameter counts the papers report (millions), with the encoder.
PAPER_PARAMS_M = {
    "mtmamba_swin_large_nyud": 307.99,  # MTMamba, Table 2 (2 STM + 1 CTM per stage)
    "mtmamba_pp_swin_large_pascal": 343.0,  # MTMamba++, PASCAL-Context (343 MB of parameters)
}


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_parameter_count_matches_paper(name):
    model = create_model(name, device="meta")
    n = _n_params(model) / 1e6
    assert abs(n - PAPER_PARAMS_M[name]) / PAPER_PARAMS_M[name] < 0.02, f"{name}: {n:.2f} M parameters"


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_builds_on_meta(name):
    cfg = model_config(name)
    model = create_model(name, device="meta")
    assert all(p.is_meta for p in model.parameters())
    expected = resolve_tasks(cfg.get("tasks"), cfg.get("dataset", "nyud"))
    assert model.tasks == tuple(expected)
    assert set(model.heads.keys()) == set(expected)


def test_registry_entries_are_only_hyperparameters():
    for name, cfg in MODEL_CONFIGS.items():
        json.dumps(cfg, default=list)  # plain data: no modules, tensors or callables
        assert isinstance(cfg["encoder"], str) and isinstance(cfg["decoder"], str), name
    assert "mtmamba_tiny" in TINY and "mtmamba_pp_tiny" in TINY


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown model 'nope'") as info:
        create_model("nope")
    assert "\n" not in str(info.value)
    with pytest.raises(TypeError, match=r"create_model\('mtmamba_tiny'\).*'bogus_key'"):
        create_model("mtmamba_tiny", bogus_key=1)
    with pytest.raises(ValueError, match="already registered"):
        register_model("mtmamba_tiny", model_config("mtmamba_tiny"))
    with pytest.raises(ValueError, match="unknown decoder 'xyz'"):
        register_model("x_tiny_test", {"encoder": "cnn_tiny", "decoder": "xyz"})
    assert list_models("mtmamba_pp_*") == sorted(n for n in MODEL_CONFIGS if n.startswith("mtmamba_pp_"))


def test_task_table():
    assert [task_channels("semseg", d) for d in ("nyud", "pascal", "cityscapes")] == [40, 21, 19]
    assert {t: task_channels(t) for t in ("depth", "normals", "edge", "human_parts", "sal")} == {
        "depth": 1, "normals": 3, "edge": 1, "human_parts": 7, "sal": 2,
    }
    assert dataset_tasks("nyud") == ("semseg", "depth", "normals", "edge")
    assert set(DATASET_TASKS) == {"nyud", "pascal", "cityscapes"}
    with pytest.raises(ValueError, match=r"unknown task 'segm'; expected one of \['semseg'") as info:
        resolve_tasks(["segm"])
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="unknown dataset 'kitti'"):
        resolve_tasks(None, "kitti")
    with pytest.raises(ValueError, match="repeated"):
        resolve_tasks(["depth", "depth"])


def test_model_checks_its_parts():
    model = create_model("mtmamba_tiny", tasks=["depth", "edge"])
    assert model.tasks == ("depth", "edge")
    with pytest.raises(ValueError, match="heads .* do not match tasks"):
        MultiTaskModel(model.encoder, model.decoder, model.heads, ["depth"])
    other = create_model("mtmamba_tiny", encoder_kwargs={"channels": (8, 16, 32, 64)})
    with pytest.raises(ValueError, match=r"encoder gives channels \[8, 16, 32, 64\] but the decoder expects"):
        MultiTaskModel(other.encoder, model.decoder, model.heads, model.tasks)
    with pytest.raises(ValueError, match=r"images must be \(B, 3, H, W\)"):
        model(torch.randn(1, 4, 32, 32))


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_backward(name):
    torch.manual_seed(0)
    model = create_model(name).train()
    x = torch.randn(*TINY_INPUT)
    out = model(x)
    assert isinstance(out, TensorDict) and out.batch_size == torch.Size([TINY_INPUT[0]])
    cfg = model_config(name)
    for t, c in resolve_tasks(cfg.get("tasks"), cfg.get("dataset", "nyud")).items():
        assert out[t].shape == (TINY_INPUT[0], c, *TINY_INPUT[2:]), t
        assert torch.isfinite(out[t]).all(), t
    sum(v.float().square().mean() for v in out.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{name}: no gradient for {missing[:8]}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"{name}: non-finite gradient for {bad[:8]}"


@pytest.mark.parametrize("name", TINY)
def test_tiny_compiles_in_one_graph_and_matches_eager(name):
    """``torch.compile(fullgraph=True)``: one graph (any graph break raises) and eager's outputs.

    The recording backend counts the graphs dynamo hands over and runs them as captured (the check
    of ``torch._dynamo.explain(...).graph_break_count == 0``, in one trace). AOTAutograd and the
    custom ops' fake kernels are exercised by the export test; Inductor's code generation takes
    minutes per model on these CPUs (benchmarks/decoders.py times it).
    """
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = torch.randn(1, 3, 32, 64)
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            out_c = torch.compile(model, fullgraph=True, backend=recording_backend)(x)
            out_e = model(x)
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 1, f"{name}: {len(graphs)} graphs"
    assert isinstance(out_c, TensorDict) and set(out_c.keys()) == set(model.tasks)
    for t in model.tasks:
        torch.testing.assert_close(out_c[t], out_e[t], atol=1e-5, rtol=1e-4, msg=lambda s, t=t: f"{name}/{t}: {s}")


_LOAD_SCRIPT = textwrap.dedent(
    """
    import sys
    import mtssm  # registers torch.ops.mtssm.* before loading
    import torch

    root = sys.argv[1]
    results = {}
    for name in sys.argv[2:]:
        ep = torch.export.load(f"{root}/{name}.pt2")
        inp = torch.load(f"{root}/{name}.inputs.pt")
        out = ep.module()(inp)
        assert type(out) is dict, (name, type(out))
        results[name] = {k: v.detach() for k, v in out.items()}
    torch.save(results, f"{root}/loaded.pt")
    """
)


def test_tiny_export_save_load_in_fresh_process(tmp_path):
    """``torch.export.export(model, (x,))`` of every tiny model as ``create_model`` gives it (no
    wrapper), ``torch.export.save``, loaded in a new interpreter after ``import mtssm``: same outputs."""
    expected = {}
    for name in TINY:
        torch.manual_seed(0)
        model = create_model(name).eval()
        x = torch.randn(1, 3, 32, 64)
        with torch.no_grad():
            expected[name] = model.forward_dict(x)
        ep = torch.export.export(model, (x,))
        torch.export.save(ep, tmp_path / f"{name}.pt2")
        torch.save(x, tmp_path / f"{name}.inputs.pt")
    # MTSSM_DISABLE_CPP: the new process must not spend a minute building the C++ scan (the PyTorch
    # path gives the same outputs within the tolerance below).
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        MTSSM_DISABLE_CPP="1",
    )
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_SCRIPT, str(tmp_path), *TINY],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = torch.load(tmp_path / "loaded.pt")
    for name in TINY:
        assert set(loaded[name]) == set(expected[name]), name
        for t, ref in expected[name].items():
            torch.testing.assert_close(loaded[name][t], ref, atol=1e-5, rtol=1e-4, msg=lambda s, n=name, t=t: f"{n}/{t}: {s}")

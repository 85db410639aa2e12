"""PAMM: expert routing, load balancing, registered parameters, the PAME block and the decoder."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtssm.nn.experts import LowRankExperts, ParameterExperts, load_balancing_loss, topk_gates
from mtssm.nn.pamm import PAMEBlock, PAMMDecoder, build_pamm

TASKS = ("semseg", "depth")
SMALL = {"d_state": 4, "num_experts": 4, "expert_rank": 2, "top_k": 2, "task_rank": 2}


def _leaf_tensors(out: torch.Tensor) -> list[torch.Tensor]:
    """Every leaf tensor requiring grad that ``out`` was computed from (walks the autograd graph)."""
    seen, leaves, stack = set(), [], [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.append(node.variable)
        stack.extend(n for n, _ in node.next_functions)
    return leaves


# ------------------------------------------------------------------------------------------------
# routing
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 6])
def test_topk_gates_sum_to_one_on_the_top_k(k):
    torch.manual_seed(0)
    logits = torch.randn(5, 6)
    gates = topk_gates(logits, k)
    torch.testing.assert_close(gates.sum(-1), torch.ones(5))
    assert ((gates > 0).sum(-1) == k).all()
    kept = gates > 0
    # every kept logit is >= every dropped one, and kept weights are the softmax over the kept logits
    assert (logits.masked_fill(~kept, float("inf")).amin(-1) >= logits.masked_fill(kept, -float("inf")).amax(-1)).all()
    expect = logits.masked_fill(~kept, -float("inf")).softmax(-1)
    torch.testing.assert_close(gates, expect)


def test_topk_gates_softmax_before_topk():
    torch.manual_seed(0)
    logits = torch.randn(4, 6)
    gates = topk_gates(logits, 2, softmax_before_topk=True)
    probs = logits.softmax(-1)
    kept = gates > 0
    assert (kept.sum(-1) == 2).all()
    torch.testing.assert_close(gates[kept], probs[kept])
    assert (gates.sum(-1) <= 1 + 1e-6).all()
    with pytest.raises(ValueError, match=r"k must be in \[1, 6\]"):
        topk_gates(logits, 7)


def test_load_balancing_loss_minimum_is_uniform_routing():
    torch.manual_seed(0)
    E = 5
    uniform = torch.full((3, 4, E), 1.0 / E)
    assert load_balancing_loss(uniform).item() == pytest.approx(0.0, abs=1e-12)
    # top-2 routing that spreads evenly over the batch also reaches the minimum
    balanced = torch.stack([topk_gates(torch.roll(torch.tensor([5.0, 4, 0, 0, 0]), i), 2) for i in range(E)])
    assert load_balancing_loss(balanced).item() == pytest.approx(0.0, abs=1e-10)
    for _ in range(5):
        g = topk_gates(torch.randn(8, E) * 3, 2)
        assert load_balancing_loss(g).item() >= 0.0
    skewed = topk_gates(torch.tensor([[9.0, 8, 0, 0, 0]]).repeat(6, 1), 2)
    assert load_balancing_loss(skewed).item() > 0.1


def test_low_rank_experts_equal_gated_sum_of_convs():
    torch.manual_seed(0)
    experts = LowRankExperts(6, 3, num_experts=4, rank=2)
    x, gates = torch.randn(2, 6, 5, 4), topk_gates(torch.randn(2, 4), 2)
    expect = sum(
        gates[:, e, None, None, None]
        * F.conv2d(
            F.conv2d(x, experts.down_weight[e, :, :, None, None], experts.down_bias[e]),
            experts.up_weight[e, :, :, None, None],
            experts.up_bias[e],
        )
        for e in range(4)
    )
    torch.testing.assert_close(experts(x, gates), expect, atol=1e-5, rtol=1e-4)


def test_parameter_experts_route_per_task_and_compile_without_graph_breaks():
    torch.manual_seed(0)
    pe = ParameterExperts(8, 4, TASKS, num_experts=4, rank=2, top_k=2, task_rank=2).eval()
    xs = {t: torch.randn(2, 8, 3, 5) for t in TASKS}
    outs, gates = pe(xs)
    assert gates.shape == (2, 2, 4) and outs["depth"].shape == (2, 4, 3, 5)
    torch.testing.assert_close(gates.sum(-1), torch.ones(2, 2))
    assert ((gates > 0).sum(-1) == 2).all()
    explain = torch._dynamo.explain(pe)(xs)
    assert explain.graph_break_count == 0, explain.break_reasons
    with pytest.raises(ValueError, match=r"top_k must be in \[1, num_experts=4\], got 5"):
        ParameterExperts(8, 4, TASKS, num_experts=4, top_k=5)


def test_noisy_gating_only_in_training():
    torch.manual_seed(0)
    pe = ParameterExperts(8, 4, TASKS, num_experts=6, rank=2, top_k=2)
    x = torch.randn(4, 8, 3, 3)
    pe.eval()
    torch.testing.assert_close(pe.route("semseg", x)[0], pe.route("semseg", x)[0])
    pe.train()
    draws = [pe.route("semseg", x)[0] for _ in range(4)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])


# ------------------------------------------------------------------------------------------------
# PAME block and decoder
# ------------------------------------------------------------------------------------------------


def test_every_tensor_the_forward_trains_is_a_registered_parameter():
    torch.manual_seed(0)
    dec, heads = build_pamm([8, 8, 8, 8], {"semseg": 40, "depth": 1}, dim=16, **SMALL)
    model = torch.nn.ModuleDict({"decoder": dec, "heads": heads}).train()
    feats = [torch.randn(2, 8, 4, 6) for _ in range(4)]
    out = dec(feats)
    loss = sum(heads[t](out[t]).square().mean() for t in TASKS) + dec.aux_loss()
    params = {id(p) for p in model.parameters()}
    state = {id(v) for v in model.state_dict(keep_vars=True).values()}
    leaves = _leaf_tensors(loss)
    assert leaves
    unregistered = [tuple(v.shape) for v in leaves if id(v) not in params or id(v) not in state]
    assert not unregistered, f"tensors trained by the forward but not registered: {unregistered}"
    keys = model.state_dict().keys()
    for t in TASKS:  # the per-task SSM parameters the public code keeps in plain dicts
        for name in ("A_log", "D", "prior_B", "prior_C"):
            assert f"decoder.blocks.0.{name}.{t}" in keys
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a finite gradient: {no_grad}"


def test_pame_block_per_task_ssm_parameters_and_priors():
    torch.manual_seed(0)
    block = PAMEBlock(6, 16, TASKS, **SMALL).eval()
    x = torch.randn(2, 6, 4, 5)
    out, gates = block(x)
    assert {t: v.shape for t, v in out.items()} == {t: (2, 16, 4, 5) for t in TASKS}
    assert gates.shape == (2, 2, 2, 4)
    with torch.no_grad():
        block.A_log["depth"].add_(0.5)
        block.prior_C["depth"].add_(0.3)
    out2, _ = block(x)
    torch.testing.assert_close(out2["semseg"], out["semseg"])  # semseg's own A and priors: unchanged
    assert not torch.allclose(out2["depth"], out["depth"])
    plain = PAMEBlock(6, 16, TASKS, use_priors=False, **SMALL)
    assert not any("prior" in k for k in plain.state_dict())


def test_decoder_fuses_levels_of_different_sizes_and_upsamples():
    torch.manual_seed(0)
    dec = PAMMDecoder([8, 12, 16, 20], TASKS, dim=16, upsample=2, **SMALL).eval()
    feats = [torch.randn(1, c, 8 // s, 10 // s) for c, s in zip([8, 12, 16, 20], [1, 2, 4, 8])]
    out = dec(feats)
    assert out.batch_size == torch.Size([1])
    assert {t: v.shape for t, v in out.items()} == {t: (1, 16, 16, 20) for t in TASKS}
    assert torch.isfinite(out["semseg"]).all()
    assert dec.aux_loss().ndim == 0 and dec.aux_loss().item() >= 0.0


def test_errors_are_one_line():
    cases = [
        (lambda: PAMEBlock(4, 8, TASKS, order="zigzag"), "order must be 'hilbert' or 'ss2d'"),
        (lambda: PAMEBlock(4, 8, ()), "tasks must name at least one task"),
        (lambda: PAMMDecoder([8, 8, 8], TASKS), "in_channels must list 4 encoder levels"),
        (lambda: PAMEBlock(4, 8, TASKS, **SMALL)(torch.randn(1, 5, 2, 2)), r"\(B, 4, H, W\)"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg) as info:
            fn()
        assert "\n" not in str(info.value)
    with pytest.raises(RuntimeError, match="needs a forward pass first"):
        PAMMDecoder([8, 8, 8, 8], TASKS, dim=16, **SMALL).aux_loss()

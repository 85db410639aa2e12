"""PAMM: expert routing, load balancing, registered parameters, the PAME block and the decoder."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtssm.nn import create_model, model_config
from mtssm.nn.experts import LowRankExperts, ParameterExperts, load_balancing_loss, topk_gates
from mtssm.nn.pamm import PAMEBlock, PAMMDecoder, build_pamm

TASKS = ("semseg", "depth")
# attention-pooling routers: blocks run at any size (the official Linear(H*W, 1) pooling has its own tests)
SMALL = {"d_state": 4, "num_experts": 4, "expert_rank": 2, "top_k": 2, "task_rank": 2, "router_pool": "attention"}


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


def test_official_gating_on_a_hand_made_logit_vector():
    # PAMM's MoE (MoE_mamba.py:550-556): softmax over all 15 logits, the 6 smallest zeroed, the
    # other 9 kept as they are (not renormalised), on both datasets: the default everywhere.
    logits = torch.tensor([[3.0, -1.0, 0.5, 2.0, -2.0, 1.0, 0.0, -0.5, 1.5, -3.0, 2.5, -1.5, 0.25, -0.25, 0.75]])
    probs = torch.exp(logits) / torch.exp(logits).sum()
    dropped = [1, 4, 7, 9, 11, 13]  # the six smallest: -1, -2, -0.5, -3, -1.5, -0.25
    expect = probs.clone()
    expect[0, dropped] = 0.0
    gates = topk_gates(logits, 9)
    torch.testing.assert_close(gates, expect, rtol=0, atol=1e-7)
    assert gates.sum().item() == pytest.approx(1.0 - probs[0, dropped].sum().item(), abs=1e-6)
    assert gates.sum().item() < 0.99  # no renormalisation
    for model in ("pamm_vit_large_nyud", "pamm_vit_large_pascal"):
        assert model_config(model)["softmax_before_topk"] is True
    pe = ParameterExperts(8, 4, TASKS, num_experts=15, rank=2, top_k=9).eval()
    assert pe.softmax_before_topk and not pe.softplus_noise
    x = torch.randn(2, 8, 3, 3)
    logits_t = pe.routers["semseg"](x)[:, :15]
    torch.testing.assert_close(pe.route("semseg", x)[0], topk_gates(logits_t, 9, softmax_before_topk=True))


def test_official_noise_scale_is_the_router_output_as_it_is():
    torch.manual_seed(0)
    pe = ParameterExperts(8, 4, TASKS, num_experts=6, rank=2, top_k=6).train()
    x = torch.randn(3, 8, 3, 3)
    out = pe.routers["depth"](x)
    logits, scale = out[:, :6], out[:, 6:12]
    torch.manual_seed(1)
    noise = torch.randn_like(logits)
    torch.manual_seed(1)
    gates, _ = pe.route("depth", x)
    torch.testing.assert_close(gates, (logits + noise * scale).softmax(-1))  # k = E: nothing dropped


@pytest.mark.parametrize("k", [1, 3, 6])
def test_renormalized_topk_gates_sum_to_one_on_the_top_k(k):
    torch.manual_seed(0)
    logits = torch.randn(5, 6)
    gates = topk_gates(logits, k, softmax_before_topk=False)
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


@pytest.mark.parametrize("kernel_size", [1, 3, 9])
def test_low_rank_experts_equal_gated_sum_of_convs(kernel_size):
    torch.manual_seed(0)
    experts = LowRankExperts(6, 3, num_experts=4, rank=2, kernel_size=kernel_size)
    assert experts.down_weight.shape == (4, 2, 6, kernel_size, kernel_size)
    with torch.no_grad():
        experts.down_bias.normal_()
        experts.up_bias.normal_()
    x, gates = torch.randn(2, 6, 5, 4), topk_gates(torch.randn(2, 4), 2)
    expect = sum(
        gates[:, e, None, None, None]
        * F.conv2d(
            F.conv2d(x, experts.down_weight[e], experts.down_bias[e], padding=kernel_size // 2),
            experts.up_weight[e, :, :, None, None],
            experts.up_bias[e],
        )
        for e in range(4)
    )
    torch.testing.assert_close(experts(x, gates), expect, atol=1e-5, rtol=1e-4)


def test_expert_kernel_size_is_a_model_argument_with_the_official_9():
    for model in ("pamm_vit_large_nyud", "pamm_vit_large_pascal"):
        assert model_config(model)["expert_kernel_size"] == 9
    model = create_model("pamm_vit_large_nyud", device="meta", echo=None)
    block = model.decoder.blocks[0]
    d, n = block.d_inner, block.d_state
    assert block.B_experts.experts.down_weight.shape == (15, 4, d, 9, 9)
    assert block.C_experts.task_paths["semseg"].down_weight.shape == (1, 4, d, 9, 9)
    assert block.B_experts.shared_path.weight.shape == (n, d, 9, 9)
    one = PAMEBlock(8, 16, TASKS, expert_kernel_size=1, **SMALL)
    assert one.B_experts.shared_path.weight.shape[-2:] == (1, 1)
    assert one.C_experts.experts.down_weight.shape[-2:] == (1, 1)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        PAMEBlock(8, 16, TASKS, expert_kernel_size=4, **SMALL)


def test_parameter_experts_route_per_task_and_compile_without_graph_breaks():
    torch.manual_seed(0)
    pe = ParameterExperts(8, 4, TASKS, num_experts=4, rank=2, top_k=2, task_rank=2).eval()
    xs = {t: torch.randn(2, 8, 3, 5) for t in TASKS}
    outs, gates = pe(xs)
    assert gates.shape == (2, 2, 4) and outs["depth"].shape == (2, 4, 3, 5)
    assert (gates.sum(-1) <= 1 + 1e-6).all()  # official gating: the kept softmax mass, not renormalised
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
    dec, heads = build_pamm([8, 8, 8, 8], {"semseg": 40, "depth": 1}, dim=16, train_scan_constants=True, **SMALL)
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


def test_scan_constants_stay_fixed_as_in_the_official_code_unless_asked_to_train():
    # MoE_mamba.py keeps A_log, D and the priors in plain dicts: never optimised. mtssm keeps them
    # fixed by default, but registered, so checkpoints hold the priors the model was trained with.
    torch.manual_seed(0)
    for train_constants in (False, True):
        block = PAMEBlock(6, 16, TASKS, train_scan_constants=train_constants, **SMALL).train()
        constants = {f"{name}.{t}": getattr(block, name)[t] for name in ("A_log", "D", "prior_B", "prior_C") for t in TASKS}
        assert set(constants) <= set(block.state_dict())
        before = {k: v.detach().clone() for k, v in constants.items()}
        opt = torch.optim.SGD([p for p in block.parameters() if p.requires_grad], lr=0.1)
        out, _ = block(torch.randn(2, 6, 4, 5))
        sum(v.square().mean() for v in out.values()).backward()
        opt.step()
        moved = {k for k, v in constants.items() if not torch.equal(v, before[k])}
        assert moved == (set(constants) if train_constants else set())
        assert all(v.requires_grad is train_constants for v in constants.values())


def test_official_router_pools_with_a_linear_over_the_positions_of_its_grid():
    torch.manual_seed(0)
    block = PAMEBlock(6, 16, TASKS, router_grid=(3, 5), **{**SMALL, "router_pool": "linear"}).eval()
    router = block.B_experts.routers["semseg"]
    assert router.spatial_pool.weight.shape == (1, 15) and not hasattr(router, "spatial_logits")
    x = torch.randn(2, 32, 3, 5)
    pooled = router.spatial_pool.weight[0] @ x.flatten(2).transpose(1, 2) + router.spatial_pool.bias
    feat = router.channel_out(router.act(router.channel_norm(router.channel_proj(x).permute(0, 2, 3, 1)))).mean((1, 2))
    expect = router.head(torch.cat([feat, router.spatial_out(router.act(router.spatial_norm(pooled)))], dim=-1))
    torch.testing.assert_close(router(x), expect)
    out, _ = block(torch.randn(1, 6, 3, 5))
    assert out["depth"].shape == (1, 16, 3, 5)
    with pytest.raises(ValueError, match=r"built for feature maps of 15 positions .* got 4x4") as err:
        block(torch.randn(1, 6, 4, 4))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"needs router_grid=\(H, W\)"):
        PAMEBlock(6, 16, TASKS, **{**SMALL, "router_pool": "linear"})


def test_paper_models_follow_the_official_block():
    for name, grid in (("pamm_vit_large_nyud", (28, 36)), ("pamm_vit_large_pascal", (32, 32))):
        cfg = model_config(name)
        assert cfg["router_grid"] == grid
        assert cfg["encoder_kwargs"]["img_size"] == (grid[0] * 16, grid[1] * 16)
        assert cfg["encoder_kwargs"]["class_token"] is False
    model = create_model("pamm_vit_large_nyud", device="meta", echo=None)
    block = model.decoder.blocks[3]
    assert block.order == "hilbert_cropped" and block.scan_input == "silu" and not hasattr(block, "local_conv")
    assert block.B_experts.routers["depth"].spatial_pool.in_features == 28 * 36
    assert not block.A_log["semseg"].requires_grad and not block.prior_B["edge"].requires_grad
    assert model.encoder.cls_token is None and model.encoder.grid_size == (28, 36)


def test_scan_input_is_silu_of_the_normalised_feature_or_the_papers_dwconv():
    torch.manual_seed(0)
    official = PAMEBlock(6, 16, TASKS, **SMALL).eval()
    paper = PAMEBlock(6, 16, TASKS, scan_input="dwconv", **SMALL).eval()
    assert not hasattr(official, "local_conv") and set(paper.local_conv) == set(TASKS)
    missing, unexpected = paper.load_state_dict(official.state_dict(), strict=False)
    assert missing and all(k.startswith("local_conv.") for k in missing) and not unexpected
    x = torch.randn(1, 6, 4, 5)
    assert not torch.allclose(official(x)[0]["semseg"], paper(x)[0]["semseg"])
    with pytest.raises(ValueError, match="scan_input must be 'silu' or 'dwconv'"):
        PAMEBlock(6, 16, TASKS, scan_input="conv", **SMALL)


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
        (lambda: PAMEBlock(4, 8, TASKS, order="zigzag"), "order must be 'hilbert_cropped', 'hilbert' or 'ss2d'"),
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


def test_a_model_with_official_routers_has_one_input_size_and_predict_pads_to_it():
    from mtssm.engine.predict import predict_tensor

    vit = dict(embed_dim=32, depth=4, num_heads=2, img_size=32, patch_size=16, class_token=False)
    torch.manual_seed(0)
    model = create_model("pamm_tiny", encoder="vit_large", encoder_kwargs=vit, tasks=TASKS, dim=64,
                         router_pool="linear", router_grid=(2, 2), echo=None).eval()
    assert model.fixed_input_size == (32, 32)
    assert create_model("pamm_tiny", echo=None).fixed_input_size is None  # attention routers: any size
    assert create_model("pamm_vit_large_pascal", device="meta", echo=None).fixed_input_size == (512, 512)
    image = torch.randn(3, 20, 27)
    preds = predict_tensor(model, image)
    with torch.no_grad():
        expect = model(F.pad(image[None], (0, 5, 0, 12)))
    for t in TASKS:
        torch.testing.assert_close(preds[t], expect[t][0, :, :20, :27])
    with pytest.raises(ValueError, match=r"a 40x32 image is larger than 32x32, the only input size this model runs at") as err:
        predict_tensor(model, torch.randn(3, 40, 32))
    assert "\n" not in str(err.value)

"""Layers, MTMamba / MTMamba++ blocks, heads and the decoder's contract."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange
from tensordict import TensorDict

from mtssm.nn.heads import ConvHead, ExpandHead
from mtssm.nn.layers import (
    DropPath,
    FinalPatchExpand4x,
    LayerNorm2d,
    PatchExpand,
    drop_path_rates,
    pixel_shuffle_last,
    resize_bilinear,
    upsample_bilinear_phases,
)
from mtssm.nn.mtmamba import CTMBlock, MTMambaDecoder, STMBlock
from mtssm.nn.mtmamba_pp import FCTMBlock, SCTMBlock

TASKS = ("semseg", "depth", "normals")


@pytest.mark.parametrize("scale", [2, 4])
def test_pixel_shuffle_last_matches_einops(scale):
    x = torch.randn(2, 3, 5, scale * scale * 6)
    ref = rearrange(x, "b h w (p1 p2 c) -> b (h p1) (w p2) c", p1=scale, p2=scale)
    torch.testing.assert_close(pixel_shuffle_last(x, scale), ref, rtol=0, atol=0)


def test_patch_expand_shapes_and_parameters():
    pe = PatchExpand(16)
    assert pe(torch.randn(2, 3, 5, 16)).shape == (2, 6, 10, 8)
    assert pe.expand.weight.shape == (32, 16) and pe.expand.bias is None
    fe = FinalPatchExpand4x(8)
    y = fe(torch.randn(2, 3, 5, 8))
    assert y.shape == (2, 12, 20, 8)
    # LayerNorm at init: every output pixel has zero mean and unit variance over channels
    torch.testing.assert_close(y.mean(-1), torch.zeros(2, 12, 20), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="even"):
        PatchExpand(7)


def test_layernorm2d_equals_channels_last_layernorm():
    ln = LayerNorm2d(6)
    with torch.no_grad():
        ln.weight.uniform_()
        ln.bias.uniform_()
    x = torch.randn(2, 6, 4, 5)
    ref = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (6,), ln.weight, ln.bias).permute(0, 3, 1, 2)
    torch.testing.assert_close(ln(x), ref)


def test_drop_path():
    torch.manual_seed(0)
    dp = DropPath(0.5)
    x = torch.ones(400, 3)
    assert torch.equal(dp.eval()(x), x)
    y = dp.train()(x)
    kept = y[:, 0] != 0
    assert torch.all((y[kept] == 2.0)) and torch.all(y[~kept] == 0)  # whole samples, rescaled by 1/keep
    assert 120 < kept.sum() < 280
    with pytest.raises(ValueError, match="drop path probability"):
        DropPath(1.0)
    rates = drop_path_rates(0.2, 9)
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0.2, 0, 9), rtol=0, atol=1e-7)


def _feats(b: int = 2, h: int = 4, w: int = 6, dim: int = 8) -> dict[str, torch.Tensor]:
    return {t: torch.randn(b, h, w, dim) for t in TASKS}


def test_stm_block_is_residual():
    torch.manual_seed(0)
    blk = STMBlock(8, d_state=4)
    x = torch.randn(2, 4, 6, 8)
    assert not torch.allclose(blk(x), x)
    with torch.no_grad():
        blk.op.out_proj.weight.zero_()
    torch.testing.assert_close(blk(x), x)


@pytest.mark.parametrize("block", [CTMBlock, FCTMBlock, SCTMBlock])
def test_cross_task_blocks_exchange_information(block):
    """Each task's output depends on the other tasks' inputs (and is residual in its own)."""
    torch.manual_seed(0)
    blk = block(TASKS, 8, d_state=4).eval()
    x = _feats()
    out = blk(x)
    assert set(out) == set(TASKS) and all(out[t].shape == x[t].shape for t in TASKS)
    x2 = dict(x, depth=x["depth"] + 1.0)
    out2 = blk(x2)
    assert not torch.allclose(out2["semseg"], out["semseg"])
    assert not torch.allclose(out2["normals"], out["normals"])


def test_ctm_gate_blends_shared_and_task_features():
    """g = 1 gives the shared path only, g = 0 the task's own path only (official code's Eq. 24)."""
    torch.manual_seed(1)
    blk = CTMBlock(TASKS, 8, d_state=4).eval()
    x = _feats()
    gate = blk.gate["semseg"]
    with torch.no_grad():  # LN(x_t) == 1 everywhere and a huge gate weight: g == 1 exactly
        blk.norm["semseg"].weight.zero_()
        blk.norm["semseg"].bias.fill_(1.0)
        gate.weight.fill_(100.0)
    shared = blk.op_share(blk.norm_share(torch.cat([x[t] for t in TASKS], -1)))
    expected = x["semseg"] + blk.out_proj["semseg"](shared)
    torch.testing.assert_close(blk(x)["semseg"], expected, atol=1e-5, rtol=1e-5)


def test_sctm_shared_feature_and_parameters():
    blk = SCTMBlock(TASKS, 8, d_state=4)
    conv1, conv3 = blk.conv_share
    assert conv1.weight.shape == (8, 24, 1, 1) and conv3.weight.shape == (8, 8, 3, 3)
    assert set(blk.op) == set(TASKS)
    assert blk.op["depth"].in_proj_cross.weight.shape == (blk.op["depth"].d_inner, 8)


def test_heads():
    x = torch.randn(2, 8, 3, 5)
    assert ExpandHead(8, 40)(x).shape == (2, 40, 12, 20)
    head = ConvHead(8, 3)
    assert head.conv.out_channels == 4 and head(x).shape == (2, 3, 3, 5)


def test_expand_head_equals_expand_then_projection():
    """The head normalises before the shuffle and projects as one matrix product; it must equal
    FinalPatchExpand4x followed by the 1x1 conv, in values and gradients, and be channels-first."""
    torch.manual_seed(0)
    head = ExpandHead(8, 5).double()
    torch.nn.init.normal_(head.expand.norm.weight)
    torch.nn.init.normal_(head.expand.norm.bias)
    x = torch.randn(2, 8, 3, 4, dtype=torch.float64, requires_grad=True)
    out = head(x)
    ref = head.proj(head.expand(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
    torch.testing.assert_close(out, ref)
    assert out.is_contiguous()
    w = torch.randn_like(ref)
    params = [x, *head.parameters()]
    for got, want in zip(torch.autograd.grad((out * w).sum(), params), torch.autograd.grad((ref * w).sum(), params)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("scale", [(2, 2), (4, 4), (3, 5), (1, 4)])
def test_upsample_bilinear_phases_equals_interpolate(scale):
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    ref = torch.nn.functional.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    out = upsample_bilinear_phases(x, scale)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0])


def test_resize_bilinear_compiled_equals_eager():
    x = torch.randn(1, 2, 3, 4)
    eager = resize_bilinear(x, (12, 16))
    torch.testing.assert_close(eager, torch.nn.functional.interpolate(x, size=(12, 16), mode="bilinear"))
    compiled = torch.compile(resize_bilinear, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, (12, 16)), eager)
    torch.testing.assert_close(compiled(x, (5, 7)), resize_bilinear(x, (5, 7)))  # not a multiple
    assert resize_bilinear(x, (3, 4)) is x


def _encoder_maps(b, h, w, channels=(8, 16, 32, 64)):
    return [torch.randn(b, c, -(-h // s), -(-w // s)) for c, s in zip(channels, (4, 8, 16, 32))]


@pytest.mark.parametrize("cross", ["ctm", SCTMBlock, FCTMBlock, None])
@pytest.mark.parametrize("hw", [(32, 64), (20, 36)])  # the second has odd maps: 5x9, 3x5, 2x3, 1x2
def test_decoder_output_contract(cross, hw):
    torch.manual_seed(0)
    dec = MTMambaDecoder((8, 16, 32, 64), TASKS, depths=(1, 1, 1), cross=cross, d_state=4).eval()
    feats = _encoder_maps(2, *hw)
    out = dec(feats)
    assert isinstance(out, TensorDict) and out.batch_size == torch.Size([2])
    assert set(out.keys()) == set(TASKS)
    for t in TASKS:
        assert out[t].shape == (2, 8, *feats[0].shape[-2:])
        assert torch.isfinite(out[t]).all()


def test_decoder_stage_layout_and_drop_path_schedule():
    dec = MTMambaDecoder((8, 16, 32, 64), TASKS, depths=(2, 2, 2), drop_path_rate=0.2, d_state=4)
    assert dec.dims == (32, 16, 8)
    assert [len(s.blocks["depth"]) for s in dec.stages] == [2, 2, 2]
    assert all(isinstance(s.cross, CTMBlock) for s in dec.stages)
    assert dec.stages[0].fuse["semseg"].in_features == 64  # PatchExpand(64) -> 32, + skip 32
    rates = [m.p for m in dec.modules() if isinstance(m, DropPath)]
    per_block = []  # the rate of each block of one task, in depth order
    for s in dec.stages:
        per_block += [b.drop_path.p for b in s.blocks["semseg"]] + [s.cross.drop_path.p]
    torch.testing.assert_close(torch.tensor(per_block), torch.linspace(0.2, 0, 9), rtol=0, atol=1e-7)
    assert max(rates) == pytest.approx(0.2) and min(rates) == 0.0


def test_decoder_rejects_wrong_channels_in_one_line():
    dec = MTMambaDecoder((8, 16, 32, 64), TASKS, depths=(1, 1, 1), d_state=4)
    feats = _encoder_maps(1, 64, 64)
    feats[2] = torch.randn(1, 31, 4, 4)
    with pytest.raises(ValueError, match=r"feature level 2 must be \(B, 32, H, W\)") as info:
        dec(feats)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="expects 4 feature maps"):
        dec(feats[:3])
    with pytest.raises(ValueError, match="unknown cross-task block 'xtm'"):
        MTMambaDecoder((8, 16, 32, 64), TASKS, cross="xtm")


def test_decoder_takes_a_mamba_layer_per_stage():
    """Blocks are built from the decoder's ``ssm_layer`` (one per stage); the decoder's SS2D settings
    fill what the layer does not bind itself."""
    from functools import partial

    from mtssm.nn.ss2d import SS2D

    hilbert = partial(SS2D, order="hilbert", d_conv=5)
    dec = MTMambaDecoder((8, 16, 32, 64), TASKS, depths=(1, 1, 1), d_state=4, ssm_layer=[SS2D, hilbert, SS2D])
    ops = [(s.blocks["depth"][0].op, s.cross.op_share, s.cross.op["depth"]) for s in dec.stages]
    assert [tuple(m.order for m in o) for o in ops] == [("ss2d",) * 3, ("hilbert",) * 3, ("ss2d",) * 3]
    assert [o[0].conv2d.kernel_size for o in ops] == [(3, 3), (5, 5), (3, 3)]
    assert all(m.d_state == 4 for o in ops for m in o)
    out = dec(_encoder_maps(1, 32, 64))
    assert torch.isfinite(out["depth"]).all()
    with pytest.raises(ValueError, match="one per stage"):
        MTMambaDecoder((8, 16, 32, 64), TASKS, ssm_layer=[SS2D, SS2D])

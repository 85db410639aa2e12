"""Tests of mtssm.nn.encoders: the four-level contract, Swin window logic, weight loading, compile."""

from __future__ import annotations

import functools
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from mtssm.nn.encoders import (
    FeatureInfo,
    SwinEncoder,
    ViTEncoder,
    create_encoder,
    encoder_config,
    list_encoders,
)
from mtssm.nn.encoders.swin import shifted_window_mask
from mtssm.nn.encoders.vit import default_out_indices, resample_pos_embed
from mtssm.nn.weights import load_encoder_weights, resize_relative_position_table

# Tiny overrides per family, so every registered encoder runs in milliseconds.
TINY = {
    "swin": dict(embed_dim=24, depths=(1, 2, 1, 1), num_heads=(1, 2, 4, 8), window_size=7),
    "vit": dict(embed_dim=64, depth=4, num_heads=2, img_size=64),
    "cnn": dict(channels=(8, 16, 24, 32)),
}


def tiny(name: str, **kw):
    torch.manual_seed(0)
    return create_encoder(name, **{**TINY[encoder_config(name)["family"]], **kw})


def tiny_swin(**kw) -> SwinEncoder:
    return tiny("swin_tiny", **kw).eval()


def tiny_vit(**kw) -> ViTEncoder:
    return tiny("vit_large", **kw).eval()


def assert_same_outputs(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor, atol: float = 0.0) -> None:
    with torch.no_grad():
        for i, (ya, yb) in enumerate(zip(a(x), b(x), strict=True)):
            torch.testing.assert_close(ya, yb, atol=atol, rtol=0 if atol == 0 else 1e-5, msg=f"level {i}")


# --------------------------------------------------------------------------- registry and contract


def test_registry_names_and_errors():
    names = list_encoders()
    expected = {"swin_tiny", "swin_small", "swin_base", "swin_large", "vit_small", "vit_base", "vit_large", "cnn_tiny"}
    assert expected <= set(names)
    with pytest.raises(ValueError, match=r"unknown encoder 'swin_huge'; valid names: .*swin_large") as err:
        create_encoder("swin_huge")
    assert "\n" not in str(err.value)
    cfg = encoder_config("swin_large")
    cfg["embed_dim"] = 1
    assert encoder_config("swin_large")["embed_dim"] == 192  # a copy, not the registry entry


def test_paper_configs_contract():
    large = create_encoder("swin_large", device="meta")
    assert large.feature_info == [FeatureInfo(192, 4), FeatureInfo(384, 8), FeatureInfo(768, 16), FeatureInfo(1536, 32)]
    assert large.window_size == 12 and large.patch_size == 4
    assert [len(s.blocks) for s in large.stages] == [2, 2, 18, 2]
    assert [s.blocks[0].attn.num_heads for s in large.stages] == [6, 12, 24, 48]
    vit = create_encoder("vit_large", device="meta")
    assert vit.out_indices == (6, 12, 18, 24) and vit.feature_info == [FeatureInfo(1024, 16)] * 4
    assert default_out_indices(12) == (3, 6, 9, 12)


@pytest.mark.parametrize("name", list_encoders())
def test_every_encoder_shapes_strides_and_gradients(name):
    enc = tiny(name, drop_path_rate=0.1).train()
    h, w = 37, 45  # not a multiple of any window, patch or stride
    x = torch.randn(2, 3, h, w)
    outs = enc(x)
    assert len(outs) == len(enc.feature_info) == 4
    for info, y in zip(enc.feature_info, outs, strict=True):
        assert y.shape == (2, info.channels, math.ceil(h / info.stride), math.ceil(w / info.stride))
        assert torch.isfinite(y).all()
    sum(y.square().mean() for y in outs).backward()
    no_grad = [n for n, p in enc.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a finite gradient: {no_grad}"
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, H, W\)"):
        enc(torch.randn(2, 4, h, w))


# --------------------------------------------------------------------------- Swin window logic


def official_shift_mask(hp: int, wp: int, ws: int, s: int) -> torch.Tensor:
    """The official Swin construction: label 3 x 3 slice regions, compare labels per window."""
    img = torch.zeros(1, hp, wp, 1)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
        for wsl in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
            img[:, hs, wsl, :] = cnt
            cnt += 1
    win = img.view(1, hp // ws, ws, wp // ws, ws, 1).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws)
    mask = win[:, None, :] - win[:, :, None]
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


@pytest.mark.parametrize("hp,wp,ws", [(14, 21, 7), (12, 24, 12), (8, 4, 4), (12, 12, 12)])
def test_shift_mask_matches_official_construction(hp, wp, ws):
    torch.testing.assert_close(shifted_window_mask(hp, wp, ws, ws // 2), official_shift_mask(hp, wp, ws, ws // 2))


def naive_block(block, x: torch.Tensor) -> torch.Tensor:
    """The official dense-prediction Swin block, written plainly: pad, roll, explicit softmax."""
    b, h, w, c = x.shape
    ws, s, attn = block.window_size, block.shift, block.attn
    heads, d = attn.num_heads, c // attn.num_heads
    y = block.norm1(x)
    y = F.pad(y, (0, 0, 0, (-w) % ws, 0, (-h) % ws))
    hp, wp = y.shape[1:3]
    if s:
        y = torch.roll(y, (-s, -s), (1, 2))
    win = y.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
    qkv = attn.qkv(win).reshape(win.shape[0], ws * ws, 3, heads, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * d**-0.5, qkv[1], qkv[2]
    logits = q @ k.transpose(-2, -1) + attn.position_bias()[None]
    if s:
        nw = (hp // ws) * (wp // ws)
        logits = logits.view(b, nw, heads, ws * ws, ws * ws) + official_shift_mask(hp, wp, ws, s)[None, :, None]
        logits = logits.view(-1, heads, ws * ws, ws * ws)
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(-1, ws * ws, c)
    out = attn.proj(out).view(b, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
    if s:
        out = torch.roll(out, (s, s), (1, 2))
    x = x + out[:, :h, :w]
    return x + block.mlp(block.norm2(x))


def test_swin_stage_matches_naive_official_blocks():
    enc = tiny_swin(window_size=4)
    blocks = enc.stages[1].blocks  # a regular and a shifted block
    assert [b.shift for b in blocks] == [0, 2]
    x = torch.randn(2, 9, 11, blocks[0].norm1.normalized_shape[0])
    mask = shifted_window_mask(12, 12, 4, 2)
    with torch.no_grad():
        ours, ref = x, x
        for block in blocks:
            ours, ref = block(ours, mask), naive_block(block, ref)
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- checkpoint layouts


def to_official_layout(enc: SwinEncoder) -> dict[str, torch.Tensor]:
    """An official Swin *classification* release layout of ``enc``'s weights."""
    out = {}
    for key, v in enc.state_dict().items():
        if m := re.match(r"stages\.(\d+)\.downsample\.(.+)", key):
            out[f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"] = v
        elif m := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)", key):
            out[f"layers.{m.group(1)}.blocks.{m.group(2)}.{m.group(3)}"] = v
        elif key.startswith("norms.3."):
            out[key.replace("norms.3.", "norm.")] = v
        elif not key.startswith("norms."):
            out[key] = v
    for i, stage in enumerate(enc.stages):
        for j, block in enumerate(stage.blocks):
            out[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = block.attn.relative_position_index
            if j % 2:
                out[f"layers.{i}.blocks.{j}.attn_mask"] = torch.zeros(3, 49, 49)
    out["head.weight"], out["head.bias"] = torch.randn(10, enc.channels[-1]), torch.randn(10)
    return out


def to_timm_layout(enc: SwinEncoder) -> dict[str, torch.Tensor]:
    """Recent timm layout: ``layers.{i}.downsample`` opens stage i, classifier ``head.fc``."""
    out = {}
    for key, v in enc.state_dict().items():
        if key.startswith("stages."):
            out["layers." + key[len("stages.") :]] = v
        elif key.startswith("norms.3."):
            out[key.replace("norms.3.", "norm.")] = v
        elif not key.startswith("norms."):
            out[key] = v
    out["head.fc.weight"], out["head.fc.bias"] = torch.randn(10, enc.channels[-1]), torch.randn(10)
    return out


def copy_first_norms(src: SwinEncoder, dst: SwinEncoder) -> None:
    for i in range(3):
        dst.norms[i].load_state_dict(src.norms[i].state_dict())


X = torch.randn(1, 3, 45, 70)


def test_official_swin_checkpoint_round_trip(tmp_path):
    src = tiny_swin()
    path = tmp_path / "swin_official.pth"
    torch.save({"model": to_official_layout(src)}, path)
    dst = tiny("swin_tiny").eval()
    torch.nn.init.zeros_(dst.norms[3].weight)
    res = load_encoder_weights(dst, path)
    assert res.layout == "swin-official" and res.ok
    assert res.absent == sorted(f"norms.{i}.{p}" for i in range(3) for p in ("weight", "bias"))
    assert "head.weight" in res.ignored and "layers.0.blocks.0.attn.relative_position_index" in res.ignored
    assert not res.resampled
    torch.testing.assert_close(dst.stages[1].downsample.reduction.weight, src.stages[1].downsample.reduction.weight)
    copy_first_norms(src, dst)
    assert_same_outputs(src, dst, X)


def test_dense_official_checkpoint_with_prefix(tmp_path):
    src = tiny_swin()
    state = {k: v for k, v in to_official_layout(src).items() if not k.startswith("norm.")}
    state.update({f"norm{i}.{p}": getattr(src.norms[i], p) for i in range(4) for p in ("weight", "bias")})
    path = tmp_path / "swin_dense.pth"
    torch.save({"state_dict": {"backbone." + k: v for k, v in state.items()}, "meta": {"epoch": 3}}, path)
    dst = tiny("swin_tiny").eval()
    res = load_encoder_weights(dst, path)
    assert res.ok and not res.absent
    assert_same_outputs(src, dst, X)


@pytest.mark.parametrize("flavour", ["safetensors", "features_only_pth"])
def test_timm_swin_checkpoint_round_trip(tmp_path, flavour):
    src = tiny_swin()
    state = to_timm_layout(src)
    if flavour == "safetensors":
        path = tmp_path / "swin_timm.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:  # timm feature wrappers: "layers_N" module names under a "model." prefix, no head
        path = tmp_path / "swin_timm_features.pth"
        state = {"model." + re.sub(r"^layers\.(\d+)\.", r"layers_\1.", k): v for k, v in state.items()}
        torch.save({k: v for k, v in state.items() if ".head." not in k}, path)
    dst = tiny("swin_tiny").eval()
    res = load_encoder_weights(dst, path)
    assert res.layout == "swin-timm" and res.ok
    copy_first_norms(src, dst)
    assert_same_outputs(src, dst, X)


def test_mtssm_layout_round_trip(tmp_path):
    for name in ("swin_tiny", "cnn_tiny"):
        src = tiny(name).eval()
        path = tmp_path / f"{name}.pth"
        torch.save(src.state_dict(), path)
        dst = tiny(name, drop_path_rate=0.0).eval()
        for p in dst.parameters():
            torch.nn.init.zeros_(p)
        res = load_encoder_weights(dst, path)
        assert res.ok and res.layout == "mtssm" and not res.absent
        assert_same_outputs(src, dst, X)


def test_relative_position_tables_interpolated_window7_to_12(tmp_path):
    src = tiny_swin(window_size=7)
    path = tmp_path / "w7.pth"
    torch.save({"model": to_official_layout(src)}, path)
    dst = tiny("swin_tiny", window_size=12).eval()
    res = load_encoder_weights(dst, path)
    tables = sorted(k for k in dst.state_dict() if k.endswith("relative_position_bias_table"))
    assert res.ok and sorted(res.resampled) == tables
    for stage, src_stage in zip(dst.stages, src.stages, strict=True):
        for block, src_block in zip(stage.blocks, src_stage.blocks, strict=True):
            table = block.attn.relative_position_bias_table
            assert table.shape == (23 * 23, block.attn.num_heads)
            # the zero offset sits at the centre of both grids and keeps its bias
            src_table = src_block.attn.relative_position_bias_table
            torch.testing.assert_close(table.view(23, 23, -1)[11, 11], src_table.view(13, 13, -1)[6, 6])
    with torch.no_grad():
        assert all(torch.isfinite(y).all() for y in dst(torch.randn(1, 3, 100, 70)))


def test_resize_relative_position_table_properties():
    const = torch.full((13 * 13, 3), 0.25)
    torch.testing.assert_close(resize_relative_position_table(const, 12), torch.full((23 * 23, 3), 0.25))
    table = torch.randn(13 * 13, 2)
    assert resize_relative_position_table(table, 7) is table
    with pytest.raises(ValueError, match="not a square"):
        resize_relative_position_table(torch.randn(10, 2), 7)


def test_missing_unexpected_and_mismatched_keys_reported_by_name(tmp_path):
    src = tiny_swin()
    state = to_official_layout(src)
    del state["layers.2.blocks.0.mlp.fc1.bias"]
    state["layers.0.blocks.0.attn.extra_scale"] = torch.ones(1)
    path = tmp_path / "broken.pth"
    torch.save({"model": state}, path)
    dst = tiny("swin_tiny").eval()
    with pytest.raises(ValueError) as err:
        load_encoder_weights(dst, path)
    msg = str(err.value)
    assert "\n" not in msg and "stages.2.blocks.0.mlp.fc1.bias" in msg and "layers.0.blocks.0.attn.extra_scale" in msg
    assert "strict=False" in msg
    res = load_encoder_weights(dst, path, strict=False)
    assert res.missing == ["stages.2.blocks.0.mlp.fc1.bias"]
    assert res.unexpected == ["layers.0.blocks.0.attn.extra_scale"]
    torch.testing.assert_close(dst.stages[2].blocks[0].mlp.fc1.weight, src.stages[2].blocks[0].mlp.fc1.weight)

    wide = tiny("swin_tiny", embed_dim=32, num_heads=(1, 2, 4, 8)).eval()
    mismatch = r"shape mismatches \[patch_embed\.proj\.weight: \(24, 3, 4, 4\) vs \(32, 3, 4, 4\)"
    with pytest.raises(ValueError, match=mismatch):
        load_encoder_weights(wide, path)


def test_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_encoder_weights(tiny_swin(), tmp_path / "nope.pth")
    path = tmp_path / "pickled.pth"
    torch.save({"model": {"w": torch.ones(1)}, "config": FeatureInfo(1, 2)}, path)
    with pytest.raises(ValueError, match=r"weights_only=True"):
        load_encoder_weights(tiny_swin(), path)


# --------------------------------------------------------------------------- ViT


def test_vit_features_are_blocks_and_final_norm():
    vit = tiny_vit(depth=8)
    assert vit.out_indices == (2, 4, 6, 8)
    x = torch.randn(1, 3, 40, 50)
    with torch.no_grad():
        outs = vit(x)
        tokens = vit.patch_embed(F.pad(x, (0, 14, 0, 8))).flatten(2).transpose(1, 2)
        tokens = torch.cat([vit.cls_token, tokens], 1)
        tokens = tokens + resample_pos_embed(vit.pos_embed, (3, 4), vit.grid_size)
        expected = []
        for i, block in enumerate(vit.blocks, 1):
            tokens = block(tokens)
            if i in vit.out_indices:
                t = vit.norm(tokens) if i == 8 else tokens
                expected.append(t[:, 1:].transpose(1, 2).reshape(1, 64, 3, 4))
    for y, e in zip(outs, expected, strict=True):
        torch.testing.assert_close(y, e)


def test_timm_vit_checkpoint_round_trip_and_pos_embed_resample(tmp_path):
    src = tiny_vit()
    state = dict(src.state_dict())
    state["head.weight"], state["head.bias"] = torch.randn(5, 64), torch.randn(5)
    path = tmp_path / "vit_timm.safetensors"
    save_file(state, path)
    dst = tiny_vit()
    res = load_encoder_weights(dst, path)
    assert res.layout == "vit-timm" and res.ok and res.ignored == ["head.bias", "head.weight"]
    assert_same_outputs(src, dst, X)

    bigger = tiny_vit(img_size=96)  # grid 6 x 6 instead of 4 x 4
    res = load_encoder_weights(bigger, path)
    assert res.resampled == ["pos_embed"] and bigger.pos_embed.shape == (1, 1 + 36, 64)
    torch.testing.assert_close(bigger.pos_embed[:, 0], src.pos_embed[:, 0])  # class position kept
    # loading resamples exactly as the source does at run time for a 96 x 96 input
    assert_same_outputs(src, bigger, torch.randn(1, 3, 96, 96), atol=1e-6)


def test_timm_features_match(tmp_path):
    """mtssm's Swin and ViT give timm's features with timm's weights (runs where timm imports)."""
    try:
        import timm
    except Exception as err:  # timm imports torchvision, whose PyPI build does not load on CPU torch
        pytest.skip(f"timm does not import here ({type(err).__name__}: {str(err).splitlines()[0][:80]})")

    torch.manual_seed(0)
    ref = timm.create_model(
        "swin_tiny_patch4_window7_224", embed_dim=24, depths=(1, 2, 1, 1), num_heads=(1, 2, 4, 8), num_classes=7
    ).eval()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "swin.safetensors")
    ours = tiny_swin()
    assert load_encoder_weights(ours, tmp_path / "swin.safetensors").ok
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        feats = ours(x)
        levels = ref.forward_intermediates(x, indices=4, norm=False, intermediates_only=True)  # raw, NCHW
        for i in range(3):  # our first three output norms are fresh (unit) LayerNorms
            expected = F.layer_norm(levels[i].permute(0, 2, 3, 1), (ours.channels[i],)).permute(0, 3, 1, 2)
            torch.testing.assert_close(feats[i], expected, atol=1e-4, rtol=1e-4)
        final = ref.forward_features(x).permute(0, 3, 1, 2)  # last stage after timm's final norm
        torch.testing.assert_close(feats[3], final, atol=1e-4, rtol=1e-4)

    ref = timm.create_model(
        "vit_large_patch16_384",
        embed_dim=64,
        depth=4,
        num_heads=2,
        img_size=64,
        num_classes=5,
        dynamic_img_size=True,
        dynamic_img_pad=True,
    ).eval()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "vit.safetensors")
    vit = tiny_vit()
    assert load_encoder_weights(vit, tmp_path / "vit.safetensors").ok
    x = torch.randn(1, 3, 50, 70)  # not a multiple of 16: padded, position embedding resampled
    with torch.no_grad():
        feats = vit(x)
        levels = ref.forward_intermediates(x, indices=4, norm=False, intermediates_only=True)
        for i in range(3):
            torch.testing.assert_close(feats[i], levels[i], atol=1e-4, rtol=1e-4)
        final = ref.forward_features(x)[:, 1:].transpose(1, 2).reshape(feats[3].shape)
        torch.testing.assert_close(feats[3], final, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- compile and export

_SMALL = torch.randn(1, 3, 64, 96)  # 64 x 96: stage maps 16 x 24 .. 2 x 3, padded to the window 7
_BACKENDS = ["aot_eager"] + (["inductor"] if os.environ.get("MTSSM_TEST_INDUCTOR") == "1" else [])
# one registered encoder per family, found through the registry
_FAMILY_REPS = {encoder_config(n)["family"]: n for n in reversed(list_encoders())}


def compile_swin() -> SwinEncoder:
    """The smallest Swin with every code path (padding, a regular and a shifted block, the three
    patch merges, the four output norms): compile cost grows with the number of blocks traced."""
    return tiny_swin(depths=(0, 2, 0, 0))


@pytest.mark.parametrize("family", ["swin", "vit"])
def test_compiles_without_graph_breaks(family):
    torch._dynamo.reset()
    enc = compile_swin() if family == "swin" else tiny(_FAMILY_REPS[family]).eval()
    explanation = torch._dynamo.explain(enc)(_SMALL)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("backend", _BACKENDS)
def test_swin_compiled_matches_eager(backend):
    """Full-graph compile gives the eager features. Inductor runs only with MTSSM_TEST_INDUCTOR=1:
    its C++ code generation takes minutes on 2 CPU cores."""
    torch._dynamo.reset()
    enc = compile_swin()
    compiled = torch.compile(enc, fullgraph=True, backend=backend)
    assert_same_outputs(enc, compiled, _SMALL, atol=1e-5)


@pytest.mark.parametrize("family", ["swin", "vit"])  # cnn_tiny is exported by the model tests
def test_exports(family):
    enc = compile_swin() if family == "swin" else tiny(_FAMILY_REPS[family]).eval()
    program = torch.export.export(enc, (_SMALL,))
    assert_same_outputs(enc, program.module(), _SMALL)


# --------------------------------------------------------------------------- any input size


@functools.cache
def any_size_encoder(family: str):
    return {"swin": lambda: tiny_swin(window_size=3), "vit": tiny_vit, "cnn": lambda: tiny("cnn_tiny").eval()}[family]()


@settings(max_examples=6, deadline=None)
@given(family=st.sampled_from(["cnn", "swin", "vit"]), h=st.integers(1, 48), w=st.integers(1, 48))
def test_any_input_size_gives_ceil_shapes(family, h, w):
    enc = any_size_encoder(family)
    with torch.no_grad():
        outs = enc(torch.randn(1, 3, h, w))
    for info, y in zip(enc.feature_info, outs, strict=True):
        assert y.shape == (1, info.channels, math.ceil(h / info.stride), math.ceil(w / info.stride))
        assert torch.isfinite(y).all()

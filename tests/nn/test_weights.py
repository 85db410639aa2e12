"""Tests of mtssm.nn.weights: every layout loads from a file written in its producer's exact layout.

The files are written here from the published key names and shapes (mmseg's Swin as MTMamba's
``swin2mmseg`` writes it, Google's ``.npz`` ViT as timm / PAMM read it, the official MTMamba /
MTMamba++ DDP checkpoints); where a layout has its own arithmetic (mmseg's ``nn.Unfold`` merge
order, Flax kernels) the test computes the producer's forward independently.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtssm.nn import create_model
from mtssm.nn.encoders import SwinEncoder, ViTEncoder, create_encoder
from mtssm.nn.weights import IMAGENET, INCEPTION, load_encoder_weights, load_model_weights, mmseg_merge_to_official

SWIN = dict(embed_dim=16, depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4), window_size=4)
X = torch.randn(1, 3, 60, 76)


def tiny_swin(seed: int = 0, **kw) -> SwinEncoder:
    torch.manual_seed(seed)
    return create_encoder("swin_tiny", **{**SWIN, **kw}).eval()


def perturb(module: torch.nn.Module) -> torch.nn.Module:
    """Make every norm non-trivial so a swapped weight cannot go unnoticed."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module


def assert_same(a, b, x=X, atol=1e-5):
    with torch.no_grad():
        ya, yb = a(x), b(x)
    if isinstance(ya, (list, tuple)):
        for i, (u, v) in enumerate(zip(ya, yb, strict=True)):
            torch.testing.assert_close(u, v, atol=atol, rtol=1e-4, msg=f"level {i}")
    else:
        for k in ya.keys():
            torch.testing.assert_close(ya[k], yb[k], atol=atol, rtol=1e-4, msg=k)


# --------------------------------------------------------------------------- mmseg Swin


def unfold_order(value: torch.Tensor) -> torch.Tensor:
    """mmseg's ``swin2mmseg`` reordering of a merge weight (official concat order -> nn.Unfold order)."""
    if value.ndim == 1:
        return value.reshape(4, -1)[[0, 2, 1, 3]].t().reshape(-1)
    out = value.shape[0]
    return value.reshape(out, 4, -1)[:, [0, 2, 1, 3]].transpose(1, 2).reshape(out, -1)


def to_mmseg_layout(enc: SwinEncoder, dense: bool) -> dict[str, torch.Tensor]:
    """mmseg's Swin state dict of ``enc``: ``swin2mmseg`` output (``dense=False``: the classifier's
    final ``norm``, cached ``attn_mask``) or a dense mmseg backbone (``norm0..3``)."""
    out = {}
    for key, v in enc.state_dict().items():
        if key.startswith("patch_embed.proj."):
            out[key.replace(".proj.", ".projection.")] = v
        elif key.startswith("patch_embed."):
            out[key] = v
        elif m := re.match(r"stages\.(\d+)\.downsample\.(.+)", key):
            out[f"stages.{int(m.group(1)) - 1}.downsample.{m.group(2)}"] = unfold_order(v)
        elif m := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)", key):
            rest = m.group(3)
            rest = rest.replace("attn.", "attn.w_msa.").replace("mlp.fc1.", "ffn.layers.0.0.").replace("mlp.fc2.", "ffn.layers.1.")
            out[f"stages.{m.group(1)}.blocks.{m.group(2)}.{rest}"] = v
        elif m := re.match(r"norms\.(\d)\.(.+)", key):
            if dense:
                out[f"norm{m.group(1)}.{m.group(2)}"] = v
            elif m.group(1) == "3":
                out[f"norm.{m.group(2)}"] = v
    for i, stage in enumerate(enc.stages):
        for j, block in enumerate(stage.blocks):
            out[f"stages.{i}.blocks.{j}.attn.w_msa.relative_position_index"] = block.attn.relative_position_index
            if j % 2 and not dense:
                out[f"stages.{i}.blocks.{j}.attn_mask"] = torch.zeros(4, 16, 16)
    return out


def test_mmseg_merge_order_matches_unfold_patch_merging():
    """mmseg merges 2x2 cells with nn.Unfold (channel-major); the reordered weights give the same map."""
    enc = perturb(tiny_swin())
    merge = enc.stages[1].downsample
    c = 16
    x = torch.randn(2, 6, 10, c)
    mm_norm_w, mm_norm_b = unfold_order(merge.norm.weight), unfold_order(merge.norm.bias)
    mm_red = unfold_order(merge.reduction.weight)
    with torch.no_grad():
        cols = F.unfold(x.permute(0, 3, 1, 2), kernel_size=2, stride=2).transpose(1, 2)  # (B, L, 4C) as mmseg
        ref = F.linear(F.layer_norm(cols, (4 * c,), mm_norm_w, mm_norm_b), mm_red).view(2, 3, 5, 2 * c)
        torch.testing.assert_close(merge(x), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mmseg_merge_to_official(mm_red), merge.reduction.weight)
    torch.testing.assert_close(mmseg_merge_to_official(mm_norm_w), merge.norm.weight)


@pytest.mark.parametrize("dense", [False, True], ids=["swin2mmseg", "mmseg-backbone"])
def test_mmseg_swin_loads(tmp_path, dense):
    src = perturb(tiny_swin())
    path = tmp_path / "mmseg_swin.pth"
    state = to_mmseg_layout(src, dense)
    torch.save(state if not dense else {"state_dict": {f"backbone.{k}": v for k, v in state.items()}}, path)
    dst = tiny_swin(seed=1)
    res = load_encoder_weights(dst, path)
    assert res.layout == "swin-mmseg" and res.ok, res.summary()
    assert (res.mean, res.std) == IMAGENET
    assert sorted(res.reshaped) == sorted(f"stages.{i}.downsample.{p}" for i in (1, 2, 3) for p in ("norm.weight", "norm.bias", "reduction.weight"))
    if dense:
        assert not res.absent
    else:
        assert res.absent == sorted(f"norms.{i}.{p}" for i in range(3) for p in ("bias", "weight"))
        for i in range(3):
            dst.norms[i].load_state_dict(src.norms[i].state_dict())
    assert_same(src, dst)
    assert "mmseg_swin.pth: swin-mmseg layout" in res.summary() and "\n" not in res.summary()


# --------------------------------------------------------------------------- Google .npz ViT

VIT = dict(embed_dim=32, depth=4, num_heads=2, img_size=48, patch_size=16)


def google_vit_arrays(rng: np.random.Generator, c=32, heads=2, depth=4, p=16, grid=3, prefix="") -> dict[str, np.ndarray]:
    """A Google AugReg ViT .npz in its published names and Flax shapes."""
    hd = c // heads
    r = lambda *s: rng.standard_normal(s).astype(np.float32) * 0.2  # noqa: E731
    a = {
        "embedding/kernel": r(p, p, 3, c), "embedding/bias": r(c), "cls": r(1, 1, c),
        "Transformer/posembed_input/pos_embedding": r(1, 1 + grid * grid, c),
        "Transformer/encoder_norm/scale": 1 + r(c), "Transformer/encoder_norm/bias": r(c),
        "head/kernel": r(c, 10), "head/bias": r(10), "pre_logits/kernel": r(c, c), "pre_logits/bias": r(c),
    }
    for i in range(depth):
        b = f"Transformer/encoderblock_{i}/"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            a[f"{b}{ln}/scale"], a[f"{b}{ln}/bias"] = 1 + r(c), r(c)
        for n in ("query", "key", "value"):
            a[f"{b}MultiHeadDotProductAttention_1/{n}/kernel"] = r(c, heads, hd)
            a[f"{b}MultiHeadDotProductAttention_1/{n}/bias"] = r(heads, hd)
        a[f"{b}MultiHeadDotProductAttention_1/out/kernel"] = r(heads, hd, c)
        a[f"{b}MultiHeadDotProductAttention_1/out/bias"] = r(c)
        a[f"{b}MlpBlock_3/Dense_0/kernel"], a[f"{b}MlpBlock_3/Dense_0/bias"] = r(c, 4 * c), r(4 * c)
        a[f"{b}MlpBlock_3/Dense_1/kernel"], a[f"{b}MlpBlock_3/Dense_1/bias"] = r(4 * c, c), r(c)
    return {prefix + k: v for k, v in a.items()}


def flax_vit_features(a: dict[str, np.ndarray], x: torch.Tensor, out_indices=(1, 2, 3, 4), p=16) -> list[torch.Tensor]:
    """The ViT forward in Flax conventions (kernels as stored), written directly from the arrays."""
    t = {k: torch.from_numpy(v) for k, v in a.items()}
    b, _, h, w = x.shape
    gh, gw = h // p, w // p
    patches = x.permute(0, 2, 3, 1).reshape(b, gh, p, gw, p, 3).permute(0, 1, 3, 2, 4, 5)
    tok = torch.einsum("bhwijc,ijcd->bhwd", patches, t["embedding/kernel"]) + t["embedding/bias"]
    tok = torch.cat([t["cls"].expand(b, -1, -1), tok.reshape(b, gh * gw, -1)], 1)
    tok = tok + t["Transformer/posembed_input/pos_embedding"]
    ln = lambda z, pre: F.layer_norm(z, z.shape[-1:], t[f"{pre}/scale"], t[f"{pre}/bias"], eps=1e-6)  # noqa: E731
    outs = []
    for i in range(max(out_indices)):
        blk = f"Transformer/encoderblock_{i}/"
        att = blk + "MultiHeadDotProductAttention_1/"
        y = ln(tok, blk + "LayerNorm_0")
        q, k, v = (torch.einsum("blc,chd->blhd", y, t[f"{att}{n}/kernel"]) + t[f"{att}{n}/bias"] for n in ("query", "key", "value"))
        attn = torch.einsum("blhd,bmhd->bhlm", q, k).mul(q.shape[-1] ** -0.5).softmax(-1)
        o = torch.einsum("bhlm,bmhd->blhd", attn, v)
        tok = tok + torch.einsum("blhd,hdc->blc", o, t[f"{att}out/kernel"]) + t[f"{att}out/bias"]
        y = ln(tok, blk + "LayerNorm_2")
        hid = F.gelu(y @ t[f"{blk}MlpBlock_3/Dense_0/kernel"] + t[f"{blk}MlpBlock_3/Dense_0/bias"])
        tok = tok + hid @ t[f"{blk}MlpBlock_3/Dense_1/kernel"] + t[f"{blk}MlpBlock_3/Dense_1/bias"]
        if i + 1 in out_indices:
            z = ln(tok, "Transformer/encoder_norm") if i + 1 == max(out_indices) else tok
            outs.append(z[:, 1:].transpose(1, 2).reshape(b, -1, gh, gw))
    return outs


@pytest.mark.parametrize("prefix", ["", "opt/target/"])
def test_google_npz_vit_loads_and_matches_flax_forward(tmp_path, prefix):
    arrays = google_vit_arrays(np.random.default_rng(0), prefix=prefix)
    path = tmp_path / "L_16-i21k-300ep.npz"
    np.savez(path, **arrays)
    torch.manual_seed(0)
    vit = create_encoder("vit_large", **VIT).eval()
    res = load_encoder_weights(vit, path)
    assert res.layout == "vit-google-npz" and res.ok, res.summary()
    assert (res.mean, res.std) == INCEPTION
    assert sorted(res.ignored) == sorted(prefix + k for k in ("head/kernel", "head/bias", "pre_logits/kernel", "pre_logits/bias"))
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        ours = vit(x)
    ref = flax_vit_features({k[len(prefix):]: v for k, v in arrays.items()}, x)
    for i, (u, v) in enumerate(zip(ours, ref, strict=True)):
        torch.testing.assert_close(u, v, atol=1e-4, rtol=1e-4, msg=f"level {i}")


def test_vit_non_square_grid_takes_pamm_position_rows(tmp_path):
    """PAMM trains its ViT on a non-square grid (28 x 36 on NYUDv2) and keeps a class-token row."""
    vit = create_encoder("vit_large", **{**VIT, "img_size": (32, 48)}, class_token=False)
    assert vit.grid_size == (2, 3)
    rows = torch.randn(1, 1 + 6, 32)
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in vit.state_dict().items()}
    state["pos_embed"] = rows
    save_file(state, tmp_path / "vit.safetensors")
    res = load_encoder_weights(vit, tmp_path / "vit.safetensors")
    assert res.ok and res.resampled == ["pos_embed"]
    torch.testing.assert_close(vit.pos_embed, rows[:, 1:])


def test_vit_without_class_token_drops_the_files(tmp_path):
    """PAMM's ViT has no class token: the file's token and its position row are dropped."""
    arrays = google_vit_arrays(np.random.default_rng(1))
    path = tmp_path / "vit.npz"
    np.savez(path, **arrays)
    vit = create_encoder("vit_large", **VIT, class_token=False).eval()
    res = load_encoder_weights(vit, path)
    assert res.ok and "cls" in res.ignored and res.resampled == ["pos_embed"]
    pos = torch.from_numpy(arrays["Transformer/posembed_input/pos_embedding"])
    torch.testing.assert_close(vit.pos_embed, pos[:, 1:])


# --------------------------------------------------------------------------- official MTMamba / MTMamba++


def tiny_model(name: str, seed: int):
    torch.manual_seed(seed)
    model = create_model(
        name, encoder="swin_tiny", encoder_kwargs=SWIN, d_state=4, depths=(2, 2, 2),
        **({"head_hidden": 8} if "pp" in name else {}),
    )
    return perturb(model).eval()


def to_official_mtmamba(model, plus: bool) -> dict[str, torch.Tensor]:
    """The official MTMamba / MTMamba++ DDP state dict of ``model`` (key names of the official code)."""
    out = {f"backbone.{k}": v for k, v in to_mmseg_layout(model.encoder, dense=True).items()}
    for key, v in model.state_dict().items():
        if key.startswith("encoder."):
            continue
        if key.endswith("dt_projs_bias"):
            v = v.view(4, -1)
        if m := re.match(r"decoder\.stages\.(\d)\.expand\.(\w+)\.(.+)", key):
            out[f"expand_layers.{m.group(2)}_{m.group(1)}.{m.group(3)}"] = v
        elif m := re.match(r"decoder\.stages\.(\d)\.fuse\.(\w+)\.(weight|bias)", key):
            out[f"concat_layers.{m.group(2)}_{m.group(1)}.{m.group(3)}"] = v[..., None, None] if plus and v.ndim == 2 else v
        elif m := re.match(r"decoder\.stages\.(\d)\.blocks\.(\w+)\.(\d)\.(.+)", key):
            s, t, j, rest = m.groups()
            out[f"block_stm.{t}_{s}.{j}.{rest}" if plus else f"block_{int(j) + 1}.{t}_{s}.{rest}"] = v
        elif m := re.match(r"decoder\.stages\.(\d)\.cross\.(.+)", key):
            s, rest = m.groups()
            out[f"block_ctm.{s}.0.{rest}" if plus else f"block_3.{s}.{rest.replace('gate.', 'in_proj.', 1) if rest.startswith('gate.') else rest}"] = v
        elif m := re.match(r"heads\.(\w+)\.(conv|norm)\.(.+)", key):
            out[f"final_expand.{m.group(1)}.{0 if m.group(2) == 'conv' else 1}.{m.group(3)}"] = v
        elif m := re.match(r"heads\.(\w+)\.expand\.(.+)", key):
            out[f"final_expand.{m.group(1)}.{m.group(2)}"] = v
        elif m := re.match(r"heads\.(\w+)\.proj\.(.+)", key):
            out[f"final_project.{m.group(1)}.{m.group(2)}"] = v
        else:
            raise AssertionError(f"no official name for {key}")
    return {f"module.{k}": v for k, v in out.items()}


@pytest.mark.parametrize("name", ["mtmamba_swin_large_nyud", "mtmamba_pp_swin_large_nyud"])
def test_official_mtmamba_checkpoint_layout_loads(tmp_path, name):
    plus = "pp" in name
    src = tiny_model(name, seed=0)
    path = tmp_path / ("mtmamba_plus_nyud.pth.tar" if plus else "mtmamba_nyud.pth.tar")
    state = to_official_mtmamba(src, plus)
    assert state["module.block_ctm.0.0.op.semseg.dt_projs_bias" if plus else "module.block_3.0.op_share.dt_projs_bias"].shape[0] == 4
    torch.save({"model": state}, path)
    dst = tiny_model(name, seed=1)
    res = load_model_weights(dst, path)
    assert res.layout == ("mtmamba_plus-official" if plus else "mtmamba-official") and res.ok, res.summary()
    assert (res.mean, res.std) == IMAGENET and not res.absent
    assert any(k.endswith("dt_projs_bias") for k in res.reshaped)
    assert any(".fuse." in k for k in res.reshaped) == plus
    assert_same(src, dst, torch.randn(1, 3, 64, 64))


def test_official_checkpoint_task_order_and_model_kind_checked(tmp_path):
    src = tiny_model("mtmamba_swin_large_nyud", seed=0)
    path = tmp_path / "mtmamba_nyud.pth.tar"
    torch.save({"model": to_official_mtmamba(src, plus=False)}, path)
    swapped = create_model("mtmamba_swin_large_nyud", encoder="swin_tiny", encoder_kwargs=SWIN, d_state=4,
                           tasks=("depth", "semseg", "normals", "edge"))
    with pytest.raises(ValueError, match=r"orders its tasks \['semseg', 'depth', 'normals', 'edge'\]") as err:
        load_model_weights(swapped, path)
    assert "\n" not in str(err.value)
    plus = create_model("mtmamba_pp_swin_large_nyud", encoder="swin_tiny", encoder_kwargs=SWIN, d_state=4)
    with pytest.raises(ValueError, match=r"official MTMamba \(CTM blocks, expand heads\) checkpoint, but the model"):
        load_model_weights(plus, path)


def test_mtssm_model_file_loads(tmp_path):
    from safetensors.torch import save_file

    src = tiny_model("mtmamba_swin_large_nyud", seed=0)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, path)
    dst = tiny_model("mtmamba_swin_large_nyud", seed=1)
    res = load_model_weights(dst, tmp_path)  # a checkpoint folder holding model.safetensors
    assert res.layout == "mtssm" and res.ok and res.mean is None
    assert_same(src, dst, torch.randn(1, 3, 64, 64))
    enc = tiny_swin(seed=2)
    res = load_encoder_weights(enc, path)  # the encoder part of a whole-model file
    assert res.ok and res.layout == "mtssm" and any(k.startswith("decoder.") for k in res.ignored)
    assert_same(src.encoder, enc)


# --------------------------------------------------------------------------- one-line errors


def test_unknown_truncated_and_non_weights_files_get_one_line(tmp_path):
    enc = tiny_swin()
    cases = {}
    p = tmp_path / "vit_as_swin.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in create_encoder("vit_large", **VIT).state_dict().items()}, p)
    cases[p] = r"unknown weights layout for SwinEncoder \(tried swin-official, swin-timm, swin-mmseg, mtssm\)"
    p = tmp_path / "other.pth"
    torch.save({"model": {"conv1.weight": torch.ones(2)}}, p)
    cases[p] = r"unknown weights layout for SwinEncoder"
    good = tmp_path / "good.pth"
    torch.save({"model": to_mmseg_layout(enc, dense=True)}, good)
    data = good.read_bytes()
    p = tmp_path / "truncated.pth"
    p.write_bytes(data[: len(data) // 2])
    cases[p] = r"truncated or corrupt"
    p = tmp_path / "truncated.safetensors"
    save_file({"a": torch.ones(1000)}, tmp_path / "full.safetensors")
    p.write_bytes((tmp_path / "full.safetensors").read_bytes()[:500])
    cases[p] = r"truncated or corrupt safetensors"
    p = tmp_path / "notes.pth"
    p.write_text("these are not weights\n")
    cases[p] = r"not a weights file; expected a PyTorch"
    p = tmp_path / "empty.pth"
    p.write_bytes(b"")
    cases[p] = r"the file is empty"
    for path, pattern in cases.items():
        with pytest.raises(ValueError, match=pattern) as err:
            load_encoder_weights(enc, path)
        assert "\n" not in str(err.value) and str(path) in str(err.value)
    with pytest.raises(ValueError, match=r"unknown weights layout for MultiTaskModel \(tried mtssm, mtmamba-official"):
        load_model_weights(tiny_model("mtmamba_swin_large_nyud", 0), good)


# --------------------------------------------------------------------------- official PAMM

_PAMM_BLOCK_NAMES = {
    "task_conv": "task_conv", "task_norm": "task_input_norm0", "gate_proj": "proj_z0", "in_proj": "dim_expand_proj_x0",
    "x2dt": "x2dt_proj0", "dt_proj": "dt_proj0", "out_proj": "dim_decrease_proj0",
}
_PAMM_ROUTER_NAMES = {
    "channel_proj": "0.conv1", "channel_norm": "0.ln", "channel_out": "0.conv3", "spatial_norm": "0.ln_sp",
    "spatial_out": "0.conv2", "spatial_pool": "0.convsp", "head": "1",
}


def to_official_pamm(model) -> dict:
    """PAMM's checkpoint of ``model`` as ``main.py`` saves it (names of models/transformers/PAME.py,
    MoE_mamba.py and PAME_wrapper.py)."""
    out = {}
    conv = lambda w: w[..., None, None] if w.ndim == 2 else w  # noqa: E731  (1x1 convs where mtssm has Linears)
    for key, v in model.state_dict().items():
        if key == "encoder.pos_embed":  # PAME keeps a class-token row it never uses
            out["backbone.pos_embed"] = torch.cat([torch.randn(1, 1, v.shape[-1]), v], 1)
        elif key.startswith("encoder."):
            out["backbone." + key[len("encoder."):]] = v
        elif m := re.match(r"decoder\.fusion\.(\w+)\.(.+)", key):
            out[f"backbone.task_mask.{m.group(1)}.{m.group(2)}"] = v
        elif m := re.match(r"heads\.(\w+)\.(conv|norm|proj)\.(.+)", key):
            part = {"conv": "mt_proj.0", "norm": "mt_proj.1", "proj": "linear_pred"}[m.group(2)]
            out[f"heads.{m.group(1)}.{part}.{m.group(3)}"] = v
        elif m := re.match(r"decoder\.blocks\.(\d)\.(.+)", key):
            s, rest = m.groups()
            pre = f"backbone.stage_MTLoRA_mamba.{s}."
            if mr := re.match(r"input_(proj|norm)\.(.+)", rest):
                out[pre + ("first_decode" if mr.group(1) == "proj" else "input_norm") + "." + mr.group(2)] = v
            elif (mr := re.match(r"(\w+)\.(\w+)\.(weight|bias)$", rest)) and mr.group(1) in _PAMM_BLOCK_NAMES:
                out[f"{pre}{_PAMM_BLOCK_NAMES[mr.group(1)]}.{mr.group(2)}.{mr.group(3)}"] = v
                if mr.group(1) == "task_conv":  # the official block runs a MoE conv here and drops its output
                    out[f"{pre}conv2d0.proj_task.{mr.group(2)}.W.{mr.group(3)}"] = torch.randn(2)
            elif mr := re.match(r"([BC])_experts\.(.+)", rest):
                moe, sub = f"{pre}{mr.group(1)}_proj0.", mr.group(2)
                if me := re.match(r"(experts|task_paths\.(\w+))\.(down|up)_(weight|bias)", sub):
                    names = [f"MoE.{e}" for e in range(v.shape[0])] if me.group(1) == "experts" else [f"proj_task.{me.group(2)}"]
                    for e, name in enumerate(names):
                        w = v[e]
                        if me.group(4) == "weight" and w.ndim == 2:  # LoraConv's W and M are convs
                            w = w[..., None, None]
                        out[f"{moe}{name}.{'W' if me.group(3) == 'down' else 'M'}.{me.group(4)}"] = w
                elif me := re.match(r"shared_path\.(.+)", sub):
                    out[f"{moe}proj_gerneral.{me.group(1)}"] = v
                elif me := re.match(r"(mix|out)_norms\.(\w+)\.(.+)", sub):
                    out[f"{moe}{'Bn_all' if me.group(1) == 'mix' else 'Bn'}.{me.group(2)}.{me.group(3)}"] = v
                elif me := re.match(r"routers\.(\w+)\.(\w+)\.(weight|bias)", sub):
                    w = conv(v) if me.group(3) == "weight" and me.group(2) in ("channel_out", "spatial_out", "head") else v
                    out[f"{moe}router.{me.group(1)}.{_PAMM_ROUTER_NAMES[me.group(2)]}.{me.group(3)}"] = w
    return {f"module.{k}": v for k, v in out.items()}


def test_official_pamm_checkpoint_layout(tmp_path):
    """Every tensor of PAMM's checkpoint lands where mtssm keeps it; A_log / D (never saved) get the
    official constants, the priors (never saved) are named absent, the discarded conv ignored."""
    vit = dict(embed_dim=32, depth=4, num_heads=2, img_size=32, patch_size=16, class_token=False)
    pamm = dict(tasks=("semseg", "depth"), dim=64, expert_rank=4, task_rank=4, router_pool="linear", router_grid=(2, 2))
    torch.manual_seed(0)
    src = perturb(create_model("pamm_tiny", encoder="vit_large", encoder_kwargs=vit, **pamm)).eval()
    path = tmp_path / "PAMM_nyud.pth"
    torch.save({"model": to_official_pamm(src), "optimizer": {"state": {}, "param_groups": []},
                "epoch": 3, "iter_count": 7}, path)
    dst = create_model("pamm_tiny", encoder="vit_large", encoder_kwargs=vit, **pamm).eval()
    res = load_model_weights(dst, path)
    assert res.layout == "pamm-official" and (res.mean, res.std) == IMAGENET
    assert not res.unexpected and not res.missing and not res.mismatched
    assert sorted(res.defaults) == sorted(f"decoder.blocks.{s}.{p}.{t}" for s in range(4) for p in ("A_log", "D") for t in ("semseg", "depth"))
    assert sorted(res.absent) == sorted(f"decoder.blocks.{s}.prior_{bc}.{t}" for s in range(4) for bc in "BC" for t in ("semseg", "depth"))
    assert any(".conv2d0." in k for k in res.ignored) and "encoder.pos_embed" in res.resampled
    router = dst.decoder.blocks[1].C_experts.routers["depth"].spatial_pool.weight
    torch.testing.assert_close(router, src.decoder.blocks[1].C_experts.routers["depth"].spatial_pool.weight)
    # a model whose routers pool by attention has no place for the official Linear(H*W, 1)
    other = create_model("pamm_tiny", encoder="vit_large", encoder_kwargs=vit, **{**pamm, "router_pool": "attention"})
    with pytest.raises(ValueError, match=r"pamm-official layout\): 32 missing keys \[decoder\.blocks\.0\.B_experts\.routers\.semseg\.spatial_logits") as err:
        load_model_weights(other, path)
    assert "\n" not in str(err.value)
    torch.testing.assert_close(dst.decoder.blocks[2].A_log["depth"][5], torch.log(torch.arange(1.0, 5.0)))
    skip = set(res.missing) | set(res.absent) | set(res.defaults)
    src_state = src.state_dict()
    for key, value in dst.state_dict().items():
        if key not in skip:
            torch.testing.assert_close(value, src_state[key], msg=key)

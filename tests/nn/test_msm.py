"""MSM: Multi-Scale Scan equivalences, the padding policy, MTMamba's blocks and decoder with it, the paper's size."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from functools import partial

from mtssm.nn import create_model
from mtssm.nn.msm import MSM_SCALE_PRESETS, MSScan, build_msm, msm_cross_block, msm_stage_scales
from mtssm.nn.mtmamba import CTMBlock, STMBlock, build_mtmamba
from mtssm.nn.ss2d import SS2D


def _ms_ss2d(scales=(1, 4)):
    """SS2D with MS-Scan at ``scales`` (MSM's extractor)."""
    return partial(SS2D, scan_layer=partial(MSScan, scales=scales))


def _stage_scales(dec) -> list[tuple[int, ...]]:
    return [s.blocks[dec.tasks[0]][0].op.ms_scan.scales for s in dec.stages]

SCAN_KEYS = ("x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds")
TOL = {"atol": 1e-5, "rtol": 1e-4}


def _ss2d_to_msss2d(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Rename a plain SS2D's state dict (under ``prefix``) to the keys of an SS2D with MS-Scan at scales=(1,)."""
    out = {}
    for k, v in state.items():
        name = k[len(prefix):] if k.startswith(prefix) else None
        if name in SCAN_KEYS:
            k = f"{prefix}ms_scan.branches.0.{name}"
        out[k] = v
    return out


@pytest.mark.parametrize("gated", [True, False])
def test_single_scale_ms_scan_is_the_plain_scan(gated):
    torch.manual_seed(0)
    ref = SS2D(8, d_state=4, gated=gated)
    ms = _ms_ss2d((1,))(8, d_state=4, gated=gated)
    ms.load_state_dict(_ss2d_to_msss2d(ref.state_dict()))
    x = torch.randn(2, 5, 6, 8, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y_ref, y = ref(x), ms(x2)
    torch.testing.assert_close(y, y_ref, **TOL)
    g = torch.randn_like(y)
    y_ref.backward(g)
    y.backward(g)
    torch.testing.assert_close(x2.grad, x.grad, **TOL)
    grads = dict(ms.named_parameters())
    for k, p in ref.named_parameters():
        mk = f"ms_scan.branches.0.{k}" if k in SCAN_KEYS else k
        torch.testing.assert_close(grads[mk].grad, p.grad, **TOL, msg=lambda m, k=k: f"grad of {k}: {m}")


def test_single_scale_blocks_are_mtmamba_blocks():
    torch.manual_seed(0)
    tasks = ("semseg", "depth")
    stm, ts = STMBlock(8, d_state=4), STMBlock(8, ssm_layer=_ms_ss2d((1,)), d_state=4)
    ts.load_state_dict(_ss2d_to_msss2d(stm.state_dict(), "op."))
    ctm, ct = CTMBlock(tasks, 8, d_state=4), msm_cross_block(tasks, 8, ssm_layer=partial(_ms_ss2d((1,)), d_state=4))
    assert ct.op["depth"].scan_core is None  # the per-task extractors keep the plain scan
    ct.load_state_dict(_ss2d_to_msss2d(ctm.state_dict(), "op_share."))
    x = {t: torch.randn(2, 4, 5, 8) for t in tasks}
    torch.testing.assert_close(ts(x["semseg"]), stm(x["semseg"]), **TOL)
    out, ref = ct(x), ctm(x)
    for t in tasks:
        torch.testing.assert_close(out[t], ref[t], **TOL)


@pytest.mark.parametrize("hw", [(8, 8), (5, 7), (3, 2)])
def test_msscan_matches_explicit_split_window_and_zero_padding(hw):
    """Branch i = core_i on the zero-padded (bottom/right) s x s windows of channel group i, cropped."""
    torch.manual_seed(0)
    H, W = hw
    scales = (1, 2, 4)
    scan = MSScan(12, scales, d_state=4, dt_rank=2)
    u = torch.randn(2, 12, H, W)
    y = scan(u)
    assert y.shape == u.shape
    for i, (s, core) in enumerate(zip(scales, scan.branches)):
        part = u[:, 4 * i : 4 * (i + 1)]
        ph, pw = -H % s, -W % s
        tokens = rearrange(F.pad(part, (0, pw, 0, ph)), "b c (h i) (w j) -> b (c i j) h w", i=s, j=s)
        expect = rearrange(core(tokens), "b (c i j) h w -> b c (h i) (w j)", i=s, j=s)[..., :H, :W]
        torch.testing.assert_close(y[:, 4 * i : 4 * (i + 1)], expect, **TOL)


def test_msscan_window_branch_sees_across_window():
    """A coarse-scale branch mixes a whole window: changing one pixel changes its window-mates."""
    torch.manual_seed(0)
    scan = MSScan(4, (4,), d_state=4, dt_rank=1)
    u = torch.randn(1, 4, 4, 4)
    u2 = u.clone()
    u2[..., 3, 3] += 1.0
    diff = (scan(u2) - scan(u)).abs().sum(1)[0]
    assert diff[0, 0] > 0  # same (single) token: the top-left pixel changes too


def test_scale_options_run_with_gradients():
    torch.manual_seed(0)
    dec, _ = build_msm(
        [12, 24, 48, 96], {"semseg": 40, "depth": 1}, scales="1-2/1-2-4/1-2-4-6", depths=(1, 1, 1), d_state=4
    )
    assert _stage_scales(dec) == [(1, 2), (1, 2, 4), (1, 2, 4, 6)]
    assert [s.cross.op_share.ms_scan.scales for s in dec.stages] == [(1, 2), (1, 2, 4), (1, 2, 4, 6)]
    feats = [torch.randn(1, c, 16 // s, 24 // s) for c, s in zip([12, 24, 48, 96], [1, 2, 4, 8])]
    out = dec(feats)
    assert out.batch_size == torch.Size([1])
    assert out["depth"].shape == (1, 12, 16, 24)
    assert torch.isfinite(out["semseg"]).all()


def test_decoder_and_heads_shapes_grads_no_nan():
    torch.manual_seed(0)
    tasks = {"semseg": 40, "depth": 1, "normals": 3}
    dec, heads = build_msm([8, 16, 32, 64], tasks, depths=(1, 1, 1), d_state=4)
    assert _stage_scales(dec) == list(MSM_SCALE_PRESETS["1-4"])
    # 40 x 56 input: strides 4..32 give 10x14, 5x7, 3x4, 2x2 (rounded up): non-divisible by 4 everywhere.
    feats = [torch.randn(2, c, -(-40 // s), -(-56 // s)) for c, s in zip([8, 16, 32, 64], [4, 8, 16, 32])]
    out = dec(feats)
    preds = {t: heads[t](out[t]) for t in tasks}
    assert {t: p.shape for t, p in preds.items()} == {t: (2, c, 40, 56) for t, c in tasks.items()}
    loss = sum(p.square().mean() for p in preds.values())
    loss.backward()
    params = list(dec.named_parameters()) + list(heads.named_parameters())
    missing = [n for n, p in params if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing}"
    # every scan branch reaches the loss (A_logs may not: a 1-token branch never uses its state decay)
    assert all(p.grad.abs().sum() > 0 for n, p in params if n.endswith("x_proj_weight")), "a branch is unused"


def test_errors_are_one_line():
    cases = [
        (lambda: MSScan(10, (1, 2, 4)), "divisible by the number of scales 3"),
        (lambda: MSScan(8, ()), "non-empty"),
        (lambda: MSScan(8, (1, 0)), "positive ints"),
        (lambda: build_msm([8, 16, 32, 64], {"semseg": 40}, scales="bogus"), "unknown scales preset 'bogus'"),
        (lambda: msm_stage_scales(((1,), (1,))), "one scale set per stage"),
        (lambda: MSScan(8, (1, 2), order=torch.zeros(4, 16, dtype=torch.long)), "scan order name"),
        (lambda: MSScan(4, (1,))(torch.randn(1, 3, 4, 4)), r"MSScan expects u of shape \(B, 4, H, W\)"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg) as info:
            fn()
        assert "\n" not in str(info.value)
    dec, _ = build_msm([8, 16, 32, 64], {"semseg": 40}, depths=(1, 1, 1), d_state=4)
    with pytest.raises(ValueError, match="feature level 2 must be") as info:
        dec([torch.randn(1, c if i != 2 else 7, 4, 4) for i, c in enumerate([8, 16, 32, 64])])
    assert "\n" not in str(info.value)


def test_parameter_count_matches_paper():
    """MSM, Swin-L, NYUDv2: 396.54 M parameters (the paper's Table 6)."""
    model = create_model("msm_swin_large_nyud", device="meta")
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - 396.54) / 396.54 < 0.02, f"{n:.2f} M"


def test_single_scale_msm_decoder_is_mtmamba():
    """MSM at scales {1} everywhere computes MTMamba's decoder (the same weights, renamed)."""
    torch.manual_seed(0)
    tasks = {"semseg": 40, "depth": 1}
    ref, ref_heads = build_mtmamba([8, 16, 32, 64], tasks, depths=(1, 1, 1), d_state=4)
    dec, heads = build_msm([8, 16, 32, 64], tasks, scales="1", depths=(1, 1, 1), d_state=4)
    state = {}
    for k, v in ref.state_dict().items():
        head, _, name = k.rpartition(".")
        plain = ".cross.op." in k  # CT-MSM's per-task extractors keep the plain scan
        state[f"{head}.ms_scan.branches.0.{name}" if name in SCAN_KEYS and not plain else k] = v
    dec.load_state_dict(state, strict=True)
    heads.load_state_dict(ref_heads.state_dict())
    feats = [torch.randn(1, c, -(-20 // s), -(-36 // s)) for c, s in zip([8, 16, 32, 64], [4, 8, 16, 32])]
    out, expect = dec.eval()(feats), ref.eval()(feats)
    for t in tasks:
        torch.testing.assert_close(out[t], expect[t], **TOL)


def test_ms_scan_directions_follow_the_order():
    """The branches' number of directions is the order's (4 for ss2d, 1 for a single raster)."""
    assert [b.K for b in MSScan(8, (1, 2), order="ss2d").branches] == [4, 4]
    scan = MSScan(8, (1, 2), order="row")
    assert [b.K for b in scan.branches] == [1, 1]
    assert scan.branches[1].x_proj_weight.shape[0] == 1
    assert scan(torch.randn(1, 8, 4, 6)).shape == (1, 8, 4, 6)

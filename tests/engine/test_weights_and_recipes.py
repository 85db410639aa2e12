"""Weights as part of the model: recipe keys, create_model(weights=, encoder_weights=), the paper
recipes' pretrained-encoder rule, the input normalisation through checkpoints into eval/predict/
export, optimizer groups, the load-balancing loss in training, the loss schemes, SyncBatchNorm."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from mtssm.engine.checkpoint import save_checkpoint
from mtssm.engine.config import ConfigError, check_encoder_weights, config_from_dict, config_to_dict, load_recipe_file
from mtssm.nn import create_model
from mtssm.nn.pretrained import PAPER_WEIGHTS
from mtssm.recipes import find_recipe, list_recipes

STATS = ((0.5, 0.25, 0.125), (0.5, 0.75, 0.25))  # distinct from ImageNet's, per channel


def _cli(*args: str):
    from mtssm.cli import main

    return CliRunner().invoke(main, list(args))


def _tiny_cfg(**model):
    return config_from_dict({"name": "tiny", "model": {"name": "mtmamba_tiny", **model},
                             "data": {"render_size": [32, 32], "crop_size": [32, 32]}})


def _checkpoint(tmp_path: Path, name: str = "mtmamba_tiny", stats=STATS) -> tuple[Path, nn.Module]:
    cfg = config_from_dict({"name": "tiny", "model": {"name": name},
                            "data": {"render_size": [32, 32], "crop_size": [32, 32]}})
    torch.manual_seed(0)
    model = create_model(name, echo=None)
    model.set_input_normalization(*stats)
    return save_checkpoint(tmp_path / f"ckpt_{name}", 3, model, {}, config_to_dict(cfg)), model


# ------------------------------------------------------------------------------------------------
# recipe keys
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"model": {"weights": ""}}, "model.weights"),
        ({"model": {"encoder_weights": " "}}, "model.encoder_weights"),
        ({"model": {"encoder_weights": 3}}, "model.encoder_weights"),
        ({"loss": {"scheme": "mean"}}, "loss.scheme"),
        ({"loss": {"load_balancing": -1}}, "loss.load_balancing"),
        ({"optim": {"no_decay_flagged": "yes"}}, "optim.no_decay_flagged"),
        ({"train": {"sync_bn": 1}}, "train.sync_bn"),
    ],
)
def test_new_recipe_keys_fail_with_one_line(data, fragment):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_weights_keys_from_overrides():
    cfg = load_recipe_file(find_recipe("nyud_mtmamba"), ["model.encoder_weights=none", "model.weights=a/b.pth.tar"])
    assert (cfg.model.encoder_weights, cfg.model.weights) == ("none", "a/b.pth.tar")


def test_paper_recipe_without_encoder_weights_stops_with_one_line(tmp_path):
    for name, path in list_recipes().items():
        cfg = load_recipe_file(path)
        paper = PAPER_WEIGHTS.get(cfg.model.name)
        if paper is None:
            check_encoder_weights(cfg)  # the tiny recipes need no file
            continue
        with pytest.raises(ConfigError) as info:
            check_encoder_weights(cfg)
        msg = str(info.value)
        assert "\n" not in msg and paper.encoder_file in msg and "--encoder-weights" in msg, name
        assert "model.encoder_weights=none" in msg
        for ok in (["model.encoder_weights=none"], ["model.encoder_weights=enc.pth"], ["model.weights=w.pth.tar"]):
            check_encoder_weights(load_recipe_file(path, ok))
    res = _cli("recipe", "run", "nyud_mtmamba", "--data", "rendered", "--out", str(tmp_path / "run"))
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "swin_large_patch4_window12_384_22kto1k.pth" in lines[0], res.output
    assert not (tmp_path / "run").exists()  # stopped before anything ran


def test_paper_recipes_follow_the_official_configs():
    r = {name: load_recipe_file(path) for name, path in list_recipes().items()}
    p = r["nyud_pamm"]
    assert (p.optim.lr, p.data.batch_size, p.loss.edge_pos_weight, p.train.grad_clip) == (1e-5, 6, 0.88, 10.0)
    assert (r["pascal_pamm"].optim.lr, r["pascal_pamm"].loss.edge_pos_weight) == (2e-5, 0.95)
    assert r["nyud_mtmamba"].loss.scheme == "log" and r["nyud_mtmamba_pp"].loss.scheme == "sum"
    for name in ("nyud_mtmamba_pp", "pascal_mtmamba_pp", "cityscapes_mtmamba_pp", "nyud_pamm", "pascal_pamm"):
        assert r[name].train.sync_bn, name
    for name, cfg in r.items():
        if cfg.model.name in PAPER_WEIGHTS:
            assert cfg.optim.no_decay_flagged is False, name  # the official code decays every parameter
            text = find_recipe(name).read_text()
            for key in ("lr:", "weight_decay:", "steps:", "crop_size:", "batch_size:"):
                line = next(ln for ln in text.splitlines() if ln.strip().startswith(key))
                assert "#" in line, f"{name}: {key} carries no source"


# ------------------------------------------------------------------------------------------------
# create_model with weights files written here
# ------------------------------------------------------------------------------------------------


def test_create_model_loads_encoder_weights_and_reports(tmp_path):
    torch.manual_seed(1)
    donor = create_model("mtmamba_tiny", echo=None)
    path = tmp_path / "encoder.pth"
    torch.save({"model": donor.encoder.state_dict()}, path)
    lines: list[str] = []
    torch.manual_seed(2)
    model = create_model("mtmamba_tiny", encoder_weights=path, echo=lines.append)
    for k, v in donor.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[k], v), k
    assert not torch.equal(model.decoder.state_dict()[next(iter(model.decoder.state_dict()))],
                           donor.decoder.state_dict()[next(iter(donor.decoder.state_dict()))])
    (report,) = model.weights_reports
    assert report.ok and report.path == str(path) and len(report.loaded) == len(donor.encoder.state_dict())
    assert len(lines) == 1 and path.name in lines[0] and "loaded" in lines[0]
    assert create_model("mtmamba_tiny", encoder_weights="none", echo=None).weights_reports == []


def test_normalization_is_metadata_not_weights(tmp_path):
    model = create_model("mtmamba_tiny", echo=None)
    assert not any(k.startswith("input_") for k in model.state_dict())  # every weights file loads unchanged
    ckpt, _ = _checkpoint(tmp_path)
    from mtssm.nn.pretrained import recorded_normalization

    assert recorded_normalization(ckpt / "model.safetensors") == STATS


def test_create_model_loads_a_whole_model_with_its_normalization(tmp_path):
    ckpt, donor = _checkpoint(tmp_path)
    lines: list[str] = []
    model = create_model("mtmamba_tiny", weights=ckpt / "model.safetensors", echo=lines.append)
    for k, v in donor.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert model.input_normalization == STATS
    assert len(model.weights_reports) == 1 and model.weights_reports[0].ok and len(lines) == 1


def test_create_model_weights_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        create_model("mtmamba_tiny", encoder_weights=tmp_path / "nope.pth", echo=None)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a weights file at all")
    for kw in ({"weights": junk}, {"encoder_weights": junk}):
        with pytest.raises(ValueError) as info:
            create_model("mtmamba_tiny", echo=None, **kw)
        assert "\n" not in str(info.value) and "junk.pth" in str(info.value)
    other, _ = _checkpoint(tmp_path, "msm_tiny")
    with pytest.raises(ValueError) as info:
        create_model("mtmamba_tiny", weights=other / "model.safetensors", echo=None)
    assert "\n" not in str(info.value) and "fit" in str(info.value) and "model.safetensors" in str(info.value)


def test_normalization_defaults_come_from_the_metadata():
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert create_model("mtmamba_tiny", echo=None).input_normalization == imagenet
    # PAMM's official pipeline normalises with ImageNet statistics (its ViT's own are 0.5, 0.5)
    assert PAPER_WEIGHTS["pamm_vit_large_nyud"].normalization == imagenet
    assert create_model("mtmamba_tiny", encoder="vit_small", encoder_kwargs={"depth": 4, "embed_dim": 32, "num_heads": 2, "img_size": 32},
                        echo=None).input_normalization == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


# ------------------------------------------------------------------------------------------------
# the normalisation travels: checkpoint -> eval / predict / export
# ------------------------------------------------------------------------------------------------


def test_normalization_through_a_checkpoint_into_eval_and_predict(tmp_path):
    from mtssm.data import make_dataloader, render_scenes
    from mtssm.engine.build import build_eval_set, model_normalization
    from mtssm.engine.predict import colorize, load_model_from_checkpoint, predict_images, predict_tensor
    from mtssm.engine.resolve import resolve_model

    ckpt, _ = _checkpoint(tmp_path)
    model, cfg, step = load_model_from_checkpoint(ckpt)
    assert model.input_normalization == STATS and step == 3
    same, _, _ = resolve_model(recipe=None, weights=ckpt, echo=lambda _: None)
    assert same.input_normalization == STATS
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in STATS)

    # eval: the dataset (and the loader's compact path) normalise with the model's statistics
    root = tmp_path / "scenes"
    render_scenes(root, layout="nyud", n=2, seed=0, size=(32, 32))
    eval_set = build_eval_set(cfg, root, model_normalization(model))
    raw = np.asarray(Image.open(eval_set.image_path(eval_set.ids[0])).convert("RGB"))
    expect = (torch.from_numpy(raw.astype(np.float32) / 255.0).permute(2, 0, 1) - mean) / std
    torch.testing.assert_close(eval_set[0]["image"], expect, atol=1e-5, rtol=0)
    batch = next(iter(make_dataloader(eval_set, 1, train=False, num_workers=0)))
    torch.testing.assert_close(batch["image"][0], expect, atol=1e-5, rtol=0)

    # predict: an image file is normalised with the model's statistics
    image = tmp_path / "img.png"
    Image.fromarray(raw).save(image)
    predict_images(model, [image], tmp_path / "pred")
    depth = colorize("depth", predict_tensor(model, expect)["depth"])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "pred" / "img_depth.png")), np.asarray(depth))


def test_cli_eval_and_predict_with_recipe_and_weights(tmp_path):
    ckpt, _ = _checkpoint(tmp_path)
    image = tmp_path / "img.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(image)
    res = _cli("predict", str(image), "--recipe", "nyud_msm_tiny", "--set", "model.name=mtmamba_tiny",
               "--weights", str(ckpt), "--out", str(tmp_path / "pred"))
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "0.5, 0.25, 0.125" in res.output and (tmp_path / "pred" / "img_sheet.png").is_file()
    res = _cli("predict", str(image), "--recipe", "nyud_msm_tiny", "--out", str(tmp_path / "p2"))
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1  # no image given
    res = _cli("eval", "--recipe", "nyud_msm_tiny", "--data", "rendered")
    assert res.exit_code == 1 and "--weights" in res.output and len(res.output.strip().splitlines()) == 1
    foreign = tmp_path / "foreign.pth.tar"
    torch.save({"model": {"module.x": torch.zeros(1)}}, foreign)
    res = _cli("eval", "--weights", str(foreign), "--data", "rendered")
    assert res.exit_code == 1 and "--recipe" in res.output and len(res.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_export_carries_the_normalization(tmp_path):
    from mtssm.engine.export import NORMALIZATION_FILE, export_checkpoint

    ckpt, _ = _checkpoint(tmp_path)
    out = export_checkpoint(ckpt, tmp_path / "m.pt2", size=(32, 32))
    extra = {NORMALIZATION_FILE: ""}
    program = torch.export.load(out, extra_files=extra)
    assert json.loads(extra[NORMALIZATION_FILE]) == {"mean": list(STATS[0]), "std": list(STATS[1])}
    assert program.module()(torch.zeros(1, 3, 32, 32))["depth"].shape == (1, 1, 32, 32)


# ------------------------------------------------------------------------------------------------
# training: optimizer groups, the load-balancing loss, loss schemes, SyncBatchNorm
# ------------------------------------------------------------------------------------------------


def test_optimizer_groups_exempt_flagged_parameters():
    from mtssm.engine.trainer import build_optimizer

    model = create_model("mtmamba_tiny", echo=None)
    flagged = {id(p) for p in model.parameters() if getattr(p, "_no_weight_decay", False)}
    assert flagged  # A_logs and Ds of every SS2D
    opt = build_optimizer(_tiny_cfg(), model)
    decay, no_decay = opt.param_groups
    assert {id(p) for p in no_decay["params"]} == flagged and no_decay["weight_decay"] == 0.0
    assert decay["weight_decay"] == 1e-5 and not flagged & {id(p) for p in decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    cfg = config_from_dict({"model": {"name": "mtmamba_tiny"}, "optim": {"no_decay_flagged": False}})
    (group,) = build_optimizer(cfg, model).param_groups
    assert len(group["params"]) == len(list(model.parameters())) and group["weight_decay"] == 1e-5


def test_load_balancing_loss_reaches_the_training_loss_and_is_logged(tmp_path):
    from mtssm.engine.trainer import Components, train
    from mtssm.losses import build_task_losses
    from tests.engine.engine_standin import StandInDataset

    def run(weight: float, out: Path) -> list[dict]:
        cfg = config_from_dict({
            "name": "lb", "model": {"name": "pamm_tiny"},
            "data": {"dataset": "nyud", "tasks": ["semseg", "depth"], "batch_size": 2, "num_workers": 0},
            "loss": {"load_balancing": weight}, "optim": {"lr": 1e-3},
            "train": {"steps": 1, "compile": False, "progress": False, "log_every": 1, "ckpt_every": 0},
            "eval": {"predict_samples": 0},
        })
        torch.manual_seed(0)
        model = create_model("pamm_tiny", tasks=["semseg", "depth"], echo=None)
        comps = Components(cfg, model, StandInDataset(4), None, build_task_losses(["semseg", "depth"]),
                           ["semseg", "depth"])
        train(comps, out, echo=lambda _: None)
        return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]

    (rec,) = run(0.5, tmp_path / "a")
    lb = rec["aux/load_balancing"]
    assert lb > 0
    assert rec["loss"] == pytest.approx(rec["loss/semseg"] + rec["loss/depth"] + 0.5 * lb, rel=1e-5)
    (rec0,) = run(0.0, tmp_path / "b")
    assert rec0["aux/load_balancing"] == pytest.approx(lb, rel=1e-5)  # logged even when weighed 0
    assert rec0["loss"] == pytest.approx(rec0["loss/semseg"] + rec0["loss/depth"], rel=1e-5)


def test_log_loss_scheme():
    from mtssm.losses import MultiTaskLoss

    losses = {"a": nn.L1Loss(), "b": nn.MSELoss()}
    out = {"a": torch.full((2,), 3.0), "b": torch.full((2,), 2.0)}
    lab = {"a": torch.zeros(2), "b": torch.zeros(2)}
    total, per_task = MultiTaskLoss(losses, {"a": 1.0, "b": 2.0}, scheme="log")(out, lab)
    assert total.item() == pytest.approx(np.log(3.0 + 1e-8) + 2 * np.log(4.0 + 1e-8), rel=1e-6)
    assert per_task["b"].item() == pytest.approx(4.0)


def test_mtmamba_pp_heads_and_sync_batchnorm_conversion():
    from mtssm.engine.trainer import sync_batchnorm

    paper = create_model("mtmamba_pp_swin_large_pascal", device="meta", echo=None)
    for head in paper.heads.values():
        assert type(head.norm) is nn.SyncBatchNorm and head.conv.out_channels == 96
    tiny = create_model("mtmamba_pp_tiny", echo=None)
    assert all(type(h.norm) is nn.BatchNorm2d for h in tiny.heads.values())
    assert sync_batchnorm(tiny, enabled=True, world_size=1) is tiny
    assert all(type(h.norm) is nn.BatchNorm2d for h in tiny.heads.values())  # one process: unchanged
    params = {id(p) for p in tiny.parameters()}
    converted = sync_batchnorm(tiny, enabled=True, world_size=2)
    assert all(type(h.norm) is nn.SyncBatchNorm for h in converted.heads.values())
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    assert {id(p) for p in converted.parameters()} == params  # the optimizer's tensors, kept
    other = create_model("mtmamba_pp_tiny", echo=None)
    assert sync_batchnorm(other, enabled=False, world_size=2) is other
    assert all(type(h.norm) is nn.BatchNorm2d for h in other.heads.values())

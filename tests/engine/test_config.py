"""Recipe config: schema checks, overrides, and one-line errors naming the key."""

from __future__ import annotations

import pytest

from mtssm.engine.config import (
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_recipe_file,
)


def test_defaults_validate_and_round_trip():
    cfg = config_from_dict({})
    assert config_from_dict(config_to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "data, names",
    [
        ({"train": {"stpes": 3}}, ["train.stpes", "train.steps"]),
        ({"optimizer": {}}, ["optimizer", "optim"]),
        ({"data": {"batchsize": 2}}, ["data.batchsize", "data.batch_size"]),
    ],
)
def test_unknown_key_names_it_and_lists_valid_ones(data, names):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    msg = str(info.value)
    assert "\n" not in msg
    for name in names:
        assert name.split(".")[-1] in msg


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"train": {"steps": "many"}}, "train.steps"),
        ({"train": {"compile": "yes"}}, "train.compile"),
        ({"train": {"precision": "fp16"}}, "bf16"),
        ({"optim": {"name": "lamb"}}, "adamw"),
        ({"data": {"dataset": "kitti"}}, "cityscapes"),
        ({"data": {"tasks": ["semseg", "sal"]}}, "'sal'"),
        ({"loss": {"weights": {"parts": 1.0}}}, "'parts'"),
        ({"data": {"batch_size": 6}, "train": {"grad_accum": 4}}, "grad_accum"),
        ({"train": {"steps": 0}}, "train.steps"),
        ({"schedule": {"warmup_steps": -1}}, "schedule.warmup_steps"),
    ],
)
def test_bad_values_fail_with_one_line(data, fragment):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_overrides_dotted_short_and_nested():
    data = apply_overrides({"train": {"steps": 5}}, ["compile=false", "optim.lr=3e-4", "loss.weights.depth=2",
                                                     "data.crop_size=[32, 64]", "steps=7"])
    cfg = config_from_dict(data)
    assert cfg.train.compile is False and cfg.train.steps == 7
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.loss.weights == {"depth": 2.0}
    assert cfg.data.crop_size == [32, 64]


@pytest.mark.parametrize("text, fragment", [("train.stpes=3", "train.steps"), ("stpes=3", "stpes"),
                                            ("name", "key=value"), ("optim.rate=1", "optim.lr")])
def test_bad_overrides(text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        apply_overrides({}, [text])


def test_recipe_file_errors_name_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  stpes: 3\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml: unknown key 'train\.stpes'"):
        load_recipe_file(path)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_recipe_file(tmp_path / "nope.yaml")
    path.write_text("train: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe_file(path)
    path.write_text("train:\n  steps: 3\n")
    assert load_recipe_file(path).name == "mine"

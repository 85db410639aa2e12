"""Every recipe file on disk loads and validates; the recipe CLI lists, shows and rejects typos."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from mtssm.engine.config import ConfigError, load_recipe_file
from mtssm.recipes import RECIPE_DIR, find_recipe, list_recipes, recipe_files

FILES = recipe_files()


def test_recipes_are_found_recursively(tmp_path):
    assert len(FILES) >= 10
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "deep.yaml").write_text("train: {steps: 1}\n")
    assert [p.name for p in recipe_files(tmp_path)] == ["deep.yaml"]


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(RECIPE_DIR)) for p in FILES])
def test_recipe_file_validates(path: Path):
    cfg = load_recipe_file(path)
    text = path.read_text()
    assert re.search(rf"^# Run: mtssm recipe run {path.stem}\b", text, re.M), "header must show the command"
    assert cfg.source.strip(), "a recipe says where its numbers come from"
    assert cfg.name == path.stem
    from mtssm.nn import list_models

    assert cfg.model.name in list_models()


def test_paper_hyperparameters():
    r = {name: load_recipe_file(path) for name, path in list_recipes().items()}
    for name in ("nyud_mtmamba", "pascal_mtmamba"):
        c = r[name]
        assert (c.optim.name, c.optim.lr, c.optim.weight_decay, c.data.batch_size, c.train.steps,
                c.schedule.name, c.schedule.power) == ("adamw", 1e-4, 1e-5, 8, 50000, "poly", 0.9)
    assert (r["nyud_msm"].optim.name, r["nyud_msm"].optim.lr, r["nyud_msm"].data.batch_size,
            r["nyud_msm"].train.steps) == ("adam", 5e-5, 4, 50000)
    assert (r["pascal_msm"].data.batch_size, r["pascal_msm"].train.steps) == (6, 75000)
    assert r["cityscapes_mtmamba_pp"].train.steps == 40000
    assert r["nyud_pamm"].train.steps == r["pascal_pamm"].train.steps == 40000


def test_typo_in_override_names_the_key():
    with pytest.raises(ConfigError, match=r"unknown key 'train\.stpes'.*train\.steps"):
        load_recipe_file(find_recipe("nyud_msm"), ["train.stpes=1"])


def _cli(*args: str, env: dict | None = None):
    from mtssm.cli import main

    return CliRunner().invoke(main, list(args), env=env)


def test_cli_list_and_show():
    res = _cli("recipe", "list")
    assert res.exit_code == 0, res.output
    for name in list_recipes():
        assert name in res.output
    res = _cli("recipe", "show", "nyud_msm", "--set", "train.steps=7")
    assert res.exit_code == 0 and "steps: 7" in res.output


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["recipe", "show", "nyud_msn"], "unknown recipe 'nyud_msn'; valid recipes: "),
        (["recipe", "show", "nyud_msm", "--set", "train.stpes=1"], "unknown key 'train.stpes'"),
        (["recipe", "run", "nyud_msm", "--set", "optim.name=lamb"], "valid values: adam, adamw, sgd"),
    ],
)
def test_cli_errors_are_one_line(args, fragment):
    res = _cli(*args)
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], res.output


def test_run_without_dataset_says_where_it_looked(tmp_path):
    missing = tmp_path / "NYUDv2"
    res = _cli("recipe", "run", "nyud_msm_tiny", "--data-root", str(missing), "--out", str(tmp_path / "run"))
    assert res.exit_code == 1
    line = res.output.strip()
    assert "\n" not in line and str(missing) in line and "--data rendered" in line and "--data-root" in line

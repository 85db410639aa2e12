"""Recipe -> components: model arguments checked at load time, and an engine without import cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from click.testing import CliRunner

from mtssm.cli import main
from mtssm.engine.build import load_recipe
from mtssm.engine.config import ConfigError

ENGINE = Path(__file__).resolve().parents[2] / "mtssm" / "engine"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.args.bogus=1", r"model\.args\.bogus: is not a hyperparameter of model 'msm_tiny'"),
        ("model.args.d_state=0", r"model\.args\.d_state: has a value not accepted by model 'msm_tiny'"),
        ("model.name=nope", r"model\.name: unknown model 'nope'"),
    ],
)
def test_model_args_fail_at_load_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_recipe("nyud_msm_tiny", [override])
    assert "\n" not in str(info.value) and str(info.value).startswith("nyud_msm_tiny.yaml: ")


def test_a_bad_model_arg_fails_before_any_data_is_read(tmp_path):
    missing = tmp_path / "no-such-dataset"
    res = CliRunner().invoke(main, ["recipe", "run", "nyud_msm_tiny", "--data-root", str(missing),
                                    "--out", str(tmp_path / "run"), "--set", "model.args.bogus=1"])
    assert res.exit_code == 1
    assert res.output.count("\n") == 1 and "model.args.bogus" in res.output and "dataset" not in res.output
    assert not (tmp_path / "run").exists()


def _imports(path: Path) -> tuple[set[str], list[int]]:
    """Modules ``path`` imports at module level, and the lines of imports inside functions."""
    tree = ast.parse(path.read_text())
    top: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module:
            top.add(node.module)
            top.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            top.update(a.name for a in node.names)
    nested = [
        n.lineno
        for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
        for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))
    ]
    return top, nested


def test_engine_modules_import_at_module_level_without_cycles():
    modules = {f"mtssm.engine.{p.stem}": p for p in ENGINE.glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name, path in modules.items():
        top, nested = _imports(path)
        graph[name] = {m for m in top if m in modules}
        allowed = 1 if name == "mtssm.engine.trainer" else 0  # tensorboard: optional and slow to import
        assert len(nested) <= allowed, f"{name}: imports inside functions at lines {nested}"

    def visit(node: str, stack: tuple[str, ...]) -> None:
        assert node not in stack, f"import cycle: {' -> '.join(stack + (node,))}"
        for dep in graph[node]:
            visit(dep, stack + (node,))

    for name in graph:
        visit(name, ())

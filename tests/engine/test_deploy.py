"""AOTInductor packages: every tiny model from Python against eager, and the C++ program without Python.

AOTInductor compiles take minutes on two cores, so each package is built once per session (small
inputs, one thread) and shared by the tests; the C++ program runs the package that
``mtssm export --format aoti`` wrote.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from mtssm.engine.checkpoint import save_checkpoint
from mtssm.engine.config import config_to_dict, load_recipe_file
from mtssm.engine.export import OPS_LIBRARY_NAME, compile_package, export_program, package_metadata
from mtssm.engine.predict import colorize, load_model_from_checkpoint
from mtssm.nn import create_model, list_models
from mtssm.recipes import find_recipe

TINY = list_models("*_tiny")
SIZE = (64, 96)
CLI_RECIPE = "nyud_msm_tiny"  # its model's package is written by `mtssm export --format aoti`
CLI_MODEL = load_recipe_file(find_recipe(CLI_RECIPE)).model.name
REL_TOL = 1e-4


@dataclass
class Package:
    path: Path
    model: torch.nn.Module
    cli_output: str = ""


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def _export_with_cli(root: Path) -> Package:
    from mtssm.cli import main

    cfg = load_recipe_file(find_recipe(CLI_RECIPE), [f"data.crop_size=[{SIZE[0]}, {SIZE[1]}]"])
    torch.manual_seed(0)
    from mtssm.engine.build import build_model

    ckpt = save_checkpoint(root / "ckpts", 1, build_model(cfg), {}, config_to_dict(cfg))
    out = root / "model.pt2"
    res = CliRunner().invoke(main, ["export", str(ckpt), "--format", "aoti", "--out", str(out),
                                    "--size", f"{SIZE[0]}x{SIZE[1]}"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    model, _, _ = load_model_from_checkpoint(ckpt)
    return Package(out, model, res.output)


@pytest.fixture(scope="session")
def package(tmp_path_factory):
    """``package(name)``: the AOTInductor package of tiny model ``name`` at SIZE, built once."""
    built: dict[str, Package] = {}

    def get(name: str) -> Package:
        if name not in built:
            root = tmp_path_factory.mktemp(name)
            if name == CLI_MODEL:
                built[name] = _export_with_cli(root)
            else:
                torch.manual_seed(0)
                model = create_model(name).eval()
                program = export_program(model, torch.zeros(1, 3, *SIZE))
                path = compile_package(program, root / "model.pt2", package_metadata(program, name))
                built[name] = Package(path, model)
        return built[name]

    return get


def _extern_ops(path: Path) -> set[str]:
    """Ops the package's wrapper calls through the dispatcher (its ``*.wrapper.json``)."""
    with zipfile.ZipFile(path) as z:
        nodes = [n for f in z.namelist() if f.endswith(".wrapper.json") for n in json.loads(z.read(f))["nodes"]]
    return {n["node"]["target"] for n in nodes}


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY)
def test_package_from_python_equals_eager(package, name):
    pkg = package(name)
    runner = torch._inductor.aoti_load_package(str(pkg.path))
    x = torch.randn(1, 3, *SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = pkg.model.forward_dict(x)
        out = runner(x)
    assert isinstance(out, dict) and list(out) == list(ref), (type(out), list(out))
    for task in ref:
        assert out[task].shape == ref[task].shape, task
        err = _relative_error(out[task], ref[task])
        assert err <= REL_TOL, f"{name}/{task}: relative error {err:.2e}"
    meta = runner.get_metadata()
    assert meta["mtssm.tasks"].split(",") == list(ref)
    assert meta["mtssm.channels"].split(",") == [str(v.shape[1]) for v in ref.values()]
    assert meta["mtssm.input"] == f"1x3x{SIZE[0]}x{SIZE[1]}"
    # the scan orders are folded into constants: the scan is the only op left to the op library
    assert _extern_ops(pkg.path) == {"mtssm::selective_scan"}


@pytest.mark.slow
def test_cpp_program_runs_without_python_and_equals_eager(package, tmp_path, monkeypatch):
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    if shutil.which("cmake", path=path) is None:  # scripts/env.sh installs it with the test extras
        pytest.fail("cmake is not installed: bash scripts/env.sh test")
    pkg = package(CLI_MODEL)
    assert (pkg.path.parent / OPS_LIBRARY_NAME).is_file()
    # the two commands `mtssm export` printed: build (into tmp_path), then run on our image
    build_cmd, run_cmd = [line.strip() for line in pkg.cli_output.splitlines()[-2:]]
    assert build_cmd.startswith("cmake -S") and "mtssm_run" in run_cmd, pkg.cli_output
    monkeypatch.chdir(tmp_path)
    res = subprocess.run(build_cmd, shell=True, capture_output=True, text=True, timeout=900,
                         env=dict(os.environ, PATH=path))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (SIZE[0], SIZE[1], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "scene.png")
    argv = shlex.split(run_cmd.replace("IMAGE.png", str(tmp_path / "scene.png")))
    binary = Path(argv[0]).resolve()
    # a clean environment: nothing that could point a process at Python; the dynamic loader
    # logs every library the process loads (dlopen'ed ones included)
    env = {"PATH": "/usr/bin:/bin", "LD_DEBUG": "libs", "LD_DEBUG_OUTPUT": str(tmp_path / "ld")}
    res = subprocess.run([str(binary), *argv[1:], "--npy", "--threads", "1"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith(str(tmp_path / "scene.png")) and res.stdout.strip().endswith("ms")
    loaded = "".join(p.read_text(errors="replace") for p in tmp_path.glob("ld.*"))
    assert "libtorch_cpu.so" in loaded and OPS_LIBRARY_NAME in loaded
    assert "libpython" not in loaded and "libtorch_python" not in loaded

    x = torch.from_numpy(pixels.astype(np.float32) / 255).permute(2, 0, 1)
    from mtssm.data.constants import IMAGENET_MEAN, IMAGENET_STD

    x = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        ref = pkg.model.forward_dict(x[None])
    out_dir = tmp_path / "predictions"
    for task, value in ref.items():
        got = torch.from_numpy(np.load(out_dir / f"scene_{task}.npy"))
        assert got.shape == value[0].shape, task
        err = _relative_error(got, value[0])
        assert err <= REL_TOL, f"{task}: relative error {err:.2e}"
        png = np.asarray(Image.open(out_dir / f"scene_{task}.png").convert("RGB")).astype(int)
        expected = np.asarray(colorize(task, value[0])).astype(int)
        assert png.shape == expected.shape, task
        # the colour maps of `mtssm predict`; values differing at 1e-6 may round across a level
        assert (np.abs(png - expected) <= 1).all(axis=-1).mean() >= 0.99, task


def test_aoti_package_name_error_is_one_line(tmp_path):
    from mtssm.cli import main

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    res = CliRunner().invoke(main, ["export", str(ckpt), "--format", "aoti", "--out", str(tmp_path / "model.so")])
    assert res.exit_code == 1 and "model.so" in res.output and "*.pt2" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1, res.output

"""Export a checkpoint for deployment: a ``torch.export`` program, or an AOTInductor package.

Two formats, both for inputs ``(B, 3, H, W)`` of the shape given at export time (normalised with the model's
statistics, H and W multiples of 32), both returning ``{task: (B, C_t, H, W)}``. A program carries the statistics as its extra file
``normalization.json`` (``{"mean": [...], "std": [...]}``), a package in its metadata:

- ``"program"`` (default): a ``torch.export`` program. It needs Python and ``import mtssm`` (which
  registers the ``torch.ops.mtssm`` ops) to run::

      import mtssm, torch
      program = torch.export.load("model.pt2")
      outputs = program.module()(images)

- ``"aoti"``: the program compiled ahead of time by AOTInductor into a package of native CPU code,
  loadable without Python by libtorch's ``torch::inductor::AOTIModelPackageLoader`` (the C++
  program in ``deploy/cpp``) or from Python by ``torch._inductor.aoti_load_package``. Its outputs
  come as a list in the order of the ``mtssm.tasks`` metadata entry. The scan orders are folded
  into constants (the shape is static), so the only mtssm op left in it is
  ``mtssm::selective_scan``; a C++ process loads the op library copied next to the package
  (:data:`OPS_LIBRARY_NAME`). The package's metadata (:func:`package_metadata`) says what a
  client needs to feed it and read it: tasks, their channels, input shape, normalisation.

AOTInductor compiles for the CPU it runs on (its vector instruction set), as the op library is
built for it: run the package on machines of the same kind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from shlex import quote

import torch
from torch import Tensor, nn
from torch.utils import cmake_prefix_path

from mtssm._ops import library_path
from mtssm.data.constants import IMAGENET_MEAN, IMAGENET_STD
from mtssm.engine.predict import load_model_from_checkpoint

__all__ = [
    "NORMALIZATION_FILE",
    "EXPORT_FORMATS",
    "OPS_LIBRARY_NAME",
    "check_export_target",
    "compile_package",
    "default_export_size",
    "deploy_commands",
    "export_checkpoint",
    "export_model",
    "export_program",
    "fold_scan_orders",
    "package_metadata",
]

#: ``mtssm export --format`` values.
EXPORT_FORMATS = ("program", "aoti")
#: File name of the op library copied next to an AOTInductor package.
OPS_LIBRARY_NAME = "libmtssm_ops.so"
#: The C++ program that runs AOTInductor packages (in a clone of the repository).
CPP_SOURCE_DIR = Path(__file__).resolve().parents[2] / "deploy" / "cpp"
#: The extra file of an exported program holding the model's input statistics.
NORMALIZATION_FILE = "normalization.json"


def default_export_size(cfg: object) -> tuple[int, int]:
    """The recipe's image size (train crop, else the rendered size) rounded up to multiples of 32."""
    size = cfg.data.crop_size or cfg.data.render_size  # type: ignore[attr-defined]
    return tuple(-(-int(s) // 32) * 32 for s in size)  # type: ignore[return-value]


def export_program(model: nn.Module, example: Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` (put in eval mode) for inputs shaped like ``example (B, 3, H, W)``.

    A :class:`~mtssm.nn.MultiTaskModel` returns a plain ``dict`` while exporting, so the program
    saves with ``torch.export.save``.
    """
    with torch.no_grad():
        return torch.export.export(model.eval(), (example,))


def fold_scan_orders(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The same program with every ``mtssm::scan_order(name, H, W)`` call replaced by its table.

    At a static shape the calls' arguments are constants, so their ``(K, H * W)`` tables are too:
    folded, they become buffers of the program (one per distinct ``(name, H, W)``), computed once at
    export instead of on every call, and the program needs no implementation of the op. Programs
    with symbolic sizes are returned unchanged.
    """
    target = torch.ops.mtssm.scan_order.default
    module = program.module()
    nodes = list(module.graph.find_nodes(op="call_function", target=target))
    if not nodes or any(not isinstance(a, (str, int)) for n in nodes for a in n.args):
        return program
    names: dict[tuple, str] = {}
    for node in nodes:
        key = tuple(node.args)
        if key not in names:
            names[key] = f"scan_order_{key[0]}_{key[1]}x{key[2]}"
            module.register_buffer(names[key], target(*key))
        with module.graph.inserting_before(node):
            table = module.graph.get_attr(names[key])
        table.meta.update(node.meta)
        node.replace_all_uses_with(table)
        module.graph.erase_node(node)
    module.recompile()
    (example,) = (torch.zeros_like(t.meta["val"], device="cpu")
                  for t in module.graph.find_nodes(op="placeholder"))
    with torch.no_grad():
        return torch.export.export(module, (example,))


def package_metadata(program: torch.export.ExportedProgram, name: str = "",
                     normalization: Any = None) -> dict[str, str]:
    """What a client of an AOTInductor package needs, as the string map stored in the package.

    Read off ``program`` (one image input, a ``{task: (B, C_t, H, W)}`` output). Keys:
    ``mtssm.tasks`` (comma-separated, the order of the package's outputs), ``mtssm.channels``
    (``C_t`` of each), ``mtssm.input`` (``BxCxHxW``), ``mtssm.mean`` / ``mtssm.std`` (per RGB
    channel, for pixel values in [0, 1]: ``normalization = (mean, std)``, None: ImageNet's), ``mtssm.model`` (the model's registered name, if given).
    """
    spec = program.call_spec.out_spec
    if spec is None or spec.type is not dict:
        raise TypeError("package_metadata: the program must return a dict {task: tensor}")
    tasks = [str(k) for k in spec.context]
    user_outputs = set(program.graph_signature.user_outputs)
    shapes = [tuple(n.meta["val"].shape) for n in program.graph.output_node().args[0]
              if n.name in user_outputs]
    mean, std = normalization if normalization is not None else (IMAGENET_MEAN, IMAGENET_STD)
    (image,) = (n.meta["val"] for n in program.graph.find_nodes(op="placeholder")
                if n.name in program.graph_signature.user_inputs)
    return {
        "mtssm.tasks": ",".join(tasks),
        "mtssm.channels": ",".join(str(s[1]) for s in shapes),
        "mtssm.input": "x".join(str(int(d)) for d in image.shape),
        "mtssm.mean": ",".join(repr(float(v)) for v in mean),
        "mtssm.std": ",".join(repr(float(v)) for v in std),
        "mtssm.model": name,
    }


def compile_package(
    program: torch.export.ExportedProgram, out: str | Path, metadata: Mapping[str, str] | None = None
) -> Path:
    """AOTInductor-compile ``program`` for the CPU into the package ``out`` (written atomically).

    The scan orders are folded first (:func:`fold_scan_orders`); ``metadata`` is stored in the
    package (``AOTIModelPackageLoader::get_metadata()`` in C++).
    """
    program = fold_scan_orders(program)
    # dynamic threads: the kernels use the threads of the process that runs them (at::set_num_threads,
    # OMP_NUM_THREADS) rather than the count of the process that compiled them
    configs = {"aot_inductor.metadata": dict(metadata or {}), "cpp.dynamic_threads": True}
    return _write_atomically(
        Path(out), lambda tmp: torch._inductor.aoti_compile_and_package(
            program, package_path=str(tmp), inductor_configs=configs)
    )


def _write_atomically(out: Path, write: Callable[[Path], object]) -> Path:
    """``write(path)`` into a temporary folder beside ``out`` (the file keeps its name there, which
    AOTInductor records in the package), then rename it onto ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp / out.name)
        os.replace(tmp / out.name, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _copy_ops_library(out: Path) -> Path:
    """Copy the compiled op library next to the package ``out``; returns the copy's path."""
    dest = out.with_name(OPS_LIBRARY_NAME)
    return _write_atomically(dest, lambda tmp: shutil.copyfile(library_path(), tmp))


def export_checkpoint(
    ckpt: str | Path,
    out: str | Path,
    *,
    size: tuple[int, int] | None = None,
    batch: int = 1,
    format: str = "program",
) -> Path:
    """Export the checkpoint's model for inputs ``(batch, 3, *size)`` to ``out`` (written atomically).

    ``size`` defaults to :func:`default_export_size` of the checkpoint's recipe; ``format`` is one of
    :data:`EXPORT_FORMATS`. With ``"aoti"`` the op library is copied next to ``out`` as
    :data:`OPS_LIBRARY_NAME`.
    """
    check_export_target(out, format)
    model, cfg, _ = load_model_from_checkpoint(ckpt)
    return export_model(model, cfg, out, size=size, batch=batch, format=format)


def check_export_target(out: str | Path, format: str) -> Path:
    """``out`` as a Path, or a one-line ValueError for an unknown ``format`` or an AOTInductor
    package not named ``*.pt2`` (checked before anything is loaded)."""
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format: expected one of {', '.join(EXPORT_FORMATS)}, got {format!r}")
    out = Path(out)
    if format == "aoti" and out.suffix != ".pt2":
        raise ValueError(f"--out {str(out)!r}: an AOTInductor package must be named *.pt2")
    return out


def export_model(
    model: nn.Module,
    cfg: Any,
    out: str | Path,
    *,
    size: tuple[int, int] | None = None,
    batch: int = 1,
    format: str = "program",
) -> Path:
    """Export ``model`` (built from recipe ``cfg``) for inputs ``(batch, 3, *size)`` to ``out``
    (written atomically) in ``format`` (:data:`EXPORT_FORMATS`), with its input statistics
    (:data:`NORMALIZATION_FILE`, or the package metadata)."""
    out = check_export_target(out, format)
    h, w = size or default_export_size(cfg)
    if h % 32 or w % 32 or h <= 0 or w <= 0:
        raise ValueError(f"size: expected positive multiples of 32, got {h}x{w}")
    program = export_program(model, torch.zeros(batch, 3, h, w))
    stats = getattr(model, "input_normalization", None)
    if format == "aoti":
        compile_package(program, out, package_metadata(program, cfg.model.name, stats))  # type: ignore[attr-defined]
        _copy_ops_library(out)
        return out
    extra = {} if stats is None else {NORMALIZATION_FILE: json.dumps({"mean": list(stats[0]), "std": list(stats[1])})}
    return _write_atomically(out, lambda tmp: torch.export.save(program, tmp, extra_files=extra))


def deploy_commands(package: str | Path, build_dir: str | Path = "build/deploy") -> list[str]:
    """The two shell commands that build the C++ program and run it on ``package``."""
    source = CPP_SOURCE_DIR if CPP_SOURCE_DIR.is_dir() else Path("deploy/cpp")  # else: from a clone
    build = quote(str(build_dir))
    return [
        f"cmake -S {quote(str(source))} -B {build} -DCMAKE_PREFIX_PATH={quote(cmake_prefix_path)}"
        f" && cmake --build {build}",
        f"{quote(str(Path(build_dir) / 'mtssm_run'))} {quote(str(package))} IMAGE.png --out predictions/",
    ]

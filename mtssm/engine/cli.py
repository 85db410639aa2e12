"""Command-line entry points of the engine (attached to ``mtssm`` in :mod:`mtssm.cli`):

- ``mtssm recipe list | show NAME | run NAME [--data-root DIR] [--data rendered] [--set k=v ...]
  [--out DIR] [--resume] [--weights FILE] [--encoder-weights FILE]``
- ``mtssm eval CKPT [--data-root DIR]`` · ``mtssm predict CKPT IMAGE... --out DIR`` ·
  ``mtssm export CKPT --out model.pt2 [--format aoti]`` · ``mtssm models``
- eval, predict and export also run a recipe's model with given weights instead of a checkpoint:
  ``mtssm eval --recipe nyud_mtmamba --weights mtmamba_nyud.pth.tar --data-root DIR`` (any trained
  weights file: an official trained checkpoint or an mtssm checkpoint; ``--encoder-weights FILE``
  and ``--set k=v`` apply to the recipe's model)

Every expected failure (unknown recipe, key or value; missing dataset; NaN loss) ends with a one-line
``Error: ...`` and exit status 1.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import torch
import yaml

from mtssm.engine.build import build_components, build_eval_set, load_recipe, model_normalization, resolve_data_root
from mtssm.engine.checkpoint import resolve_checkpoint
from mtssm.engine.config import RecipeConfig, check_encoder_weights, config_to_dict, load_recipe_file
from mtssm.engine.distributed import barrier, cleanup, init_distributed
from mtssm.engine.evaluate import evaluate_recipe, format_table, write_result
from mtssm.engine.export import check_export_target, deploy_commands, export_model
from mtssm.engine.predict import output_stems, predict_dataset, predict_images
from mtssm.engine.lock import RunFolderBusyError, lock_run_folder
from mtssm.engine.resolve import resolve_model
from mtssm.engine.trainer import NonFiniteError, train
from mtssm.nn import create_model, list_models
from mtssm.recipes import list_recipes
from mtssm.runtime import keep_freed_memory

__all__ = ["evaluate", "export", "models", "predict", "recipe"]


def _one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the engine's expected errors into ``click`` errors (one line, exit status 1)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, TypeError, FileNotFoundError, FileExistsError, NonFiniteError, RunFolderBusyError) as exc:
            raise click.ClickException(" ".join(str(exc).split())) from None

    return wrapper


_PathOption = click.Path(path_type=Path)


def _weights_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--weights FILE`` and ``--encoder-weights FILE``."""
    fn = click.option("--encoder-weights", "encoder_weights", type=_PathOption, default=None,
                      help="A pretrained encoder file to start from (sets model.encoder_weights).")(fn)
    return click.option("--weights", type=_PathOption, default=None,
                        help="Whole-model weights: an mtssm checkpoint or an official trained checkpoint "
                             "(sets model.weights).")(fn)


def _recipe_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--recipe NAME``, ``--set k=v`` and the weights options, for eval, predict and export."""
    fn = _weights_options(fn)
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                      help="Override a key of --recipe.")(fn)
    return click.option("--recipe", default=None,
                        help="Build this recipe's model and load --weights into it (instead of CKPT).")(fn)


def _resolve(ckpt: Path | None, recipe: str | None, weights: Path | None, encoder_weights: Path | None,
             overrides: tuple[str, ...], device: str = "cpu", before_load: Callable[[Any], None] | None = None) -> Any:
    return resolve_model(ckpt, recipe=recipe, weights=weights, encoder_weights=encoder_weights,
                         overrides=overrides, device=device, echo=click.echo, before_load=before_load)


@click.group("recipe")
def recipe() -> None:
    """List, show and run training recipes (mtssm/recipes/*.yaml)."""


@recipe.command("list")
@_one_line_errors
def recipe_list() -> None:
    """List the packaged recipes."""
    rows = []
    for name, path in list_recipes().items():
        cfg = load_recipe_file(path)
        rows.append((name, cfg.model.name, f"{cfg.train.steps} steps", cfg.description))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])


@recipe.command("show")
@click.argument("name")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a key.")
@_one_line_errors
def recipe_show(name: str, overrides: tuple[str, ...]) -> None:
    """Print the resolved config of recipe NAME (a name or a YAML file)."""
    click.echo(yaml.safe_dump(config_to_dict(load_recipe(name, overrides)), sort_keys=False).rstrip())


@recipe.command("run")
@click.argument("name")
@click.option("--data-root", type=click.Path(path_type=Path), default=None, help="Dataset folder.")
@click.option("--data", type=click.Choice(["rendered"]), default=None,
              help="Train on rendered scenes (rendered into a cache on first use).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe key, e.g. --set train.steps=100 or --set compile=false.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Run folder [runs/NAME].")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in --out.")
@_weights_options
@_one_line_errors
def recipe_run(name: str, data_root: Path | None, data: str | None, overrides: tuple[str, ...],
               out: Path | None, resume: bool, weights: Path | None, encoder_weights: Path | None) -> None:
    """Train recipe NAME, then evaluate and write prediction PNGs. Works under torchrun (DDP).

    A paper recipe starts from its paper's pretrained encoder: pass it with --encoder-weights FILE
    (or --set model.encoder_weights=none to train from scratch)."""
    cfg = load_recipe(name, overrides)
    if weights is not None:
        cfg.model.weights = str(weights)
    if encoder_weights is not None:
        cfg.model.encoder_weights = str(encoder_weights)
    check_encoder_weights(cfg)
    keep_freed_memory()  # the same large tensors every step: reuse them, do not page-fault them anew
    out = out or Path("runs") / cfg.name
    info = init_distributed(cfg.train.device)
    try:
        if info.is_main:  # render (if asked) once, before the other processes look
            root = resolve_data_root(cfg, data_root, data, echo=click.echo)
        barrier()
        if not info.is_main:
            root = resolve_data_root(cfg, data_root, data, echo=lambda _: None)
        cfg.data.root = str(Path(root).resolve())  # checkpoints remember where the data was
        with lock_run_folder(out) if info.is_main else contextlib.nullcontext():  # training and evaluation
            echo = click.echo if info.is_main else (lambda _: None)
            result = train(build_components(cfg, root, echo=echo), out, resume=resume, echo=click.echo)
            if info.is_main:
                eval_set = result.components.eval_set or build_eval_set(cfg, root, model_normalization(result.model))
                _final_eval(cfg, result.model, eval_set, out)
        barrier()
    finally:
        cleanup()


def _final_eval(cfg: RecipeConfig, model: torch.nn.Module, eval_set: Any, out: Path) -> None:
    result = evaluate_recipe(cfg, model, eval_set)
    click.echo(format_table(result))
    write_result(result, out)
    if cfg.eval.predict_samples:
        with torch.no_grad():
            files = predict_dataset(model, eval_set, out / "predictions", cfg.eval.predict_samples)
        click.echo(f"wrote {len(files)} prediction images to {out / 'predictions'}")


@click.command("eval")
@click.argument("ckpt", required=False, type=click.Path(exists=True, path_type=Path))
@click.option("--data-root", type=click.Path(path_type=Path), default=None, help="Dataset folder.")
@click.option("--data", type=click.Choice(["rendered"]), default=None, help="Use the rendered scenes.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Where to write eval.json/eval.txt [the checkpoint folder, else the current one].")
@click.option("--max-batches", type=int, default=None, help="Evaluate only this many batches.")
@_recipe_options
@_one_line_errors
def evaluate(ckpt: Path | None, data_root: Path | None, data: str | None, out: Path | None,
             max_batches: int | None, recipe: str | None, overrides: tuple[str, ...], weights: Path | None,
             encoder_weights: Path | None) -> None:
    """Evaluate checkpoint CKPT (or --recipe NAME --weights FILE): print and write the metric table
    with Δm."""
    keep_freed_memory()  # as in training: every batch reuses the same large buffers
    device = "cuda" if torch.cuda.is_available() else "cpu"
    roots: list[Path] = []
    model, cfg, step = _resolve(ckpt, recipe, weights, encoder_weights, overrides, device,
                                before_load=lambda c: roots.append(resolve_data_root(c, data_root, data, click.echo)))
    eval_set = build_eval_set(cfg, roots[0], model_normalization(model))
    result = evaluate_recipe(cfg, model, eval_set, device=device, max_batches=max_batches)
    click.echo(f"{cfg.name} at step {step}:")
    click.echo(format_table(result))
    if out is None:
        out = resolve_checkpoint(ckpt) if ckpt is not None else Path(".")
    paths = write_result(result, out)
    click.echo(f"wrote {paths[0]} and {paths[1]}")


@click.command("predict")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="[CKPT] IMAGE...")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@_recipe_options
@_one_line_errors
def predict(paths: tuple[Path, ...], out: Path, recipe: str | None, overrides: tuple[str, ...],
            weights: Path | None, encoder_weights: Path | None) -> None:
    """Write one PNG per task per IMAGE, and a side-by-side sheet, into --out. The model comes from
    checkpoint CKPT, or from --recipe NAME --weights FILE (then every path is an image)."""
    ckpt, images = (None, paths) if weights is not None else (paths[0], paths[1:])
    if not images:
        raise ValueError("no IMAGE given: mtssm predict CKPT IMAGE... --out DIR")
    if ckpt is not None and not ckpt.exists():
        raise FileNotFoundError(f"checkpoint {str(ckpt)!r} does not exist")
    for image in images:  # before loading anything
        if not image.is_file():
            raise FileNotFoundError(f"image {str(image)!r} does not exist")
    model, _, _ = _resolve(ckpt, recipe, weights, encoder_weights, overrides)
    files = predict_images(model, images, out)
    click.echo(f"wrote {len(files)} files for {len(output_stems(images))} images to {out}")


@click.command("export")
@click.argument("ckpt", required=False, type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output .pt2 file.")
@click.option("--size", default=None, metavar="HxW", help="Input size [the recipe's, rounded to 32].")
@click.option("--format", "fmt", type=click.Choice(["program", "aoti"]), default="program",
              help="program: torch.export (needs Python and mtssm); aoti: AOTInductor package for C++.")
@_recipe_options
@_one_line_errors
def export(ckpt: Path | None, out: Path, size: str | None, fmt: str, recipe: str | None,
           overrides: tuple[str, ...], weights: Path | None, encoder_weights: Path | None) -> None:
    """Export checkpoint CKPT (or --recipe NAME --weights FILE) with torch.export, or compile it with
    AOTInductor (--format aoti); the input statistics travel with the program."""
    hw = None
    if size is not None:
        try:
            h, w = (int(v) for v in size.lower().split("x"))
        except ValueError:
            raise ValueError(f"--size: expected HxW like 96x128, got {size!r}") from None
        hw = (h, w)
    check_export_target(out, fmt)
    model, cfg, _ = _resolve(ckpt, recipe, weights, encoder_weights, overrides)
    path = export_model(model, cfg, out, size=hw, format=fmt)
    click.echo(f"wrote {path}")
    if fmt == "aoti":
        click.echo("build and run the C++ program (no Python in its process):")
        for line in deploy_commands(path):
            click.echo(f"  {line}")


@click.command("models")
@click.option("--pattern", default=None, help="Shell pattern filtering the names, e.g. '*_tiny'.")
@_one_line_errors
def models(pattern: str | None) -> None:
    """List the registered models with their parameter counts (counted on the meta device)."""
    names = list_models(pattern)
    width = max((len(n) for n in names), default=0)
    for name in names:
        try:
            with torch.device("meta"):  # no memory, no initialisation
                model = create_model(name, echo=None)
        except (NotImplementedError, RuntimeError):  # a constructor that reads tensor values
            model = create_model(name, echo=None)
        n = sum(p.numel() for p in model.parameters())
        click.echo(f"{name.ljust(width)}  {n / 1e6:9.2f} M parameters")

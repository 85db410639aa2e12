"""``mtssm data render`` and ``mtssm data check``."""

from __future__ import annotations

import sys
import time

import click

__all__ = ["data"]


def _parse_size(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"expected HxW such as 448x576, got {value!r}") from None
    if h < 8 or w < 8:
        raise click.BadParameter(f"H and W must be >= 8, got {value!r}")
    return h, w


@click.group("data")
def data() -> None:
    """Datasets: render scenes in a real layout, check a copy of a dataset."""


@data.command("render")
@click.option("--layout", type=click.Choice(["nyud", "pascal", "cityscapes"]), default="nyud", show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Output folder.")
@click.option("--n", type=click.IntRange(min=1), default=200, show_default=True, help="Number of scenes.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--size", default="448x576", show_default=True, callback=_parse_size, help="HxW.")
@click.option("--processes", type=click.IntRange(min=1), default=None, help="Worker processes (default 2).")
def render(layout: str, out_dir: str, n: int, seed: int, size: tuple[int, int], processes: int | None) -> None:
    """Render N procedural indoor scenes into OUT in the LAYOUT of a real dataset."""
    from mtssm.data.render import render_scenes

    start = time.perf_counter()
    path = render_scenes(out_dir, layout=layout, n=n, seed=seed, size=size, processes=processes)
    seconds = time.perf_counter() - start
    click.echo(f"rendered {n} {layout} scenes at {size[0]}x{size[1]} into {path} in {seconds:.1f} s")


@data.command("check")
@click.argument("root", type=click.Path())
@click.option("--layout", type=click.Choice(["nyud", "pascal", "cityscapes"]), required=True)
def check(root: str, layout: str) -> None:
    """List every missing, unreadable, mis-sized or out-of-range file of the dataset at ROOT."""
    from mtssm.data.check import check_dataset

    problems = check_dataset(root, layout)
    for line in problems:
        click.echo(line)
    if problems:
        click.echo(f"{len(problems)} problem(s) found in {root}", err=True)
        sys.exit(1)
    click.echo(f"{root}: no problems found ({layout} layout)")

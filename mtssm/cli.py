"""The ``mtssm`` command line: ``mtssm --version``, ``mtssm info``, ``mtssm recipe ...``, ``mtssm data ...``."""

from __future__ import annotations

import sys

import click

from mtssm import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mtssm")
def main() -> None:
    """Multi-task dense prediction with state-space decoders."""


@main.command("info")
def info() -> None:
    """Versions, the scan kernels available on this machine and the path of the op library."""
    import platform

    import torch

    from mtssm import _ops

    click.echo(f"mtssm {__version__}")
    click.echo(f"torch {torch.__version__}")
    click.echo(f"python {platform.python_version()} ({sys.executable})")
    try:
        import triton

        click.echo(f"triton {triton.__version__}")
    except ImportError:
        click.echo("triton not installed")
    click.echo("scan kernels:")
    for name, state in _ops.scan_kernels().items():
        click.echo(f"  {name}: {state}")
    try:
        click.echo(f"ops library: {_ops.library_path()}")
    except RuntimeError as exc:
        click.echo(f"ops library: none ({exc})")


def _register_subcommands() -> None:
    """Attach the sub-command groups. Each lives in its own module and is imported lazily here."""
    from importlib import import_module

    for module_name, attr in _SUBCOMMANDS:
        try:
            module = import_module(module_name)
        except ModuleNotFoundError as exc:  # a sub-package not present in this build
            if exc.name != module_name:
                raise
            continue
        main.add_command(getattr(module, attr))


# (module, click command attribute) pairs, an explicit list rather than import side effects.
_SUBCOMMANDS: list[tuple[str, str]] = [
    ("mtssm.data.cli", "data"),
    ("mtssm.engine.cli", "recipe"),
    ("mtssm.engine.cli", "evaluate"),
    ("mtssm.engine.cli", "predict"),
    ("mtssm.engine.cli", "export"),
    ("mtssm.engine.cli", "models"),
]

_register_subcommands()

if __name__ == "__main__":  # pragma: no cover
    main()

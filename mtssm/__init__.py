"""mtssm: multi-task dense scene understanding with state-space (Mamba) decoders.

Importing :mod:`mtssm` registers the ``torch.ops.mtssm`` custom operators, which is also what a
program saved with :func:`torch.export.save` needs before :func:`torch.export.load`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mtssm")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

from mtssm._ops import scan_backend  # noqa: E402  (registers torch.ops.mtssm.*)

__all__ = ["__version__", "scan_backend"]

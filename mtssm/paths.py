"""Where mtssm keeps its caches: built C++ kernels, rendered scenes.

``$MTSSM_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/mtssm``, else ``~/.cache/mtssm``. Nothing is
ever written into a dataset folder.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """The root folder of mtssm's caches (not created here)."""
    root = os.environ.get("MTSSM_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(xdg) / "mtssm"

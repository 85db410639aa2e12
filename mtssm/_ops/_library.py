"""The op library: ``csrc/selective_scan_cpu.cpp`` built as a plain shared library, and loaded.

The library defines the scan ops (``TORCH_LIBRARY(mtssm, m)``) and their CPU kernels
(``TORCH_LIBRARY_IMPL(mtssm, CPU, m)``). It has no Python module: any process with libtorch loads
it with ``torch.ops.load_library(path)`` (a C++ program, with ``torch::ops::load_library`` or
``dlopen``), and :func:`library_path` says where it is.

It is built where it runs, with ``-march=native``, into a folder of the cache
(``mtssm.paths.cache_dir() / "ops"``) keyed by the source, the compiler flags, the torch version
and the instruction set that ``-march=native`` selects on this machine (:func:`isa_fingerprint`),
so a cache shared by machines with different CPUs (a home directory on a cluster) holds one build
per instruction set and never loads a binary built for another CPU. The first import of mtssm on a
machine builds it (about a minute on 2 cores) and prints one line saying so; the compiled file is
written under a temporary name and renamed into place, so processes building at the same time
never load a partial file.

Where no C++ compiler is available, the build fails, or ``MTSSM_DISABLE_CPP=1``, nothing is
loaded: :mod:`mtssm._ops.selective_scan` then defines the same ops from Python, with the schemas
read from the C++ source (:func:`schemas`), so the signatures are written in one place.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import torch
from torch.utils import cpp_extension

from mtssm.paths import cache_dir

__all__ = ["SOURCE", "build_dir", "isa_fingerprint", "library_path", "load", "schemas"]

_log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("csrc") / "selective_scan_cpu.cpp"
_LIB_NAME = "libmtssm_ops.so"
_CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-std=c++17", "-fPIC"]
_LDFLAGS = ["-shared", "-fopenmp"]  # no -ffast-math here: see _build
_LIBS = ["-lc10", "-ltorch_cpu"]
_lock = threading.Lock()
_loaded: Path | None = None
_failure: str | None = None  # why nothing was loaded, once load() has run


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def isa_fingerprint(cxx: str | None = None) -> str:
    """The instruction set ``-march=native`` selects here: the compiler's predefined macros under
    ``-march=native`` (``__AVX2__``, ``__AVX512F__``, the target CPU, the compiler version), hashed.

    Falls back to the CPU flags of ``/proc/cpuinfo`` where the compiler cannot say.
    """
    try:
        res = subprocess.run(
            [cxx or _compiler(), "-march=native", "-dM", "-E", "-x", "c++", os.devnull],
            capture_output=True, text=True, timeout=60, check=True,
        )
        text = "\n".join(sorted(res.stdout.splitlines()))
    except (OSError, subprocess.SubprocessError):
        try:
            with open("/proc/cpuinfo") as f:
                text = next((line for line in f if line.startswith("flags")), "")
        except OSError:
            text = ""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_dir(isa: str | None = None) -> Path:
    """The cache folder of the library built from this source for the instruction set ``isa``
    (default: this machine's, :func:`isa_fingerprint`)."""
    h = hashlib.sha256()
    h.update(SOURCE.read_bytes())
    h.update(" ".join(_CFLAGS + _LDFLAGS + _LIBS).encode())
    h.update(torch.__version__.encode())
    return cache_dir() / "ops" / f"mtssm_ops-{h.hexdigest()[:12]}-isa-{isa or isa_fingerprint()}"


def _build(target: Path) -> None:
    """Compile :data:`SOURCE` into ``target`` (written under a temporary name, then renamed).

    Compiling and linking are two steps: linking with ``-ffast-math`` would add GCC's
    ``crtfastmath.o``, whose constructor switches the whole process's floating point to
    flush-to-zero the moment the library is loaded.
    """
    torch_lib = cpp_extension.library_paths()[0]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    obj = target.with_name(f"{target.name}.tmp-{os.getpid()}.o")
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    compile_cmd = [
        _compiler(), *_CFLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-I{p}" for p in cpp_extension.include_paths()), "-c", str(SOURCE), "-o", str(obj),
    ]
    link_cmd = [
        _compiler(), *_LDFLAGS, str(obj), "-o", str(tmp),
        f"-L{torch_lib}", *_LIBS, f"-Wl,-rpath,{torch_lib}",
    ]
    try:
        for cmd in (compile_cmd, link_cmd):
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)}\n{res.stderr[-4000:]}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
        obj.unlink(missing_ok=True)


def load() -> Path | None:
    """Load the op library, building it first if this machine has no build of this source yet.

    Returns its path, or ``None`` when it cannot be built or loaded (see :func:`failure`).
    """
    global _loaded, _failure
    if _loaded is not None or _failure is not None:
        return _loaded
    with _lock:
        if _loaded is not None or _failure is not None:
            return _loaded
        try:
            _loaded = _load()
        except Exception as exc:  # a failed build must not break `import mtssm`
            _failure = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            _log.warning("mtssm: the C++ op library is not available (%s); the scan ops run "
                         "their pure-PyTorch implementation on CPU", exc)
        return _loaded


def _load() -> Path:
    if os.environ.get("MTSSM_DISABLE_CPP", "0") == "1":
        raise RuntimeError("disabled by MTSSM_DISABLE_CPP=1")
    if shutil.which(_compiler()) is None:
        raise RuntimeError(f"no C++ compiler ({_compiler()}) found; install one, e.g. "
                           "`apt-get install g++`")
    folder = build_dir()
    target = folder / _LIB_NAME
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        print(f"mtssm: building the C++ op library (once, about a minute) in {folder}",
              file=sys.stderr, flush=True)
        _build(target)
    torch.ops.load_library(str(target))
    return target


def failure() -> str | None:
    """Why :func:`load` loaded nothing (one line), or ``None``."""
    return _failure


def library_path() -> Path:
    """The path of the op library for this machine, built first if needed.

    ``torch.ops.load_library(library_path())`` registers ``torch.ops.mtssm.selective_scan`` and
    ``torch.ops.mtssm.selective_scan_backward`` (schemas and CPU kernels) in a process that never
    imports mtssm; a C++ program loads the same file. Raises ``RuntimeError`` saying why where it
    cannot be built.
    """
    path = load()
    if path is None:
        raise RuntimeError(f"the mtssm op library is not available: {_failure}")
    return path


_DEF_BLOCK = re.compile(r"TORCH_LIBRARY\(mtssm, m\) \{(.*?)\n\}", re.S)
_DEF_CALL = re.compile(r'm\.def\(((?:\s*"[^"]*")+)\s*\)')


def schemas() -> list[str]:
    """The op schemas written in :data:`SOURCE`'s ``TORCH_LIBRARY(mtssm, m)`` block, in order
    (``"selective_scan(Tensor u, ...) -> (...)"``, ...)."""
    block = _DEF_BLOCK.search(SOURCE.read_text())
    if block is None:
        raise RuntimeError(f"{SOURCE}: no TORCH_LIBRARY(mtssm, m) block")
    return ["".join(re.findall(r'"([^"]*)"', call)) for call in _DEF_CALL.findall(block.group(1))]

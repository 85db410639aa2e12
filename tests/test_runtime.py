"""mtssm.runtime: the glibc allocator setting of long CPU runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

_CHILD = """
import ctypes, ctypes.util, platform, resource, sys
from mtssm.runtime import keep_freed_memory
if platform.libc_ver()[0] != "glibc":
    sys.exit(3)
if sys.argv[1] == "keep":
    assert keep_freed_memory()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
n = 64 << 20
a = libc.malloc(n); ctypes.memset(a, 1, n); libc.free(a)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
b = libc.malloc(n); ctypes.memset(b, 1, n)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults_on_reuse(mode: str) -> int:
    """Page faults of touching a 64 MiB block allocated again after an equal one was freed."""
    run = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=False)
    if run.returncode == 3:
        pytest.skip("not glibc")
    assert run.returncode == 0, run.stderr
    return int(run.stdout.strip())


def test_keep_freed_memory_reuses_large_blocks_without_page_faults():
    default = _faults_on_reuse("default")  # glibc unmapped the block: its pages fault in again
    kept = _faults_on_reuse("keep")  # kept by the process: the pages are already there
    assert default > 0 and kept * 10 < default, (default, kept)

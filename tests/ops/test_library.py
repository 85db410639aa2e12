"""The op library (schemas and CPU kernels in C++), its build cache, the fakes' shape checks and
the scan_backend override."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch._subclasses.fake_tensor import FakeTensorMode

import mtssm
from mtssm._ops import _library
from mtssm._ops.scan_inputs import ScanInputs
from mtssm._ops.selective_scan import LIBRARY_PATH, scan_fwd_torch, selective_scan_ref

REPO = Path(__file__).resolve().parents[2]
needs_library = pytest.mark.skipif(LIBRARY_PATH is None, reason="the C++ op library is not built")


def _op_inputs(seed: int = 0) -> ScanInputs:
    """A small 1-D scan in the op's layout (K = 1), every optional input present."""
    g = torch.Generator().manual_seed(seed)
    b, d, L, N, G = 2, 4, 9, 3, 2
    return ScanInputs(
        u=torch.randn(b, d, L, generator=g),
        delta=torch.rand(b, 1, d, L, generator=g),
        A=-torch.rand(1, d, N, generator=g) - 0.5,
        B=torch.randn(b, 1, G, N, L, generator=g),
        C=torch.randn(b, 1, G, N, L, generator=g),
        D=torch.randn(1, d, generator=g),
        z=torch.randn(b, d, L, generator=g),
        delta_bias=torch.randn(1, d, generator=g),
        initial_state=torch.randn(b, 1, d, N, generator=g),
        perm=None,
        delta_softplus=True,
        chunk_size=4,
    )


def _reference(x: ScanInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The package reference on the op's K = 1 inputs: (out, last_state (batch, 1, dim, N))."""
    out, last = selective_scan_ref(
        x.u, x.delta[:, 0], x.A[0], x.B[:, 0], x.C[:, 0], x.D[0], x.z, x.delta_bias[0],
        x.delta_softplus, True, x.initial_state[:, 0],
    )
    return out, last[:, None]


def _cpu_kernel_source() -> str:
    table = torch._C._dispatch_dump_table("mtssm::selective_scan")
    return next(line for line in table.splitlines() if line.startswith("CPU:"))


# ----------------------------------------------------------------------------------------------
# schemas: one definition, in the C++ source
# ----------------------------------------------------------------------------------------------


def test_registered_schemas_are_the_cpp_sources():
    parsed = [str(torch._C.parse_schema(f"mtssm::{s}")) for s in _library.schemas()]
    registered = [str(torch.ops.mtssm.selective_scan.default._schema),
                  str(torch.ops.mtssm.selective_scan_backward.default._schema)]
    assert parsed == registered


def test_without_the_library_python_defines_the_same_ops(tmp_path):
    """MTSSM_DISABLE_CPP=1: the ops are defined from the C++ file's schemas and run the
    pure-PyTorch path, with the same results."""
    x = _op_inputs()
    script = textwrap.dedent(
        """
        import sys, torch, mtssm
        from mtssm._ops.selective_scan import LIBRARY_PATH
        assert LIBRARY_PATH is None
        x = torch.load(sys.argv[1])
        print(torch.ops.mtssm.selective_scan.default._schema)
        print(torch.ops.mtssm.selective_scan_backward.default._schema)
        torch.save(torch.ops.mtssm.selective_scan(*x), sys.argv[2])
        """
    )
    torch.save(x.op_args(), tmp_path / "args.pt")
    env = dict(os.environ, MTSSM_DISABLE_CPP="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path / "args.pt"),
                          str(tmp_path / "out.pt")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out, last, _, _ = torch.load(tmp_path / "out.pt")
    assert res.stdout.splitlines()[-2:] == [str(torch.ops.mtssm.selective_scan.default._schema),
                                            str(torch.ops.mtssm.selective_scan_backward.default._schema)]
    want_out, want_last = _reference(x)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, want_last, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# the library on its own
# ----------------------------------------------------------------------------------------------


@needs_library
def test_library_runs_in_a_process_that_never_imports_mtssm(tmp_path):
    x = _op_inputs()
    torch.save(x.op_args(), tmp_path / "args.pt")
    script = textwrap.dedent(
        """
        import sys, torch
        torch.ops.load_library(sys.argv[1])
        print(torch.ops.mtssm.selective_scan)
        args = torch.load(sys.argv[2])
        torch.save(torch.ops.mtssm.selective_scan(*args), sys.argv[3])
        assert not any(m == "mtssm" or m.startswith("mtssm.") for m in sys.modules), "imported mtssm"
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [sys.executable, "-c", script, str(mtssm._ops.library_path()), str(tmp_path / "args.pt"),
         str(tmp_path / "out.pt")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "mtssm.selective_scan" in res.stdout
    out, last, chunk_states, pregate = torch.load(tmp_path / "out.pt")
    want_out, want_last = _reference(x)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, want_last, rtol=1e-5, atol=1e-5)
    assert chunk_states.shape == (2, 1, 4, 3, 3) and pregate.shape == x.u.shape


@needs_library
def test_library_path_is_the_loaded_file():
    path = mtssm._ops.library_path()
    assert path == LIBRARY_PATH and path.is_file()
    assert path.parent == _library.build_dir()
    assert "selective_scan_cpu.cpp" in _cpu_kernel_source()


@needs_library
def test_loading_the_library_keeps_subnormal_floats():
    """The library is compiled with -ffast-math but not linked with it (GCC's crtfastmath.o would
    switch the whole process to flush-to-zero when the library is loaded)."""
    assert sys.float_info.min / 2 > 0
    tiny = torch.tensor([1e-38], dtype=torch.float32)
    assert (tiny / 100).item() > 0


def test_build_folder_is_keyed_by_the_instruction_set():
    """A cache shared by machines with different CPUs keeps one build per instruction set."""
    a, b = _library.build_dir(isa="avx2-machine"), _library.build_dir(isa="avx512-machine")
    assert a != b and a.parent == b.parent
    assert _library.build_dir(isa="avx2-machine") == a
    assert _library.build_dir() == _library.build_dir(isa=_library.isa_fingerprint())


def test_isa_fingerprint_follows_what_the_compiler_targets(tmp_path):
    """The fingerprint is what ``-march=native`` makes the compiler target: a compiler that
    reports other target macros gives another fingerprint."""
    if os.name != "posix":
        pytest.skip("shell-script stand-in compiler")
    fingerprints = []
    for macros in ("#define __AVX2__ 1", "#define __AVX2__ 1\n#define __AVX512F__ 1"):
        fake = tmp_path / f"cxx{len(fingerprints)}"
        fake.write_text(f"#!/bin/sh\nprintf '%s\\n' '{macros}'\n")
        fake.chmod(0o755)
        fingerprints.append(_library.isa_fingerprint(str(fake)))
    assert fingerprints[0] != fingerprints[1]
    assert _library.isa_fingerprint() == _library.isa_fingerprint()


# ----------------------------------------------------------------------------------------------
# fakes: every shape checked, the tensor named
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, bad, message",
    [
        ("u", lambda x: x.u[0], r"u must be \(batch, dim, L\)"),
        ("delta", lambda x: x.delta[..., :-1], r"delta must be \(batch, K, dim, L\)"),
        ("A", lambda x: x.A[:, :-1], r"A must be real \(K, dim, N\)"),
        ("B", lambda x: x.B[..., :-1, :], r"B must be \(batch, K, G, N, L\)"),
        ("C", lambda x: x.C[:, :, :1].expand(-1, -1, 3, -1, -1), r"divisible by the groups G = 3 of C"),
        ("D", lambda x: x.D[:, :-1], r"D must be \(K, dim\)"),
        ("z", lambda x: x.z[..., :-1], r"z must be \(batch, dim, L\)"),
        ("delta_bias", lambda x: x.delta_bias[None], r"delta_bias must be \(K, dim\)"),
        ("initial_state", lambda x: x.initial_state[..., :-1], r"initial_state must be"),
        ("perm", lambda x: torch.zeros(1, 8, dtype=torch.long), r"perm must be an integer tensor \(K, L\)"),
        ("u", lambda x: x.u.long(), r"u must be float16, bfloat16, float32 or float64"),
    ],
)
def test_fake_checks_every_shape(field, bad, message):
    x = _op_inputs()
    args = dict(zip([f for f in ScanInputs.__dataclass_fields__], x.op_args()))
    args[field] = bad(x)
    mode = FakeTensorMode()
    with mode:
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        with pytest.raises((ValueError, TypeError), match=message) as info:
            torch.ops.mtssm.selective_scan(*fake.values())
    assert "\n" not in str(info.value)


def test_fake_backward_checks_its_own_inputs():
    x = _op_inputs()
    out, last, chunk_states, pregate = torch.ops.mtssm.selective_scan(*x.op_args())
    short = chunk_states[:, :, :, :2].clone()
    mode = FakeTensorMode()
    with mode:
        f = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in x.op_args()]
        ok = (mode.from_tensor(out), mode.from_tensor(last), *f[:10], mode.from_tensor(chunk_states),
              mode.from_tensor(pregate), True, 4)
        grads = torch.ops.mtssm.selective_scan_backward(*ok)
        assert [g.shape for g in grads] == [t.shape for t in x.grad_inputs()]
        bad = (ok[0], ok[1], *ok[2:12], mode.from_tensor(short), *ok[13:])
        with pytest.raises(ValueError, match=r"chunk_states must be \(batch, K, dim, n_chunks, N\)"):
            torch.ops.mtssm.selective_scan_backward(*bad)


@needs_library
def test_cpp_kernel_names_the_tensor_in_its_own_checks():
    """A libtorch-only caller gets the same checks from the C++ wrapper."""
    x = _op_inputs()
    args = list(x.op_args())
    args[1] = x.delta[..., :-1]
    with pytest.raises(RuntimeError, match=r"delta must be \(batch, K, dim, L\) like u"):
        torch.ops.mtssm.selective_scan(*args)


# ----------------------------------------------------------------------------------------------
# scan_backend: a scoped kernel registration, not a branch in the op
# ----------------------------------------------------------------------------------------------


@needs_library
def test_scan_backend_swaps_the_kernel_for_the_block_only():
    x = _op_inputs()
    assert "selective_scan_cpu.cpp" in _cpu_kernel_source()
    with mtssm.scan_backend("torch"):
        assert "selective_scan_cpu.cpp" not in _cpu_kernel_source()
        got = torch.ops.mtssm.selective_scan(*x.op_args())
    assert "selective_scan_cpu.cpp" in _cpu_kernel_source()
    for a, b in zip(got, scan_fwd_torch(x)):
        assert torch.equal(a, b)


def test_scan_backend_blocks_do_not_nest():
    with mtssm.scan_backend("torch"):
        with pytest.raises(RuntimeError, match="do not nest"):
            with mtssm.scan_backend("torch"):
                pass
    with mtssm.scan_backend("torch"):  # the guard was released
        pass


def test_compiled_graph_follows_the_override():
    x = _op_inputs()
    fn = torch.compile(lambda *a: torch.ops.mtssm.selective_scan(*a)[0], fullgraph=True,
                       backend="aot_eager")
    default = fn(*x.op_args())
    with mtssm.scan_backend("torch"):
        assert torch.equal(fn(*x.op_args()), scan_fwd_torch(x)[0])
    torch.testing.assert_close(default, scan_fwd_torch(x)[0], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# mtssm info
# ----------------------------------------------------------------------------------------------


def test_info_prints_versions_kernels_and_the_library_path():
    from mtssm.cli import main

    res = CliRunner().invoke(main, ["info"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert any(line.startswith(f"mtssm {mtssm.__version__}") for line in lines)
    assert any(line.startswith(f"torch {torch.__version__}") for line in lines)
    assert any(line.startswith("python ") for line in lines)
    for name in mtssm._ops.SCAN_BACKENDS:
        assert any(line.strip().startswith(f"{name}:") for line in lines), name
    (lib_line,) = [line for line in lines if line.startswith("ops library:")]
    if LIBRARY_PATH is not None:
        assert lib_line == f"ops library: {LIBRARY_PATH}"

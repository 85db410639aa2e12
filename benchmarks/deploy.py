"""Inference latency and peak memory of each tiny model deployed four ways, against eager.

Run from the repository root (the C++ program is built with CMake first)::

    python benchmarks/deploy.py                        # every *_tiny model, 448x576, batch 1
    python benchmarks/deploy.py --models msm_tiny --iters 5 --workdir /tmp/deploy-bench

Per model, in one run: eager PyTorch, the ``torch.export`` program (``mtssm export``), the
AOTInductor package run from Python (``torch._inductor.aoti_load_package``) and the C++ program
``deploy/cpp`` (``mtssm_run``) on a PNG of the same size. Each runs in its own process, so the
peak memory is that process's resident-set high-water mark (``ru_maxrss`` from ``wait4`` in a bare
launcher process, so that it does not inherit this one's: the interpreter, libraries, weights and
activations, everything the deployment would hold). Latency is
the median over ``--iters`` runs after one warm-up run; for the C++ program, the run time it prints
per image, images after the first. Every way's outputs are checked against eager (relative L2
error). Exporting and compiling take minutes per model on 2 cores: programs and packages are kept
in ``--workdir`` and reused for the same model, size and torch version (``--rebuild`` after
changing the code).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
MODES = ("eager", "program", "aoti", "cpp")


def _child(mode: str, folder: Path, iters: int, threads: int) -> None:
    """Run one way ``iters + 1`` times in this process; print its median latency as JSON."""
    import mtssm  # noqa: F401  (registers the ops for the program and the package)
    from mtssm.nn import create_model

    torch.set_num_threads(threads)
    spec = json.loads((folder / "spec.json").read_text())
    x = torch.load(folder / "input.pt")
    if mode == "eager":
        model = create_model(spec["model"]).eval()
        model.load_state_dict(torch.load(folder / "weights.pt"))
        run = model.forward_dict
    elif mode == "program":
        run = torch.export.load(folder / "program.pt2").module()
    else:
        run = torch._inductor.aoti_load_package(str(folder / "package.pt2"))
    times = []
    with torch.inference_mode():
        for i in range(iters + 1):
            t0 = time.perf_counter()
            out = run(x)
            times.append(time.perf_counter() - t0)
            if i == 0:
                torch.save({k: v.clone() for k, v in dict(out).items()}, folder / f"out_{mode}.pt")
    print(json.dumps({"latency": statistics.median(times[1:])}))


# Linux keeps the larger of a process's own peak RSS and that of the memory it replaced at exec:
# a child forked from this process (which holds models, programs and the compiler) would report at
# least this process's peak. A bare interpreter (``-S``, a few MiB) forks and execs each measured
# command instead and reports its ``ru_maxrss`` (KiB) on the last line of stderr.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execve(sys.argv[1], sys.argv[1:], os.environ)
_, status, usage = os.wait4(pid, 0)
sys.stderr.write("\\nmaxrss_kib %d\\n" % usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _run_child(cmd: list[str], env: dict[str, str] | None = None) -> tuple[str, float]:
    """Run ``cmd`` to completion; return (stdout, peak RSS in MiB of that process alone)."""
    proc = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, *map(str, cmd)], capture_output=True, env=env)
    err = proc.stderr.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} ... failed:\n{err[-3000:]}")
    return proc.stdout.decode(), int(err.rsplit("maxrss_kib", 1)[1]) / 1024


def _prepare(name: str, folder: Path, size: tuple[int, int], threads: int, rebuild: bool) -> None:
    """Weights, input, program, package and op library of ``name`` in ``folder`` (reused if current)."""
    from mtssm.engine.export import OPS_LIBRARY_NAME, compile_package, export_program, package_metadata
    from mtssm.nn import create_model
    from mtssm._ops import library_path

    spec = {"model": name, "size": list(size), "torch": torch.__version__}
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(library_path(), folder / OPS_LIBRARY_NAME)
    spec_file = folder / "spec.json"
    if (not rebuild and spec_file.is_file() and json.loads(spec_file.read_text()) == spec
            and (folder / "package.pt2").is_file()):
        print(f"{name}: reusing the program and package in {folder}", flush=True)
        return
    torch.manual_seed(0)
    model = create_model(name).eval()
    torch.save(model.state_dict(), folder / "weights.pt")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    from PIL import Image

    from mtssm.data.constants import IMAGENET_MEAN, IMAGENET_STD

    Image.fromarray(pixels).save(folder / "input.png")
    x = torch.from_numpy(pixels.astype(np.float32) / 255).permute(2, 0, 1)
    x = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.save(x[None].contiguous(), folder / "input.pt")
    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    program = export_program(model, x[None])
    torch.export.save(program, folder / "program.pt2")
    t1 = time.perf_counter()
    compile_package(program, folder / "package.pt2", package_metadata(program, name))
    print(f"{name}: exported in {t1 - t0:.0f} s, AOTInductor-compiled in {time.perf_counter() - t1:.0f} s",
          flush=True)
    spec_file.write_text(json.dumps(spec))


def _build_cpp(build: Path) -> Path:
    from torch.utils import cmake_prefix_path

    cmake = shutil.which("cmake") or str(Path(sys.executable).with_name("cmake"))
    subprocess.run([cmake, "-S", str(REPO / "deploy" / "cpp"), "-B", str(build),
                    f"-DCMAKE_PREFIX_PATH={cmake_prefix_path}"], check=True, capture_output=True)
    subprocess.run([cmake, "--build", str(build)], check=True, capture_output=True)
    return build / "mtssm_run"


def _rel_err(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    return max(float((out[k].double() - ref[k].double()).norm() / ref[k].double().norm()) for k in ref)


def main() -> None:
    from mtssm.nn import list_models

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=list_models("*_tiny"))
    parser.add_argument("--size", default="448x576", metavar="HxW")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--workdir", type=Path, default=REPO / "build" / "deploy-bench")
    parser.add_argument("--rebuild", action="store_true", help="Rebuild the kept programs and packages.")
    parser.add_argument("--child", choices=MODES[:3], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.folder, args.iters, args.threads)
        return
    size = tuple(int(v) for v in args.size.lower().split("x"))
    binary = _build_cpp(args.workdir / "cpp")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    rows = []
    for name in args.models:
        folder = args.workdir / name
        _prepare(name, folder, size, args.threads, args.rebuild)
        latency, peak, err = {}, {}, {}
        for mode in MODES[:3]:
            out, peak[mode] = _run_child([sys.executable, __file__, "--child", mode, "--folder", str(folder),
                                          "--iters", str(args.iters), "--threads", str(args.threads)], env)
            latency[mode] = json.loads(out.strip().splitlines()[-1])["latency"]
        images = [str(folder / "input.png")] * (args.iters + 1)
        out, peak["cpp"] = _run_child([str(binary), str(folder / "package.pt2"), *images, "--out",
                                       str(folder / "cpp_out"), "--npy", "--threads", str(args.threads)],
                                      {"PATH": "/usr/bin:/bin"})
        latency["cpp"] = statistics.median(float(line.rsplit(":", 1)[1].split()[0]) / 1000
                                           for line in out.strip().splitlines()[1:])
        ref = torch.load(folder / "out_eager.pt")
        outs = {m: torch.load(folder / f"out_{m}.pt") for m in ("program", "aoti")}
        outs["cpp"] = {k: torch.from_numpy(np.load(folder / "cpp_out" / f"input_{k}.npy"))[None] for k in ref}
        err = {m: _rel_err(o, ref) for m, o in outs.items()}
        rows.append((name, latency, peak, err))
        print(f"{name}: " + ", ".join(f"{m} {latency[m] * 1e3:.0f} ms / {peak[m]:.0f} MiB" for m in MODES)
              + "; max relative error vs eager " + ", ".join(f"{m} {e:.1e}" for m, e in err.items()),
              flush=True)

    print(f"\n{size[0]}x{size[1]}, batch 1, {args.threads} threads; latency (median of {args.iters} after "
          "a warm-up) and peak RSS of the process, ratios against eager\n")
    print("| model | eager | torch.export program | AOTInductor (Python) | C++ program | eager peak RSS "
          "| program | AOTInductor (Python) | C++ program |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, latency, peak, _ in rows:
        lat = " | ".join(f"{latency[m] * 1e3:.0f} ms ({latency[m] / latency['eager']:.2f}x)" for m in MODES[1:])
        mem = " | ".join(f"{peak[m]:.0f} MiB ({peak[m] / peak['eager']:.2f}x)" for m in MODES[1:])
        print(f"| {name} | {latency['eager'] * 1e3:.0f} ms | {lat} | {peak['eager']:.0f} MiB | {mem} |")


if __name__ == "__main__":
    main()

"""Throughput of the NYUD train pipeline at 448x576: decode + scale/crop + flip + photometric +
normalise + collate to TensorDict, in ``--workers`` worker processes.

    python benchmarks/data.py [--workers 2] [--batch-size 8] [--epochs 5] [--scenes 48]

Renders ``--scenes`` NYUD-layout scenes into a temporary folder first, then runs ``--epochs`` full
epochs through :func:`mtssm.data.make_dataloader`. Prints:

- images/s of the full pipeline (wall clock, worker start-up included);
- the baseline measured in the same run: images/s of decoding alone in one process;
- CPU milliseconds per image (workers + main process), and the throughput that CPU cost allows
  on ``--workers`` idle cores - the figure to read on a machine shared with other jobs, where the
  wall-clock rate only reflects this run's share of the cores;
- the main process's part of that CPU time (receiving the compact batches from the workers and
  converting them to float / int64 tensors, see :func:`mtssm.data.loader.finalize_batch`).
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import tempfile
import time

from mtssm.data import NYUDv2, build_dataset, make_dataloader, render_scenes


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--scenes", type=int, default=48)
    args = parser.parse_args()
    size = (448, 576)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        root = render_scenes(tmp, layout="nyud", n=args.scenes, seed=0, size=size, val_fraction=0.0)
        print(f"rendered {args.scenes} scenes at {size[0]}x{size[1]} in {time.perf_counter() - start:.1f} s")

        raw = NYUDv2(root, "train")
        n_raw = min(len(raw), 24)
        start = time.perf_counter()
        for i in range(n_raw):
            raw[i]
        decode_ips = n_raw / (time.perf_counter() - start)

        dataset = build_dataset("nyud", root, "train", train=True, crop_size=size)
        loader = make_dataloader(dataset, args.batch_size, train=True, num_workers=args.workers, seed=0)
        n_images = 0
        cpu0, main0, wall0 = _children_cpu(), time.process_time(), time.perf_counter()
        for _ in range(args.epochs):
            for batch in loader:
                n_images += batch.batch_size[0]
        wall = time.perf_counter() - wall0
        del batch, loader  # persistent workers exit here, so their CPU time is counted
        gc.collect()
        main_cpu = time.process_time() - main0
        cpu = _children_cpu() - cpu0 + main_cpu
    cpu_ms = 1000 * cpu / n_images
    main_ms = 1000 * main_cpu / n_images
    cores = max(args.workers, 1)
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"decode only, 1 process:                 {decode_ips:7.1f} images/s (baseline)")
    print(f"train pipeline, {args.workers} workers, batch {args.batch_size}:  {n_images / wall:7.1f} images/s "
          f"({n_images / wall / decode_ips:.2f}x baseline), {n_images} images")
    print(f"CPU per image (workers + main):         {cpu_ms:7.1f} ms -> {1000 * cores / cpu_ms:.1f} images/s "
          f"on {cores} idle cores")
    print(f"  of which in the main process:         {main_ms:7.1f} ms")


if __name__ == "__main__":
    main()

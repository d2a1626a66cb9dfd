"""Two or more builds of the kernels against each other, in one process: decode (one-token matvec)
GB/s of each shape streamed from memory, the builds' calls alternated round after round so every
build meets the same moments of a shared machine (on a VM, separate runs of one build differ by
more than most changes do). Each build is a `runtime/_kernels*.so` file, e.g. the tree's before
a change, copied aside, and after it. Prints each build's best GB/s and its ratio to the first's,
and whether the outputs are identical.

    python bench/ab_kernels.py before.so after.so --shapes q4_k:2048:5632,q6_k:2048:5632 [--threads 2]
"""
from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import numpy as np

from bench_kernels import STREAM_BYTES, streamed_copies


def load_build(path: str, index: int, threads: int):
    """The kernels module of the build at `path`, under a name of its own."""
    spec = importlib.util.spec_from_file_location(f"build{index}._kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.set_threads(threads)
    return module


def compare(builds, dtype: str, rows: int, cols: int, rounds: int, rng) -> str:
    copies, nbytes = streamed_copies(dtype, rows, cols, rng)
    x = rng.standard_normal(cols).astype(np.float32)
    matrices = [[build.Matrix(c) for c in copies] for build in builds]
    outputs = [build.matmul(m[0], x) for build, m in zip(builds, matrices)]
    best = [float("inf")] * len(builds)
    for _ in range(rounds):
        for k, (build, ms) in enumerate(zip(builds, matrices)):
            start = time.perf_counter()
            for m in ms:
                build.matmul(m, x)
            best[k] = min(best[k], time.perf_counter() - start)
    rates = "  ".join(f"{len(copies) * nbytes / b / 1e9:5.1f} GB/s {best[0] / b:.3f}x" for b in best)
    same = all(np.array_equal(outputs[0], o) for o in outputs)
    return f"{dtype} {rows}x{cols}: {rates}  outputs {'identical' if same else 'DIFFER'}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("builds", nargs="+", help="_kernels .so files; ratios are to the first")
    p.add_argument("--shapes", default="q4_k:2048:5632,q6_k:2048:5632,q4_k:2048:2048,q6_k:2048:2048",
                   help="comma-separated dtype:rows:cols (default: the 1.1B llama's down and attention shapes)")
    p.add_argument("--threads", type=int, default=2, help="threads of every build (default 2)")
    p.add_argument("--rounds", type=int, default=12, help="alternated rounds; each build's best counts (default 12)")
    args = p.parse_args(argv)
    builds = [load_build(path, i, args.threads) for i, path in enumerate(args.builds)]
    print("builds:", ", ".join(Path(b).name for b in args.builds), f"({args.threads} threads, {STREAM_BYTES >> 20} MiB of copies)")
    rng = np.random.default_rng(0)
    for shape in args.shapes.split(","):
        dtype, rows, cols = shape.split(":")
        print(compare(builds, dtype, int(rows), int(cols), args.rounds, rng), flush=True)


if __name__ == "__main__":
    main()

"""Quantizer benchmark: MB/s of float32 input that `blobstore.quant.quantize` turns into each stored
type, on one core (numpy runs these single-threaded), and the round-trip RMSE it reaches.

Speed is the CPU time of the process (so other processes sharing the cores do not count against
it), best of --repeats, and the wall time of that same best run. Input: a --rows x --cols matrix
of weight-like values (normal, with every 97th value 8x larger). Prints a markdown table on
stdout. Not a test: nothing here asserts speed.

    python bench/bench_quantize.py [--rows 2048] [--cols 2048] [--repeats 3]
"""
from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from blobstore import quant
from blobstore.format import DType

TYPES = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2048, help="rows of the random f32 matrix (default 2048)")
    p.add_argument("--cols", type=int, default=2048, help="a multiple of 256")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per type; the best counts (default 3)")
    return p.parse_args(argv)


def weights(rows: int, cols: int) -> np.ndarray:
    x = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32) * 0.02
    x.reshape(-1)[::97] *= 8
    return x


def best_run(x: np.ndarray, label: str, repeats: int):
    """(cpu seconds, wall seconds) of the fastest of `repeats` quantizations, and its planes."""
    best = None
    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        planes = quant.quantize(x, label)
        timing = (time.process_time() - cpu, time.perf_counter() - wall)
        best = timing if best is None or timing[0] < best[0] else best
    return best, planes


def main(argv=None):
    args = parse_args(argv)
    x = weights(args.rows, args.cols)
    mb = x.nbytes / 1e6
    print(f"{args.rows} x {args.cols} float32 ({mb:.0f} MB), {platform.machine()}, numpy {np.__version__}, "
          f"best of {args.repeats}\n")
    print("| type | MB/s (CPU time) | MB/s (wall) | RMSE / std |")
    print("|---|---:|---:|---:|")
    for label in TYPES:
        (cpu, wall), planes = best_run(x, label, args.repeats)
        error = quant.dequantize(planes, args.cols, DType.parse(label)) - x
        print(f"| {label} | {mb / cpu:.0f} | {mb / wall:.0f} | {np.sqrt(np.mean(error ** 2)) / x.std():.4f} |",
              flush=True)


if __name__ == "__main__":
    main()

"""q8_0, q4_0 and q5_0 weights in the planar row layout against rows interleaved eight at a time (interleave8).

Same weights, same activations, one thread: each product timed in the two layouts alternately
(best of --rounds), on Gemma 3 270M's matrix shapes and a 4096 x 4096 one, at a prefill of
--tokens tokens and at one token (decode, the matrix from the cache). Also checks that the
interleaved product equals the scalar path's planar one bit for bit. Not a test: nothing here
asserts speed.

    python bench/bench_layout.py [--tokens 128] [--rounds 20] [--dtypes q8_0,q4_0]
"""
from __future__ import annotations

import argparse
import time
import types

import numpy as np

from blobstore import DType, quant
from blobstore.runtime import kernels as K

SHAPES = [(640, 2048), (2048, 640), (1024, 640), (640, 1024), (4096, 4096)]   # (rows, cols)


def compare(dtype: DType, rows: int, cols: int, n: int, rounds: int, rng) -> str:
    """One markdown row: the product of the same weights in both layouts, best of `rounds`."""
    planes = quant.quantize(rng.standard_normal((rows, cols)).astype(np.float32), dtype.label)
    planar = K.Matrix(types.SimpleNamespace(dtype=dtype, shape=(rows, cols), planes=planes))
    interleaved = K.Matrix(types.SimpleNamespace(dtype=dtype, shape=(rows, cols),
                                                 planes=quant.interleave8(planes, dtype), layout="interleave8"))
    x = rng.standard_normal((n, cols)).astype(np.float32)
    isa = K.get_isa()
    K.set_isa("scalar")
    expected = K.matmul(planar, x[:16])
    K.set_isa(isa)
    exact = np.array_equal(K.matmul(interleaved, x[:16]), expected)
    times = {"rows": float("inf"), "interleave8": float("inf")}
    for _ in range(rounds):   # alternate, so that both see the same machine
        for name, m in (("rows", planar), ("interleave8", interleaved)):
            start = time.perf_counter()
            K.matmul(m, x)
            times[name] = min(times[name], time.perf_counter() - start)
    gflops = {name: 2 * rows * cols * n / t * 1e-9 for name, t in times.items()}
    return (f"| {dtype.label} | {rows} x {cols} | {n} | {times['rows'] * 1e6:.0f} us, {gflops['rows']:.0f} GFLOP/s | "
            f"{times['interleave8'] * 1e6:.0f} us, {gflops['interleave8']:.0f} GFLOP/s | "
            f"{times['rows'] / times['interleave8']:.2f}x | {'yes' if exact else 'NO'} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128, help="tokens of each matrix product (default 128)")
    parser.add_argument("--rounds", type=int, default=20, help="timed calls per layout, alternated; the best counts (default 20)")
    parser.add_argument("--dtypes", default="q8_0,q4_0", help="comma-separated types of format.INTERLEAVED")
    args = parser.parse_args()
    K.set_threads(1)
    rng = np.random.default_rng(0)
    print(f"path {K.get_isa()}, 1 thread")
    print("| type | rows x cols | tokens | rows layout | interleave8 | speedup | == scalar planar |")
    print("|---|---|---:|---:|---:|---:|---|")
    for dtype in map(DType.parse, args.dtypes.split(",")):
        for rows, cols in SHAPES:
            for n in (args.tokens, 1):
                rounds = args.rounds if rows < 4096 else max(2, args.rounds // 5)
                print(compare(dtype, rows, cols, n, rounds, rng), flush=True)


if __name__ == "__main__":
    main()

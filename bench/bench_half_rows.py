"""f16 and bf16 (and interleaved q8_0) products on the 1.1B llama's shapes, this build against another's.

Decode: GB/s of one token's matvec, copies of the matrix (--stream-mib in all) multiplied one after
another so that each is read from memory, as a model's decode reads it. Prefill: GFLOP/s of
--tokens tokens from the cache. With --baseline, the `_kernels` extension built in place in another
checkout (`python setup.py build_ext --inplace` there) is loaded beside this one and the two are
timed alternately, best of two rounds each. Not a test: nothing here asserts speed.

    python bench/bench_half_rows.py [--baseline /path/to/other/checkout] [--tokens 1] [--threads 1,2]
"""
from __future__ import annotations

import argparse
import importlib.util
import time
import types
from pathlib import Path

import numpy as np

from blobstore import DType, quant
from blobstore.runtime import kernels as K

# the 1.1B llama (TinyLlama's shape): q / o, k / v, gate / up, down, the head (rows, cols)
SHAPES = {"qo": (2048, 2048), "kv": (256, 2048), "gate_up": (5632, 2048), "down": (2048, 5632),
          "head": (32000, 2048)}


def baseline_kernels(checkout: Path):
    """The other checkout's extension as a module of its own (its name is not blobstore's)."""
    built = next((checkout / "runtime").glob("_kernels*.so"))
    spec = importlib.util.spec_from_file_location("baseline._kernels", built)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def matrices(kernels, dtype: str, rows: int, cols: int, copies: int) -> tuple[list, int]:
    """`copies` Matrices of the same random weights, and the bytes of one."""
    rng = np.random.default_rng(1)
    values = rng.random((rows, cols), dtype=np.float32) - np.float32(0.5)
    if dtype == "q8_0":
        kind = DType.parse(dtype)
        planes = quant.interleave8(quant.quantize(values, dtype), kind)
        return [kernels.Matrix(types.SimpleNamespace(dtype=kind, shape=(rows, cols), layout="interleave8",
                                                     planes=tuple(p.copy() for p in planes)))
                for _ in range(copies)], sum(p.nbytes for p in planes)
    values = values.astype(np.float16) if dtype == "f16" else (values.view(np.uint32) >> 16).astype(np.uint16)
    return [kernels.Matrix(values.copy(), dtype=dtype) for _ in range(copies)], values.nbytes


def best_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="a checkout with its extension built in place")
    parser.add_argument("--dtypes", default="bf16,f16,q8_0")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--tokens", type=int, default=1, help="1: decode, streamed; more: prefill from the cache")
    parser.add_argument("--threads", default="2")
    parser.add_argument("--stream-mib", type=int, default=768, help="copies of a decode matrix in all (> the LLC)")
    args = parser.parse_args()
    builds = {"this": K} | ({"baseline": baseline_kernels(args.baseline)} if args.baseline else {})
    decode = args.tokens == 1
    for dtype in args.dtypes.split(","):
        for shape in args.shapes.split(","):
            rows, cols = SHAPES[shape]
            nbytes = matrices(K, dtype, rows, cols, 0)[1]
            copies = max(1, (args.stream_mib << 20) // nbytes) if decode else 1
            ms = {name: matrices(kernels, dtype, rows, cols, copies)[0] for name, kernels in builds.items()}
            x = np.random.default_rng(2).standard_normal((args.tokens, cols)).astype(np.float32)
            x = x[0] if decode else x
            work = copies * nbytes / 1e9 if decode else 2e-9 * rows * cols * args.tokens
            rates = {}
            for threads in map(int, args.threads.split(",")):
                for _ in range(2):
                    for name, kernels in builds.items():
                        kernels.set_threads(threads)
                        seconds = best_seconds(lambda: [kernels.matmul(m, x) for m in ms[name]], 3 if decode else 20)
                        rates[name, threads] = max(rates.get((name, threads), 0.0), work / seconds)
            figures = "  ".join(f"{name}@{threads}t {rate:.1f}" for (name, threads), rate in rates.items())
            print(f"{dtype:5} {shape:8} {rows}x{cols}  {figures}  {'GB/s' if decode else 'GFLOP/s'}", flush=True)


if __name__ == "__main__":
    main()

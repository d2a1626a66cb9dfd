"""Quantization quality table of docs/CONVERT.md: bits per weight, mean KL divergence and top-1
agreement with the f32 model's next-token distributions, per --dtype, on the trained checkpoints
of tests/quant_quality.py (the demo model, tiny llama, tiny qwen3) over the held-out text.

Each model is converted with `blob-pack convert --dtype D` (with each type's default --embed-dtype,
or the one given) and run by the runtime's kernels; the reference is the same checkpoint converted
to f32. "bits/weight" counts the 2-D weight matrices, scales included.

    python bench/quant_quality.py [--models "demo model,tiny llama"] [--dtypes q6_k,q8_0] [--embed-dtype q8_0]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from quant_quality import TRAINED, f32_reference, measure  # noqa: E402

DTYPES = ["f32", "f16", "q8_0", "q6_k", "q5_k_m", "q5_k", "q5_1", "q5_0", "q4_k_m", "q4_k", "q4_1", "q4_0"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(TRAINED), help="which of: " + ", ".join(TRAINED))
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated --dtype values to convert and score (default: every one)")
    p.add_argument("--embed-dtype", default=None, help="instead of each --dtype's default")
    args = p.parse_args(argv)
    dtypes = args.dtypes.split(",")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label in args.models.split(","):
            ids, reference = f32_reference(TRAINED[label], Path(tmp))
            results[label] = len(ids), {}
            for dtype in dtypes:
                quality = measure(TRAINED[label], dtype, ids, reference, Path(tmp), args.embed_dtype)
                results[label][1][dtype] = quality
                print(f"{label} {dtype}: {quality.bits:.2f} bits, KLD {quality.kld:.3g}, top-1 {quality.top1:.1%}, "
                      f"worst flip {quality.worst_flip:.3f}", file=sys.stderr, flush=True)
    header = " | ".join(f"{label}, {tokens} tokens: bits | KLD | top-1" for label, (tokens, _) in results.items())
    print(f"| `--dtype` | {header} |")
    print("|---|" + "---:|---:|---:|" * len(results))
    for dtype in dtypes:
        cells = " | ".join(f"{rows[dtype].bits:.2f} | {rows[dtype].kld:.3g} | {rows[dtype].top1:.1%}"
                           for _, rows in results.values())
        print(f"| `{dtype}` | {cells} |")


if __name__ == "__main__":
    main()

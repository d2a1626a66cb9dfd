"""Quantization quality table of docs/CONVERT.md: mean KL divergence and top-1 agreement with the
f32 model's next-token distributions, per --dtype, on the demo model (tests/fixtures/demo-gemma3)
over its held-out text, and on tiny random checkpoints made with transformers' classes (as
tests/conftest.py makes them, 256 wide so the k-quants' 256-value super-blocks fit).

Weights only: every matrix goes through the type `blob-pack convert --dtype D` would store it in
and back to f32 (tests/quant_quality.py); the runtime's f32 forward pass runs the result.
"bits/weight" counts the 2-D weight matrices only, scales included.

    python bench/quant_quality.py [--tiny llama,qwen3]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402

from blobstore.convert import convert  # noqa: E402
from blobstore.format import DType  # noqa: E402
from blobstore.runtime import load  # noqa: E402
from conftest import build_checkpoint  # noqa: E402
from quant_quality import converter_choice, divergence, weights_through  # noqa: E402
from test_demo_model import HELD_OUT  # noqa: E402

DTYPES = ["f32", "f16", "q8_0", "q6_k", "q5_k_m", "q5_k", "q5_1", "q5_0", "q4_k_m", "q4_k", "q4_1", "q4_0"]
FIXTURE = ROOT / "tests" / "fixtures" / "demo-gemma3"
TINY = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


def bits_per_weight(used: dict, shapes: dict) -> float:
    total = sum(np.prod(shapes[n]) for n in used if len(shapes[n]) == 2)
    bits = sum(np.prod(shapes[n]) * DType.parse(t).spec.block_bytes * 8 / DType.parse(t).spec.block
               for n, t in used.items() if len(shapes[n]) == 2)
    return bits / total


def measure(f32_blob: Path, work: Path) -> dict:
    """--dtype → (mean KLD, top-1, bits per weight)."""
    with load(f32_blob) as model:
        ids = model.tokenizer.encode(HELD_OUT)
        reference = model.forward(ids)
        shapes = {info.name: info.shape for info in model.reader.infos()}
    rows = {}
    for dtype in DTYPES:
        out = work / f"{dtype}.blob"
        used = weights_through(f32_blob, out, converter_choice(dtype))
        with load(out) as model:
            kld, top1 = divergence(reference, model.forward(ids))
        rows[dtype] = (kld, top1, bits_per_weight(used, shapes))
        print(f"  {dtype}: {kld:.5f} {top1:.1%}", file=sys.stderr, flush=True)
    return rows, len(ids)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", default="llama,qwen3", help="tests/conftest.py checkpoints to measure too ('' for none)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = {"demo model": FIXTURE}
        for name in filter(None, args.tiny.split(",")):
            folder = work / name
            folder.mkdir()
            build_checkpoint(folder, name, (FIXTURE / "tokenizer.model").read_bytes(), **TINY)
            models[f"tiny {name} (random)"] = folder
        results = {}
        for label, folder in models.items():
            print(label, file=sys.stderr)
            f32_blob = work / f"{label.split()[1]}-f32.blob"
            convert(folder, f32_blob, dtype="f32", quiet=True)
            results[label] = measure(f32_blob, work)
    header = " | ".join(f"{label} ({tokens} tokens) KLD | top-1" for label, (_, tokens) in results.items())
    print(f"| --dtype | bits/weight | {header} |")
    print("|---|---:|" + "---:|---:|" * len(results))
    for dtype in DTYPES:
        bits = next(iter(results.values()))[0][dtype][2]
        cells = " | ".join(f"{rows[dtype][0]:.5f} | {rows[dtype][1]:.1%}" for rows, _ in results.values())
        print(f"| `{dtype}` | {bits:.2f} | {cells} |")


if __name__ == "__main__":
    main()

"""Our quantizers against llama.cpp's, weights only: every 2-D matrix of a trained checkpoint
(tests/quant_quality.py's models) replaced by its dequantization after one quantizer or the other,
the model then run in f32 by the runtime, and scored by mean KL divergence and top-1 agreement
with the unquantized model over the held-out text. Both sides store the same GGUF block type, so
the difference is the quantizers' choice of scales and levels alone (no activation rounding, no
kernel). llama.cpp's is its library's own `ggml_quantize_chunk` (no importance matrix), called from
the llama-cpp-python build `bench/bench_e2e.py` keeps; our dequantization reads its blocks.

    python bench/quant_peer.py [--types q6_k,q4_k] [--models "demo model"] [--peer-python PATH]
"""
from __future__ import annotations

import argparse
import ctypes
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file, save_file

from blobstore import quant
from blobstore.runtime import load

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))   # ahead of bench/, whose quant_quality.py prints the table

from bench_e2e import peer_python  # noqa: E402
from quant_quality import TRAINED, converted, divergence, f32_reference  # noqa: E402

TYPES = ["q8_0", "q6_k", "q5_k", "q4_k", "q4_0"]


def ggml_library(python: str) -> ctypes.CDLL:
    """libggml-base of the llama-cpp-python installed for `python`, its quantize entry point typed."""
    folder = subprocess.run([python, "-c", "import llama_cpp, os; print(os.path.dirname(llama_cpp.__file__))"],
                            check=True, capture_output=True, text=True).stdout.strip()
    lib = ctypes.CDLL(str(Path(folder) / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def llama_cpp_roundtrip(lib: ctypes.CDLL, w: np.ndarray, dtype: str) -> np.ndarray:
    """w (rows, cols) f32 quantized to `dtype` by ggml, and dequantized (bit for bit as ggml does)."""
    kind = gguf.GGMLQuantizationType[dtype.upper()]
    block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    rows, cols = w.shape
    src = np.ascontiguousarray(w, np.float32)
    blocks = np.zeros((rows, cols // block * block_bytes), np.uint8)
    written = lib.ggml_quantize_chunk(kind.value, src.ctypes.data, blocks.ctypes.data, 0, rows, cols, None)
    if written != blocks.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes of {dtype}, expected {blocks.nbytes}")
    return quant.dequantize(quant.planes_from_ggml(dtype, blocks), cols, dtype)


def our_roundtrip(w: np.ndarray, dtype: str) -> np.ndarray:
    """w (rows, cols) f32 quantized to `dtype` by blobstore.quant, and dequantized."""
    return quant.dequantize(quant.quantize(np.ascontiguousarray(w, np.float32), dtype), w.shape[1], dtype)


def rounded_checkpoint(folder: Path, out: Path, roundtrip) -> Path:
    """A copy of checkpoint `folder` in `out` whose 2-D matrices went through `roundtrip`, stored as f32."""
    shutil.copytree(folder, out)
    tensors = {name: t.float().numpy() for name, t in load_file(folder / "model.safetensors").items()}
    save_file({name: torch.from_numpy(np.ascontiguousarray(roundtrip(t) if t.ndim == 2 else t))
               for name, t in tensors.items()}, str(out / "model.safetensors"))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--types", default=",".join(TYPES), help="comma-separated block types both quantizers write")
    p.add_argument("--models", default=",".join(TRAINED), help="which of: " + ", ".join(TRAINED))
    p.add_argument("--peer-python", default=None, help="a Python with llama_cpp installed (default: bench_e2e's cached build)")
    args = p.parse_args(argv)
    python = peer_python(args)
    if python is None:
        sys.exit("llama-cpp-python is needed for llama.cpp's quantizer")
    lib = ggml_library(python)
    print("| model | type | llama.cpp's quantizer: KLD | top-1 | ours: KLD | top-1 |")
    print("|---|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for label in args.models.split(","):
            folder = TRAINED[label]
            ids, reference = f32_reference(folder, work)
            for dtype in args.types.split(","):
                cells = []
                for side, roundtrip in (("llama.cpp", lambda w: llama_cpp_roundtrip(lib, w, dtype)),
                                        ("ours", lambda w: our_roundtrip(w, dtype))):
                    checkpoint = rounded_checkpoint(folder, work / f"{folder.name}-{dtype}-{side}", roundtrip)
                    with load(converted(checkpoint, "f32", work)) as model:
                        kld, top1 = divergence(reference, model.forward(ids))
                    cells += [f"{kld:.3g}", f"{top1:.1%}"]
                print(f"| {label} | `{dtype}` | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

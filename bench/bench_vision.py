"""Vision encoder benchmark: seconds to encode one 896x896 image on the real-size Gemma 3 tower
(SigLIP-So400m: width 1152, 27 layers, 16 heads, MLP 4304, 14 px patches, so 4096 patches; 256
image tokens projected into a text hidden size of 2560, as in Gemma 3 4B).

The weights are random (normal, std 0.02; LayerNorms 1 and 0), written straight into a blob per
--dtype with the BlobWriter, with the component configs the converter stores: no checkpoint is
downloaded. The time covers VisionTower.encode only (patch embedding, every layer, pooling and
projection), best of --repeats: wall seconds, and the CPU seconds of all the process's threads (on
a shared machine the wall time follows the load; CPU / threads is the wall time of a quiet one).
Prints markdown on stdout. Not a test: nothing here asserts speed.

    python bench/bench_vision.py --threads 2 [--dtypes bf16 q8_0] [--layers 27] [--repeats 1]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import blobstore
from blobstore.runtime import kernels
from blobstore.runtime.vision import VisionTower

SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
              num_channels=3, image_size=896, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
PROJECTOR = dict(mm_tokens_per_image=256, boi_token_index=255_999, eoi_token_index=256_000, image_token_index=262_144)
TEXT_HIDDEN = 2560   # Gemma 3 4B


def log(message: str):
    print(message, file=sys.stderr, flush=True)


def tower_tensors(config: dict, rng):
    """(name, float32 values) of every tensor VisionTower reads, in the converter's stored forms."""
    D, F, p = config["hidden_size"], config["intermediate_size"], config["patch_size"]
    grid = config["image_size"] // p
    weight = lambda *shape: (rng.standard_normal(shape, np.float32) * 0.02)  # noqa: E731
    yield "vision.embeddings.patch_embedding.weight", weight(D, config["num_channels"] * p * p)
    yield "vision.embeddings.patch_embedding.bias", weight(D)
    yield "vision.embeddings.position_embedding.weight", weight(grid * grid, D)
    for i in range(config["num_hidden_layers"]):
        prefix = f"vision.encoder.layers.{i}."
        for norm in ("layer_norm1", "layer_norm2"):
            yield f"{prefix}{norm}.weight", np.ones(D, np.float32)
            yield f"{prefix}{norm}.bias", np.zeros(D, np.float32)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            yield f"{prefix}self_attn.{proj}.weight", weight(D, D)
            yield f"{prefix}self_attn.{proj}.bias", weight(D)
        yield f"{prefix}mlp.fc1.weight", weight(F, D)
        yield f"{prefix}mlp.fc1.bias", weight(F)
        yield f"{prefix}mlp.fc2.weight", weight(D, F)
        yield f"{prefix}mlp.fc2.bias", weight(D)
    yield "vision.post_layernorm.weight", np.ones(D, np.float32)
    yield "vision.post_layernorm.bias", np.zeros(D, np.float32)
    yield "projector.mm_soft_emb_norm.weight", weight(D)
    yield "projector.mm_input_projection.weight", weight(TEXT_HIDDEN, D)


def write_blobs(folder: Path, dtypes: list[str], config: dict) -> dict:
    """One blob per dtype, written in one pass over the random tensors; matrices in the dtype,
    vectors in f32, as blob-pack stores them."""
    paths = {dtype: folder / f"vision-{dtype}.blob" for dtype in dtypes}
    writers = {dtype: blobstore.BlobWriter(path) for dtype, path in paths.items()}
    for name, values in tower_tensors(config, np.random.default_rng(0)):
        component = name.split(".")[0]
        for dtype, writer in writers.items():
            writer.add(name, values, dtype=dtype if values.ndim == 2 else "f32", component=component)
    components = {"vision": {"tensors": 0, "config": config, "required": False},
                  "projector": {"tensors": 2, "config": PROJECTOR, "required": False}}
    for writer in writers.values():
        writer.metadata["components"] = components
        writer.close()
    return paths


def encode_seconds(path: Path, repeats: int) -> tuple[float, float]:
    """(wall, CPU) seconds of the fastest of `repeats` encodes of one image."""
    pixels = np.random.default_rng(1).uniform(-1, 1, (1, 3, 896, 896)).astype(np.float32)
    with blobstore.open(path) as reader:
        tower = VisionTower.from_reader(reader)
        best = (float("inf"), float("inf"))
        for _ in range(repeats):
            started, cpu_started = time.perf_counter(), time.process_time()
            features = tower.encode(pixels)
            best = min(best, (time.perf_counter() - started, time.process_time() - cpu_started))
        assert features.shape == (1, 256, TEXT_HIDDEN) and np.isfinite(features).all()
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="kernel threads (default 2)")
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "q8_0"], help="weight types of the encoder to time (default bf16 q8_0)")
    parser.add_argument("--layers", type=int, default=SO400M["num_hidden_layers"],
                        help="encoder layers (27 on the real tower; fewer for a quick look)")
    parser.add_argument("--repeats", type=int, default=1, help="timed encodes per type; the best counts (default 1)")
    args = parser.parse_args(argv)
    kernels.set_threads(args.threads)
    config = {**SO400M, "num_hidden_layers": args.layers}
    with tempfile.TemporaryDirectory() as tmp:
        log(f"writing random {args.layers}-layer towers ({', '.join(args.dtypes)}) ...")
        paths = write_blobs(Path(tmp), args.dtypes, config)
        print("| weights | image | layers | threads | ISA | encode s | CPU s |\n|---|---|---|---|---|---|---|")
        for dtype, path in paths.items():
            wall, cpu = encode_seconds(path, args.repeats)
            print(f"| {dtype} | 896x896 | {args.layers} | {args.threads} | {kernels.get_isa()} | {wall:.1f} | {cpu:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()

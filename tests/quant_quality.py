"""Quantization quality of whole trained models, through the runtime: each model converted with
`blob-pack convert --dtype D` and run by the real kernels, against the same model converted to f32,
over held-out text none of them was trained on. Shared by tests/test_kquant_mixes.py and
bench/quant_quality.py (which writes the table of docs/CONVERT.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

import blobstore
from blobstore.convert import convert
from blobstore.format import DType
from blobstore.runtime import load
from test_demo_model import HELD_OUT  # Revelation 21-22: text no model here was trained on

FIXTURES = Path(__file__).parent / "fixtures"
# Trained checkpoints (random ones are chaotic: any rounding flips their top tokens, docs/CONVERT.md):
# the demo model (tools/train_demo_model.py) and two 256-wide ones on the same text and tokenizer
# (tools/train_tiny_checkpoints.py), one with its own output head.
TRAINED = {"demo model": FIXTURES / "demo-gemma3", "tiny llama": FIXTURES / "tiny-llama",
           "tiny qwen3": FIXTURES / "tiny-qwen3"}


@dataclass(frozen=True)
class Quality:
    kld: float   # mean KL divergence of the next-token distributions from the f32 model's
    top1: float  # share of positions whose most likely token is the f32 model's
    bits: float  # per weight of the 2-D matrices, scales included
    worst_flip: float  # the f32 model's top-two logit gap at the most decided position whose top token changed


def converted(folder: Path, dtype: str, work: Path, embed_dtype: str | None = None) -> Path:
    """The blob of `folder` converted with --dtype `dtype` (and --embed-dtype `embed_dtype`) in
    `work`, converted the first time it is asked for there."""
    blob = work / f"{folder.name}-{dtype}-{embed_dtype}.blob"
    if not blob.exists():   # convert renames a complete file into place
        convert(folder, blob, dtype=dtype, embed_dtype=embed_dtype, quiet=True)
    return blob


def f32_reference(folder: Path, work: Path, text: str = HELD_OUT) -> tuple[list, np.ndarray]:
    """(token ids of `text`, the f32 model's logits at each of them) for the checkpoint `folder`."""
    with load(converted(folder, "f32", work)) as model:
        ids = model.tokenizer.encode(text)
        return ids, model.forward(ids)


def measure(folder: Path, dtype: str, ids: list, reference: np.ndarray, work: Path,
            embed_dtype: str | None = None) -> Quality:
    """The quality of `folder` converted with --dtype `dtype` (and --embed-dtype `embed_dtype`),
    against its f32 `reference` logits at `ids`."""
    blob = converted(folder, dtype, work, embed_dtype)
    with load(blob) as model:
        logits = model.forward(ids)
    return Quality(*divergence(reference, logits), bits_per_weight(blob), worst_flip(reference, logits))


def bits_per_weight(path: Path) -> float:
    """Stored bits per value of a blob's 2-D matrices (ties not counted twice), scales included."""
    values = bits = 0
    with blobstore.open(path) as blob:
        for info in blob.infos():
            if len(info.shape) == 2 and not info.tie and info.dtype is not DType.U8:
                spec = info.dtype.spec
                values += np.prod(info.shape)
                bits += np.prod(info.shape) * spec.block_bytes * 8 / spec.block
    return float(bits / values)


def divergence(reference: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
    """(mean KL(reference ‖ logits) over positions, top-1 agreement) of two (positions, vocab) logit arrays."""
    def log_softmax(z):
        z = z.astype(np.float64) - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    p_log, q_log = log_softmax(reference), log_softmax(logits)
    kld = (np.exp(p_log) * (p_log - q_log)).sum(axis=1).mean()
    return float(kld), float((reference.argmax(axis=1) == logits.argmax(axis=1)).mean())


def worst_flip(reference: np.ndarray, logits: np.ndarray) -> float:
    """The largest gap between the reference's top two logits at a position whose top token differs
    in `logits` (0 if none): how decided a prediction rounding changed."""
    flipped = reference.argmax(axis=1) != logits.argmax(axis=1)
    top_two = np.sort(reference[flipped], axis=1)[:, -2:]
    return float((top_two[:, 1] - top_two[:, 0]).max(initial=0.0))

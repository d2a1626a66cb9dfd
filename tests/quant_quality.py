"""Quantization quality of whole models: a blob whose weight matrices went through a stored type
(quantized, then dequantized back to f32) and the KL divergence / top-1 agreement of its
next-token distributions with the f32 model's. Shared by tests/test_kquant_mixes.py and
bench/quant_quality.py (which writes the table of docs/CONVERT.md).

Weights only: the copy runs the runtime's f32 forward pass, so activations are not quantized.
"""
from __future__ import annotations

import numpy as np

import blobstore
from blobstore import quant
from blobstore.convert.plan import Options, target_dtype
from blobstore.format import DType
from blobstore.writer import BlobWriter

def round_trip(values: np.ndarray, label: str) -> np.ndarray:
    """values (rows, cols) float32 → the float32 values a tensor stored as `label` holds."""
    dtype = DType.parse(label)
    if dtype.is_quantized:
        return quant.dequantize(quant.quantize(values, dtype), values.shape[1], dtype)
    if dtype is DType.F16:
        return values.astype(np.float16).astype(np.float32)
    return values


def converter_choice(dtype: str, embed_dtype: str | None = None):
    """name, shape → the type `blob-pack convert --dtype dtype` stores that tensor in."""
    options = Options(dtype=dtype, embed_dtype=embed_dtype)
    return lambda name, shape: target_dtype(name, shape, options, "f32")


def weights_through(src, out, dtype_of) -> dict:
    """Copy the f32 blob `src` to `out` with every matrix rounded through the type
    `dtype_of(name, shape)` names (and kept in f32). Returns name → type used."""
    used = {}
    with blobstore.open(src) as blob, BlobWriter(out) as writer:
        writer.metadata.update(blob.metadata)
        for info in blob.infos():
            if info.tie:
                writer.add_tie(info.name, info.tie, component=info.component, source=info.source)
            elif info.dtype is DType.U8:
                writer.add_file(info.name, blob.file_bytes(info.name), component=info.component)
            else:
                values = blob.float32(info.name)
                label = dtype_of(info.name, info.shape)
                used[info.name] = label
                if values.ndim == 2:
                    values = round_trip(values, label)
                writer.add(info.name, np.ascontiguousarray(values, np.float32), component=info.component,
                           source=info.source)
    return used


def divergence(reference: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
    """(mean KL(reference ‖ logits) over positions, top-1 agreement) of two (positions, vocab) logit arrays."""
    def log_softmax(z):
        z = z.astype(np.float64) - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    p_log, q_log = log_softmax(reference), log_softmax(logits)
    kld = (np.exp(p_log) * (p_log - q_log)).sum(axis=1).mean()
    return float(kld), float((reference.argmax(axis=1) == logits.argmax(axis=1)).mean())

"""The compute kernels (C, wrapped in _kernels.pyx) and the few helpers that prepare their inputs.

>>> from blobstore.runtime import kernels
>>> kernels.cpu_info()["isa"]            # doctest: +SKIP
'avx2'
"""
from __future__ import annotations

import math

import numpy as np

from ._kernels import (  # noqa: F401 - the public surface of the kernels
    Matrix, add, attention, available_isas, cpu_features, cpu_info, embed, gated_act, get_isa,
    get_threads, matmul, physical_cores, read_bandwidth_probe, rms_norm, rope, set_isa,
    set_threads, softcap, softmax,
)


def rope_inv_freq(rotary_dim: int, base: float, scaling: dict | None = None) -> np.ndarray:
    """Rotary inverse frequencies (rotary_dim // 2,) float32, as transformers computes them.

    `scaling` is a config's rope_scaling / rope_parameters dict: None or type 'default',
    'linear' (factor) or 'llama3' (factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings).

    >>> rope_inv_freq(4, 10000.0)
    array([1.  , 0.01], dtype=float32)
    """
    exponents = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(rotary_dim)
    inv_freq = (np.float32(1.0) / (np.float32(base) ** exponents)).astype(np.float32)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"unsupported rope scaling type {kind!r}; expected default, linear or llama3")


def _llama3_inv_freq(inv_freq: np.ndarray, scaling: dict) -> np.ndarray:
    """Llama 3.1's frequency-dependent scaling: long wavelengths divided by `factor`, short ones
    kept, the band between interpolated smoothly."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)

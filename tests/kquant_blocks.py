"""Random ggml blocks of every block type, for the tests: random level bytes, float16 scales and mins
that are sane (finite) but cover the edges: both signs, zero, -0.0, subnormals and the float16 extremes."""
from __future__ import annotations

import numpy as np

from blobstore import quant
from blobstore.format import DType

GGML_TYPES = [d for d in DType if d.spec.ggml_fields]
NEW_TYPES = [d for d in GGML_TYPES if d.spec.feature_since == "1.1"]
EDGE_F16 = np.array([0.0, -0.0, 6e-8, -6e-8, 6.1e-5, 65504.0, -65504.0, 1.0, -1.0], np.float16)


def random_planes(dtype: DType, rows: int, nblocks: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Planes of `rows` x `nblocks` blocks: every byte random, every float16 plane a sane value."""
    raw = rng.integers(0, 256, (rows, nblocks * dtype.spec.block_bytes), dtype=np.uint8)
    planes = list(quant.planes_from_ggml(dtype, raw))
    for index, plane in enumerate(dtype.spec.planes):
        if plane.element == "<f2":
            values = rng.standard_normal(planes[index].shape) * 10.0 ** rng.uniform(-4, 1, planes[index].shape)
            edges = rng.random(planes[index].shape) < 0.15
            values[edges] = rng.choice(EDGE_F16, size=int(edges.sum()))
            planes[index] = values.astype(np.float16)
    return tuple(planes)


def random_ggml(dtype: DType, rows: int, nblocks: int, rng: np.random.Generator) -> np.ndarray:
    """The same kind of blocks as ggml bytes (rows, nblocks * block_bytes)."""
    return quant.ggml_from_planes(dtype, random_planes(dtype, rows, nblocks, rng))

"""Reference conversions between float32 and the stored element types (numpy, vectorized).

q8_0 and q4_0 follow docs/FORMAT.md exactly: blocks of 32 values along a row, one float16
scale per block, round to nearest (ties to even); q4_0's scale is searched per block
(_q4_0_blocks). The planes returned here are the bytes the writer stores; the C kernels read
the same planes.
"""
from __future__ import annotations

import numpy as np

from .format import DType, layout

CHUNK_ROWS = 4096  # rows quantized at a time: bounds the temporaries to a few copies of a chunk


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bits (uint16), rounding to nearest even; NaN stays NaN.

    >>> f32_to_bf16(np.array([1.0, 3.14159], np.float32))
    array([16256, 16457], dtype=uint16)
    """
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    quiet_nan = (bits >> 16) | 0x40
    return np.where(np.isnan(x), quiet_nan, rounded).astype(np.uint16)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) → float32, exactly.

    >>> bf16_to_f32(np.array([16256], np.uint16))
    array([1.], dtype=float32)
    """
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _inverse(scales16: np.ndarray) -> np.ndarray:
    """1 / scale in float32, 0 where the scale is 0 (an all-zero block quantizes to zeros)."""
    d = scales16.astype(np.float32)
    with np.errstate(divide="ignore"):
        return np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)


def _q8_0_blocks(blocks: np.ndarray):
    """(r, nb, 32) float32 → int8 quants (r, nb, 32) and float16 scales (r, nb)."""
    scales = (np.abs(blocks).max(axis=2) / np.float32(127)).astype(np.float16)
    q = np.rint(blocks * _inverse(scales)[..., None])
    return np.clip(q, -127, 127).astype(np.int8), scales


# q4_0 scale candidates, as the level the block's largest-magnitude value is aimed at (the plain
# max-abs rule is 8). Letting that value clip, or leaving a level unused, often fits the other 31
# values better: the squared error falls by 11 % on normal data and by 30 % on Gemma 3 270M's
# weights (Q5_0 / Q4_K grids requantized), whose mean KL divergence to f32 goes from 0.55 (max-abs,
# ties to even) to 0.38, on par with ggml's max-abs rule with ties rounded up (docs/CONVERT.md).
# 19 or 41 finer candidates lower the error by under 0.3 % more.
Q4_0_PEAK_LEVELS = np.linspace(7, 9, 9, dtype=np.float32)


def _q4_0_blocks(blocks: np.ndarray):
    """(r, nb, 32) float32 → packed nibbles (r, nb, 16) uint8 and float16 scales (r, nb).

    The scale of each block is the one of least squared error among the max-abs rule's (the block's
    largest-magnitude value, sign kept, over −8: what ggml's reference q4_0 does) and, for each of
    Q4_0_PEAK_LEVELS, the least-squares scale of the levels that aim puts the values on. Scales stay
    within [peak/9, peak/7] in magnitude and at least a step of the opposite side's largest value
    over 8, so no value is off by more than one step; a block keeps the max-abs scale unless the
    searched one is strictly better, so no block is ever worse than that rule's."""
    peak_index = np.abs(blocks).argmax(axis=2)[..., None]
    peak = np.take_along_axis(blocks, peak_index, axis=2)[..., 0]  # keeps its sign
    reference = (peak / np.float32(-8)).astype(np.float16)
    searched = _q4_0_searched_scales(blocks, peak)
    better = _q4_0_error(blocks, searched) < _q4_0_error(blocks, reference)
    scales = np.where(better, searched, reference)
    q = np.clip(np.rint(blocks * _inverse(scales)[..., None]) + 8, 0, 15).astype(np.uint8)
    half = q.shape[2] // 2  # byte j holds values j (low nibble) and j + half (high nibble)
    return q[..., :half] | (q[..., half:] << 4), scales


def _q4_0_searched_scales(blocks: np.ndarray, peak: np.ndarray) -> np.ndarray:
    """Per block, the float16 scale of least squared error among the candidates of Q4_0_PEAK_LEVELS
    (ranked by |x − q d|² − |x|², q being the candidate's levels: enough to rank, and an upper bound
    of the error once the values are rounded to the nearest level of d)."""
    low, high = _q4_0_scale_range(blocks, peak)
    best_scale = np.zeros(peak.shape, np.float16)
    best_score = np.full(peak.shape, np.inf, np.float32)
    q = np.empty_like(blocks)
    with np.errstate(divide="ignore", invalid="ignore"):
        for level in Q4_0_PEAK_LEVELS:
            aim = np.where(peak != 0, -level / peak, np.float32(0)).astype(np.float32)
            np.multiply(blocks, aim[..., None], out=q)
            np.clip(np.rint(q, out=q), -8, 7, out=q)
            q_dot_x = np.einsum("rbk,rbk->rb", q, blocks)
            q_dot_q = np.einsum("rbk,rbk->rb", q, q)
            fitted = np.where(q_dot_q > 0, q_dot_x / q_dot_q, 0)
            scale = (np.sign(fitted) * np.clip(np.abs(fitted), low, high)).astype(np.float16)
            d = scale.astype(np.float32)
            score = d * (d * q_dot_q - 2 * q_dot_x)
            better = score < best_score
            best_scale[better] = scale[better]
            best_score[better] = score[better]
    return best_scale


def _q4_0_error(blocks: np.ndarray, scales16: np.ndarray) -> np.ndarray:
    """Squared error per block of the nearest levels under float16 scales."""
    d = scales16.astype(np.float32)[..., None]
    q = np.multiply(blocks, _inverse(scales16)[..., None])
    np.clip(np.rint(q, out=q), -8, 7, out=q)
    q *= d
    np.subtract(blocks, q, out=q)
    return np.einsum("rbk,rbk->rb", q, q)


def _q4_0_scale_range(blocks: np.ndarray, peak: np.ndarray):
    """Bounds of a block's scale magnitude keeping every value within one step: the peak's side
    reaches level −8 (so up to 9 steps), the other side +7 (up to 8); at most |peak| / 7. The
    lower bound is raised by 2^-10 so that rounding the scale to float16 (2^-11) keeps it."""
    opposite = np.where(peak[..., None] < 0, blocks, -blocks).max(axis=2).clip(min=0)
    low = np.maximum(np.abs(peak) / np.float32(9), opposite / np.float32(8)) * np.float32(1 + 2**-10)
    return low, np.abs(peak) / np.float32(7)


_BLOCK_QUANTIZERS = {DType.Q8_0: _q8_0_blocks, DType.Q4_0: _q4_0_blocks}


def quantize(x: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Quantize a 2-D float array row by row into (quants plane, scales plane).

    Returns quants of shape (rows, row_stride) (int8 for q8_0, uint8 nibble pairs for q4_0,
    zero past the last block) and scales of shape (rows, blocks) float16.

    >>> q, s = quantize(np.ones((2, 40), np.float32), "q8_0")
    >>> q.shape, s.shape, int(q[0, 0]), float(s[0, 0] * 127)
    ((2, 64), (2, 2), 127, 1.0)
    """
    dtype = DType.parse(dtype)
    rows, cols = x.shape
    lay = layout(dtype, (rows, cols))
    quant_plane, scale_plane = dtype.spec.planes
    block = dtype.spec.block
    quants = np.zeros((rows, lay.row_stride // quant_plane.numpy.itemsize), quant_plane.numpy)
    scales = np.zeros((rows, lay.blocks), scale_plane.numpy)
    padded = np.zeros((min(rows, CHUNK_ROWS), lay.blocks * block), np.float32)
    for start in range(0, rows, CHUNK_ROWS):
        n = min(CHUNK_ROWS, rows - start)
        padded[:n, :cols] = x[start:start + n]
        blocks = padded[:n].reshape(n, lay.blocks, block)
        if not np.isfinite(blocks).all():
            raise ValueError(f"cannot quantize to {dtype.label}: rows {start}..{start + n - 1} hold NaN or infinity")
        q, s = _BLOCK_QUANTIZERS[dtype](blocks)
        quants[start:start + n, :q[0].size] = q.reshape(n, -1)
        scales[start:start + n] = s
    return quants, scales


def dequantize(quants: np.ndarray, scales: np.ndarray, cols: int, dtype) -> np.ndarray:
    """Inverse of `quantize`: float32 array (rows, cols).

    >>> q, s = quantize(np.arange(8, dtype=np.float32).reshape(1, 8), "q8_0")
    >>> dequantize(q, s, 8, "q8_0").round(1)
    array([[0., 1., 2., 3., 4., 5., 6., 7.]], dtype=float32)
    """
    dtype = DType.parse(dtype)
    rows, blocks = scales.shape
    per_block = dtype.spec.planes[0].per_block
    levels = quants[:, :blocks * per_block].reshape(rows, blocks, per_block)
    if dtype is DType.Q8_0:
        values = levels.astype(np.float32)
    else:
        values = np.concatenate([levels & 0x0F, levels >> 4], axis=2).astype(np.float32) - 8
    values *= scales.astype(np.float32)[..., None]
    return values.reshape(rows, blocks * dtype.spec.block)[:, :cols]

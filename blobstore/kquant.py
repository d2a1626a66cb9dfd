"""Float32 → ggml block bytes for the k-quants (q4_k, q5_k, q6_k) and the 32-value blocks q4_1,
q5_0, q5_1, with an error-minimizing search for every (sub-)block's scale and minimum.

The output of `quantize_ggml` is exactly what a GGUF file holds for the type (so
`gguf.quants.dequantize` reads it); `blobstore.quant` turns it into the stored planes.

How a scale is chosen. Rounding each block to the grid spanned by its max-abs (or min..max)
wastes levels: one outlier stretches the grid for all 32 values. Instead, for a few candidate
grids a little finer or coarser than that span, the values are rounded, and the scale (and
minimum) that fit those integer levels best in the weighted least-squares sense are solved in
closed form; the candidate with the smallest weighted error wins. The sums the fit needs give
the error too (expanded square), so a candidate costs one rounding pass and three dot products.
The same idea as llama.cpp's reference quantizers, vectorized over every block at once: the only
Python loops run over the handful of candidates.

The k-quants then store the sub-block scales and minimums themselves in 6 bits (q6_k: 8-bit
signed sub-scales) against one float16 super-scale; those are chosen by the same search over the
sub-block values, weighted by each sub-block's total weight, and the levels are rounded again
against the scales actually stored.
"""
from __future__ import annotations

import numpy as np

from .format import DType

QK_K = DType.Q4_K.spec.block  # values per k-quant super-block
CHUNK_VALUES = 1 << 16  # values quantized at a time: keeps the search's temporaries in cache

# Candidate grids, as offsets to the level count the span maps onto (see _affine_fit). Steps
# twice llama.cpp's 0.1 cost half the passes and stay within 0.5 % of its search's RMSE
# (tests/test_kquant_quantize.py).
AFFINE_STEPS_2BIT = np.arange(-0.5, 1.01, 0.25)
AFFINE_STEPS_4BIT = np.arange(-1.0, 1.01, 0.2)
AFFINE_STEPS_5BIT = np.arange(-0.5, 1.01, 0.25)
SYMMETRIC_STEPS = np.arange(-1.5, 1.51, 0.25)
SUPER_SCALE_STEPS = np.arange(-0.4, 0.41, 0.1)

_F64 = np.float64


# ---- the searches (every array: one row per block) ----

def _weights(x: np.ndarray) -> np.ndarray:
    """Weights of the fits: uniform, so the search minimizes the plain squared error. Weighting
    large values up (|x|, x², as llama.cpp's reference quantizers do) measured no better on the
    demo model's KL divergence (docs/CONVERT.md) and worse in RMSE."""
    return np.ones_like(x)


def _affine_fit(x: np.ndarray, w: np.ndarray, nmax: int, steps, free_min: bool):
    """Per row of x (blocks × n): scale ≥ 0 and minimum such that x ≈ scale * q + minimum with
    integer q in 0..nmax, minimizing sum(w * error²). Unless `free_min`, the minimum is ≤ 0 (the
    k-quants store it as a non-negative offset to subtract). Returns (scale, minimum) float64."""
    lo = x.min(axis=1)
    if not free_min:
        lo = np.minimum(lo, 0)
    hi = x.max(axis=1)
    span = (hi - lo).astype(_F64)
    shifted = x - lo[:, None].astype(np.float32)             # ≥ 0: rounding needs no lower clip
    sw, sx = w.sum(axis=1).astype(_F64), np.einsum("ij,ij->i", w, x).astype(_F64)
    sxx = np.einsum("ij,ij->i", w * x, x).astype(_F64)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_span = np.where(span > 0, 1 / span, 0)
    best_scale, best_min = span / nmax, lo.astype(_F64)    # max-min rounding: the starting point
    best_err = np.full(len(x), np.inf)
    levels = np.empty_like(x)
    for step in steps:
        np.multiply(shifted, ((nmax + step) * inv_span).astype(np.float32)[:, None], out=levels)
        np.rint(levels, out=levels)
        np.minimum(levels, nmax, out=levels)
        wl = w * levels
        sl = wl.sum(axis=1).astype(_F64)
        sll = np.einsum("ij,ij->i", wl, levels).astype(_F64)
        sxl = np.einsum("ij,ij->i", wl, x).astype(_F64)
        scale, minimum, err = _solve_affine(sw, sx, sxx, sl, sll, sxl, free_min)
        better = err < best_err
        best_scale = np.where(better, scale, best_scale)
        best_min = np.where(better, minimum, best_min)
        best_err = np.where(better, err, best_err)
    return best_scale, best_min


def _solve_affine(sw, sx, sxx, sl, sll, sxl, free_min: bool):
    """Weighted least squares of x ≈ scale * l + minimum from the sums; its error (inf where singular)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        det = sw * sll - sl * sl
        scale = (sw * sxl - sx * sl) / det
        minimum = (sll * sx - sl * sxl) / det
        if not free_min:  # a positive minimum cannot be stored: fit the scale alone through 0
            positive = minimum > 0
            scale = np.where(positive, sxl / sll, scale)
            minimum = np.where(positive, 0.0, minimum)
        err = (scale * scale * sll + 2 * scale * minimum * sl - 2 * scale * sxl
               + minimum * minimum * sw - 2 * minimum * sx + sxx)
    return scale, minimum, np.where((det > 0) & np.isfinite(err), err, np.inf)


def _scale_fit(x: np.ndarray, w: np.ndarray, lo: int, hi: int, steps) -> np.ndarray:
    """Per row: the scale such that x ≈ scale * q with integer q in lo..hi, minimizing
    sum(w * error²). Signed grids (lo < 0) are oriented so the largest-magnitude value can take
    the level lo (the side with one more level), as ggml's symmetric types do; unsigned ones
    (x ≥ 0) map it onto hi. Returns the scale (float64; negative on a signed grid whose peak is
    positive)."""
    peak = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)[:, 0].astype(_F64)
    target = lo if lo < 0 else hi
    with np.errstate(divide="ignore"):
        inv_peak = np.where(peak != 0, 1 / peak, 0)
    wx = w * x
    best_scale, best_score = np.zeros(len(x)), np.zeros(len(x))
    levels = np.empty_like(x)
    for step in steps:
        np.multiply(x, ((target + np.sign(target) * step) * inv_peak).astype(np.float32)[:, None], out=levels)
        np.rint(levels, out=levels)
        np.clip(levels, lo, hi, out=levels)
        sxl = np.einsum("ij,ij->i", wx, levels).astype(_F64)
        sll = np.einsum("ij,ij->i", w * levels, levels).astype(_F64)
        with np.errstate(divide="ignore", invalid="ignore"):
            score = np.where(sll > 0, sxl * sxl / sll, 0)  # the error is sum(w x²) - score
            better = score > best_score
            best_scale = np.where(better, sxl / sll, best_scale)
        best_score = np.where(better, score, best_score)
    return best_scale


def _round_levels(x: np.ndarray, scale: np.ndarray, minimum: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The integer levels nearest to (x - minimum) / scale, clipped to lo..hi; 0 where scale is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(scale != 0, 1 / scale, 0).astype(np.float32)
    levels = np.rint((x - minimum[..., None].astype(np.float32)) * inv[..., None])
    return np.clip(levels, lo, hi)


def _f16(values: np.ndarray, what: str) -> np.ndarray:
    """float16 scales; values beyond its range are an error (the caller names the tensor)."""
    with np.errstate(over="ignore"):
        half = np.asarray(values).astype(np.float16)
    if not np.isfinite(half).all():
        raise ValueError(f"{what} exceed the float16 range of the scales (65504)")
    return half


def _sub_scale_codes(values: np.ndarray, weights: np.ndarray, top: int, signed: bool):
    """Code per-sub-block scales (super-blocks × k) as integers × one float16 super-scale.

    Unsigned: codes 0..top against a positive super-scale. Signed: codes -top..top-1, oriented so
    the largest magnitude takes -top. The super-scale is searched like a block scale, weighted by
    each sub-block's total weight (a sub-block that matters more gets its scale coded closer)."""
    lo, hi = (-top, top - 1) if signed else (0, top)
    d16 = _f16(_scale_fit(values.astype(np.float32), weights.astype(np.float32), lo, hi, SUPER_SCALE_STEPS), "values")
    codes = _round_levels(values, d16.astype(np.float32), np.zeros(len(values)), lo, hi)
    return codes, d16


# ---- the block formats ----

def _pack_nibbles(levels: np.ndarray, group: int) -> np.ndarray:
    """Levels 0..15 (..., n): in each run of 2*group values, byte j holds value j (low nibble) and
    value j + group (high nibble) — ggml's order for q4_0/q4_1/q5_* (group 16) and q4_k/q5_k (32)."""
    runs = levels.reshape(*levels.shape[:-1], -1, 2, group).astype(np.uint8)
    return (runs[..., 0, :] | (runs[..., 1, :] << 4)).reshape(*levels.shape[:-1], -1)


def _pack_bits(bits: np.ndarray) -> np.ndarray:
    """0/1 values (blocks, n) → n/8 bytes, value j in bit j % 8 of byte j // 8 (q5_0/q5_1's qh)."""
    return np.packbits(bits.astype(np.uint8), axis=1, bitorder="little")


def _halves(values: np.ndarray) -> np.ndarray:
    return _f16(values, "values").reshape(-1, 1).view(np.uint8)


def _q4_1(x: np.ndarray) -> np.ndarray:
    scale, minimum = _affine_fit(x, _weights(x), 15, AFFINE_STEPS_4BIT, free_min=True)
    d, m = _f16(scale, "values"), _f16(minimum, "values")
    levels = _round_levels(x, d.astype(np.float32), m.astype(np.float32), 0, 15)
    return np.concatenate([_halves(d), _halves(m), _pack_nibbles(levels, 16)], axis=1)


def _q5_1(x: np.ndarray) -> np.ndarray:
    scale, minimum = _affine_fit(x, _weights(x), 31, AFFINE_STEPS_5BIT, free_min=True)
    d, m = _f16(scale, "values"), _f16(minimum, "values")
    levels = _round_levels(x, d.astype(np.float32), m.astype(np.float32), 0, 31).astype(np.uint8)
    return np.concatenate([_halves(d), _halves(m), _pack_bits(levels >> 4), _pack_nibbles(levels & 15, 16)], axis=1)


def _q5_0(x: np.ndarray) -> np.ndarray:
    d = _f16(_scale_fit(x, _weights(x), -16, 15, SYMMETRIC_STEPS), "values")
    levels = (_round_levels(x, d.astype(np.float32), np.zeros(len(x)), -16, 15) + 16).astype(np.uint8)
    return np.concatenate([_halves(d), _pack_bits(levels >> 4), _pack_nibbles(levels & 15, 16)], axis=1)


def _k_affine(x: np.ndarray, nmax: int, steps, size: int, top: int):
    """The shared half of q2_k, q4_k and q5_k: (super-blocks, 256) → levels (sb, 256) in 0..nmax
    for sub-blocks of `size` values, their scale and min codes (sb, 256 / size) in 0..top, and the
    float16 super-scales d and dmin."""
    n, per = len(x), QK_K // size
    sub = x.reshape(n * per, size)
    w = _weights(sub)
    scale, minimum = _affine_fit(sub, w, nmax, steps, free_min=False)
    weight = w.sum(axis=1).reshape(n, per)
    sc, d = _sub_scale_codes(scale.reshape(n, per), weight, top, signed=False)
    mc, dmin = _sub_scale_codes(-minimum.reshape(n, per), weight, top, signed=False)
    sub_scale = (d.astype(np.float32)[:, None] * sc).reshape(-1)
    sub_min = -(dmin.astype(np.float32)[:, None] * mc).reshape(-1)
    levels = _round_levels(sub, sub_scale, sub_min, 0, nmax).reshape(n, QK_K).astype(np.uint8)
    return levels, sc.astype(np.uint8), mc.astype(np.uint8), d, dmin


def _k_symmetric(x: np.ndarray, lo: int, hi: int, top: int):
    """The shared half of q3_k and q6_k (16-value sub-blocks): (super-blocks, 256) → levels
    (sb, 256) in 0..hi-lo (offset by -lo), signed sub-scale codes (sb, 16) in -top..top-1 and
    the float16 super-scale."""
    n = len(x)
    sub = x.reshape(n * 16, 16)
    w = _weights(sub)
    scale = _scale_fit(sub, w, lo, hi, SYMMETRIC_STEPS).reshape(n, 16)
    codes, d = _sub_scale_codes(scale, w.sum(axis=1).reshape(n, 16), top, signed=True)
    sub_scale = (d.astype(np.float32)[:, None] * codes).reshape(-1)
    levels = _round_levels(sub, sub_scale, np.zeros(len(sub)), lo, hi) - lo
    return levels.astype(np.uint8).reshape(n, QK_K), codes.astype(np.int8), d


def _crumbs(levels: np.ndarray) -> np.ndarray:
    """Levels 0..3 (sb, 256) → 64 bytes: value 128 h + 32 s + l in bits 2s..2s+1 of byte 32 h + l."""
    parts = levels.reshape(len(levels), 2, 4, 32)
    return (parts[:, :, 0] | (parts[:, :, 1] << 2) | (parts[:, :, 2] << 4) | (parts[:, :, 3] << 6)).reshape(-1, 64)


def _bit_planes(bits: np.ndarray) -> np.ndarray:
    """0/1 values (sb, 256) → 32 bytes: bit j of byte l is value 32 j + l (q3_k's hmask, q5_k's qh)."""
    return np.bitwise_or.reduce(bits.reshape(len(bits), 8, 32) << np.arange(8, dtype=np.uint8)[:, None], axis=1)


def _q2_k(x: np.ndarray) -> np.ndarray:
    levels, sc, mc, d, dmin = _k_affine(x, 3, AFFINE_STEPS_2BIT, 16, 15)
    return np.concatenate([sc | (mc << 4), _crumbs(levels), _halves(d), _halves(dmin)], axis=1)


def _q3_k(x: np.ndarray) -> np.ndarray:
    levels, codes, d = _k_symmetric(x, -4, 3, 32)
    c = (codes + 32).astype(np.uint8)  # 6 bits: low nibbles in bytes 0-7 (sub-blocks 8-15 above 0-7),
    low = (c[:, :8] & 15) | ((c[:, 8:] & 15) << 4)  # the top 2 bits of sub-block j in byte 8 + j % 4
    top = (c >> 4).reshape(len(c), 4, 4)             # at bits 2 (j // 4)
    high = top[:, 0] | (top[:, 1] << 2) | (top[:, 2] << 4) | (top[:, 3] << 6)
    return np.concatenate([_bit_planes(levels >> 2), _crumbs(levels & 3), low, high, _halves(d)], axis=1)


def _pack_6bit(sc: np.ndarray, mc: np.ndarray) -> np.ndarray:
    """8 scale and 8 min codes (0..63) per super-block → ggml's 12 bytes: bytes 0-3 scales 0-3 and
    bytes 4-7 mins 0-3 in their low 6 bits, the top 2 bits of scales / mins 4-7 above them; bytes
    8-11 the low 4 bits of scale (low nibble) and min (high nibble) 4-7."""
    low = np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), mc[:, :4] | ((mc[:, 4:] >> 4) << 6)], axis=1)
    return np.concatenate([low, (sc[:, 4:] & 15) | ((mc[:, 4:] & 15) << 4)], axis=1)


def _q4_k(x: np.ndarray) -> np.ndarray:
    levels, sc, mc, d, dmin = _k_affine(x, 15, AFFINE_STEPS_4BIT, 32, 63)
    return np.concatenate([_halves(d), _halves(dmin), _pack_6bit(sc, mc), _pack_nibbles(levels, 32)], axis=1)


def _q5_k(x: np.ndarray) -> np.ndarray:
    levels, sc, mc, d, dmin = _k_affine(x, 31, AFFINE_STEPS_5BIT, 32, 63)
    return np.concatenate([_halves(d), _halves(dmin), _pack_6bit(sc, mc), _bit_planes(levels >> 4),
                           _pack_nibbles(levels & 15, 32)], axis=1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    levels, codes, d = _k_symmetric(x, -32, 31, 128)
    # each half of 128 values: low nibbles of values k and k+64 share byte k of ql; the top 2 bits
    # of values k, k+32, k+64, k+96 fill byte k of qh, in that order from bit 0
    ql = _pack_nibbles(levels.reshape(len(x), 2, 128) & 15, 64).reshape(len(x), 128)
    return np.concatenate([ql, _crumbs(levels >> 4), codes.view(np.uint8), _halves(d)], axis=1)


_ENCODERS = {DType.Q4_1: _q4_1, DType.Q5_0: _q5_0, DType.Q5_1: _q5_1, DType.Q2_K: _q2_k, DType.Q3_K: _q3_k,
             DType.Q4_K: _q4_k, DType.Q5_K: _q5_k, DType.Q6_K: _q6_k}
QUANTIZED_FROM_FLOATS = tuple(_ENCODERS)


def quantize_ggml(x: np.ndarray, dtype) -> np.ndarray:
    """Quantize a 2-D float array row by row into ggml's block bytes: (rows, cols / block *
    block_bytes) uint8, the bytes a GGUF tensor of that type holds. cols must be a whole number of
    blocks; NaN or infinity is an error.

    >>> raw = quantize_ggml(np.linspace(-1, 1, 512, dtype=np.float32).reshape(2, 256), "q4_k")
    >>> raw.shape, raw.dtype
    ((2, 144), dtype('uint8'))
    """
    dtype = DType.parse(dtype)
    if dtype not in _ENCODERS:
        raise ValueError(f"no float quantizer for {dtype.label}; expected one of {[d.label for d in _ENCODERS]}")
    encode, block, label = _ENCODERS[dtype], dtype.spec.block, dtype.label
    x = np.asarray(x, np.float32)
    rows, cols = x.shape
    if cols % block:
        raise ValueError(f"{label} needs rows of a multiple of {block} values, got {cols}")
    blocks = x.reshape(-1, block)
    per_chunk = max(1, CHUNK_VALUES // block)
    out = []
    for start in range(0, len(blocks), per_chunk):
        chunk = blocks[start:start + per_chunk]
        if not np.isfinite(chunk).all():
            raise ValueError(f"cannot quantize to {label}: the values hold NaN or infinity")
        out.append(encode(chunk))
    return np.concatenate(out).reshape(rows, -1) if out else np.zeros((rows, 0), np.uint8)

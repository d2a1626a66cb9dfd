"""Reference conversions between float32 and the stored element types (numpy, vectorized).

q8_0 and q4_0 follow docs/FORMAT.md exactly: blocks of 32 values along a row, one float16
scale per block, round to nearest (ties to even); q4_0's scale is searched per block
(_q4_0_blocks). The planes returned here are the bytes the
writer stores; the C kernels read the same planes. Every quantized type is a ggml block type:
`planes_from_ggml` / `ggml_from_planes` move its bytes between ggml's block struct and our
planes, and `dequantize` gives the float32 values ggml gives, bit for bit (FORMAT.md §5.4).
"""
from __future__ import annotations

import numpy as np

from . import kquant
from .format import INTERLEAVE, DType, layout

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


def quantize(x: np.ndarray, dtype) -> tuple[np.ndarray, ...]:
    """Quantize a 2-D float array row by row into the type's planes.

    Returns the planes in DTypeSpec order: the first of shape (rows, row_stride) of its element
    (int8 for q8_0, uint8 nibble pairs for q4_0; zero past the last block), every later one
    (rows, blocks * per_block) (q8_0/q4_0: the float16 scales).

    >>> q, s = quantize(np.ones((2, 40), np.float32), "q8_0")
    >>> q.shape, s.shape, int(q[0, 0]), float(s[0, 0] * 127)
    ((2, 64), (2, 2), 127, 1.0)
    """
    dtype = DType.parse(dtype)
    if dtype in kquant.QUANTIZED_FROM_FLOATS:
        return _planes_of_ggml_rows(kquant.quantize_ggml(x, dtype), dtype)
    if dtype not in _BLOCK_QUANTIZERS:
        raise ValueError(f"blobstore has no quantizer from floats to {dtype.label}; expected one of "
                         f"{[d.label for d in (*_BLOCK_QUANTIZERS, *kquant.QUANTIZED_FROM_FLOATS)]}")
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


def interleave8(planes, dtype: DType = DType.Q8_0) -> tuple[np.ndarray, ...]:
    """The planar planes of a type of format.INTERLEAVED (q8_0, q4_0: quants, scales; q5_0:
    quants, high, scales; each (rows, ...) as quantize gives them) rearranged into the interleave8
    layout the kernels read fastest (csrc/kernels.h, BLOB_LAYOUT_INTERLEAVE8): rows in groups of
    eight, the last completed with rows of level 0 and scale 0; group g's block b holds the eight
    rows' block b in the type's tile (FORMAT.md §5.5 q8_0, §5.6 q4_0, §5.7 q5_0), its eight
    scales side by side. Returns each plane as (groups, blocks * 8 * its bytes per block).

    >>> q, s = interleave8(quantize(np.arange(80, dtype=np.float32).reshape(2, 40), "q8_0"))
    >>> q.shape, s.shape, int(q[0, 2]), int(q[0, 3])   # row 1's levels 0 and 1 follow row 0's
    ((1, 512), (1, 16), 72, 73)
    """
    *quants, scales = planes
    rows, blocks = scales.shape
    groups = -(-rows // INTERLEAVE)
    levels = _levels_of(dtype, quants, blocks)
    grouped_q = np.full((groups * INTERLEAVE, blocks, dtype.spec.block), _ZERO_LEVEL[dtype], levels.dtype)
    grouped_q[:rows] = levels
    grouped_s = np.zeros((groups * INTERLEAVE, blocks), scales.dtype)
    grouped_s[:rows] = scales
    grouped_s = grouped_s.reshape(groups, INTERLEAVE, blocks).transpose(0, 2, 1)
    return (*_TILES[dtype][0](grouped_q, groups, blocks), grouped_s.reshape(groups, blocks * INTERLEAVE))


def deinterleave8(planes, rows: int, dtype: DType = DType.Q8_0) -> tuple[np.ndarray, ...]:
    """The planar planes (quants (rows, blocks * block bytes), [high (rows, blocks * 4),] scales
    (rows, blocks)) of `rows` rows stored as interleave8 planes: the inverse of interleave8.

    >>> planes = quantize(np.arange(192, dtype=np.float32).reshape(2, 96), "q5_0")
    >>> back = deinterleave8(interleave8(planes, DType.Q5_0), rows=2, dtype=DType.Q5_0)
    >>> all(bool((mine == theirs[:, :mine.shape[1]]).all()) for mine, theirs in zip(back, planes))
    True
    """
    *tiled, scales = planes
    groups, blocks = scales.shape[0], scales.shape[1] // INTERLEAVE
    levels = _TILES[dtype][1](tiled, groups, blocks)[:rows]
    planar_s = scales.reshape(groups, blocks, INTERLEAVE).transpose(0, 2, 1)
    return (*_planar_quants(dtype, levels), planar_s.reshape(groups * INTERLEAVE, blocks)[:rows])


# A q4_0 row's int32 lane in a 32-byte run of its group block: LANE levels in the low nibbles,
# the next LANE in the high ones (FORMAT.md §5.6); q5_0's nibbles the same (§5.7).
_Q4_0_LANE = 4
_ZERO_LEVEL = {DType.Q8_0: 0, DType.Q4_0: 8, DType.Q5_0: 16}   # the stored form of level 0 (level + 8, + 16)


def _levels_of(dtype: DType, quants, blocks: int) -> np.ndarray:
    """Planar quant planes as stored levels (rows, blocks, block): nibbles unpacked (byte i: level
    i low, level i + 16 high), q5_0's with their fifth bits (bit i of a block's 4 high bytes) as 16."""
    first = quants[0]
    if dtype in (DType.Q4_0, DType.Q5_0):
        packed = first[:, :blocks * dtype.spec.block // 2].reshape(len(first), blocks, -1)
        levels = np.concatenate([packed & 15, packed >> 4], axis=2)
        if dtype is DType.Q5_0:
            high = quants[1].reshape(len(first), blocks, -1)
            levels |= np.unpackbits(high, axis=2, bitorder="little") << 4
        return levels
    return first[:, :blocks * dtype.spec.block].reshape(len(first), blocks, -1)


def _planar_quants(dtype: DType, levels: np.ndarray) -> tuple[np.ndarray, ...]:
    """The inverse of _levels_of: (rows, blocks, block) stored levels as the planar quant planes."""
    rows, half = len(levels), dtype.spec.block // 2
    if dtype is DType.Q4_0:
        return ((levels[..., :half] | levels[..., half:] << 4).reshape(rows, -1),)
    if dtype is DType.Q5_0:
        nibbles = levels & 15
        high = np.packbits(levels >> 4, axis=2, bitorder="little")
        return (nibbles[..., :half] | nibbles[..., half:] << 4).reshape(rows, -1), high.reshape(rows, -1)
    return (levels.reshape(rows, -1),)


def _q8_0_tile(levels, groups, blocks):
    """(groups * 8, blocks, 32) int8 levels → bytes 16i + 2j + e of a group block = level 2i + e of row j."""
    tile = levels.reshape(groups, INTERLEAVE, blocks, -1, 2).transpose(0, 2, 3, 1, 4)
    return (tile.reshape(groups, -1),)


def _q8_0_untile(planes, groups, blocks):
    tile = planes[0].reshape(groups, blocks, -1, INTERLEAVE, 2).transpose(0, 3, 1, 2, 4)
    return tile.reshape(groups * INTERLEAVE, blocks, -1)


def _q4_0_tile(levels, groups, blocks):
    """(groups * 8, blocks, 32) nibbles → byte 32c + 4j + m of a group block: level 8c + m of row j
    low, 8c + 4 + m high."""
    runs = levels.reshape(groups, INTERLEAVE, blocks, -1, 2, _Q4_0_LANE).transpose(0, 2, 3, 1, 4, 5)
    return ((runs[..., 0, :] | runs[..., 1, :] << 4).reshape(groups, -1),)


def _q4_0_untile(planes, groups, blocks):
    runs = planes[0].reshape(groups, blocks, -1, INTERLEAVE, 1, _Q4_0_LANE)
    nibbles = np.concatenate([runs & 15, runs >> 4], axis=4).transpose(0, 3, 1, 2, 4, 5)
    return nibbles.reshape(groups * INTERLEAVE, blocks, -1)


def _q5_0_tile(levels, groups, blocks):
    """(groups * 8, blocks, 32) levels + 16 → q4_0's tile of their low nibbles, and 32 bytes of
    fifth bits a group block: bit 32s + 4j + m (little-endian) = the fifth bit of level 4s + m of row j."""
    (nibbles,) = _q4_0_tile(levels & 15, groups, blocks)
    bits = (levels >> 4).reshape(groups, INTERLEAVE, blocks, -1, _Q4_0_LANE).transpose(0, 2, 3, 1, 4)
    return nibbles, np.packbits(bits.reshape(groups, blocks, -1), axis=2, bitorder="little").reshape(groups, -1)


def _q5_0_untile(planes, groups, blocks):
    nibbles, fifth = planes
    bits = np.unpackbits(fifth.reshape(groups, blocks, -1), axis=2, bitorder="little")
    bits = bits.reshape(groups, blocks, -1, INTERLEAVE, _Q4_0_LANE).transpose(0, 3, 1, 2, 4)
    return _q4_0_untile((nibbles,), groups, blocks) | bits.reshape(groups * INTERLEAVE, blocks, -1) << 4


_TILES = {DType.Q8_0: (_q8_0_tile, _q8_0_untile), DType.Q4_0: (_q4_0_tile, _q4_0_untile),
          DType.Q5_0: (_q5_0_tile, _q5_0_untile)}


def _planes_of_ggml_rows(blocks: np.ndarray, dtype: DType) -> tuple[np.ndarray, ...]:
    """ggml block bytes → planes, the first padded to the row stride as `quantize` returns it."""
    first, *rest = planes_from_ggml(dtype, blocks)
    stride = layout(dtype, (len(blocks), blocks.shape[1] // dtype.spec.block_bytes * dtype.spec.block)).row_stride
    padded = np.zeros((len(first), stride // first.itemsize), first.dtype)
    padded[:, :first.shape[1]] = first
    return (padded, *rest)


# ---- ggml's block bytes <-> our planes ----

def _field_offsets(spec) -> dict[str, int]:
    """Byte offset of each plane's field inside one ggml block struct."""
    sizes = {plane.name: plane.block_bytes for plane in spec.planes}
    offsets, at = {}, 0
    for name in spec.ggml_fields:
        offsets[name], at = at, at + sizes[name]
    return offsets


def _ggml_spec(dtype):
    dtype = DType.parse(dtype)
    if not dtype.spec.ggml_fields:
        raise ValueError(f"{dtype.label} is not a ggml block type; expected one of "
                         f"{[d.label for d in DType if d.spec.ggml_fields]}")
    return dtype, dtype.spec


def planes_from_ggml(dtype, blocks: np.ndarray) -> tuple[np.ndarray, ...]:
    """ggml block bytes (rows, nblocks * block_bytes) uint8 → the type's planes, each
    (rows, nblocks * per_block) of its element type (the first one not padded; the writer pads it).

    >>> raw = np.zeros((1, 34), np.uint8); raw[0, :2] = [0, 60]; raw[0, 2] = 3   # q8_0: scale 1.0, one 3
    >>> quants, scales = planes_from_ggml("q8_0", raw)
    >>> int(quants[0, 0]), float(scales[0, 0])
    (3, 1.0)
    """
    dtype, spec = _ggml_spec(dtype)
    blocks = np.asarray(blocks)
    if blocks.dtype != np.uint8 or blocks.ndim != 2 or blocks.shape[1] % spec.block_bytes:
        raise ValueError(f"{dtype.label}: ggml blocks must be uint8 (rows, nblocks * {spec.block_bytes}), "
                         f"found {blocks.dtype} {blocks.shape}")
    rows, nblocks = blocks.shape[0], blocks.shape[1] // spec.block_bytes
    per_block = blocks.reshape(rows, nblocks, spec.block_bytes)
    offsets = _field_offsets(spec)
    return tuple(np.ascontiguousarray(per_block[:, :, offsets[p.name]:offsets[p.name] + p.block_bytes])
                 .view(p.numpy).reshape(rows, nblocks * p.per_block) for p in spec.planes)


def ggml_from_planes(dtype, planes) -> np.ndarray:
    """The type's planes (the first may carry its row padding) → ggml block bytes (rows, nblocks * block_bytes).

    >>> raw = np.arange(2 * 144, dtype=np.uint8).reshape(1, 288)
    >>> bool((ggml_from_planes("q4_k", planes_from_ggml("q4_k", raw)) == raw).all())
    True
    """
    dtype, spec = _ggml_spec(dtype)
    fields = _block_fields(spec, planes)
    rows, nblocks = planes[-1].shape[0], planes[-1].shape[1] // spec.planes[-1].per_block
    out = np.empty((rows * nblocks, spec.block_bytes), np.uint8)
    offsets = _field_offsets(spec)
    for plane in spec.planes:
        out[:, offsets[plane.name]:offsets[plane.name] + plane.block_bytes] = fields[plane.name].view(np.uint8)
    return out.reshape(rows, nblocks * spec.block_bytes)


def _block_fields(spec, planes) -> dict[str, np.ndarray]:
    """Each plane as (rows * nblocks, per_block) of its element, keyed by plane name; the first plane's
    row padding is cut off (the last plane is never padded, so it gives the block count)."""
    if len(planes) != len(spec.planes):
        raise ValueError(f"{spec.label} has {len(spec.planes)} planes "
                         f"({', '.join(p.name for p in spec.planes)}), got {len(planes)}")
    rows, nblocks = planes[-1].shape[0], planes[-1].shape[1] // spec.planes[-1].per_block
    return {p.name: np.ascontiguousarray(np.asarray(a)[:, :nblocks * p.per_block]).view(p.numpy)
            .reshape(rows * nblocks, p.per_block) for p, a in zip(spec.planes, planes)}


# ---- planes → float32 (the values ggml's dequantization gives, in its float32 operation order) ----

def _nibbles(quants: np.ndarray) -> np.ndarray:
    """(n, 16) bytes → (n, 32) values: byte j holds value j (low nibble) and value j + 16 (high nibble)."""
    return np.concatenate([quants & 0x0F, quants >> 4], axis=1)


def _bits(high: np.ndarray) -> np.ndarray:
    """(n, 32) bytes → (n, 256) bits: value 32b + l is bit b of byte l (q3_k's and q5_k's high-bit planes)."""
    n = high.shape[0]
    return ((high[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1).reshape(n, 256)


def _crumbs(quants: np.ndarray) -> np.ndarray:
    """(n, 64) bytes → (n, 256) 2-bit values: value 128h + 32s + l is bits 2s..2s+1 of byte 32h + l."""
    n = quants.shape[0]
    shifts = np.array([0, 2, 4, 6], np.uint8)[None, None, :, None]
    return ((quants.reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 256)


def _k_nibbles(quants: np.ndarray, group: int) -> np.ndarray:
    """(n, 128) bytes → (n, 256) 4-bit values, per `group` bytes: low nibbles first, then high nibbles."""
    grouped = quants.reshape(quants.shape[0], 128 // group, group)
    return np.stack([grouped & 0x0F, grouped >> 4], axis=2).reshape(quants.shape[0], 256)


def _scale_min_k4(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """q4_k/q5_k's 12 bytes → eight 6-bit scales and eight 6-bit mins (docs/FORMAT.md §5.4)."""
    low, mid, top = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([low & 0x3F, (top & 0x0F) | ((low >> 2) & 0x30)], axis=1)
    mins = np.concatenate([mid & 0x3F, (top >> 4) | ((mid >> 2) & 0x30)], axis=1)
    return scales, mins


def _q3_k_scales(packed: np.ndarray) -> np.ndarray:
    """q3_k's 12 bytes → sixteen signed 6-bit scales (docs/FORMAT.md §5.4): low 4 bits from bytes 0-7
    (sub-blocks 0-7 low nibbles, 8-15 high nibbles), high 2 bits from bytes 8-11 (2 bits per 4 sub-blocks)."""
    n = packed.shape[0]
    low = np.concatenate([packed[:, :8] & 0x0F, packed[:, :8] >> 4], axis=1)
    high = (packed[:, None, 8:12] >> np.array([0, 2, 4, 6], np.uint8)[None, :, None]).reshape(n, 16) & 3
    return (low | (high << 4)).astype(np.int8) - np.int8(32)


def _f32(x) -> np.ndarray:
    return x.astype(np.float32)


def _blocks_of_32(dtype: DType, f: dict) -> np.ndarray:
    """q8_0, q4_0, q4_1, q5_0, q5_1: levels times the block's scale (plus its min)."""
    d = _f32(f["scales"])  # (n, 1)
    if dtype is DType.Q8_0:
        return _f32(f["quants"]) * d
    if dtype is DType.Q4_0:
        return _f32(_nibbles(f["quants"]).astype(np.int8) - np.int8(8)) * d
    if dtype is DType.Q4_1:
        return d * _f32(_nibbles(f["quants"])) + _f32(f["mins"])
    q = _nibbles(f["quants"]) | (np.unpackbits(f["high"], axis=1, bitorder="little") << 4)
    if dtype is DType.Q5_0:
        return d * _f32(q.astype(np.int8) - np.int8(16))
    return d * _f32(q) + _f32(f["mins"])


def _q2_k(f: dict) -> np.ndarray:
    n, sub = f["quants"].shape[0], f["sub_scales"]
    scale = (_f32(f["scales"]) * _f32(sub & 0x0F))[..., None]
    low = (_f32(f["mins"]) * _f32(sub >> 4))[..., None]
    return (scale * _f32(_crumbs(f["quants"]).reshape(n, 16, 16)) - low).reshape(n, 256)


def _q3_k(f: dict) -> np.ndarray:
    n = f["quants"].shape[0]
    q = _crumbs(f["quants"]).astype(np.int8) - ((_bits(f["high"]) ^ 1) << 2).astype(np.int8)  # clear bit: minus 4
    scale = (_f32(f["scales"]) * _f32(_q3_k_scales(f["sub_scales"])))[..., None]
    return (scale * _f32(q).reshape(n, 16, 16)).reshape(n, 256)


def _q4_q5_k(f: dict) -> np.ndarray:
    n = f["quants"].shape[0]
    q = _k_nibbles(f["quants"], 32)
    if "high" in f:  # q5_k
        q = q | (_bits(f["high"]) << 4)
    scales, mins = _scale_min_k4(f["sub_scales"])
    scale, low = (_f32(f["scales"]) * _f32(scales))[..., None], (_f32(f["mins"]) * _f32(mins))[..., None]
    return (scale * _f32(q).reshape(n, 8, 32) - low).reshape(n, 256)


def _q6_k(f: dict) -> np.ndarray:
    n = f["quants"].shape[0]
    ql = _k_nibbles(f["quants"], 64).reshape(n, 8, 32)
    qh = _crumbs(f["high"]).reshape(n, 8, 32)
    q = (ql | (qh << 4)).astype(np.int8) - np.int8(32)
    return ((_f32(f["scales"]) * _f32(f["sub_scales"]))[..., None] * _f32(q).reshape(n, 16, 16)).reshape(n, 256)


_SUPER_BLOCKS = {DType.Q2_K: _q2_k, DType.Q3_K: _q3_k, DType.Q4_K: _q4_q5_k, DType.Q5_K: _q4_q5_k, DType.Q6_K: _q6_k}


def _dequantize_blocks(dtype: DType, fields: dict) -> np.ndarray:
    """(n, block) float32 values of n blocks given as fields (plane name → (n, per_block))."""
    if dtype in _SUPER_BLOCKS:
        return _SUPER_BLOCKS[dtype](fields)
    if not dtype.is_quantized:
        raise ValueError(f"{dtype.label} is not a quantized type")
    return _blocks_of_32(dtype, fields)


def dequantize(planes, cols: int, dtype) -> np.ndarray:
    """The planes of a quantized tensor (as `quantize`, `planes_from_ggml` or the reader give them)
    → float32 array (rows, cols): for every ggml type, bit for bit the values ggml computes.

    >>> q, s = quantize(np.arange(8, dtype=np.float32).reshape(1, 8), "q8_0")
    >>> dequantize((q, s), 8, "q8_0").round(1)
    array([[0., 1., 2., 3., 4., 5., 6., 7.]], dtype=float32)
    """
    dtype = DType.parse(dtype)
    spec = dtype.spec
    rows, nblocks = planes[-1].shape[0], planes[-1].shape[1] // spec.planes[-1].per_block
    values = _dequantize_blocks(dtype, _block_fields(spec, planes))
    return values.reshape(rows, nblocks * spec.block)[:, :cols]

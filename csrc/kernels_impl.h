/* Internals shared by the kernel sources: the per-ISA function table, number conversions,
 * the thread pool and the scratch workspace. Not part of the public API (kernels.h). */
#ifndef BLOBSTORE_KERNELS_IMPL_H
#define BLOBSTORE_KERNELS_IMPL_H

#include <float.h>
#include <math.h>
#include <string.h>

#include "kernels.h"

#if defined(_MSC_VER)
#define BLOB_INLINE static __forceinline
#else
#define BLOB_INLINE static inline __attribute__((always_inline))
#endif

/* Loop-unrolling hint for the register-tile loops (trip counts are compile-time constants once
 * inlined). clang unrolls them unasked and warns when a pragma meets a loop it already unrolled. */
#if defined(__GNUC__) && !defined(__clang__)
#define BLOB_UNROLL _Pragma("GCC unroll 16")
#else
#define BLOB_UNROLL
#endif

/* Hides where pointer p points from the optimizer. GCC otherwise keeps the address of every
 * element a fully unrolled loop reads from a stack array in a register of its own, spilled. */
#if defined(__GNUC__)
#define BLOB_OPAQUE(p) __asm__("" : "+r"(p))
#else
#define BLOB_OPAQUE(p) ((void)0)
#endif

#if defined(__x86_64__) || defined(_M_X64)
#define BLOB_HAVE_X86 1
#endif
#if defined(__aarch64__) || defined(_M_ARM64)
#define BLOB_HAVE_ARM64 1
#endif

static inline size_t blob_min(size_t a, size_t b) { return a < b ? a : b; }
static inline size_t blob_div_up(size_t a, size_t b) { return (a + b - 1) / b; }

/* Values per block of a dtype, 0 for one the kernels do not multiply (kernels.h's table). */
static inline size_t blob_dtype_block(int dtype) {
    static const unsigned short blocks[BLOB_NUM_DTYPES] = BLOB_DTYPE_BLOCKS;
    return dtype >= 0 && dtype < BLOB_NUM_DTYPES ? blocks[dtype] : 0;
}

/* Bytes per block of plane p of a dtype (kernels.h's table; 0 past its last plane). */
static inline size_t blob_plane_bytes(int dtype, int p) {
    static const unsigned char bytes[BLOB_NUM_DTYPES][BLOB_MAX_PLANES] = BLOB_DTYPE_PLANE_BYTES;
    return bytes[dtype][p];
}

/* Where row r of each plane of W starts: plane 0 by its padded row stride, the later planes
 * packed, nblocks * blob_plane_bytes apart. */
static inline void blob_row_planes(const blob_matrix *w, size_t r, const uint8_t **planes) {
    const size_t nblocks = blob_div_up(w->cols, blob_dtype_block(w->dtype));
    planes[0] = (const uint8_t *)w->plane[0] + r * w->row_stride_bytes;
    for (int p = 1; p < BLOB_MAX_PLANES; p++)
        planes[p] = w->plane[p] ? (const uint8_t *)w->plane[p] + r * nblocks * blob_plane_bytes(w->dtype, p) : NULL;
}

/* Bytes per element of a KV cache dtype (f32 or f16). */
static inline size_t blob_cache_elem_size(int dtype) { return dtype == BLOB_F16 ? 2 : 4; }

/* ---- number formats, bit-exact and free of any instruction-set extension ---- */

static inline float blob_bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t blob_f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline float blob_bf16_to_f32(uint16_t h) { return blob_bits_f32((uint32_t)h << 16); }

static inline float blob_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0x1f) return blob_bits_f32(sign | 0x7f800000u | (man << 13)); /* inf / nan */
    if (exp == 0) {
        /* zero or subnormal: man * 2^-24, exact in f32 */
        float v = (float)man * (1.0f / 16777216.0f);
        return sign ? -v : v;
    }
    return blob_bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}

/* f32 -> f16 bits, round to nearest even (the KV cache writer and the tests use it). */
static inline uint16_t blob_f32_to_f16(float f) {
    uint32_t u = blob_f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    uint32_t a = u & 0x7fffffffu;
    if (a >= 0x7f800000u) return sign | 0x7c00 | (a > 0x7f800000u ? 0x200 : 0);
    if (a >= 0x477ff000u) return sign | 0x7c00;                 /* rounds past 65504: inf */
    if (a < 0x38800000u) {                                      /* subnormal f16 or zero */
        float v = blob_bits_f32(a) * 16777216.0f;               /* exact scaling by 2^24 */
        return sign | (uint16_t)lrintf(v);                      /* lrint: ties to even */
    }
    uint32_t mant_odd = (a >> 13) & 1;
    a += 0xc8000fffu + mant_odd;                                /* rebias exponent, round */
    return sign | (uint16_t)(a >> 13);
}

/* The little-endian float16 at p (planes are packed bytes, so no alignment is assumed). */
static inline float blob_f16_at(const uint8_t *p) { return blob_f16_to_f32((uint16_t)(p[0] | p[1] << 8)); }

/* ---- q4_1 .. q6_k: GGUF's block formats, one ggml struct field per plane ---- */

/* One 32-value block of a q4_1 .. q6_k row as integers: value i = (d * sc[i/16]) * q[i] +
 * m * mn[i/16], as ggml dequantizes it (types without mins: m = mn = 0). Against activation
 * levels x with scale dx, the block's dot product is then
 *     dx * (d * (sc[0] S0 + sc[1] S1) + m * (mn[0] X0 + mn[1] X1))
 * with S_h the exact sum of q x over half h and X_h the sum of its x (blob_half_sums): the
 * k-quants' sub-blocks of 16 (q2_k, q3_k, q6_k) share the 32-block's activation scale. */
typedef struct blob_block32 {
    int8_t q[32];        /* levels: q4_1 0..15, q5_0 -16..15, q5_1 0..31, q2_k 0..3, q3_k -4..3,
                            q4_k 0..15, q5_k 0..31, q6_k -32..31 */
    int32_t sc[2], mn[2];
    float d, m;
} blob_block32;

/* Bits of `nbytes` little-endian bytes as one byte each (bit j -> out[j], 0 or 1): each byte
 * broadcast to eight, bit k kept in byte k, and a nonzero byte carried into its top bit. Plain
 * shifts by the bit index would not vectorize (SSE2 has no per-lane variable shift). */
static inline void blob_spread_bits(const uint8_t *bits, int nbytes, uint8_t *out) {
    for (int i = 0; i < nbytes; i++) {
        const uint64_t selected = (bits[i] * 0x0101010101010101ull) & 0x8040201008040201ull;
        const uint64_t ones = ((selected + 0x7f7f7f7f7f7f7f7full) & 0x8080808080808080ull) >> 7;
        memcpy(out + 8 * i, &ones, 8);   /* little-endian: byte k of `ones` is bit k */
    }
}

/* Sub-block j's 6-bit scale and min of q4_k / q5_k, packed in 12 bytes: j < 4 in the low six
 * bits of bytes j and j + 4; j >= 4 in byte j + 4's nibbles plus the top two bits of bytes
 * j - 4 (scale) and j (min). */
static inline void blob_k4_scale_min(const uint8_t *packed, int j, int32_t *sc, int32_t *mn) {
    if (j < 4) {
        *sc = packed[j] & 63;
        *mn = packed[j + 4] & 63;
    } else {
        *sc = (packed[j + 4] & 15) | ((packed[j - 4] >> 6) << 4);
        *mn = (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4);
    }
}

/* Sub-block i's (0..15) 6-bit scale of q3_k, minus its bias 32: the low four bits in byte i
 * (i < 8) or the high nibble of byte i - 8, the top two in byte 8 + i % 4 at bit 2 * (i / 4). */
static inline int32_t blob_k3_scale(const uint8_t *packed, int i) {
    const int low = i < 8 ? packed[i] & 15 : packed[i - 8] >> 4;
    const int high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
    return (low | high << 4) - 32;
}

/* Block b of a row whose planes start at p[0..] (blob_row_planes), decoded. For the k-quants
 * b = 8 * super-block + j, j the 32-value block in the super-block. */
BLOB_INLINE void blob_decode_block32(int dtype, const uint8_t *const *p, size_t b, blob_block32 *out) {
    const size_t sb = b / 8;
    const int j = (int)(b % 8);
    out->sc[0] = out->sc[1] = 1;
    out->mn[0] = out->mn[1] = 0;
    out->d = out->m = 0.0f;
    switch (dtype) {
    case BLOB_Q4_1: case BLOB_Q5_0: case BLOB_Q5_1: {
        /* byte i: value i in the low nibble, value i + 16 in the high one; 5th bits in `high` */
        const uint8_t *qs = p[0] + 16 * b;
        uint8_t high[32] = {0};
        if (dtype != BLOB_Q4_1) blob_spread_bits(p[1] + 4 * b, 4, high);
        const int offset = dtype == BLOB_Q5_0 ? 16 : 0;
        for (int i = 0; i < 16; i++) {
            out->q[i] = (int8_t)((int)((qs[i] & 15) | high[i] << 4) - offset);
            out->q[i + 16] = (int8_t)((int)((qs[i] >> 4) | high[i + 16] << 4) - offset);
        }
        const int scale_plane = dtype == BLOB_Q4_1 ? 1 : 2;
        out->d = blob_f16_at(p[scale_plane] + 2 * b);
        if (dtype != BLOB_Q5_0) {
            out->m = blob_f16_at(p[scale_plane + 1] + 2 * b);
            out->mn[0] = out->mn[1] = 1;
        }
        break;
    }
    case BLOB_Q2_K: {
        /* blocks 4n .. 4n+3 are bit pairs 0..3 of bytes 32n .. 32n+31; sub-scale byte: scale in
         * the low nibble, min in the high one */
        const uint8_t *qs = p[0] + 64 * sb + 32 * (j / 4), *sub = p[1] + 16 * sb + 2 * j;
        for (int l = 0; l < 32; l++) out->q[l] = (int8_t)((qs[l] >> (2 * (j % 4))) & 3);
        for (int h = 0; h < 2; h++) {
            out->sc[h] = sub[h] & 15;
            out->mn[h] = sub[h] >> 4;
        }
        out->d = blob_f16_at(p[2] + 2 * sb);
        out->m = -blob_f16_at(p[3] + 2 * sb);
        break;
    }
    case BLOB_Q3_K: {
        /* low bit pairs as q2_k's; bit j of high byte l set adds 4 (ggml subtracts 4 when clear) */
        const uint8_t *qs = p[0] + 64 * sb + 32 * (j / 4), *hm = p[1] + 32 * sb;
        for (int l = 0; l < 32; l++)
            out->q[l] = (int8_t)(((qs[l] >> (2 * (j % 4))) & 3) - (((hm[l] >> j) & 1) ? 0 : 4));
        for (int h = 0; h < 2; h++) out->sc[h] = blob_k3_scale(p[2] + 12 * sb, 2 * j + h);
        out->d = blob_f16_at(p[3] + 2 * sb);
        break;
    }
    case BLOB_Q4_K: case BLOB_Q5_K: {
        /* blocks 2c and 2c+1: low and high nibbles of bytes 32c .. 32c+31; q5_k's 5th bit of
         * value l of block j is bit j of high byte l */
        const int five = dtype == BLOB_Q5_K;
        const uint8_t *qs = p[0] + 128 * sb + 32 * (j / 2), *qh = five ? p[1] + 32 * sb : NULL;
        for (int l = 0; l < 32; l++)
            out->q[l] = (int8_t)(((qs[l] >> (4 * (j % 2))) & 15) + (five ? ((qh[l] >> j) & 1) << 4 : 0));
        blob_k4_scale_min(p[1 + five] + 12 * sb, j, &out->sc[0], &out->mn[0]);
        out->sc[1] = out->sc[0];
        out->mn[1] = out->mn[0];
        out->d = blob_f16_at(p[2 + five] + 2 * sb);
        out->m = -blob_f16_at(p[3 + five] + 2 * sb);
        break;
    }
    case BLOB_Q6_K: {
        /* half n = j / 4 of the super-block, quarter k = j % 4: low nibbles from bytes
         * 64n + 32(k & 1) + l (high nibble when k >= 2), top bit pair k of byte 32n + l */
        const int n = j / 4, k = j % 4;
        const uint8_t *ql = p[0] + 128 * sb + 64 * n + 32 * (k & 1), *qh = p[1] + 64 * sb + 32 * n;
        for (int l = 0; l < 32; l++)
            out->q[l] = (int8_t)((((ql[l] >> (4 * (k >> 1))) & 15) | (((qh[l] >> (2 * k)) & 3) << 4)) - 32);
        for (int h = 0; h < 2; h++) out->sc[h] = (int8_t)p[2][16 * sb + 2 * j + h];
        out->d = blob_f16_at(p[3] + 2 * sb);
        break;
    }
    default: memset(out->q, 0, sizeof out->q); break;   /* not a q4_1 .. q6_k type: zeros */
    }
}

/* How every path sums an output of a q4_1 .. q6_k product from its block values (the
 * reference: kernels_scalar.c's block32_tile): eight float partial sums ("lanes"), all starting
 * at +0; block b's value is added to lane b % BLOB_SUM_LANES, so each lane takes its blocks in
 * block order; the lanes are then folded in halves, lane l with lane l + 4, then l with l + 2,
 * then 0 with 1: ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)). A SIMD tile forms a group of
 * eight blocks' values in the lanes of one register and adds the register to its eight partial
 * sums in one instruction, where block order would chain eight dependent adds per group. A sum
 * started at +0 never becomes -0, so a block of zero weights and zero scales (value +-0) leaves
 * it as it is: a partial last group may be completed with such blocks. */
#define BLOB_SUM_LANES 8
/* That fold of eight partial sums `l` of any type, `add` the type's addition: a SIMD tile that
 * keeps each partial sum of several outputs in a register folds the registers with it. */
#define BLOB_FOLD_LANES(add, l) \
    add(add(add((l)[0], (l)[4]), add((l)[2], (l)[6])), add(add((l)[1], (l)[5]), add((l)[3], (l)[7])))
static inline float blob_add_f32(float a, float b) { return a + b; }
static inline float blob_fold_lanes(const float lanes[BLOB_SUM_LANES]) { return BLOB_FOLD_LANES(blob_add_f32, lanes); }

/* Value i of a decoded block as f32, with ggml's operations: (d * sc) * q, plus m * mn. Two
 * statements, so that no compiler contracts them into one fused multiply-add. */
static inline float blob_block32_value(const blob_block32 *blk, int i) {
    const float scaled = blk->d * (float)blk->sc[i / 16] * (float)blk->q[i];
    const float offset = blk->m * (float)blk->mn[i / 16];
    return scaled + offset;
}

/* One weight of a plain-dtype row, as f32. */
static inline float blob_weight_f32(const void *row, size_t k, int dtype) {
    switch (dtype) {
    case BLOB_F16: return blob_f16_to_f32(((const uint16_t *)row)[k]);
    case BLOB_BF16: return blob_bf16_to_f32(((const uint16_t *)row)[k]);
    default: return ((const float *)row)[k];
    }
}

/* One weight of a quantized row as its integer level (q8_0: int8, q4_0: nibble - 8). */
static inline int blob_weight_level(const uint8_t *row, size_t k, int dtype) {
    if (dtype == BLOB_Q4_0) {
        const uint8_t byte = row[(k / 32) * 16 + (k % 16)];
        return (int)((k % 32) < 16 ? (byte & 15) : (byte >> 4)) - 8;
    }
    return ((const int8_t *)row)[k];
}

/* Bytes of one group's block b of a BLOB_LAYOUT_INTERLEAVE8 matrix: eight rows' first-plane block. */
static inline size_t blob_interleave8_block_bytes(int dtype) {
    return BLOB_INTERLEAVE * blob_plane_bytes(dtype, 0);
}

/* Level k of row r, and the scale of its block b, of a q8_0 or q4_0 matrix in
 * BLOB_LAYOUT_INTERLEAVE8 (kernels.h): the reference every path's interleaved tiles and
 * blob_embed read it by. */
static inline int blob_interleave8_level(const blob_matrix *w, size_t r, size_t k) {
    const size_t nb = blob_div_up(w->cols, BLOB_QBLOCK), i = k % BLOB_QBLOCK, j = r % BLOB_INTERLEAVE;
    const uint8_t *block = (const uint8_t *)w->plane[0] +
                           (r / BLOB_INTERLEAVE * nb + k / BLOB_QBLOCK) * blob_interleave8_block_bytes(w->dtype);
    if (w->dtype == BLOB_Q4_0) {
        const uint8_t byte = block[32 * (i / 8) + 4 * j + i % 4];
        return (int)((i / 4) % 2 ? byte >> 4 : byte & 15) - 8;
    }
    return ((const int8_t *)block)[16 * (i / 2) + 2 * j + i % 2];
}
static inline float blob_interleave8_scale(const blob_matrix *w, size_t r, size_t b) {
    const size_t nb = blob_div_up(w->cols, BLOB_QBLOCK);
    return blob_f16_to_f32(((const uint16_t *)w->plane[1])[(r / BLOB_INTERLEAVE * nb + b) * BLOB_INTERLEAVE + r % BLOB_INTERLEAVE]);
}

/* Block b of row r of a q5_0 matrix in BLOB_LAYOUT_INTERLEAVE8 (kernels.h), decoded as
 * blob_decode_block32 decodes the planar one: the reference every path's interleaved q5_0
 * tiles and blob_embed read it by. Level i's nibble sits where q4_0's interleaved level i
 * does; its fifth bit is bit 4j + i % 4 of the group block's little-endian word i / 4. */
static inline void blob_interleave8_block32(const blob_matrix *w, size_t r, size_t b, blob_block32 *out) {
    const size_t nb = w->cols / BLOB_QBLOCK, j = r % BLOB_INTERLEAVE, block = r / BLOB_INTERLEAVE * nb + b;
    const uint8_t *nibbles = (const uint8_t *)w->plane[0] + block * blob_interleave8_block_bytes(BLOB_Q5_0);
    const uint8_t *fifth = (const uint8_t *)w->plane[1] + block * BLOB_INTERLEAVE * blob_plane_bytes(BLOB_Q5_0, 1);
    for (size_t i = 0; i < BLOB_QBLOCK; i++) {
        const uint8_t byte = nibbles[32 * (i / 8) + 4 * j + i % 4];
        const size_t bit = 32 * (i / 4) + 4 * j + i % 4;
        const int nibble = (i / 4) % 2 ? byte >> 4 : byte & 15, high = (fifth[bit / 8] >> (bit % 8)) & 1;
        out->q[i] = (int8_t)((nibble | high << 4) - 16);
    }
    out->sc[0] = out->sc[1] = 1;
    out->mn[0] = out->mn[1] = 0;
    out->d = blob_f16_at((const uint8_t *)w->plane[2] + 2 * (block * BLOB_INTERLEAVE + j));
    out->m = 0.0f;
}

/* 1/scale for activation quantization; blocks too small for a finite inverse become zeros. */
static inline float blob_inverse_scale(float scale) { return scale >= FLT_MIN ? 1.0f / scale : 0.0f; }

/* ---- gated activations ---- */

/* The argument z of the sigmoid in act(g) = g * sigmoid(z): z = g for SiLU; for GELU's tanh
 * approximation 0.5 g (1 + tanh(u)) = g * sigmoid(2u), u = sqrt(2/pi) (g + 0.044715 g^3). */
#define BLOB_GELU_SCALE 1.5957691216057308f   /* 2 sqrt(2/pi) */
#define BLOB_GELU_CUBIC 0.044715f

static inline float blob_act_arg(float g, int act) {
    return act == BLOB_ACT_GELU_TANH ? BLOB_GELU_SCALE * (g + BLOB_GELU_CUBIC * g * g * g) : g;
}

/* act(g) * u with libm's expf: the scalar path, and the reference the vector paths (whose exp
 * is the polynomial below) are tested against. */
static inline float blob_gated_act1(float g, float u, int act) {
    return g / (1.0f + expf(-blob_act_arg(g, act))) * u;
}

/* The vector paths' exp(x): x clamped to [BLOB_EXP_MIN, BLOB_EXP_MAX] (2^n then stays a normal
 * float), n = rint(x log2(e)), r = x - n ln(2) in two steps (ln 2 = LN2_HI + LN2_LO, LN2_HI
 * exact in few bits, so n * LN2_HI is exact), e^r by its Taylor polynomial of degree 7
 * (|r| <= ln(2)/2: truncation error below 1e-8), times 2^n built in the exponent bits. Within
 * a few ulp of expf; NaN stays NaN. */
#define BLOB_EXP_MIN (-87.0f)
#define BLOB_EXP_MAX 88.0f
#define BLOB_LOG2E 1.44269504088896341f
#define BLOB_LN2_HI 0.693359375f
#define BLOB_LN2_LO (-2.12194440e-4f)
#define BLOB_EXP_POLY {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}

/* exp(x) computed alike by every path, scalar and vector, bit for bit (attention's softmax,
 * whose outputs the paths' decode, batched and prefill runs must agree on): exp8's steps
 * (BLOB_EXP_*) without fused multiply-adds, which the scalar baseline lacks, each product and
 * sum rounded in a statement of its own (no compiler contracts them), and n = rint(x log2(e))
 * by adding and subtracting 1.5 * 2^23 (round to nearest even; |x log2(e)| <= 127 here).
 * n * LN2_HI is exact, so the first reduction step rounds once, as a fused one would. Within
 * a few ulp of expf; NaN stays NaN. */
#define BLOB_ROUND_SHIFTER 12582912.0f   /* 1.5 * 2^23 */
static inline float blob_exp_same(float x) {
    static const float poly[] = BLOB_EXP_POLY;
    if (x != x) return x;
    if (x < BLOB_EXP_MIN) x = BLOB_EXP_MIN;
    if (x > BLOB_EXP_MAX) x = BLOB_EXP_MAX;
    float n = x * BLOB_LOG2E;
    n = n + BLOB_ROUND_SHIFTER;
    n = n - BLOB_ROUND_SHIFTER;
    const float hi = n * BLOB_LN2_HI, lo = n * BLOB_LN2_LO;
    float r = x - hi;
    r = r - lo;
    float p = poly[0];
    for (size_t i = 1; i < sizeof poly / sizeof *poly; i++) {
        p = p * r;
        p = p + poly[i];
    }
    return p * blob_bits_f32((uint32_t)((int32_t)n + 127) << 23);
}

/* ---- RMSNorm ---- */

/* 1 / rms of a row of d floats whose squares up to x[k) are summed, in double (exact enough for
 * any d), in eight running sums `lanes` (element i of each eight in lane i): the rest go into
 * lane 0, then the lanes are added pairwise. Every path ends its sums here, so they agree bit
 * for bit. */
static inline float blob_inv_rms(double lanes[8], const float *x, size_t k, size_t d, float eps) {
    for (; k < d; k++) lanes[0] += (double)x[k] * x[k];
    const double total = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    return (float)(1.0 / sqrt(total / (double)d + (double)eps));
}

/* ---- the per-ISA function table ---- */

/* Width of the activation levels a quantized weight dtype is multiplied with. q8_0 takes int16
 * activations: against its 8-bit weights, int8 activations added as much error again (Gemma 3
 * 270M: mean KL to f32 0.0030 with int8 against 0.00066 with f32 activations, which int16
 * matches), and int8 x int16 products still sum exactly in int32. q4_0's weights dominate its
 * error (same model: KL 0.565 with int8 activations, 0.555 with f32), so it keeps int8
 * activations and one byte dot product per block (VPMADDUBSW, VPDPBUSD, SDOT). */
static inline int blob_act_bits(int dtype) { return dtype == BLOB_Q4_0 ? 8 : 16; }

/* Whether a dtype's int16 activation levels hold int8 ones (|level| <= 127, blob_act_qmax(8)):
 * q4_k's, so that its prefill multiplies bytes (64 products a VPDPBUSD, not VPDPWSSD's 32) while
 * every tile that reads int16 levels stays exact. Its 4-bit weights dominate the error as q4_0's
 * do: trained models' q4_k_m mixes gained 0.8-2.5 % of KL divergence to f32 (docs/CONVERT.md). */
static inline int blob_act_int8_levels(int dtype) { return dtype == BLOB_Q4_0 || dtype == BLOB_Q4_K; }

/* The types of GGUF's numbers (q4_1 .. q6_k), multiplied through blob_block32 below with int16
 * activations, whose block sums (blob_half_sums) their mins need. */
static inline int blob_is_block32_type(int dtype) { return dtype >= BLOB_Q4_1 && dtype <= BLOB_Q6_K; }
static inline int blob_has_mins(int dtype) {
    return dtype == BLOB_Q4_1 || dtype == BLOB_Q5_1 || dtype == BLOB_Q2_K || dtype == BLOB_Q4_K || dtype == BLOB_Q5_K;
}

/* The largest activation level of a width: a block's scale is amax / this. int16 levels stop
 * at 127 * 257 = 32639 so that each splits into two signed bytes, hi = round(x / 256) and
 * x - 256 hi, for the int8 dot instructions (SDOT); the lost range is 0.4 %. */
static inline float blob_act_qmax(int bits) { return bits == 16 ? 32639.0f : 127.0f; }

/* blob_isa_ops.reads_levels: blob_acts.split, blob_acts.lanes (BLOB_READS_CROSSED: blob_lane_levels'
 * crossed arrangement); BLOB_READS_QUADS: the prefill tile of a blob_act_int8_levels type reads
 * blob_acts.quads in place of blob_acts.pairs */
enum { BLOB_READS_SPLIT = 1, BLOB_READS_LANES = 2, BLOB_READS_CROSSED = 4, BLOB_READS_QUADS = 8 };

/* Activations of a matrix product: X (n, cols) f32, and for quantized weights the same rows
 * quantized to blocks of 32 levels, int8 in q8 or int16 in q16 as blob_act_bits says (the
 * other pointer is unused): token t's levels at q8/q16 + t*q_stride, its block scales at
 * d + t*nblocks, and with int8 levels the sum of each block's levels (exact in f32) at
 * sums + t*nblocks (blob_level_sums). */
typedef struct blob_acts {
    const float *x;
    size_t x_stride;
    const int8_t *q8;
    const int16_t *q16;
    const float *d;
    size_t q_stride, nblocks;
    const float *sums;
    const int32_t *half_sums;   /* q4_1 .. q6_k: the level sum of each 16 values, (n, 2*nblocks) */
    /* q4_1 .. q6_k: the int16 levels split in two int8 planes (blob_split_levels), token t's
     * at split + t * 2 * q_stride: block b's 32 hi bytes at 64b, its 32 lo bytes at 64b + 32 */
    const int8_t *split;
    /* q4_1 .. q6_k prefill (blob_isa_ops.mm_any_tokens): the int16 levels rearranged by
     * blob_pair_levels, token t's at pairs + t * blob_pair_stride(nblocks) */
    const int16_t *pairs;
    /* q4_k .. q6_k decode: the split levels of each whole group rearranged by blob_lane_levels
     * (crossed where reads_levels says BLOB_READS_CROSSED), token t's at lanes + t * 2 * q_stride,
     * or NULL */
    const int8_t *lanes;
    /* bf16 prefill on a path whose blob_isa_ops.bf16_even_odd is set: X rearranged by
     * blob_even_odd_columns, token t's at even_odd + t * blob_even_odd_stride(cols) */
    const float *even_odd;
    /* q4_k prefill on a path that reads them (BLOB_READS_QUADS): its int8 levels rearranged by
     * blob_quad_levels, token t's at quads + t * blob_pair_stride(nblocks) */
    const int8_t *quads;
} blob_acts;

/* The level sum of each of `nblocks` blocks of int8 levels. The x86 q4_0 tiles multiply the
 * stored nibbles (level + 8) and take 8 x sum x scale off per block afterwards. */
static inline void blob_level_sums(const int8_t *q, size_t nblocks, float *sums) {
    for (size_t b = 0; b < nblocks; b++) {
        int total = 0;
        for (int k = 0; k < BLOB_QBLOCK; k++) total += q[b * BLOB_QBLOCK + k];
        sums[b] = (float)total;
    }
}

/* The level sum of each half (16 levels) of `nblocks` blocks of int16 levels: exact in int32. */
static inline void blob_half_sums(const int16_t *q, size_t nblocks, int32_t *sums) {
    for (size_t h = 0; h < 2 * nblocks; h++) {
        int32_t total = 0;
        for (int k = 0; k < BLOB_QBLOCK / 2; k++) total += q[h * (BLOB_QBLOCK / 2) + k];
        sums[h] = total;
    }
}

/* Each int16 level x of `nblocks` blocks as two bytes, x = 256 hi + lo with hi = floor((x + 128)
 * / 256) in -127..127 (|x| <= 32639, blob_act_qmax) and lo in -128..127: a weight byte then
 * meets them with two byte dot products (VPMADDUBSW, VPDPBUSD) in place of being widened to
 * int16, and 256 (w . hi) + w . lo is exactly w . x. Out: per block 32 hi bytes, then 32 lo. */
static inline void blob_split_level(int x, int8_t *hi, int8_t *lo) {
    const int h = (x + 128) >> 8;   /* arithmetic shift: floor */
    *hi = (int8_t)h;
    *lo = (int8_t)(x - 256 * h);
}
static inline void blob_split_levels(const int16_t *q, size_t nblocks, int8_t *out) {
    for (size_t b = 0; b < nblocks; b++)
        for (int k = 0; k < BLOB_QBLOCK; k++) blob_split_level(q[b * BLOB_QBLOCK + k], out + 64 * b + k, out + 64 * b + 32 + k);
}

/* The split levels of each whole group of eight blocks (256 levels, 512 bytes) rearranged so
 * that a block's sums land in a lane of their own in a byte dot product (VPDPBUSD) against
 * weights arranged alike, with no reduction across lanes: vector pair (k, s), k = 0..3, s = 0
 * (even blocks) or 1 (odd), is 32 hi bytes then 32 lo bytes at 128k + 64s, and its 4-byte lane
 * l holds levels 4k .. 4k + 3 (l < 4) or 16 + 4k .. 16 + 4k + 3 (l >= 4) of block 2 (l % 4) + s;
 * `crossed`: of block 2 (l % 4) + (s xor l >= 4), the upper halves of the pair's two vectors
 * swapped, which x86's q4_k weights take with one mask a vector (q4_k_crossed_bytes).
 * x86's q4_k (crossed), q5_k and q6_k decode tiles read them; a partial last group is left out. */
static inline void blob_lane_levels(const int16_t *q, size_t nblocks, int crossed, int8_t *out) {
    for (size_t g = 0; g < nblocks / 8; g++)
        for (int k = 0; k < 4; k++)
            for (int s = 0; s < 2; s++)
                for (int l = 0; l < 8; l++)
                    for (int e = 0; e < 4; e++) {
                        const int block = 2 * (l % 4) + (s ^ (crossed && l >= 4)), level = 4 * k + 16 * (l / 4) + e;
                        int8_t *v = out + 512 * g + 128 * k + 64 * s + 4 * l + e;
                        blob_split_level(q[256 * g + BLOB_QBLOCK * block + level], v, v + 32);
                    }
}

/* The int16 levels of each group of eight blocks (256 levels) rearranged so that vector i of
 * the group (16 levels) holds, in its int32 lane j, levels 2i and 2i + 1 of block j: a
 * multiply-add of pairs (VPMADDWD) against weights arranged alike then sums each block in a lane
 * of its own. A last partial group is completed with zeros: out holds blob_pair_stride levels. */
static inline size_t blob_pair_stride(size_t nblocks) { return blob_div_up(nblocks, 8) * 8 * BLOB_QBLOCK; }
static inline void blob_pair_levels(const int16_t *q, size_t nblocks, int16_t *out) {
    for (size_t g = 0; g < blob_div_up(nblocks, 8); g++)
        for (size_t i = 0; i < 16; i++)
            for (size_t j = 0; j < 8; j++)
                for (size_t e = 0; e < 2; e++)
                    out[256 * g + 16 * i + 2 * j + e] = 8 * g + j < nblocks ? q[256 * g + 32 * j + 2 * i + e] : 0;
}

/* The int8 levels (held in int16: blob_act_int8_levels) of each group of eight blocks rearranged
 * so that 32-byte vector i of the group holds, in its 4-byte lane j, levels 4i .. 4i + 3 of
 * block j: a byte dot product (VPDPBUSD) against weights arranged alike then sums each block in
 * a lane of its own. A last partial group is completed with zeros: out holds blob_pair_stride
 * bytes. */
static inline void blob_quad_levels(const int16_t *q, size_t nblocks, int8_t *out) {
    for (size_t g = 0; g < blob_div_up(nblocks, 8); g++)
        for (size_t i = 0; i < 8; i++)
            for (size_t j = 0; j < 8; j++)
                for (size_t e = 0; e < 4; e++)
                    out[256 * g + 32 * i + 4 * j + e] = 8 * g + j < nblocks ? (int8_t)q[256 * g + 32 * j + 4 * i + e] : 0;
}

/* The f32 activations of each BLOB_EVEN_ODD_COLS columns with the even columns first, then the
 * odd ones (zeros past cols): a 512-bit load of 32 bf16 weights holds two in each 32-bit lane,
 * the lane shifted left by 16 bits being the even column's weight as f32 and the lane masked to
 * its upper half the odd one's, so that such a tile widens 32 weights with two instructions
 * (kernels_avx512.c). out holds blob_even_odd_stride(cols) floats. */
#define BLOB_EVEN_ODD_COLS 32
static inline size_t blob_even_odd_stride(size_t cols) { return blob_div_up(cols, BLOB_EVEN_ODD_COLS) * BLOB_EVEN_ODD_COLS; }
static inline void blob_even_odd_columns(const float *x, size_t cols, float *out) {
    const size_t half = BLOB_EVEN_ODD_COLS / 2, whole = cols / BLOB_EVEN_ODD_COLS * BLOB_EVEN_ODD_COLS;
    for (size_t c = 0; c < whole; c += BLOB_EVEN_ODD_COLS)
        for (size_t j = 0; j < half; j++) {
            out[c + j] = x[c + 2 * j];
            out[c + half + j] = x[c + 2 * j + 1];
        }
    for (size_t k = whole; k < blob_even_odd_stride(cols); k++)   /* the last, partial run */
        out[whole + (k % 2) * half + (k - whole) / 2] = k < cols ? x[k] : 0.0f;
}

/* Token t's activation levels for `dtype` weights: int8_t or int16_t, per blob_act_bits. */
BLOB_INLINE const void *blob_act_levels(const blob_acts *a, size_t t, int dtype) {
    if (blob_act_bits(dtype) == 16) return a->q16 + t * a->q_stride;
    return a->q8 + t * a->q_stride;
}

/* Y[t][r] for rows r0 .. r0+nr-1 and tokens t0 .. t0+nt-1, nr <= tile rows, nt <= tile tokens. */
typedef void (*blob_tile_fn)(const blob_matrix *w, size_t r0, size_t nr, const blob_acts *a,
                             size_t t0, size_t nt, float *y, size_t y_stride);

typedef struct blob_isa_ops {
    /* matvec: tile of mv_rows rows x 1 token; matmul: mm_rows x mm_tokens;
     * matvec_row: rows r0 .. r0+nr-1 (any nr) one at a time x 1 token, for rows too long for
     * matvec's (see matmul.c) */
    blob_tile_fn matvec[BLOB_NUM_DTYPES], matmul[BLOB_NUM_DTYPES], matvec_row[BLOB_NUM_DTYPES];
    /* matvec_tokens: rows r0 .. r0+nr-1 (any nr) one at a time x up to BLOB_MVT_TOKENS tokens,
     * each block of a row loaded once for all of them (a batched decode step), every output
     * bit-identical to matvec_row's. Quantized types only (NULL for f32 / f16 / bf16, whose
     * one-row tile sums in an order of its own). */
    blob_tile_fn matvec_tokens[BLOB_NUM_DTYPES];
    int mv_rows, mm_rows, mm_tokens;
    /* X (n,) -> ceil(n/32) blocks of 32 levels (zero-padded) with f32 scales d = amax/QMAX and
     * levels rint(x * (1/d)): int8 with QMAX 127, int16 with QMAX 32639 */
    void (*quantize_row)(const float *x, size_t n, int8_t *q, float *d);
    void (*quantize_row16)(const float *x, size_t n, int16_t *q, float *d);
    /* Y_h (n,) = sum over i < count of alpha_h[i] * rows[i], for h < heads (Y_h at y + h*y_stride,
     * alpha_h at alpha + h*alpha_stride), over rows of n values in `dtype` (f32 or f16), row i at
     * rows + i*stride elements: attention's weighted sum of values for the query heads that
     * share them, each row read once for all of them. Every element is the same on each path
     * whatever `heads`: +0, then one multiply-add per row in row order (fused on the vector
     * paths, multiply then add on scalar and in the tails past a multiple of 8). */
    void (*weighted_rows)(float *y, size_t y_stride, const float *alpha, size_t alpha_stride, size_t heads,
                          const void *rows, size_t stride, size_t count, size_t n, int dtype);
    /* out[k] = act(gate[k]) * up[k] for k < count (blob_gated_act1); out may be gate */
    void (*gated_act)(const float *gate, const float *up, size_t count, int act, float *out);
    /* out = x * blob_inv_rms(sum of x[k]^2 in double) * (offset + w), one row of d; out may be x */
    void (*rms_norm_row)(const float *x, const float *w, size_t d, float eps, float offset, float *out);
    /* x = softmax(x * scale), one row of d in place; vector paths exponentiate with the
     * polynomial (BLOB_EXP_*) and sum in lanes */
    void (*softmax_row)(float *x, size_t d, float scale);
    /* x[k] = blob_exp_same(x[k] - shift) for k < d, in place: the same function on every path */
    void (*exp_row)(float *x, size_t d, float shift);
    /* sum of the 64-bit words of `nbytes` (a multiple of 64) bytes: the bandwidth probe */
    uint64_t (*read_sum)(const void *data, size_t nbytes);
    /* Per dtype, 1 when its matmul tile takes any number of tokens (mm_rows x nt), so that it
     * unpacks each weight block once for all of them; 0: at most mm_tokens per call. */
    unsigned char mm_any_tokens[BLOB_NUM_DTYPES];
    /* Per dtype, the rows a call of its prefill (matmul) tile takes where that is not mm_rows, 0
     * elsewhere: the tile then takes any nr up to it (kernels_avx512_kquant.inc's q4_k and q6_k,
     * kernels_avx512.c's f16 and bf16: a work item's 16 rows, each token's activations read once
     * for all of them). */
    unsigned char mm_tile_rows[BLOB_NUM_DTYPES];
    /* Per dtype, which arrangements of the int16 levels beside q16 this path's planar tiles (and
     * its one-token interleaved q5_0 tile) read, BLOB_READS_SPLIT | BLOB_READS_LANES (and
     * BLOB_READS_CROSSED for the crossed lanes): matmul.c makes only those, a pass over the
     * activations each. */
    unsigned char reads_levels[BLOB_NUM_DTYPES];
    /* Per dtype that has BLOB_LAYOUT_INTERLEAVE8 (q8_0, q4_0, q5_0), the tile of that layout,
     * decode and prefill alike: rows r0 .. r0+nr-1 (r0 a multiple of 8, nr <= BLOB_INTERLEAVE8_ROWS)
     * and any nt tokens, every output exactly the scalar reference's planar one (q8_0, q4_0:
     * quant_tile's sum, each block's exact integer dot, then acc += (float)dot * (dw * dx) in
     * block order; q5_0: block32_tile's, in the lanes of blob_fold_lanes). */
    blob_tile_fn interleave8[BLOB_NUM_DTYPES];
    /* Attention's key scores where a path has a kernel of its own for them, else NULL (attention.c
     * then runs the matmul tiles, the heads as tokens): scores[h * scores_stride + j] = Q_h . K_j
     * for h < heads and j < count, Q_h at q + h * head_dim, key j at keys + j * stride elements
     * (f32 or f16). Each score is the same sum in the same order whatever `heads` and `count`,
     * so a query's scores are the same in decode and prefill. Attention's own entry, not the f32
     * matmul tile: f32 weights keep theirs. */
    void (*key_scores)(const float *q, size_t heads, size_t head_dim, const void *keys, size_t stride, size_t count,
                       int dtype, float *scores, size_t scores_stride);
    /* 1 when this path's bf16 matmul tile reads the activations from blob_acts.even_odd, which
     * matmul.c then makes for every bf16 prefill */
    unsigned char bf16_even_odd;
} blob_isa_ops;

/* Token row x (cols values) quantized for `dtype` weights: blocks of levels, blob_act_bits wide,
 * at q, and their scales at d; int8 ones widened in place where int16 levels hold them. */
static inline void blob_quantize_acts(const blob_isa_ops *ops, int dtype, const float *x, size_t cols, void *q, float *d) {
    if (!blob_act_int8_levels(dtype)) {
        ops->quantize_row16(x, cols, (int16_t *)q, d);
        return;
    }
    ops->quantize_row(x, cols, (int8_t *)q, d);
    if (blob_act_bits(dtype) == 16)   /* backwards: level k's two bytes lie at or after byte k */
        for (size_t k = blob_div_up(cols, BLOB_QBLOCK) * BLOB_QBLOCK; k-- > 0;) ((int16_t *)q)[k] = ((const int8_t *)q)[k];
}

#define BLOB_INTERLEAVE8_ROWS 16   /* rows per call of an interleave8 tile: two groups */

/* Largest tile any path uses (sizes the tile kernels' local arrays). */
#define BLOB_TILE_MAX_ROWS 4
#define BLOB_TILE_MAX_TOKENS 4

/* The R row pointers of a tile; rows past the matrix repeat its last row, so a tile kernel
 * always runs its full register tile and simply does not store the surplus results. */
BLOB_INLINE void blob_tile_rows(const blob_matrix *w, size_t r0, size_t nr, int R,
                                const uint8_t **rows) {
    for (int r = 0; r < R; r++)
        rows[r] = (const uint8_t *)w->plane[0] + (r0 + blob_min((size_t)r, nr - 1)) * w->row_stride_bytes;
}

/* The T token indices of a tile, repeating the last token likewise. */
BLOB_INLINE void blob_tile_tokens(size_t t0, size_t nt, int T, size_t *tokens) {
    for (int t = 0; t < T; t++) tokens[t] = t0 + blob_min((size_t)t, nt - 1);
}

/* The activation rows of a tile's T tokens, repeating the last past nt (blob_tile_tokens):
 * token t's at x + t * x_stride (blob_acts.x, or an arrangement of it such as even_odd). */
BLOB_INLINE void blob_tile_xs(const float *x, size_t x_stride, size_t t0, size_t nt, int T, const float **xs) {
    size_t tokens[BLOB_TILE_MAX_TOKENS];
    blob_tile_tokens(t0, nt, T, tokens);
    BLOB_UNROLL
    for (int t = 0; t < T; t++) xs[t] = x + tokens[t] * x_stride;
}

/* A tile's outputs into y: sums[r][t] for its nr rows from r0 and nt tokens from t0 (a tile
 * kernel's surplus rows and tokens are not stored). */
BLOB_INLINE void blob_store_tile(float sums[][BLOB_TILE_MAX_TOKENS], size_t r0, size_t nr, size_t t0, size_t nt,
                                 float *y, size_t ys) {
    for (size_t r = 0; r < nr; r++)
        for (size_t t = 0; t < nt; t++) y[(t0 + t) * ys + r0 + r] = sums[r][t];
}

/* A path's tile functions, one per (dtype, tile shape): mv_<type>, mm_<type>, mv1_<type> and
 * mvt_<type> (matvec, matmul, matvec_row, matvec_tokens; no mvt_ for the float types).
 * BLOB_DEFINE_TILES defines those of the five original types, each calling the path's generic
 * float_tile or quant_tile with constants the compiler specializes on; `attr` is the path's
 * target attribute. A path defines the q4_1 .. q6_k ones with its own tiles, or with
 * BLOB_SCALAR_TILES(type), which forwards to the scalar reference. BLOB_TILE_TABLE lists them
 * all in blob_isa_ops order. */
#define BLOB_TILE_FN(attr, name, body, dtype, R, T)                                            \
    static attr void name(const blob_matrix *w, size_t r0, size_t nr, const blob_acts *a,      \
                          size_t t0, size_t nt, float *y, size_t ys) {                         \
        body(w, r0, nr, a, t0, nt, y, ys, dtype, R, T);                                        \
    }
/* The one-row tile run over nr rows in turn, in one call: short rows (Gemma's 640 columns) cost
 * about as much again in per-call overhead as in work when called row by row. */
#define BLOB_ROWS_FN(attr, name, body, dtype)                                                  \
    static attr void name(const blob_matrix *w, size_t r0, size_t nr, const blob_acts *a,      \
                          size_t t0, size_t nt, float *y, size_t ys) {                         \
        for (size_t r = r0; r < r0 + nr; r++) body(w, r, 1, a, t0, nt, y, ys, dtype, 1, 1);  \
    }
/* The one-row tile over nr rows in turn, each against the nt <= BLOB_MVT_TOKENS tokens at
 * once: a row's blocks are loaded once for all of them, and each (row, token) output is the
 * same sum, in the same order, as the one-token tile's (every path's quantized tiles form each
 * output alone, whatever the tile shape); the independent sums also hide the latency of each
 * one's chain of adds. A tile of exactly nt tokens: a full one would repeat the last token's
 * work. */
#define BLOB_MVT_TOKENS 4
_Static_assert(BLOB_MVT_TOKENS <= BLOB_TILE_MAX_TOKENS, "the switch below takes 1 .. 4 tokens");
#define BLOB_TOKENS_FN(attr, name, body, dtype)                                                \
    static attr void name(const blob_matrix *w, size_t r0, size_t nr, const blob_acts *a,      \
                          size_t t0, size_t nt, float *y, size_t ys) {                         \
        for (size_t r = r0; r < r0 + nr; r++) {                                                \
            switch (nt) {                                                                      \
            case 1: body(w, r, 1, a, t0, 1, y, ys, dtype, 1, 1); break;                        \
            case 2: body(w, r, 1, a, t0, 2, y, ys, dtype, 1, 2); break;                        \
            case 3: body(w, r, 1, a, t0, 3, y, ys, dtype, 1, 3); break;                        \
            default: body(w, r, 1, a, t0, 4, y, ys, dtype, 1, 4); break;                       \
            }                                                                                  \
        }                                                                                      \
    }
#define BLOB_DEFINE_TILES(attr, mv_rows, mm_rows, mm_tokens)                                   \
    _Static_assert(mv_rows <= BLOB_TILE_MAX_ROWS && mm_rows <= BLOB_TILE_MAX_ROWS &&           \
                   mm_tokens <= BLOB_TILE_MAX_TOKENS, "tile larger than BLOB_TILE_MAX_*");     \
    BLOB_TILE_FN(attr, mv_f32, float_tile, BLOB_F32, mv_rows, 1)                               \
    BLOB_TILE_FN(attr, mv_f16, float_tile, BLOB_F16, mv_rows, 1)                               \
    BLOB_TILE_FN(attr, mv_bf16, float_tile, BLOB_BF16, mv_rows, 1)                             \
    BLOB_TILE_FN(attr, mv_q8_0, quant_tile, BLOB_Q8_0, mv_rows, 1)                             \
    BLOB_TILE_FN(attr, mv_q4_0, quant_tile, BLOB_Q4_0, mv_rows, 1)                             \
    BLOB_TILE_FN(attr, mm_f32, float_tile, BLOB_F32, mm_rows, mm_tokens)                       \
    BLOB_TILE_FN(attr, mm_f16, float_tile, BLOB_F16, mm_rows, mm_tokens)                       \
    BLOB_TILE_FN(attr, mm_bf16, float_tile, BLOB_BF16, mm_rows, mm_tokens)                     \
    BLOB_TILE_FN(attr, mm_q8_0, quant_tile, BLOB_Q8_0, mm_rows, mm_tokens)                     \
    BLOB_TILE_FN(attr, mm_q4_0, quant_tile, BLOB_Q4_0, mm_rows, mm_tokens)                     \
    BLOB_ROWS_FN(attr, mv1_f32, float_tile, BLOB_F32)                                          \
    BLOB_ROWS_FN(attr, mv1_f16, float_tile, BLOB_F16)                                          \
    BLOB_ROWS_FN(attr, mv1_bf16, float_tile, BLOB_BF16)                                        \
    BLOB_ROWS_FN(attr, mv1_q8_0, quant_tile, BLOB_Q8_0)                                        \
    BLOB_ROWS_FN(attr, mv1_q4_0, quant_tile, BLOB_Q4_0)                                        \
    BLOB_TOKENS_FN(attr, mvt_q8_0, quant_tile, BLOB_Q8_0)                                      \
    BLOB_TOKENS_FN(attr, mvt_q4_0, quant_tile, BLOB_Q4_0)

/* The scalar reference tile of a q4_1 .. q6_k type (kernels_scalar.c): any nr rows and
 * nt <= BLOB_TILE_MAX_TOKENS tokens, so it serves as every path's matvec, matmul, matvec_row
 * and matvec_tokens tile of the type until the path has its own. */
#define BLOB_DECLARE_SCALAR_TILE(type)                                                         \
    void blob_scalar_tile_##type(const blob_matrix *w, size_t r0, size_t nr, const blob_acts *a, \
                                 size_t t0, size_t nt, float *y, size_t ys);
BLOB_DECLARE_SCALAR_TILE(q4_1)
BLOB_DECLARE_SCALAR_TILE(q5_0)
BLOB_DECLARE_SCALAR_TILE(q5_1)
BLOB_DECLARE_SCALAR_TILE(q2_k)
BLOB_DECLARE_SCALAR_TILE(q3_k)
BLOB_DECLARE_SCALAR_TILE(q4_k)
BLOB_DECLARE_SCALAR_TILE(q5_k)
BLOB_DECLARE_SCALAR_TILE(q6_k)
/* The scalar reference's tiles of interleaved q8_0, q4_0 and q5_0 rows. */
void blob_scalar_interleave8_q8_0(const blob_matrix *w, size_t r0, size_t nr, const blob_acts *a, size_t t0,
                                  size_t nt, float *y, size_t ys);
void blob_scalar_interleave8_q4_0(const blob_matrix *w, size_t r0, size_t nr, const blob_acts *a, size_t t0,
                                  size_t nt, float *y, size_t ys);
void blob_scalar_interleave8_q5_0(const blob_matrix *w, size_t r0, size_t nr, const blob_acts *a, size_t t0,
                                  size_t nt, float *y, size_t ys);
/* A tile of `shape` (mv, mm, mv1, mvt) that forwards to the scalar reference of `type`. */
#define BLOB_SCALAR_TILE(shape, type)                                                          \
    static void shape##_##type(const blob_matrix *w, size_t r0, size_t nr, const blob_acts *a, \
                               size_t t0, size_t nt, float *y, size_t ys) {                    \
        blob_scalar_tile_##type(w, r0, nr, a, t0, nt, y, ys);                                  \
    }
#define BLOB_SCALAR_TILES(type)                                                                \
    BLOB_SCALAR_TILE(mv, type) BLOB_SCALAR_TILE(mm, type) BLOB_SCALAR_TILE(mv1, type)          \
    BLOB_SCALAR_TILE(mvt, type)

/* One tile array of blob_isa_ops, indexed by dtype (NULL for u8 .. i64). */
#define BLOB_DTYPE_TILES(shape)                                                                \
    {[BLOB_F32] = shape##_f32, [BLOB_F16] = shape##_f16, [BLOB_BF16] = shape##_bf16,           \
     [BLOB_Q8_0] = shape##_q8_0, [BLOB_Q4_0] = shape##_q4_0, [BLOB_Q4_1] = shape##_q4_1,       \
     [BLOB_Q5_0] = shape##_q5_0, [BLOB_Q5_1] = shape##_q5_1, [BLOB_Q2_K] = shape##_q2_k,       \
     [BLOB_Q3_K] = shape##_q3_k, [BLOB_Q4_K] = shape##_q4_k, [BLOB_Q5_K] = shape##_q5_k,       \
     [BLOB_Q6_K] = shape##_q6_k}
/* The quantized types' tiles of one shape, NULL for the float types. */
#define BLOB_QUANT_TILES(shape)                                                                \
    {[BLOB_Q8_0] = shape##_q8_0, [BLOB_Q4_0] = shape##_q4_0, [BLOB_Q4_1] = shape##_q4_1,       \
     [BLOB_Q5_0] = shape##_q5_0, [BLOB_Q5_1] = shape##_q5_1, [BLOB_Q2_K] = shape##_q2_k,       \
     [BLOB_Q3_K] = shape##_q3_k, [BLOB_Q4_K] = shape##_q4_k, [BLOB_Q5_K] = shape##_q5_k,       \
     [BLOB_Q6_K] = shape##_q6_k}
#define BLOB_TILE_TABLE(mv_rows, mm_rows, mm_tokens)                                           \
    BLOB_DTYPE_TILES(mv), BLOB_DTYPE_TILES(mm), BLOB_DTYPE_TILES(mv1), BLOB_QUANT_TILES(mvt),  \
    mv_rows, mm_rows, mm_tokens

/* A vector path's weighted_rows, `name`, over its register tile `tile`(y, ys, alpha, as, rows, step,
 * count, k, dtype, H, C), which sums columns k .. k+LC-1 of H <= WR_HEADS heads with every row
 * loaded once for all of them (C <= `columns` vectors of L = `lanes` columns). Up to WR_HEADS
 * heads at a time, each element's FMAs in row order, as the heads one by one would run them;
 * against one head at a time the rows are loaded and converted a quarter as often and the sums
 * stay in registers (Gemma 3 270M's attention over 512 queries, one thread, x86: 14.3-15.2 ->
 * 9.4-9.8 ms a layer). Where L is 16, the columns past its last multiple go eight at a time by
 * the path's 8-column weighted_tile, so that every path fuses the same columns; those past the
 * last 8 are summed one by one. */
#define BLOB_WEIGHTED_TILE(tile, C)                                                            \
    switch (H) {                                                                               \
    case 1: tile(yh, ys, ah, as, r8, step, count, k, dtype, 1, C); break;                      \
    case 2: tile(yh, ys, ah, as, r8, step, count, k, dtype, 2, C); break;                      \
    case 3: tile(yh, ys, ah, as, r8, step, count, k, dtype, 3, C); break;                      \
    default: tile(yh, ys, ah, as, r8, step, count, k, dtype, 4, C); break;                     \
    }
#define BLOB_DEFINE_WEIGHTED_ROWS(attr, name, tile, lanes, columns)                            \
    _Static_assert(WR_HEADS == 4, "BLOB_WEIGHTED_TILE takes 1 .. 4 heads");                    \
    _Static_assert((lanes) == 8 || (lanes) == 16, "8-column steps complete a 16-lane tile's"); \
    static attr void name(float *y, size_t ys, const float *alpha, size_t as, size_t heads,    \
                          const void *rows, size_t stride, size_t count, size_t n, int dtype) { \
        const size_t step = stride * blob_cache_elem_size(dtype);                              \
        const uint8_t *r8 = (const uint8_t *)rows;                                             \
        for (size_t h0 = 0; h0 < heads; h0 += WR_HEADS) {                                      \
            const int H = (int)blob_min(WR_HEADS, heads - h0);                                 \
            float *yh = y + h0 * ys;                                                           \
            const float *ah = alpha + h0 * as;                                                 \
            size_t k = 0;                                                                      \
            for (; k + (lanes) * (columns) <= n; k += (lanes) * (columns)) BLOB_WEIGHTED_TILE(tile, columns) \
            for (; k + (lanes) <= n; k += (lanes)) BLOB_WEIGHTED_TILE(tile, 1)                 \
            for (; k + 8 <= n; k += 8) BLOB_WEIGHTED_TILE(weighted_tile, 1)                    \
            for (; k < n; k++)                                                                 \
                for (int h = 0; h < H; h++) {                                                  \
                    float sum = 0.0f;                                                          \
                    for (size_t i = 0; i < count; i++)                                         \
                        sum += ah[(size_t)h * as + i] * blob_weight_f32(r8 + i * step, k, dtype); \
                    yh[(size_t)h * ys + k] = sum;                                              \
                }                                                                              \
        }                                                                                      \
    }

extern const blob_isa_ops blob_ops_scalar;
#if defined(BLOB_HAVE_X86)
extern const blob_isa_ops blob_ops_avx2;
extern const blob_isa_ops blob_ops_avx2_vnni;
extern const blob_isa_ops blob_ops_avx512;
#endif
#if defined(BLOB_HAVE_ARM64)
extern const blob_isa_ops blob_ops_neon;
extern const blob_isa_ops blob_ops_neon_dotprod;
#endif

/* The table of the current ISA (dispatch.c). */
const blob_isa_ops *blob_ops(void);

/* ---- thread pool (threads.c) ---- */

/* Runs task(ctx, ith, nth) for ith = 0 .. nth-1 on the pool (ith 0 on the caller) and returns
 * when every call has returned. */
typedef void (*blob_task_fn)(void *ctx, int ith, int nth);
void blob_pool_run(blob_task_fn task, void *ctx);

/* Atomically returns *counter and adds one: how threads share out work items. */
size_t blob_next_item(volatile size_t *counter);

/* Kernel calls hold this lock: they share the pool and the workspace. */
void blob_call_lock(void);
void blob_call_unlock(void);

/* A 64-byte aligned scratch buffer of at least `nbytes`, grown on demand and kept (so the hot
 * path does not allocate once warm); valid until the next call. NULL when out of memory.
 * Only call it while holding the call lock. */
void *blob_workspace(size_t nbytes);

#endif

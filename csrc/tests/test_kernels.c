/* Every SIMD path of this machine against the scalar reference, without Python: natively on
 * x86-64, and for arm64 under qemu-aarch64 (tools/test_kernels_native.sh).
 *
 * Checked per path (including the int8-dot variants VNNI / SDOT and the 512-bit path when the
 * CPU has them; a path the CPU lacks is reported as skipped):
 * - activation quantization, int8 and int16 levels: bytes and scales identical to scalar;
 * - matvec and matmul tiles of every dtype on odd shapes (q4_1 .. q6_k: whole blocks, random planes):
 *   equal to scalar up to float summation order (1e-5 of sum |w x|); the one-row matvec tile equal
 *   to matvec's exactly for quantized types, and the few-token tile (a batched decode step, 2..8
 *   tokens) to the one-row tile's token after token exactly; q4_1 .. q6_k also against ggml's
 *   dequantization (written out here from its block loops) times the quantized activations,
 *   summed in double;
 * - q4_1 .. q6_k: every tile (matvec, matvec_row, matvec_tokens, matmul) bit-identical to the
 *   scalar tile, on rows of whole groups of eight blocks and of a remainder, and in q6_k's
 *   int32-overflow case;
 * - q8_0 in BLOB_LAYOUT_INTERLEAVE8: each path's tile, and blob_matmul (decode and prefill, 1 and
 *   2 threads) and blob_embed on each selectable path, bit-identical to the planar scalar tile
 *   and rows, partial groups of rows and blocks included;
 * - weighted_rows over f32 and f16 (attention's weighted sum of values; heads together
 *   bit-identical to each alone, and every vector path to the first), key_scores where a path has one (attention's Q K^T: within
 *   rounding of double, each score the same alone), read_sum (the bandwidth probe);
 * - the gated activations (SiLU, GELU-tanh) within 8 ulp of scalar's libm expf;
 * - RMSNorm rows bit-identical to scalar's; softmax rows within a few ulp of scalar's;
 *   attention's exp (exp_row) bit-identical to blob_exp_same, within 4 ulp of expf;
 * - the public API on each selectable path: blob_matmul and blob_attention_run vs scalar, and
 *   1 vs 2 (and 3 for matmul) threads bit-identical;
 * - the thread pool: every thread index runs once per job, at 2, 3 and 8 threads;
 * - the batched step (blob_forward_batch: one token of each of 1..4 sequences at different
 *   positions of their own caches, and a step mixing decode tokens, a short prompt and a prompt
 *   chunk) bit-identical to lone blob_forward runs: f32 and q8_0 weights, f32 and f16 caches,
 *   a sliding-window layer and a global one, on every selectable path;
 * - rope (plain C, one path): angles times the scale (LongRoPE's attention factor) and a partial
 *   rotation of the first 2*n_freq dimensions against a double-precision rotation;
 * - LayerNorm (plain C, one path) against a double-precision one, rows far from 0 included.
 * Exit status 0 when everything passed.
 */
#include <stdio.h>
#include <stdlib.h>

#include "cpu.h"
#include "kernels_impl.h"

static int failures = 0, checks = 0;

static void fail(const char *what, const char *path, double got, double want, double tol) {
    if (failures < 20) fprintf(stderr, "FAIL %s [%s]: got %.9g want %.9g (tolerance %.3g)\n", what, path, got, want, tol);
    failures++;
}

static void expect_close(const char *what, const char *path, double got, double want, double tol) {
    checks++;
    if (!(fabs(got - want) <= tol)) fail(what, path, got, want, tol);
}

static void expect_identical(const char *what, const char *path, const float *got, const float *want, size_t count) {
    for (size_t i = 0; i < count; i++) expect_close(what, path, got[i], want[i], 0.0);
}

/* ---- deterministic random data ---- */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint32_t next_u32(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 16);
}
static float next_float(void) { return (float)next_u32() / 4294967296.0f * 2.0f - 1.0f; }

/* ---- weights in the blob layout ---- */

typedef struct {
    blob_matrix m;
    uint8_t *plane;       /* rows x stride */
    uint16_t *scales;
    uint8_t *later[BLOB_MAX_PLANES];   /* q4_1 .. q6_k: planes 1.. (packed) */
    float *values;        /* W as f32 (rows, cols): the reference dequantization */
    float *abs_values;    /* |W|, for tolerances */
} test_weight;

static size_t round64(size_t n) { return (n + 63) & ~(size_t)63; }

static size_t row_bytes(int dtype, size_t cols) {
    size_t nb = blob_div_up(cols, BLOB_QBLOCK);
    if (blob_is_block32_type(dtype)) return cols / blob_dtype_block(dtype) * blob_plane_bytes(dtype, 0);
    switch (dtype) {
    case BLOB_F32: return 4 * cols;
    case BLOB_F16: case BLOB_BF16: return 2 * cols;
    case BLOB_Q8_0: return nb * 32;
    default: return nb * 16;
    }
}

/* ---- ggml's dequantization, written out from its block loops (independent of the kernels'
 * blob_decode_block32): block b of a row whose planes (fields) start at p[0..], into y ---- */

static float f16_at(const uint8_t *p) { return blob_f16_to_f32((uint16_t)(p[0] | p[1] << 8)); }

static void ref_q4_1_q5(int dtype, const uint8_t *const *p, size_t b, float *y) {
    const uint8_t *qs = p[0] + 16 * b;
    uint32_t qh = 0;
    if (dtype != BLOB_Q4_1) memcpy(&qh, p[1] + 4 * b, 4);   /* little-endian host, as ggml */
    const int first_scale = dtype == BLOB_Q4_1 ? 1 : 2;
    const float d = f16_at(p[first_scale] + 2 * b), m = dtype == BLOB_Q5_0 ? 0.0f : f16_at(p[first_scale + 1] + 2 * b);
    for (int j = 0; j < 16; j++) {
        const int xh0 = (int)(((qh >> j) << 4) & 0x10), xh1 = (int)((qh >> (j + 12)) & 0x10);
        const int x0 = (qs[j] & 15) | xh0, x1 = (qs[j] >> 4) | xh1;
        if (dtype == BLOB_Q5_0) {
            y[j] = (float)(x0 - 16) * d;
            y[j + 16] = (float)(x1 - 16) * d;
        } else {
            const float v0 = (float)x0 * d, v1 = (float)x1 * d;
            y[j] = v0 + m;
            y[j + 16] = v1 + m;
        }
    }
}

static void ref_q2_k(const uint8_t *const *p, size_t sb, float *y) {
    const float d = f16_at(p[2] + 2 * sb), dmin = f16_at(p[3] + 2 * sb);
    const uint8_t *q = p[0] + 64 * sb, *sc = p[1] + 16 * sb;
    int is = 0;
    for (int n = 0; n < 256; n += 128) {
        for (int j = 0, shift = 0; j < 4; j++, shift += 2) {
            for (int half = 0; half < 2; half++) {
                const int s = sc[is++];
                const float dl = d * (float)(s & 15), ml = dmin * (float)(s >> 4);
                for (int l = 0; l < 16; l++) {
                    const float v = dl * (float)((q[l + 16 * half] >> shift) & 3);
                    *y++ = v - ml;
                }
            }
        }
        q += 32;
    }
}

static void ref_q3_k(const uint8_t *const *p, size_t sb, float *y) {
    const float d = f16_at(p[3] + 2 * sb);
    const uint8_t *q = p[0] + 64 * sb, *hm = p[1] + 32 * sb;
    uint32_t aux[4];
    int8_t scales[16];
    memcpy(aux, p[2] + 12 * sb, 12);
    const uint32_t tmp = aux[2], kmask1 = 0x03030303u, kmask2 = 0x0f0f0f0fu;
    aux[2] = ((aux[0] >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4);
    aux[3] = ((aux[1] >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4);
    aux[0] = (aux[0] & kmask2) | (((tmp >> 0) & kmask1) << 4);
    aux[1] = (aux[1] & kmask2) | (((tmp >> 2) & kmask1) << 4);
    memcpy(scales, aux, 16);
    int is = 0, m = 1;
    for (int n = 0; n < 256; n += 128) {
        for (int j = 0, shift = 0; j < 4; j++, shift += 2, m <<= 1) {
            for (int half = 0; half < 2; half++) {
                const float dl = d * (float)(scales[is++] - 32);
                for (int l = 16 * half; l < 16 * half + 16; l++)
                    *y++ = dl * (float)(((q[l] >> shift) & 3) - ((hm[l] & m) ? 0 : 4));
            }
        }
        q += 32;
    }
}

static void ref_scale_min_k4(int j, const uint8_t *q, int *d, int *m) {
    if (j < 4) {
        *d = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4);
    }
}

static void ref_q4_q5_k(int dtype, const uint8_t *const *p, size_t sb, float *y) {
    const int five = dtype == BLOB_Q5_K;
    const uint8_t *ql = p[0] + 128 * sb, *qh = five ? p[1] + 32 * sb : NULL, *scales = p[1 + five] + 12 * sb;
    const float d = f16_at(p[2 + five] + 2 * sb), dmin = f16_at(p[3 + five] + 2 * sb);
    int is = 0, u1 = 1, u2 = 2;
    for (int j = 0; j < 256; j += 64, is += 2, u1 <<= 2, u2 <<= 2) {
        int sc, m;
        ref_scale_min_k4(is, scales, &sc, &m);
        const float d1 = d * (float)sc, m1 = dmin * (float)m;
        ref_scale_min_k4(is + 1, scales, &sc, &m);
        const float d2 = d * (float)sc, m2 = dmin * (float)m;
        for (int l = 0; l < 32; l++) {
            const float v = d1 * (float)((ql[l] & 0xF) + (five && (qh[l] & u1) ? 16 : 0));
            *y++ = v - m1;
        }
        for (int l = 0; l < 32; l++) {
            const float v = d2 * (float)((ql[l] >> 4) + (five && (qh[l] & u2) ? 16 : 0));
            *y++ = v - m2;
        }
        ql += 32;
    }
}

static void ref_q6_k(const uint8_t *const *p, size_t sb, float *y) {
    const float d = f16_at(p[3] + 2 * sb);
    const uint8_t *ql = p[0] + 128 * sb, *qh = p[1] + 64 * sb;
    const int8_t *sc = (const int8_t *)p[2] + 16 * sb;
    for (int n = 0; n < 256; n += 128) {
        for (int l = 0; l < 32; l++) {
            const int is = l / 16;
            const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
            const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            y[l] = d * (float)sc[is + 0] * (float)q1;
            y[l + 32] = d * (float)sc[is + 2] * (float)q2;
            y[l + 64] = d * (float)sc[is + 4] * (float)q3;
            y[l + 96] = d * (float)sc[is + 6] * (float)q4;
        }
        y += 128;
        ql += 64;
        qh += 32;
        sc += 8;
    }
}

/* Row r of a q4_1 .. q6_k test weight, dequantized as ggml does. */
static void ref_dequantize_row(const test_weight *w, size_t r, float *y) {
    const int dtype = w->m.dtype;
    const size_t block = blob_dtype_block(dtype), nb = w->m.cols / block;
    const uint8_t *p[BLOB_MAX_PLANES] = {w->plane + r * w->m.row_stride_bytes};
    for (int i = 1; i < BLOB_MAX_PLANES; i++)
        p[i] = w->later[i] ? w->later[i] + r * nb * blob_plane_bytes(dtype, i) : NULL;
    for (size_t b = 0; b < nb; b++) {
        float *out = y + b * block;
        switch (dtype) {
        case BLOB_Q2_K: ref_q2_k(p, b, out); break;
        case BLOB_Q3_K: ref_q3_k(p, b, out); break;
        case BLOB_Q4_K: case BLOB_Q5_K: ref_q4_q5_k(dtype, p, b, out); break;
        case BLOB_Q6_K: ref_q6_k(p, b, out); break;
        default: ref_q4_1_q5(dtype, p, b, out); break;
        }
    }
}

/* Random planes of a q4_1 .. q6_k weight: every level and sub-scale byte random, the float16
 * scales of either sign and the mins positive, both of a size that keeps |W| around 1. */
static void fill_block_type(test_weight *w, int dtype, size_t rows, size_t cols, size_t stride) {
    const size_t nb = cols / blob_dtype_block(dtype);
    const int kquant = blob_dtype_block(dtype) == BLOB_KBLOCK;
    for (size_t i = 0; i < rows * stride; i++) w->plane[i] = (uint8_t)next_u32();
    for (int p = 1; p < BLOB_MAX_PLANES && blob_plane_bytes(dtype, p); p++) {
        const size_t bytes = blob_plane_bytes(dtype, p);
        w->later[p] = (uint8_t *)calloc(rows * nb, bytes);
        w->m.plane[p] = w->later[p];
        /* the mins, when a type has them, are its last plane */
        const int is_min = blob_has_mins(dtype) && (p == BLOB_MAX_PLANES - 1 || !blob_plane_bytes(dtype, p + 1));
        const int is_scale = bytes == 2 && !is_min;
        for (size_t i = 0; i < rows * nb; i++) {
            uint8_t *field = w->later[p] + i * bytes;
            if (is_scale || is_min) {
                const float size = kquant ? 0.002f : 0.05f, v = size * (0.2f + fabsf(next_float()));
                const uint16_t h = blob_f32_to_f16(is_min || next_u32() % 2 ? v : -v);
                field[0] = (uint8_t)h, field[1] = (uint8_t)(h >> 8);
            } else {
                for (size_t k = 0; k < bytes; k++) field[k] = (uint8_t)next_u32();
            }
        }
    }
}

static test_weight make_weight(int dtype, size_t rows, size_t cols) {
    test_weight w;
    memset(&w, 0, sizeof w);
    size_t stride = round64(row_bytes(dtype, cols)), nb = blob_div_up(cols, BLOB_QBLOCK);
    w.plane = (uint8_t *)calloc(rows, stride);
    w.scales = (uint16_t *)calloc(rows * nb + 1, 2);
    w.values = (float *)calloc(rows * cols, sizeof(float));
    w.abs_values = (float *)calloc(rows * cols, sizeof(float));
    w.m.dtype = dtype;
    w.m.plane[0] = w.plane;
    w.m.row_stride_bytes = stride;
    w.m.rows = rows;
    w.m.cols = cols;
    if (blob_is_block32_type(dtype)) {
        fill_block_type(&w, dtype, rows, cols, stride);
        for (size_t r = 0; r < rows; r++) ref_dequantize_row(&w, r, w.values + r * cols);
        for (size_t k = 0; k < rows * cols; k++) w.abs_values[k] = fabsf(w.values[k]);
        return w;
    }
    for (size_t r = 0; r < rows; r++) {
        uint8_t *row = w.plane + r * stride;
        for (size_t k = 0; k < cols; k++) {
            float v = next_float();
            if (dtype == BLOB_F32) ((float *)row)[k] = v;
            if (dtype == BLOB_F16) ((uint16_t *)row)[k] = blob_f32_to_f16(v);
            if (dtype == BLOB_BF16) ((uint16_t *)row)[k] = (uint16_t)(blob_f32_bits(v) >> 16);
            if (dtype == BLOB_Q8_0) ((int8_t *)row)[k] = (int8_t)(next_u32() % 255) - 127;
            if (dtype == BLOB_Q4_0) {
                uint8_t *byte = row + (k / 32) * 16 + k % 16;
                *byte |= (uint8_t)((next_u32() % 16) << ((k % 32) < 16 ? 0 : 4));
            }
        }
        for (size_t b = 0; b < nb; b++) w.scales[r * nb + b] = blob_f32_to_f16(0.01f + 0.02f * fabsf(next_float()));
        /* q4_0 padding past cols holds level 0 (nibble 8), as the format writes it */
        if (dtype == BLOB_Q4_0)
            for (size_t k = cols; k < nb * 32; k++) row[(k / 32) * 16 + k % 16] |= (uint8_t)(8 << ((k % 32) < 16 ? 0 : 4));
    }
    w.m.plane[1] = (dtype == BLOB_Q8_0 || dtype == BLOB_Q4_0) ? w.scales : NULL;
    for (size_t r = 0; r < rows; r++) {
        const uint8_t *row = w.plane + r * stride;
        for (size_t k = 0; k < cols; k++) {
            w.values[r * cols + k] = w.m.plane[1]
                ? (float)blob_weight_level(row, k, dtype) * blob_f16_to_f32(w.scales[r * nb + k / 32])
                : blob_weight_f32(row, k, dtype);
            w.abs_values[r * cols + k] = fabsf(w.values[r * cols + k]);
        }
    }
    return w;
}

static void free_weight(test_weight *w) {
    free(w->plane);
    free(w->scales);
    for (int p = 0; p < BLOB_MAX_PLANES; p++) free(w->later[p]);
    free(w->values);
    free(w->abs_values);
}

/* The columns a test matrix of `dtype` gets for a wanted width: whole blocks for q4_1 .. q6_k. */
static size_t test_cols(int dtype, size_t cols) {
    const size_t block = blob_dtype_block(dtype);
    return blob_is_block32_type(dtype) ? blob_div_up(cols, block) * block : cols;
}

/* ---- one path's tiles over a whole matrix, the way matmul.c drives them ---- */

typedef struct {
    int bits;
    void *q;              /* n rows of q_stride levels, int8 or int16 per bits */
    float *d, *sums;
    int32_t *half_sums;   /* int16 levels: the sum of each 16 */
    int8_t *split;        /* int16 levels as bytes, blob_split_levels */
    int16_t *pairs;       /* int16 levels in pairs, blob_pair_levels */
    int8_t *quads;        /* int8 levels held in int16, in quads: blob_quad_levels */
    int8_t *lanes;        /* split levels by lanes, blob_lane_levels */
    int8_t *crossed;      /* the same, crossed */
    size_t q_stride, nblocks;
} quantized_acts;

/* X (n, cols) quantized for `dtype` weights as matmul.c does, in every arrangement a tile reads. */
static quantized_acts quantize_all(const blob_isa_ops *ops, const float *x, size_t n, size_t cols, int dtype) {
    quantized_acts qa;
    const int bits = qa.bits = blob_act_bits(dtype);
    qa.nblocks = blob_div_up(cols, BLOB_QBLOCK);
    qa.q_stride = round64(qa.nblocks * 32);
    qa.q = calloc(n, qa.q_stride * (size_t)(bits / 8));
    qa.d = (float *)calloc(n * qa.nblocks, sizeof(float));
    qa.sums = (float *)calloc(n * qa.nblocks, sizeof(float));
    qa.half_sums = (int32_t *)calloc(2 * n * qa.nblocks, sizeof(int32_t));
    qa.split = (int8_t *)calloc(n, qa.q_stride * 2);
    qa.pairs = (int16_t *)calloc(n, blob_pair_stride(qa.nblocks) * sizeof(int16_t));
    qa.quads = (int8_t *)calloc(n, blob_pair_stride(qa.nblocks));
    qa.lanes = (int8_t *)calloc(n, qa.q_stride * 2);
    qa.crossed = (int8_t *)calloc(n, qa.q_stride * 2);
    for (size_t t = 0; t < n; t++) {
        blob_quantize_acts(ops, dtype, x + t * cols, cols, (int8_t *)qa.q + t * qa.q_stride * (size_t)(bits / 8), qa.d + t * qa.nblocks);
        if (bits == 16) {
            blob_half_sums((const int16_t *)qa.q + t * qa.q_stride, qa.nblocks, qa.half_sums + 2 * t * qa.nblocks);
            blob_split_levels((const int16_t *)qa.q + t * qa.q_stride, qa.nblocks, qa.split + 2 * t * qa.q_stride);
            blob_pair_levels((const int16_t *)qa.q + t * qa.q_stride, qa.nblocks, qa.pairs + t * blob_pair_stride(qa.nblocks));
            if (blob_act_int8_levels(dtype))
                blob_quad_levels((const int16_t *)qa.q + t * qa.q_stride, qa.nblocks, qa.quads + t * blob_pair_stride(qa.nblocks));
            blob_lane_levels((const int16_t *)qa.q + t * qa.q_stride, qa.nblocks, 0, qa.lanes + 2 * t * qa.q_stride);
            blob_lane_levels((const int16_t *)qa.q + t * qa.q_stride, qa.nblocks, 1, qa.crossed + 2 * t * qa.q_stride);
        } else {
            blob_level_sums((const int8_t *)qa.q + t * qa.q_stride, qa.nblocks, qa.sums + t * qa.nblocks);
        }
    }
    return qa;
}

static void free_acts(quantized_acts *qa) {
    free(qa->q), free(qa->d), free(qa->sums), free(qa->half_sums), free(qa->split), free(qa->pairs), free(qa->quads), free(qa->lanes), free(qa->crossed);
}

/* Which tiles run_tiles runs: matvec at n == 1, else matmul; the one-row matvec tile token after
 * token; or the few-token tile (matvec_tokens, quantized types), three rows to a call; or the
 * first without the activations arranged by lanes (blob_lane_levels), which matmul.c always
 * makes for the x86 one-token q4_k, q5_k and q6_k tiles, so that their other path is tested too. */
enum { TILES_MATVEC_OR_MATMUL = 0, TILES_ONE_ROW = 1, TILES_FEW_TOKENS = 2, TILES_WITHOUT_LANES = 3 };

/* Y = X @ W.T through the path's tiles of `shape`. */
static void run_tiles(const blob_isa_ops *ops, const test_weight *w, const float *x, size_t n, float *y,
                      int shape) {
    const int bits = blob_act_bits(w->m.dtype), with_lanes = shape != TILES_WITHOUT_LANES;
    if (!with_lanes) shape = TILES_MATVEC_OR_MATMUL;
    quantized_acts qa = quantize_all(ops, x, n, w->m.cols, w->m.dtype);
    const int dtype = w->m.dtype;
    const int8_t *lanes = ops->reads_levels[dtype] & BLOB_READS_CROSSED ? qa.crossed : qa.lanes;
    float *even_odd = (float *)malloc(n * blob_even_odd_stride(w->m.cols) * sizeof(float));
    for (size_t t = 0; t < n; t++)
        blob_even_odd_columns(x + t * w->m.cols, w->m.cols, even_odd + t * blob_even_odd_stride(w->m.cols));
    blob_acts a = {x, w->m.cols, bits == 8 ? (const int8_t *)qa.q : NULL, bits == 16 ? (const int16_t *)qa.q : NULL,
                   qa.d, qa.q_stride, qa.nblocks, qa.sums, qa.half_sums, qa.split, qa.pairs, with_lanes ? lanes : NULL,
                   ops->bf16_even_odd && dtype == BLOB_BF16 ? even_odd : NULL,
                   ops->reads_levels[dtype] & BLOB_READS_QUADS ? qa.quads : NULL};
    blob_tile_fn tile = shape == TILES_FEW_TOKENS ? ops->matvec_tokens[dtype] : shape == TILES_ONE_ROW ? ops->matvec_row[dtype]
                      : n == 1 ? ops->matvec[dtype] : ops->matmul[dtype];
    const int mm_rows = ops->mm_tile_rows[dtype] ? ops->mm_tile_rows[dtype] : ops->mm_rows;
    size_t R = (size_t)(shape == TILES_FEW_TOKENS ? 3 : shape == TILES_ONE_ROW ? 1 : n == 1 ? ops->mv_rows : mm_rows);
    size_t T = shape == TILES_FEW_TOKENS ? BLOB_MVT_TOKENS : shape == TILES_ONE_ROW || n == 1 ? 1
             : ops->mm_any_tokens[dtype] ? n : (size_t)ops->mm_tokens;
    for (size_t r = 0; r < w->m.rows; r += R)
        for (size_t t = 0; t < n; t += T)
            tile(&w->m, r, blob_min(R, w->m.rows - r), &a, t, blob_min(T, n - t), y, w->m.rows);
    free_acts(&qa);
    free(even_odd);
}

static const char *const dtype_names[BLOB_NUM_DTYPES] = {"f32", "f16", "bf16", "q8_0", "q4_0", [BLOB_Q4_1] = "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"};

static void check_quantize(const blob_isa_ops *ops, const char *path) {
    /* 257 and up: groups of eight blocks (the x86 path's scale vectors) and a remainder */
    const size_t sizes[] = {1, 31, 32, 33, 100, 257, 640, 2065};
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        size_t n = sizes[i];
        float *x = (float *)malloc(n * sizeof(float));
        for (size_t k = 0; k < n; k++) x[k] = next_float() * (k % 7 == 0 ? 100.0f : 1.0f);
        if (n > 40) for (size_t k = 32; k < 64; k++) x[k] = 0.0f;   /* an all-zero block */
        if (n > 200) for (size_t k = 96; k < 128; k++) x[k] *= 1e-39f; /* scale below FLT_MIN */
        const int dtypes[] = {BLOB_Q4_0, BLOB_Q8_0, BLOB_Q4_K};   /* int8, int16 and int8 levels held in int16 */
        for (int i = 0; i < 3; i++) {
            const int bits = blob_act_bits(dtypes[i]);
            quantized_acts mine = quantize_all(ops, x, 1, n, dtypes[i]), ref = quantize_all(&blob_ops_scalar, x, 1, n, dtypes[i]);
            checks++;
            if (memcmp(mine.q, ref.q, mine.nblocks * 32 * (size_t)(bits / 8)) != 0 ||
                memcmp(mine.d, ref.d, mine.nblocks * sizeof(float)) != 0)
                fail(bits == 16 ? "quantize_row16 levels" : "quantize_row levels", path, (double)n, (double)n, 0);
            free_acts(&mine);
            free_acts(&ref);
        }
        free(x);
    }
}

/* Y of a q4_1 .. q6_k weight against the straightforward product: W dequantized as ggml does,
 * times the activations quantized (levels x block scale), summed in double. */
static void check_against_dequantized(const blob_isa_ops *ops, const test_weight *w, const float *x, size_t n,
                                      const float *y, const char *what, const char *path) {
    const size_t rows = w->m.rows, cols = w->m.cols;
    quantized_acts qa = quantize_all(ops, x, n, cols, w->m.dtype);
    char label[96];
    snprintf(label, sizeof label, "%s vs dequantized", what);
    for (size_t t = 0; t < n; t++) {
        const int16_t *levels = (const int16_t *)qa.q + t * qa.q_stride;
        for (size_t r = 0; r < rows; r++) {
            double sum = 0, slack = 0;
            for (size_t k = 0; k < cols; k++) {
                const double xk = (double)levels[k] * qa.d[t * qa.nblocks + k / BLOB_QBLOCK];
                sum += (double)w->values[r * cols + k] * xk;
                slack += fabs((double)w->values[r * cols + k] * xk);
            }
            expect_close(label, path, y[t * rows + r], sum, 1e-5 * slack + 1e-6);
        }
    }
    free_acts(&qa);
}

static void check_tiles(const blob_isa_ops *ops, const char *path) {
    /* 19 x 2100: more rows than a call of the avx512 f16 / bf16 prefill tile takes and its column
     * blocks twice over, with a tail */
    const size_t shapes[][2] = {{1, 1}, {5, 31}, {7, 33}, {13, 100}, {9, 257}, {17, 1000}, {6, 640}, {5, 608}, {19, 2100}};
    const size_t token_counts[] = {1, 2, 3, 5, 8, 31, 70};   /* avx512 prefill: 12, 8, 4, 2, 1 at a time */   /* 70: the x86 prefill tile of q4_1 .. q6_k in two runs */
    for (int dtype = 0; dtype < BLOB_NUM_DTYPES; dtype++) {
        if (!blob_dtype_block(dtype)) continue;
        for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
            size_t rows = shapes[s][0], cols = test_cols(dtype, shapes[s][1]);
            test_weight w = make_weight(dtype, rows, cols);
            for (size_t c = 0; c < sizeof token_counts / sizeof *token_counts; c++) {
                size_t n = token_counts[c];
                float *x = (float *)malloc(n * cols * sizeof(float));
                float *y = (float *)malloc(n * rows * sizeof(float)), *ref = (float *)malloc(n * rows * sizeof(float));
                for (size_t k = 0; k < n * cols; k++) x[k] = next_float();
                run_tiles(ops, &w, x, n, y, TILES_MATVEC_OR_MATMUL);
                run_tiles(&blob_ops_scalar, &w, x, n, ref, TILES_MATVEC_OR_MATMUL);
                char what[64];
                snprintf(what, sizeof what, "%s %s %zux%zu n=%zu", n == 1 ? "matvec" : "matmul", dtype_names[dtype], rows, cols, n);
                for (size_t t = 0; t < n; t++)
                    for (size_t r = 0; r < rows; r++) {
                        double slack = 0;
                        for (size_t k = 0; k < cols; k++) slack += w.abs_values[r * cols + k] * fabs(x[t * cols + k]);
                        expect_close(what, path, y[t * rows + r], ref[t * rows + r], 1e-5 * slack + 1e-6);
                    }
                if (blob_is_block32_type(dtype)) check_against_dequantized(ops, &w, x, n, y, what, path);
                if (n == 1) {   /* the one-row tile forms the very same quantized sums; float rows
                                   it sums with four accumulators (equal to rounding) */
                    const int exact = blob_dtype_block(dtype) > 1 || ops == &blob_ops_scalar;
                    run_tiles(ops, &w, x, n, ref, TILES_ONE_ROW);
                    snprintf(what, sizeof what, "matvec_row %s %zux%zu", dtype_names[dtype], rows, cols);
                    for (size_t r = 0; r < rows; r++) {
                        double slack = 0;
                        for (size_t k = 0; k < cols; k++) slack += w.abs_values[r * cols + k] * fabs(x[k]);
                        expect_close(what, path, ref[r], y[r], exact ? 0 : 1e-6 * slack);
                    }
                }
                if (n > 1 && blob_dtype_block(dtype) > 1) {   /* a batched decode step: each token's
                                                                 sums of the one-row tile, exactly */
                    run_tiles(ops, &w, x, n, y, TILES_ONE_ROW);
                    run_tiles(ops, &w, x, n, ref, TILES_FEW_TOKENS);
                    snprintf(what, sizeof what, "matvec_tokens %s %zux%zu n=%zu", dtype_names[dtype], rows, cols, n);
                    expect_identical(what, path, ref, y, n * rows);
                }
                free(x), free(y), free(ref);
            }
            free_weight(&w);
        }
    }
}

/* ---- q8_0 and q4_0 in BLOB_LAYOUT_INTERLEAVE8: every path bit-identical to the planar scalar tile ---- */

/* A q8_0 or q4_0 test weight's planes rearranged into BLOB_LAYOUT_INTERLEAVE8 (kernels.h),
 * written out here from the layout's definition; the rows completing the last group are zero. */
typedef struct {
    blob_matrix m;
    uint8_t *quants;
    uint16_t *scales;
} interleaved_weight;

/* Byte offset, within group block bytes, of level i of the group's row j, and (q4_0) the
 * nibble's shift: q8_0 pairs of levels 16 bytes apart, q4_0 levels 8c + m and 8c + 4 + m in the
 * low and high nibble of byte 32c + 4j + m. */
static size_t interleaved_byte(int dtype, size_t i, size_t j, int *shift) {
    *shift = dtype == BLOB_Q4_0 ? 4 * (int)((i / 4) % 2) : 0;
    return dtype == BLOB_Q4_0 ? 32 * (i / 8) + 4 * j + i % 4 : 16 * (i / 2) + 2 * j + i % 2;
}

static interleaved_weight interleave8(const test_weight *w) {
    const int dtype = w->m.dtype;
    const size_t rows = w->m.rows, nb = blob_div_up(w->m.cols, BLOB_QBLOCK), groups = blob_div_up(rows, 8);
    const size_t block_bytes = dtype == BLOB_Q4_0 ? 128 : 256;
    interleaved_weight iw;
    iw.quants = (uint8_t *)calloc(groups * nb * block_bytes, 1);
    iw.scales = (uint16_t *)calloc(groups * nb * 8, sizeof(uint16_t));
    for (size_t r = 0; r < rows; r++)
        for (size_t k = 0; k < nb * BLOB_QBLOCK; k++) {
            int shift;
            const size_t at = (r / 8 * nb + k / BLOB_QBLOCK) * block_bytes + interleaved_byte(dtype, k % BLOB_QBLOCK, r % 8, &shift);
            const int level = blob_weight_level((const uint8_t *)w->plane + r * w->m.row_stride_bytes, k, dtype);
            iw.quants[at] |= (uint8_t)((dtype == BLOB_Q4_0 ? level + 8 : level & 255) << shift);
        }
    for (size_t r = 0; r < rows; r++)
        for (size_t b = 0; b < nb; b++) iw.scales[(r / 8 * nb + b) * 8 + r % 8] = w->scales[r * nb + b];
    const blob_matrix m = {dtype, {iw.quants, iw.scales}, nb * block_bytes / 8, rows, w->m.cols, BLOB_LAYOUT_INTERLEAVE8};
    iw.m = m;
    return iw;
}

static const int interleaved_dtypes[] = {BLOB_Q8_0, BLOB_Q4_0};

/* The path's interleave8 tile over a whole matrix, as matmul.c calls it (16 rows, all tokens),
 * and through blob_matmul at 1 and 2 threads when `isa` is the current path's: each output equal
 * bit for bit to the planar scalar tile's (which sums each output alone, whatever the tile shape). */
static void check_interleave8(const blob_isa_ops *ops, const char *path) {
    const size_t shapes[][2] = {{1, 1}, {5, 31}, {13, 100}, {17, 640}, {24, 608}, {40, 64}};
    const size_t token_counts[] = {1, 2, 3, 5, 8, 31, 70};   /* avx512 prefill: 12, 8, 4, 2, 1 at a time */
    for (size_t d = 0; d < sizeof interleaved_dtypes / sizeof *interleaved_dtypes; d++)
        for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
            const int dtype = interleaved_dtypes[d], bits = blob_act_bits(dtype);
            const size_t rows = shapes[s][0], cols = shapes[s][1];
            test_weight w = make_weight(dtype, rows, cols);
            interleaved_weight iw = interleave8(&w);
            for (size_t c = 0; c < sizeof token_counts / sizeof *token_counts; c++) {
                const size_t n = token_counts[c];
                float *x = (float *)malloc(n * cols * sizeof(float));
                float *y = (float *)malloc(n * rows * sizeof(float)), *ref = (float *)malloc(n * rows * sizeof(float));
                for (size_t k = 0; k < n * cols; k++) x[k] = next_float();
                run_tiles(&blob_ops_scalar, &w, x, n, ref, TILES_MATVEC_OR_MATMUL);
                quantized_acts qa = quantize_all(ops, x, n, cols, dtype);
                blob_acts a = {x, cols, bits == 8 ? (const int8_t *)qa.q : NULL, bits == 16 ? (const int16_t *)qa.q : NULL,
                               qa.d, qa.q_stride, qa.nblocks, qa.sums, NULL, NULL, NULL, NULL, NULL, NULL};
                for (size_t r = 0; r < rows; r += BLOB_INTERLEAVE8_ROWS)
                    ops->interleave8[dtype](&iw.m, r, blob_min(BLOB_INTERLEAVE8_ROWS, rows - r), &a, 0, n, y, rows);
                char what[80];
                snprintf(what, sizeof what, "interleave8 tile %s %zux%zu n=%zu", dtype_names[dtype], rows, cols, n);
                expect_identical(what, path, y, ref, n * rows);
                free_acts(&qa);
                free(x), free(y), free(ref);
            }
            free_weight(&w);
            free(iw.quants), free(iw.scales);
        }
}

/* blob_matmul of interleaved `iw` over n tokens x (n, cols) into y (n, rows), at 1 and 2 threads,
 * equals ref (n, rows), the planar scalar tile's, bit for bit. */
static void expect_interleaved_matmul(const char *path, const blob_matrix *iw, const float *x, size_t n, float *y,
                                      const float *ref) {
    for (int threads = 1; threads <= 2; threads++) {
        blob_threads_set(threads);
        if (blob_matmul(iw, x, iw->cols, n, y, iw->rows) != BLOB_OK) fail("blob_matmul interleave8 status", path, 1, 0, 0);
        char what[80];
        snprintf(what, sizeof what, "blob_matmul interleave8 %s n=%zu threads=%d", dtype_names[iw->dtype], n, threads);
        expect_identical(what, path, y, ref, n * iw->rows);
    }
}

/* blob_embed's rows 0, 9 and 66 of interleaved `iw` equal those of `planar`, bit for bit. */
static void expect_interleaved_embed(const char *path, const blob_matrix *planar, const blob_matrix *iw) {
    const int64_t ids[3] = {0, 9, 66};
    float *rows_planar = (float *)malloc(3 * iw->cols * sizeof(float));     /* (3, cols) */
    float *rows_interleaved = (float *)malloc(3 * iw->cols * sizeof(float)); /* (3, cols) */
    blob_embed(planar, ids, 3, rows_planar);
    blob_embed(iw, ids, 3, rows_interleaved);
    expect_identical("blob_embed interleave8 rows", path, rows_interleaved, rows_planar, 3 * iw->cols);
    free(rows_planar), free(rows_interleaved);
}

/* blob_matmul over an interleaved matrix on the selected path: decode (n <= 8) and prefill, 1 and 2
 * threads, equal bit for bit to the planar scalar tile; blob_embed's rows equal the planar ones. */
static void check_interleave8_api(const char *path) {
    const size_t rows = 67, cols = 300, n_max = 70;
    float *x = (float *)malloc(n_max * cols * sizeof(float));
    float *y = (float *)malloc(n_max * rows * sizeof(float)), *ref = (float *)malloc(n_max * rows * sizeof(float));
    for (size_t k = 0; k < n_max * cols; k++) x[k] = next_float();
    for (size_t d = 0; d < sizeof interleaved_dtypes / sizeof *interleaved_dtypes; d++) {
        test_weight w = make_weight(interleaved_dtypes[d], rows, cols);
        interleaved_weight iw = interleave8(&w);
        const size_t token_counts[] = {1, 4, 8, 70};
        for (size_t c = 0; c < 4; c++) {
            const size_t n = token_counts[c];
            run_tiles(&blob_ops_scalar, &w, x, n, ref, TILES_MATVEC_OR_MATMUL);
            expect_interleaved_matmul(path, &iw.m, x, n, y, ref);
        }
        expect_interleaved_embed(path, &w.m, &iw.m);
        blob_matrix f16 = iw.m;   /* a type without an interleaved tile */
        f16.dtype = BLOB_F16;
        checks++;
        if (blob_matmul(&f16, x, cols, 1, y, rows) != BLOB_EINVAL) fail("blob_matmul interleaved f16 refused", path, 0, 0, 0);
        free_weight(&w);
        free(iw.quants), free(iw.scales);
    }
    free(x), free(y), free(ref);
}

/* ---- q5_0 in BLOB_LAYOUT_INTERLEAVE8: every path bit-identical to the planar scalar tile ---- */

static test_weight make_block_weight(int dtype, size_t rows, size_t cols, int extreme);
static void free_block_weight(test_weight *w);

/* A planar q5_0 test weight's three planes rearranged into BLOB_LAYOUT_INTERLEAVE8 (kernels.h),
 * written out here from the layout's definition: level i (u = nibble | fifth bit << 4) of row j
 * of group g, block b: its nibble at byte 32(i/8) + 4j + i%4 of the group block's 128, low for
 * (i/4) even; its fifth bit at bit 32(i/4) + 4j + i%4 of the group block's 32 bytes; the rows
 * completing the last group zero. */
static test_weight interleave8_q5_0(const test_weight *w) {
    const size_t rows = w->m.rows, nb = w->m.cols / BLOB_QBLOCK, groups = blob_div_up(rows, 8);
    uint8_t *nibbles = (uint8_t *)calloc(groups * nb * 128, 1), *fifth = (uint8_t *)calloc(groups * nb * 32, 1);
    uint16_t *scales = (uint16_t *)calloc(groups * nb * 8, sizeof(uint16_t));
    for (size_t r = 0; r < rows; r++)
        for (size_t b = 0; b < nb; b++) {
            const uint8_t *qs = (const uint8_t *)w->m.plane[0] + r * w->m.row_stride_bytes + 16 * b;
            const uint8_t *qh = (const uint8_t *)w->m.plane[1] + (r * nb + b) * 4;
            const size_t block = r / 8 * nb + b, j = r % 8;
            for (size_t i = 0; i < BLOB_QBLOCK; i++) {
                const int nibble = i < 16 ? qs[i] & 15 : qs[i - 16] >> 4, high = (qh[i / 8] >> (i % 8)) & 1;
                const size_t bit = 32 * (i / 4) + 4 * j + i % 4;
                nibbles[block * 128 + 32 * (i / 8) + 4 * j + i % 4] |= (uint8_t)(nibble << (4 * ((i / 4) % 2)));
                fifth[block * 32 + bit / 8] |= (uint8_t)(high << (bit % 8));
            }
            memcpy(scales + block * 8 + j, (const uint8_t *)w->m.plane[2] + 2 * (r * nb + b), 2);
        }
    test_weight iw;
    memset(&iw, 0, sizeof iw);
    const blob_matrix m = {BLOB_Q5_0, {nibbles, fifth, scales}, nb * 16, rows, w->m.cols, BLOB_LAYOUT_INTERLEAVE8};
    iw.m = m;
    return iw;
}

/* The path's interleaved q5_0 tile over whole matrices, as matmul.c calls it (16 rows, all
 * tokens), bit-identical to the planar scalar tile, with the activations' split levels and
 * without (matmul.c makes them at one token, which x86's one-token tile reads); also at the
 * extreme levels (every level -16 against activations all at +amax). */
static void check_interleave8_q5_0(const blob_isa_ops *ops, const char *path) {
    /* 2048 columns (64 blocks): the most x86's prefill tile unpacks once per call; 2144 past it */
    const size_t shapes[][2] = {{1, 32}, {5, 96}, {13, 640}, {17, 640}, {24, 288}, {9, 2048}, {40, 2144}};
    const size_t token_counts[] = {1, 2, 3, 5, 8, 9, 31, 70};
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes + 1; s++) {
        const int extreme = s == sizeof shapes / sizeof *shapes;
        const size_t rows = extreme ? 9 : shapes[s][0], cols = extreme ? 256 : shapes[s][1];
        test_weight w = make_block_weight(BLOB_Q5_0, rows, cols, extreme), iw = interleave8_q5_0(&w);
        for (size_t c = 0; c < sizeof token_counts / sizeof *token_counts; c++) {
            const size_t n = token_counts[c];
            float *x = (float *)malloc(n * cols * sizeof(float));
            float *y = (float *)malloc(n * rows * sizeof(float)), *ref = (float *)malloc(n * rows * sizeof(float));
            for (size_t k = 0; k < n * cols; k++) x[k] = extreme ? 1.0f : next_float() * (k % 37 == 0 ? 50.0f : 1.0f);
            run_tiles(&blob_ops_scalar, &w, x, n, ref, TILES_MATVEC_OR_MATMUL);
            quantized_acts qa = quantize_all(ops, x, n, cols, BLOB_Q5_0);
            for (int with_split = 0; with_split < 2; with_split++) {
                blob_acts a = {x, cols, NULL, (const int16_t *)qa.q, qa.d, qa.q_stride, qa.nblocks, NULL, qa.half_sums,
                               with_split ? qa.split : NULL, NULL, NULL, NULL, NULL};
                for (size_t r = 0; r < rows; r += BLOB_INTERLEAVE8_ROWS)
                    ops->interleave8[BLOB_Q5_0](&iw.m, r, blob_min(BLOB_INTERLEAVE8_ROWS, rows - r), &a, 0, n, y, rows);
                char what[96];
                snprintf(what, sizeof what, "interleave8 tile q5_0 %zux%zu n=%zu%s%s", rows, cols, n,
                         extreme ? " extreme" : "", with_split ? " split" : "");
                expect_identical(what, path, y, ref, n * rows);
            }
            free_acts(&qa);
            free(x), free(y), free(ref);
        }
        free_block_weight(&w);
        free_block_weight(&iw);
    }
}

/* blob_matmul over an interleaved q5_0 matrix on the selected path, decode and prefill, 1 and 2
 * threads, equal bit for bit to the planar scalar tile; blob_embed's rows equal the planar ones. */
static void check_interleave8_q5_0_api(const char *path) {
    const size_t rows = 67, cols = 320, n_max = 70;
    test_weight w = make_block_weight(BLOB_Q5_0, rows, cols, 0), iw = interleave8_q5_0(&w);
    float *x = (float *)malloc(n_max * cols * sizeof(float));
    float *y = (float *)malloc(n_max * rows * sizeof(float)), *ref = (float *)malloc(n_max * rows * sizeof(float));
    for (size_t k = 0; k < n_max * cols; k++) x[k] = next_float();
    const size_t token_counts[] = {1, 4, 8, 70};
    for (size_t c = 0; c < sizeof token_counts / sizeof *token_counts; c++) {
        const size_t n = token_counts[c];
        run_tiles(&blob_ops_scalar, &w, x, n, ref, TILES_MATVEC_OR_MATMUL);
        expect_interleaved_matmul(path, &iw.m, x, n, y, ref);
    }
    expect_interleaved_embed(path, &w.m, &iw.m);
    free(x), free(y), free(ref);
    free_block_weight(&w);
    free_block_weight(&iw);
}

/* ---- q4_1 .. q6_k: each path's tiles bit-identical to the scalar reference ---- */

/* A (rows, cols) matrix of a q4_1 .. q6_k type: random bytes in every plane (any bit pattern is
 * a valid level or sub-scale), except the float16 scale planes (two bytes per block), which get
 * random signs and magnitudes 1e-3 .. 1e-2. `extreme` instead sets every byte to its largest
 * product: zero quant and high bytes (q6_k: level -32) and sub-scales of 0x80 (q6_k: -128), so
 * that against activations at +32639, q6_k's two half sums each reach 2^31 x 0.996 and their
 * total passes int32. */
static test_weight make_block_weight(int dtype, size_t rows, size_t cols, int extreme) {
    test_weight w;
    memset(&w, 0, sizeof w);
    const size_t nb = cols / blob_dtype_block(dtype);
    const size_t stride = round64(nb * blob_plane_bytes(dtype, 0));
    w.m.dtype = dtype;
    w.m.row_stride_bytes = stride;
    w.m.rows = rows;
    w.m.cols = cols;
    for (int p = 0; p < BLOB_MAX_PLANES && blob_plane_bytes(dtype, p); p++) {
        const size_t per_block = blob_plane_bytes(dtype, p), bytes = p == 0 ? rows * stride : rows * nb * per_block;
        uint8_t *plane = (uint8_t *)malloc(bytes);
        for (size_t i = 0; i < bytes; i++) plane[i] = extreme ? (p == 0 ? 0 : 0x80) : (uint8_t)next_u32();
        if (p > 0 && per_block == 2)
            for (size_t i = 0; i < bytes; i += 2) {
                const uint16_t h = blob_f32_to_f16((next_u32() & 1 ? -1.0f : 1.0f) * (0.001f + 0.009f * fabsf(next_float())));
                memcpy(plane + i, &h, 2);
            }
        if (extreme && p == 1 && dtype == BLOB_Q6_K) memset(plane, 0, bytes);   /* high bit pairs 0 */
        w.m.plane[p] = plane;
    }
    return w;
}

static void free_block_weight(test_weight *w) {
    for (int p = 0; p < BLOB_MAX_PLANES; p++) free((void *)w->m.plane[p]);
}

/* Every tile shape of the path (matvec, matvec_row, matmul) against the scalar tile, bit for
 * bit, at token counts that leave partial token tiles, on rows of whole groups of eight blocks
 * and (q5_0) of a remainder; then the extreme case above against activations all at +amax. */
/* n tokens of activations (n x cols): random, every 37th value 50x as large. */
static float *random_activations(size_t n, size_t cols) {
    float *x = (float *)malloc(n * cols * sizeof(float));
    for (size_t k = 0; k < n * cols; k++) x[k] = next_float() * (k % 37 == 0 ? 50.0f : 1.0f);
    return x;
}

/* The matvec or matmul tiles of ops against the scalar ones, bit for bit, on n random tokens. */
static void expect_matmul_as_scalar(const blob_isa_ops *ops, const test_weight *w, size_t n, const char *what,
                                    const char *path) {
    float *x = random_activations(n, w->m.cols);
    float *y = (float *)malloc(n * w->m.rows * sizeof(float)), *ref = (float *)malloc(n * w->m.rows * sizeof(float));
    run_tiles(ops, w, x, n, y, TILES_MATVEC_OR_MATMUL);
    run_tiles(&blob_ops_scalar, w, x, n, ref, TILES_MATVEC_OR_MATMUL);
    expect_identical(what, path, y, ref, n * w->m.rows);
    free(x), free(y), free(ref);
}

static void check_block_tiles(const blob_isa_ops *ops, const char *path) {
    const size_t q32_cols[] = {32, 96, 256, 640, 2144}, k_cols[] = {256, 512, 2304};
    const size_t row_counts[] = {1, 5, 13}, token_counts[] = {1, 2, 3, 5, 8};
    for (int dtype = BLOB_Q4_1; dtype < BLOB_NUM_DTYPES; dtype++) {
        const int k_quant = blob_dtype_block(dtype) == BLOB_KBLOCK;
        const size_t *col_list = k_quant ? k_cols : q32_cols;
        const size_t ncols = k_quant ? sizeof k_cols / sizeof *k_cols : sizeof q32_cols / sizeof *q32_cols;
        for (size_t c = 0; c < ncols; c++)
            for (size_t ri = 0; ri < sizeof row_counts / sizeof *row_counts; ri++) {
                const size_t rows = row_counts[ri], cols = col_list[c];
                test_weight w = make_block_weight(dtype, rows, cols, 0);
                for (size_t ti = 0; ti < sizeof token_counts / sizeof *token_counts; ti++) {
                    const size_t n = token_counts[ti];
                    float *x = random_activations(n, cols);
                    float *y = (float *)malloc(n * rows * sizeof(float)), *ref = (float *)malloc(n * rows * sizeof(float));
                    if (cols >= 64) memset(x + 32, 0, 32 * sizeof(float));   /* an all-zero block */
                    char what[64];
                    snprintf(what, sizeof what, "%s %s %zux%zu n=%zu", n == 1 ? "matvec" : "matmul", dtype_names[dtype], rows, cols, n);
                    run_tiles(ops, &w, x, n, y, TILES_MATVEC_OR_MATMUL);
                    run_tiles(&blob_ops_scalar, &w, x, n, ref, TILES_MATVEC_OR_MATMUL);
                    expect_identical(what, path, y, ref, n * rows);
                    if (n == 1) {
                        snprintf(what, sizeof what, "matvec_row %s %zux%zu", dtype_names[dtype], rows, cols);
                        run_tiles(ops, &w, x, n, y, TILES_ONE_ROW);
                        expect_identical(what, path, y, ref, rows);
                        snprintf(what, sizeof what, "matvec without lanes %s %zux%zu", dtype_names[dtype], rows, cols);
                        run_tiles(ops, &w, x, n, y, TILES_WITHOUT_LANES);
                        expect_identical(what, path, y, ref, rows);
                    } else {
                        snprintf(what, sizeof what, "matvec_tokens %s %zux%zu n=%zu", dtype_names[dtype], rows, cols, n);
                        run_tiles(ops, &w, x, n, y, TILES_FEW_TOKENS);
                        expect_identical(what, path, y, ref, n * rows);
                    }
                    free(x), free(y), free(ref);
                }
                free_block_weight(&w);
            }
        const size_t rows = 3, cols = k_quant ? 512 : 256;
        test_weight w = make_block_weight(dtype, rows, cols, 1);
        float x[2 * 512], y[2 * 3], ref[2 * 3];
        for (size_t k = 0; k < 2 * cols; k++) x[k] = 1.0f;
        run_tiles(ops, &w, x, 2, y, TILES_MATVEC_OR_MATMUL);
        run_tiles(&blob_ops_scalar, &w, x, 2, ref, TILES_MATVEC_OR_MATMUL);
        expect_identical("matmul extreme levels", path, y, ref, 2 * rows);
        run_tiles(ops, &w, x, 2, y, TILES_FEW_TOKENS);
        expect_identical("matvec_tokens extreme levels", path, y, ref, 2 * rows);
        run_tiles(ops, &w, x, 1, y, TILES_ONE_ROW);
        expect_identical("matvec_row extreme levels", path, y, ref, rows);
        run_tiles(ops, &w, x, 1, y, TILES_MATVEC_OR_MATMUL);
        expect_identical("matvec extreme levels", path, y, ref, rows);
        free_block_weight(&w);
    }
}

/* The planar q4_k, q5_k and q6_k prefill tile (the matmul tile at more tokens than a decode step)
 * against the scalar tile, bit for bit: row counts that leave partial calls (x86 avx512: 16 rows
 * a call, four to a register tile), token counts that leave every register-tile remainder
 * (avx512: 8 (q4_k, q5_k) or 4 (q6_k) tokens, then 4, 2, 1; 16 a chunk, or 64 for rows of over 24
 * super-blocks, which 6400 columns are), and the extreme levels of check_block_tiles, whose q6_k
 * halves' sum overflows int32. */
static void check_k_quant_prefill(const blob_isa_ops *ops, const char *path) {
    const int dtypes[] = {BLOB_Q4_K, BLOB_Q5_K, BLOB_Q6_K};
    const size_t row_counts[] = {3, 21}, col_counts[] = {512, 6400}, cols = 512, token_counts[] = {9, 15, 70, 131};
    for (size_t di = 0; di < sizeof dtypes / sizeof *dtypes; di++)
        for (size_t ri = 0; ri < 2; ri++) {
            const int dtype = dtypes[di];
            const size_t rows = row_counts[ri];
            for (size_t ci = 0; ci < sizeof col_counts / sizeof *col_counts; ci++) {
                test_weight w = make_block_weight(dtype, rows, col_counts[ci], 0);
                for (size_t ti = 0; ti < sizeof token_counts / sizeof *token_counts; ti++) {
                    const size_t n = token_counts[ti];
                    char what[64];
                    snprintf(what, sizeof what, "prefill %s %zux%zu n=%zu", dtype_names[dtype], rows, col_counts[ci], n);
                    expect_matmul_as_scalar(ops, &w, n, what, path);
                }
                free_block_weight(&w);
            }
            test_weight w = make_block_weight(dtype, rows, cols, 1);
            enum { N = 13 };
            float x[N * 512], y[N * 21], ref[N * 21];
            for (size_t k = 0; k < N * cols; k++) x[k] = 1.0f;
            run_tiles(ops, &w, x, N, y, TILES_MATVEC_OR_MATMUL);
            run_tiles(&blob_ops_scalar, &w, x, N, ref, TILES_MATVEC_OR_MATMUL);
            expect_identical("prefill extreme levels", path, y, ref, N * rows);
            free_block_weight(&w);
        }
}

/* weighted_rows over f32 and f16 rows: within rounding of scalar's (which multiplies, then
 * adds), and on each path every head's sums bit-identical to that head's alone, so that
 * attention's output does not depend on how many heads a work item takes; with `same` (the
 * architecture's first vector path, for the others) bit-identical to its: every vector path
 * fuses the same multiply-adds in the same order, whatever its register width. Sizes cover the
 * register tiles' columns, one vector of 8 and of 16, the tail past a multiple of 8, and 1..6
 * heads (x86 and NEON take four at a time). */
static void check_weighted_rows(const blob_isa_ops *ops, const char *path, const blob_isa_ops *same) {
    enum { MAX_N = 100, MAX_HEADS = 6, COUNT = 7 };
    const size_t sizes[] = {1, 7, 8, 9, 16, 24, 64, 72, 100};
    for (int dtype = BLOB_F32; dtype <= BLOB_F16; dtype++) {
        for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
            const size_t n = sizes[i];
            test_weight a = make_weight(dtype, COUNT, n);   /* rows 64 bytes apart, like a cache */
            const size_t stride = a.m.row_stride_bytes / blob_cache_elem_size(dtype);
            float alpha[MAX_HEADS][COUNT + 1], y[MAX_HEADS][MAX_N], ref[MAX_HEADS][MAX_N], alone[MAX_N];
            for (size_t h = 0; h < MAX_HEADS; h++)
                for (size_t r = 0; r < COUNT; r++) alpha[h][r] = next_float();
            for (size_t heads = 1; heads <= MAX_HEADS; heads++) {
                ops->weighted_rows(&y[0][0], MAX_N, &alpha[0][0], COUNT + 1, heads, a.plane, stride, COUNT, n, dtype);
                blob_ops_scalar.weighted_rows(&ref[0][0], MAX_N, &alpha[0][0], COUNT + 1, heads, a.plane, stride, COUNT, n,
                                              dtype);
                for (size_t h = 0; h < heads; h++) {
                    ops->weighted_rows(alone, MAX_N, alpha[h], COUNT + 1, 1, a.plane, stride, COUNT, n, dtype);
                    expect_identical("weighted_rows heads together vs alone", path, y[h], alone, n);
                    if (same) {
                        same->weighted_rows(alone, MAX_N, alpha[h], COUNT + 1, 1, a.plane, stride, COUNT, n, dtype);
                        expect_identical("weighted_rows vs the first vector path", path, y[h], alone, n);
                    }
                    for (size_t k = 0; k < n; k++) expect_close("weighted_rows vs scalar", path, y[h][k], ref[h][k], 1e-5);
                }
            }
            free_weight(&a);
        }
    }
}

/* key_scores, on the paths that have one, over f32 and f16 keys: within rounding of the dot
 * products in double, and each score bit-identical to that of its head and key alone in a call,
 * so that a query scores alike in decode and in prefill whatever heads and keys share a call.
 * head_dims cover less than a vector (7), a vector's remainder (20, 72) and whole vectors (64,
 * 256); 1..6 heads and 9 keys cover the register tile's partial heads and keys. */
static void check_key_scores(const blob_isa_ops *ops, const char *path) {
    enum { MAX_HEADS = 6, COUNT = 9, MAX_D = 256, SS = COUNT + 3 };
    const size_t dims[] = {7, 20, 64, 72, 256};
    if (!ops->key_scores) return;
    for (int dtype = BLOB_F32; dtype <= BLOB_F16; dtype++) {
        for (size_t i = 0; i < sizeof dims / sizeof *dims; i++) {
            const size_t d = dims[i];
            test_weight keys = make_weight(dtype, COUNT, d);   /* rows 64 bytes apart, like a cache */
            const size_t stride = keys.m.row_stride_bytes / blob_cache_elem_size(dtype);
            float q[MAX_HEADS * MAX_D], scores[MAX_HEADS * SS], alone;
            for (size_t k = 0; k < MAX_HEADS * d; k++) q[k] = next_float();
            for (size_t heads = 1; heads <= MAX_HEADS; heads++) {
                ops->key_scores(q, heads, d, keys.plane, stride, COUNT, dtype, scores, SS);
                for (size_t h = 0; h < heads; h++)
                    for (size_t j = 0; j < COUNT; j++) {
                        ops->key_scores(q + h * d, 1, d, keys.plane + j * keys.m.row_stride_bytes, stride, 1, dtype,
                                        &alone, 1);
                        expect_identical("key_scores together vs alone", path, &scores[h * SS + j], &alone, 1);
                        double want = 0.0, scale = 0.0;
                        for (size_t k = 0; k < d; k++) {
                            want += (double)keys.values[j * d + k] * q[h * d + k];
                            scale += fabs((double)keys.values[j * d + k] * q[h * d + k]);
                        }
                        expect_close("key_scores vs double", path, scores[h * SS + j], want, 1e-5 * scale);
                    }
            }
            free_weight(&keys);
        }
    }
}

/* RMSNorm rows bit-identical to scalar's: the same per-lane double sums, the same float ops.
 * Sizes cover the eight-wide loop, its tail, and a row of zeros (eps alone). */
static void check_rms_norm(const blob_isa_ops *ops, const char *path) {
    enum { MAX_D = 2051 };
    const size_t sizes[] = {1, 7, 8, 9, 64, 256, 640, 2051};
    static float x[MAX_D], w[MAX_D], mine[MAX_D], ref[MAX_D];
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        const size_t d = sizes[i];
        for (size_t k = 0; k < d; k++) {
            x[k] = next_float() * (k % 5 == 0 ? 300.0f : 1.0f);
            w[k] = next_float();
        }
        for (int offset = 0; offset <= 1; offset++) {
            ops->rms_norm_row(x, w, d, 1e-6f, (float)offset, mine);
            blob_ops_scalar.rms_norm_row(x, w, d, 1e-6f, (float)offset, ref);
            for (size_t k = 0; k < d; k++) expect_close("rms_norm_row", path, mine[k], ref[k], 0.0);
        }
        ops->rms_norm_row(x, w, d, 1e-6f, 1.0f, x);   /* in place */
        for (size_t k = 0; k < d; k++) expect_close("rms_norm_row in place", path, x[k], ref[k], 0.0);
    }
    memset(x, 0, sizeof x);
    ops->rms_norm_row(x, w, 100, 1e-6f, 0.0f, mine);
    for (size_t k = 0; k < 100; k++) expect_close("rms_norm_row of zeros", path, mine[k], 0.0, 0.0);
}

/* SiLU and GELU-tanh gates against the scalar path (libm's expf), over gates from -100 to 100
 * (both ends of the exp limits) and zero, in place too; NaN stays NaN. Within 8 ulp of the
 * result times (1 + |z|), z the sigmoid's argument: for z << 0 the result is about g e^z, so
 * the rounding of z itself (which a compiler may contract into an FMA on either side) moves it
 * by |z| ulp. Below 1e-30 it may differ absolutely: a gate of -90 leaves 1e-36 for libm's 0. */
static void check_gated_act(const blob_isa_ops *ops, const char *path) {
    enum { N = 203 };   /* the vector loop and a tail */
    float gate[N], up[N], mine[N], ref[N];
    for (int act = BLOB_ACT_SILU; act <= BLOB_ACT_GELU_TANH; act++) {
        for (size_t k = 0; k < N; k++) {
            gate[k] = k < 100 ? next_float() * 6.0f : k < 200 ? next_float() * 100.0f : 0.0f;
            up[k] = next_float() + 2.0f;
        }
        gate[7] = 1e-30f;
        ops->gated_act(gate, up, N, act, mine);
        blob_ops_scalar.gated_act(gate, up, N, act, ref);
        for (size_t k = 0; k < N; k++)
            expect_close(act ? "gated_act gelu_tanh" : "gated_act silu", path, mine[k], ref[k],
                         8 * FLT_EPSILON * fabs(ref[k]) * (1 + fabs(blob_act_arg(gate[k], act))) + 1e-30);
        ops->gated_act(gate, up, N, act, gate);   /* out == gate */
        for (size_t k = 0; k < N; k++) expect_close("gated_act in place", path, gate[k], mine[k], 0.0);
        gate[0] = NAN;
        ops->gated_act(gate, up, 8, act, mine);
        checks++;
        if (!isnan(mine[0])) fail("gated_act NaN gate", path, mine[0], NAN, 0.0);
    }
}

/* softmax_row vs scalar's (libm expf, summed in order): the polynomial exp and the lanes' sums
 * move an element by a few ulp of it, on rows of the vector loop and a tail, scaled scores of a
 * wide range (some below exp's clamp at -87), and a row shorter than a vector. */
static void check_softmax(const blob_isa_ops *ops, const char *path) {
    enum { N = 203 };
    const size_t lengths[] = {N, 8, 3};
    float mine[N], ref[N];
    for (size_t li = 0; li < sizeof lengths / sizeof *lengths; li++) {
        const size_t d = lengths[li];
        for (size_t k = 0; k < d; k++) mine[k] = ref[k] = next_float() * 40.0f;
        ops->softmax_row(mine, d, 0.75f);
        blob_ops_scalar.softmax_row(ref, d, 0.75f);
        for (size_t k = 0; k < d; k++) expect_close("softmax_row", path, mine[k], ref[k], 1e-5 * ref[k] + 1e-30);
    }
}

/* exp_row bit-identical to blob_exp_same on every path (vector lanes and tails), and that
 * within 4 ulp of libm's expf over the range softmax feeds it (x - max <= 0); the clamps: far
 * below -87 it gives exp(-87), above 88 exp(88), -inf and +inf alike. */
static void check_exp_row(const blob_isa_ops *ops, const char *path) {
    enum { N = 1203 };
    static float x[N], mine[N];
    const float special[] = {0.0f, -0.0f, -87.0f, -87.5f, -1000.0f, 88.0f, 89.0f, 1e-30f, -1e-30f, 0.5f, -0.5f,
                             0.34657359f, -0.34657359f, -INFINITY, INFINITY};
    for (size_t k = 0; k < N; k++)
        x[k] = k < sizeof special / sizeof *special ? special[k] : -95.0f * fabsf(next_float()) + (k % 7 == 0 ? 1.0f : 0.0f);
    const size_t lengths[] = {N, 8, 3, 1, 13};
    const float shifts[] = {0.0f, 1.0f, -2.5f};
    for (size_t li = 0; li < sizeof lengths / sizeof *lengths; li++)
        for (size_t si = 0; si < sizeof shifts / sizeof *shifts; si++) {
            const size_t d = lengths[li];
            const float shift = shifts[si];
            memcpy(mine, x, d * sizeof(float));
            ops->exp_row(mine, d, shift);
            for (size_t k = 0; k < d; k++) {
                const float arg = x[k] - shift, want = blob_exp_same(arg);
                expect_close("exp_row vs blob_exp_same", path, mine[k], want, 0.0);
                const float clamped = arg < BLOB_EXP_MIN ? BLOB_EXP_MIN : arg > BLOB_EXP_MAX ? BLOB_EXP_MAX : arg;
                expect_close("blob_exp_same vs expf", path, want, expf(clamped), 4.0 * 1.2e-7 * expf(clamped));
            }
        }
}

static void check_read_sum(const blob_isa_ops *ops, const char *path) {
    enum { WORDS = 4096 };
    static _Alignas(64) uint64_t words[WORDS];
    for (size_t i = 0; i < WORDS; i++) words[i] = ((uint64_t)next_u32() << 32) | next_u32();
    for (size_t nbytes = 64; nbytes <= sizeof words; nbytes *= 4) {
        checks++;
        if (ops->read_sum(words, nbytes) != blob_ops_scalar.read_sum(words, nbytes))
            fail("read_sum", path, (double)nbytes, (double)nbytes, 0);
    }
}

/* ---- the public API on each selectable path ---- */

static void matmul_via_api(const test_weight *w, const float *x, size_t n, float *y) {
    if (blob_matmul(&w->m, x, w->m.cols, n, y, w->m.rows) != BLOB_OK) fail("blob_matmul status", "api", 1, 0, 0);
}

static void attention_via_api(int kv_dtype, size_t window, float softcap, const float *q, size_t n, size_t p0, float *out) {
    enum { CACHE = 64 * 2 * 40 };   /* 64 positions, 2 kv heads, head_dim 40, head-major */
    static float k32[CACHE], v32[CACHE];
    static uint16_t k16[CACHE], v16[CACHE];
    static int filled = 0;
    if (!filled) {
        for (size_t i = 0; i < CACHE; i++) {
            k32[i] = next_float();
            v32[i] = next_float();
            k16[i] = blob_f32_to_f16(next_float());
            v16[i] = blob_f32_to_f16(next_float());
        }
        filled = 1;
    }
    const void *k = kv_dtype == BLOB_F16 ? (const void *)k16 : (const void *)k32;
    const void *v = kv_dtype == BLOB_F16 ? (const void *)v16 : (const void *)v32;
    blob_attention a = {8, 2, 40, kv_dtype, k, v, 40, 64 * 40, 40, 64 * 40, 0.3f, softcap, window, NULL, 0};
    if (blob_attention_run(&a, q, n, p0, out) != BLOB_OK) fail("blob_attention_run status", "api", 1, 0, 0);
}

/* blob_matmul_group of three matrices (different row counts) == three blob_matmul calls, bitwise. */
static void check_matmul_group(int dtype, const float *x, size_t cols, size_t n, const char *path) {
    const size_t rows[3] = {67, 5, 130};
    test_weight w[3];
    const blob_matrix *wp[3];
    float y[3][5 * 130], ref[3][5 * 130];
    float *yp[3] = {y[0], y[1], y[2]};
    for (int i = 0; i < 3; i++) {
        w[i] = make_weight(dtype, rows[i], cols);
        wp[i] = &w[i].m;
        matmul_via_api(&w[i], x, n, ref[i]);
    }
    if (blob_matmul_group(wp, yp, rows, 3, x, cols, n) != BLOB_OK) fail("blob_matmul_group status", path, 1, 0, 0);
    for (int i = 0; i < 3; i++) {
        checks++;
        if (memcmp(y[i], ref[i], n * rows[i] * sizeof(float)) != 0)
            fail("matmul_group vs matmul bit-identical", path, (double)i, (double)dtype, 0);
        free_weight(&w[i]);
    }
}

static void check_api(int isa) {
    const char *path = blob_isa_name(isa);
    enum { MAX_COLS = 512 };   /* 300 columns, rounded up to whole super-blocks for the k-quants */
    float x[5 * MAX_COLS], q[6 * 8 * 40];
    for (size_t i = 0; i < 5 * MAX_COLS; i++) x[i] = next_float();
    for (size_t i = 0; i < 6 * 8 * 40; i++) q[i] = next_float();
    for (int dtype = 0; dtype < BLOB_NUM_DTYPES; dtype++) {
        if (!blob_dtype_block(dtype)) continue;
        const size_t cols = test_cols(dtype, 300);
        test_weight w = make_weight(dtype, 67, cols);
        for (size_t n = 1; n <= 5; n += 4) {
            float y[5 * 67], y2[5 * 67], ref[5 * 67];
            blob_isa_select(BLOB_ISA_SCALAR);
            matmul_via_api(&w, x, n, ref);
            blob_isa_select(isa);
            for (int threads = 1; threads <= 3; threads++) {
                blob_threads_set(threads);
                matmul_via_api(&w, x, n, threads == 1 ? y : y2);
                checks++;
                if (threads > 1 && memcmp(y, y2, n * 67 * sizeof(float)) != 0)
                    fail("matmul threads 1 vs 2, 3 bit-identical", path, threads, dtype, 0);
            }
            for (size_t i = 0; i < n * 67; i++) {
                double slack = 0;
                for (size_t k = 0; k < cols; k++) slack += w.abs_values[(i % 67) * cols + k] * fabs(x[(i / 67) * cols + k]);
                expect_close("blob_matmul vs scalar", path, y[i], ref[i], 1e-5 * slack + 1e-6);
            }
            check_matmul_group(dtype, x, cols, n, path);
        }
        free_weight(&w);
    }
    for (int kv_dtype = BLOB_F32; kv_dtype <= BLOB_F16; kv_dtype++) {
        for (size_t window = 0; window <= 8; window += 8) {
            float out[6 * 8 * 40], out2[6 * 8 * 40], ref[6 * 8 * 40];
            blob_isa_select(BLOB_ISA_SCALAR);
            attention_via_api(kv_dtype, window, 4.0f, q, 6, 20, ref);
            blob_isa_select(isa);
            blob_threads_set(1);
            attention_via_api(kv_dtype, window, 4.0f, q, 6, 20, out);
            blob_threads_set(2);
            attention_via_api(kv_dtype, window, 4.0f, q, 6, 20, out2);
            checks++;
            if (memcmp(out, out2, sizeof out) != 0) fail("attention threads 1 vs 2 bit-identical", path, 0, 0, 0);
            for (size_t i = 0; i < 6 * 8 * 40; i++) expect_close("attention vs scalar", path, out[i], ref[i], 1e-5);
        }
    }
}

/* Counts the calls each thread index receives. Every index is a different thread, so the
 * counters need no atomics. */
typedef struct {
    unsigned calls[8];
    int nth_seen[8];
} pool_probe;

static void probe_task(void *ctx, int ith, int nth) {
    pool_probe *probe = ctx;
    probe->calls[ith]++;
    probe->nth_seen[ith] = nth;
}

/* Many back-to-back jobs (workers caught spinning) and 8 threads on fewer cores (workers
 * descheduled, asleep on the condition variable, the caller yielding). */
static void check_pool(void) {
    const int thread_counts[] = {2, 3, 8};
    const unsigned jobs = 100;
    for (size_t t = 0; t < sizeof thread_counts / sizeof *thread_counts; t++) {
        int n = thread_counts[t];
        checks++;
        if (blob_threads_set(n) != BLOB_OK || blob_threads_get() != n) fail("pool: set threads", "pool", blob_threads_get(), n, 0);
        pool_probe probe = {{0}, {0}};
        blob_call_lock();
        for (unsigned j = 0; j < jobs; j++) blob_pool_run(probe_task, &probe);
        blob_call_unlock();
        for (int ith = 0; ith < n; ith++) {
            expect_close("pool: calls per thread index", "pool", probe.calls[ith], jobs, 0);
            expect_close("pool: thread count seen by the task", "pool", probe.nth_seen[ith], n, 0);
        }
    }
    blob_threads_set(1);
}

/* blob_rope_angles + blob_rope over heads of 10 dimensions of which 6 rotate (partial rotary),
 * scale 1 and LongRoPE's 1.18: the rotated pairs (j, j + 3) match a double-precision rotation by
 * the scaled cos and sin, the last 4 dimensions stay as they were. */
static void check_rope(void) {
    enum { N = 3, HEADS = 2, HD = 10, NF = 3 };
    const int64_t positions[N] = {0, 5, 4095};
    const float inv_freq[NF] = {1.0f, 0.0464159f, 0.00215443f};
    const float scales[] = {1.0f, 1.1832159f};
    for (size_t si = 0; si < sizeof scales / sizeof *scales; si++) {
        float x[N * HEADS * HD], before[N * HEADS * HD], cos_sin[N * NF * 2];
        for (size_t e = 0; e < N * HEADS * HD; e++) before[e] = x[e] = next_float();
        blob_rope_angles(positions, N, inv_freq, NF, scales[si], cos_sin);
        blob_rope(x, N, HEADS, HD, cos_sin, NF);
        for (size_t i = 0; i < N; i++) {
            for (size_t h = 0; h < HEADS; h++) {
                const float *in = before + (i * HEADS + h) * HD, *out = x + (i * HEADS + h) * HD;
                for (size_t j = 0; j < NF; j++) {
                    const double angle = (double)((float)positions[i] * inv_freq[j]);
                    const double c = cos(angle) * scales[si], s = sin(angle) * scales[si];
                    expect_close("rope rotated first half", "rope", out[j], in[j] * c - in[j + NF] * s, 1e-5);
                    expect_close("rope rotated second half", "rope", out[j + NF], in[j + NF] * c + in[j] * s, 1e-5);
                }
                for (size_t d = 2 * NF; d < HD; d++) expect_close("rope pass-through dims", "rope", out[d], in[d], 0.0);
            }
        }
    }
}

/* blob_layer_norm (plain C, one path) against a double-precision LayerNorm, on rows around 0
 * and around 1000 (where a float mean would be off by its ulp), and in place. */
static void check_layer_norm(void) {
    enum { N = 2, D = 77 };
    float x[N * D], w[D], b[D], out[N * D];
    for (size_t k = 0; k < D; k++) {
        w[k] = next_float();
        b[k] = next_float();
    }
    for (size_t e = 0; e < N * D; e++) x[e] = next_float() + (e >= D ? 1000.0f : 0.0f);
    blob_layer_norm(x, w, b, N, D, 1e-6f, out);
    for (size_t i = 0; i < N; i++) {
        double mean = 0, var = 0;
        for (size_t k = 0; k < D; k++) mean += x[i * D + k];
        mean /= D;
        for (size_t k = 0; k < D; k++) var += (x[i * D + k] - mean) * (x[i * D + k] - mean);
        const double inv_std = 1.0 / sqrt(var / D + 1e-6);
        for (size_t k = 0; k < D; k++)
            expect_close("layer_norm vs double", "layer_norm", out[i * D + k], (x[i * D + k] - mean) * inv_std * w[k] + b[k],
                         1e-5);
    }
    blob_layer_norm(x, w, b, N, D, 1e-6f, x);
    for (size_t e = 0; e < N * D; e++) expect_close("layer_norm in place", "layer_norm", x[e], out[e], 0.0);
}

/* ---- the forward pass: a batched decode step against lone steps ---- */

enum { FW_LAYERS = 2, FW_HIDDEN = 64, FW_HEADS = 4, FW_KV_HEADS = 2, FW_HD = 16, FW_FFN = 96, FW_VOCAB = 50,
       FW_SEQ = 24, FW_MAX_SEQS = 4 };

typedef struct {
    blob_model m;
    blob_layer layers[FW_LAYERS];
    test_weight weights[FW_LAYERS * 7 + 2];
    float vectors[FW_LAYERS * 2 + 1][FW_HIDDEN];
    float inv_freq[FW_HD / 2];
} tiny_model;

static float *random_vector(float *v, size_t n) {
    for (size_t i = 0; i < n; i++) v[i] = 1.0f + 0.5f * next_float();
    return v;
}

/* A 2-layer model of `dtype` weights with GQA, a sliding window of 6 on layer 0, random weights. */
static void make_tiny_model(tiny_model *t, int dtype) {
    memset(t, 0, sizeof *t);
    const size_t q_width = FW_HEADS * FW_HD, kv_width = FW_KV_HEADS * FW_HD;
    size_t next_weight = 0, next_vector = 0;
    for (size_t j = 0; j < FW_HD / 2; j++) t->inv_freq[j] = powf(10000.0f, -2.0f * (float)j / FW_HD);
    for (size_t i = 0; i < FW_LAYERS; i++) {
        blob_layer *l = &t->layers[i];
        const size_t shapes[7][2] = {{q_width, FW_HIDDEN}, {kv_width, FW_HIDDEN}, {kv_width, FW_HIDDEN},
                                     {FW_HIDDEN, q_width}, {FW_FFN, FW_HIDDEN}, {FW_FFN, FW_HIDDEN},
                                     {FW_HIDDEN, FW_FFN}};
        blob_matrix *targets[7] = {&l->q, &l->k, &l->v, &l->o, &l->gate, &l->up, &l->down};
        for (size_t w = 0; w < 7; w++) {
            t->weights[next_weight] = make_weight(dtype, shapes[w][0], shapes[w][1]);
            *targets[w] = t->weights[next_weight++].m;
        }
        l->attn_norm = random_vector(t->vectors[next_vector++], FW_HIDDEN);
        l->ffn_norm = random_vector(t->vectors[next_vector++], FW_HIDDEN);
        l->inv_freq = t->inv_freq;
        l->n_freq = FW_HD / 2;
        l->rope_scale = 1.0f;
        l->window = i == 0 ? 6 : 0;
    }
    t->weights[next_weight] = make_weight(dtype, FW_VOCAB, FW_HIDDEN);
    t->m.embed = t->weights[next_weight++].m;
    t->weights[next_weight] = make_weight(dtype, FW_VOCAB, FW_HIDDEN);
    t->m.lm_head = t->weights[next_weight++].m;
    t->m.final_norm = random_vector(t->vectors[next_vector], FW_HIDDEN);
    t->m.n_layers = FW_LAYERS;
    t->m.hidden = FW_HIDDEN;
    t->m.n_heads = FW_HEADS;
    t->m.n_kv_heads = FW_KV_HEADS;
    t->m.head_dim = FW_HD;
    t->m.ffn = FW_FFN;
    t->m.rms_eps = 1e-6f;
    t->m.embedding_scale = 8.0f;
    t->m.attn_scale = 0.25f;
    t->m.activation = BLOB_ACT_SILU;
    t->m.layers = t->layers;
}

static void free_tiny_model(tiny_model *t) {
    for (size_t w = 0; w < sizeof t->weights / sizeof *t->weights; w++) free_weight(&t->weights[w]);
}

static blob_kv_cache new_cache(int dtype) {
    const size_t bytes = FW_LAYERS * FW_SEQ * FW_KV_HEADS * FW_HD * blob_cache_elem_size(dtype);
    blob_kv_cache c = {dtype, calloc(1, bytes), calloc(1, bytes), FW_SEQ};
    return c;
}

/* One batched step of `count` sequences, sequence s holding shape[s].prefix tokens and running
 * shape[s].n more (a decode token, a short prompt, a prompt chunk), against the same run of each
 * alone on a copy of its cache: every run's last logits and every cache must match bit for bit. */
typedef struct { size_t prefix, n; } step_shape;

static void check_batched_step(const tiny_model *t, int kv_dtype, const step_shape *shape, size_t count,
                               const char *path) {
    const size_t cache_bytes = FW_LAYERS * FW_SEQ * FW_KV_HEADS * FW_HD * blob_cache_elem_size(kv_dtype);
    void *scratch = malloc(blob_forward_scratch_bytes(&t->m, FW_MAX_SEQS * FW_SEQ));
    blob_sequence seqs[FW_MAX_SEQS];
    memset(seqs, 0, sizeof seqs);   /* no image spans */
    blob_kv_cache lone[FW_MAX_SEQS];
    int64_t prompt[FW_SEQ], step_ids[FW_MAX_SEQS * FW_SEQ];
    float batched[FW_MAX_SEQS * FW_VOCAB], alone[FW_VOCAB];
    size_t n_ids = 0;
    for (size_t s = 0; s < count; s++) {
        seqs[s].cache = new_cache(kv_dtype);
        seqs[s].start = shape[s].prefix;
        seqs[s].n = shape[s].n;
        seqs[s].logit_rows = 1;
        for (size_t i = 0; i < seqs[s].start; i++) prompt[i] = (int64_t)(next_u32() % FW_VOCAB);
        for (size_t i = 0; i < seqs[s].n; i++) step_ids[n_ids++] = (int64_t)(next_u32() % FW_VOCAB);
        if (blob_forward(&t->m, &seqs[s].cache, prompt, seqs[s].start, 0, 0, NULL, scratch) != BLOB_OK)
            fail("blob_forward (prompt) status", path, 1, 0, 0);
        lone[s] = new_cache(kv_dtype);
        memcpy(lone[s].k, seqs[s].cache.k, cache_bytes);
        memcpy(lone[s].v, seqs[s].cache.v, cache_bytes);
    }
    if (blob_forward_batch(&t->m, seqs, count, step_ids, batched, scratch) != BLOB_OK)
        fail("blob_forward_batch status", path, 1, 0, 0);
    for (size_t s = 0, first_id = 0; s < count; first_id += seqs[s++].n) {
        if (blob_forward(&t->m, &lone[s], &step_ids[first_id], seqs[s].n, seqs[s].start, 1, alone, scratch) != BLOB_OK)
            fail("blob_forward (step) status", path, 1, 0, 0);
        checks++;
        if (memcmp(alone, batched + s * FW_VOCAB, sizeof alone) != 0)
            fail("batched step logits == lone run's, bitwise", path, (double)s, (double)count, 0);
        checks++;
        if (memcmp(lone[s].k, seqs[s].cache.k, cache_bytes) != 0 || memcmp(lone[s].v, seqs[s].cache.v, cache_bytes) != 0)
            fail("batched step's keys and values == lone run's, bitwise", path, (double)s, (double)count, 0);
        free(seqs[s].cache.k), free(seqs[s].cache.v), free(lone[s].k), free(lone[s].v);
    }
    free(scratch);
}

/* Decode steps of 1 .. FW_MAX_SEQS sequences at different positions, then a step mixing decode
 * tokens, a short prompt (decode tiles) and a prompt chunk (prefill tiles). */
static void check_batched_steps(const tiny_model *t, int kv_dtype, const char *path) {
    const step_shape decode[FW_MAX_SEQS] = {{3, 1}, {8, 1}, {13, 1}, {18, 1}};
    const step_shape mixed[FW_MAX_SEQS] = {{4, 1}, {0, 12}, {2, 5}, {9, 1}};
    for (size_t count = 1; count <= FW_MAX_SEQS; count++) check_batched_step(t, kv_dtype, decode, count, path);
    check_batched_step(t, kv_dtype, mixed, FW_MAX_SEQS, path);
}

/* Image spans: positions 3..7 of a 12-token prompt take given vectors and attend both ways. A
 * change in the span's last vector reaches its first position but no earlier one; vectors equal
 * to the tokens' scaled embeddings give the logits of the span without vectors; a span crossing
 * the call, or spans out of order, are refused. */
enum { SP_N = 12, SP_BEGIN = 3, SP_END = 8 };

static void forward_with_spans(const tiny_model *t, const int64_t *ids, const blob_span *spans, size_t n_spans,
                               float *logits, void *scratch, const char *path) {
    blob_sequence q = {new_cache(BLOB_F32), 0, SP_N, SP_N, spans, n_spans};
    if (blob_forward_batch(&t->m, &q, 1, ids, logits, scratch) != BLOB_OK)
        fail("blob_forward_batch with a span: status", path, 1, 0, 0);
    free(q.cache.k), free(q.cache.v);
}

static void check_image_spans(const tiny_model *t, const char *path) {
    static float embeds[SP_END - SP_BEGIN][FW_HIDDEN], scaled[SP_END - SP_BEGIN][FW_HIDDEN];
    static float base[SP_N * FW_VOCAB], changed[SP_N * FW_VOCAB], plain[SP_N * FW_VOCAB];
    void *scratch = malloc(blob_forward_scratch_bytes(&t->m, SP_N));
    int64_t ids[SP_N];
    for (size_t i = 0; i < SP_N; i++) ids[i] = (int64_t)(next_u32() % FW_VOCAB);
    for (size_t r = 0; r < SP_END - SP_BEGIN; r++) random_vector(embeds[r], FW_HIDDEN);
    blob_span span = {SP_BEGIN, SP_END, &embeds[0][0]};
    forward_with_spans(t, ids, &span, 1, base, scratch, path);
    for (size_t r = 1; r < SP_END - SP_BEGIN; r++) random_vector(embeds[r], FW_HIDDEN);   /* all but the first */
    forward_with_spans(t, ids, &span, 1, changed, scratch, path);
    checks++;
    if (memcmp(base, changed, SP_BEGIN * FW_VOCAB * sizeof(float)) != 0)
        fail("a span's vectors do not reach the positions before it", path, 1, 0, 0);
    float most = 0.0f;
    for (size_t v = 0; v < FW_VOCAB; v++)
        most = fmaxf(most, fabsf(base[SP_BEGIN * FW_VOCAB + v] - changed[SP_BEGIN * FW_VOCAB + v]));
    checks++;
    if (most < 1e-4f) fail("a span's first position sees the span's later vectors", path, most, 1e-4, 0);

    blob_embed(&t->m.embed, ids + SP_BEGIN, SP_END - SP_BEGIN, &scaled[0][0]);
    for (size_t e = 0; e < (SP_END - SP_BEGIN) * FW_HIDDEN; e++) (&scaled[0][0])[e] *= t->m.embedding_scale;
    const blob_span given = {SP_BEGIN, SP_END, &scaled[0][0]}, implied = {SP_BEGIN, SP_END, NULL};
    forward_with_spans(t, ids, &given, 1, changed, scratch, path);
    forward_with_spans(t, ids, &implied, 1, plain, scratch, path);
    expect_identical("span vectors equal to the scaled embeddings == a span without vectors", path, changed, plain,
                     SP_N * FW_VOCAB);

    blob_sequence crossing = {new_cache(BLOB_F32), 0, 5, 0, &implied, 1};
    const blob_span unsorted[2] = {{6, 8, NULL}, {1, 3, NULL}};
    blob_sequence disorder = {crossing.cache, 0, SP_N, 0, unsorted, 2};
    checks++;
    if (blob_forward_batch(&t->m, &crossing, 1, ids, NULL, scratch) != BLOB_EINVAL ||
        blob_forward_batch(&t->m, &disorder, 1, ids, NULL, scratch) != BLOB_EINVAL)
        fail("a span crossing the call, or spans out of order: BLOB_EINVAL", path, 0, 1, 0);
    free(crossing.cache.k), free(crossing.cache.v), free(scratch);
}

static void check_forward_batch(int isa) {
    const int dtypes[] = {BLOB_F32, BLOB_Q8_0};
    tiny_model *t = malloc(sizeof *t);
    blob_isa_select(isa);
    for (size_t d = 0; d < sizeof dtypes / sizeof *dtypes; d++) {
        make_tiny_model(t, dtypes[d]);
        for (int threads = 1; threads <= 2; threads++) {
            blob_threads_set(threads);
            for (int kv_dtype = BLOB_F32; kv_dtype <= BLOB_F16; kv_dtype++)
                check_batched_steps(t, kv_dtype, blob_isa_name(isa));
            check_image_spans(t, blob_isa_name(isa));
        }
        free_tiny_model(t);
    }
    blob_threads_set(1);
    free(t);
}

int main(void) {
    uint32_t f = blob_cpu_features();
    const struct { const char *name; const blob_isa_ops *ops; int usable; } paths[] = {
#if defined(BLOB_HAVE_X86)
        {"avx2", &blob_ops_avx2, blob_isa_supported(BLOB_ISA_AVX2)},
        {"avx2+vnni", &blob_ops_avx2_vnni, blob_isa_supported(BLOB_ISA_AVX2) && (f & BLOB_CPU_AVX512VNNI) && (f & BLOB_CPU_AVX512BW)},
        {"avx512", &blob_ops_avx512, blob_isa_supported(BLOB_ISA_AVX512)},
#endif
#if defined(BLOB_HAVE_ARM64)
        {"neon", &blob_ops_neon, blob_isa_supported(BLOB_ISA_NEON)},
        {"neon+dotprod", &blob_ops_neon_dotprod, blob_isa_supported(BLOB_ISA_NEON) && (f & BLOB_CPU_DOTPROD)},
#endif
        {"scalar", &blob_ops_scalar, 1},
    };
    (void)f;
    printf("arch %s, features 0x%x\n", blob_cpu_arch(), (unsigned)f);
    for (size_t i = 0; i < sizeof paths / sizeof *paths; i++) {
        if (!paths[i].usable) {
            printf("path %-13s skipped: the CPU lacks its features\n", paths[i].name);
            continue;
        }
        int before = failures;
        check_quantize(paths[i].ops, paths[i].name);
        check_tiles(paths[i].ops, paths[i].name);
        check_block_tiles(paths[i].ops, paths[i].name);
        check_k_quant_prefill(paths[i].ops, paths[i].name);
        check_interleave8(paths[i].ops, paths[i].name);
        check_interleave8_q5_0(paths[i].ops, paths[i].name);
        const int vector = paths[i].ops != &blob_ops_scalar && paths[0].usable;
        check_weighted_rows(paths[i].ops, paths[i].name, vector && i > 0 ? paths[0].ops : NULL);
        check_key_scores(paths[i].ops, paths[i].name);
        check_gated_act(paths[i].ops, paths[i].name);
        check_rms_norm(paths[i].ops, paths[i].name);
        check_softmax(paths[i].ops, paths[i].name);
        check_exp_row(paths[i].ops, paths[i].name);
        check_read_sum(paths[i].ops, paths[i].name);
        printf("path %-13s %s\n", paths[i].name, failures == before ? "ok" : "FAILED");
    }
    for (int isa = 0; isa < BLOB_NUM_ISAS; isa++) {
        if (!blob_isa_supported(isa)) {
            printf("api  %-13s skipped: not built for or not supported by this CPU\n", blob_isa_name(isa));
            continue;
        }
        int before = failures;
        check_api(isa);
        check_interleave8_api(blob_isa_name(isa));
        check_interleave8_q5_0_api(blob_isa_name(isa));
        check_forward_batch(isa);
        printf("api  %-13s %s\n", blob_isa_name(isa), failures == before ? "ok" : "FAILED");
    }
    int before = failures;
    check_pool();
    printf("pool               %s\n", failures == before ? "ok" : "FAILED");
    before = failures;
    check_rope();
    printf("rope               %s\n", failures == before ? "ok" : "FAILED");
    before = failures;
    check_layer_norm();
    printf("layer_norm         %s\n", failures == before ? "ok" : "FAILED");
    printf("%d checks, %d failures\n", checks, failures);
    return failures ? 1 : 0;
}

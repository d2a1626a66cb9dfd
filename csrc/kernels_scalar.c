/* The portable reference path: plain C, no instruction-set extension.
 *
 * Every SIMD path computes the same quantities in the same blocks: float dots in 8 lanes,
 * quantized dots as one exact int32 sum per 32-value block scaled by (weight scale x
 * activation scale). The lanes are written out so compilers can vectorize this file with the
 * baseline ISA (SSE2 on x86-64) without reassociating anything.
 */
#include "kernels_impl.h"

#define LANES 8
#define MV_ROWS 4               /* matvec tile: 4 rows x 1 token */
#define MM_ROWS 4               /* matmul tile: 4 rows x 2 tokens */
#define MM_TOKENS 2

/* lanes[0..LANES) = weights k .. k+len-1 of `row` as f32, zero past len */
BLOB_INLINE void load_weights(const uint8_t *row, size_t k, size_t len, int dtype, float *lanes) {
    for (size_t l = 0; l < LANES; l++) lanes[l] = l < len ? blob_weight_f32(row, k + l, dtype) : 0.0f;
}

BLOB_INLINE float sum_lanes(const float *lanes) {
    float s = 0.0f;
    for (int l = 0; l < LANES; l++) s += lanes[l];
    return s;
}

/* acc[r][t] += W[row r][k .. k+len) . X[token t][k .. k+len) */
BLOB_INLINE void float_step(float acc[][BLOB_TILE_MAX_TOKENS][LANES], const uint8_t *const *rows,
                            const float *const *xs, size_t k, size_t len, int dtype, int R, int T) {
    BLOB_UNROLL
    for (int r = 0; r < R; r++) {
        float wl[LANES];
        load_weights(rows[r], k, len, dtype, wl);
        BLOB_UNROLL
        for (int t = 0; t < T; t++)
            for (size_t l = 0; l < LANES; l++) acc[r][t][l] += wl[l] * (l < len ? xs[t][k + l] : 0.0f);
    }
}

/* Y tile for f32 / f16 / bf16 weights: the structure is shared, `dtype` picks the loader. */
BLOB_INLINE void float_tile(const blob_matrix *w, size_t r0, size_t nr, const blob_acts *a,
                            size_t t0, size_t nt, float *y, size_t ys, int dtype, int R, int T) {
    const uint8_t *rows[BLOB_TILE_MAX_ROWS];
    const float *xs[BLOB_TILE_MAX_TOKENS];
    float acc[BLOB_TILE_MAX_ROWS][BLOB_TILE_MAX_TOKENS][LANES] = {{{0}}};
    blob_tile_rows(w, r0, nr, R, rows);
    blob_tile_xs(a->x, a->x_stride, t0, nt, T, xs);
    size_t k = 0, K = w->cols;
    for (; k + LANES <= K; k += LANES) float_step(acc, rows, xs, k, LANES, dtype, R, T);
    if (k < K) float_step(acc, rows, xs, k, K - k, dtype, R, T);
    for (size_t r = 0; r < nr; r++)
        for (size_t t = 0; t < nt; t++) y[(t0 + t) * ys + r0 + r] = sum_lanes(acc[r][t]);
}

/* The 32 integer levels of block b of a quantized row: q8_0 in place, q4_0 unpacked into
 * `buffer` (byte j: element j in the low nibble, j + 16 in the high one, both level + 8). */
BLOB_INLINE const int8_t *block_levels(const uint8_t *row, size_t b, int dtype, int8_t *buffer) {
    if (dtype == BLOB_Q4_0) {
        const uint8_t *packed = row + 16 * b;
        for (int i = 0; i < 16; i++) {
            buffer[i] = (int8_t)((packed[i] & 15) - 8);
            buffer[i + 16] = (int8_t)((packed[i] >> 4) - 8);
        }
        return buffer;
    }
    return (const int8_t *)row + BLOB_QBLOCK * b;
}

/* Block b of a token's activation levels as int16: q8_0's int16 levels as they are, q4_0's int8
 * ones widened (once per token and block, shared by the tile's rows, so the vectorized dot
 * below only widens w: about a third fewer instructions per row). */
BLOB_INLINE const int16_t *act_block(const void *levels, size_t b, int dtype, int16_t *buffer) {
    if (blob_act_bits(dtype) == 16) return (const int16_t *)levels + BLOB_QBLOCK * b;
    const int8_t *bytes = (const int8_t *)levels + BLOB_QBLOCK * b;
    for (int i = 0; i < BLOB_QBLOCK; i++) buffer[i] = bytes[i];
    return buffer;
}

/* The exact int32 dot of a block: |w| <= 127, |x| <= 32639, 32 terms. */
BLOB_INLINE int32_t dot_block(const int8_t *w, const int16_t *x) {
    int32_t s = 0;
    for (int i = 0; i < BLOB_QBLOCK; i++) s += (int32_t)w[i] * (int32_t)x[i];
    return s;
}

/* Y tile for q8_0 / q4_0 weights against their quantized activations (blob_act_bits). */
BLOB_INLINE void quant_tile(const blob_matrix *w, size_t r0, size_t nr, const blob_acts *a,
                            size_t t0, size_t nt, float *y, size_t ys, int dtype, int R, int T) {
    const uint8_t *rows[BLOB_TILE_MAX_ROWS];
    size_t tokens[BLOB_TILE_MAX_TOKENS];
    float acc[BLOB_TILE_MAX_ROWS][BLOB_TILE_MAX_TOKENS] = {{0}};
    blob_tile_rows(w, r0, nr, R, rows);
    blob_tile_tokens(t0, nt, T, tokens);
    const size_t nb = a->nblocks;
    for (size_t b = 0; b < nb; b++) {
        int8_t unpacked[BLOB_TILE_MAX_ROWS][BLOB_QBLOCK];
        const int8_t *wl[BLOB_TILE_MAX_ROWS];
        float dw[BLOB_TILE_MAX_ROWS];
        BLOB_UNROLL
        for (int r = 0; r < R; r++) {
            wl[r] = block_levels(rows[r], b, dtype, unpacked[r]);
            size_t row_index = r0 + blob_min((size_t)r, nr - 1);
            dw[r] = blob_f16_to_f32(((const uint16_t *)w->plane[1])[row_index * nb + b]);
        }
        BLOB_UNROLL
        for (int t = 0; t < T; t++) {
            int16_t buffer[BLOB_QBLOCK];
            const int16_t *xw = act_block(blob_act_levels(a, tokens[t], dtype), b, dtype, buffer);
            float dx = a->d[tokens[t] * nb + b];
            BLOB_UNROLL
            for (int r = 0; r < R; r++) {
                const float product = (float)dot_block(wl[r], xw) * (dw[r] * dx);
                acc[r][t] += product;   /* a statement of its own: no compiler fuses it into an FMA */
            }
        }
    }
    for (size_t r = 0; r < nr; r++)
        for (size_t t = 0; t < nt; t++) y[(t0 + t) * ys + r0 + r] = acc[r][t];
}

BLOB_DEFINE_TILES(, MV_ROWS, MM_ROWS, MM_TOKENS)

/* quant_tile's sums over q8_0 or q4_0 rows in BLOB_LAYOUT_INTERLEAVE8: each block's levels
 * gathered from its group's block, then the same operations in the same order, token after token. */
BLOB_INLINE void interleave8_tile(const blob_matrix *w, size_t r0, size_t nr, const blob_acts *a, size_t t0,
                                  size_t nt, float *y, size_t ys, int dtype) {
    const size_t nb = a->nblocks;
    for (size_t r = r0; r < r0 + nr; r++)
        for (size_t tc = t0; tc < t0 + nt; tc += BLOB_TILE_MAX_TOKENS) {
            const size_t count = blob_min(BLOB_TILE_MAX_TOKENS, t0 + nt - tc);
            float acc[BLOB_TILE_MAX_TOKENS] = {0};
            for (size_t b = 0; b < nb; b++) {
                int8_t levels[BLOB_QBLOCK];
                for (int i = 0; i < BLOB_QBLOCK; i++) levels[i] = (int8_t)blob_interleave8_level(w, r, b * BLOB_QBLOCK + i);
                const float dw = blob_interleave8_scale(w, r, b);
                for (size_t t = 0; t < count; t++) {
                    int16_t buffer[BLOB_QBLOCK];
                    const int16_t *x = act_block(blob_act_levels(a, tc + t, dtype), b, dtype, buffer);
                    const float product = (float)dot_block(levels, x) * (dw * a->d[(tc + t) * nb + b]);
                    acc[t] += product;   /* as in quant_tile: never fused into an FMA */
                }
            }
            for (size_t t = 0; t < count; t++) y[(tc + t) * ys + r] = acc[t];
        }
}

void blob_scalar_interleave8_q8_0(const blob_matrix *w, size_t r0, size_t nr, const blob_acts *a, size_t t0,
                                  size_t nt, float *y, size_t ys) {
    interleave8_tile(w, r0, nr, a, t0, nt, y, ys, BLOB_Q8_0);
}

void blob_scalar_interleave8_q4_0(const blob_matrix *w, size_t r0, size_t nr, const blob_acts *a, size_t t0,
                                  size_t nt, float *y, size_t ys) {
    interleave8_tile(w, r0, nr, a, t0, nt, y, ys, BLOB_Q4_0);
}

/* The exact dot of 16 weight levels with 16 activation levels: |w| <= 32, |x| <= 32639. */
BLOB_INLINE int32_t dot_half(const int8_t *w, const int16_t *x) {
    int32_t s = 0;
    for (int i = 0; i < BLOB_QBLOCK / 2; i++) s += (int32_t)w[i] * (int32_t)x[i];
    return s;
}

/* One 32-value block's contribution to an output (blob_block32): the integer sums exact (the
 * sub-scaled level sum in int64, as q6_k's two halves reach 2 x 2^31), then scaled in floats. */
BLOB_INLINE float block32_dot(const blob_block32 *w, const int16_t *x, const int32_t *x_half_sums, float dx,
                              int dtype) {
    const int64_t levels = (int64_t)w->sc[0] * dot_half(w->q, x) + (int64_t)w->sc[1] * dot_half(w->q + 16, x + 16);
    float sum = (w->d * dx) * (float)levels;
    if (blob_has_mins(dtype)) {
        const int32_t mins = w->mn[0] * x_half_sums[0] + w->mn[1] * x_half_sums[1];
        sum += (w->m * dx) * (float)mins;
    }
    return sum;
}

/* Y for rows r0 .. r0+nr-1 (any nr, in groups of BLOB_TILE_MAX_ROWS) and tokens t0 .. t0+nt-1
 * of a q4_1 .. q6_k matrix (q5_0 in either layout): each block of a row decoded once and
 * dotted with every token. Each
 * output sums its block values in the order blob_fold_lanes defines, so its value does not
 * depend on the tile shape: decode and prefill agree bit for bit. */
BLOB_INLINE void block32_tile(const blob_matrix *w, size_t r0, size_t nr, const blob_acts *a, size_t t0,
                              size_t nt, float *y, size_t ys, int dtype) {
    const size_t nb = a->nblocks;
    for (size_t g = r0; g < r0 + nr; g += BLOB_TILE_MAX_ROWS) {
        const size_t R = blob_min(BLOB_TILE_MAX_ROWS, r0 + nr - g);
        const uint8_t *planes[BLOB_TILE_MAX_ROWS][BLOB_MAX_PLANES];
        float acc[BLOB_TILE_MAX_ROWS][BLOB_TILE_MAX_TOKENS][BLOB_SUM_LANES] = {{{0}}};
        for (size_t r = 0; r < R; r++) blob_row_planes(w, g + r, planes[r]);
        for (size_t b = 0; b < nb; b++) {
            blob_block32 blocks[BLOB_TILE_MAX_ROWS];
            for (size_t r = 0; r < R; r++) {
                if (w->layout == BLOB_LAYOUT_INTERLEAVE8) blob_interleave8_block32(w, g + r, b, &blocks[r]);
                else blob_decode_block32(dtype, planes[r], b, &blocks[r]);
            }
            for (size_t t = 0; t < nt; t++) {
                const size_t token = t0 + t;
                const int16_t *x = a->q16 + token * a->q_stride + BLOB_QBLOCK * b;
                const int32_t *half_sums = a->half_sums + token * 2 * nb + 2 * b;
                const float dx = a->d[token * nb + b];
                for (size_t r = 0; r < R; r++)
                    acc[r][t][b % BLOB_SUM_LANES] += block32_dot(&blocks[r], x, half_sums, dx, dtype);
            }
        }
        for (size_t r = 0; r < R; r++)
            for (size_t t = 0; t < nt; t++) y[(t0 + t) * ys + g + r] = blob_fold_lanes(acc[r][t]);
    }
}

#define SCALAR_TILE(type, dtype)                                                                \
    void blob_scalar_tile_##type(const blob_matrix *w, size_t r0, size_t nr, const blob_acts *a, \
                                 size_t t0, size_t nt, float *y, size_t ys) {                  \
        block32_tile(w, r0, nr, a, t0, nt, y, ys, dtype);                                      \
    }                                                                                          \
    BLOB_SCALAR_TILES(type)
SCALAR_TILE(q4_1, BLOB_Q4_1)
SCALAR_TILE(q5_0, BLOB_Q5_0)
SCALAR_TILE(q5_1, BLOB_Q5_1)
SCALAR_TILE(q2_k, BLOB_Q2_K)
SCALAR_TILE(q3_k, BLOB_Q3_K)
SCALAR_TILE(q4_k, BLOB_Q4_K)
SCALAR_TILE(q5_k, BLOB_Q5_K)
SCALAR_TILE(q6_k, BLOB_Q6_K)

/* block32_tile over interleaved q5_0 rows and any number of tokens. */
void blob_scalar_interleave8_q5_0(const blob_matrix *w, size_t r0, size_t nr, const blob_acts *a, size_t t0,
                                  size_t nt, float *y, size_t ys) {
    for (size_t t = t0; t < t0 + nt; t += BLOB_TILE_MAX_TOKENS)
        block32_tile(w, r0, nr, a, t, blob_min(BLOB_TILE_MAX_TOKENS, t0 + nt - t), y, ys, BLOB_Q5_0);
}

/* Activations to blocks of `bits`-bit levels: d = amax / QMAX (blob_act_qmax), q =
 * round-to-nearest-even(x * (1/d)). Every path computes exactly this, so the quantized
 * activations are identical across paths. */
BLOB_INLINE void quantize_blocks(const float *x, size_t n, void *q, float *d, int bits) {
    for (size_t b = 0; b * BLOB_QBLOCK < n; b++) {
        size_t k0 = b * BLOB_QBLOCK, len = blob_min(BLOB_QBLOCK, n - k0);
        float amax = 0.0f;
        for (size_t i = 0; i < len; i++) amax = fmaxf(amax, fabsf(x[k0 + i]));
        float scale = amax / blob_act_qmax(bits), inv = blob_inverse_scale(scale);
        for (size_t i = 0; i < BLOB_QBLOCK; i++) {
            long level = i < len ? lrintf(x[k0 + i] * inv) : 0;
            if (bits == 16) ((int16_t *)q)[k0 + i] = (int16_t)level;
            else ((int8_t *)q)[k0 + i] = (int8_t)level;
        }
        d[b] = scale;
    }
}

static void quantize_row(const float *x, size_t n, int8_t *q, float *d) { quantize_blocks(x, n, q, d, 8); }
static void quantize_row16(const float *x, size_t n, int16_t *q, float *d) { quantize_blocks(x, n, q, d, 16); }

BLOB_INLINE void axpy(float *y, float alpha, const void *x, size_t n, int dtype) {
    for (size_t k = 0; k < n; k++) y[k] += alpha * blob_weight_f32(x, k, dtype);
}

static void weighted_rows(float *y, size_t y_stride, const float *alpha, size_t alpha_stride, size_t heads,
                          const void *rows, size_t stride, size_t count, size_t n, int dtype) {
    const size_t step = stride * blob_cache_elem_size(dtype);
    for (size_t h = 0; h < heads; h++) {
        float *yh = y + h * y_stride;
        memset(yh, 0, n * sizeof(float));
        for (size_t i = 0; i < count; i++) axpy(yh, alpha[h * alpha_stride + i], (const uint8_t *)rows + i * step, n, dtype);
    }
}

static uint64_t read_sum(const void *data, size_t nbytes) {
    const uint64_t *words = (const uint64_t *)data;
    uint64_t acc[8] = {0};
    for (size_t k = 0; k < nbytes / 8; k += 8)
        for (int l = 0; l < 8; l++) acc[l] += words[k + l];
    return acc[0] + acc[1] + acc[2] + acc[3] + acc[4] + acc[5] + acc[6] + acc[7];
}

static void gated_act(const float *gate, const float *up, size_t count, int act, float *out) {
    for (size_t k = 0; k < count; k++) out[k] = blob_gated_act1(gate[k], up[k], act);
}

/* The sum of squares in eight running sums: a single one waits out the add latency at every
 * element. */
static void rms_norm_row(const float *x, const float *w, size_t d, float eps, float offset, float *out) {
    double lanes[8] = {0};
    size_t k = 0;
    for (; k + 8 <= d; k += 8)
        for (int l = 0; l < 8; l++) lanes[l] += (double)x[k + l] * x[k + l];
    const float inv_rms = blob_inv_rms(lanes, x, k, d, eps);
    for (k = 0; k < d; k++) out[k] = x[k] * inv_rms * (offset + w[k]);
}

/* libm's expf, summed in order: the reference of the vector paths */
static void softmax_row(float *x, size_t d, float scale) {
    float max_value = -INFINITY, total = 0.0f;
    for (size_t k = 0; k < d; k++) {
        x[k] *= scale;
        max_value = fmaxf(max_value, x[k]);
    }
    for (size_t k = 0; k < d; k++) {
        x[k] = expf(x[k] - max_value);
        total += x[k];
    }
    const float inv_total = 1.0f / total;
    for (size_t k = 0; k < d; k++) x[k] *= inv_total;
}

static void exp_row(float *x, size_t d, float shift) {
    for (size_t k = 0; k < d; k++) x[k] = blob_exp_same(x[k] - shift);
}

const blob_isa_ops blob_ops_scalar = {
    BLOB_TILE_TABLE(MV_ROWS, MM_ROWS, MM_TOKENS),
    quantize_row, quantize_row16, weighted_rows, gated_act, rms_norm_row, softmax_row, exp_row, read_sum,
    .mm_any_tokens = {0},   /* every matmul tile takes at most mm_tokens */
    .interleave8 = {[BLOB_Q8_0] = blob_scalar_interleave8_q8_0, [BLOB_Q4_0] = blob_scalar_interleave8_q4_0,
                    [BLOB_Q5_0] = blob_scalar_interleave8_q5_0},
};

/* The x86-64 path for CPUs with AVX-512 F/BW/VL/DQ and VNNI ("avx512"): kernels_x86.inc compiled
 * with EVEX encodings and 32 vector registers (its int8 / int16 dot products by VPDPBUSD /
 * VPDPWSSD), with the float tiles below, which take sixteen weights per step in 512-bit
 * registers, in its place.
 *
 * bf16 weights are widened to f32 and multiplied by the f32 activations with FMA, as on every
 * other path: the kernels' contract for float weights is exact products and f32 sums
 * (tests/test_kernels.py: within 1e-5 of the sum of |w x|). AVX512-BF16's VDPBF16PS takes both
 * operands as bf16, so it would round each activation to 8 significant bits (a relative error up
 * to 2^-9, two hundred times that bound); splitting each activation into three bf16 parts keeps
 * it exact but costs three VDPBF16PS per 32 weights and token against two FMAs.
 */
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "kernels_impl.h"

#if defined(_MSC_VER) && !defined(__clang__)
#define ZMM_TARGET
#else
#define ZMM_TARGET __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#endif
#define ZFN BLOB_INLINE ZMM_TARGET

/* Weights k .. k+len-1 (len <= 16) of a plain-dtype row as f32, zero past len: masked loads,
 * which never touch the masked-off bytes. */
ZFN __m512 zmm_load_weights(const uint8_t *row, size_t k, size_t len, int dtype) {
    const __mmask16 mask = len >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << len) - 1);
    switch (dtype) {
    case BLOB_F16:
        return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, row + 2 * k));
    case BLOB_BF16:
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, row + 2 * k)), 16));
    default:
        return _mm512_maskz_loadu_ps(mask, (const float *)row + k);
    }
}

ZFN __m512 zmm_load_floats(const float *x, size_t len) {
    const __mmask16 mask = len >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << len) - 1);
    return _mm512_maskz_loadu_ps(mask, x);
}

/* One row against one token, in four accumulators (one FMA chain would wait out its latency). */
ZFN float zmm_float_row(const uint8_t *row, const float *x, size_t K, int dtype) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    size_t k = 0;
    for (; k + 64 <= K; k += 64)
        BLOB_UNROLL
        for (int u = 0; u < 4; u++)
            acc[u] = _mm512_fmadd_ps(zmm_load_weights(row, k + 16 * u, 16, dtype), _mm512_loadu_ps(x + k + 16 * u), acc[u]);
    for (; k < K; k += 16) {
        const size_t len = blob_min(16, K - k);
        acc[0] = _mm512_fmadd_ps(zmm_load_weights(row, k, len, dtype), zmm_load_floats(x + k, len), acc[0]);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

/* acc[r][t] += W[row r][k .. k+len) . X[token t][k .. k+len) */
ZFN void zmm_float_step(__m512 acc[][BLOB_TILE_MAX_TOKENS], const uint8_t *const *rows, const float *const *xs,
                        size_t k, size_t len, int dtype, int R, int T) {
    __m512 xv[BLOB_TILE_MAX_TOKENS];
    BLOB_UNROLL
    for (int t = 0; t < T; t++) xv[t] = zmm_load_floats(xs[t] + k, len);
    BLOB_UNROLL
    for (int r = 0; r < R; r++) {
        const __m512 wv = zmm_load_weights(rows[r], k, len, dtype);
        BLOB_UNROLL
        for (int t = 0; t < T; t++) acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
    }
}

/* The float tile of kernels_x86.inc (float_tile), sixteen lanes at a time. */
ZFN void zmm_float_tile(const blob_matrix *w, size_t r0, size_t nr, const blob_acts *a, size_t t0, size_t nt,
                        float *y, size_t ys, int dtype, int R, int T) {
    if (R == 1 && T == 1) {
        y[t0 * ys + r0] = zmm_float_row((const uint8_t *)w->plane[0] + r0 * w->row_stride_bytes,
                                        a->x + t0 * a->x_stride, w->cols, dtype);
        return;
    }
    const uint8_t *rows[BLOB_TILE_MAX_ROWS];
    size_t tokens[BLOB_TILE_MAX_TOKENS];
    const float *xs[BLOB_TILE_MAX_TOKENS];
    __m512 acc[BLOB_TILE_MAX_ROWS][BLOB_TILE_MAX_TOKENS];
    blob_tile_rows(w, r0, nr, R, rows);
    blob_tile_tokens(t0, nt, T, tokens);
    BLOB_UNROLL
    for (int t = 0; t < T; t++) xs[t] = a->x + tokens[t] * a->x_stride;
    BLOB_UNROLL
    for (int r = 0; r < R; r++)
        BLOB_UNROLL
        for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_ps();
    size_t k = 0, K = w->cols;
    for (; k + 16 <= K; k += 16) zmm_float_step(acc, rows, xs, k, 16, dtype, R, T);
    if (k < K) zmm_float_step(acc, rows, xs, k, K - k, dtype, R, T);
    /* reduced with constant indices first: indexing acc by the run-time nr, nt would make GCC
     * keep acc in memory too, storing sixteen registers per step (prefill 2.4x slower) */
    float sums[BLOB_TILE_MAX_ROWS][BLOB_TILE_MAX_TOKENS];
    BLOB_UNROLL
    for (int r = 0; r < R; r++)
        BLOB_UNROLL
        for (int t = 0; t < T; t++) sums[r][t] = _mm512_reduce_add_ps(acc[r][t]);
    for (size_t r = 0; r < nr; r++)
        for (size_t t = 0; t < nt; t++) y[(t0 + t) * ys + r0 + r] = sums[r][t];
}

#define X86_TARGET "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni"
#define X86_VNNI 1
#define X86_FLOAT_TILE zmm_float_tile
#define X86_OPS blob_ops_avx512
#include "kernels_x86.inc"
#endif

/* The x86-64 path for CPUs with AVX-512 F/BW/VL/DQ and VNNI ("avx512"): kernels_x86.inc compiled
 * with EVEX encodings and 32 vector registers (its int8 / int16 dot products by VPDPBUSD /
 * VPDPWSSD on 256-bit registers), with 512-bit tiles for bf16 weights in place of its float tiles.
 *
 * Measured on Zen 4, whose 512-bit operations are split in two 256-bit halves, one thread, CPU
 * time against the avx2 path's VNNI variant: bf16 decode rows 1.13-1.2x as fast (Gemma 3 270M's
 * shapes from the cache, its 262144 x 640 head streamed from memory), bf16 prefill 1.15x, the
 * widening costing half the instructions. f16 and f32 stay on the 256-bit tiles: with 512-bit
 * rows f16 decode was 1.15x as fast from the cache but 0.80x streamed (the head; VCVTPH2PS on
 * 512 bits) and f32 decode 3-8 % slower, their prefill equal. The quantized types stay on the
 * 256-bit tiles too: a 512-bit VPDPWSSD or VPDPBUSD does the work of two 256-bit ones there, and
 * the 256-bit tiles already sum a block's products to eight lanes in two of them before the one
 * conversion and FMA per block; a 512-bit q8_0 decode row took 1.2-2.5x the time with a block
 * per step (sixteen lanes to convert and scale) and 1.07-1.2x with two (halved by VPERMT2D).
 *
 * bf16 weights are widened to f32 and multiplied by the f32 activations with FMA, as on every
 * other path: the kernels' contract for float weights is exact products and f32 sums
 * (tests/test_kernels.py: within 1e-5 of the sum of |w x|). AVX512-BF16's VDPBF16PS takes both
 * operands as bf16, so it would round each activation to 8 significant bits (a relative error up
 * to 2^-9, two hundred times that bound); splitting each activation into three bf16 parts keeps
 * it exact but would cost three VDPBF16PS per 32 weights and token against two FMAs.
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

/* The mask of the first len (<= 16) of sixteen lanes. */
ZFN __mmask16 zmm_mask16(size_t len) { return len >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << len) - 1); }

/* bf16 weights k .. k+len-1 (len <= 16) of a row as f32, zero past len: a masked load, which never
 * touches the masked-off bytes. */
ZFN __m512 zmm_load_bf16(const uint8_t *row, size_t k, size_t len) {
    const __m256i bits = _mm256_maskz_loadu_epi16(zmm_mask16(len), row + 2 * k);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

/* One row against one token, in four accumulators (one FMA chain would wait out its latency). */
ZFN float zmm_bf16_row(const uint8_t *row, const float *x, size_t K) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    size_t k = 0;
    for (; k + 64 <= K; k += 64)
        BLOB_UNROLL
        for (int u = 0; u < 4; u++)
            acc[u] = _mm512_fmadd_ps(zmm_load_bf16(row, k + 16 * u, 16), _mm512_loadu_ps(x + k + 16 * u), acc[u]);
    for (; k < K; k += 16) {
        const size_t len = blob_min(16, K - k);
        acc[0] = _mm512_fmadd_ps(zmm_load_bf16(row, k, len), _mm512_maskz_loadu_ps(zmm_mask16(len), x + k), acc[0]);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

/* acc[r][t] += W[row r][k .. k+len) . X[token t][k .. k+len), len <= 16 */
ZFN void zmm_bf16_step(__m512 acc[][BLOB_TILE_MAX_TOKENS], const uint8_t *const *rows, const float *const *xs,
                       size_t k, size_t len, int R, int T) {
    __m512 xv[BLOB_TILE_MAX_TOKENS];
    BLOB_UNROLL
    for (int t = 0; t < T; t++) xv[t] = _mm512_maskz_loadu_ps(zmm_mask16(len), xs[t] + k);
    BLOB_UNROLL
    for (int r = 0; r < R; r++) {
        const __m512 wv = zmm_load_bf16(rows[r], k, len);
        BLOB_UNROLL
        for (int t = 0; t < T; t++) acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
    }
}

/* kernels_x86.inc's 256-bit float tile, defined by the include at the end of this file. */
static inline void float_tile(const blob_matrix *w, size_t r0, size_t nr, const blob_acts *a, size_t t0, size_t nt,
                              float *y, size_t ys, int dtype, int R, int T);

/* The float tile of this path: bf16 sixteen lanes at a time, f32 and f16 by float_tile. */
ZFN void zmm_float_tile(const blob_matrix *w, size_t r0, size_t nr, const blob_acts *a, size_t t0, size_t nt,
                        float *y, size_t ys, int dtype, int R, int T) {
    if (dtype != BLOB_BF16) {
        float_tile(w, r0, nr, a, t0, nt, y, ys, dtype, R, T);
        return;
    }
    if (R == 1 && T == 1) {
        y[t0 * ys + r0] = zmm_bf16_row((const uint8_t *)w->plane[0] + r0 * w->row_stride_bytes,
                                       a->x + t0 * a->x_stride, w->cols);
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
    for (; k + 16 <= K; k += 16) zmm_bf16_step(acc, rows, xs, k, 16, R, T);
    if (k < K) zmm_bf16_step(acc, rows, xs, k, K - k, R, T);
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
#define X86_AVX512 1
#define X86_FLOAT_TILE zmm_float_tile
#define X86_OPS blob_ops_avx512
#include "kernels_x86.inc"
#endif

/* The x86-64 path for CPUs with AVX-512 F/BW/VL/DQ and VNNI ("avx512"): kernels_x86.inc compiled
 * with EVEX encodings and 32 vector registers (its int8 / int16 dot products by VPDPBUSD /
 * VPDPWSSD on 256-bit registers), with 512-bit tiles for bf16 weights and f16 prefill in place of
 * its float tiles, and for attention over f32 and f16 caches (its key scores and weighted value
 * rows; the f32 weight tiles stay 256-bit, see below).
 *
 * Measured on Zen 4, whose 512-bit operations are split in two 256-bit halves, one thread, CPU
 * time against the avx2 path's VNNI variant: bf16 decode rows 1.13-1.2x as fast (Gemma 3 270M's
 * shapes from the cache, its 262144 x 640 head streamed from memory), bf16 prefill 1.15x, the
 * widening costing half the instructions. f16 decode and f32 stay on the 256-bit tiles: with
 * 512-bit rows f16 decode was 1.15x as fast from the cache but 0.80x streamed (the head; VCVTPH2PS
 * on 512 bits) and f32 decode 3-8 % slower, their prefill equal. On Sapphire Rapids the 512-bit f16
 * prefill tile is 1.3-1.5x the 256-bit one (the 1.1B llama's 2048-column shapes, one thread):
 * Intel's VCVTPH2PS on 512 bits is one instruction where the 256-bit tile needs two, and both
 * of Zen 4's halves are the 256-bit tile's work, so there it costs nothing. f16 and bf16 decode
 * rows ask for their bytes PREFETCH_AHEAD on: Sapphire Rapids' prefetchers, which stop at each
 * 4 KiB page, left them at 14 GB/s on 2 threads against 20-23 with it (q8_0's interleaved rows,
 * which prefetch, 21-23); on Zen 4 the float rows measured slower with it (kernels_x86.inc), a
 * cost not measured on this path. The quantized decode tiles stay on
 * the 256-bit ones too: a 512-bit VPDPWSSD or VPDPBUSD does the work of two 256-bit ones there,
 * and the 256-bit tiles already sum a block's products to eight lanes in two of them before the
 * one conversion and FMA per block; a 512-bit q8_0 decode row took 1.2-2.5x the time with a
 * block per step (sixteen lanes to convert and scale) and 1.07-1.2x with two (halved by
 * VPERMT2D). The prefill of interleaved q8_0, q4_0 and q5_0 rows and of planar q4_k, q5_k and q6_k
 * rows has 512-bit tiles (below; q4_k, q5_k and q6_k in kernels_avx512_kquant.inc).
 *
 * bf16 weights are widened to f32 and multiplied by the f32 activations with FMA, as on every
 * other path (at prefill 32 at a time, against activations arranged for it: below): the
 * kernels' contract for float weights is exact products and f32 sums (tests/test_kernels.py:
 * within 1e-5 of the sum of |w x|). AVX512-BF16's VDPBF16PS takes both operands as bf16, so it
 * would round each activation to 8 significant bits (a relative error up to 2^-9, two hundred
 * times that bound). Split in two bf16 parts, its rounding and the rounded rest, an activation
 * is within 2^-17 of itself, but on Sapphire Rapids a VDPBF16PS issues a quarter as often as an
 * FMA (512- or 256-bit alike): a 4 x 4 register tile with two of them per 32 columns ran at
 * 0.43-0.45x the FMA tile's GFLOP/s, and with one (activations rounded) at 0.84-0.91x.
 */
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "kernels_impl.h"

#if defined(_MSC_VER) && !defined(__clang__)
#define ZMM_TARGET
#define ZMM_NOINLINE __declspec(noinline)
#else
#define ZMM_TARGET __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#define ZMM_NOINLINE __attribute__((noinline))
#endif
#define ZFN BLOB_INLINE ZMM_TARGET

/* The mask of the first len (<= 16) of sixteen lanes. */
ZFN __mmask16 zmm_mask16(size_t len) { return len >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << len) - 1); }

/* ---- q8_0 and q4_0 in BLOB_LAYOUT_INTERLEAVE8 at prefill: sixteen rows a register ----
 * kernels_x86.inc's interleaved tiles hold a group's eight rows in the eight int32 lanes of a
 * 256-bit register. Here a call's two groups share one 512-bit register, group g0's rows in
 * lanes 0-7 and g0 + 1's in lanes 8-15 (two 16- or 32-byte runs, one inserted over the other),
 * so that one VPDPWSSD or VPDPBUSD against a token's broadcast levels (a load folded into the
 * instruction) adds the products of all sixteen rows, and the block's epilogue converts and
 * scales sixteen lanes at once. Per token and block the integer sums are the 256-bit tile's,
 * exact; the float operations are the scalar reference's, lane by lane, so every output is
 * bit-identical to it. Decode keeps the 256-bit tiles, one group a stream. */
#define ZI8_TOKENS 12   /* tokens per register tile: 12 integer and 12 float accumulators of 32 */

/* 16 f16 scales of block b, lanes 0-7 group g0's (at s0), 8-15 group g0 + 1's (at s1), as f32. */
ZFN __m512 zmm_group_scales(const uint16_t *s0, const uint16_t *s1) {
    const __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)s0)),
                                                 _mm_loadu_si128((const __m128i *)s1), 1);
    return _mm512_cvtph_ps(both);
}

/* out[t] += (float)dots[t] * (dw * dx of token t0 + t at block b): the scalar reference's
 * operations, never fused. */
ZFN void zmm_block_epilogue(__m512 out[], const __m512i dots[], __m512 dw, const blob_acts *a, size_t t0, size_t b,
                            int T) {
    const size_t nb = a->nblocks;
    BLOB_UNROLL
    for (int t = 0; t < T; t++) {
        const __m512 scale = _mm512_mul_ps(dw, _mm512_set1_ps(a->d[(t0 + t) * nb + b]));
        out[t] = _mm512_add_ps(out[t], _mm512_mul_ps(_mm512_cvtepi32_ps(dots[t]), scale));
    }
}

/* dots[t] += the sixteen rows' level pair i of block b (int16 pairs) . token t0 + t's pair i,
 * broadcast: one VPDPWSSD a token. */
ZFN void zmm_pair_dots(__m512i dots[], __m512i pairs, const blob_acts *a, size_t t0, size_t b, int i, int T) {
    BLOB_UNROLL
    for (int t = 0; t < T; t++) {
        int32_t x_pair;
        memcpy(&x_pair, a->q16 + (t0 + t) * a->q_stride + BLOB_QBLOCK * b + 2 * i, 4);
        dots[t] = _mm512_dpwssd_epi32(dots[t], pairs, _mm512_set1_epi32(x_pair));
    }
}

/* Rows 8 g0 .. 8 g0 + 15 of interleaved q8_0 against tokens t0 .. t0 + T - 1. */
ZFN void zmm_i8_q8_0(const blob_matrix *w, size_t g0, const blob_acts *a, size_t t0, __m512 out[], int T) {
    const size_t nb = a->nblocks, block_bytes = blob_interleave8_block_bytes(BLOB_Q8_0);
    const int8_t *group0 = (const int8_t *)w->plane[0] + g0 * nb * block_bytes, *group1 = group0 + nb * block_bytes;
    const uint16_t *scales0 = (const uint16_t *)w->plane[1] + g0 * nb * BLOB_INTERLEAVE, *scales1 = scales0 + nb * BLOB_INTERLEAVE;
    BLOB_UNROLL
    for (int t = 0; t < T; t++) out[t] = _mm512_setzero_ps();
    for (size_t b = 0; b < nb; b++) {
        __m512i dots[ZI8_TOKENS];
        BLOB_UNROLL
        for (int t = 0; t < T; t++) dots[t] = _mm512_setzero_si512();
        BLOB_UNROLL
        for (int i = 0; i < BLOB_QBLOCK / 2; i++) {   /* level pair i of the sixteen rows, int16 */
            const size_t at = b * block_bytes + 16 * i;
            const __m512i pairs = _mm512_cvtepi8_epi16(_mm256_inserti128_si256(
                _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(group0 + at))),
                _mm_loadu_si128((const __m128i *)(group1 + at)), 1));
            zmm_pair_dots(dots, pairs, a, t0, b, i, T);
        }
        zmm_block_epilogue(out, dots, zmm_group_scales(scales0 + b * BLOB_INTERLEAVE, scales1 + b * BLOB_INTERLEAVE),
                           a, t0, b, T);
    }
}

/* Rows 8 g0 .. 8 g0 + 15 of interleaved q4_0 against tokens t0 .. t0 + T - 1: each block's nibble
 * dots start from -8 x the token's level sum, which makes them the exact level dots. */
ZFN void zmm_i8_q4_0(const blob_matrix *w, size_t g0, const blob_acts *a, size_t t0, __m512 out[], int T) {
    const size_t nb = a->nblocks, block_bytes = blob_interleave8_block_bytes(BLOB_Q4_0);
    const uint8_t *group0 = (const uint8_t *)w->plane[0] + g0 * nb * block_bytes, *group1 = group0 + nb * block_bytes;
    const uint16_t *scales0 = (const uint16_t *)w->plane[1] + g0 * nb * BLOB_INTERLEAVE, *scales1 = scales0 + nb * BLOB_INTERLEAVE;
    const __m512i nibble = _mm512_set1_epi8(15);
    BLOB_UNROLL
    for (int t = 0; t < T; t++) out[t] = _mm512_setzero_ps();
    for (size_t b = 0; b < nb; b++) {
        __m512i dots[ZI8_TOKENS];
        BLOB_UNROLL
        for (int t = 0; t < T; t++) dots[t] = _mm512_set1_epi32(-8 * (int32_t)a->sums[(t0 + t) * nb + b]);
        BLOB_UNROLL
        for (int c = 0; c < BLOB_QBLOCK / 8; c++) {   /* levels 8c .. 8c + 3 (lo) and 8c + 4 .. 8c + 7 (hi), + 8 */
            const size_t at = b * block_bytes + 32 * c;
            const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(group0 + at))),
                                                 _mm256_loadu_si256((const __m256i *)(group1 + at)), 1);
            const __m512i lo = _mm512_and_si512(v, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
            BLOB_UNROLL
            for (int t = 0; t < T; t++) {
                int32_t x_lo, x_hi;
                const int8_t *x = a->q8 + (t0 + t) * a->q_stride + BLOB_QBLOCK * b + 8 * c;
                memcpy(&x_lo, x, 4);
                memcpy(&x_hi, x + 4, 4);
                dots[t] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(dots[t], lo, _mm512_set1_epi32(x_lo)), hi,
                                              _mm512_set1_epi32(x_hi));
            }
        }
        zmm_block_epilogue(out, dots, zmm_group_scales(scales0 + b * BLOB_INTERLEAVE, scales1 + b * BLOB_INTERLEAVE),
                           a, t0, b, T);
    }
}

/* out[t] of rows r0 .. r0 + nr - 1 (nr <= 16) into y for tokens t0 + t. */
ZFN void zmm_i8_store(const __m512 out[], int T, size_t r0, size_t nr, size_t t0, float *y, size_t ys) {
    for (int t = 0; t < T; t++) _mm512_mask_storeu_ps(y + (t0 + (size_t)t) * ys + r0, zmm_mask16(nr), out[t]);
}

/* The tokens of the next register tile when `left` remain: ZI8_TOKENS, then tiles of 8, 4, 2 and 1. */
ZFN int zmm_tile_tokens(size_t left) {
    return left >= ZI8_TOKENS ? ZI8_TOKENS : left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
}

/* The prefill of interleaved rows, defined after kernels_x86.inc (q5_0 unpacks with its functions). */
static ZMM_TARGET int zmm_i8_prefill(const blob_matrix *w, size_t r0, size_t nr, const blob_acts *a, size_t t0,
                                     size_t nt, float *y, size_t ys, int dtype);

/* The float tile of this path, defined after kernels_x86.inc (it falls back on its float_tile);
 * inline, so that each tile function specializes it on its constant R and T. */
static inline ZMM_TARGET void zmm_float_tile(const blob_matrix *w, size_t r0, size_t nr, const blob_acts *a,
                                             size_t t0, size_t nt, float *y, size_t ys, int dtype, int R, int T);

/* The prefill of planar q4_k, q5_k and q6_k rows, in kernels_avx512_kquant.inc after kernels_x86.inc (it
 * unpacks with its functions), ZK_ROWS rows a call (blob_isa_ops.mm_tile_rows): matmul.c's MATMUL_CHUNK_ROWS, a work item's. */
#define ZK_ROWS 16
/* The rows a call of the f16 and bf16 prefill tile takes (zmm_float_tile), blob_isa_ops.mm_tile_rows. */
#define ZF_ROWS 16
static ZMM_TARGET int zmm_k_prefill(const blob_matrix *w, size_t r0, size_t nr, const blob_acts *a, size_t t0,
                                    size_t nt, float *y, size_t ys, int dtype);

/* Attention's weighted value rows and key scores, sixteen columns a register, defined after
 * kernels_x86.inc (the weighted rows finish on its 8-column weighted_tile). */
static ZMM_TARGET void zmm_weighted_rows(float *y, size_t ys, const float *alpha, size_t as, size_t heads,
                                         const void *rows, size_t stride, size_t count, size_t n, int dtype);
static ZMM_TARGET void zmm_key_scores(const float *q, size_t heads, size_t head_dim, const void *keys, size_t stride,
                                      size_t count, int dtype, float *scores, size_t ss);

#define X86_TARGET "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni"
#define X86_VNNI 1
#define X86_AVX512 1
#define X86_FLOAT_TILE zmm_float_tile
#define X86_I8_PREFILL zmm_i8_prefill
#define X86_GROUP_PREFILL zmm_k_prefill
#define X86_TILE_ROWS {[BLOB_Q4_K] = ZK_ROWS, [BLOB_Q5_K] = ZK_ROWS, [BLOB_Q6_K] = ZK_ROWS, [BLOB_F16] = ZF_ROWS, [BLOB_BF16] = ZF_ROWS}
#define X86_WEIGHTED_ROWS zmm_weighted_rows
#define X86_KEY_SCORES zmm_key_scores
#define X86_BF16_EVEN_ODD 1
#define X86_OPS blob_ops_avx512
#include "kernels_x86.inc"

/* ---- f16 and bf16 weights: sixteen lanes a register ---- */

/* bf16 or f16 weights k .. k+len-1 (len <= 16) of a row as f32, zero past len: a masked load,
 * which never touches the masked-off bytes. Both widenings are exact. */
ZFN __m512 zmm_load_half(const uint8_t *row, size_t k, size_t len, int dtype) {
    const __m256i bits = _mm256_maskz_loadu_epi16(zmm_mask16(len), row + 2 * k);
    if (dtype == BLOB_F16) return _mm512_cvtph_ps(bits);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

/* One row against one token, in four accumulators (one FMA chain would wait out its latency). */
ZFN float zmm_half_row(const uint8_t *row, const float *x, size_t K, int dtype) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    size_t k = 0;
    for (; k + 64 <= K; k += 64) {
        _mm_prefetch((const char *)row + 2 * k + PREFETCH_AHEAD, _MM_HINT_T0);
        _mm_prefetch((const char *)row + 2 * k + 64 + PREFETCH_AHEAD, _MM_HINT_T0);
        BLOB_UNROLL
        for (int u = 0; u < 4; u++)
            acc[u] = _mm512_fmadd_ps(zmm_load_half(row, k + 16 * u, 16, dtype), _mm512_loadu_ps(x + k + 16 * u), acc[u]);
    }
    for (; k < K; k += 16) {
        const size_t len = blob_min(16, K - k);
        acc[0] = _mm512_fmadd_ps(zmm_load_half(row, k, len, dtype), _mm512_maskz_loadu_ps(zmm_mask16(len), x + k), acc[0]);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

/* acc[r][t] += W[row r][k .. k+len) . X[token t][k .. k+len), len <= 16, W bf16 or f16 */
ZFN void zmm_half_step(__m512 acc[][BLOB_TILE_MAX_TOKENS], const uint8_t *const *rows, const float *const *xs,
                       size_t k, size_t len, int dtype, int R, int T) {
    __m512 xv[BLOB_TILE_MAX_TOKENS];
    BLOB_UNROLL
    for (int t = 0; t < T; t++) xv[t] = _mm512_maskz_loadu_ps(zmm_mask16(len), xs[t] + k);
    BLOB_UNROLL
    for (int r = 0; r < R; r++) {
        const __m512 wv = zmm_load_half(rows[r], k, len, dtype);
        BLOB_UNROLL
        for (int t = 0; t < T; t++) acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
    }
}

/* acc[r][t] += rows r . tokens t over columns k0 .. k1 - 1 (k0 a multiple of 16) */
ZFN void zmm_half_cols(__m512 acc[][BLOB_TILE_MAX_TOKENS], const uint8_t *const *rows, const float *const *xs,
                       size_t k0, size_t k1, int dtype, int R, int T) {
    size_t k = k0;
    for (; k + 16 <= k1; k += 16) zmm_half_step(acc, rows, xs, k, 16, dtype, R, T);
    if (k < k1) zmm_half_step(acc, rows, xs, k, k1 - k, dtype, R, T);
}

/* The row pointers of a call's register tiles: tile i's R rows from r0 + R i (blob_tile_rows). */
ZFN void zmm_tile_rows(const blob_matrix *w, size_t r0, size_t nr, int R, size_t tiles,
                       const uint8_t *rows[][BLOB_TILE_MAX_ROWS]) {
    for (size_t i = 0; i < tiles; i++) blob_tile_rows(w, r0 + (size_t)R * i, nr - (size_t)R * i, R, rows[i]);
}

/* dst = src, a register tile's R x T accumulators. */
ZFN void zmm_copy_tile(__m512 dst[][BLOB_TILE_MAX_TOKENS], __m512 src[][BLOB_TILE_MAX_TOKENS], int R, int T) {
    BLOB_UNROLL
    for (int r = 0; r < R; r++)
        BLOB_UNROLL
        for (int t = 0; t < T; t++) dst[r][t] = src[r][t];
}

/* The register tiles' sums into y, rows r0 .. r0 + nr - 1, tokens t0 .. t0 + nt - 1. */
ZFN void zmm_half_store(__m512 acc[][BLOB_TILE_MAX_ROWS][BLOB_TILE_MAX_TOKENS], size_t tiles, size_t r0, size_t nr,
                        size_t t0, size_t nt, float *y, size_t ys, int R, int T) {
    for (size_t i = 0; i < tiles; i++) {
        /* reduced with constant indices first: indexing acc by the run-time nr, nt would make GCC
         * keep acc in memory too, storing sixteen registers per step (prefill 2.4x slower) */
        float sums[BLOB_TILE_MAX_ROWS][BLOB_TILE_MAX_TOKENS];
        BLOB_UNROLL
        for (int r = 0; r < R; r++)
            BLOB_UNROLL
            for (int t = 0; t < T; t++) sums[r][t] = _mm512_reduce_add_ps(acc[i][r][t]);
        blob_store_tile(sums, r0 + (size_t)R * i, blob_min((size_t)R, nr - (size_t)R * i), t0, nt, y, ys);
    }
}

/* ---- bf16 at prefill: 32 columns a step ----
 * A 512-bit load takes 32 bf16 weights of a row, two to each 32-bit lane: shifted left by 16
 * bits the lanes hold the even columns' weights as f32, masked to their upper halves the odd
 * columns', both exact. Against the activations of each 32 columns stored even ones first
 * (blob_even_odd_columns), that widens 32 weights with two instructions where zmm_load_half
 * takes four (a VPMOVZXWD and a shift per 16): a register tile of 4 rows x 4 tokens issues 40
 * vector instructions per 32 columns in place of 48. Products are exact and sums f32 as in the
 * FMA tile, each accumulator lane adding its even and odd column in turn, 32 columns a step:
 * one order per output whatever the tile, the call or the thread count. */

/* A mask of the first len (<= 32) of 32 sixteen-bit lanes. */
ZFN __mmask32 zmm_mask32(size_t len) { return len >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << len) - 1); }

/* acc[r][t] += W[row r][k .. k+len) . X[token t][k .. k+len), len <= 32, k a multiple of 32;
 * xs[t]: token t's even / odd arrangement, zero past the row's columns. */
ZFN void zmm_bf16_even_odd_step(__m512 acc[][BLOB_TILE_MAX_TOKENS], const uint8_t *const *rows,
                                const float *const *xs, size_t k, size_t len, int R, int T) {
    const __m512i upper = _mm512_set1_epi32((int)0xffff0000u);
    __m512 even[BLOB_TILE_MAX_TOKENS], odd[BLOB_TILE_MAX_TOKENS];
    BLOB_UNROLL
    for (int t = 0; t < T; t++) {
        even[t] = _mm512_loadu_ps(xs[t] + k);
        odd[t] = _mm512_loadu_ps(xs[t] + k + BLOB_EVEN_ODD_COLS / 2);
    }
    BLOB_UNROLL
    for (int r = 0; r < R; r++) {
        const __m512i pairs = _mm512_maskz_loadu_epi16(zmm_mask32(len), rows[r] + 2 * k);
        const __m512 w_even = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
        const __m512 w_odd = _mm512_castsi512_ps(_mm512_and_si512(pairs, upper));
        BLOB_UNROLL
        for (int t = 0; t < T; t++) acc[r][t] = _mm512_fmadd_ps(w_odd, odd[t], _mm512_fmadd_ps(w_even, even[t], acc[r][t]));
    }
}

/* acc[r][t] += rows r . tokens t over columns k0 .. k1 - 1 (k0 a multiple of 32) */
ZFN void zmm_bf16_even_odd_cols(__m512 acc[][BLOB_TILE_MAX_TOKENS], const uint8_t *const *rows,
                                const float *const *xs, size_t k0, size_t k1, int R, int T) {
    size_t k = k0;
    for (; k + BLOB_EVEN_ODD_COLS <= k1; k += BLOB_EVEN_ODD_COLS)
        zmm_bf16_even_odd_step(acc, rows, xs, k, BLOB_EVEN_ODD_COLS, R, T);
    if (k < k1) zmm_bf16_even_odd_step(acc, rows, xs, k, k1 - k, R, T);
}

/* The f16 / bf16 prefill takes ZF_ROWS rows a call (defined above the ops table), a work item's,
 * in register tiles of R rows x T tokens, and blocks the columns: each tile runs over a block
 * of ZF_BLOCK_COLS columns in turn, its accumulators kept in memory between blocks, so the
 * tokens' activations over a block (16 KiB for four) stay in L1 for all the call's rows and its
 * weights come once from L2. Every accumulator lane still adds its columns in column order, so
 * each output is the unblocked tile's sum, bit for bit. */
#define ZF_BLOCK_COLS 1024
_Static_assert(ZF_ROWS % MM_ROWS == 0 && ZF_BLOCK_COLS % BLOB_EVEN_ODD_COLS == 0 && BLOB_EVEN_ODD_COLS % 16 == 0,
               "whole register tiles, whole steps");

/* The float tile of this path: bf16 sixteen lanes at a time (prefill: zmm_bf16_even_odd_step's
 * 32); f16 too at prefill (T > 1: 1.4x the 256-bit tile's GFLOP/s on Sapphire Rapids), its
 * decode rows by float_tile's 256-bit conversions (see the header); f32 by float_tile. Any
 * nr <= ZF_ROWS rows when R is MM_ROWS. */
ZFN void zmm_float_tile(const blob_matrix *w, size_t r0, size_t nr, const blob_acts *a, size_t t0, size_t nt,
                        float *y, size_t ys, int dtype, int R, int T) {
    if (dtype == BLOB_F32 || (dtype == BLOB_F16 && T == 1)) {
        float_tile(w, r0, nr, a, t0, nt, y, ys, dtype, R, T);
        return;
    }
    if (R == 1 && T == 1) {
        y[t0 * ys + r0] = zmm_half_row((const uint8_t *)w->plane[0] + r0 * w->row_stride_bytes,
                                       a->x + t0 * a->x_stride, w->cols, dtype);
        return;
    }
    const size_t tiles = blob_div_up(nr, (size_t)R), K = w->cols;
    const uint8_t *rows[ZF_ROWS / MM_ROWS][BLOB_TILE_MAX_ROWS];
    const float *xs[BLOB_TILE_MAX_TOKENS];
    __m512 acc[ZF_ROWS / MM_ROWS][BLOB_TILE_MAX_ROWS][BLOB_TILE_MAX_TOKENS];
    const int even_odd = dtype == BLOB_BF16 && T > 1;   /* bf16 at prefill: blob_acts.even_odd */
    zmm_tile_rows(w, r0, nr, R, tiles, rows);
    if (even_odd) blob_tile_xs(a->even_odd, blob_even_odd_stride(K), t0, nt, T, xs);
    else blob_tile_xs(a->x, a->x_stride, t0, nt, T, xs);
    for (size_t i = 0; i < tiles; i++)
        BLOB_UNROLL
        for (int r = 0; r < R; r++)
            BLOB_UNROLL
            for (int t = 0; t < T; t++) acc[i][r][t] = _mm512_setzero_ps();
    for (size_t k0 = 0; k0 < K; k0 += ZF_BLOCK_COLS)
        for (size_t i = 0; i < tiles; i++) {
            __m512 regs[BLOB_TILE_MAX_ROWS][BLOB_TILE_MAX_TOKENS];
            zmm_copy_tile(regs, acc[i], R, T);
            const size_t k1 = blob_min(k0 + ZF_BLOCK_COLS, K);
            if (even_odd) zmm_bf16_even_odd_cols(regs, rows[i], xs, k0, k1, R, T);
            else zmm_half_cols(regs, rows[i], xs, k0, k1, dtype, R, T);
            zmm_copy_tile(acc[i], regs, R, T);
        }
    zmm_half_store(acc, tiles, r0, nr, t0, nt, y, ys, R, T);
}

/* ---- q5_0 in BLOB_LAYOUT_INTERLEAVE8 at prefill: sixteen rows a register ----
 * kernels_x86.inc's unpacked groups (q5_unpacked_groups) with the call's two groups side by side:
 * level pair i of block b of both, exact int16, in one 512-bit register (group g0's rows in lanes
 * 0-7), read as zmm_i8_q8_0 reads its widened quants. The float operations are
 * q5_unpacked_tile's: block b into partial sum b % 8, one partial sum at a time, then
 * blob_fold_lanes' order; bit-identical to the scalar reference. */

/* Groups g0 and g0 + 1 of interleaved q5_0 as dst[b][i]: level pair i of block b of the sixteen
 * rows, kernels_x86.inc's q5_unpack_block of each group side by side. */
ZFN void zmm_q5_unpack(const blob_matrix *w, size_t g0, __m512i (*dst)[BLOB_QBLOCK / 2]) {
    const size_t nb = w->cols / BLOB_QBLOCK;
    const uint8_t *nibbles = (const uint8_t *)w->plane[0], *fifth = (const uint8_t *)w->plane[1];
    for (size_t b = 0; b < nb; b++) {
        __m256i pairs[2][BLOB_QBLOCK / 2];   /* [group][pair] */
        for (size_t g = 0; g < 2; g++) q5_unpack_block(nibbles, fifth, (g0 + g) * nb + b, pairs[g]);
        for (int i = 0; i < BLOB_QBLOCK / 2; i++)
            dst[b][i] = _mm512_inserti64x4(_mm512_castsi256_si512(pairs[0][i]), pairs[1][i], 1);
    }
}

/* Rows 8 g0 .. 8 g0 + 15 against tokens t0 .. t0 + T - 1, from zmm_q5_unpack's pairs. */
ZFN void zmm_q5_tile(const __m512i (*unpacked)[BLOB_QBLOCK / 2], const blob_matrix *w, size_t g0, const blob_acts *a,
                     size_t t0, __m512 out[], int T) {
    const size_t nb = a->nblocks;
    const uint16_t *scales0 = (const uint16_t *)w->plane[2] + g0 * nb * BLOB_INTERLEAVE, *scales1 = scales0 + nb * BLOB_INTERLEAVE;
    __m512 lanes[ZI8_TOKENS][BLOB_SUM_LANES];   /* [token][b % 8]: block32_tile's partial sums */
    for (int l = 0; l < BLOB_SUM_LANES; l++) {
        __m512 acc[ZI8_TOKENS];
        BLOB_UNROLL
        for (int t = 0; t < T; t++) acc[t] = _mm512_setzero_ps();
        for (size_t b = (size_t)l; b < nb; b += BLOB_SUM_LANES) {
            __m512i dots[ZI8_TOKENS];
            BLOB_UNROLL
            for (int t = 0; t < T; t++) dots[t] = _mm512_setzero_si512();
            BLOB_UNROLL
            for (int i = 0; i < BLOB_QBLOCK / 2; i++) {
                zmm_pair_dots(dots, _mm512_load_si512(&unpacked[b][i]), a, t0, b, i, T);
            }
            zmm_block_epilogue(acc, dots, zmm_group_scales(scales0 + b * BLOB_INTERLEAVE, scales1 + b * BLOB_INTERLEAVE),
                               a, t0, b, T);
        }
        BLOB_UNROLL
        for (int t = 0; t < T; t++) lanes[t][l] = acc[t];
    }
    BLOB_UNROLL
    for (int t = 0; t < T; t++)
        out[t] = BLOB_FOLD_LANES(_mm512_add_ps, lanes[t]);
}

/* T constant in each call, so that the tile's loops unroll and its accumulators stay in registers */
ZFN void zmm_tile(const __m512i (*unpacked)[BLOB_QBLOCK / 2], const blob_matrix *w, size_t g0, const blob_acts *a,
                  size_t t0, __m512 out[], int T, int dtype) {
#define ZI8_CASE(k)                                                              \
    case k:                                                                      \
        if (dtype == BLOB_Q5_0) zmm_q5_tile(unpacked, w, g0, a, t0, out, k);       \
        else if (dtype == BLOB_Q4_0) zmm_i8_q4_0(w, g0, a, t0, out, k);            \
        else zmm_i8_q8_0(w, g0, a, t0, out, k);                                  \
        break;
    switch (T) {
        ZI8_CASE(1) ZI8_CASE(2) ZI8_CASE(4) ZI8_CASE(8)
        default: ZI8_CASE(ZI8_TOKENS)
    }
#undef ZI8_CASE
}

/* The prefill (more tokens than a decode step) of interleaved rows r0 .. r0 + nr - 1 (r0 a
 * multiple of 8, 8 < nr <= 16; the rows a partial second group completes are computed, not
 * stored); q5_0 with rows short enough to unpack (Q5_UNPACKED_MAX_BLOCKS). Returns 0, having
 * done nothing, for the calls it leaves to kernels_x86.inc's tiles. */
static ZMM_TARGET int zmm_i8_prefill(const blob_matrix *w, size_t r0, size_t nr, const blob_acts *a, size_t t0,
                                     size_t nt, float *y, size_t ys, int dtype) {
    if (nt <= BLOB_DECODE_TILES_MAX_TOKENS || nr <= BLOB_INTERLEAVE ||
        (dtype == BLOB_Q5_0 && a->nblocks > Q5_UNPACKED_MAX_BLOCKS))
        return 0;
    const size_t g0 = r0 / BLOB_INTERLEAVE;
    __m512i unpacked[dtype == BLOB_Q5_0 ? Q5_UNPACKED_MAX_BLOCKS : 1][BLOB_QBLOCK / 2];
    if (dtype == BLOB_Q5_0) zmm_q5_unpack(w, g0, unpacked);
    for (size_t t = t0; t < t0 + nt;) {
        const int T = zmm_tile_tokens(t0 + nt - t);
        __m512 out[ZI8_TOKENS];
        zmm_tile((const __m512i (*)[BLOB_QBLOCK / 2])unpacked, w, g0, a, t, out, T, dtype);
        zmm_i8_store(out, T, r0, nr, t, y, ys);
        t += (size_t)T;
    }
    return 1;
}

/* ---- attention over f32 and f16 caches: sixteen columns a register ----
 * Attention's two products, the scores Q K^T and the probabilities times the value rows, on
 * 512-bit registers: on Sapphire Rapids a vector operation issues about once a cycle whatever
 * its width, so each does twice the 256-bit tiles' multiply-adds per instruction. */

/* Elements k .. k+len-1 (len <= 16) of an f32 or f16 cache row as f32, zero past len. */
ZFN __m512 zmm_cache_row(const uint8_t *row, size_t k, size_t len, int dtype) {
    if (dtype == BLOB_F16) return zmm_load_half(row, k, len, BLOB_F16);
    return _mm512_maskz_loadu_ps(zmm_mask16(len), (const float *)row + k);
}

/* zmm_weighted_rows' register tile: columns k .. k+16C-1 of H <= WR_HEADS heads' sums, lane for
 * lane the 256-bit weighted_tile's FMAs in row order (so the same sums, bit for bit), on twice
 * its columns per instruction. Four heads by four vectors of columns fill 16 of the 32 registers
 * with sums. */
#define ZWR_COLUMNS 4
ZFN void zmm_weighted_tile(float *y, size_t ys, const float *alpha, size_t as, const uint8_t *rows, size_t step,
                           size_t count, size_t k, int dtype, int H, int C) {
    __m512 acc[WR_HEADS][ZWR_COLUMNS];
    BLOB_UNROLL
    for (int h = 0; h < H; h++)
        BLOB_UNROLL
        for (int c = 0; c < C; c++) acc[h][c] = _mm512_setzero_ps();
    for (size_t i = 0; i < count; i++, rows += step) {
        __m512 v[ZWR_COLUMNS];
        BLOB_UNROLL
        for (int c = 0; c < C; c++) v[c] = zmm_cache_row(rows, k + 16 * (size_t)c, 16, dtype);
        BLOB_UNROLL
        for (int h = 0; h < H; h++) {
            const __m512 a = _mm512_set1_ps(alpha[(size_t)h * as + i]);
            BLOB_UNROLL
            for (int c = 0; c < C; c++) acc[h][c] = _mm512_fmadd_ps(a, v[c], acc[h][c]);
        }
    }
    BLOB_UNROLL
    for (int h = 0; h < H; h++)
        BLOB_UNROLL
        for (int c = 0; c < C; c++) _mm512_storeu_ps(y + (size_t)h * ys + k + 16 * (size_t)c, acc[h][c]);
}

BLOB_DEFINE_WEIGHTED_ROWS(ZMM_TARGET, zmm_weighted_rows, zmm_weighted_tile, 16, ZWR_COLUMNS)

/* Key scores in register tiles of ZS_KEYS keys by ZS_HEADS heads, sixteen columns of the head
 * dimension a register (lane l sums columns l, l + 16, ..); a tile past the last key or head
 * repeats it (computed, not stored). */
#define ZS_KEYS 4
#define ZS_HEADS 4

/* acc[t][r] += key r . head t over columns k .. k+len-1 (len <= 16) */
ZFN void zmm_score_step(__m512 acc[ZS_HEADS][ZS_KEYS], const uint8_t *const *keys, const float *const *qs, size_t k,
                        size_t len, int dtype) {
    __m512 kv[ZS_KEYS];
    BLOB_UNROLL
    for (int r = 0; r < ZS_KEYS; r++) kv[r] = zmm_cache_row(keys[r], k, len, dtype);
    BLOB_UNROLL
    for (int t = 0; t < ZS_HEADS; t++) {
        const __m512 qv = _mm512_maskz_loadu_ps(zmm_mask16(len), qs[t] + k);
        BLOB_UNROLL
        for (int r = 0; r < ZS_KEYS; r++) acc[t][r] = _mm512_fmadd_ps(kv[r], qv, acc[t][r]);
    }
}

/* Lane 4t + r = the sum of acc[t][r]'s sixteen lanes: the tile's sums reduced together, 15 adds
 * and 30 shuffles where one at a time would take 4 adds and 4 shuffles each. Every lane's sum
 * is the same tree of adds (lanes l and l + 8, then + 4, + 2, + 1), whichever sum it is. */
ZFN __m512 zmm_tile_sums(__m512 acc[ZS_HEADS][ZS_KEYS]) {
    _Static_assert(ZS_HEADS == 4 && ZS_KEYS == 4, "a 4 x 4 tile: one sum a lane");
    __m512 halves[8], quarters[4], eighths[2];
    BLOB_UNROLL
    for (int i = 0; i < 8; i++) {   /* pair i: keys i / 2, heads 2 (i % 2) and 2 (i % 2) + 1 */
        const __m512 x = acc[2 * i % 4][i / 2], y = acc[(2 * i + 1) % 4][i / 2];
        halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xee));
    }
    BLOB_UNROLL
    for (int i = 0; i < 4; i++)
        quarters[i] = _mm512_add_ps(_mm512_shuffle_f32x4(halves[2 * i], halves[2 * i + 1], 0x88),
                                    _mm512_shuffle_f32x4(halves[2 * i], halves[2 * i + 1], 0xdd));
    BLOB_UNROLL
    for (int i = 0; i < 2; i++)
        eighths[i] = _mm512_add_ps(_mm512_shuffle_ps(quarters[2 * i], quarters[2 * i + 1], 0x44),
                                   _mm512_shuffle_ps(quarters[2 * i], quarters[2 * i + 1], 0xee));
    return _mm512_add_ps(_mm512_shuffle_ps(eighths[0], eighths[1], 0x88), _mm512_shuffle_ps(eighths[0], eighths[1], 0xdd));
}

/* The scores of heads .. (at most ZS_HEADS of them, queries q, q + head_dim ..) against keys ..
 * (at most ZS_KEYS, `step` bytes apart) into scores[t * ss + r]. */
ZFN void zmm_score_tile(const float *q, size_t heads, size_t head_dim, const uint8_t *keys, size_t step, size_t count,
                        int dtype, float *scores, size_t ss) {
    const uint8_t *rows[ZS_KEYS];
    const float *qs[ZS_HEADS];
    __m512 acc[ZS_HEADS][ZS_KEYS];
    BLOB_UNROLL
    for (int r = 0; r < ZS_KEYS; r++) rows[r] = keys + blob_min((size_t)r, count - 1) * step;
    BLOB_UNROLL
    for (int t = 0; t < ZS_HEADS; t++) {
        qs[t] = q + blob_min((size_t)t, heads - 1) * head_dim;
        BLOB_UNROLL
        for (int r = 0; r < ZS_KEYS; r++) acc[t][r] = _mm512_setzero_ps();
    }
    size_t k = 0;
    for (; k + 16 <= head_dim; k += 16) zmm_score_step(acc, rows, qs, k, 16, dtype);
    if (k < head_dim) zmm_score_step(acc, rows, qs, k, head_dim - k, dtype);
    const __m512 sums = zmm_tile_sums(acc);
    const __mmask8 keys_mask = (__mmask8)((1u << blob_min(ZS_KEYS, count)) - 1);
    _mm_mask_storeu_ps(scores, keys_mask, _mm512_castps512_ps128(sums));
    if (heads > 1) _mm_mask_storeu_ps(scores + ss, keys_mask, _mm512_extractf32x4_ps(sums, 1));
    if (heads > 2) _mm_mask_storeu_ps(scores + 2 * ss, keys_mask, _mm512_extractf32x4_ps(sums, 2));
    if (heads > 3) _mm_mask_storeu_ps(scores + 3 * ss, keys_mask, _mm512_extractf32x4_ps(sums, 3));
}

/* blob_isa_ops.key_scores: the key tiles outer, so that a tile's keys stay in L1 for all the
 * heads' tiles. */
static ZMM_TARGET void zmm_key_scores(const float *q, size_t heads, size_t head_dim, const void *keys, size_t stride,
                                      size_t count, int dtype, float *scores, size_t ss) {
    const size_t step = stride * blob_cache_elem_size(dtype);
    for (size_t j = 0; j < count; j += ZS_KEYS)
        for (size_t h = 0; h < heads; h += ZS_HEADS)
            zmm_score_tile(q + h * head_dim, heads - h, head_dim, (const uint8_t *)keys + j * step, step, count - j,
                           dtype, scores + h * ss + j, ss);
}

/* ---- q4_k, q5_k and q6_k, planar, at prefill ---- */
#include "kernels_avx512_kquant.inc"
#endif

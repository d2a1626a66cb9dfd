/* The compute kernels' C API: what runtime/_kernels.pyx and csrc/tests/test_kernels.c call.
 *
 * Shapes are written as in numpy, row-major, outermost first: X (n, cols) means n rows of
 * `cols` floats, row i at x + i*x_stride. Strides are in elements unless named *_bytes.
 * Every kernel is a pure function of its inputs: the result does not depend on the ISA's
 * thread count (work is split over output rows, never inside a reduction).
 */
#ifndef BLOBSTORE_KERNELS_H
#define BLOBSTORE_KERNELS_H

#include <stddef.h>
#include <stdint.h>

/* Weight dtypes the kernels read: the blobstore.DType values whose DTypeSpec says `matmul`
 * (blobstore/format.py holds every dtype fact; tests/test_dtype_table.py checks the enum, the
 * count and the two per-dtype tables below against it), passed from Python as those integers.
 * The values 5..8 (u8, i8, i32, i64) are stored types the kernels do not multiply: per-dtype
 * tables are indexed by the enum value and hold NULL / 0 there. */
enum blob_dtype {
    BLOB_F32 = 0, BLOB_F16 = 1, BLOB_BF16 = 2, BLOB_Q8_0 = 3, BLOB_Q4_0 = 4,
    BLOB_Q4_1 = 9, BLOB_Q5_0 = 10, BLOB_Q5_1 = 11,
    BLOB_Q2_K = 12, BLOB_Q3_K = 13, BLOB_Q4_K = 14, BLOB_Q5_K = 15, BLOB_Q6_K = 16
};
#define BLOB_NUM_DTYPES 17     /* highest matmul dtype + 1 */
#define BLOB_MAX_PLANES 5      /* q5_k: quants, high, sub_scales, scales, mins */
#define BLOB_QBLOCK 32         /* values per activation block, and per block of q8_0 .. q5_1 */
#define BLOB_KBLOCK 256        /* values per k-quant super-block (q2_k .. q6_k) */

/* Per dtype, by enum value (0 where the kernels do not multiply): values per block, and bytes
 * per block of each plane in DTypeSpec.planes order (the first plane's are the bytes a row holds
 * per block before its 64-byte padding). */
#define BLOB_DTYPE_BLOCKS {1, 1, 1, 32, 32, 0, 0, 0, 0, 32, 32, 32, 256, 256, 256, 256, 256}
#define BLOB_DTYPE_PLANE_BYTES                                                                  \
    {{4}, {2}, {2}, {32, 2}, {16, 2}, {0}, {0}, {0}, {0},                                       \
     {16, 2, 2}, {16, 4, 2}, {16, 4, 2, 2},                                                     \
     {64, 16, 2, 2}, {64, 32, 12, 2}, {128, 12, 2, 2}, {128, 32, 12, 2, 2}, {128, 64, 16, 2}}

/* Instruction-set paths; a path is usable when the CPU has every feature it needs. */
enum blob_isa { BLOB_ISA_SCALAR = 0, BLOB_ISA_AVX2 = 1, BLOB_ISA_NEON = 2, BLOB_ISA_AVX512 = 3 };
#define BLOB_NUM_ISAS 4

/* Status codes returned by the kernels. */
enum blob_status { BLOB_OK = 0, BLOB_ENOMEM = 1, BLOB_EINVAL = 2 };

/* A weight matrix W (rows, cols) in the blob file's planar layout, read in place: the planes
 * of its dtype in DTypeSpec.planes order (docs/FORMAT.md), plane[i] NULL past the last.
 * plane[0]: row r at plane[0] + r*row_stride_bytes. Plain dtypes: the values. Quantized: the
 * first plane's bytes of the row's blocks (q8_0 / q4_0: ceil(cols/32) blocks, zero past
 * `cols`; the other types hold whole blocks), each row padded to a multiple of 64 bytes, as the
 * file stores it, and the kernels may read that padding.
 * plane[i > 0]: packed (rows, nblocks * BLOB_DTYPE_PLANE_BYTES[dtype][i]) bytes; q8_0 / q4_0
 * have one, the block scales as float16 bits (rows, ceil(cols/32)).
 * That is `layout` BLOB_LAYOUT_ROWS (0, what a zero-initialized field says). A q8_0 matrix may
 * instead be BLOB_LAYOUT_INTERLEAVE8: rows in groups of eight (the last group completed with
 * zero rows), each group's blocks one after another, block b of group g at plane[0] +
 * (g*nblocks + b)*256, whose bytes 16i + 2j and 16i + 2j + 1 are levels 2i and 2i + 1 of the
 * group's row j (i < 16): one int32 lane per row in each 16-byte run, so a dot-product
 * instruction sums a row's block in a lane of its own. plane[1]: the scales (groups, nblocks, 8)
 * as float16 bits, group g's block b at (g*nblocks + b)*8, row j's at + j. row_stride_bytes is
 * then a row's share of its group, nblocks * 32. A q4_0 matrix in BLOB_LAYOUT_INTERLEAVE8 has
 * its own tile of 128-byte group blocks at plane[0] + (g*nblocks + b)*128: byte 32c + 4j + m
 * (c < 4, m < 4) holds level 8c + m of row j in its low nibble and level 8c + 4 + m in its high
 * one, each as level + 8 (as the planar nibbles): one int32 lane per row in each 32-byte run,
 * whose low and high nibbles meet a token's levels 8c .. 8c+3 and 8c+4 .. 8c+7 broadcast; the
 * scales as q8_0's, and row_stride_bytes nblocks * 16. A q5_0 matrix in BLOB_LAYOUT_INTERLEAVE8
 * keeps its three planes, each in groups: plane[0] the nibbles (low four bits of level + 16) in
 * q4_0's interleaved arrangement, group block b at (g*nblocks + b)*128; plane[1] the fifth bits,
 * 32 bytes a group block at (g*nblocks + b)*32, whose little-endian word s (s < 8) has in bit
 * 4j + m the fifth bit of level 4s + m of row j: the bits of a 32-byte nibble run's low (s even)
 * or high (s odd) nibbles, in byte order; plane[2] the scales as q8_0's plane[1];
 * row_stride_bytes nblocks * 16. */
enum blob_layout { BLOB_LAYOUT_ROWS = 0, BLOB_LAYOUT_INTERLEAVE8 = 1 };
#define BLOB_INTERLEAVE 8      /* rows per group of BLOB_LAYOUT_INTERLEAVE8 */
typedef struct blob_matrix {
    int dtype;
    const void *plane[BLOB_MAX_PLANES];
    size_t row_stride_bytes;
    size_t rows, cols;
    int layout;                /* enum blob_layout */
} blob_matrix;

/* ---- run-time ISA choice (dispatch.c) ---- */
int blob_isa_supported(int isa);
int blob_isa_best(void);           /* the fastest supported path */
int blob_isa_current(void);
int blob_isa_select(int isa);      /* BLOB_OK, or BLOB_EINVAL when unsupported */
const char *blob_isa_name(int isa);
int blob_isa_int8_dot(void);       /* 1 when the current path uses a dedicated int8 dot instruction */

/* ---- threads (threads.c) ---- */
int blob_threads_get(void);
int blob_threads_set(int n);       /* 1..BLOB_MAX_THREADS; BLOB_EINVAL otherwise */
#define BLOB_MAX_THREADS 256
/* The work-split trace: between begin and end, pool jobs run on the caller alone and every work
 * item's start is timestamped into at[] (seconds) with its job's index in job[] (a job's first
 * event is its start, the last its end). end returns the events written, or SIZE_MAX when
 * `capacity` was too small. */
void blob_trace_begin(double *at, uint32_t *job, size_t capacity);
size_t blob_trace_end(void);

/* ---- matrix products (matmul.c) ----
 * Y (n, rows) = X (n, cols) @ W.T; up to BLOB_DECODE_TILES_MAX_TOKENS tokens (a decode step, a
 * batched one, a speculative verify) run the decode matvec tiles over each item's rows (a few
 * tokens at once for quantized rows read one per tile), each token's row bit-identical to its
 * own n == 1 product; more run the tiled prefill matmul. */
#define BLOB_DECODE_TILES_MAX_TOKENS 8
int blob_matmul(const blob_matrix *w, const float *x, size_t x_stride, size_t n,
                float *y, size_t y_stride);
/* The products of up to BLOB_MAX_GROUP matrices with the same X, as one job (a transformer's
 * Q, K and V, or its gate and up): X is quantized once and the pool woken once. The matrices
 * share dtype and `cols`; Y_i (n, w[i]->rows) at y[i], rows y_stride[i]
 * apart. Each Y_i is bit-identical to blob_matmul(w[i], ...). */
#define BLOB_MAX_GROUP 3
int blob_matmul_group(const blob_matrix *const *w, float *const *y, const size_t *y_stride, size_t count,
                      const float *x, size_t x_stride, size_t n);

/* Positions begin .. end-1 of a sequence that hold one image's tokens (Gemma 3): they see each
 * other both ways, and when `embeds` is not NULL, its rows (end - begin, hidden) are their input
 * vectors in place of their tokens' embeddings (taken as given: the embedding scale is not applied). */
typedef struct blob_span {
    size_t begin, end;
    const float *embeds;
} blob_span;

/* ---- attention (attention.c) ----
 * Causal attention of n queries at positions p0 .. p0+n-1 over a KV cache holding positions
 * 0 .. p0+n-1. Element (pos, kv_head, d) of K is at k + pos*k_pos_stride + kv_head*k_head_stride + d
 * (likewise V); the cache dtype is BLOB_F32 or BLOB_F16. Query head h reads kv head
 * h / (n_heads / n_kv_heads). A key at position j is visible from position p when j <= p, or
 * both lie in one of the n_spans bidirectional spans (spans: NULL when n_spans is 0), and, with
 * window > 0, p - j < window (transformers' Gemma 3: AND(window, OR(causal, same image))). The
 * cache must hold every span's keys that a query inside it sees. Scores are (q . k) * scale, then
 * softcap * tanh(s / softcap) when softcap > 0. Q and OUT are (n, n_heads, head_dim), contiguous. */
typedef struct blob_attention {
    size_t n_heads, n_kv_heads, head_dim;
    int kv_dtype;
    const void *k, *v;
    size_t k_pos_stride, k_head_stride, v_pos_stride, v_head_stride;
    float scale, softcap;
    size_t window;
    const blob_span *spans;
    size_t n_spans;
} blob_attention;

int blob_attention_run(const blob_attention *a, const float *q, size_t n, size_t p0, float *out);
/* The attention of `count` sequences in one job (a batched decode step): sequence s has n[s]
 * queries at positions p0[s] .. p0[s]+n[s]-1 over its own cache a[s] (the descriptors differ
 * only in k and v). Q and OUT hold the sequences' rows one after another, (sum n, n_heads,
 * head_dim). Each sequence's rows are bit-identical to blob_attention_run(&a[s], ...). */
int blob_attention_run_batch(const blob_attention *a, size_t count, const float *q, const size_t *n,
                             const size_t *p0, float *out);

/* ---- small ops (ops.c), X (n, d) contiguous rows, OUT may alias X ---- */
/* out = x / rms(x) * (offset + w): offset 0 for plain RMSNorm, 1 for Gemma's (1 + w). */
void blob_rms_norm(const float *x, const float *w, size_t n, size_t d, float eps, float offset,
                   float *out);
/* Rotary embedding in two steps, so that layers sharing frequencies share the angles:
 * blob_rope_angles fills COS_SIN (n, n_freq, 2) with the cosine and sine of
 * positions[i] * inv_freq[j], each times SCALE (LongRoPE's attention factor, else 1);
 * blob_rope rotates X (n, n_heads, head_dim) in place by them, HF half-split layout, over the
 * first 2*n_freq dimensions of each head (fewer than head_dim: partial rotary). */
void blob_rope_angles(const int64_t *positions, size_t n, const float *inv_freq, size_t n_freq, float scale,
                      float *cos_sin);
void blob_rope(float *x, size_t n, size_t n_heads, size_t head_dim, const float *cos_sin, size_t n_freq);
enum blob_activation { BLOB_ACT_SILU = 0, BLOB_ACT_GELU_TANH = 1 };
/* out = act(gate) * up, element-wise over `count` values. */
void blob_gated_act(const float *gate, const float *up, size_t count, int act, float *out);
/* Each row of X (n, d) replaced by its softmax. */
void blob_softmax(float *x, size_t n, size_t d);
/* out = cap * tanh(x / cap), element-wise. */
void blob_softcap(const float *x, size_t count, float cap, float *out);
/* out = a + b, element-wise. */
void blob_add(const float *a, const float *b, size_t count, float *out);
/* out = (x - mean(x)) / sqrt(var(x) + eps) * w + b per row: LayerNorm with bias, the biased
 * variance as torch's nn.LayerNorm; mean and variance summed in double. */
void blob_layer_norm(const float *x, const float *w, const float *b, size_t n, size_t d, float eps, float *out);
/* OUT (n, cols) = rows ids[0..n) of W, dequantized to f32 (ids already range-checked). */
void blob_embed(const blob_matrix *w, const int64_t *ids, size_t n, float *out);

/* ---- the transformer forward pass (forward.c) ----
 * One decoder block varied by these fields; optional weights are NULL when the model has none.
 * Vectors are float32 of the obvious length (norms: hidden, or head_dim for q/k norms). */
typedef struct blob_layer {
    blob_matrix q, k, v, o, gate, up, down;
    const float *attn_norm, *ffn_norm;
    const float *post_attn_norm, *post_ffn_norm;   /* Gemma 2/3 sandwich norms */
    const float *q_norm, *k_norm;                  /* per-head RMSNorm of queries and keys */
    const float *q_bias, *k_bias, *v_bias, *o_bias;
    const float *inv_freq;                         /* rotary inverse frequencies, n_freq of them */
    size_t n_freq;                                 /* 2 * n_freq leading dimensions of a head rotate */
    float rope_scale;                              /* multiplies cos and sin: LongRoPE's attention factor, else 1 */
    size_t window;                                 /* attention window in tokens, 0 = unlimited */
} blob_layer;

typedef struct blob_model {
    size_t n_layers, hidden, n_heads, n_kv_heads, head_dim, ffn;
    float rms_eps, norm_offset;      /* norm: x / rms(x) * (norm_offset + w) */
    float embedding_scale;           /* embeddings are multiplied by it (Gemma: sqrt(hidden)) */
    float attn_scale, attn_softcap;  /* score = (q . k) * attn_scale, then the softcap when > 0 */
    float final_softcap;             /* on the logits, when > 0 */
    int activation;                  /* enum blob_activation of the gated MLP */
    blob_matrix embed, lm_head;
    const float *final_norm;
    const blob_layer *layers;        /* n_layers of them */
} blob_model;

/* K and V, each (n_layers, max_seq, n_kv_heads, head_dim) contiguous, f32 or f16. */
typedef struct blob_kv_cache {
    int dtype;
    void *k, *v;
    size_t max_seq;
} blob_kv_cache;

/* One sequence's share of a forward call: a run of n >= 1 tokens at positions start .. start+n-1
 * of its own cache, which must hold positions 0 .. start-1 already, and the logits of the run's
 * last logit_rows <= n tokens (0: none, a prompt chunk whose logits nobody reads). Its image
 * spans (n_spans of them, sorted and disjoint; spans NULL when none) may lie anywhere in the
 * sequence, but a span that overlaps the call's positions must lie wholly inside them: its
 * tokens see each other's keys, so they are computed in one call. Text-only sequences have none. */
typedef struct blob_sequence {
    blob_kv_cache cache;
    size_t start, n, logit_rows;
    const blob_span *spans;
    size_t n_spans;
} blob_sequence;

/* Runs the tokens of n_seqs sequences through every layer, writing each one's keys and values
 * into its cache: ids holds sequence 0's n tokens, then sequence 1's, and so on (n_tokens in
 * all, the sum of their n). The runs may be anything from a prompt chunk to one decode token:
 * a batched step mixes newcomers' prompt chunks with the running sequences' next tokens. The
 * matrix products run over all the rows at once (the weights read from memory once for every
 * sequence), attention per sequence against its own cache, and each run's rows take the tiles
 * its lone call would (runs of up to BLOB_DECODE_TILES_MAX_TOKENS tokens are multiplied apart
 * from longer ones, that many rows at a time): each sequence's logits and cache rows are
 * bit-identical to its lone call's. LOGITS
 * receives (sum of logit_rows, vocab): sequence 0's rows, then sequence 1's, and so on. ids
 * must be in range; an image span's ids are embedded, then replaced by its embeds. SCRATCH
 * holds the activations: blob_forward_scratch_bytes(m, n_tokens) bytes, owned by the caller so
 * that a model's steps reuse one buffer (fresh pages would cost a page fault each) and two
 * models can run at once.
 * blob_forward is the one-sequence case: ids[0..n) at positions start .. start+n-1. */
size_t blob_forward_scratch_bytes(const blob_model *m, size_t n_tokens);
int blob_forward_batch(const blob_model *m, const blob_sequence *seqs, size_t n_seqs, const int64_t *ids,
                       float *logits, void *scratch);
int blob_forward(const blob_model *m, const blob_kv_cache *cache, const int64_t *ids, size_t n,
                 size_t start, size_t logit_rows, float *logits, void *scratch);

/* ---- the vision encoder (vision.c) ----
 * A second block kind beside the decoder's: SigLIP's encoder layer (pre-LayerNorm with bias,
 * bidirectional multi-head attention with q/k/v/o biases, GELU-tanh MLP fc1/fc2 with biases),
 * then Gemma 3's projector. Vectors are float32: norms and biases of `hidden` values (fc1_bias
 * of `ffn`). */
typedef struct blob_vision_layer {
    blob_matrix q, k, v, o, fc1, fc2;               /* (hidden, hidden) x4, (ffn, hidden), (hidden, ffn) */
    const float *norm1, *norm1_bias, *norm2, *norm2_bias;
    const float *q_bias, *k_bias, *v_bias, *o_bias, *fc1_bias, *fc2_bias;
} blob_vision_layer;

/* An image (channels, image_size, image_size) becomes grid x grid patches (grid = image_size /
 * patch_size, row-major), each embedded by a matmul over its unfolded pixels in (channel, y, x)
 * order (the convolution's weight, stride = kernel = patch) plus its learned position row; the
 * encoder layers and post-LayerNorm follow; the projector averages each (grid / tokens_per_side)^2
 * square of patches into one of tokens_per_side^2 image tokens, RMSNorms them with Gemma's
 * (1 + w) and projects them into the text model's hidden size. */
typedef struct blob_vision_model {
    size_t n_layers, hidden, n_heads, head_dim, ffn;
    size_t channels, image_size, patch_size, tokens_per_side;
    float norm_eps;                  /* every LayerNorm's, and the projector's RMSNorm's */
    blob_matrix patch;               /* (hidden, channels * patch_size^2) */
    const float *patch_bias;         /* (hidden,) */
    blob_matrix position;            /* (grid^2, hidden), any dtype: rows dequantized as embeddings are */
    const blob_vision_layer *layers; /* n_layers of them */
    const float *post_norm, *post_norm_bias;
    const float *projection_norm;    /* (hidden,) used as 1 + w */
    blob_matrix projection;          /* (text_hidden, hidden) */
} blob_vision_model;

/* The scratch blob_vision_encode needs (one image's activations at a time). */
size_t blob_vision_scratch_bytes(const blob_vision_model *m);
/* PIXELS (n_images, channels, image_size, image_size), normalized, -> OUT (n_images,
 * tokens_per_side^2, text_hidden). BLOB_EINVAL when the shapes do not fit together (the patch
 * grid not divisible into the token grid, matrices of the wrong size). */
int blob_vision_encode(const blob_vision_model *m, const float *pixels, size_t n_images, float *out, void *scratch);

/* STREAM-style read of `nbytes` (a multiple of 64, 64-byte aligned) on every thread,
 * for the bandwidth benchmark; returns a checksum so the reads cannot be optimized away. */
double blob_read_bandwidth_probe(const void *data, size_t nbytes);

#endif

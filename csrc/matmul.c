/* The one row-loop and threading skeleton behind every matrix product, whatever the dtype.
 *
 * Work items are (token tile, chunk of output rows) pairs, handed out through an atomic
 * counter so a descheduled thread delays nobody. Inside an item, each register tile of weight
 * rows is run against every token of the token tile before moving on, so a weight row is read
 * from memory once per token tile. Each output is computed by exactly one tile call whatever
 * the thread count: results are bit-identical for any number of threads.
 */
#include "kernels_impl.h"

/* Weight bytes per work item at one token: each thread then reads long in-order runs, which
 * the prefetchers follow, while a small matrix still yields MATVEC_MIN_ITEMS items per thread
 * to balance. Every item start is a cold stream: on Zen 4 at 2 threads, the 1.1B llama's
 * matrices read at 31 GB/s (q8_0) in 128 KiB items against 33-34 in 1 MiB ones, which is the
 * read probe's own figure over the same bytes. */
#define MATVEC_ITEM_BYTES (1024u << 10)
#define MATVEC_MIN_ITEMS 4
#define MATMUL_CHUNK_ROWS 16           /* rows per work item at many tokens */
#define ACT_TILE_BYTES (4u << 20)      /* activations of one token tile: stay in the last-level cache */

static int is_quantized(int dtype) { return blob_dtype_block(dtype) > 1; }

/* A matrix the kernels can multiply: a dtype with tiles, and for the types of GGUF's numbers
 * whole blocks per row (their formats have no partial block). */
static int is_valid(const blob_matrix *w) {
    const size_t block = blob_dtype_block(w->dtype);
    const int layout_ok = w->layout == BLOB_LAYOUT_ROWS ||
                          (w->layout == BLOB_LAYOUT_INTERLEAVE8 && block > 0 && blob_ops()->interleave8[w->dtype] != NULL);
    return block > 0 && layout_ok && (!blob_is_block32_type(w->dtype) || w->cols % block == 0);
}
/* A matvec tile of several rows reads them as interleaved streams one row_stride apart, which
 * the hardware prefetchers follow worse than one stream read in order (AMD Zen 3, 262144 x 640
 * q8_0: 6 GB/s with 4-row tiles, 18-20 with 1-row tiles; Zen 4, 2 threads, the 1.1B llama's
 * f16 matrices: 27-36 against 30-44 GB/s, the spread being this machine's own). Rows over 256
 * bytes therefore go one per tile, and out-of-order execution overlaps the rows' independent
 * sums instead; the quantized one-row tile also prefetches ahead (kernels_x86.inc). Rows of at
 * most 256 bytes keep the multi-row tile: four of them span 16 lines, read nearly in order. */
static int matvec_by_single_rows(const blob_matrix *w) { return w->row_stride_bytes > 256; }

/* A few tokens — a batched decode step, one token per sequence — run the decode tiles over each
 * item's rows, in the matvec's prefetcher-friendly order, and every token gets exactly its lone
 * decode's results. Quantized rows that go one per tile take the few-token tile
 * (matvec_tokens): each block loaded and widened once for up to BLOB_MVT_TOKENS tokens, whose
 * independent sums also overlap the latency of each one's chain of adds (Gemma 3 270M's
 * 262144 x 640 q8_0 head at one thread: 4 tokens took 3.5 times one token's matvec run token
 * after token, 2.1 times with it). The other tiles run token after token, the weights of an
 * item from the cache after the first. The matmul tile over so few tokens reads its
 * interleaved rows at a fraction of the bandwidth (the same head, 2 threads: 4 tokens took
 * 4.5-5 times one token's matvec). */
static int decode_tiles(size_t n) { return n <= BLOB_DECODE_TILES_MAX_TOKENS; }

/* One matrix of a job: its items come after those of the parts before it. */
typedef struct {
    const blob_matrix *w;
    float *y;
    size_t y_stride;
    blob_tile_fn tile;
    int tile_rows, tile_tokens;
    size_t rows_per_call;   /* tile_rows, or a whole chunk for the one-row tiles */
    size_t chunk_rows, nchunks, first_item;
} matmul_part;

typedef struct {
    matmul_part parts[BLOB_MAX_GROUP];
    size_t nparts;
    blob_acts acts;
    size_t n, token_tile, nitems;
    volatile size_t next;
} matmul_job;

static void run_item(const matmul_job *j, size_t item) {
    const matmul_part *p = j->parts;
    while (p + 1 < j->parts + j->nparts && item >= p[1].first_item) p++;
    const size_t local = item - p->first_item;
    const size_t r_begin = (local % p->nchunks) * p->chunk_rows;
    const size_t r_end = blob_min(r_begin + p->chunk_rows, p->w->rows);
    const size_t t_begin = (local / p->nchunks) * j->token_tile;
    const size_t t_end = blob_min(t_begin + j->token_tile, j->n);
    for (size_t r = r_begin; r < r_end; r += p->rows_per_call)
        for (size_t t = t_begin; t < t_end; t += p->tile_tokens)
            p->tile(p->w, r, blob_min(p->rows_per_call, r_end - r), &j->acts, t,
                    blob_min((size_t)p->tile_tokens, t_end - t), p->y, p->y_stride);
}

static void matmul_task(void *ctx, int ith, int nth) {
    matmul_job *j = (matmul_job *)ctx;
    (void)ith, (void)nth;
    for (size_t item; (item = blob_next_item(&j->next)) < j->nitems;) run_item(j, item);
}

typedef struct {
    const blob_isa_ops *ops;
    const float *x;
    size_t x_stride, cols, n;
    int dtype, bits;                /* the weights' type; its level width, blob_act_bits */
    uint8_t *q;
    float *d, *sums;
    int32_t *half_sums;
    int8_t *split;                  /* q4_1 .. q6_k: the levels as two int8 planes, or NULL */
    int16_t *pairs;                 /* q4_1 .. q6_k prefill: the levels in pairs, or NULL */
    int8_t *quads;                  /* or, where the tile reads them, the int8 levels in quads */
    int8_t *lanes;                  /* q4_k .. q6_k decode: the split levels by lanes, or NULL */
    int crossed;                    /* blob_lane_levels' crossed arrangement */
    size_t q_stride_bytes, nblocks;
    volatile size_t next;
} quantize_job;

static void quantize_task(void *ctx, int ith, int nth) {
    quantize_job *j = (quantize_job *)ctx;
    (void)ith, (void)nth;
    const size_t used = j->nblocks * BLOB_QBLOCK * (size_t)(j->bits / 8);
    for (size_t t; (t = blob_next_item(&j->next)) < j->n;) {
        uint8_t *q = j->q + t * j->q_stride_bytes;
        const float *x = j->x + t * j->x_stride;
        float *d = j->d + t * j->nblocks;
        blob_quantize_acts(j->ops, j->dtype, x, j->cols, q, d);
        if (j->bits == 16) {
            if (j->half_sums) blob_half_sums((const int16_t *)q, j->nblocks, j->half_sums + t * 2 * j->nblocks);
            if (j->split) blob_split_levels((const int16_t *)q, j->nblocks, j->split + t * j->q_stride_bytes);
            if (j->lanes) blob_lane_levels((const int16_t *)q, j->nblocks, j->crossed, j->lanes + t * j->q_stride_bytes);
            if (j->pairs) blob_pair_levels((const int16_t *)q, j->nblocks, j->pairs + t * blob_pair_stride(j->nblocks));
            if (j->quads) blob_quad_levels((const int16_t *)q, j->nblocks, j->quads + t * blob_pair_stride(j->nblocks));
        } else {
            blob_level_sums((const int8_t *)q, j->nblocks, j->sums + t * j->nblocks);
        }
        memset(q + used, 0, j->q_stride_bytes - used);   /* defined bytes in the row padding too */
    }
}

/* Quantizes X (n, cols) for `dtype` weights into the workspace: levels (n, q_stride) of
 * blob_act_bits(dtype) bits, rows 64-byte aligned, then scales d (n, nblocks) f32 and, for
 * int8 levels, their block sums (n, nblocks) f32; for q4_1 .. q6_k in that place the sums of
 * each half block (n, 2 * nblocks) int32, and between the levels and the scales either the
 * levels split in bytes (n, 2 * q_stride), which the decode tiles read, or, for a path whose
 * matmul tile takes any number of tokens and more tokens than a decode step, in pairs
 * (n, blob_pair_stride) int16 (blob_pair_levels), which that tile reads instead (q4_k's int8
 * levels in quads, (n, blob_pair_stride) bytes, where it reads those: BLOB_READS_QUADS). Planar tiles
 * read the split or paired levels, and at one token the interleaved q5_0 tile reads the split
 * ones, and x86's decode q4_k, q5_k and q6_k tiles read the split bytes rearranged by
 * blob_lane_levels (n, 2 * q_stride) after them: each only where the path's reads_levels says
 * it reads them. */
static int quantize_activations(const blob_isa_ops *ops, blob_acts *acts, size_t n, size_t cols, int dtype,
                                int planar) {
    const int bits = blob_act_bits(dtype);
    size_t nblocks = blob_div_up(cols, BLOB_QBLOCK);
    size_t q_stride_bytes = (nblocks * BLOB_QBLOCK * (size_t)(bits / 8) + 63) & ~(size_t)63;
    const int block32 = blob_is_block32_type(dtype), paired = planar && !decode_tiles(n) && ops->mm_any_tokens[dtype];
    const int reads = block32 && (planar || n == 1) && !paired ? ops->reads_levels[dtype] : 0;
    const size_t split_bytes = reads & BLOB_READS_SPLIT ? n * q_stride_bytes : 0;   /* 2 bytes a level, as int16 */
    const size_t lane_bytes = reads & BLOB_READS_LANES ? n * q_stride_bytes : 0;
    const int quads = paired && blob_act_int8_levels(dtype) && (ops->reads_levels[dtype] & BLOB_READS_QUADS);
    const size_t pair_bytes = paired ? n * blob_pair_stride(nblocks) * (quads ? 1 : sizeof(int16_t)) : 0;
    uint8_t *space = (uint8_t *)blob_workspace(n * q_stride_bytes + split_bytes + lane_bytes + pair_bytes +
                                               3 * n * nblocks * sizeof(float));
    if (!space) return BLOB_ENOMEM;
    int8_t *split = split_bytes ? (int8_t *)(space + n * q_stride_bytes) : NULL;
    int8_t *lanes = lane_bytes ? (int8_t *)(space + n * q_stride_bytes + split_bytes) : NULL;
    int16_t *pairs = paired && !quads ? (int16_t *)(space + n * q_stride_bytes + split_bytes + lane_bytes) : NULL;
    int8_t *quad_levels = quads ? (int8_t *)(space + n * q_stride_bytes + split_bytes + lane_bytes) : NULL;
    float *d = (float *)(space + n * q_stride_bytes + split_bytes + lane_bytes + pair_bytes);
    int32_t *half_sums = block32 ? (int32_t *)(d + n * nblocks) : NULL;
    quantize_job job = {ops, acts->x, acts->x_stride, cols, n, dtype, bits, space, d, d + n * nblocks, half_sums,
                        split, pairs, quad_levels, lanes, (reads & BLOB_READS_CROSSED) != 0, q_stride_bytes, nblocks, 0};
    if (decode_tiles(n)) quantize_task(&job, 0, 1);   /* a decode step's few tokens: not worth waking the pool */
    else blob_pool_run(quantize_task, &job);
    acts->q8 = bits == 8 ? (const int8_t *)space : NULL;
    acts->q16 = bits == 16 ? (const int16_t *)space : NULL;
    acts->d = job.d;
    acts->sums = bits == 8 ? job.sums : NULL;
    acts->half_sums = half_sums;
    acts->split = split;
    acts->pairs = pairs;
    acts->quads = quad_levels;
    acts->lanes = lanes;
    acts->q_stride = q_stride_bytes / (size_t)(bits / 8);
    acts->nblocks = nblocks;
    return BLOB_OK;
}

typedef struct {
    const float *x;
    size_t x_stride, cols, n;
    float *out;
    volatile size_t next;
} even_odd_job;

static void even_odd_task(void *ctx, int ith, int nth) {
    even_odd_job *j = (even_odd_job *)ctx;
    (void)ith, (void)nth;
    for (size_t t; (t = blob_next_item(&j->next)) < j->n;)
        blob_even_odd_columns(j->x + t * j->x_stride, j->cols, j->out + t * blob_even_odd_stride(j->cols));
}

/* The activations of a bf16 prefill arranged for a path whose tile reads them so
 * (blob_isa_ops.bf16_even_odd) into the workspace: (n, blob_even_odd_stride(cols)) f32. */
static int arrange_even_odd(blob_acts *acts, size_t n, size_t cols) {
    float *out = (float *)blob_workspace(n * blob_even_odd_stride(cols) * sizeof(float));
    if (!out) return BLOB_ENOMEM;
    even_odd_job job = {acts->x, acts->x_stride, cols, n, out, 0};
    blob_pool_run(even_odd_task, &job);
    acts->even_odd = out;
    return BLOB_OK;
}

static size_t round_down_to(size_t v, size_t m) { return v < m ? m : v / m * m; }

/* Part p's tile, and the rows and tokens it takes a call. Interleaved rows
 * (BLOB_LAYOUT_INTERLEAVE8) have one tile for decode and prefill: two groups of eight rows
 * against all the item's tokens, each group read as one stream. */
static void choose_tile(const blob_isa_ops *ops, const matmul_job *job, matmul_part *p, int decode, int row_tiles) {
    const int dtype = p->w->dtype;
    if (p->w->layout == BLOB_LAYOUT_INTERLEAVE8) {
        p->tile = ops->interleave8[dtype];
        p->tile_rows = BLOB_INTERLEAVE8_ROWS;
        p->tile_tokens = (int)job->token_tile;
        return;
    }
    const blob_tile_fn few_tokens = row_tiles && job->n > 1 ? ops->matvec_tokens[dtype] : NULL;
    p->tile = few_tokens ? few_tokens : row_tiles ? ops->matvec_row[dtype]
            : decode ? ops->matvec[dtype] : ops->matmul[dtype];
    p->tile_rows = row_tiles ? 1 : decode ? ops->mv_rows : ops->mm_tile_rows[dtype] ? ops->mm_tile_rows[dtype] : ops->mm_rows;
    p->tile_tokens = few_tokens ? BLOB_MVT_TOKENS : decode ? 1
                   : ops->mm_any_tokens[dtype] ? (int)job->token_tile : ops->mm_tokens;
}

/* Fills in part `p` of the job for matrix w: its tile and how its rows split into items. */
static void plan_part(const blob_isa_ops *ops, matmul_job *job, matmul_part *p, const blob_matrix *w,
                      float *y, size_t y_stride) {
    const size_t n = job->n;
    const int decode = decode_tiles(n), row_tiles = decode && matvec_by_single_rows(w) && w->layout == BLOB_LAYOUT_ROWS;
    p->w = w;
    p->y = y;
    p->y_stride = y_stride;
    choose_tile(ops, job, p, decode, row_tiles);
    size_t chunk_rows = MATMUL_CHUNK_ROWS;
    if (decode)   /* the item's bytes read by all its tokens: 1 MiB */
        chunk_rows = blob_min(MATVEC_ITEM_BYTES / n / w->row_stride_bytes,
                              blob_div_up(w->rows, MATVEC_MIN_ITEMS * (size_t)blob_threads_get()));
    p->chunk_rows = round_down_to(chunk_rows, p->tile_rows);
    p->rows_per_call = row_tiles ? p->chunk_rows : (size_t)p->tile_rows;
    p->nchunks = blob_div_up(w->rows, p->chunk_rows);
    p->first_item = job->nitems;
    job->nitems += p->nchunks * blob_div_up(n, job->token_tile);
}

int blob_matmul_group(const blob_matrix *const *w, float *const *y, const size_t *y_stride, size_t count,
                      const float *x, size_t x_stride, size_t n) {
    if (count == 0 || count > BLOB_MAX_GROUP) return BLOB_EINVAL;
    for (size_t i = 0; i < count; i++)
        if (!is_valid(w[i]) || w[i]->dtype != w[0]->dtype || w[i]->cols != w[0]->cols)
            return BLOB_EINVAL;
    if (n == 0) return BLOB_OK;
    const blob_isa_ops *ops = blob_ops();
    const int quantized = is_quantized(w[0]->dtype);
    const size_t cols = w[0]->cols;
    matmul_job job;
    memset(&job, 0, sizeof job);
    job.acts.x = x;
    job.acts.x_stride = x_stride;
    job.n = n;
    size_t act_row_bytes = quantized ? cols * (size_t)(blob_act_bits(w[0]->dtype) / 8) + cols / 8 : 4 * cols;
    job.token_tile = decode_tiles(n) ? n : blob_min(n, round_down_to(ACT_TILE_BYTES / (act_row_bytes + 1), ops->mm_tokens));
    int planar = 0;
    for (size_t i = 0; i < count; i++)
        if (w[i]->rows > 0) {
            plan_part(ops, &job, &job.parts[job.nparts++], w[i], y[i], y_stride[i]);
            planar |= w[i]->layout == BLOB_LAYOUT_ROWS;
        }
    if (job.nitems == 0) return BLOB_OK;

    blob_call_lock();
    const int even_odd = w[0]->dtype == BLOB_BF16 && !decode_tiles(n) && ops->bf16_even_odd;
    int status = quantized ? quantize_activations(ops, &job.acts, n, cols, w[0]->dtype, planar)
               : even_odd ? arrange_even_odd(&job.acts, n, cols) : BLOB_OK;
    if (status == BLOB_OK) blob_pool_run(matmul_task, &job);
    blob_call_unlock();
    return status;
}

int blob_matmul(const blob_matrix *w, const float *x, size_t x_stride, size_t n, float *y,
                size_t y_stride) {
    return blob_matmul_group(&w, &y, &y_stride, 1, x, x_stride, n);
}

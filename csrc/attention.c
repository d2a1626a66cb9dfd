/* Causal grouped-query attention (bidirectional inside image spans) over KV caches (f32 or f16), for one decode token, a prefill
 * batch, or each of several sequences' run of tokens (a batched step: prompt chunks and decode tokens), in one job. One work
 * item = one query position of one sequence and a slice of the query heads that share a KV head: the slice's scores come
 * from one pass over the keys (the path's key_scores, else the matmul tiles with the heads as tokens), so a GQA group reads
 * its keys once, not once per head.
 * Each head's scores go to a per-thread scratch row, are soft-capped and exponentiated with the path's exp_row (one function,
 * blob_exp_same, on every path: vectorized, where libm's expf took a call per score) and summed in key order; the value rows
 * are then weighted for all the slice's heads at once (weighted_rows: each row read once for the slice), each output element
 * the same chain of multiply-adds in key order whatever the slicing. So a head's result depends neither on the slicing nor
 * on the thread count, and a query's is the same in decode, a batched step, a speculative verify or a prefill. */
#include "kernels_impl.h"

typedef struct {
    const blob_attention *a;   /* (count,) one per sequence: its cache */
    const size_t *n, *p0;      /* (count,) its queries at positions p0 .. p0+n-1 */
    size_t count, rows;        /* rows: the queries of all sequences, sum of n */
    const blob_isa_ops *ops;
    const float *q;
    float *out;
    size_t heads_per_item;   /* query heads per item: the GQA group, or a part of it */
    float *scratch;          /* per thread: (heads_per_item, scores_stride) scores, then (heads_per_item,)
                                1 / totals, padded to 64 bytes (per_thread_floats) */
    size_t scores_stride;
    volatile size_t next;
} attention_job;

/* scores (heads, count) = Q (heads, head_dim) @ K (count, head_dim).T: the path's key_scores, or
 * the matmul tiles' work with the keys a matrix of cache rows and the heads its tokens. */
static void key_scores(const blob_isa_ops *ops, const uint8_t *k, size_t row_bytes, size_t count,
                       const blob_attention *a, const float *q, size_t heads, float *scores, size_t stride) {
    if (ops->key_scores) {
        ops->key_scores(q, heads, a->head_dim, k, a->k_pos_stride, count, a->kv_dtype, scores, stride);
        return;
    }
    const blob_matrix keys = {.dtype = a->kv_dtype, .plane = {k}, .row_stride_bytes = row_bytes, .rows = count,
                              .cols = a->head_dim};
    blob_acts queries;
    memset(&queries, 0, sizeof queries);
    queries.x = q;
    queries.x_stride = a->head_dim;
    const size_t R = (size_t)ops->mm_rows, T = (size_t)ops->mm_tokens;
    for (size_t r = 0; r < count; r += R)
        for (size_t t = 0; t < heads; t += T)
            ops->matmul[a->kv_dtype](&keys, r, blob_min(R, count - r), &queries, t, blob_min(T, heads - t),
                                     scores, stride);
}

/* Loops over a row go SCORE_LANES values at a time, then one by one: the compiler vectorizes
 * such fixed-length inner loops at -O2 (not a loop of unknown length), and a max over them runs
 * as that many independent chains where one chain waits out the latency of each compare. */
#define SCORE_LANES 8

/* x[k] *= s for k < n */
static void scale_row(float *x, size_t n, float s) {
    const size_t whole = n - n % SCORE_LANES;
    for (size_t k = 0; k < whole; k += SCORE_LANES)
        for (size_t l = 0; l < SCORE_LANES; l++) x[k + l] *= s;
    for (size_t k = whole; k < n; k++) x[k] *= s;
}

/* Scale (and soft-cap) one head's scores in place; returns their max. The scale and cap are
 * read into locals first: the scores could alias *a, so the compiler would reload them, and
 * test the cap, at every score. */
static float scaled_scores(const blob_attention *a, float *scores, size_t count) {
    const float scale = a->scale, softcap = a->softcap;
    const size_t whole = count - count % SCORE_LANES;
    if (softcap > 0.0f)
        for (size_t c = 0; c < count; c++) scores[c] = softcap * tanhf(scores[c] * scale / softcap);
    else
        scale_row(scores, count, scale);
    /* fmaxf's result (NaN skipped; which zero wins does not change exp(s - max)), but inline:
     * libm's fmaxf is a call per score. Max picks a value, so the lanes' order is immaterial. */
    float lanes[SCORE_LANES];
    for (size_t l = 0; l < SCORE_LANES; l++) lanes[l] = -INFINITY;
    for (size_t c = 0; c < whole; c += SCORE_LANES)
        for (size_t l = 0; l < SCORE_LANES; l++)
            if (scores[c + l] > lanes[l]) lanes[l] = scores[c + l];
    float max_score = -INFINITY;
    for (size_t l = 0; l < SCORE_LANES; l++)
        if (lanes[l] > max_score) max_score = lanes[l];
    for (size_t c = whole; c < count; c++)
        if (scores[c] > max_score) max_score = scores[c];
    return max_score;
}

/* totals[h] = the sum of row h's `count` values in order, for h < heads (rows `stride` apart):
 * four rows' sums at a time, so that four chains of adds overlap (a last group repeats its last
 * row and drops the surplus). The unrolled loops keep the sums in registers: GCC otherwise
 * kept them in memory, each add then waiting on the store before it. */
static void row_sums(const float *rows, size_t stride, size_t heads, size_t count, float *totals) {
    for (size_t h0 = 0; h0 < heads; h0 += 4) {
        const float *r[4];
        float t[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        BLOB_UNROLL
        for (size_t k = 0; k < 4; k++) r[k] = rows + blob_min(h0 + k, heads - 1) * stride;
        for (size_t c = 0; c < count; c++)
            BLOB_UNROLL
            for (size_t k = 0; k < 4; k++) t[k] += r[k][c];
        for (size_t k = 0; k < 4 && h0 + k < heads; k++) totals[h0 + k] = t[k];
    }
}

/* The last key position p sees: its own, or the last of the image span holding it (a few
 * spans at most: a scan; none for text). */
static size_t last_visible(const blob_attention *a, size_t p) {
    for (size_t i = 0; i < a->n_spans; i++)
        if (a->spans[i].begin <= p && p < a->spans[i].end) return a->spans[i].end - 1;
    return p;
}

/* OUT[i, h] = softmax over visible keys j of score(Q[i, h], K[j]) weighting V[j], for the
 * heads h0 .. h0 + heads - 1, which share one KV head; row i of the job is query i - row0 of
 * sequence s. */
static void attend(const attention_job *j, size_t s, size_t row0, size_t i, size_t h0, size_t heads, float *scores,
                   float *inv_totals) {
    const blob_attention *a = &j->a[s];
    const size_t hd = a->head_dim, es = blob_cache_elem_size(a->kv_dtype);
    const size_t p = j->p0[s] + i - row0;
    const size_t first = (a->window > 0 && p + 1 > a->window) ? p + 1 - a->window : 0;
    const size_t count = last_visible(a, p) + 1 - first;
    const size_t kv_head = h0 / (a->n_heads / a->n_kv_heads);
    const uint8_t *k = (const uint8_t *)a->k + (kv_head * a->k_head_stride + first * a->k_pos_stride) * es;
    const uint8_t *v = (const uint8_t *)a->v + (kv_head * a->v_head_stride + first * a->v_pos_stride) * es;
    key_scores(j->ops, k, a->k_pos_stride * es, count, a, j->q + (i * a->n_heads + h0) * hd, heads, scores,
               j->scores_stride);
    float *o = j->out + (i * a->n_heads + h0) * hd;
    for (size_t h = 0; h < heads; h++) {   /* softmax: the exponentials, weighted below, then 1 / their sum */
        float *row = scores + h * j->scores_stride;
        j->ops->exp_row(row, count, scaled_scores(a, row, count));
    }
    row_sums(scores, j->scores_stride, heads, count, inv_totals);
    for (size_t h = 0; h < heads; h++) inv_totals[h] = 1.0f / inv_totals[h];
    j->ops->weighted_rows(o, hd, scores, j->scores_stride, heads, v, a->v_pos_stride, count, hd, a->kv_dtype);
    for (size_t h = 0; h < heads; h++) scale_row(o + h * hd, hd, inv_totals[h]);
}

/* A thread's scratch: its heads' scores, then their 1 / (sum of exponentials), in 64-byte lines. */
static size_t per_thread_floats(size_t heads, size_t scores_stride) {
    return heads * scores_stride + ((heads + 15) & ~(size_t)15);
}

static void attention_task(void *ctx, int ith, int nth) {
    attention_job *j = (attention_job *)ctx;
    (void)nth;
    float *scores = j->scratch + (size_t)ith * per_thread_floats(j->heads_per_item, j->scores_stride);
    float *inv_totals = scores + j->heads_per_item * j->scores_stride;
    const size_t slices = j->a->n_heads / j->heads_per_item, items = j->rows * slices;
    for (size_t item; (item = blob_next_item(&j->next)) < items;) {
        const size_t row = item / slices;
        size_t s = 0, row0 = 0;
        while (row >= row0 + j->n[s]) row0 += j->n[s++];   /* a few sequences at most: a scan */
        attend(j, s, row0, row, (item % slices) * j->heads_per_item, j->heads_per_item, scores, inv_totals);
    }
}

/* The whole GQA group per item, halved while that leaves a thread without an item (Gemma 3
 * 270M decodes with one KV head for four query heads). */
static size_t heads_per_item(const blob_attention *a, size_t n) {
    size_t heads = a->n_heads / a->n_kv_heads;
    while (heads % 2 == 0 && n * (a->n_heads / heads) < (size_t)blob_threads_get()) heads /= 2;
    return heads;
}

int blob_attention_run(const blob_attention *a, const float *q, size_t n, size_t p0, float *out) {
    return blob_attention_run_batch(a, 1, q, &n, &p0, out);
}

int blob_attention_run_batch(const blob_attention *a, size_t count, const float *q, const size_t *n,
                             const size_t *p0, float *out) {
    attention_job job;
    memset(&job, 0, sizeof job);
    for (size_t s = 0; s < count; s++) {
        if (a[s].n_kv_heads == 0 || a[s].n_heads % a[s].n_kv_heads != 0) return BLOB_EINVAL;
        if (a[s].kv_dtype != BLOB_F32 && a[s].kv_dtype != BLOB_F16) return BLOB_EINVAL;
        if (a[s].n_heads != a[0].n_heads || a[s].n_kv_heads != a[0].n_kv_heads || a[s].head_dim != a[0].head_dim)
            return BLOB_EINVAL;
        job.rows += n[s];
        if (p0[s] + n[s] > job.scores_stride) job.scores_stride = p0[s] + n[s];
        for (size_t i = 0; i < a[s].n_spans; i++) {   /* a query inside a span reads up to its end */
            const blob_span *span = &a[s].spans[i];
            if (span->begin >= span->end) return BLOB_EINVAL;
            if (span->begin < p0[s] + n[s] && span->end > p0[s] && span->end > job.scores_stride)
                job.scores_stride = span->end;
        }
    }
    if (job.rows == 0) return BLOB_OK;
    job.a = a;
    job.n = n;
    job.p0 = p0;
    job.count = count;
    job.ops = blob_ops();
    job.q = q;
    job.out = out;
    job.scores_stride = (job.scores_stride + 15) & ~(size_t)15;   /* 64-byte rows: no false sharing */

    blob_call_lock();
    job.heads_per_item = heads_per_item(a, job.rows);
    job.scratch = (float *)blob_workspace((size_t)blob_threads_get() *
                                          per_thread_floats(job.heads_per_item, job.scores_stride) * sizeof(float));
    int status = job.scratch ? BLOB_OK : BLOB_ENOMEM;
    if (status == BLOB_OK) blob_pool_run(attention_task, &job);
    blob_call_unlock();
    return status;
}

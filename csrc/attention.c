/* Causal grouped-query attention over a KV cache (f32 or f16), for one decode token or a
 * prefill batch. One work item = one (query, head) pair: its scores over the visible keys go to
 * a per-thread scratch row, are soft-capped and softmaxed exactly, and weight the value rows.
 * Items are independent, so the result does not depend on the thread count. */
#include "kernels_impl.h"

typedef struct {
    const blob_attention *a;
    const blob_isa_ops *ops;
    const float *q;
    float *out;
    size_t n, p0;
    float *scratch;          /* (threads, p0 + n) */
    size_t scratch_stride;
    volatile size_t next;
} attention_job;

/* scores (count,) = K (count, head_dim) @ q: the keys are a matrix of cache rows, so this is
 * the matvec kernel's work, run through its row tiles. */
static void key_scores(const blob_isa_ops *ops, const uint8_t *k, size_t row_bytes, size_t count,
                       const blob_attention *a, const float *q, float *scores) {
    const blob_matrix keys = {a->kv_dtype, k, row_bytes, NULL, count, a->head_dim};
    blob_acts query;
    memset(&query, 0, sizeof query);
    query.x = q;
    const size_t R = (size_t)ops->mv_rows;
    for (size_t r = 0; r < count; r += R)
        ops->matvec[a->kv_dtype](&keys, r, blob_min(R, count - r), &query, 0, 1, scores, 0);
}

/* OUT[i, h] = softmax over visible keys j of score(Q[i, h], K[j]) weighting V[j]. */
static void attend(const attention_job *j, size_t i, size_t h, float *scores) {
    const blob_attention *a = j->a;
    const size_t hd = a->head_dim, es = blob_cache_elem_size(a->kv_dtype);
    const size_t p = j->p0 + i;
    const size_t first = (a->window > 0 && p + 1 > a->window) ? p + 1 - a->window : 0;
    const size_t count = p + 1 - first;
    const size_t kv_head = h / (a->n_heads / a->n_kv_heads);
    const uint8_t *k = (const uint8_t *)a->k + (kv_head * a->k_head_stride + first * a->k_pos_stride) * es;
    const uint8_t *v = (const uint8_t *)a->v + (kv_head * a->v_head_stride + first * a->v_pos_stride) * es;
    const float *q = j->q + (i * a->n_heads + h) * hd;
    float *o = j->out + (i * a->n_heads + h) * hd;

    key_scores(j->ops, k, a->k_pos_stride * es, count, a, q, scores);
    float max_score = -INFINITY;
    for (size_t c = 0; c < count; c++) {
        float s = scores[c] * a->scale;
        if (a->softcap > 0.0f) s = a->softcap * tanhf(s / a->softcap);
        scores[c] = s;
        max_score = fmaxf(max_score, s);
    }
    float total = 0.0f;
    for (size_t c = 0; c < count; c++) {
        scores[c] = expf(scores[c] - max_score);
        total += scores[c];
    }
    memset(o, 0, hd * sizeof(float));
    j->ops->axpy_rows(o, scores, v, a->v_pos_stride, count, hd, a->kv_dtype);
    const float inv_total = 1.0f / total;
    for (size_t d = 0; d < hd; d++) o[d] *= inv_total;
}

static void attention_task(void *ctx, int ith, int nth) {
    attention_job *j = (attention_job *)ctx;
    (void)nth;
    float *scores = j->scratch + (size_t)ith * j->scratch_stride;
    const size_t items = j->n * j->a->n_heads;
    for (size_t item; (item = blob_next_item(&j->next)) < items;)
        attend(j, item / j->a->n_heads, item % j->a->n_heads, scores);
}

int blob_attention_run(const blob_attention *a, const float *q, size_t n, size_t p0, float *out) {
    if (a->n_kv_heads == 0 || a->n_heads % a->n_kv_heads != 0) return BLOB_EINVAL;
    if (a->kv_dtype != BLOB_F32 && a->kv_dtype != BLOB_F16) return BLOB_EINVAL;
    if (n == 0) return BLOB_OK;
    attention_job job;
    memset(&job, 0, sizeof job);
    job.a = a;
    job.ops = blob_ops();
    job.q = q;
    job.out = out;
    job.n = n;
    job.p0 = p0;
    job.scratch_stride = (p0 + n + 15) & ~(size_t)15;   /* 64-byte rows: no false sharing */

    blob_call_lock();
    job.scratch = (float *)blob_workspace((size_t)blob_threads_get() * job.scratch_stride * sizeof(float));
    int status = job.scratch ? BLOB_OK : BLOB_ENOMEM;
    if (status == BLOB_OK) blob_pool_run(attention_task, &job);
    blob_call_unlock();
    return status;
}

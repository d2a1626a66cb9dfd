/* The small per-token ops, plain C on the calling thread: a decode step spends its time in the
 * matrix products. The gated activation, whose exp would cost as much as all of these, RMSNorm,
 * which a Gemma prompt runs six times a layer, and softmax, which the vision encoder runs over
 * millions of scores, run on the instruction-set path (blob_isa_ops). LayerNorm, the vision encoder's, is plain C: vision.c shares its rows out
 * over the threads. */
#include "kernels_impl.h"

void blob_rms_norm(const float *x, const float *w, size_t n, size_t d, float eps, float offset,
                   float *out) {
    const blob_isa_ops *ops = blob_ops();
    for (size_t i = 0; i < n; i++) ops->rms_norm_row(x + i * d, w, d, eps, offset, out + i * d);
}

/* Two passes, both in double: the mean, then the variance around it (one pass of sum and sum of
 * squares loses the variance of large-offset rows to cancellation). */
void blob_layer_norm(const float *x, const float *w, const float *b, size_t n, size_t d, float eps, float *out) {
    for (size_t i = 0; i < n; i++) {
        const float *row = x + i * d;
        double total = 0.0, squares = 0.0;
        for (size_t k = 0; k < d; k++) total += row[k];
        const double mean = total / (double)d;
        for (size_t k = 0; k < d; k++) squares += ((double)row[k] - mean) * ((double)row[k] - mean);
        const double inv_std = 1.0 / sqrt(squares / (double)d + (double)eps);
        /* centred in double too: a float mean of large values is off by their ulp */
        for (size_t k = 0; k < d; k++) out[i * d + k] = (float)(((double)row[k] - mean) * inv_std) * w[k] + b[k];
    }
}

void blob_rope_angles(const int64_t *positions, size_t n, const float *inv_freq, size_t n_freq, float scale,
                      float *cos_sin) {
    for (size_t i = 0; i < n; i++) {
        for (size_t j = 0; j < n_freq; j++) {
            /* the angle rounded to f32 first, as HF computes position * inv_freq in f32; HF scales
             * its f32 cos and sin, so the scale multiplies them after rounding */
            const float angle = (float)positions[i] * inv_freq[j];
            cos_sin[(i * n_freq + j) * 2] = (float)cos((double)angle) * scale;
            cos_sin[(i * n_freq + j) * 2 + 1] = (float)sin((double)angle) * scale;
        }
    }
}

void blob_rope(float *x, size_t n, size_t n_heads, size_t head_dim, const float *cos_sin, size_t n_freq) {
    for (size_t i = 0; i < n; i++) {
        for (size_t h = 0; h < n_heads; h++) {
            float *head = x + (i * n_heads + h) * head_dim;
            for (size_t j = 0; j < n_freq; j++) {
                const float c = cos_sin[(i * n_freq + j) * 2], s = cos_sin[(i * n_freq + j) * 2 + 1];
                const float x1 = head[j], x2 = head[j + n_freq];
                head[j] = x1 * c - x2 * s;
                head[j + n_freq] = x2 * c + x1 * s;
            }
        }
    }
}

void blob_gated_act(const float *gate, const float *up, size_t count, int act, float *out) {
    blob_ops()->gated_act(gate, up, count, act, out);
}

void blob_softmax(float *x, size_t n, size_t d) {
    const blob_isa_ops *ops = blob_ops();
    for (size_t i = 0; i < n; i++) ops->softmax_row(x + i * d, d, 1.0f);
}

void blob_softcap(const float *x, size_t count, float cap, float *out) {
    for (size_t k = 0; k < count; k++) out[k] = cap * tanhf(x[k] / cap);
}

void blob_add(const float *a, const float *b, size_t count, float *out) {
    for (size_t k = 0; k < count; k++) out[k] = a[k] + b[k];
}

/* One row of W as f32: value = weight for plain dtypes, level * block scale for q8_0 / q4_0
 * (in either layout), ggml's dequantization for q4_1 .. q6_k (blob_block32_value; q5_0 in
 * either layout). */
static void dequantize_row(const blob_matrix *w, size_t r, float *out) {
    const uint8_t *row = (const uint8_t *)w->plane[0] + r * w->row_stride_bytes;
    if (blob_is_block32_type(w->dtype)) {
        const uint8_t *planes[BLOB_MAX_PLANES];
        blob_row_planes(w, r, planes);
        for (size_t b = 0; b < w->cols / BLOB_QBLOCK; b++) {
            blob_block32 block;
            if (w->layout == BLOB_LAYOUT_INTERLEAVE8) blob_interleave8_block32(w, r, b, &block);
            else blob_decode_block32(w->dtype, planes, b, &block);
            for (int i = 0; i < BLOB_QBLOCK; i++) out[b * BLOB_QBLOCK + i] = blob_block32_value(&block, i);
        }
    } else if (w->layout == BLOB_LAYOUT_INTERLEAVE8) {
        for (size_t b = 0; b * BLOB_QBLOCK < w->cols; b++) {
            const float scale = blob_interleave8_scale(w, r, b);
            for (size_t k = b * BLOB_QBLOCK; k < blob_min(w->cols, (b + 1) * BLOB_QBLOCK); k++)
                out[k] = (float)blob_interleave8_level(w, r, k) * scale;
        }
    } else if (w->dtype == BLOB_Q8_0 || w->dtype == BLOB_Q4_0) {
        const uint16_t *scales = (const uint16_t *)w->plane[1] + r * blob_div_up(w->cols, BLOB_QBLOCK);
        for (size_t k = 0; k < w->cols; k++)
            out[k] = (float)blob_weight_level(row, k, w->dtype) * blob_f16_to_f32(scales[k / BLOB_QBLOCK]);
    } else {
        for (size_t k = 0; k < w->cols; k++) out[k] = blob_weight_f32(row, k, w->dtype);
    }
}

void blob_embed(const blob_matrix *w, const int64_t *ids, size_t n, float *out) {
    for (size_t i = 0; i < n; i++) dequantize_row(w, (size_t)ids[i], out + i * w->cols);
}

/* ---- read bandwidth probe: threads sum 1 MiB chunks with the current path's read_sum ---- */

#define PROBE_CHUNK_BYTES ((size_t)1 << 20)

typedef struct {
    const uint8_t *data;
    size_t nbytes;
    uint64_t (*read_sum)(const void *, size_t);
    volatile size_t next;
    uint64_t sums[BLOB_MAX_THREADS];
} read_job;

static void read_task(void *ctx, int ith, int nth) {
    read_job *j = (read_job *)ctx;
    uint64_t total = 0;
    (void)nth;
    for (size_t chunk; (chunk = blob_next_item(&j->next)) * PROBE_CHUNK_BYTES < j->nbytes;) {
        size_t begin = chunk * PROBE_CHUNK_BYTES;
        total += j->read_sum(j->data + begin, blob_min(PROBE_CHUNK_BYTES, j->nbytes - begin));
    }
    j->sums[ith] = total;
}

double blob_read_bandwidth_probe(const void *data, size_t nbytes) {
    static read_job job;  /* guarded by the call lock; too big for a worker's stack */
    const blob_isa_ops *ops = blob_ops();
    blob_call_lock();
    memset(&job, 0, sizeof job);
    job.data = (const uint8_t *)data;
    job.nbytes = nbytes;
    job.read_sum = ops->read_sum;
    blob_pool_run(read_task, &job);
    double checksum = 0.0;
    for (int i = 0; i < BLOB_MAX_THREADS; i++) checksum += (double)job.sums[i];
    blob_call_unlock();
    return checksum;
}

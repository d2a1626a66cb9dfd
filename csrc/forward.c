/* The transformer's forward pass: one decoder block, written once and varied only by the model
 * description (blob_model, blob_layer), run over every layer without returning to Python. A
 * decode step is a few hundred kernel calls microseconds apart; issuing them from here keeps
 * the time between them at nanoseconds. */
#include <stdlib.h>

#include "kernels_impl.h"

/* The activations of one call: n tokens of every intermediate the block needs. */
typedef struct {
    float *x;        /* (n, hidden) the residual stream */
    float *h;        /* (n, hidden) normed input of a sub-block */
    float *sub;      /* (n, hidden) output of a sub-block before the residual add */
    float *q, *att;  /* (n, n_heads * head_dim) */
    float *k, *v;    /* (n, n_kv_heads * head_dim) */
    float *gate, *up; /* (n, ffn) */
    int64_t *positions;
} activations;

static float *carve(float **cursor, size_t count) {
    float *p = *cursor;
    *cursor += (count + 15) & ~(size_t)15;   /* each buffer starts on a 64-byte boundary */
    return p;
}

static void *alloc_activations(const blob_model *m, size_t n, activations *a) {
    const size_t q_width = m->n_heads * m->head_dim, kv_width = m->n_kv_heads * m->head_dim;
    const size_t floats = n * (3 * m->hidden + 2 * q_width + 2 * kv_width + 2 * m->ffn) + 9 * 16;
    float *block = (float *)malloc(floats * sizeof(float) + n * sizeof(int64_t) + 64);
    if (!block) return NULL;
    float *cursor = (float *)(((uintptr_t)block + 63) & ~(uintptr_t)63);
    a->x = carve(&cursor, n * m->hidden);
    a->h = carve(&cursor, n * m->hidden);
    a->sub = carve(&cursor, n * m->hidden);
    a->q = carve(&cursor, n * q_width);
    a->att = carve(&cursor, n * q_width);
    a->k = carve(&cursor, n * kv_width);
    a->v = carve(&cursor, n * kv_width);
    a->gate = carve(&cursor, n * m->ffn);
    a->up = carve(&cursor, n * m->ffn);
    a->positions = (int64_t *)cursor;
    return block;
}

static void norm(const blob_model *m, const float *x, const float *w, size_t rows, size_t d, float *out) {
    blob_rms_norm(x, w, rows, d, m->rms_eps, m->norm_offset, out);
}

/* Y_i (n, w_i.rows) = X @ W_i.T for matrices reading the same X: one kernel job when they share
 * a dtype (X quantized once, the thread pool woken once), else one job each. */
static int project(const blob_matrix *const *w, float *const *y, size_t count, const float *x, size_t n) {
    size_t y_stride[BLOB_MAX_GROUP];
    int same_dtype = 1;
    for (size_t i = 0; i < count; i++) {
        y_stride[i] = w[i]->rows;
        same_dtype &= w[i]->dtype == w[0]->dtype;
    }
    if (same_dtype) return blob_matmul_group(w, y, y_stride, count, x, w[0]->cols, n);
    for (size_t i = 0; i < count; i++) {
        int status = blob_matmul(w[i], x, w[i]->cols, n, y[i], y_stride[i]);
        if (status != BLOB_OK) return status;
    }
    return BLOB_OK;
}

static int project1(const blob_matrix *w, const float *x, size_t n, float *y) {
    return project(&w, &y, 1, x, n);
}

static void add_bias(float *y, const float *bias, size_t n, size_t width) {
    if (!bias) return;
    for (size_t i = 0; i < n; i++)
        for (size_t r = 0; r < width; r++) y[i * width + r] += bias[r];
}

/* Keys and values of positions start..start+n-1 into layer `layer` of the cache. */
static void store_kv(const blob_model *m, const blob_kv_cache *c, size_t layer, size_t start, size_t n,
                     const float *k, const float *v) {
    const size_t width = m->n_kv_heads * m->head_dim;
    const size_t offset = (layer * c->max_seq + start) * width;
    if (c->dtype == BLOB_F16) {
        uint16_t *kc = (uint16_t *)c->k + offset, *vc = (uint16_t *)c->v + offset;
        for (size_t e = 0; e < n * width; e++) {
            kc[e] = blob_f32_to_f16(k[e]);
            vc[e] = blob_f32_to_f16(v[e]);
        }
    } else {
        memcpy((float *)c->k + offset, k, n * width * sizeof(float));
        memcpy((float *)c->v + offset, v, n * width * sizeof(float));
    }
}

static int attention_block(const blob_model *m, const blob_kv_cache *c, size_t i, activations *a,
                           size_t n, size_t start) {
    const blob_layer *l = &m->layers[i];
    const size_t hd = m->head_dim;
    int status;
    norm(m, a->x, l->attn_norm, n, m->hidden, a->h);
    const blob_matrix *qkv[3] = {&l->q, &l->k, &l->v};
    float *qkv_out[3] = {a->q, a->k, a->v};
    if ((status = project(qkv, qkv_out, 3, a->h, n)) != BLOB_OK) return status;
    add_bias(a->q, l->q_bias, n, l->q.rows);
    add_bias(a->k, l->k_bias, n, l->k.rows);
    add_bias(a->v, l->v_bias, n, l->v.rows);
    if (l->q_norm) {
        norm(m, a->q, l->q_norm, n * m->n_heads, hd, a->q);
        norm(m, a->k, l->k_norm, n * m->n_kv_heads, hd, a->k);
    }
    blob_rope(a->q, n, m->n_heads, hd, a->positions, l->inv_freq, l->n_freq);
    blob_rope(a->k, n, m->n_kv_heads, hd, a->positions, l->inv_freq, l->n_freq);
    store_kv(m, c, i, start, n, a->k, a->v);

    const size_t es = blob_cache_elem_size(c->dtype), width = m->n_kv_heads * hd;
    const size_t layer_offset = i * c->max_seq * width * es;
    const blob_attention at = {m->n_heads, m->n_kv_heads, hd, c->dtype,
                               (const uint8_t *)c->k + layer_offset, (const uint8_t *)c->v + layer_offset,
                               width, hd, width, hd, m->attn_scale, m->attn_softcap, l->window};
    if ((status = blob_attention_run(&at, a->q, n, start, a->att)) != BLOB_OK) return status;
    if ((status = project1(&l->o, a->att, n, a->sub)) != BLOB_OK) return status;
    add_bias(a->sub, l->o_bias, n, m->hidden);
    if (l->post_attn_norm) norm(m, a->sub, l->post_attn_norm, n, m->hidden, a->sub);
    blob_add(a->x, a->sub, n * m->hidden, a->x);
    return BLOB_OK;
}

static int mlp_block(const blob_model *m, const blob_layer *l, activations *a, size_t n) {
    int status;
    norm(m, a->x, l->ffn_norm, n, m->hidden, a->h);
    const blob_matrix *gate_up[2] = {&l->gate, &l->up};
    float *gate_up_out[2] = {a->gate, a->up};
    if ((status = project(gate_up, gate_up_out, 2, a->h, n)) != BLOB_OK) return status;
    blob_gated_act(a->gate, a->up, n * m->ffn, m->activation, a->gate);
    if ((status = project1(&l->down, a->gate, n, a->sub)) != BLOB_OK) return status;
    if (l->post_ffn_norm) norm(m, a->sub, l->post_ffn_norm, n, m->hidden, a->sub);
    blob_add(a->x, a->sub, n * m->hidden, a->x);
    return BLOB_OK;
}

/* Final norm, output head and soft-capping of the last `rows` tokens. */
static int head(const blob_model *m, activations *a, size_t n, size_t rows, float *logits) {
    if (rows == 0) return BLOB_OK;
    const float *last = a->x + (n - rows) * m->hidden;
    norm(m, last, m->final_norm, rows, m->hidden, a->h);
    int status = project1(&m->lm_head, a->h, rows, logits);
    if (status == BLOB_OK && m->final_softcap > 0.0f)
        blob_softcap(logits, rows * m->lm_head.rows, m->final_softcap, logits);
    return status;
}

int blob_forward(const blob_model *m, const blob_kv_cache *cache, const int64_t *ids, size_t n,
                 size_t start, size_t logit_rows, float *logits) {
    if (n == 0) return BLOB_OK;
    if (logit_rows > n) return BLOB_EINVAL;
    if (start + n > cache->max_seq || (cache->dtype != BLOB_F32 && cache->dtype != BLOB_F16)) return BLOB_EINVAL;
    activations a;
    void *block = alloc_activations(m, n, &a);
    if (!block) return BLOB_ENOMEM;
    for (size_t i = 0; i < n; i++) a.positions[i] = (int64_t)(start + i);
    blob_embed(&m->embed, ids, n, a.x);
    if (m->embedding_scale != 1.0f)
        for (size_t e = 0; e < n * m->hidden; e++) a.x[e] *= m->embedding_scale;
    int status = BLOB_OK;
    for (size_t i = 0; i < m->n_layers && status == BLOB_OK; i++) {
        status = attention_block(m, cache, i, &a, n, start);
        if (status == BLOB_OK) status = mlp_block(m, &m->layers[i], &a, n);
    }
    if (status == BLOB_OK) status = head(m, &a, n, logit_rows, logits);
    free(block);
    return status;
}

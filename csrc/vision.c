/* SigLIP's encoder and Gemma 3's projector (blob_vision_model in kernels.h): the second block
 * kind beside forward.c's decoder. One image is one bidirectional sequence of grid^2 patches,
 * run through every layer without returning to Python. Every product, attention's included, is
 * blob_matmul; the row-wise ops (LayerNorm, biases, GELU, softmax), which over thousands of
 * patches cost too much for the calling thread alone, are shared out over the pool here. */
#include "kernels_impl.h"

/* Query rows per block of attention scores: (256, 4096) floats on a real tower, 4 MiB, which
 * stays in the last-level cache between the two products. */
#define QUERY_BLOCK 256

/* One image's activations. */
typedef struct {
    float *patches;        /* (n_patches, channels * patch_size^2) the image's pixels, unfolded */
    float *x;              /* (n_patches, hidden) the residual stream */
    float *h;              /* (n_patches, hidden) a sub-block's normed input, then its output */
    float *q, *k, *v;      /* (n_patches, hidden) each, head after head within a row */
    float *values_t;       /* (hidden, n_patches) v transposed: head h's values are rows h*head_dim .. */
    float *scores;         /* (QUERY_BLOCK, n_patches) one head's scores of a block of queries */
    float *att;            /* (n_patches, hidden) attention's output */
    float *mlp;            /* (n_patches, ffn) */
    float *ones;           /* (ffn,) the gated kernel's `up`: GELU(g) = act(g) * 1, exactly */
    float *pooled;         /* (tokens_per_side^2, hidden) */
    int64_t *ids;          /* (n_patches,) 0 .. n_patches-1: the position rows to read */
} vision_activations;

/* patches per side; 0 for a patch size of 0, which valid_model rejects (the scratch size is asked first) */
static size_t grid_of(const blob_vision_model *m) { return m->patch_size ? m->image_size / m->patch_size : 0; }

static size_t patch_width(const blob_vision_model *m) { return m->channels * m->patch_size * m->patch_size; }

static size_t padded(size_t count) { return (count + 15) & ~(size_t)15; }   /* floats, to 64 bytes */

size_t blob_vision_scratch_bytes(const blob_vision_model *m) {
    const size_t n = grid_of(m) * grid_of(m), tokens = m->tokens_per_side * m->tokens_per_side;
    const size_t floats = padded(n * patch_width(m)) + 7 * padded(n * m->hidden) + padded(QUERY_BLOCK * n) +
                          padded(n * m->ffn) + padded(m->ffn) + padded(tokens * m->hidden);
    return floats * sizeof(float) + n * sizeof(int64_t) + 64;
}

static float *carve(float **cursor, size_t count) {
    float *p = *cursor;
    *cursor += padded(count);
    return p;
}

static void carve_activations(const blob_vision_model *m, void *scratch, vision_activations *a) {
    const size_t n = grid_of(m) * grid_of(m), tokens = m->tokens_per_side * m->tokens_per_side;
    float *cursor = (float *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    a->patches = carve(&cursor, n * patch_width(m));
    a->x = carve(&cursor, n * m->hidden);
    a->h = carve(&cursor, n * m->hidden);
    a->q = carve(&cursor, n * m->hidden);
    a->k = carve(&cursor, n * m->hidden);
    a->v = carve(&cursor, n * m->hidden);
    a->values_t = carve(&cursor, m->hidden * n);
    a->scores = carve(&cursor, QUERY_BLOCK * n);
    a->att = carve(&cursor, n * m->hidden);
    a->mlp = carve(&cursor, n * m->ffn);
    a->ones = carve(&cursor, m->ffn);
    a->pooled = carve(&cursor, tokens * m->hidden);
    a->ids = (int64_t *)cursor;
    for (size_t f = 0; f < m->ffn; f++) a->ones[f] = 1.0f;
    for (size_t i = 0; i < n; i++) a->ids[i] = (int64_t)i;
}

/* ---- row-wise ops over the thread pool ---- */

typedef enum {
    ROW_LAYER_NORM,      /* out = LayerNorm(x) with weight w, bias b */
    ROW_BIAS,            /* out += b */
    ROW_BIAS_GELU,       /* out = GELU(out + b) */
    ROW_BIAS_RESIDUAL,   /* out += x + b: a sub-block's output x, with its bias, onto the residual out */
    ROW_SCALED_SOFTMAX   /* out = softmax(out * scale) */
} row_op;

typedef struct {
    row_op op;
    const float *x, *w, *b, *ones;
    float *out;
    size_t rows, d;
    float eps, scale;
    volatile size_t next;
} rows_job;

static void run_row(const rows_job *j, size_t i) {
    float *out = j->out + i * j->d;
    const float *x = j->x ? j->x + i * j->d : NULL;
    switch (j->op) {
    case ROW_LAYER_NORM:
        blob_layer_norm(x, j->w, j->b, 1, j->d, j->eps, out);
        break;
    case ROW_BIAS:
        for (size_t k = 0; k < j->d; k++) out[k] += j->b[k];
        break;
    case ROW_BIAS_GELU:
        for (size_t k = 0; k < j->d; k++) out[k] += j->b[k];
        blob_gated_act(out, j->ones, j->d, BLOB_ACT_GELU_TANH, out);
        break;
    case ROW_BIAS_RESIDUAL:
        /* as torch adds them: the linear layer's bias first, then the residual */
        for (size_t k = 0; k < j->d; k++) out[k] += x[k] + j->b[k];
        break;
    case ROW_SCALED_SOFTMAX:
        blob_ops()->softmax_row(out, j->d, j->scale);
        break;
    }
}

static void rows_task(void *ctx, int ith, int nth) {
    rows_job *j = (rows_job *)ctx;
    (void)ith, (void)nth;
    for (size_t i; (i = blob_next_item(&j->next)) < j->rows;) run_row(j, i);
}

static void run_rows(row_op op, const float *x, const float *w, const float *b, const vision_activations *a,
                     float *out, size_t rows, size_t d, float eps, float scale) {
    rows_job job = {op, x, w, b, a->ones, out, rows, d, eps, scale, 0};
    blob_call_lock();
    blob_pool_run(rows_task, &job);
    blob_call_unlock();
}

/* ---- the blocks ---- */

/* Y (n, w.rows) = X (n, w.cols) @ W.T, then + bias per row. */
static int linear(const blob_matrix *w, const float *bias, const float *x, size_t n, const vision_activations *a,
                  float *y) {
    int status = blob_matmul(w, x, w->cols, n, y, w->rows);
    if (status == BLOB_OK) run_rows(ROW_BIAS, NULL, NULL, bias, a, y, n, w->rows, 0.0f, 0.0f);
    return status;
}

/* PIXELS (channels, image_size, image_size) -> patches (grid^2, channels * patch^2), each row
 * a patch's pixels in the convolution weight's (channel, y, x) order. */
static void unfold(const blob_vision_model *m, const float *pixels, float *patches) {
    const size_t grid = grid_of(m), p = m->patch_size, side = m->image_size;
    for (size_t py = 0; py < grid; py++)
        for (size_t px = 0; px < grid; px++) {
            float *row = patches + (py * grid + px) * patch_width(m);
            for (size_t c = 0; c < m->channels; c++)
                for (size_t y = 0; y < p; y++)
                    memcpy(row + (c * p + y) * p, pixels + (c * side + py * p + y) * side + px * p, p * sizeof(float));
        }
}

/* x = (patches @ patch.T + patch_bias) + position rows */
static int embed_patches(const blob_vision_model *m, const float *pixels, vision_activations *a, size_t n) {
    unfold(m, pixels, a->patches);
    int status = blob_matmul(&m->patch, a->patches, patch_width(m), n, a->h, m->hidden);
    if (status != BLOB_OK) return status;
    blob_embed(&m->position, a->ids, n, a->x);
    run_rows(ROW_BIAS_RESIDUAL, a->h, NULL, m->patch_bias, a, a->x, n, m->hidden, 0.0f, 0.0f);
    return BLOB_OK;
}

/* att = softmax(Q_h K_h.T / sqrt(head_dim)) V_h for every head h (columns h*head_dim .. of q, k, v
 * and att), every patch seeing every patch, as two matrix products per block of queries: a head's
 * keys are an f32 matrix (n, head_dim) read in place, its values, transposed once for all heads,
 * a matrix (head_dim, n). The tiled products run 2-3x faster than attention.c's per-query kernel,
 * made for a decoder's few queries against a cache (measured at 4096 patches). */
static int attend(const blob_vision_model *m, vision_activations *a, size_t n) {
    const size_t D = m->hidden, hd = m->head_dim;
    for (size_t i = 0; i < n; i++)
        for (size_t c = 0; c < D; c++) a->values_t[c * n + i] = a->v[i * D + c];
    for (size_t h = 0; h < m->n_heads; h++) {
        const blob_matrix keys = {.dtype = BLOB_F32, .plane = {a->k + h * hd}, .row_stride_bytes = D * sizeof(float),
                                  .rows = n, .cols = hd};
        const blob_matrix values = {.dtype = BLOB_F32, .plane = {a->values_t + h * hd * n},
                                    .row_stride_bytes = n * sizeof(float), .rows = hd, .cols = n};
        for (size_t q0 = 0; q0 < n; q0 += QUERY_BLOCK) {
            const size_t rows = blob_min(QUERY_BLOCK, n - q0);
            int status = blob_matmul(&keys, a->q + q0 * D + h * hd, D, rows, a->scores, n);
            if (status != BLOB_OK) return status;
            run_rows(ROW_SCALED_SOFTMAX, NULL, NULL, NULL, a, a->scores, rows, n, 0.0f, 1.0f / sqrtf((float)hd));
            if ((status = blob_matmul(&values, a->scores, n, rows, a->att + q0 * D + h * hd, D)) != BLOB_OK)
                return status;
        }
    }
    return BLOB_OK;
}

static int attention_block(const blob_vision_model *m, const blob_vision_layer *l, vision_activations *a, size_t n) {
    const size_t D = m->hidden;
    run_rows(ROW_LAYER_NORM, a->x, l->norm1, l->norm1_bias, a, a->h, n, D, m->norm_eps, 0.0f);
    int status = linear(&l->q, l->q_bias, a->h, n, a, a->q);
    if (status == BLOB_OK) status = linear(&l->k, l->k_bias, a->h, n, a, a->k);
    if (status == BLOB_OK) status = linear(&l->v, l->v_bias, a->h, n, a, a->v);
    if (status == BLOB_OK) status = attend(m, a, n);
    if (status == BLOB_OK) status = blob_matmul(&l->o, a->att, D, n, a->h, D);
    if (status == BLOB_OK) run_rows(ROW_BIAS_RESIDUAL, a->h, NULL, l->o_bias, a, a->x, n, D, 0.0f, 0.0f);
    return status;
}

static int mlp_block(const blob_vision_model *m, const blob_vision_layer *l, vision_activations *a, size_t n) {
    const size_t D = m->hidden;
    run_rows(ROW_LAYER_NORM, a->x, l->norm2, l->norm2_bias, a, a->h, n, D, m->norm_eps, 0.0f);
    int status = blob_matmul(&l->fc1, a->h, D, n, a->mlp, m->ffn);
    if (status != BLOB_OK) return status;
    run_rows(ROW_BIAS_GELU, NULL, NULL, l->fc1_bias, a, a->mlp, n, m->ffn, 0.0f, 0.0f);
    if ((status = blob_matmul(&l->fc2, a->mlp, m->ffn, n, a->h, D)) != BLOB_OK) return status;
    run_rows(ROW_BIAS_RESIDUAL, a->h, NULL, l->fc2_bias, a, a->x, n, D, 0.0f, 0.0f);
    return BLOB_OK;
}

/* The encoder's output x (grid^2, hidden) -> OUT (tokens_per_side^2, text_hidden): each
 * (grid / tokens_per_side)^2 square of patches averaged, RMSNormed with (1 + w), projected. */
static int project(const blob_vision_model *m, vision_activations *a, float *out) {
    const size_t grid = grid_of(m), side = m->tokens_per_side, kernel = grid / side, D = m->hidden;
    const float inv_count = 1.0f / (float)(kernel * kernel);
    for (size_t ty = 0; ty < side; ty++)
        for (size_t tx = 0; tx < side; tx++) {
            float *token = a->pooled + (ty * side + tx) * D;
            memset(token, 0, D * sizeof(float));
            for (size_t dy = 0; dy < kernel; dy++)
                for (size_t dx = 0; dx < kernel; dx++) {
                    const float *patch = a->x + ((ty * kernel + dy) * grid + tx * kernel + dx) * D;
                    for (size_t k = 0; k < D; k++) token[k] += patch[k];
                }
            for (size_t k = 0; k < D; k++) token[k] *= inv_count;
        }
    blob_rms_norm(a->pooled, m->projection_norm, side * side, D, m->norm_eps, 1.0f, a->pooled);
    return blob_matmul(&m->projection, a->pooled, D, side * side, out, m->projection.rows);
}

static int encode_image(const blob_vision_model *m, const float *pixels, vision_activations *a, float *out) {
    const size_t n = grid_of(m) * grid_of(m);
    int status = embed_patches(m, pixels, a, n);
    for (size_t i = 0; i < m->n_layers && status == BLOB_OK; i++) {
        status = attention_block(m, &m->layers[i], a, n);
        if (status == BLOB_OK) status = mlp_block(m, &m->layers[i], a, n);
    }
    if (status != BLOB_OK) return status;
    run_rows(ROW_LAYER_NORM, a->x, m->post_norm, m->post_norm_bias, a, a->x, n, m->hidden, m->norm_eps, 0.0f);
    return project(m, a, out);
}

static int sized(const blob_matrix *w, size_t rows, size_t cols) { return w->rows == rows && w->cols == cols; }

static int valid_model(const blob_vision_model *m) {
    const size_t D = m->hidden, F = m->ffn;
    if (m->patch_size == 0 || m->tokens_per_side == 0 || m->n_heads * m->head_dim != D || D == 0) return 0;
    const size_t grid = grid_of(m);
    if (grid == 0 || grid % m->tokens_per_side) return 0;
    if (!sized(&m->patch, D, patch_width(m)) || !sized(&m->position, grid * grid, D) || m->projection.cols != D)
        return 0;
    for (size_t i = 0; i < m->n_layers; i++) {
        const blob_vision_layer *l = &m->layers[i];
        if (!sized(&l->q, D, D) || !sized(&l->k, D, D) || !sized(&l->v, D, D) || !sized(&l->o, D, D) ||
            !sized(&l->fc1, F, D) || !sized(&l->fc2, D, F))
            return 0;
    }
    return 1;
}

int blob_vision_encode(const blob_vision_model *m, const float *pixels, size_t n_images, float *out, void *scratch) {
    if (!valid_model(m)) return BLOB_EINVAL;
    vision_activations a;
    carve_activations(m, scratch, &a);
    const size_t image_floats = m->channels * m->image_size * m->image_size;
    const size_t out_floats = m->tokens_per_side * m->tokens_per_side * m->projection.rows;
    for (size_t i = 0; i < n_images; i++) {
        int status = encode_image(m, pixels + i * image_floats, &a, out + i * out_floats);
        if (status != BLOB_OK) return status;
    }
    return BLOB_OK;
}

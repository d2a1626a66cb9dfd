/* The transformer's forward pass: one decoder block, written once and varied only by the model
 * description (blob_model, blob_layer), run over every layer without returning to Python. A
 * decode step is a few hundred kernel calls microseconds apart; issuing them from here keeps
 * the time between them at nanoseconds. */
#include "kernels_impl.h"

/* The activations of one call: n tokens of every intermediate the block needs, and where each
 * token's sequence lives. */
typedef struct {
    float *x;        /* (n, hidden) the residual stream */
    float *h;        /* (n, hidden) normed input of a sub-block */
    float *sub;      /* (n, hidden) output of a sub-block before the residual add */
    float *q, *att;  /* (n, n_heads * head_dim) */
    float *k, *v;    /* (n, n_kv_heads * head_dim) */
    float *gate, *up; /* (n, ffn) */
    float *rope;     /* (n, head_dim / 2, 2) cosines and sines of the positions' rotary angles */
    const float *rope_inv_freq;   /* the frequencies `rope` holds the angles of (NULL: none yet) */
    size_t rope_n_freq;
    float rope_scale;             /* and the scale they carry */
    int64_t *positions;           /* (n,) each token's position in its sequence */
    const blob_sequence *seqs;    /* the call's sequences, their tokens in order: n_seqs of them */
    size_t n_seqs;
    blob_attention *views;        /* (n_seqs,) attention over each sequence's cache, one layer at a time */
    size_t *seq_n, *seq_start;    /* (n_seqs,) each sequence's token count and first position */
    size_t *run_segments, n_run_segments;       /* the rows of each product's calls (row_segments) */
    size_t *logit_segments, n_logit_segments;   /* the same for the head's rows */
} activations;

static float *carve(float **cursor, size_t count) {
    float *p = *cursor;
    *cursor += (count + 15) & ~(size_t)15;   /* each buffer starts on a 64-byte boundary */
    return p;
}

static size_t activation_floats(const blob_model *m, size_t n) {
    const size_t q_width = m->n_heads * m->head_dim, kv_width = m->n_kv_heads * m->head_dim;
    return n * (3 * m->hidden + 2 * q_width + 2 * kv_width + 2 * m->ffn + m->head_dim) + 10 * 16;
}

/* Past the floats: positions, then per sequence (at most one per token) its attention view,
 * token count and start, and at most one segment of rows in each of the two segment lists. */
static size_t sequence_bytes(size_t n) {
    return n * (sizeof(int64_t) + sizeof(blob_attention) + 4 * sizeof(size_t));
}

size_t blob_forward_scratch_bytes(const blob_model *m, size_t n) {
    return activation_floats(m, n) * sizeof(float) + sequence_bytes(n) + 64;
}

static void carve_activations(const blob_model *m, size_t n, void *scratch, activations *a) {
    const size_t q_width = m->n_heads * m->head_dim, kv_width = m->n_kv_heads * m->head_dim;
    float *cursor = (float *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    a->x = carve(&cursor, n * m->hidden);
    a->h = carve(&cursor, n * m->hidden);
    a->sub = carve(&cursor, n * m->hidden);
    a->q = carve(&cursor, n * q_width);
    a->att = carve(&cursor, n * q_width);
    a->k = carve(&cursor, n * kv_width);
    a->v = carve(&cursor, n * kv_width);
    a->gate = carve(&cursor, n * m->ffn);
    a->up = carve(&cursor, n * m->ffn);
    a->rope = carve(&cursor, n * m->head_dim);
    a->rope_inv_freq = NULL;
    a->rope_n_freq = 0;
    a->rope_scale = 0.0f;
    a->positions = (int64_t *)cursor;
    a->views = (blob_attention *)(a->positions + n);
    a->seq_n = (size_t *)(a->views + n);
    a->seq_start = a->seq_n + n;
    a->run_segments = a->seq_start + n;
    a->logit_segments = a->run_segments + n;
}

/* ---- row-wise ops, split over the thread pool for a prompt chunk ---- */

typedef enum { NORM_ROWS, GATED_ACT_ROWS } row_op;

typedef struct {
    const blob_model *m;
    row_op op;
    const float *x, *w;   /* NORM_ROWS: rows x, weight w; GATED_ACT_ROWS: gates x, ups w */
    float *out;
    size_t rows, d;
    volatile size_t next;
} rows_job;

static void run_row(const rows_job *j, size_t i) {
    const size_t at = i * j->d;
    if (j->op == NORM_ROWS)
        blob_rms_norm(j->x + at, j->w, 1, j->d, j->m->rms_eps, j->m->norm_offset, j->out + at);
    else
        blob_gated_act(j->x + at, j->w + at, j->d, j->m->activation, j->out + at);
}

static void rows_task(void *ctx, int ith, int nth) {
    rows_job *j = (rows_job *)ctx;
    (void)ith, (void)nth;
    for (size_t i; (i = blob_next_item(&j->next)) < j->rows;) run_row(j, i);
}

/* A decode step's rows — one token, or one of each of a few sequences — run on the caller
 * (waking the pool costs more than they do, and on a busy machine a descheduled worker stalls
 * the wake); a prompt chunk's rows are shared out. Every row is computed the same way either way. */
#define ROWS_ON_CALLER_MAX_TOKENS 8
static void run_rows(const blob_model *m, row_op op, const float *x, const float *w, float *out,
                     size_t rows, size_t d, size_t tokens) {
    rows_job job = {m, op, x, w, out, rows, d, 0};
    if (tokens <= ROWS_ON_CALLER_MAX_TOKENS) {
        for (size_t i = 0; i < rows; i++) run_row(&job, i);
        return;
    }
    blob_call_lock();
    blob_pool_run(rows_task, &job);
    blob_call_unlock();
}

/* RMSNorm of `rows` rows of d values, belonging to `tokens` tokens. */
static void norm(const blob_model *m, const float *x, const float *w, size_t rows, size_t d, size_t tokens,
                 float *out) {
    run_rows(m, NORM_ROWS, x, w, out, rows, d, tokens);
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

/* A product picks its tiles by its row count (decode tiles up to BLOB_DECODE_TILES_MAX_TOKENS
 * rows, csrc/matmul.c), and float weights' decode and prefill tiles sum in different orders. So
 * the rows of short runs (a decode step's token, a short prompt) are multiplied apart from those
 * of long ones (prompt chunks), and at most BLOB_DECODE_TILES_MAX_TOKENS at a time: every run's
 * rows then take the tiles its lone call would, and get its numbers. (Past 8 rows the decode
 * tiles in turn cost no more than a prefill tile over all of them: Gemma 3 270M's q8_0 head,
 * 9 .. 16 rows, 2 threads.) SEGMENTS gets the row counts of the products: stretches of
 * consecutive sequences whose `count`s (their tokens, or their logit rows) are all long, or all
 * short and at most BLOB_DECODE_TILES_MAX_TOKENS in all; sequences with none join any stretch.
 * Returns how many. */
static size_t row_segments(const blob_sequence *seqs, size_t n_seqs, int logit_rows, size_t *segments) {
    size_t n_segments = 0;
    int last_short = -1;
    for (size_t s = 0; s < n_seqs; s++) {
        const size_t count = logit_rows ? seqs[s].logit_rows : seqs[s].n;
        const int is_short = count <= BLOB_DECODE_TILES_MAX_TOKENS;
        if (count == 0) continue;
        if (is_short != last_short || (is_short && segments[n_segments - 1] + count > BLOB_DECODE_TILES_MAX_TOKENS))
            segments[n_segments++] = 0;
        segments[n_segments - 1] += count;
        last_short = is_short;
    }
    return n_segments;
}

/* project() over the rows of X segment by segment (row_segments). */
static int project_segments(const blob_matrix *const *w, float *const *y, size_t count, const float *x,
                            const size_t *segments, size_t n_segments) {
    float *y_at[BLOB_MAX_GROUP];
    size_t row = 0;
    for (size_t g = 0; g < n_segments; row += segments[g++]) {
        for (size_t i = 0; i < count; i++) y_at[i] = y[i] + row * w[i]->rows;
        const int status = project(w, y_at, count, x + row * w[0]->cols, segments[g]);
        if (status != BLOB_OK) return status;
    }
    return BLOB_OK;
}

/* The products of a call's token rows. */
static int project_runs(const activations *a, const blob_matrix *const *w, float *const *y, size_t count,
                        const float *x) {
    return project_segments(w, y, count, x, a->run_segments, a->n_run_segments);
}

static int project_runs1(const activations *a, const blob_matrix *w, const float *x, float *y) {
    return project_runs(a, &w, &y, 1, x);
}

static void add_bias(float *y, const float *bias, size_t n, size_t width) {
    if (!bias) return;
    for (size_t i = 0; i < n; i++)
        for (size_t r = 0; r < width; r++) y[i * width + r] += bias[r];
}

/* Keys and values of positions start..start+n-1 into layer `layer` of the cache. */
static void store_kv_rows(const blob_model *m, const blob_kv_cache *c, size_t layer, size_t start, size_t n,
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

/* Each sequence's keys and values (its rows of a->k, a->v) into layer `layer` of its cache. */
static void store_kv(const blob_model *m, const activations *a, size_t layer) {
    const size_t width = m->n_kv_heads * m->head_dim;
    size_t row = 0;
    for (size_t s = 0; s < a->n_seqs; s++) {
        const blob_sequence *q = &a->seqs[s];
        store_kv_rows(m, &q->cache, layer, q->start, q->n, a->k + row * width, a->v + row * width);
        row += q->n;
    }
}

/* Attention of each sequence's queries over layer `layer` of its own cache, in one job. */
static int attend_sequences(const blob_model *m, activations *a, size_t layer) {
    const blob_layer *l = &m->layers[layer];
    const size_t hd = m->head_dim, width = m->n_kv_heads * hd;
    for (size_t s = 0; s < a->n_seqs; s++) {
        const blob_kv_cache *c = &a->seqs[s].cache;
        const size_t layer_offset = layer * c->max_seq * width * blob_cache_elem_size(c->dtype);
        const blob_attention view = {m->n_heads, m->n_kv_heads, hd, c->dtype,
                                     (const uint8_t *)c->k + layer_offset, (const uint8_t *)c->v + layer_offset,
                                     width, hd, width, hd, m->attn_scale, m->attn_softcap, l->window,
                                     a->seqs[s].spans, a->seqs[s].n_spans};
        a->views[s] = view;
        a->seq_n[s] = a->seqs[s].n;
        a->seq_start[s] = a->seqs[s].start;
    }
    return blob_attention_run_batch(a->views, a->n_seqs, a->q, a->seq_n, a->seq_start, a->att);
}

/* Rotary embedding of the layer's queries and keys. The angles are computed when the layer's
 * frequencies differ from the last layer's: once per call for most models, at each switch
 * between local and global layers for Gemma 3 (their cos and sin cost more than the rotation). */
static void rotate(activations *a, const blob_layer *l, size_t n, size_t n_heads, size_t n_kv_heads, size_t hd) {
    if (a->rope_inv_freq != l->inv_freq || a->rope_n_freq != l->n_freq || a->rope_scale != l->rope_scale) {
        blob_rope_angles(a->positions, n, l->inv_freq, l->n_freq, l->rope_scale, a->rope);
        a->rope_inv_freq = l->inv_freq;
        a->rope_n_freq = l->n_freq;
        a->rope_scale = l->rope_scale;
    }
    blob_rope(a->q, n, n_heads, hd, a->rope, l->n_freq);
    blob_rope(a->k, n, n_kv_heads, hd, a->rope, l->n_freq);
}

static int attention_block(const blob_model *m, size_t i, activations *a, size_t n) {
    const blob_layer *l = &m->layers[i];
    const size_t hd = m->head_dim;
    int status;
    norm(m, a->x, l->attn_norm, n, m->hidden, n, a->h);
    const blob_matrix *qkv[3] = {&l->q, &l->k, &l->v};
    float *qkv_out[3] = {a->q, a->k, a->v};
    if ((status = project_runs(a, qkv, qkv_out, 3, a->h)) != BLOB_OK) return status;
    add_bias(a->q, l->q_bias, n, l->q.rows);
    add_bias(a->k, l->k_bias, n, l->k.rows);
    add_bias(a->v, l->v_bias, n, l->v.rows);
    if (l->q_norm) {
        norm(m, a->q, l->q_norm, n * m->n_heads, hd, n, a->q);
        norm(m, a->k, l->k_norm, n * m->n_kv_heads, hd, n, a->k);
    }
    rotate(a, l, n, m->n_heads, m->n_kv_heads, hd);
    store_kv(m, a, i);
    if ((status = attend_sequences(m, a, i)) != BLOB_OK) return status;
    if ((status = project_runs1(a, &l->o, a->att, a->sub)) != BLOB_OK) return status;
    add_bias(a->sub, l->o_bias, n, m->hidden);
    if (l->post_attn_norm) norm(m, a->sub, l->post_attn_norm, n, m->hidden, n, a->sub);
    blob_add(a->x, a->sub, n * m->hidden, a->x);
    return BLOB_OK;
}

static int mlp_block(const blob_model *m, const blob_layer *l, activations *a, size_t n) {
    int status;
    norm(m, a->x, l->ffn_norm, n, m->hidden, n, a->h);
    const blob_matrix *gate_up[2] = {&l->gate, &l->up};
    float *gate_up_out[2] = {a->gate, a->up};
    if ((status = project_runs(a, gate_up, gate_up_out, 2, a->h)) != BLOB_OK) return status;
    run_rows(m, GATED_ACT_ROWS, a->gate, a->up, a->gate, n, m->ffn, n);
    if ((status = project_runs1(a, &l->down, a->gate, a->sub)) != BLOB_OK) return status;
    if (l->post_ffn_norm) norm(m, a->sub, l->post_ffn_norm, n, m->hidden, n, a->sub);
    blob_add(a->x, a->sub, n * m->hidden, a->x);
    return BLOB_OK;
}

/* Final norm, output head and soft-capping of each sequence's last logit_rows tokens: their
 * rows of X normed into H one after another, so that the head reads only them. */
static int head(const blob_model *m, activations *a, float *logits) {
    size_t rows = 0;
    for (size_t s = 0, end = 0; s < a->n_seqs; s++) {
        const size_t count = a->seqs[s].logit_rows;
        end += a->seqs[s].n;
        norm(m, a->x + (end - count) * m->hidden, m->final_norm, count, m->hidden, count, a->h + rows * m->hidden);
        rows += count;
    }
    if (rows == 0) return BLOB_OK;
    const blob_matrix *w = &m->lm_head;
    int status = project_segments(&w, &logits, 1, a->h, a->logit_segments, a->n_logit_segments);
    if (status == BLOB_OK && m->final_softcap > 0.0f)
        blob_softcap(logits, rows * m->lm_head.rows, m->final_softcap, logits);
    return status;
}

/* Spans sorted, disjoint, inside the cache, and each one that overlaps the call's positions
 * wholly inside them (its keys are all written before any of its queries attends). */
static int valid_spans(const blob_sequence *q) {
    const size_t end = q->start + q->n;
    if (q->n_spans > 0 && q->spans == NULL) return 0;
    for (size_t i = 0; i < q->n_spans; i++) {
        const blob_span *span = &q->spans[i];
        if (span->begin >= span->end || span->end > q->cache.max_seq) return 0;
        if (i > 0 && span->begin < q->spans[i - 1].end) return 0;
        const int overlaps = span->begin < end && span->end > q->start;
        if (overlaps && (span->begin < q->start || span->end > end)) return 0;
    }
    return 1;
}

static int valid_sequence(const blob_sequence *q) {
    const blob_kv_cache *c = &q->cache;
    return q->n > 0 && q->logit_rows <= q->n && q->start + q->n <= c->max_seq &&
           (c->dtype == BLOB_F32 || c->dtype == BLOB_F16) && valid_spans(q);
}

/* The embeds of each span inside the call in place of its rows of X (the sequence's n rows). */
static void place_span_embeds(const blob_model *m, const blob_sequence *q, float *x) {
    for (size_t i = 0; i < q->n_spans; i++) {
        const blob_span *span = &q->spans[i];
        if (span->embeds && span->begin >= q->start && span->end <= q->start + q->n)
            memcpy(x + (span->begin - q->start) * m->hidden, span->embeds,
                   (span->end - span->begin) * m->hidden * sizeof(float));
    }
}

int blob_forward_batch(const blob_model *m, const blob_sequence *seqs, size_t n_seqs, const int64_t *ids,
                       float *logits, void *scratch) {
    size_t n = 0;
    for (size_t s = 0; s < n_seqs; s++) {
        if (!valid_sequence(&seqs[s])) return BLOB_EINVAL;
        n += seqs[s].n;
    }
    if (n == 0) return BLOB_OK;
    activations a;
    carve_activations(m, n, scratch, &a);
    a.seqs = seqs;
    a.n_seqs = n_seqs;
    a.n_run_segments = row_segments(seqs, n_seqs, 0, a.run_segments);
    a.n_logit_segments = row_segments(seqs, n_seqs, 1, a.logit_segments);
    for (size_t s = 0, row = 0; s < n_seqs; s++)
        for (size_t i = 0; i < seqs[s].n; i++) a.positions[row++] = (int64_t)(seqs[s].start + i);
    blob_embed(&m->embed, ids, n, a.x);
    if (m->embedding_scale != 1.0f)
        for (size_t e = 0; e < n * m->hidden; e++) a.x[e] *= m->embedding_scale;
    for (size_t s = 0, row = 0; s < n_seqs; row += seqs[s].n, s++)
        place_span_embeds(m, &seqs[s], a.x + row * m->hidden);
    int status = BLOB_OK;
    for (size_t i = 0; i < m->n_layers && status == BLOB_OK; i++) {
        status = attention_block(m, i, &a, n);
        if (status == BLOB_OK) status = mlp_block(m, &m->layers[i], &a, n);
    }
    if (status == BLOB_OK) status = head(m, &a, logits);
    return status;
}

int blob_forward(const blob_model *m, const blob_kv_cache *cache, const int64_t *ids, size_t n,
                 size_t start, size_t logit_rows, float *logits, void *scratch) {
    if (n == 0) return BLOB_OK;
    const blob_sequence one = {*cache, start, n, logit_rows, NULL, 0};
    return blob_forward_batch(m, &one, 1, ids, logits, scratch);
}

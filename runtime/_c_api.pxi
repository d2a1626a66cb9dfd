# Included by _kernels.pyx: the C declarations of csrc/cpu.h and csrc/kernels.h.

cdef extern from "cpu.h" nogil:
    uint32_t blob_cpu_features()
    const char *blob_cpu_arch()


cdef extern from "kernels.h" nogil:
    int BLOB_F32, BLOB_F16, BLOB_MAX_PLANES
    int BLOB_NUM_ISAS, BLOB_OK, BLOB_ENOMEM, BLOB_MAX_THREADS, BLOB_DECODE_TILES_MAX_TOKENS
    int BLOB_ACT_SILU, BLOB_ACT_GELU_TANH

    int BLOB_LAYOUT_ROWS, BLOB_LAYOUT_INTERLEAVE8, BLOB_INTERLEAVE

    ctypedef struct blob_matrix:
        int dtype
        const void *plane[5]     # BLOB_MAX_PLANES, checked at import
        size_t row_stride_bytes
        size_t rows, cols
        int layout

    ctypedef struct blob_span:
        size_t begin, end
        const float *embeds

    ctypedef struct blob_attention:
        size_t n_heads, n_kv_heads, head_dim
        int kv_dtype
        const void *k
        const void *v
        size_t k_pos_stride, k_head_stride, v_pos_stride, v_head_stride
        float scale, softcap
        size_t window
        const blob_span *spans
        size_t n_spans

    ctypedef struct blob_layer:
        blob_matrix q, k, v, o, gate, up, down
        const float *attn_norm
        const float *ffn_norm
        const float *post_attn_norm
        const float *post_ffn_norm
        const float *q_norm
        const float *k_norm
        const float *q_bias
        const float *k_bias
        const float *v_bias
        const float *o_bias
        const float *inv_freq
        size_t n_freq
        float rope_scale
        size_t window

    ctypedef struct blob_model:
        size_t n_layers, hidden, n_heads, n_kv_heads, head_dim, ffn
        float rms_eps, norm_offset, embedding_scale, attn_scale, attn_softcap, final_softcap
        int activation
        blob_matrix embed, lm_head
        const float *final_norm
        const blob_layer *layers

    ctypedef struct blob_kv_cache:
        int dtype
        void *k
        void *v
        size_t max_seq

    ctypedef struct blob_sequence:
        blob_kv_cache cache
        size_t start, n, logit_rows
        const blob_span *spans
        size_t n_spans

    size_t blob_forward_scratch_bytes(const blob_model *m, size_t n)
    int blob_forward_batch(const blob_model *m, const blob_sequence *seqs, size_t n_seqs, const int64_t *ids,
                           float *logits, void *scratch)

    int blob_isa_supported(int isa)
    int blob_isa_best()
    int blob_isa_current()
    int blob_isa_select(int isa)
    const char *blob_isa_name(int isa)
    int blob_isa_int8_dot()
    int blob_threads_get()
    int blob_threads_set(int n)
    void blob_trace_begin(double *at, uint32_t *job, size_t capacity)
    size_t blob_trace_end()
    int blob_matmul(const blob_matrix *w, const float *x, size_t x_stride, size_t n,
                    float *y, size_t y_stride)
    int blob_attention_run(const blob_attention *a, const float *q, size_t n, size_t p0, float *out)
    void blob_rms_norm(const float *x, const float *w, size_t n, size_t d, float eps,
                       float offset, float *out)
    void blob_layer_norm(const float *x, const float *w, const float *b, size_t n, size_t d, float eps,
                         float *out)
    void blob_rope_angles(const int64_t *positions, size_t n, const float *inv_freq, size_t n_freq,
                          float scale, float *cos_sin)
    void blob_rope(float *x, size_t n, size_t n_heads, size_t head_dim, const float *cos_sin, size_t n_freq)
    void blob_gated_act(const float *gate, const float *up, size_t count, int act, float *out)
    void blob_softmax(float *x, size_t n, size_t d)
    void blob_softcap(const float *x, size_t count, float cap, float *out)
    void blob_add(const float *a, const float *b, size_t count, float *out)
    void blob_embed(const blob_matrix *w, const int64_t *ids, size_t n, float *out)
    ctypedef struct blob_vision_layer:
        blob_matrix q, k, v, o, fc1, fc2
        const float *norm1
        const float *norm1_bias
        const float *norm2
        const float *norm2_bias
        const float *q_bias
        const float *k_bias
        const float *v_bias
        const float *o_bias
        const float *fc1_bias
        const float *fc2_bias

    ctypedef struct blob_vision_model:
        size_t n_layers, hidden, n_heads, head_dim, ffn
        size_t channels, image_size, patch_size, tokens_per_side
        float norm_eps
        blob_matrix patch
        const float *patch_bias
        blob_matrix position
        const blob_vision_layer *layers
        const float *post_norm
        const float *post_norm_bias
        const float *projection_norm
        blob_matrix projection

    size_t blob_vision_scratch_bytes(const blob_vision_model *m)
    int blob_vision_encode(const blob_vision_model *m, const float *pixels, size_t n_images, float *out,
                           void *scratch)
    double blob_read_bandwidth_probe(const void *data, size_t nbytes)

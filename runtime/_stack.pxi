# Included by _kernels.pyx: the whole decoder stack bound once for csrc/forward.c.

# ---- the whole forward pass ----

cdef const float *_vector_address(object v, size_t length, str what, list keep, bint optional=False) except? NULL:
    if v is None:
        if optional:
            return NULL
        raise ValueError(f"{what}: missing")
    a = _contiguous(_float_array(v, what, 1), what)
    if <size_t>a.shape[0] != length:
        raise ValueError(f"{what}: expected {length} values, found {a.shape[0]}")
    keep.append(a)
    return <const float *><uintptr_t>_address(a)


cdef blob_matrix _sized(Matrix w, size_t rows, size_t cols, str what, list keep) except *:
    if w.m.rows != rows or w.m.cols != cols:
        raise ValueError(f"{what}: {w!r} must be ({rows}, {cols})")
    keep.append(w)
    return w.m


cdef class DecoderStack:
    """Every layer of a decoder-only transformer, bound for blob_forward (csrc/forward.c): the
    per-token layer loop runs in C with the GIL released.

    `layers` are objects with the weights as attributes: Matrix q, k, v, o, gate, up, down;
    float32 vectors attn_norm, ffn_norm, inv_freq; optional (None) post_attn_norm,
    post_ffn_norm, q_norm, k_norm, q_bias, k_bias, v_bias, o_bias, and inv_freq_long (LongRoPE's
    frequencies for calls reaching past the original context: `run(..., long_rope=True)`);
    float rope_scale (multiplies cos and sin); int window.

    >>> stack = DecoderStack(embed, lm_head, final_norm, layers, n_heads=4, ...)   # doctest: +SKIP
    >>> logits = stack.run(ids, cache_k, cache_v, start=0, logit_rows=1)          # doctest: +SKIP
    >>> rows = stack.run_batch([5, 9], [k0, k1], [v0, v1], positions=[12, 40])  # doctest: +SKIP
    """
    cdef blob_model m
    cdef blob_layer *layers
    cdef list _keep
    cdef object _scratch           # the activations' buffer, grown to the longest chunk run
    cdef object _busy              # one run at a time: runs share the scratch buffer
    cdef list _rope_sets           # per layer: addresses of its (short, long) inverse frequencies
    cdef bint _long_rope           # which of the two the layer table points at
    cdef readonly size_t vocab

    def __cinit__(self):
        self.layers = NULL

    def __dealloc__(self):
        free(self.layers)

    def __init__(self, Matrix embed, Matrix lm_head, final_norm, layers, *, size_t n_heads,
                 size_t n_kv_heads, size_t head_dim, size_t ffn, float rms_eps, float norm_offset,
                 float embedding_scale, float attn_scale, float attn_softcap, float final_softcap,
                 str activation):
        if activation not in _ACTIVATIONS:
            raise ValueError(f"DecoderStack: unknown activation {activation!r}; expected one of {list(_ACTIVATIONS)}")
        if n_kv_heads == 0 or n_heads % n_kv_heads:
            raise ValueError(f"DecoderStack: n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self._keep = []
        self._rope_sets = []
        self._long_rope = False
        self._scratch = np.empty(0, np.uint8)
        self._busy = threading.Lock()
        cdef size_t hidden = embed.m.cols
        self.vocab = embed.m.rows
        self.m.n_layers, self.m.hidden, self.m.ffn = len(layers), hidden, ffn
        self.m.n_heads, self.m.n_kv_heads, self.m.head_dim = n_heads, n_kv_heads, head_dim
        self.m.rms_eps, self.m.norm_offset, self.m.embedding_scale = rms_eps, norm_offset, embedding_scale
        self.m.attn_scale, self.m.attn_softcap, self.m.final_softcap = attn_scale, attn_softcap, final_softcap
        self.m.activation = _ACTIVATIONS[activation]
        self.m.embed = _sized(embed, self.vocab, hidden, "embed", self._keep)
        self.m.lm_head = _sized(lm_head, self.vocab, hidden, "lm_head", self._keep)
        self.m.final_norm = _vector_address(final_norm, hidden, "final_norm", self._keep)
        self.layers = <blob_layer *>calloc(max(1, len(layers)), sizeof(blob_layer))
        if self.layers == NULL:
            raise MemoryError("DecoderStack: out of memory for the layer table")
        for i, layer in enumerate(layers):
            self._bind_layer(&self.layers[i], layer, f"layers.{i}.")
        self.m.layers = self.layers

    cdef _bind_layer(self, blob_layer *l, layer, str name):
        cdef size_t hidden = self.m.hidden, hd = self.m.head_dim
        cdef size_t q_width = self.m.n_heads * hd, kv_width = self.m.n_kv_heads * hd
        keep = self._keep
        l.q = _sized(layer.q, q_width, hidden, name + "q", keep)
        l.k = _sized(layer.k, kv_width, hidden, name + "k", keep)
        l.v = _sized(layer.v, kv_width, hidden, name + "v", keep)
        l.o = _sized(layer.o, hidden, q_width, name + "o", keep)
        l.gate = _sized(layer.gate, self.m.ffn, hidden, name + "gate", keep)
        l.up = _sized(layer.up, self.m.ffn, hidden, name + "up", keep)
        l.down = _sized(layer.down, hidden, self.m.ffn, name + "down", keep)
        l.attn_norm = _vector_address(layer.attn_norm, hidden, name + "attn_norm", keep)
        l.ffn_norm = _vector_address(layer.ffn_norm, hidden, name + "ffn_norm", keep)
        l.post_attn_norm = _vector_address(layer.post_attn_norm, hidden, name + "post_attn_norm", keep, True)
        l.post_ffn_norm = _vector_address(layer.post_ffn_norm, hidden, name + "post_ffn_norm", keep, True)
        l.q_norm = _vector_address(layer.q_norm, hd, name + "q_norm", keep, True)
        l.k_norm = _vector_address(layer.k_norm, hd, name + "k_norm", keep, True)
        if (l.q_norm == NULL) != (l.k_norm == NULL):
            raise ValueError(f"{name}q_norm and {name}k_norm: give both or neither")
        l.q_bias = _vector_address(layer.q_bias, q_width, name + "q_bias", keep, True)
        l.k_bias = _vector_address(layer.k_bias, kv_width, name + "k_bias", keep, True)
        l.v_bias = _vector_address(layer.v_bias, kv_width, name + "v_bias", keep, True)
        l.o_bias = _vector_address(layer.o_bias, hidden, name + "o_bias", keep, True)
        freq = _contiguous(_float_array(layer.inv_freq, name + "inv_freq", 1), name + "inv_freq")
        if 2 * freq.shape[0] > hd:
            raise ValueError(f"{name}inv_freq: {freq.shape[0]} frequencies rotate more than head_dim {hd}")
        l.inv_freq = _vector_address(freq, freq.shape[0], name + "inv_freq", keep)
        l.n_freq = freq.shape[0]
        cdef const float *long_freq = _vector_address(layer.inv_freq_long, l.n_freq, name + "inv_freq_long", keep, True)
        self._rope_sets.append((<uintptr_t>l.inv_freq, <uintptr_t>(long_freq if long_freq != NULL else l.inv_freq)))
        l.rope_scale = layer.rope_scale
        if layer.window < 0:
            raise ValueError(f"{name}window must be >= 0, found {layer.window}")
        l.window = layer.window

    cdef _bind_cache(self, k_cache, v_cache, blob_kv_cache *c):
        expected = (self.m.n_layers, None, self.m.n_kv_heads, self.m.head_dim)
        for what, a in (("k", k_cache), ("v", v_cache)):
            if not isinstance(a, np.ndarray) or a.dtype not in (np.float32, np.float16) or a.ndim != 4 \
                    or a.shape[:1] + a.shape[2:] != expected[:1] + expected[2:]:
                found = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
                raise ValueError(f"forward: {what} cache must be a float32 or float16 array of shape "
                                 f"({self.m.n_layers}, max_seq, {self.m.n_kv_heads}, {self.m.head_dim}), found {found}")
            if not a.flags.c_contiguous or not a.flags.writeable:
                raise ValueError(f"forward: {what} cache must be C-contiguous and writable")
        if k_cache.dtype != v_cache.dtype or k_cache.shape != v_cache.shape:
            raise ValueError(f"forward: k and v caches differ: {k_cache.dtype} {k_cache.shape} vs "
                             f"{v_cache.dtype} {v_cache.shape}")
        c.dtype = BLOB_F16 if k_cache.dtype == np.float16 else BLOB_F32
        c.k = <void *><uintptr_t>_address(k_cache)
        c.v = <void *><uintptr_t>_address(v_cache)
        c.max_seq = k_cache.shape[1]

    def run(self, ids, k_cache, v_cache, size_t start, size_t logit_rows=1, bint long_rope=False, spans=()):
        """Run `ids` at positions start.. through every layer, their keys and values going into
        the caches (n_layers, max_seq, n_kv_heads, head_dim), which must already hold positions
        0..start-1. Returns the float32 logits (logit_rows, vocab) of the last logit_rows tokens.
        `long_rope` rotates with the layers' inv_freq_long where they have one.
        `spans`: the sequence's image spans, (begin, end, embeds) with embeds float32
        (end - begin, hidden) or None, sorted and disjoint, in positions of the whole sequence:
        attention is bidirectional inside each, and a span inside this call takes its embeds in
        place of its ids' embeddings; one overlapping the call must lie wholly inside it."""
        ia = _token_ids(ids, self.vocab, "forward", "the vocabulary")
        cdef size_t n = ia.shape[0]
        if logit_rows > n:
            raise ValueError(f"forward: {logit_rows} logit rows asked of {n} tokens")
        cdef blob_kv_cache c
        self._bind_cache(k_cache, v_cache, &c)
        if start + n > c.max_seq:
            raise ValueError(f"forward: positions {start}..{start + n - 1} do not fit a cache of {c.max_seq}")
        logits = np.empty((logit_rows, self.vocab), np.float32)
        if n == 0:
            return logits
        cdef _SpanTable table = _SpanTable(spans, c.max_seq, self.m.hidden, "forward")
        for i in range(table.count):
            begin, end = table.table[i].begin, table.table[i].end
            if begin < start + n and end > start and (begin < start or end > start + n):
                raise ValueError(f"forward: span ({begin}, {end}) crosses the call's positions {start}..{start + n - 1}; "
                                 f"a span's tokens are computed in one call")
        cdef blob_sequence one
        one.cache, one.start, one.n = c, start, n
        one.spans, one.n_spans = table.table, table.count
        return self._locked_run(ia, &one, 1, logit_rows, logits, long_rope)

    def run_batch(self, ids, k_caches, v_caches, positions, bint long_rope=False):
        """One decode step of several sequences: ids[i] at position positions[i] of its own caches
        k_caches[i], v_caches[i] (each as in `run`, holding positions 0..positions[i]-1). The
        matrix products run over all the rows at once, attention per sequence. Returns the float32
        logits (len(ids), vocab), row i those of sequence i. The caches must be distinct arrays."""
        ia = _token_ids(ids, self.vocab, "forward", "the vocabulary")
        cdef Py_ssize_t n = ia.shape[0]
        if len(k_caches) != n or len(v_caches) != n or len(positions) != n:
            raise ValueError(f"forward: {n} ids need as many k caches, v caches and positions, found "
                             f"{len(k_caches)}, {len(v_caches)} and {len(positions)}")
        logits = np.empty((n, self.vocab), np.float32)
        if n == 0:
            return logits
        cdef blob_sequence *seqs = <blob_sequence *>calloc(n, sizeof(blob_sequence))
        if seqs == NULL:
            raise MemoryError("forward: out of memory for the batch's sequence table")
        try:
            for i in range(n):
                self._bind_cache(k_caches[i], v_caches[i], &seqs[i].cache)
                if positions[i] < 0 or positions[i] >= seqs[i].cache.max_seq:
                    raise ValueError(f"forward: position {positions[i]} of sequence {i} does not fit its cache "
                                     f"of {seqs[i].cache.max_seq}")
                seqs[i].start, seqs[i].n = positions[i], 1
            if len({<uintptr_t>seqs[i].cache.k for i in range(n)}) != n:
                raise ValueError("forward: a batch step takes one token per cache; a cache appears twice")
            return self._locked_run(ia, seqs, n, n, logits, long_rope)
        finally:
            free(seqs)

    cdef _locked_run(self, ia, const blob_sequence *seqs, size_t n_seqs, size_t logit_rows, logits,
                     bint long_rope):
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("forward: this DecoderStack is running in another thread; "
                               "use one stack per thread")
        try:
            self._select_rope(long_rope)
            needed = blob_forward_scratch_bytes(&self.m, ia.shape[0])
            if self._scratch.shape[0] < needed:
                self._scratch = np.empty(needed, np.uint8)
            return self._run(ia, seqs, n_seqs, logit_rows, logits)
        finally:
            self._busy.release()

    cdef _select_rope(self, bint long_rope):
        if long_rope == self._long_rope:
            return
        for i, frequencies in enumerate(self._rope_sets):
            self.layers[i].inv_freq = <const float *><uintptr_t>frequencies[long_rope]
        self._long_rope = long_rope

    cdef _run(self, ia, const blob_sequence *seqs, size_t n_seqs, size_t logit_rows, logits):
        cdef const int64_t[::1] iv = ia
        cdef float[:, ::1] lv = logits
        cdef float *out = &lv[0, 0] if logit_rows else NULL
        cdef void *scratch = <void *><uintptr_t>_address(self._scratch)
        cdef int status
        with nogil:
            status = blob_forward_batch(&self.m, seqs, n_seqs, &iv[0], logit_rows, out, scratch)
        _check(status, "forward")
        return logits

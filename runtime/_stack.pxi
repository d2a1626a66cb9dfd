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
    >>> rows = stack.run_batch([[5], [9, 4, 7]], [k0, k1], [v0, v1], positions=[12, 0])  # doctest: +SKIP
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
        logits = np.empty((logit_rows, self.vocab), np.float32)
        if n == 0:
            return logits
        cdef blob_sequence one
        keep = []
        self._bind_sequence(&one, k_cache, v_cache, start, n, logit_rows, spans, "forward", keep)
        return self._locked_run(ia, &one, 1, logits, long_rope)

    def run_batch(self, runs, k_caches, v_caches, positions, bint long_rope=False, spans=None):
        """One step of several sequences: runs[i], a list of token ids (a prompt chunk, or the one
        token a decoding sequence feeds back), at positions positions[i].. of its own caches
        k_caches[i], v_caches[i] (each as in `run`, holding positions 0..positions[i]-1). The
        matrix products run over all the rows at once, attention per sequence. Returns the
        float32 logits (len(runs), vocab): row i those of run i's last token. `spans`: None, or
        run i's image spans as in `run` at spans[i]. The caches must be distinct arrays."""
        cdef Py_ssize_t count = len(runs)
        if len(k_caches) != count or len(v_caches) != count or len(positions) != count or \
                (spans is not None and len(spans) != count):
            raise ValueError(f"forward: {count} runs need as many k caches, v caches, positions (and spans), found "
                             f"{len(k_caches)}, {len(v_caches)}, {len(positions)}"
                             + ("" if spans is None else f" (and {len(spans)})"))
        if any(len(run) == 0 for run in runs):
            raise ValueError("forward: a run of a batch step holds at least one token")
        ia = _token_ids([token for run in runs for token in run], self.vocab, "forward", "the vocabulary")
        logits = np.empty((count, self.vocab), np.float32)
        if count == 0:
            return logits
        cdef blob_sequence *seqs = <blob_sequence *>calloc(count, sizeof(blob_sequence))
        if seqs == NULL:
            raise MemoryError("forward: out of memory for the batch's sequence table")
        keep = []
        try:
            for i in range(count):
                if positions[i] < 0:
                    raise ValueError(f"forward: sequence {i} is at position {positions[i]}; positions start at 0")
                self._bind_sequence(&seqs[i], k_caches[i], v_caches[i], positions[i], len(runs[i]), 1,
                                    () if spans is None else spans[i], f"forward: sequence {i}", keep)
            if len({<uintptr_t>seqs[i].cache.k for i in range(count)}) != count:
                raise ValueError("forward: a batch step takes one run per cache; a cache appears twice")
            return self._locked_run(ia, seqs, count, logits, long_rope)
        finally:
            free(seqs)

    cdef _bind_sequence(self, blob_sequence *q, k_cache, v_cache, size_t start, size_t n, size_t logit_rows,
                        spans, str what, list keep):
        """Fills in q for n tokens at positions start.. of the caches; keep holds its span table."""
        self._bind_cache(k_cache, v_cache, &q.cache)
        if start + n > q.cache.max_seq:
            raise ValueError(f"{what}: positions {start}..{start + n - 1} do not fit a cache of {q.cache.max_seq}")
        cdef _SpanTable table = _SpanTable(spans, q.cache.max_seq, self.m.hidden, what)
        for i in range(table.count):
            begin, end = table.table[i].begin, table.table[i].end
            if begin < start + n and end > start and (begin < start or end > start + n):
                raise ValueError(f"{what}: span ({begin}, {end}) crosses the call's positions {start}..{start + n - 1}; "
                                 f"a span's tokens are computed in one call")
        keep.append(table)
        q.start, q.n, q.logit_rows = start, n, logit_rows
        q.spans, q.n_spans = table.table, table.count

    cdef _locked_run(self, ia, const blob_sequence *seqs, size_t n_seqs, logits, bint long_rope):
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("forward: this DecoderStack is running in another thread; "
                               "use one stack per thread")
        try:
            self._select_rope(long_rope)
            needed = blob_forward_scratch_bytes(&self.m, ia.shape[0])
            if self._scratch.shape[0] < needed:
                self._scratch = np.empty(needed, np.uint8)
            return self._run(ia, seqs, n_seqs, logits)
        finally:
            self._busy.release()

    cdef _select_rope(self, bint long_rope):
        if long_rope == self._long_rope:
            return
        for i, frequencies in enumerate(self._rope_sets):
            self.layers[i].inv_freq = <const float *><uintptr_t>frequencies[long_rope]
        self._long_rope = long_rope

    cdef _run(self, ia, const blob_sequence *seqs, size_t n_seqs, logits):
        cdef const int64_t[::1] iv = ia
        cdef float[:, ::1] lv = logits
        cdef float *out = &lv[0, 0] if lv.shape[0] else NULL
        cdef void *scratch = <void *><uintptr_t>_address(self._scratch)
        cdef int status
        with nogil:
            status = blob_forward_batch(&self.m, seqs, n_seqs, &iv[0], out, scratch)
        _check(status, "forward")
        return logits

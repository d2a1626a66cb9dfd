# Included by _kernels.pyx: attention and the small per-row ops, one call each (tests and the Python reference path).

# ---- attention ----

cdef class _SpanTable:
    """Image spans for the C kernels (blob_span, csrc/kernels.h): (begin, end) position pairs, or
    (begin, end, embeds) with embeds float32 (end - begin, width) or None; sorted and disjoint.
    Holds the table and the embeddings it points at for as long as a call uses them."""
    cdef blob_span *table
    cdef size_t count
    cdef list _keep

    def __cinit__(self):
        self.table = NULL
        self.count = 0

    def __dealloc__(self):
        free(self.table)

    def __init__(self, spans, size_t limit, size_t width, str what):
        spans = list(spans)
        self._keep = []
        self.table = <blob_span *>calloc(max(1, len(spans)), sizeof(blob_span))
        if self.table == NULL:
            raise MemoryError(f"{what}: out of memory for the span table")
        previous_end = 0
        for i, span in enumerate(spans):
            begin, end, embeds = (tuple(span) + (None,))[:3]
            if not previous_end <= begin < end <= limit:
                raise ValueError(f"{what}: span {i} ({begin}, {end}) must satisfy {previous_end} <= begin < end <= "
                                 f"{limit} (spans sorted, disjoint, inside the cache)")
            self.table[i].begin, self.table[i].end = begin, end
            previous_end = end
            if embeds is not None:
                e = _contiguous(_float_array(embeds, f"{what}: span {i} embeds", 2), f"{what}: span {i} embeds")
                if e.shape[0] != end - begin or e.shape[1] != width:
                    raise ValueError(f"{what}: span {i} embeds must be ({end - begin}, {width}), found {e.shape}")
                self._keep.append(e)
                self.table[i].embeds = <const float *><uintptr_t>_address(e)
        self.count = len(spans)

def _cache_view(c, what):
    c = np.asarray(c)
    if c.dtype not in (np.float32, np.float16):
        raise TypeError(f"attention: {what} cache must be float32 or float16, found {c.dtype}")
    if c.ndim != 3:
        raise ValueError(f"attention: {what} cache must be (positions, n_kv_heads, head_dim), found shape {c.shape}")
    item = c.itemsize
    if c.strides[2] != item or c.strides[0] < 0 or c.strides[1] < 0 or c.strides[0] % item or c.strides[1] % item:
        raise ValueError(f"attention: {what} cache needs contiguous head vectors and non-negative strides; "
                         f"found strides {c.strides}")
    return c


def attention(q, k, v, *, int p0, float scale, int window=0, float softcap=0.0, spans=(), out=None):
    """Causal grouped-query attention of queries at positions p0 .. p0+n-1.

    q: (n, n_heads, head_dim) float32, C-contiguous. k, v: the cache, (positions, n_kv_heads,
    head_dim) float32 or float16 with positions >= p0 + n; rows may be strided (pass a transposed
    view of a head-major cache). window > 0 limits each query to the `window` latest keys (its own
    included); softcap > 0 applies softcap * tanh(score / softcap) to the scaled scores.
    `spans`: (begin, end) position pairs, sorted and disjoint, inside which attention is
    bidirectional (one image's tokens); the cache must hold every key they make visible.
    Returns out (n, n_heads, head_dim).
    """
    qa = _contiguous(_float_array(q, "attention: q", 3), "attention: q")
    ka, va = _cache_view(k, "k"), _cache_view(v, "v")
    cdef size_t n = qa.shape[0], n_heads = qa.shape[1], head_dim = qa.shape[2]
    if ka.dtype != va.dtype or ka.shape != va.shape:
        raise ValueError(f"attention: k and v caches differ: {ka.dtype} {ka.shape} vs {va.dtype} {va.shape}")
    n_kv = ka.shape[1]
    if ka.shape[2] != head_dim:
        raise ValueError(f"attention: cache head_dim {ka.shape[2]} differs from the queries' {head_dim}")
    if n_kv == 0 or n_heads % n_kv:
        raise ValueError(f"attention: n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv})")
    if p0 < 0 or window < 0 or softcap < 0:
        raise ValueError(f"attention: p0, window and softcap must be >= 0; found {p0}, {window}, {softcap}")
    if ka.shape[0] < p0 + n:
        raise ValueError(f"attention: the cache holds {ka.shape[0]} positions; queries at {p0}..{p0 + n - 1} "
                         f"need {p0 + n}")
    result = _output(out, qa.shape, "attention")
    if n == 0 or head_dim == 0:
        return result
    cdef _SpanTable table = _SpanTable(spans, ka.shape[0], 0, "attention")
    cdef blob_attention a
    a.spans, a.n_spans = table.table, table.count
    item = ka.itemsize
    a.n_heads, a.n_kv_heads, a.head_dim = n_heads, n_kv, head_dim
    a.kv_dtype = BLOB_F16 if ka.dtype == np.float16 else BLOB_F32
    a.k = <const void *><uintptr_t>_address(ka)
    a.v = <const void *><uintptr_t>_address(va)
    a.k_pos_stride, a.k_head_stride = ka.strides[0] // item, ka.strides[1] // item
    a.v_pos_stride, a.v_head_stride = va.strides[0] // item, va.strides[1] // item
    a.scale, a.softcap, a.window = scale, softcap, window
    cdef const float[:, :, ::1] qv = qa
    cdef float[:, :, ::1] ov = result
    cdef size_t start = p0
    cdef int status
    with nogil:
        status = blob_attention_run(&a, &qv[0, 0, 0], n, start, &ov[0, 0, 0])
    _check(status, "attention")
    return result


# ---- small ops ----

def rms_norm(x, w, float eps, float offset=0.0, out=None):
    """out = x / sqrt(mean(x**2) + eps) * (offset + w) over the last axis of x (..., d).

    offset=0 is the usual RMSNorm, offset=1 Gemma's (1 + w).
    """
    xa = _contiguous(_float_array(x, "rms_norm: x"), "rms_norm: x")
    wa = _contiguous(_float_array(w, "rms_norm: w", 1), "rms_norm: w")
    if xa.ndim == 0 or xa.shape[-1] != wa.shape[0]:
        raise ValueError(f"rms_norm: x's last axis must match w ({wa.shape[0]},), found shape {xa.shape}")
    result = _output(out, xa.shape, "rms_norm")
    cdef size_t d = wa.shape[0]
    cdef size_t n = xa.size // d if d else 0
    if n == 0:
        return result
    cdef const float[::1] xv = xa.reshape(-1)
    cdef const float[::1] wv = wa
    cdef float[::1] ov = result.reshape(-1)
    with nogil:
        blob_rms_norm(&xv[0], &wv[0], n, d, eps, offset, &ov[0])
    return result


def layer_norm(x, w, b, float eps, out=None):
    """out = (x - mean(x)) / sqrt(var(x) + eps) * w + b over the last axis of x (..., d), as
    torch's nn.LayerNorm (biased variance).

    >>> layer_norm(np.array([1, 2, 3], np.float32), np.ones(3, np.float32), np.zeros(3, np.float32), 0.0)
    array([-1.2247449,  0.       ,  1.2247449], dtype=float32)
    """
    xa = _contiguous(_float_array(x, "layer_norm: x"), "layer_norm: x")
    wa = _contiguous(_float_array(w, "layer_norm: w", 1), "layer_norm: w")
    ba = _contiguous(_float_array(b, "layer_norm: b", 1), "layer_norm: b")
    if xa.ndim == 0 or xa.shape[-1] != wa.shape[0] or ba.shape != wa.shape:
        raise ValueError(f"layer_norm: x's last axis, w and b must have one length; found x {xa.shape}, "
                         f"w {wa.shape}, b {ba.shape}")
    result = _output(out, xa.shape, "layer_norm")
    cdef size_t d = wa.shape[0]
    cdef size_t n = xa.size // d if d else 0
    if n == 0:
        return result
    cdef const float[::1] xv = xa.reshape(-1)
    cdef const float[::1] wv = wa
    cdef const float[::1] bv = ba
    cdef float[::1] ov = result.reshape(-1)
    with nogil:
        blob_layer_norm(&xv[0], &wv[0], &bv[0], n, d, eps, &ov[0])
    return result


def rope(x, positions, inv_freq, float scale=1.0):
    """Rotate x (n, n_heads, head_dim) in place, HF half-split layout; returns x.

    Token i is rotated by angle positions[i] * inv_freq[j] in dimensions (j, j + len(inv_freq)),
    with cos and sin multiplied by `scale` (LongRoPE's attention factor);
    2 * len(inv_freq) <= head_dim (partial rotary leaves the rest unchanged).
    """
    xa = _contiguous(_float_array(x, "rope: x", 3), "rope: x")
    if not xa.flags.writeable:
        raise ValueError("rope: x must be writable (it is rotated in place)")
    pos = np.ascontiguousarray(positions, dtype=np.int64).reshape(-1)
    freq = _contiguous(_float_array(inv_freq, "rope: inv_freq", 1), "rope: inv_freq")
    cdef size_t n = xa.shape[0], n_heads = xa.shape[1], head_dim = xa.shape[2], n_freq = freq.shape[0]
    if pos.shape[0] != n:
        raise ValueError(f"rope: {pos.shape[0]} positions for {n} tokens")
    if 2 * n_freq > head_dim:
        raise ValueError(f"rope: {n_freq} frequencies rotate {2 * n_freq} dimensions; head_dim is {head_dim}")
    if n == 0 or n_heads == 0 or n_freq == 0:
        return x
    cdef float[:, :, ::1] xv = xa
    cdef const int64_t[::1] pv = pos
    cdef const float[::1] fv = freq
    cdef float[:, :, ::1] angles = np.empty((n, n_freq, 2), np.float32)
    with nogil:
        blob_rope_angles(&pv[0], n, &fv[0], n_freq, scale, &angles[0, 0, 0])
        blob_rope(&xv[0, 0, 0], n, n_heads, head_dim, &angles[0, 0, 0], n_freq)
    return x


_ACTIVATIONS = {"silu": BLOB_ACT_SILU, "gelu_tanh": BLOB_ACT_GELU_TANH}


def _elementwise_pair(a, b, what):
    aa = _contiguous(_float_array(a, f"{what}: first input"), f"{what}: first input")
    ba = _contiguous(_float_array(b, f"{what}: second input"), f"{what}: second input")
    if aa.shape != ba.shape:
        raise ValueError(f"{what}: inputs differ in shape: {aa.shape} vs {ba.shape}")
    return aa, ba


def gated_act(gate, up, str kind="silu", out=None):
    """out = act(gate) * up, act = 'silu' or 'gelu_tanh' (GELU, tanh approximation)."""
    if kind not in _ACTIVATIONS:
        raise ValueError(f"gated_act: unknown activation {kind!r}; expected one of {list(_ACTIVATIONS)}")
    ga, ua = _elementwise_pair(gate, up, "gated_act")
    result = _output(out, ga.shape, "gated_act")
    if ga.size == 0:
        return result
    cdef const float[::1] gv = ga.reshape(-1)
    cdef const float[::1] uv = ua.reshape(-1)
    cdef float[::1] ov = result.reshape(-1)
    cdef int act = _ACTIVATIONS[kind]
    with nogil:
        blob_gated_act(&gv[0], &uv[0], gv.shape[0], act, &ov[0])
    return result


def add(a, b, out=None):
    """out = a + b (the residual add); out may be a or b."""
    aa, ba = _elementwise_pair(a, b, "add")
    result = _output(out, aa.shape, "add")
    if aa.size == 0:
        return result
    cdef const float[::1] av = aa.reshape(-1)
    cdef const float[::1] bv = ba.reshape(-1)
    cdef float[::1] ov = result.reshape(-1)
    with nogil:
        blob_add(&av[0], &bv[0], av.shape[0], &ov[0])
    return result


def softcap(x, float cap, out=None):
    """out = cap * tanh(x / cap) (final-logit soft-capping); cap > 0."""
    if not cap > 0:
        raise ValueError(f"softcap: cap must be > 0, found {cap}")
    xa = _contiguous(_float_array(x, "softcap: x"), "softcap: x")
    result = _output(out, xa.shape, "softcap")
    if xa.size == 0:
        return result
    cdef const float[::1] xv = xa.reshape(-1)
    cdef float[::1] ov = result.reshape(-1)
    with nogil:
        blob_softcap(&xv[0], xv.shape[0], cap, &ov[0])
    return result


def softmax(x, out=None):
    """Softmax over the last axis of x (..., d)."""
    xa = _contiguous(_float_array(x, "softmax: x"), "softmax: x")
    if xa.ndim == 0:
        raise ValueError("softmax: x must have at least one dimension")
    result = _output(out, xa.shape, "softmax")
    if result is not xa:
        result[...] = xa
    cdef size_t d = xa.shape[-1]
    if xa.size == 0:
        return result
    cdef float[::1] ov = result.reshape(-1)
    with nogil:
        blob_softmax(&ov[0], ov.shape[0] // d, d)
    return result


def _token_ids(ids, long long count, str what, str within):
    """ids as a contiguous int64 array, each checked to lie in 0 .. count-1."""
    raw = np.asarray(ids)
    if raw.size and raw.dtype.kind not in "iu":
        raise TypeError(f"{what}: ids must be integers, found {raw.dtype}")
    ia = np.ascontiguousarray(raw, dtype=np.int64).reshape(-1)
    if ia.size and (ia.min() < 0 or ia.max() >= count):
        bad = ia[(ia < 0) | (ia >= count)][0]
        raise IndexError(f"{what}: token id {bad} out of range for {within} (0 .. {count - 1})")
    return ia


def embed(Matrix w, ids, out=None):
    """Rows `ids` of w as float32 (n, cols), dequantized whatever w's dtype."""
    ia = _token_ids(ids, w.m.rows, "embed", repr(w))
    cdef size_t n = ia.shape[0]
    result = _output(out, (n, w.m.cols), "embed")
    if n == 0:
        return result
    cdef const int64_t[::1] iv = ia
    cdef float[:, ::1] ov = result
    with nogil:
        blob_embed(&w.m, &iv[0], n, &ov[0, 0])
    return result


def read_bandwidth_probe(buffer):
    """Read every byte of `buffer` (uint8, 64-byte aligned, size a multiple of 64) on all threads.

    For the bandwidth benchmark: returns a checksum so the reads cannot be skipped.
    """
    a = np.asarray(buffer)
    if a.dtype != np.uint8 or a.ndim != 1 or not a.flags.c_contiguous:
        raise ValueError("read_bandwidth_probe: buffer must be a contiguous 1-D uint8 array")
    if _address(a) % 64 or a.size % 64:
        raise ValueError("read_bandwidth_probe: buffer must be 64-byte aligned with a size multiple of 64")
    cdef const void *p = <const void *><uintptr_t>_address(a)
    cdef size_t nbytes = a.size
    cdef double checksum
    with nogil:
        checksum = blob_read_bandwidth_probe(p, nbytes)
    return checksum

# cython: language_level=3, boundscheck=False, wraparound=True
"""Python bindings of the C kernels in csrc/ (see csrc/kernels.h for the exact semantics).

Every call validates its arguments (clear ValueError / TypeError / IndexError naming the
argument, the expected and the found shape or dtype), then runs the kernel with the GIL
released. Weights are bound once as a `Matrix` straight over the reader's read-only views;
nothing is copied.

The instruction-set path is chosen at import: the best one the CPU supports, or the one named
by the environment variable BLOBSTORE_ISA (scalar, avx2 or neon).
"""
import os
import threading

import numpy as np

from blobstore.format import DType, layout
from blobstore.runtime.cores import physical_cores

from libc.stdint cimport int8_t, int64_t, uint8_t, uint16_t, uint32_t, uintptr_t
from libc.stdlib cimport calloc, free


cdef extern from "cpu.h" nogil:
    uint32_t blob_cpu_features()
    const char *blob_cpu_arch()


cdef extern from "kernels.h" nogil:
    int BLOB_F32, BLOB_F16, BLOB_MAX_PLANES
    int BLOB_NUM_ISAS, BLOB_OK, BLOB_ENOMEM, BLOB_MAX_THREADS
    int BLOB_ACT_SILU, BLOB_ACT_GELU_TANH

    ctypedef struct blob_matrix:
        int dtype
        const void *plane[5]     # BLOB_MAX_PLANES, checked at import
        size_t row_stride_bytes
        size_t rows, cols

    ctypedef struct blob_attention:
        size_t n_heads, n_kv_heads, head_dim
        int kv_dtype
        const void *k
        const void *v
        size_t k_pos_stride, k_head_stride, v_pos_stride, v_head_stride
        float scale, softcap
        size_t window

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
        size_t start, n

    size_t blob_forward_scratch_bytes(const blob_model *m, size_t n)
    int blob_forward_batch(const blob_model *m, const blob_sequence *seqs, size_t n_seqs, const int64_t *ids,
                           size_t logit_rows, float *logits, void *scratch)

    int blob_isa_supported(int isa)
    int blob_isa_best()
    int blob_isa_current()
    int blob_isa_select(int isa)
    const char *blob_isa_name(int isa)
    int blob_isa_int8_dot()
    int blob_threads_get()
    int blob_threads_set(int n)
    int blob_matmul(const blob_matrix *w, const float *x, size_t x_stride, size_t n,
                    float *y, size_t y_stride)
    int blob_attention_run(const blob_attention *a, const float *q, size_t n, size_t p0, float *out)
    void blob_rms_norm(const float *x, const float *w, size_t n, size_t d, float eps,
                       float offset, float *out)
    void blob_rope_angles(const int64_t *positions, size_t n, const float *inv_freq, size_t n_freq,
                          float scale, float *cos_sin)
    void blob_rope(float *x, size_t n, size_t n_heads, size_t head_dim, const float *cos_sin, size_t n_freq)
    void blob_gated_act(const float *gate, const float *up, size_t count, int act, float *out)
    void blob_softmax(float *x, size_t n, size_t d)
    void blob_softcap(const float *x, size_t count, float cap, float *out)
    void blob_add(const float *a, const float *b, size_t count, float *out)
    void blob_embed(const blob_matrix *w, const int64_t *ids, size_t n, float *out)
    double blob_read_bandwidth_probe(const void *data, size_t nbytes)


# ---- CPU, ISA and threads ----

_FEATURE_BITS = {
    "sse4.2": 1 << 0, "avx2": 1 << 1, "fma": 1 << 2, "f16c": 1 << 3, "avx512f": 1 << 4,
    "avx512bw": 1 << 5, "avx512vnni": 1 << 6, "avxvnni": 1 << 7, "avx512vl": 1 << 8,
    "neon": 1 << 16, "dotprod": 1 << 17, "crc32": 1 << 18,
}
_ISA_NAMES = tuple(blob_isa_name(i).decode() for i in range(BLOB_NUM_ISAS))


def cpu_features():
    """Names of the CPU features the kernels can use, e.g. ['sse4.2', 'avx2', 'fma', 'f16c']."""
    bits = blob_cpu_features()
    return [name for name, bit in _FEATURE_BITS.items() if bits & bit]


def available_isas():
    """The instruction-set paths this CPU supports, slowest first: ['scalar', 'avx2']."""
    return [name for i, name in enumerate(_ISA_NAMES) if blob_isa_supported(i)]


def get_isa():
    """The path the kernels use now: 'scalar', 'avx2' or 'neon'."""
    return _ISA_NAMES[blob_isa_current()]


def set_isa(name):
    """Switch every kernel to the path `name` (for tests and benchmarks comparing paths).

    >>> set_isa("scalar")           # doctest: +SKIP
    """
    if name not in _ISA_NAMES:
        raise ValueError(f"unknown ISA {name!r}; expected one of {list(_ISA_NAMES)}")
    if blob_isa_select(_ISA_NAMES.index(name)) != BLOB_OK:
        raise ValueError(
            f"ISA {name!r} is not supported by this CPU ({blob_cpu_arch().decode()}, features: "
            f"{', '.join(cpu_features()) or 'none'}); supported: {available_isas()}")


def get_threads():
    """Threads every kernel call runs on."""
    return blob_threads_get()


def set_threads(int n):
    """Run kernels on `n` threads (the caller plus n - 1 pool workers)."""
    if blob_threads_set(n) != BLOB_OK:
        raise ValueError(f"threads must be between 1 and {BLOB_MAX_THREADS}, got {n}")


def cpu_info():
    """The CPU and the kernels' configuration.

    >>> cpu_info()["isa"]           # doctest: +SKIP
    'avx2'
    """
    int8_dot = None
    if blob_isa_int8_dot():
        int8_dot = "vnni" if get_isa() == "avx2" else "dotprod"
    return {
        "arch": blob_cpu_arch().decode(),
        "features": cpu_features(),
        "isa": get_isa(),
        "available_isas": available_isas(),
        "int8_dot": int8_dot,
        "threads": get_threads(),
        "physical_cores": physical_cores(),
    }


def _configure_from_environment():
    requested = os.environ.get("BLOBSTORE_ISA", "").strip().lower()
    if requested:
        try:
            set_isa(requested)
        except ValueError as e:
            raise ValueError(f"BLOBSTORE_ISA={requested!r}: {e}") from None
    else:
        blob_isa_select(blob_isa_best())
    blob_threads_set(min(physical_cores(), BLOB_MAX_THREADS))  # in range: cannot fail


_configure_from_environment()


# ---- weights ----

# Weights go to C as their DType's integer (csrc/kernels.h's enum blob_dtype has the same values).
_MATMUL_DTYPES = [d for d in DType if d.spec.matmul]
_PLAIN_WEIGHTS = {d.numpy: d for d in _MATMUL_DTYPES if not d.is_quantized}   # bf16 as uint16 bits
assert BLOB_MAX_PLANES == 5 and max(len(d.spec.planes) for d in DType) <= BLOB_MAX_PLANES


def _address(array):
    return <uintptr_t>array.__array_interface__["data"][0]


def _weight_dtype(dtype):
    """The DType named by `dtype` (a DType or its label), which the kernels must multiply."""
    try:
        kind = DType.parse(dtype)
    except (ValueError, TypeError):
        kind = None
    if kind not in _MATMUL_DTYPES:
        raise ValueError(f"unsupported weight dtype {dtype!r}; expected one of {[d.label for d in _MATMUL_DTYPES]}")
    return kind


cdef class Matrix:
    """A weight matrix W (rows, cols) bound for the kernels, zero copy.

    `weight` is a 2-D numpy array (float32 'f32', float16 'f16', or bfloat16 bits as uint16
    'bf16'; rows may be strided, as the reader's views are over their row padding) or a
    quantized tensor with `.dtype`, `.shape` and `.planes` in DTypeSpec.planes order (the
    reader's QuantizedTensor). `dtype` names the type when the array's own dtype does not (bf16).

    >>> w = Matrix(reader["blk.0.attn_q.weight"])        # doctest: +SKIP
    >>> y = matmul(w, x)                                 # doctest: +SKIP
    """
    cdef blob_matrix m
    cdef readonly str dtype
    cdef readonly str name
    cdef object _keep

    def __init__(self, weight, dtype=None, name="weight"):
        self.name = name
        if hasattr(weight, "planes"):
            self._bind_quantized(weight)
        else:
            self._bind_plain(np.asarray(weight), dtype)

    def _bind_plain(self, array, dtype):
        kind = _weight_dtype(dtype) if dtype is not None else _PLAIN_WEIGHTS.get(array.dtype)
        if kind is None or kind.is_quantized:
            raise TypeError(f"{self.name}: array dtype {array.dtype} is not a weight type; expected one of "
                            f"{', '.join(f'{numpy} ({d.label})' for numpy, d in _PLAIN_WEIGHTS.items())}")
        if array.dtype != kind.numpy:
            raise TypeError(f"{self.name}: dtype {kind.label} needs a {kind.numpy} array, found {array.dtype}")
        if array.ndim != 2:
            raise ValueError(f"{self.name}: expected a 2-D weight (rows, cols), found shape {array.shape}")
        rows, cols = array.shape
        if rows == 0 or cols == 0:
            raise ValueError(f"{self.name}: empty weight of shape {array.shape}")
        item = array.itemsize
        if array.strides[1] != item or array.strides[0] < cols * item or array.strides[0] % item:
            raise ValueError(f"{self.name}: rows must be contiguous and non-overlapping; found strides "
                             f"{array.strides} for shape {array.shape} of {item}-byte elements")
        self.dtype = kind.label
        self.m.dtype = kind
        self.m.plane[0] = <const void *><uintptr_t>_address(array)
        self.m.row_stride_bytes = array.strides[0]
        self.m.rows, self.m.cols = rows, cols
        self._keep = array

    def _bind_quantized(self, tensor):
        kind = _weight_dtype(tensor.dtype)
        if not kind.is_quantized:
            raise TypeError(f"{self.name}: quantized tensor of dtype {kind.label}; expected one of "
                            f"{[d.label for d in _MATMUL_DTYPES if d.is_quantized]}")
        shape = tuple(tensor.shape)
        if len(shape) < 2:
            raise ValueError(f"{self.name}: expected a weight of at least 2 dimensions, found shape {shape}")
        lay = layout(kind, shape)   # the first plane's rows are padded as in the file
        rows, cols, nblocks, row_bytes = lay.rows, lay.cols, lay.blocks, lay.row_stride
        if rows == 0 or cols == 0:
            raise ValueError(f"{self.name}: empty weight of shape {shape}")
        if kind.spec.whole_blocks and cols % kind.spec.block:
            raise ValueError(f"{self.name}: {kind.label} rows must be whole blocks of {kind.spec.block} values; "
                             f"found {cols} columns")
        specs = kind.spec.planes
        planes = tuple(np.asarray(p) for p in tensor.planes)
        if len(planes) != len(specs):
            raise ValueError(f"{self.name}: {kind.label} has {len(specs)} planes "
                             f"({', '.join(p.name for p in specs)}), found {len(planes)}")
        first = planes[0]
        if first.ndim != 2 or first.shape[0] != rows or first.itemsize != specs[0].numpy.itemsize \
                or first.shape[1] * first.itemsize < row_bytes or first.strides[1] != first.itemsize \
                or first.strides[0] < first.shape[1] * first.itemsize:
            raise ValueError(f"{self.name}: {specs[0].name} plane must be ({rows}, >= {row_bytes}) bytes with "
                             f"contiguous rows (the file's 64-byte row padding included); found shape "
                             f"{first.shape}, dtype {first.dtype}, strides {first.strides}")
        for plane, spec in zip(planes[1:], specs[1:]):
            expected = (rows, nblocks * spec.per_block)
            if plane.dtype != spec.numpy or plane.shape != expected or not plane.flags.c_contiguous:
                raise ValueError(f"{self.name}: {spec.name} plane must be a packed {spec.numpy} {expected} array; "
                                 f"found {plane.dtype} {plane.shape}"
                                 f"{'' if plane.flags.c_contiguous else ' (not contiguous)'}")
        self.dtype = kind.label
        self.m.dtype = kind
        for i, plane in enumerate(planes):
            self.m.plane[i] = <const void *><uintptr_t>_address(plane)
        self.m.row_stride_bytes = first.strides[0]
        self.m.rows, self.m.cols = rows, cols
        self._keep = planes

    @property
    def rows(self):
        return self.m.rows

    @property
    def cols(self):
        return self.m.cols

    @property
    def shape(self):
        return (self.m.rows, self.m.cols)

    def __repr__(self):
        return f"Matrix({self.name!r}, {self.dtype}, rows={self.m.rows}, cols={self.m.cols})"


# ---- argument checks ----

def _float_array(x, what, ndim=None):
    a = np.asarray(x)
    if a.dtype != np.float32:
        raise TypeError(f"{what} must be float32, found {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{what} must have {ndim} dimensions, found shape {a.shape}")
    return a


def _output(out, shape, what):
    if out is None:
        return np.empty(shape, np.float32)
    if not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != tuple(shape):
        found = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
        raise ValueError(f"{what}: out must be a float32 array of shape {tuple(shape)}, found {found}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"{what}: out must be C-contiguous and writable")
    return out


def _contiguous(a, what):
    if not a.flags.c_contiguous:
        raise ValueError(f"{what} must be C-contiguous (strides {a.strides} for shape {a.shape})")
    return a


cdef int _check(int status, str what) except -1:
    if status == BLOB_ENOMEM:
        raise MemoryError(f"{what}: out of memory for the kernel's scratch buffer")
    if status != BLOB_OK:
        raise ValueError(f"{what}: invalid arguments (status {status})")
    return 0


# ---- matrix products ----

def matmul(Matrix w, x, out=None):
    """Y = X @ W.T: x (cols,) -> (rows,) (decode matvec) or (n, cols) -> (n, rows) (prefill).

    Rows of x may be strided; out, when given, must be a C-contiguous float32 array and must
    not overlap x.

    >>> y = matmul(Matrix(np.eye(3, dtype=np.float32)), np.ones(3, np.float32))
    """
    a = _float_array(x, "matmul: x")
    single = a.ndim == 1
    a2 = a.reshape(1, -1) if single else a
    if a2.ndim != 2 or a2.shape[1] != w.m.cols:
        raise ValueError(f"matmul: x must be ({w.m.cols},) or (n, {w.m.cols}) for {w!r}, found shape {a.shape}")
    cdef size_t n = a2.shape[0]
    if a2.strides[1] != 4 or a2.strides[0] % 4 or (n > 1 and a2.strides[0] < 4 * a2.shape[1]):
        a2 = np.ascontiguousarray(a2)   # only unusual activation layouts are copied, never weights
    cdef object out_shape = [w.m.rows] if single else [n, w.m.rows]
    y = _output(out, tuple(out_shape), "matmul")
    if out is not None and np.may_share_memory(y, a2):
        raise ValueError("matmul: out must not overlap x (every output row reads all of x)")
    if n == 0:
        return y
    cdef const float[:, :] xv = a2
    cdef float[:, ::1] yv = y.reshape(n, w.m.rows)
    cdef size_t x_stride = xv.strides[0] // 4 if n > 1 else w.m.cols
    cdef int status
    with nogil:
        status = blob_matmul(&w.m, &xv[0, 0], x_stride, n, &yv[0, 0], w.m.rows)
    _check(status, "matmul")
    return y


# ---- attention ----

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


def attention(q, k, v, *, int p0, float scale, int window=0, float softcap=0.0, out=None):
    """Causal grouped-query attention of queries at positions p0 .. p0+n-1.

    q: (n, n_heads, head_dim) float32, C-contiguous. k, v: the cache, (positions, n_kv_heads,
    head_dim) float32 or float16 with positions >= p0 + n; rows may be strided (pass a transposed
    view of a head-major cache). window > 0 limits each query to the `window` latest keys (its own
    included); softcap > 0 applies softcap * tanh(score / softcap) to the scaled scores.
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
    cdef blob_attention a
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

    def run(self, ids, k_cache, v_cache, size_t start, size_t logit_rows=1, bint long_rope=False):
        """Run `ids` at positions start.. through every layer, their keys and values going into
        the caches (n_layers, max_seq, n_kv_heads, head_dim), which must already hold positions
        0..start-1. Returns the float32 logits (logit_rows, vocab) of the last logit_rows tokens.
        `long_rope` rotates with the layers' inv_freq_long where they have one."""
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
        cdef blob_sequence one
        one.cache, one.start, one.n = c, start, n
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

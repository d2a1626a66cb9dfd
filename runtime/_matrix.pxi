# Included by _kernels.pyx: weights bound as Matrix, argument checks and matrix products.

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
    reader's QuantizedTensor), or a q8_0 / q4_0 one whose `.layout` is "interleave8" (its rows
    interleaved eight at a time, see _bind_interleaved). `dtype` names the type when the
    array's own dtype does not (bf16).

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
        if getattr(tensor, "layout", "planar") == "interleave8":
            return self._bind_interleaved(tensor)
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

    def _bind_interleaved(self, tensor):
        """Rows of a type of format.INTERLEAVED interleaved eight at a time (csrc/kernels.h,
        BLOB_LAYOUT_INTERLEAVE8): each plane of the type packed as (groups, blocks * 8 * its
        elements per block) of its element (quants int8 q8_0, uint8 q4_0 / q5_0; q5_0's fifth
        bits uint8; scales float16)."""
        kind = _weight_dtype(tensor.dtype)
        if kind.label not in INTERLEAVED:
            raise TypeError(f"{self.name}: the interleave8 layout is for {sorted(INTERLEAVED)} weights, found {kind.label}")
        shape = tuple(tensor.shape)
        lay = layout(kind, shape, INTERLEAVE8)
        if len(shape) < 2 or lay.rows == 0 or lay.cols == 0:
            raise ValueError(f"{self.name}: expected a non-empty weight of at least 2 dimensions, found shape {shape}")
        planes = tuple(np.asarray(p) for p in tensor.planes)
        expected = tuple((str(spec.numpy), plane_shape)
                         for spec, plane_shape in zip(kind.spec.planes, plane_shapes(kind, shape, INTERLEAVE8)))
        if len(planes) != len(expected) or any(p.dtype != dt or p.shape != shape or not p.flags.c_contiguous
                                               for p, (dt, shape) in zip(planes, expected)):
            raise ValueError(f"{self.name}: interleave8 {kind.label} planes must be packed "
                             f"{' and '.join(f'{dt} {shape}' for dt, shape in expected)}; "
                             f"found {[(str(p.dtype), p.shape) for p in planes]}")
        self.dtype = kind.label
        self.m.dtype = kind
        self.m.layout = BLOB_LAYOUT_INTERLEAVE8
        for i, plane in enumerate(planes):
            self.m.plane[i] = <const void *><uintptr_t>_address(plane)
        self.m.row_stride_bytes = lay.row_stride // BLOB_INTERLEAVE
        self.m.rows, self.m.cols = lay.rows, lay.cols
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

# A product over at most this many tokens gives each token exactly its lone product's result
# (csrc/kernels.h): a batched decode or a speculative verify this wide matches one-token decoding
# bit for bit, whatever the weights' dtype.
DECODE_TILES_MAX_TOKENS = BLOB_DECODE_TILES_MAX_TOKENS


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

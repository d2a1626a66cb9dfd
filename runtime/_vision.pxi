# Included by _kernels.pyx: the vision encoder and projector bound once for csrc/vision.c.

cdef class VisionStack:
    """SigLIP's encoder layers and Gemma 3's projector, bound for blob_vision_encode
    (csrc/vision.c): every image runs through all of them in C with the GIL released.

    `patch` is the patch embedding as a Matrix (hidden, channels * patch_size**2), the
    convolution's weight with its (channel, y, x) axes flattened; `position` a Matrix
    (grid**2, hidden); `projection` a Matrix (text_hidden, hidden). `layers` are objects with
    Matrix q, k, v, o, fc1, fc2 and float32 vectors norm1, norm1_bias, norm2, norm2_bias,
    q_bias, k_bias, v_bias, o_bias, fc1_bias, fc2_bias.

    >>> stack = VisionStack(patch, patch_bias, position, layers, post_norm, post_norm_bias,  # doctest: +SKIP
    ...                     projection_norm, projection, n_heads=16, ffn=4304, channels=3,
    ...                     image_size=896, patch_size=14, tokens_per_side=16, norm_eps=1e-6)
    >>> features = stack.encode(pixels)   # (n, 3, 896, 896) -> (n, 256, text_hidden)  # doctest: +SKIP
    """
    cdef blob_vision_model m
    cdef blob_vision_layer *layers
    cdef list _keep
    cdef object _scratch
    cdef object _busy
    cdef readonly size_t text_hidden, tokens

    def __cinit__(self):
        self.layers = NULL

    def __dealloc__(self):
        free(self.layers)

    def __init__(self, Matrix patch, patch_bias, Matrix position, layers, post_norm, post_norm_bias,
                 projection_norm, Matrix projection, *, size_t n_heads, size_t ffn, size_t channels,
                 size_t image_size, size_t patch_size, size_t tokens_per_side, float norm_eps):
        cdef size_t hidden = patch.m.rows
        if n_heads == 0 or hidden % n_heads:
            raise ValueError(f"VisionStack: hidden size {hidden} is not a multiple of n_heads ({n_heads})")
        if patch_size == 0 or image_size < patch_size:
            raise ValueError(f"VisionStack: image_size {image_size} holds no patch of {patch_size}")
        cdef size_t grid = image_size // patch_size
        if tokens_per_side == 0 or grid % tokens_per_side:
            raise ValueError(f"VisionStack: the {grid}x{grid} patch grid does not pool into {tokens_per_side}x"
                             f"{tokens_per_side} image tokens")
        self._keep = []
        self._scratch = np.empty(0, np.uint8)
        self._busy = threading.Lock()
        keep = self._keep
        self.m.n_layers, self.m.hidden, self.m.n_heads, self.m.head_dim = len(layers), hidden, n_heads, hidden // n_heads
        self.m.ffn, self.m.channels, self.m.image_size = ffn, channels, image_size
        self.m.patch_size, self.m.tokens_per_side, self.m.norm_eps = patch_size, tokens_per_side, norm_eps
        self.m.patch = _sized(patch, hidden, channels * patch_size * patch_size, "patch", keep)
        self.m.patch_bias = _vector_address(patch_bias, hidden, "patch_bias", keep)
        self.m.position = _sized(position, grid * grid, hidden, "position", keep)
        self.m.post_norm = _vector_address(post_norm, hidden, "post_norm", keep)
        self.m.post_norm_bias = _vector_address(post_norm_bias, hidden, "post_norm_bias", keep)
        self.m.projection_norm = _vector_address(projection_norm, hidden, "projection_norm", keep)
        self.m.projection = _sized(projection, projection.m.rows, hidden, "projection", keep)
        self.text_hidden = projection.m.rows
        self.tokens = tokens_per_side * tokens_per_side
        self.layers = <blob_vision_layer *>calloc(max(1, len(layers)), sizeof(blob_vision_layer))
        if self.layers == NULL:
            raise MemoryError("VisionStack: out of memory for the layer table")
        for i, layer in enumerate(layers):
            self._bind_layer(&self.layers[i], layer, f"layers.{i}.")
        self.m.layers = self.layers

    cdef _bind_layer(self, blob_vision_layer *l, layer, str name):
        cdef size_t hidden = self.m.hidden, ffn = self.m.ffn
        keep = self._keep
        l.q = _sized(layer.q, hidden, hidden, name + "q", keep)
        l.k = _sized(layer.k, hidden, hidden, name + "k", keep)
        l.v = _sized(layer.v, hidden, hidden, name + "v", keep)
        l.o = _sized(layer.o, hidden, hidden, name + "o", keep)
        l.fc1 = _sized(layer.fc1, ffn, hidden, name + "fc1", keep)
        l.fc2 = _sized(layer.fc2, hidden, ffn, name + "fc2", keep)
        l.norm1 = _vector_address(layer.norm1, hidden, name + "norm1", keep)
        l.norm1_bias = _vector_address(layer.norm1_bias, hidden, name + "norm1_bias", keep)
        l.norm2 = _vector_address(layer.norm2, hidden, name + "norm2", keep)
        l.norm2_bias = _vector_address(layer.norm2_bias, hidden, name + "norm2_bias", keep)
        l.q_bias = _vector_address(layer.q_bias, hidden, name + "q_bias", keep)
        l.k_bias = _vector_address(layer.k_bias, hidden, name + "k_bias", keep)
        l.v_bias = _vector_address(layer.v_bias, hidden, name + "v_bias", keep)
        l.o_bias = _vector_address(layer.o_bias, hidden, name + "o_bias", keep)
        l.fc1_bias = _vector_address(layer.fc1_bias, ffn, name + "fc1_bias", keep)
        l.fc2_bias = _vector_address(layer.fc2_bias, hidden, name + "fc2_bias", keep)

    def encode(self, pixels):
        """float32 pixels (n_images, channels, image_size, image_size), normalized -> float32
        image tokens (n_images, tokens_per_side**2, text_hidden)."""
        expected = (self.m.channels, self.m.image_size, self.m.image_size)
        a = np.asarray(pixels)
        if a.dtype != np.float32:
            raise TypeError(f"vision encode: pixel values must be float32, found {a.dtype}")
        if a.ndim != 4 or a.shape[1:] != expected:
            raise ValueError(f"vision encode: pixel values must be (n_images, {', '.join(map(str, expected))}), "
                             f"found shape {a.shape}")
        a = np.ascontiguousarray(a)
        cdef size_t n = a.shape[0]
        result = np.empty((n, self.tokens, self.text_hidden), np.float32)
        if n == 0:
            return result
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("vision encode: this VisionStack is running in another thread; use one per thread")
        try:
            needed = blob_vision_scratch_bytes(&self.m)
            if self._scratch.shape[0] < needed:
                self._scratch = np.empty(needed, np.uint8)
            return self._encode(a, n, result)
        finally:
            self._busy.release()

    cdef _encode(self, pixels, size_t n, result):
        cdef const float[:, :, :, ::1] pv = pixels
        cdef float[:, :, ::1] rv = result
        cdef void *scratch = <void *><uintptr_t>_address(self._scratch)
        cdef int status
        with nogil:
            status = blob_vision_encode(&self.m, &pv[0, 0, 0, 0], n, &rv[0, 0, 0], scratch)
        _check(status, "vision encode")
        return result

# Included by _kernels.pyx: the CPU's features, the instruction-set path and the thread pool.

# ---- CPU, ISA and threads ----

_FEATURE_BITS = {
    "sse4.2": 1 << 0, "avx2": 1 << 1, "fma": 1 << 2, "f16c": 1 << 3, "avx512f": 1 << 4,
    "avx512bw": 1 << 5, "avx512vnni": 1 << 6, "avxvnni": 1 << 7, "avx512vl": 1 << 8,
    "avx512dq": 1 << 9, "avx512bf16": 1 << 10,
    "neon": 1 << 16, "dotprod": 1 << 17, "crc32": 1 << 18,
}
_ISA_NAMES = tuple(blob_isa_name(i).decode() for i in range(BLOB_NUM_ISAS))


def cpu_features():
    """Names of the CPU features the kernels can use, e.g. ['sse4.2', 'avx2', 'fma', 'f16c']."""
    bits = blob_cpu_features()
    return [name for name, bit in _FEATURE_BITS.items() if bits & bit]


def available_isas():
    """The instruction-set paths this CPU supports, slowest first: ['scalar', 'avx2', 'avx512']."""
    return [name for i, name in enumerate(_ISA_NAMES) if blob_isa_supported(i)]


def get_isa():
    """The path the kernels use now: 'scalar', 'avx2', 'avx512' or 'neon'."""
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
        int8_dot = "dotprod" if get_isa() == "neon" else "vnni"
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


def trace_work_split(fn, size_t capacity=1 << 20):
    """Run fn() with every thread-pool job on the calling thread, timestamping each work item
    as it is planned for get_threads() threads; returns (fn's result, times, jobs): the event
    times in seconds (float64) and each event's job index (uint32), a job's first event being
    its start and its last one its end (bench/simulate_threads.py replays them on N threads).

    >>> result, times, jobs = trace_work_split(lambda: matmul(Matrix(np.eye(64, dtype=np.float32)), np.ones(64, np.float32)))
    """
    times = np.zeros(capacity, np.float64)
    jobs = np.zeros(capacity, np.uint32)
    cdef double[::1] tv = times
    cdef uint32_t[::1] jv = jobs
    blob_trace_begin(&tv[0], &jv[0], capacity)
    try:
        result = fn()
    finally:
        count = blob_trace_end()
    if count == <size_t>-1:
        raise ValueError(f"trace_work_split: more than {capacity} work items; pass a larger capacity")
    return result, times[:count], jobs[:count]

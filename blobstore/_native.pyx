# cython: language_level=3
"""C helpers of the file format: CRC32C over any buffer, with the GIL released."""

from libc.stdint cimport uint32_t


cdef extern from "crc32c.h" nogil:
    uint32_t blob_crc32c(uint32_t crc, const void *data, size_t length)
    uint32_t blob_crc32c_portable(uint32_t crc, const void *data, size_t length)
    const char *blob_crc32c_path()


ctypedef uint32_t (*crc_function)(uint32_t, const void *, size_t) noexcept nogil


cdef uint32_t _run(crc_function fn, data, uint32_t crc):
    cdef const unsigned char[::1] view = memoryview(data).cast("B")
    cdef size_t n = view.shape[0]
    cdef const unsigned char *ptr = &view[0] if n else NULL
    with nogil:
        crc = fn(crc, ptr, n)
    return crc


def crc32c(data, uint32_t crc=0):
    """CRC32C of a bytes-like object (continue a running value with `crc`).

    >>> hex(crc32c(b"123456789"))
    '0xe3069283'
    """
    return _run(blob_crc32c, data, crc)


def crc32c_portable(data, uint32_t crc=0):
    """The table-driven CRC32C, for testing the hardware path against."""
    return _run(blob_crc32c_portable, data, crc)


def crc32c_path():
    """Which CRC32C implementation this CPU uses: 'sse4.2', 'armv8-crc' or 'table'."""
    return blob_crc32c_path().decode()

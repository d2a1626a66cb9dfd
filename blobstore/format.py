"""The blob file format v1: constants, dtypes, the fixed header, and the layout arithmetic.

Everything here is shared by the writer and the reader, one definition each; docs/FORMAT.md is
the byte-level specification these functions implement.
"""
from __future__ import annotations

import enum
import math
import re
import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"BLOBST\x00\x1a"  # the NUL and 0x1A catch files mangled by text-mode transfers
MAJOR = 1
MINOR = 0

HEADER_SIZE = 64
ROW_ALIGN = 64             # every row of every tensor starts on a 64-byte boundary
FILE_ALIGN = 64 * 1024     # the file size is a multiple of this (arm64 kernels with 64 KiB pages)
DEFAULT_ALIGNMENT = 4096   # blob alignment: one page
MIN_ALIGNMENT = 64
MAX_ALIGNMENT = 1 << 30
MAX_MANIFEST_SIZE = 64 * 1024 * 1024
MAX_NDIM = 8
MAX_DIM = 1 << 40
QUANT_BLOCK = 32           # values per q8_0 / q4_0 block, one float16 scale each
TENSOR_NAME = re.compile(r"[A-Za-z0-9_.\-/]{1,255}")
TENSOR_NAME_RULE = "1-255 characters of A-Z a-z 0-9 _ . - /"

# Header and footer: magic, major, minor, header size, alignment, flags, blob count, file size,
# manifest offset, manifest size, manifest CRC32C, header CRC32C (of the 60 bytes before it).
HEADER_STRUCT = struct.Struct("<8sHHIIIQQQQII")
assert HEADER_STRUCT.size == HEADER_SIZE

# Features a file may require, and the format version that introduced each. A reader refuses a
# file requiring a feature it does not know, naming the version that added it.
KNOWN_FEATURES = {"tie": "1.0", "q8_0": "1.0", "q4_0": "1.0"}


class DType(enum.IntEnum):
    """Element types of stored tensors. The integer values are frozen: C code uses them."""

    F32 = 0
    F16 = 1
    BF16 = 2
    Q8_0 = 3
    Q4_0 = 4
    U8 = 5
    I8 = 6
    I32 = 7
    I64 = 8

    @classmethod
    def parse(cls, value: "DType | str | int") -> "DType":
        """DType from a member, its lower-case name ('q8_0') or its integer value.

        >>> DType.parse("bf16")
        <DType.BF16: 2>
        """
        if isinstance(value, DType):
            return value
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                raise ValueError(f"unknown dtype {value!r}; expected one of {dtype_names()}") from None
        return cls(value)

    @property
    def label(self) -> str:
        """The name used in manifests and on the command line: 'f32', 'q8_0', ..."""
        return self.name.lower()

    @property
    def is_quantized(self) -> bool:
        return self in _QUANTIZED

    @property
    def numpy(self) -> np.dtype:
        """numpy dtype of one stored element (bf16 as its raw uint16 bits; quantized types have none)."""
        if self.is_quantized:
            raise ValueError(f"{self.label} has no single numpy element type")
        return np.dtype(_NUMPY_TYPES[self])


_NUMPY_TYPES = {
    DType.F32: "<f4", DType.F16: "<f2", DType.BF16: "<u2", DType.U8: "u1",
    DType.I8: "i1", DType.I32: "<i4", DType.I64: "<i8",
}
_QUANT_BYTES_PER_BLOCK = {DType.Q8_0: 32, DType.Q4_0: 16}
_QUANTIZED = frozenset(_QUANT_BYTES_PER_BLOCK)


def dtype_names() -> list[str]:
    return [d.label for d in DType]


def dtype_of_numpy(array_dtype: np.dtype) -> DType:
    """The stored dtype that holds numpy dtype `array_dtype` without conversion."""
    for dtype, name in _NUMPY_TYPES.items():
        if dtype is not DType.BF16 and np.dtype(name) == np.dtype(array_dtype).newbyteorder("<"):
            return dtype
    raise ValueError(f"numpy dtype {array_dtype} cannot be stored; expected one of {dtype_names()}")


# ---- alignment helpers: plain functions, shared by writer and reader ----

def round_up(n: int, alignment: int) -> int:
    """Smallest multiple of `alignment` that is >= n.

    >>> round_up(100, 64)
    128
    """
    return (n + alignment - 1) // alignment * alignment


def padding(n: int, alignment: int) -> int:
    """Zero bytes needed after n bytes to reach the next multiple of `alignment`."""
    return round_up(n, alignment) - n


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def data_start(alignment: int) -> int:
    """Offset of the first blob: the header, padded to the blob alignment."""
    return round_up(HEADER_SIZE, alignment)


def padded_file_size(manifest_end: int) -> int:
    """File size for a manifest ending at `manifest_end`: room for the footer, padded to 64 KiB."""
    return round_up(manifest_end + HEADER_SIZE, FILE_ALIGN)


# ---- tensor layout ----

@dataclass(frozen=True)
class Layout:
    """Where a tensor's bytes live inside its blob.

    Every tensor is `rows` rows of `cols` values, rows = product of all but the last dimension.
    Plain dtypes: rows of `row_stride` bytes. Quantized dtypes: a plane of quants (rows of
    `row_stride` bytes), then at `scales_offset` a packed plane of rows x `blocks` float16 scales.
    """

    rows: int
    cols: int
    row_stride: int
    blocks: int          # quant blocks per row (0 for plain dtypes)
    scales_offset: int   # start of the scale plane within the blob (0 for plain dtypes)
    nbytes: int


def rows_and_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    """Rows and columns of the 2-D view every tensor is stored as."""
    if len(shape) <= 1:
        return 1, math.prod(shape)
    return math.prod(shape[:-1]), shape[-1]


def layout(dtype: DType, shape: tuple[int, ...]) -> Layout:
    """The byte layout of a tensor; exact Python integers, so huge shapes cannot overflow.

    >>> layout(DType.Q8_0, (3, 40))
    Layout(rows=3, cols=40, row_stride=64, blocks=2, scales_offset=192, nbytes=204)
    """
    rows, cols = rows_and_cols(shape)
    if not dtype.is_quantized:
        stride = round_up(cols * dtype.numpy.itemsize, ROW_ALIGN)
        return Layout(rows, cols, stride, 0, 0, rows * stride)
    blocks = -(-cols // QUANT_BLOCK)
    stride = round_up(blocks * _QUANT_BYTES_PER_BLOCK[dtype], ROW_ALIGN)
    scales_offset = rows * stride
    return Layout(rows, cols, stride, blocks, scales_offset, scales_offset + rows * blocks * 2)


# ---- the fixed header ----

@dataclass(frozen=True)
class Header:
    major: int
    minor: int
    alignment: int
    blob_count: int
    file_size: int
    manifest_offset: int
    manifest_size: int
    manifest_crc32c: int
    flags: int = 0

    def pack(self, crc32c) -> bytes:
        """The 64 header bytes, its own CRC32C (computed with `crc32c`) last."""
        body = HEADER_STRUCT.pack(
            MAGIC, self.major, self.minor, HEADER_SIZE, self.alignment, self.flags, self.blob_count,
            self.file_size, self.manifest_offset, self.manifest_size, self.manifest_crc32c, 0,
        )[:-4]
        return body + struct.pack("<I", crc32c(body))

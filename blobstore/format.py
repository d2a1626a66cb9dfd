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
FORMAT_NAME = "blobstore"  # the manifest's format.name
MAJOR = 1
MINOR = 3  # the newest minor version this code reads and writes; a file says the oldest that reads it

HEADER_SIZE = 64
ROW_ALIGN = 64             # every row of every tensor starts on a 64-byte boundary
FILE_ALIGN = 64 * 1024     # the file size is a multiple of this (arm64 kernels with 64 KiB pages)
DEFAULT_ALIGNMENT = 4096   # blob alignment: one page
MIN_ALIGNMENT = 64
MAX_ALIGNMENT = 1 << 30
MAX_MANIFEST_SIZE = 64 * 1024 * 1024
MAX_NDIM = 8
MAX_DIM = 1 << 40
MANIFEST_ALIGN = 64        # the manifest starts on a 64-byte boundary too
TENSOR_NAME = re.compile(r"[A-Za-z0-9_.\-/]{1,255}")
TENSOR_NAME_RULE = "1-255 characters of A-Z a-z 0-9 _ . - /"

# Header and footer: magic, major, minor, header size, alignment, flags, blob count, file size,
# manifest offset, manifest size, manifest CRC32C, header CRC32C (of the 60 bytes before it).
HEADER_STRUCT = struct.Struct("<8sHHIIIQQQQII")
assert HEADER_STRUCT.size == HEADER_SIZE

# Features a file may require, and the format version that introduced each. A reader refuses a
# file requiring a feature it does not know, naming the version that added it. Besides `tie` and
# the plane arrangements below, a feature is a stored type (its DTypeSpec.feature_since).
TIE_FEATURE = "tie"

# How a tensor's bytes are arranged: its record's `layout` (FORMAT.md §4). Plain types store
# "rows"; quantized ones "planar" (row after row, plane after plane), or for the types of
# INTERLEAVED "interleave8": rows in groups of eight, each block of the eight rows side by side in
# the type's own tile (the one the matrix kernels read fastest, csrc/kernels.h
# BLOB_LAYOUT_INTERLEAVE8). A file holding a tensor in an arrangement added after 1.0 requires
# that type's arrangement as a feature, with its version here.
ROWS, PLANAR, INTERLEAVE8 = "rows", "planar", "interleave8"
INTERLEAVE = 8                      # rows per group of interleave8


@dataclass(frozen=True)
class Interleaved:
    """A type's interleave8 arrangement: the feature a file storing it requires, since `since`."""

    feature: str
    since: str


# Per type: FORMAT.md §5.5 (q8_0), §5.6 (q4_0), §5.7 (q5_0).
INTERLEAVED = {
    "q8_0": Interleaved("interleave8", "1.2"),
    "q4_0": Interleaved("interleave8_q4_0", "1.3"),
    "q5_0": Interleaved("interleave8_q5_0", "1.3"),
}
LAYOUT_FEATURES = {i.feature: i.since for i in INTERLEAVED.values()}


class DType(enum.IntEnum):
    """Element types of stored tensors. The integer values are frozen: C code uses them
    (csrc/kernels.h's enum blob_dtype, checked against these by tests/test_dtype_table.py)."""

    F32 = 0
    F16 = 1
    BF16 = 2
    Q8_0 = 3
    Q4_0 = 4
    U8 = 5
    I8 = 6
    I32 = 7
    I64 = 8
    Q4_1 = 9
    Q5_0 = 10
    Q5_1 = 11
    Q2_K = 12
    Q3_K = 13
    Q4_K = 14
    Q5_K = 15
    Q6_K = 16

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
    def spec(self) -> "DTypeSpec":
        """Every fact about this type: block size, planes, who reads it (the table DTYPE_SPECS).

        >>> DType.Q4_0.spec.block, DType.Q4_0.spec.block_bytes
        (32, 18)
        """
        return DTYPE_SPECS[self]

    @property
    def label(self) -> str:
        """The name used in manifests and on the command line: 'f32', 'q8_0', ..."""
        return self.spec.label

    @property
    def is_quantized(self) -> bool:
        """Stored in blocks of several values over more than one plane (q8_0, q4_0, q4_k, ...)."""
        return len(self.spec.planes) > 1

    @property
    def numpy(self) -> np.dtype:
        """numpy dtype of one stored element (bf16 as its raw uint16 bits; quantized types have none)."""
        if self.is_quantized:
            raise ValueError(f"{self.label} has no single numpy element type")
        return self.spec.planes[0].numpy


@dataclass(frozen=True)
class Plane:
    """One array of a stored tensor's blob: `per_block` elements of numpy type `element` for each
    block of values. The first plane of a type is stored as rows padded to ROW_ALIGN bytes; every
    later one is packed (rows x blocks x per_block elements) and starts on a ROW_ALIGN boundary."""

    name: str
    element: str     # numpy dtype string, little-endian
    per_block: int

    @property
    def numpy(self) -> np.dtype:
        return np.dtype(self.element)

    @property
    def block_bytes(self) -> int:
        return self.per_block * self.numpy.itemsize


@dataclass(frozen=True)
class DTypeSpec:
    """The facts of one stored type, read by the writer, the reader, the converter and the runtime."""

    label: str                   # its name in manifests and on the command line
    block: int                   # values per block (1 for plain types)
    planes: tuple[Plane, ...]    # plain types: one plane of values; quantized: quants, [high], ..., scales, [mins]
    bits: int                    # bits of one stored value, scales not counted (q4_0: 4, q5_k: 4 + 1 high bit)
    matmul: bool = False         # the C kernels multiply weight matrices of it (csrc/kernels.h)
    weight_choice: bool = False  # blob-pack convert offers it for --dtype / --embed-dtype
    feature_since: str | None = None  # a file using it lists it in features_required, with this version
    whole_blocks: bool = False   # a row must be a whole number of blocks (q8_0/q4_0 zero-pad the last one)
    ggml_type: int | None = None  # the GGML/GGUF type of the same values and bytes (GGMLQuantizationType)
    ggml_fields: tuple[str, ...] = ()  # ggml's block struct: which plane each field is, in struct order

    @property
    def block_bytes(self) -> int:
        """Bytes one block of values occupies, all planes together (q8_0: 32 quants + a 2-byte scale)."""
        return sum(plane.block_bytes for plane in self.planes)


def _plain(label: str, element: str, bits: int, **roles) -> DTypeSpec:
    return DTypeSpec(label, 1, (Plane("values", element, 1),), bits, **roles)


def _blockwise(label: str, quant_element: str, quants_per_block: int, bits: int, ggml_type: int) -> DTypeSpec:
    """A type of 32-value blocks: a plane of quants, then one float16 scale per block (ggml: scale first)."""
    return DTypeSpec(label, 32, (Plane("quants", quant_element, quants_per_block), Plane("scales", "<f2", 1)), bits,
                     matmul=True, weight_choice=True, feature_since="1.0", ggml_type=ggml_type,
                     ggml_fields=("scales", "quants"))


_PLANE_ELEMENTS = {"quants": "u1", "high": "u1", "sub_scales": "u1", "scales": "<f2", "mins": "<f2"}


def _ggml_type(label: str, block: int, bits: int, ggml_type: int, ggml_fields: str, *, elements=(),
               weight_choice: bool = False, **per_block: int) -> DTypeSpec:
    """A type holding ggml's numbers: each field of ggml's block struct is one plane, in our plane order
    (quants, high, sub_scales, scales, mins); `ggml_fields` lists them in the struct's order. Added in
    format 1.1; the C kernels multiply every one of them (`matmul`); a quantizer switches
    `weight_choice` on."""
    element = {**_PLANE_ELEMENTS, **dict(elements)}
    planes = tuple(Plane(name, element[name], count) for name, count in per_block.items())
    return DTypeSpec(label, block, planes, bits, feature_since="1.1", whole_blocks=True, ggml_type=ggml_type,
                     ggml_fields=tuple(ggml_fields.split()), matmul=True, weight_choice=weight_choice)


DTYPE_SPECS: dict[DType, DTypeSpec] = {
    DType.F32: _plain("f32", "<f4", 32, matmul=True, weight_choice=True, ggml_type=0),
    DType.F16: _plain("f16", "<f2", 16, matmul=True, weight_choice=True, ggml_type=1),
    DType.BF16: _plain("bf16", "<u2", 16, matmul=True, weight_choice=True, ggml_type=30),  # raw bfloat16 bits
    DType.Q8_0: _blockwise("q8_0", "i1", 32, 8, ggml_type=8),
    DType.Q4_0: _blockwise("q4_0", "u1", 16, 4, ggml_type=2),  # two 4-bit values per byte
    DType.U8: _plain("u8", "u1", 8),
    DType.I8: _plain("i8", "i1", 8),
    DType.I32: _plain("i32", "<i4", 32),
    DType.I64: _plain("i64", "<i8", 64),
    DType.Q4_1: _ggml_type("q4_1", 32, 4, 3, "scales mins quants", quants=16, scales=1, mins=1,
                           weight_choice=True),
    DType.Q5_0: _ggml_type("q5_0", 32, 5, 6, "scales high quants", quants=16, high=4, scales=1, weight_choice=True),
    DType.Q5_1: _ggml_type("q5_1", 32, 5, 7, "scales mins high quants", quants=16, high=4, scales=1, mins=1,
                           weight_choice=True),
    DType.Q2_K: _ggml_type("q2_k", 256, 2, 10, "sub_scales quants scales mins",
                           quants=64, sub_scales=16, scales=1, mins=1, weight_choice=True),
    DType.Q3_K: _ggml_type("q3_k", 256, 3, 11, "high quants sub_scales scales", quants=64, high=32, sub_scales=12, scales=1,
                           weight_choice=True),
    DType.Q4_K: _ggml_type("q4_k", 256, 4, 12, "scales mins sub_scales quants", quants=128, sub_scales=12, scales=1, mins=1,
                           weight_choice=True),
    DType.Q5_K: _ggml_type("q5_k", 256, 5, 13, "scales mins sub_scales high quants",
                           quants=128, high=32, sub_scales=12, scales=1, mins=1, weight_choice=True),
    DType.Q6_K: _ggml_type("q6_k", 256, 6, 14, "quants high sub_scales scales",
                           quants=128, high=64, sub_scales=16, scales=1, elements={"sub_scales": "i1"},
                           weight_choice=True),
}
assert set(DTYPE_SPECS) == set(DType) and all(s.label == d.name.lower() for d, s in DTYPE_SPECS.items())

def dtype_of_ggml(ggml_type: int) -> DType | None:
    """The stored type holding GGML type `ggml_type`'s values bit for bit, or None.

    >>> dtype_of_ggml(12), dtype_of_ggml(23)   # Q4_K, IQ4_XS
    (<DType.Q4_K: 14>, None)
    """
    return next((d for d, s in DTYPE_SPECS.items() if s.ggml_type == ggml_type), None)


KNOWN_FEATURES = {TIE_FEATURE: "1.0", **LAYOUT_FEATURES,
                  **{s.label: s.feature_since for s in DTYPE_SPECS.values() if s.feature_since}}


def layouts_of(dtype: DType) -> tuple[str, ...]:
    """The arrangements a tensor of `dtype` may be stored in, the default first.

    >>> layouts_of(DType.Q8_0), layouts_of(DType.F16)
    (('planar', 'interleave8'), ('rows',))
    """
    if not dtype.is_quantized:
        return (ROWS,)
    return (PLANAR, INTERLEAVE8) if dtype.label in INTERLEAVED else (PLANAR,)
assert all(int(since.split(".")[1]) <= MINOR for since in KNOWN_FEATURES.values())


def layout_feature(dtype: DType, kind: str) -> str | None:
    """The feature a file storing a `dtype` tensor in arrangement `kind` must require, or None.

    >>> layout_feature(DType.Q4_0, INTERLEAVE8), layout_feature(DType.Q4_0, PLANAR)
    ('interleave8_q4_0', None)
    """
    return INTERLEAVED[dtype.label].feature if kind == INTERLEAVE8 else None


def file_minor(features) -> int:
    """The minor version a file requiring `features` declares: the newest one among them, so a file of
    format-1.0 features stays readable as 1.0.

    >>> file_minor(["tie", "q8_0"]), file_minor(["q4_k"])
    (0, 1)
    """
    return max((int(KNOWN_FEATURES[f].split(".")[1]) for f in features), default=0)


def dtype_names() -> list[str]:
    return [d.label for d in DType]


def dtype_of_numpy(array_dtype: np.dtype) -> DType:
    """The stored dtype that holds numpy dtype `array_dtype` without conversion."""
    for dtype in DType:
        if dtype is not DType.BF16 and not dtype.is_quantized and dtype.numpy == np.dtype(array_dtype).newbyteorder("<"):
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
    Plain dtypes: rows of `row_stride` bytes. Quantized dtypes: the first plane (quants) in rows
    of `row_stride` bytes, then each later plane packed, rows x `blocks` x its per-block elements,
    at `plane_offsets[i]` (the scales, plane 1, at `scales_offset`). Interleave8 (format.INTERLEAVED):
    each plane in groups of INTERLEAVE rows, the first `row_stride` bytes a group, every plane at
    its `plane_offsets[i]` (FORMAT.md §5.5 - §5.7).
    """

    rows: int
    cols: int
    row_stride: int      # bytes of a row (interleave8: of a group of INTERLEAVE rows)
    blocks: int          # quant blocks per row (0 for plain dtypes)
    scales_offset: int   # start of the scale plane within the blob (0 for plain dtypes)
    nbytes: int
    plane_offsets: tuple[int, ...] = (0,)   # start of each plane of DTypeSpec.planes within the blob
    kind: str = ROWS     # the arrangement, the record's `layout`: rows, planar or interleave8


def rows_and_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    """Rows and columns of the 2-D view every tensor is stored as."""
    if len(shape) <= 1:
        return 1, math.prod(shape)
    return math.prod(shape[:-1]), shape[-1]


def layout(dtype: DType, shape: tuple[int, ...], kind: str | None = None) -> Layout:
    """The byte layout of a tensor stored in arrangement `kind` (None: the type's default, see
    layouts_of); exact Python integers, so huge shapes cannot overflow.

    >>> layout(DType.Q8_0, (3, 40))
    Layout(rows=3, cols=40, row_stride=64, blocks=2, scales_offset=192, nbytes=204, plane_offsets=(0, 192), kind='planar')
    >>> layout(DType.Q8_0, (3, 40), INTERLEAVE8)   # one group of eight rows: 2 blocks of 256 bytes
    Layout(rows=3, cols=40, row_stride=512, blocks=2, scales_offset=512, nbytes=544, plane_offsets=(0, 512), kind='interleave8')
    >>> layout(DType.Q4_0, (3, 40), INTERLEAVE8)   # q4_0's: 2 blocks of 128 bytes
    Layout(rows=3, cols=40, row_stride=256, blocks=2, scales_offset=256, nbytes=288, plane_offsets=(0, 256), kind='interleave8')
    >>> layout(DType.Q5_0, (3, 96), INTERLEAVE8)   # q5_0's: nibbles, fifth bits, scales, each in groups
    Layout(rows=3, cols=96, row_stride=384, blocks=3, scales_offset=384, nbytes=560, plane_offsets=(0, 384, 512), kind='interleave8')
    """
    rows, cols = rows_and_cols(shape)
    spec = dtype.spec
    kind = kind or layouts_of(dtype)[0]
    if kind not in layouts_of(dtype):
        raise ValueError(f"{dtype.label} cannot be stored as {kind!r}; its layouts are {list(layouts_of(dtype))}")
    blocks = -(-cols // spec.block)
    first, *packed = spec.planes
    if kind == INTERLEAVE8:   # every plane's rows are groups of eight rows, each plane from a 64-byte boundary
        groups, offsets, end = -(-rows // INTERLEAVE), [], 0
        for plane in spec.planes:
            offsets.append(round_up(end, ROW_ALIGN))
            end = offsets[-1] + groups * blocks * INTERLEAVE * plane.block_bytes
        return Layout(rows, cols, blocks * INTERLEAVE * first.block_bytes, blocks, offsets[1], end, tuple(offsets), kind)
    stride = round_up(blocks * first.block_bytes, ROW_ALIGN)
    if not packed:
        return Layout(rows, cols, stride, 0, 0, rows * stride)
    offsets, end = [0], rows * stride
    for plane in packed:
        offsets.append(round_up(end, ROW_ALIGN))
        end = offsets[-1] + rows * blocks * plane.block_bytes
    return Layout(rows, cols, stride, blocks, offsets[1], end, tuple(offsets), kind)


def plane_shapes(dtype: DType, shape: tuple[int, ...], kind: str | None = None) -> tuple[tuple[int, int], ...]:
    """The 2-D shape, in elements of its type, of each plane of a quantized tensor stored in
    arrangement `kind` (see layout): planar, the first (rows, row_stride / itemsize) with its row
    padding and every later one (rows, blocks * per_block); interleave8, each
    (groups, blocks * INTERLEAVE * per_block), groups = ceil(rows / INTERLEAVE).

    >>> plane_shapes(DType.Q5_0, (9, 64), INTERLEAVE8)   # nibbles, fifth bits, scales of 2 groups
    ((2, 256), (2, 64), (2, 16))
    >>> plane_shapes(DType.Q8_0, (3, 40))
    ((3, 64), (3, 2))
    """
    lay = layout(dtype, shape, kind)
    first, *later = dtype.spec.planes
    if lay.kind == INTERLEAVE8:
        groups = -(-lay.rows // INTERLEAVE)
        return tuple((groups, lay.blocks * INTERLEAVE * plane.per_block) for plane in dtype.spec.planes)
    return ((lay.rows, lay.row_stride // first.numpy.itemsize),
            *((lay.rows, lay.blocks * plane.per_block) for plane in later))


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

"""open(): validate a blob file completely, then map it and hand out zero-copy views.

Nothing is mapped, and no view is made, before every header field and every tensor record has
been checked, so a damaged or hostile file raises a FormatError instead of crashing the process.
"""
from __future__ import annotations

import builtins
import json
import math
import mmap
import os
from dataclasses import dataclass

import numpy as np

from . import errors, quant
from ._native import crc32c
from .format import (
    FILE_ALIGN, FORMAT_NAME, HEADER_SIZE, HEADER_STRUCT, KNOWN_FEATURES, MAGIC, MAJOR, MANIFEST_ALIGN,
    MAX_ALIGNMENT, MAX_DIM, MAX_MANIFEST_SIZE, MAX_NDIM, MIN_ALIGNMENT, MINOR, TENSOR_NAME, TENSOR_NAME_RULE,
    INTERLEAVE8, PLANAR, ROWS, DType, Header, data_start, is_power_of_two, layout, layout_feature, layouts_of,
    plane_shapes, rows_and_cols,
)

MAX_TENSORS = 1_000_000
DATA_KEYS = {"name", "dtype", "shape", "layout", "row_stride", "offset", "nbytes", "crc32c", "component", "source"}
TIE_KEYS = {"name", "tie", "component", "source"}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor record. For a tie, the data fields are those of the tensor it aliases."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    row_stride: int
    offset: int
    nbytes: int
    crc32c: int
    component: str
    source: str | None
    tie: str | None = None
    layout: str = ROWS   # how its bytes are arranged: rows, planar or interleave8 (format.py)


@dataclass(frozen=True)
class QuantizedTensor:
    """Zero-copy views of a quantized tensor's planes, in the order of its DTypeSpec.planes. Layout
    "planar": the first (rows, row_stride / itemsize) with its row padding, every later one (rows,
    blocks * per_block). "interleave8" (format.INTERLEAVED): each plane (groups, blocks * 8 *
    per_block), groups of eight rows (quant.interleave8 says how they are arranged)."""

    dtype: DType
    shape: tuple[int, ...]
    planes: tuple[np.ndarray, ...]
    layout: str = PLANAR

    @property
    def quants(self) -> np.ndarray:
        """The first plane as stored: int8 (q8_0) or uint8 packed levels, rows padded to 64 bytes
        (interleave8: groups of eight rows, see the class docstring; `planar()` gives rows)."""
        return self.planes[0]

    @property
    def scales(self) -> np.ndarray:
        """The float16 block (or super-block) scales as stored: (rows, blocks) in the planar
        layout, (groups, blocks * 8) in interleave8 (`planar()` gives them per row either way)."""
        return self.plane("scales")

    def plane(self, name: str) -> np.ndarray:
        """The plane called `name` ('quants', 'high', 'sub_scales', 'scales', 'mins')."""
        names = [p.name for p in self.dtype.spec.planes]
        if name not in names:
            raise KeyError(f"{self.dtype.label} has no plane {name!r}; its planes are {names}")
        return self.planes[names.index(name)]

    def planar(self) -> tuple[np.ndarray, ...]:
        """The planes in the planar arrangement (FORMAT.md §5.2): these views for a planar tensor, a
        rearranged copy (quant.deinterleave8) for an interleave8 one.

        >>> quant.ggml_from_planes(t.dtype, t.planar())   # the ggml blocks, whatever the layout  # doctest: +SKIP
        """
        if self.layout == INTERLEAVE8:
            return quant.deinterleave8(self.planes, rows=rows_and_cols(self.shape)[0], dtype=self.dtype)
        return self.planes

    def dequantize(self) -> np.ndarray:
        """A float32 copy of the tensor's values, of shape `shape`."""
        cols = self.shape[-1] if self.shape else 1
        return quant.dequantize(self.planar(), cols, self.dtype).reshape(self.shape)


def open(path, verify: str = "header") -> "BlobReader":  # noqa: A001 - the public name is blobstore.open
    """Open and validate a blob file; `verify="full"` also checks every blob's CRC32C.

    >>> with open("model.blob") as r:          # doctest: +SKIP
    ...     embed = r["embed"]                  # a read-only view on the mapped file
    """
    if verify not in ("header", "full"):
        raise ValueError(f"verify must be 'header' or 'full', got {verify!r}")
    reader = BlobReader(path)
    if verify == "full":
        try:
            reader.verify()
        except BaseException:
            reader.close()
            raise
    return reader


class BlobReader:
    """A validated, memory-mapped blob file. Use `blobstore.open()` to make one."""

    def __init__(self, path):
        self.path = os.fspath(path)
        with builtins.open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self.header = _read_header(f, size, self.path)
            document = _read_manifest(f, self.header, self.path)
            self._infos = _validate_tensors(document, self.header, self.path)
            self.metadata: dict = document["metadata"]
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        # Views are cut from this array, which holds a buffer export on the map: while any view
        # lives, the map cannot be closed under it (numpy's buffer= alone would not prevent that).
        self._bytes = np.frombuffer(self._map, np.uint8)

    # ---- the mapping ----

    @property
    def alignment(self) -> int:
        return self.header.alignment

    @property
    def version(self) -> tuple[int, int]:
        return self.header.major, self.header.minor

    def keys(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name) -> bool:
        return name in self._infos

    def __iter__(self):
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, name: str) -> TensorInfo:
        """The record of tensor `name` (a tie resolves to its target's data fields)."""
        try:
            return self._infos[name]
        except KeyError:
            raise errors.MissingTensor(f"{self.path}: no tensor {name!r} in the file ({len(self)} tensors)") from None

    def infos(self) -> list[TensorInfo]:
        return list(self._infos.values())

    def __getitem__(self, name: str):
        """Read-only zero-copy view: an ndarray (bf16 as uint16 bits) or a QuantizedTensor."""
        info = self.info(name)
        if self._bytes is None:
            raise ValueError(f"{self.path}: the reader is closed")
        lay = layout(info.dtype, info.shape, info.layout)
        if info.dtype.is_quantized:
            planes = tuple(np.ndarray(plane_shape, plane.numpy, self._bytes, info.offset + at)
                           for plane, plane_shape, at in zip(info.dtype.spec.planes,
                                                             plane_shapes(info.dtype, info.shape, info.layout),
                                                             lay.plane_offsets))
            return QuantizedTensor(info.dtype, info.shape, planes, info.layout)
        return np.ndarray(info.shape, info.dtype.numpy, self._bytes, info.offset,
                          _strides(info.shape, info.dtype.numpy.itemsize, lay.row_stride))

    def blob(self, name: str) -> np.ndarray:
        """The `nbytes` bytes the file stores for a tensor (a tie: its target's), as a read-only uint8
        view on the map, padding included: what BlobWriter.add_stored copies.

        >>> r.blob("embed").size == r.info("embed").nbytes   # doctest: +SKIP
        True
        """
        info = self.info(name)
        if self._bytes is None:
            raise ValueError(f"{self.path}: the reader is closed")
        return self._bytes[info.offset:info.offset + info.nbytes]

    def float32(self, name: str) -> np.ndarray:
        """A float32 copy of a tensor's values, whatever its stored dtype."""
        view = self[name]
        if isinstance(view, QuantizedTensor):
            return view.dequantize()
        if self.info(name).dtype is DType.BF16:
            return quant.bf16_to_f32(view)
        return np.array(view, np.float32)

    def file_bytes(self, name: str) -> bytes:
        """The verbatim bytes of a blob added with BlobWriter.add_file (a tokenizer, say)."""
        info = self.info(name)
        if info.dtype is not DType.U8 or len(info.shape) != 1:
            raise errors.InvalidTensor(f"{self.path}: {name!r} is {info.dtype.label} {list(info.shape)}, not a file blob")
        return self[name].tobytes()

    # ---- integrity ----

    def verify(self):
        """Check every blob's CRC32C; raise ChecksumMismatch naming all damaged blobs."""
        if self._bytes is None:
            raise ValueError(f"{self.path}: the reader is closed")
        damaged = []
        with memoryview(self._map) as whole:
            for info in self._data_infos():
                _advise_sequential(self._map, info.offset, info.nbytes)
                with whole[info.offset:info.offset + info.nbytes] as blob:
                    found = crc32c(blob)
                if found != info.crc32c:
                    damaged.append((info.name, info.crc32c, found))
        if damaged:
            lines = "\n".join(f"  {n}: expected CRC32C {e:08x}, found {f:08x}" for n, e, f in damaged)
            raise errors.ChecksumMismatch(f"{self.path}: {len(damaged)} damaged blob(s):\n{lines}",
                                          tuple(n for n, _, _ in damaged))

    def _data_infos(self):
        return [i for i in self._infos.values() if i.tie is None]

    # ---- lifetime ----

    def close(self):
        """Release the mapping. Views still alive keep it mapped until they are gone."""
        if self._bytes is None:
            return
        self._bytes = None
        try:
            self._map.close()
        except BufferError:
            pass  # views still export the map; it is unmapped when the last one is collected
        self._map = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<BlobReader {self.path!r}: {len(self)} tensors, format {self.version[0]}.{self.version[1]}>"


def _strides(shape, itemsize, row_stride):
    """Byte strides of a view whose rows are `row_stride` apart."""
    if len(shape) <= 1:
        return (itemsize,) * len(shape)
    strides = [itemsize, row_stride]
    for dim in reversed(shape[1:-1]):
        strides.append(strides[-1] * dim)
    return tuple(reversed(strides))


def _advise_sequential(mapping, offset, nbytes):
    """Tell the kernel a range will be read front to back (read-ahead), where it listens."""
    if hasattr(mapping, "madvise") and hasattr(mmap, "MADV_SEQUENTIAL") and nbytes:
        start = offset - offset % mmap.PAGESIZE
        mapping.madvise(mmap.MADV_SEQUENTIAL, start, offset + nbytes - start)


# ---- header ----

def _read_header(f, size: int, path: str) -> Header:
    raw = f.read(HEADER_SIZE)
    if raw[:len(MAGIC)] != MAGIC[:len(raw)] or len(raw) < len(MAGIC):
        if MAGIC.startswith(raw):
            raise errors.TruncatedFile(f"{path}: file is {size} bytes, too short for a blob file header")
        raise errors.NotABlobFile(f"{path}: not a blob file (first bytes {raw[:8]!r}, expected magic {MAGIC!r})")
    if len(raw) < HEADER_SIZE:
        raise errors.TruncatedFile(f"{path}: file is {size} bytes, shorter than the {HEADER_SIZE}-byte header")
    fields = HEADER_STRUCT.unpack(raw)
    _, major, minor, header_size, alignment, flags, blobs, file_size, m_offset, m_size, m_crc, h_crc = fields
    if major != MAJOR:
        raise errors.UnsupportedVersion(
            f"{path}: format version {major}.{minor}; this reader reads major version {MAJOR} (up to {MAJOR}.{MINOR})")
    if crc32c(raw[:-4]) != h_crc:
        raise errors.ChecksumMismatch(f"{path}: header CRC32C is {h_crc:08x}, the header bytes give "
                                      f"{crc32c(raw[:-4]):08x} (damaged header)", ("header",))
    header = Header(major, minor, alignment, blobs, file_size, m_offset, m_size, m_crc, flags)
    _check_header_fields(header, header_size, size, path)
    f.seek(file_size - HEADER_SIZE)
    if f.read(HEADER_SIZE) != raw:
        raise errors.CorruptHeader(f"{path}: the footer (last {HEADER_SIZE} bytes) differs from the header")
    return header


def _check_header_fields(h: Header, header_size: int, size: int, path: str):
    def bad(field, expected, found, kind=errors.CorruptHeader):
        raise kind(f"{path}: header field {field}: expected {expected}, found {found}")

    if header_size != HEADER_SIZE:
        bad("header_size", HEADER_SIZE, header_size)
    if h.flags != 0:
        bad("flags", "0 (no flags are defined in format 1.x)", h.flags)
    if not (is_power_of_two(h.alignment) and MIN_ALIGNMENT <= h.alignment <= MAX_ALIGNMENT):
        bad("alignment", f"a power of two from {MIN_ALIGNMENT} to {MAX_ALIGNMENT}", h.alignment)
    if h.file_size > size:
        bad("file_size", f"the file to be {h.file_size} bytes (truncated download?)", f"{size} bytes", errors.TruncatedFile)
    if h.file_size != size:
        bad("file_size", f"{h.file_size} bytes", f"a file of {size} bytes (extra bytes at the end)")
    if h.file_size % FILE_ALIGN:
        bad("file_size", f"a multiple of {FILE_ALIGN}", h.file_size)
    if h.manifest_size > MAX_MANIFEST_SIZE:
        bad("manifest_size", f"at most {MAX_MANIFEST_SIZE} bytes", h.manifest_size, errors.CorruptManifest)
    manifest_end = h.manifest_offset + h.manifest_size
    if h.manifest_offset < data_start(h.alignment) or manifest_end > h.file_size - HEADER_SIZE:
        bad("manifest_offset/size", f"a range inside [{data_start(h.alignment)}, {h.file_size - HEADER_SIZE})",
            f"[{h.manifest_offset}, {manifest_end})")
    if h.manifest_offset % MANIFEST_ALIGN:
        bad("manifest_offset", f"a multiple of {MANIFEST_ALIGN}", h.manifest_offset)


# ---- manifest ----

def _read_manifest(f, h: Header, path: str) -> dict:
    f.seek(h.manifest_offset)
    raw = f.read(h.manifest_size)
    if crc32c(raw) != h.manifest_crc32c:
        raise errors.ChecksumMismatch(f"{path}: manifest CRC32C is {crc32c(raw):08x}, the header records "
                                      f"{h.manifest_crc32c:08x} (damaged manifest)", ("manifest",))
    try:
        document = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys,
                              parse_constant=_no_constants, parse_float=_finite_float)
    except UnicodeDecodeError as error:
        raise errors.CorruptManifest(f"{path}: manifest is not UTF-8 ({error})") from None
    except (ValueError, RecursionError) as error:
        raise errors.CorruptManifest(f"{path}: manifest is not valid JSON: {error}") from None
    _check_manifest_shape(document, path)
    _check_format_section(document["format"], h, path)
    _check_features(document["features_required"], path)
    return document


def _no_duplicate_keys(pairs):
    result = dict(pairs)
    if len(result) != len(pairs):
        keys = [k for k, _ in pairs]
        duplicate = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"duplicate key {duplicate!r}")
    return result


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} overflows to infinity")
    return value


def _no_constants(name):
    raise ValueError(f"{name} is not allowed (JSON has no NaN or Infinity)")


def _check_manifest_shape(document, path):
    expected = {"format": dict, "features_required": list, "tensors": list, "metadata": dict}
    if not isinstance(document, dict):
        raise errors.CorruptManifest(f"{path}: manifest must be a JSON object, found {type(document).__name__}")
    for key, kind in expected.items():
        if not isinstance(document.get(key), kind):
            raise errors.CorruptManifest(f"{path}: manifest field {key!r} must be a JSON {kind.__name__}, "
                                         f"found {type(document.get(key)).__name__}")
    if len(document["tensors"]) > MAX_TENSORS:
        raise errors.CorruptManifest(f"{path}: {len(document['tensors'])} tensors; the limit is {MAX_TENSORS}")


def _check_format_section(section, h: Header, path):
    """format.name says what the file is; its major and minor must repeat the header's."""
    expected = {"name": FORMAT_NAME, "major": h.major, "minor": h.minor}
    for key, value in expected.items():
        found = section.get(key)
        if type(found) is not type(value) or found != value:  # 1.0 and true are not the integer 1
            raise errors.CorruptManifest(f"{path}: manifest field format.{key}: expected {value!r} "
                                         f"(as in the header), found {found!r}")


def _check_features(required, path):
    for feature in required:
        if not (isinstance(feature, dict) and isinstance(feature.get("name"), str)
                and isinstance(feature.get("since"), str)):
            raise errors.CorruptManifest(f"{path}: features_required entries must be {{name, since}} strings, "
                                         f"found {feature!r}")
        if feature["name"] not in KNOWN_FEATURES:
            raise errors.UnsupportedFeature(
                f"{path}: the file requires feature {feature['name']!r} (added in format {feature['since']}); this reader "
                f"implements format {MAJOR}.{MINOR} — upgrade blobstore-runtime to read it")


# ---- tensor records ----

def _validate_tensors(document, h: Header, path: str) -> dict[str, TensorInfo]:
    records = document["tensors"]
    data: dict[str, TensorInfo] = {}
    ties: dict[str, dict] = {}
    names = []
    for index, record in enumerate(records):
        name = _record_name(record, index, path)
        names.append(name)
        if name in data or name in ties:
            raise errors.InvalidTensor(f"{path}: tensor name {name!r} appears twice in the manifest")
        if isinstance(record, dict) and "tie" in record:
            ties[name] = _check_keys(record, TIE_KEYS, name, path)
            if not isinstance(record["tie"], str):
                raise errors.InvalidTie(f"{path}: tensor {name!r}: tie: expected a tensor name, found {record['tie']!r}")
        else:
            data[name] = _data_info(record, name, h, path)
    if len(data) != h.blob_count:
        raise errors.CorruptHeader(f"{path}: header field blob_count: expected {len(data)} (data tensors in the "
                                   f"manifest), found {h.blob_count}")
    _check_no_overlap(data.values(), path)
    _check_layout_features(data.values(), document["features_required"], path)
    resolved = _resolve_ties(ties, data, path)
    return {name: data.get(name) or resolved[name] for name in names}


def _check_layout_features(infos, required, path):
    """A tensor stored in an arrangement added after format 1.0 needs the file to require it."""
    names = {feature["name"] for feature in required}
    for info in infos:
        feature = layout_feature(info.dtype, info.layout)
        if feature and feature not in names:
            raise errors.CorruptManifest(f"{path}: tensor {info.name!r} has layout {info.layout!r}, but the file's "
                                         f"features_required does not list {feature!r}")


def _record_name(record, index, path):
    name = record.get("name") if isinstance(record, dict) else None
    if not isinstance(name, str) or not TENSOR_NAME.fullmatch(name):
        raise errors.InvalidTensor(f"{path}: tensor #{index} has name {name!r}; expected {TENSOR_NAME_RULE}")
    return name


def _check_keys(record, allowed, name, path):
    unknown = set(record) - allowed
    if unknown:
        # Records are strict: information a reader must not skip arrives with a features_required
        # entry, which an older reader refuses by name before it gets here (FORMAT.md §6.2).
        raise errors.CorruptManifest(
            f"{path}: tensor {name!r}: unknown field(s) {sorted(unknown)}; a {'tie' if 'tie' in allowed else 'data'} "
            f"record has only {sorted(allowed)}, and a field added by a later format comes with a "
            f"features_required entry naming it")
    missing = {"name", "tie"} - set(record) if "tie" in allowed else DATA_KEYS - {"source"} - set(record)
    if missing:
        raise errors.InvalidTensor(f"{path}: tensor {name!r}: missing fields {sorted(missing)}")
    if "component" in record and not isinstance(record["component"], str):
        raise errors.InvalidTensor(f"{path}: tensor {name!r}: field 'component' must be a string")
    if record.get("source") is not None and not isinstance(record["source"], str):
        raise errors.InvalidTensor(f"{path}: tensor {name!r}: field 'source' must be a string or null")
    return record


def _data_info(record, name, h: Header, path) -> TensorInfo:
    _check_keys(record, DATA_KEYS, name, path)

    def bad(field, expected, found):
        raise errors.InvalidTensor(f"{path}: tensor {name!r}: {field}: expected {expected}, found {found!r}")

    try:
        dtype = DType.parse(record["dtype"]) if isinstance(record["dtype"], str) else bad("dtype", "a name", record["dtype"])
    except ValueError:
        bad("dtype", f"one of {[d.label for d in DType]}", record["dtype"])
    shape = record["shape"]
    if not (isinstance(shape, list) and len(shape) <= MAX_NDIM and all(_is_int(d) and 0 <= d < MAX_DIM for d in shape)):
        bad("shape", f"a list of at most {MAX_NDIM} integers in [0, 2^40)", shape)
    shape = tuple(shape)
    if math.prod(d for d in shape if d) >= MAX_DIM:  # bounds empty tensors too, whose nbytes is 0
        bad("shape", "fewer than 2^40 elements, counting only the non-zero dimensions", list(shape))
    for field in ("row_stride", "offset", "nbytes", "crc32c"):
        if not _is_int(record[field]) or record[field] < 0:
            bad(field, "a non-negative integer", record[field])
    if record["layout"] not in layouts_of(dtype):
        bad("layout", f"one of {list(layouts_of(dtype))} for {dtype.label}", record["layout"])
    lay = layout(dtype, shape, record["layout"])  # exact integers: nothing here can overflow
    if dtype.spec.whole_blocks and lay.cols % dtype.spec.block:
        bad("shape", f"rows of whole {dtype.spec.block}-value blocks for {dtype.label}", list(shape))
    if record["row_stride"] != lay.row_stride:
        bad("row_stride", lay.row_stride, record["row_stride"])
    if record["nbytes"] != lay.nbytes:
        bad("nbytes", f"{lay.nbytes} for {dtype.label} {list(shape)}", record["nbytes"])
    if record["crc32c"] >= 1 << 32:
        bad("crc32c", "a 32-bit value", record["crc32c"])
    offset = record["offset"]
    if offset % h.alignment:
        bad("offset", f"a multiple of the alignment {h.alignment}", offset)
    if offset < data_start(h.alignment) or offset + lay.nbytes > h.manifest_offset:
        bad("offset + nbytes", f"inside the data area [{data_start(h.alignment)}, {h.manifest_offset})",
            f"[{offset}, {offset + lay.nbytes})")
    return TensorInfo(name, dtype, shape, lay.row_stride, offset, lay.nbytes, record["crc32c"],
                      record["component"], record.get("source"), layout=lay.kind)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_no_overlap(infos, path):
    ranges = sorted((i.offset, i.offset + i.nbytes, i.name) for i in infos if i.nbytes)
    for (_, end, first), (start, _, second) in zip(ranges, ranges[1:]):
        if start < end:
            raise errors.InvalidTensor(f"{path}: tensors {first!r} and {second!r} overlap "
                                       f"({first!r} ends at {end}, {second!r} starts at {start})")


def _resolve_ties(ties, data, path) -> dict[str, TensorInfo]:
    resolved = {}
    for name, record in ties.items():
        chain, target = [name], record["tie"]
        while target in ties:
            if target in chain:
                raise errors.InvalidTie(f"{path}: tie cycle: {' -> '.join(chain + [target])}")
            chain.append(target)
            target = ties[target]["tie"]
        if target not in data:
            raise errors.InvalidTie(f"{path}: tensor {chain[-1]!r} is tied to {target!r}, which is not in the file")
        info = data[target]
        resolved[name] = TensorInfo(name, info.dtype, info.shape, info.row_stride, info.offset, info.nbytes,
                                    info.crc32c, record.get("component") or info.component, record.get("source"),
                                    tie=target, layout=info.layout)
    return resolved

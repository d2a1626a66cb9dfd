"""BlobWriter: stream tensors into a blob file, one at a time, atomically.

Bytes go to a temporary file beside the target; only `close()` (after fsync) renames it into
place, so an exception or Ctrl-C never leaves a half-written file at the target path.
"""
from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path

import numpy as np

from . import quant
from ._native import crc32c
from .format import (
    DEFAULT_ALIGNMENT, FORMAT_NAME, HEADER_SIZE, INTERLEAVE, INTERLEAVE8, KNOWN_FEATURES, MAJOR, MANIFEST_ALIGN,
    MAX_ALIGNMENT, MAX_MANIFEST_SIZE, MIN_ALIGNMENT, TIE_FEATURE, TENSOR_NAME, TENSOR_NAME_RULE, DType, Header,
    data_start, dtype_of_numpy, file_minor, is_power_of_two, layout_feature, padded_file_size, padding,
)
from .format import layout as layout_of

CHUNK_BYTES = 8 << 20  # rows are converted and written in chunks of about this size
_FLOAT_TARGETS = {DType.F32: np.float32, DType.F16: np.float16}


class BlobWriter:
    """Write a blob file tensor by tensor; peak memory is about one tensor.

    >>> import numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "demo.blob")
    >>> with BlobWriter(path) as w:
    ...     w.add("embed", np.ones((4, 8), np.float32), dtype="q8_0")
    ...     w.add_tie("lm_head", "embed")
    ...     w.metadata["model"] = {"vocab_size": 4}
    """

    def __init__(self, path, alignment: int = DEFAULT_ALIGNMENT):
        if not (is_power_of_two(alignment) and MIN_ALIGNMENT <= alignment <= MAX_ALIGNMENT):
            raise ValueError(f"alignment must be a power of two from {MIN_ALIGNMENT} to {MAX_ALIGNMENT}, got {alignment}")
        self.path = Path(path)
        self.alignment = alignment
        self.metadata: dict = {}
        self._records: list[dict] = []
        self._names: set[str] = set()
        self._features: set[str] = set()
        self._blob_count = 0
        self._crc = 0
        self._tmp_path, fd = _create_temporary(self.path)
        self._file = os.fdopen(fd, "wb")
        self._pos = 0
        self._write_zeros(data_start(alignment))  # header placeholder; rewritten by close()

    # ---- adding tensors ----

    def add(self, name: str, data, *, dtype=None, shape=None, component: str = "text", source: str | None = None,
            layout: str | None = None):
        """Add one tensor.

        `data` is a numpy array, converted (or quantized) to `dtype` on the way in (None keeps
        its dtype); or raw packed bytes, taken as-is, with their `dtype` and `shape` given.
        `layout` arranges a quantized tensor's bytes (format.layouts_of: "planar", the default, or
        "interleave8" for the types of format.INTERLEAVED, the matrix kernels' fastest).

        >>> w.add("w", np.ones((16, 64), np.float32), dtype="q8_0", layout="interleave8")  # doctest: +SKIP
        """
        self._check_open()
        self._check_new_name(name)
        if isinstance(data, (np.ndarray, np.generic)):
            data = np.asarray(data)
            if shape is not None:
                raise ValueError(f"tensor {name!r}: shape= is only for raw bytes; reshape the array instead")
            target = dtype_of_numpy(data.dtype) if dtype is None else DType.parse(dtype)
            self._write_tensor(name, data, target, component, source, stored=False, kind=layout)
        else:
            target, array = self._raw_array(name, data, dtype, shape)
            self._write_tensor(name, array, target, component, source, stored=True, kind=layout)

    def add_quantized(self, name: str, planes, *, dtype, shape, component: str = "text", source: str | None = None,
                      layout: str | None = None):
        """Add a tensor already quantized: its planes in DTypeSpec order (as `quant.planes_from_ggml` gives
        them), the first (rows, blocks * per_block) or already padded to the row stride, each later one
        (rows, blocks * per_block). The bytes are stored unchanged, or rearranged as `layout` says (see add).

        >>> planes = quant.planes_from_ggml("q4_k", ggml_bytes)           # doctest: +SKIP
        >>> w.add_quantized("w", planes, dtype="q4_k", shape=(rows, cols))  # doctest: +SKIP
        """
        self._check_open()
        self._check_new_name(name)
        target = DType.parse(dtype)
        if not target.is_quantized:
            raise ValueError(f"tensor {name!r}: {target.label} is not a quantized type; use add()")
        shape = tuple(int(d) for d in shape)
        planes = [np.asarray(p) for p in planes]
        _check_planes(name, target, layout_of(target, shape), planes)
        lay = _tensor_layout(name, target, shape, layout)
        if lay.kind == INTERLEAVE8:
            self._write_blob(name, target, shape, lay, component, source,
                             lambda: self._write_interleaved(_group_chunks(tuple(planes), lay), target, lay))
        else:
            self._write_blob(name, target, shape, lay, component, source, lambda: self._write_planes(planes, lay))

    def add_stored(self, name: str, blob, *, dtype, shape, layout: str | None = None, component: str = "text",
                   source: str | None = None):
        """Add a tensor as the exact bytes a blob file stores it in (BlobReader.blob): `blob` holds
        format.layout(dtype, shape, layout).nbytes bytes, copied as they are.

        >>> w.add_stored("w", r.blob("w"), dtype=i.dtype, shape=i.shape, layout=i.layout)  # doctest: +SKIP
        """
        self._check_open()
        self._check_new_name(name)
        target = DType.parse(dtype)
        shape = tuple(int(d) for d in shape)
        lay = _tensor_layout(name, target, shape, layout)
        raw = np.frombuffer(blob, np.uint8)
        if raw.size != lay.nbytes:
            raise ValueError(f"tensor {name!r}: {raw.size} bytes do not hold {target.label} {list(shape)} "
                             f"as {lay.kind} ({lay.nbytes} bytes)")
        self._write_blob(name, target, shape, lay, component, source, lambda: self._write(raw))

    def add_tie(self, name: str, target: str, *, component: str = "text", source: str | None = None):
        """Add `name` as an alias of the tensor `target` (e.g. an output head tied to the embedding)."""
        self._check_open()
        self._check_new_name(name)
        self._features.add(TIE_FEATURE)
        self._records.append({"name": name, "tie": target, "component": component, "source": source})

    def add_file(self, name: str, data: bytes, *, component: str = "tokenizer"):
        """Store bytes verbatim (a tokenizer.model, a tokenizer.json) as a 1-D u8 tensor."""
        self.add(name, bytes(data), dtype=DType.U8, shape=(len(data),), component=component)

    # ---- finishing ----

    def close(self):
        """Write the manifest, header and footer, fsync, and rename the file into place."""
        self._check_open()
        try:
            self._finalize()
        except BaseException:
            self.abort()
            raise
        os.replace(self._tmp_path, self.path)
        _fsync_directory(self.path.parent)

    def abort(self):
        """Drop everything written so far; nothing appears at the target path."""
        if not self._file.closed:
            self._file.close()
        self._tmp_path.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # ---- internals ----

    def _check_open(self):
        if self._file.closed:
            raise ValueError(f"{self.path}: the writer is already closed")

    def _check_new_name(self, name: str):
        if not isinstance(name, str) or not TENSOR_NAME.fullmatch(name):
            raise ValueError(f"tensor name {name!r} must be {TENSOR_NAME_RULE}")
        if name in self._names:
            raise ValueError(f"{self.path}: tensor {name!r} was already added")
        self._names.add(name)

    @staticmethod
    def _raw_array(name, data, dtype, shape):
        if dtype is None or shape is None:
            raise ValueError(f"tensor {name!r}: raw bytes need dtype= and shape=")
        target = DType.parse(dtype)
        if target.is_quantized:
            raise ValueError(f"tensor {name!r}: {target.label} cannot be added as raw bytes; pass a float array, "
                             f"or its planes to add_quantized")
        shape = tuple(int(d) for d in shape)
        raw = np.frombuffer(data, dtype=np.uint8)
        if raw.size != math.prod(shape) * target.numpy.itemsize:
            raise ValueError(f"tensor {name!r}: {raw.size} raw bytes do not hold shape {shape} of {target.label}")
        return target, raw.view(target.numpy).reshape(shape)

    def _write_tensor(self, name, array, target, component, source, stored, kind):
        """Write one blob; `stored` says the array already holds the stored element type."""
        shape = tuple(int(d) for d in array.shape)
        lay = _tensor_layout(name, target, shape, kind)
        rows = array.reshape(lay.rows, lay.cols)
        if lay.kind == INTERLEAVE8:
            chunks = (quant.quantize(np.asarray(part, np.float32), target) for part in _group_chunks(rows, lay))
            self._write_blob(name, target, shape, lay, component, source,
                             lambda: self._write_interleaved(chunks, target, lay))
        elif target.is_quantized:
            self._write_blob(name, target, shape, lay, component, source, lambda: self._write_quantized(rows, target, lay))
        else:
            self._write_blob(name, target, shape, lay, component, source, lambda: self._write_plain(rows, target, lay, stored))

    def _write_blob(self, name, target, shape, lay, component, source, write_data):
        """Write one blob's bytes with `write_data()` at the next aligned offset, and its record."""
        if target.spec.whole_blocks and lay.cols % target.spec.block:
            raise ValueError(f"tensor {name!r}: {target.label} needs rows of whole {target.spec.block}-value blocks; "
                             f"shape {list(shape)} has {lay.cols} columns")
        self._write_zeros(padding(self._pos, self.alignment))
        offset, self._crc = self._pos, 0
        try:
            write_data()
        except ValueError as error:
            raise ValueError(f"tensor {name!r}: {error}") from None
        if target.spec.feature_since:
            self._features.add(target.label)
        if layout_feature(target, lay.kind):
            self._features.add(layout_feature(target, lay.kind))
        self._blob_count += 1
        self._records.append({
            "name": name, "dtype": target.label, "shape": list(shape), "layout": lay.kind, "row_stride": lay.row_stride,
            "offset": offset, "nbytes": lay.nbytes, "crc32c": self._crc, "component": component, "source": source,
        })

    def _write_plain(self, rows: np.ndarray, target: DType, lay, stored: bool):
        chunk = max(1, CHUNK_BYTES // max(lay.row_stride, 1))
        itemsize = target.numpy.itemsize
        for start in range(0, lay.rows, chunk):
            block = rows[start:start + chunk]
            if not stored:
                block = _convert(block, target)
            if lay.cols * itemsize != lay.row_stride:
                padded = np.zeros((len(block), lay.row_stride // itemsize), target.numpy)
                padded[:, :lay.cols] = block
                block = padded
            self._write(block)

    def _write_quantized(self, rows: np.ndarray, target: DType, lay):
        """Quantize chunk by chunk: the first plane is written as it comes, the later (small) ones after it."""
        later = [np.empty((lay.rows, lay.blocks * p.per_block), p.numpy) for p in target.spec.planes[1:]]
        chunk = max(1, CHUNK_BYTES // max(lay.row_stride, 1))
        for start in range(0, lay.rows, chunk):
            first, *rest = quant.quantize(np.asarray(rows[start:start + chunk], np.float32), target)
            self._write(first)
            for whole, part in zip(later, rest):
                whole[start:start + len(part)] = part
        self._write_later_planes(later, lay)

    def _write_planes(self, planes, lay):
        first = planes[0]
        if first.shape[1] * first.itemsize != lay.row_stride:
            padded = np.zeros((lay.rows, lay.row_stride // first.itemsize), first.dtype)
            padded[:, :first.shape[1]] = first
            first = padded
        self._write(first)
        self._write_later_planes(planes[1:], lay)

    def _write_interleaved(self, chunks, dtype, lay):
        """Planar planes of a type of format.INTERLEAVED, given chunk by chunk of whole groups of rows
        (_group_chunks), as interleave8: the first plane written as it comes, the later (small) ones
        after it, each grouped plane at its 64-byte boundary (layout().plane_offsets)."""
        start, later = self._pos, []
        for planes in chunks:
            first, *rest = quant.interleave8(planes, dtype)
            self._write(first)
            later.append(rest)
        for index, offset in enumerate(lay.plane_offsets[1:]):
            self._write(np.zeros(start + offset - self._pos, np.uint8))  # inside the blob: covered by its CRC
            for rest in later:
                self._write(rest[index])

    def _write_later_planes(self, planes, lay):
        """Planes after the first, each packed and starting on its 64-byte boundary (layout().plane_offsets)."""
        start = self._pos - lay.row_stride * lay.rows
        for plane, offset in zip(planes, lay.plane_offsets[1:]):
            self._write(np.zeros(start + offset - self._pos, np.uint8))  # inside the blob: covered by its CRC
            self._write(plane)

    def _write(self, array: np.ndarray):
        raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        self._file.write(raw.data)
        self._crc = crc32c(raw, self._crc)
        self._pos += raw.size

    def _write_zeros(self, n: int):
        if n:
            self._file.write(bytes(n))
            self._pos += n

    def _manifest(self) -> bytes:
        features = [{"name": f, "since": KNOWN_FEATURES[f]} for f in sorted(self._features)]
        document = {"format": {"name": FORMAT_NAME, "major": MAJOR, "minor": file_minor(self._features)},
                    "features_required": features, "tensors": self._records, "metadata": self.metadata}
        try:
            text = json.dumps(document, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{self.path}: metadata is not JSON-able ({error})") from None
        return text.encode("utf-8")

    def _finalize(self):
        known = {r["name"] for r in self._records}
        for record in self._records:
            if "tie" in record and record["tie"] not in known:
                raise ValueError(f"{self.path}: tie {record['name']!r} points at {record['tie']!r}, which was never added")
        manifest = self._manifest()
        if len(manifest) > MAX_MANIFEST_SIZE:
            raise ValueError(f"{self.path}: manifest is {len(manifest)} bytes; the limit is {MAX_MANIFEST_SIZE}")
        self._write_zeros(padding(self._pos, MANIFEST_ALIGN))
        manifest_offset = self._pos
        self._write(np.frombuffer(manifest, np.uint8))
        file_size = padded_file_size(self._pos)
        header = Header(MAJOR, file_minor(self._features), self.alignment, self._blob_count, file_size, manifest_offset,
                        len(manifest), crc32c(manifest)).pack(crc32c)
        self._write_zeros(file_size - HEADER_SIZE - self._pos)
        self._file.write(header)  # the footer
        self._file.seek(0)
        self._file.write(header)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


def check_output(out, force: bool):
    """Refuse to write blob file `out` over an existing file (unless `force`), a folder, or into a
    folder that does not exist, before any work is done.

    >>> check_output("model.blob", force=False)   # doctest: +SKIP
    """
    out = Path(out)
    if out.exists() and not force:
        raise ValueError(f"{out} already exists; pass --force to overwrite it")
    if out.is_dir():
        raise ValueError(f"{out} is a directory; give a file name such as {out / 'model.blob'}")
    if not out.parent.resolve().is_dir():
        raise ValueError(f"{out}: the folder {out.parent} does not exist")


def _tensor_layout(name, target: DType, shape, kind):
    """The byte layout of tensor `name` in arrangement `kind` (None: the type's default)."""
    try:
        return layout_of(target, shape, kind)
    except ValueError as error:
        raise ValueError(f"tensor {name!r}: {error}") from None


def _group_chunks(rows, lay):
    """`rows` (an array or a tuple of planes, rows first) in slices of whole groups of INTERLEAVE rows,
    each about CHUNK_BYTES of interleave8 quant plane (lay.row_stride is a group's bytes)."""
    step = INTERLEAVE * max(1, CHUNK_BYTES // max(lay.row_stride, 1))
    for start in range(0, lay.rows, step):
        yield tuple(p[start:start + step] for p in rows) if isinstance(rows, tuple) else rows[start:start + step]


def _check_planes(name, target: DType, lay, planes):
    """Each plane of a pre-quantized tensor has its element type and (rows, blocks * per_block) elements."""
    spec = target.spec
    if len(planes) != len(spec.planes):
        raise ValueError(f"tensor {name!r}: {target.label} has {len(spec.planes)} planes "
                         f"({', '.join(p.name for p in spec.planes)}), got {len(planes)}")
    for index, (plane, array) in enumerate(zip(spec.planes, planes)):
        width = lay.blocks * plane.per_block
        widths = (width, lay.row_stride // plane.numpy.itemsize) if index == 0 else (width,)
        if array.dtype != plane.numpy or array.ndim != 2 or array.shape[0] != lay.rows or array.shape[1] not in widths:
            raise ValueError(f"tensor {name!r}: {target.label} plane {plane.name!r} must be {plane.numpy} of shape "
                             f"({lay.rows}, {' or '.join(map(str, widths))}), found {array.dtype} {array.shape}")


def _convert(block: np.ndarray, target: DType) -> np.ndarray:
    """Rows of `block` in the stored element type of `target` (not quantized)."""
    if target is DType.BF16:
        if block.dtype == np.uint16:
            raise ValueError("a uint16 array is ambiguous for bf16; pass raw bf16 bits as bytes with shape=")
        return quant.f32_to_bf16(np.asarray(block, np.float32))
    if target in _FLOAT_TARGETS:
        if not np.issubdtype(block.dtype, np.floating):
            raise ValueError(f"{block.dtype} data cannot be stored as {target.label}")
        with np.errstate(over="ignore"):  # overflow is reported below, with the tensor's name
            converted = block.astype(_FLOAT_TARGETS[target], copy=False)
        if target is DType.F16 and np.isinf(converted).any() and not np.isinf(block).any():
            raise ValueError("values exceed the float16 range (65504); store as bf16 or f32")
        return converted
    if block.dtype != target.numpy:
        raise ValueError(f"{block.dtype} data cannot be stored as {target.label} without a lossy cast")
    return block


def _create_temporary(target: Path) -> tuple[Path, int]:
    """A new file beside `target`. Unlike mkstemp's 0600, it gets the usual 0666 & ~umask, so the
    renamed result is as readable as any file the user creates."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        path = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            return path, os.open(path, flags, 0o666)
        except FileExistsError:
            continue


def _fsync_directory(directory: Path):
    """Make the rename durable (POSIX); Windows has no directory handles to sync."""
    if os.name != "posix":
        return
    fd = os.open(directory or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

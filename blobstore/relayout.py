"""Rewrite a blob file with its q8_0, q4_0 and q5_0 tensors (format.INTERLEAVED) in another arrangement
(planar <-> interleave8).

Every other tensor (and one already in that arrangement) is copied byte for byte, ties and the
metadata as they are; the source is checked in full (every CRC32C) first, and the output appears
only when complete (BlobWriter).
"""
from __future__ import annotations

from .format import DType, layouts_of
from .reader import open as open_blob
from .writer import BlobWriter, check_output


def relayout(src, out, layout: str, force: bool = False) -> int:
    """Write blob file `src` again as `out` with every tensor of a type of format.INTERLEAVED (q8_0,
    q4_0, q5_0) stored in `layout` ("planar" or "interleave8"); returns how many tensors changed
    arrangement. `out` must not exist unless `force`.

    >>> relayout("model.blob", "model-i8.blob", "interleave8")   # doctest: +SKIP
    197
    """
    if layout not in layouts_of(DType.Q8_0):
        raise ValueError(f"layout: expected one of {list(layouts_of(DType.Q8_0))}, found {layout!r}")
    check_output(out, force)
    changed = 0
    with open_blob(src, verify="full") as reader, BlobWriter(out, alignment=reader.alignment) as writer:
        for info in reader.infos():
            target = layout if layout in layouts_of(info.dtype) else info.layout
            fields = dict(dtype=info.dtype, shape=info.shape, component=info.component, source=info.source,
                          layout=target)
            if info.tie:
                writer.add_tie(info.name, info.tie, component=info.component, source=info.source)
            elif target == info.layout:   # its bytes stay as they are
                writer.add_stored(info.name, reader.blob(info.name), **fields)
            else:
                changed += 1
                writer.add_quantized(info.name, reader[info.name].planar(), **fields)
        writer.metadata.update(reader.metadata)
        if "conversion" in writer.metadata:   # what the converter was asked for is now this file's layout
            writer.metadata["conversion"] = {**writer.metadata["conversion"], "layout": layout}
    return changed

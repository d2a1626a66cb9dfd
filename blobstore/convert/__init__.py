"""blob-pack convert: a Hugging Face folder or GGUF file → one blob file.

    >>> from blobstore.convert import convert
    >>> summary = convert("gemma-3-270m/", "gemma.blob", dtype="q8_0")   # doctest: +SKIP

The source is checked first — config, tokenizer, then the tensor plan (names, shapes, dtypes,
ties) — and every problem is reported together before a single tensor is converted. It is then
streamed one tensor at a time into a BlobWriter, which writes a temporary file and renames it
into place only when complete.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import ConfigError, ModelConfig
from ..format import INTERLEAVE8, MAX_ALIGNMENT, MIN_ALIGNMENT, DType, is_power_of_two, layouts_of
from ..quant import bf16_to_f32, planes_from_ggml
from ..writer import BlobWriter, check_output
from . import tokenizer
from .families import family_for_hf
from .plan import (DTYPE_CHOICES, KEEP, WEIGHT_DTYPES, Options, Plan, in_form, make_plan, resolved_embed_dtype,
                   stored_type_of)
from .problems import ConversionError, Problems
from .sources import open_source, provenance

__all__ = ["convert", "ConversionError", "Options", "Summary"]


@dataclass
class Summary:
    output: str
    tensors: int = 0
    ties: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    components: dict = field(default_factory=dict)   # component → tensors stored
    dropped: dict = field(default_factory=dict)      # component → tensors left out (--text-only)
    seconds: float = 0.0
    notes: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    dry_run: bool = False

    def format(self) -> str:
        parts = ", ".join(f"{c} {n}" for c, n in self.components.items())
        lines = [f"{'would write' if self.dry_run else 'wrote'} {self.output}: {self.tensors} tensors ({parts}), "
                 f"{self.ties} tie(s); {self.bytes_in / 1e6:.1f} MB in"
                 + ("" if self.dry_run else f", {self.bytes_out / 1e6:.1f} MB out") + f"; {self.seconds:.1f} s"]
        lines += [f"  left out by --text-only: {n} {c} tensor(s)" for c, n in self.dropped.items()]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def convert(src, out, *, dtype: str | None = None, embed_dtype: str | None = None, keep_f32=(), text_only: bool = False,
            allow_unknown: bool = False, align: int = 4096, force: bool = False, dry_run: bool = False,
            quiet: bool = False, revision: str | None = None, offline: bool = False, gguf_file: str | None = None,
            strict: bool = False, layout: str = INTERLEAVE8, log=None) -> Summary:
    """Convert `src` (HF model folder, .gguf file, or a Hub id such as "google/gemma-3-270m") into
    the blob file `out`; see `blob-pack convert --help`.

    `dtype` None is "keep" for a GGUF (every matrix in its own type where the kernels multiply it,
    its bytes copied; `strict` refuses the others instead of re-quantizing them) and "q8_0" for a
    Hugging Face folder, where "keep" means its float type. `layout` arranges the bytes of the
    q8_0 / q4_0 / q5_0 tensors: "interleave8", the tile the matrix kernels read fastest
    (docs/FORMAT.md §5.5 - §5.7), or "planar", which readers of format 1.0 read.

    Everything `blobstore.runtime.load` will need — a usable config, a tokenizer, every tensor the
    config asks for — is checked before the first tensor is converted (also for a dry run); every
    problem found raises one ConversionError listing them all, and nothing is written. `revision`,
    `offline` and `gguf_file` apply to Hub ids. `log` receives the plan (dry run) and warnings, one
    line per call (default: discard).
    """
    started = time.monotonic()
    log = log or (lambda line: None)
    options = _options(dtype, embed_dtype, keep_f32, text_only, allow_unknown, align, strict, layout)
    out = Path(out)
    if not dry_run:
        try:
            check_output(out, force)
        except ValueError as error:   # the one error convert raises for what it was asked
            raise ConversionError(str(error)) from None
    source = open_source(src, revision=revision, offline=offline, gguf_file=gguf_file)
    if dtype is None:
        options = dataclasses.replace(options, dtype=KEEP if source.kind == "gguf" else "q8_0")
    problems = Problems(str(src))
    family, config = _normalize(source, problems)
    tok = _build_tokenizer(source, config, problems)
    plan = make_plan(source, config, family.variant(source.config), options, problems) if config else None
    problems.raise_if_fatal(options.allow_unknown, found=len(plan.entries) if plan else 0)
    for warning in problems.warnings:
        log(f"warning: {warning}")
    summary = _summary(out, plan, source, dry_run)
    if dry_run:
        for line in describe_plan(plan):
            log(line)
    else:
        _write(out, source, family, plan, options, quiet, tok)
        summary.bytes_out = out.stat().st_size
    summary.warnings = problems.warnings
    summary.seconds = time.monotonic() - started
    return summary


def _options(dtype, embed_dtype, keep_f32, text_only, allow_unknown, align, strict, layout) -> Options:
    """The checked options; a None dtype stays None until the source says which default applies."""
    for option, value, choices in (("dtype", dtype, DTYPE_CHOICES), ("embed_dtype", embed_dtype, WEIGHT_DTYPES)):
        if value is not None and value not in (KEEP, *choices):
            raise ConversionError(f"{option}: expected {KEEP} or one of {', '.join(choices)}, found {value!r}")
    if not (is_power_of_two(align) and MIN_ALIGNMENT <= align <= MAX_ALIGNMENT):
        raise ConversionError(f"--align: expected a power of two from {MIN_ALIGNMENT} to {MAX_ALIGNMENT}, found {align}")
    if layout not in layouts_of(DType.Q8_0):
        raise ConversionError(f"--layout: expected one of {', '.join(layouts_of(DType.Q8_0))}, found {layout!r}")
    return Options(dtype=dtype, embed_dtype=embed_dtype, keep_f32=tuple(keep_f32), text_only=text_only,
                   allow_unknown=allow_unknown, alignment=align, strict=strict, layout=layout)


def _normalize(source, problems: Problems):
    """(family, canonical config), or (None, None) with the reason added to `problems`."""
    try:
        family = family_for_hf(source.config)  # a GGUF source's config names the matching HF architecture
        return family, family.normalize(source.config, source.generation_config)
    except ConfigError as error:
        problems.config.append(str(error))
        problems.tensors_checked = False
        return None, None


def _build_tokenizer(source, config: ModelConfig | None, problems: Problems):
    """The tokenizer data the file will store, built once before any tensor is read; None with
    the reason added to `problems` when there is no loadable tokenizer."""
    if config is None:  # its settings need the config's token ids, but a missing tokenizer is still worth saying
        absent = _no_tokenizer(source)
        if absent:
            problems.tokenizer.append(absent)
        return None
    try:
        tok = tokenizer.from_gguf(source.metadata, config) if source.kind == "gguf" else \
            tokenizer.from_folder(source.path, config)
    except ConversionError as error:
        problems.tokenizer.append(str(error))
        return None
    return tok


def _no_tokenizer(source) -> str | None:
    """Why the source holds no tokenizer at all, or None when it has one."""
    if source.kind == "gguf":
        return tokenizer.missing_from_gguf(source.metadata)
    return tokenizer.missing_from_folder(source.path)


def describe_plan(plan: Plan) -> list[str]:
    """One line per stored tensor and tie: the dry-run output."""
    lines = [f"{e.source_label} -> {e.name} [{e.component}] {e.dtype} {'x'.join(map(str, e.shape)) or 'scalar'}"
             for e in plan.entries]
    lines += [f"{name} -> tie to {target} ({reason})" for name, target, reason in plan.ties]
    lines += [f"{src} -> left out (--text-only)" for srcs in plan.dropped.values() for src in srcs]
    lines += [f"{src} -> ignored (derived buffer)" for src in plan.ignored]
    lines += [f"{src} -> read into the rope config" for src in plan.in_config]
    return lines


def _summary(out: Path, plan: Plan, source, dry_run: bool) -> Summary:
    components = {}
    for entry in plan.entries:
        components[entry.component] = components.get(entry.component, 0) + 1
    return Summary(str(out), tensors=len(plan.entries), ties=len(plan.ties),
                   bytes_in=_source_bytes(source, plan), components=components,
                   dropped={c: len(s) for c, s in plan.dropped.items()}, notes=list(plan.notes), dry_run=dry_run)


def _source_bytes(source, plan: Plan) -> int:
    """Bytes of the source tensors the plan reads (a fused tensor once, however many parts it yields)."""
    return sum(source.tensors[name].nbytes for name in {e.source for e in plan.entries})


def _write(out: Path, source, family, plan: Plan, options: Options, quiet: bool, tok: tokenizer.TokenizerData):
    try:
        from tqdm import tqdm
    except ImportError:
        raise ConversionError("blob-pack convert needs tqdm: pip install 'blobstore-runtime[convert]'") from None

    read = _read_once(source)
    with BlobWriter(out, alignment=options.alignment) as writer, \
            tqdm(total=_source_bytes(source, plan), unit="B", unit_scale=True, unit_divisor=1024, disable=quiet,
                 leave=False, desc="converting") as bar:
        for entry in plan.entries:
            bar.set_postfix_str(entry.name, refresh=False)
            _add_tensor(writer, read, source, family, plan.config, entry, options.layout)
            if entry.rows is None or entry.rows[1] == source.tensors[entry.source].shape[0]:  # the source is done
                bar.update(source.tensors[entry.source].nbytes)
        for name, target, _ in plan.ties:
            writer.add_tie(name, target, source=None)
        for name, data in tok.files.items():
            writer.add_file(name, data)
        writer.metadata.update(_metadata(source, family.variant(source.config), plan, options, tok))


def _read_once(source):
    """read(name, raw): source.read (values, label), or with raw its ggml block bytes (GGUF only);
    the last tensor is remembered: the parts of a fused tensor (consecutive entries) share one read."""
    last = {}

    def read(name: str, raw: bool):
        if (name, raw) not in last:
            last.clear()
            last[name, raw] = (source.read_raw(name), None) if raw else source.read(name)
        return last[name, raw]
    return read


def _copies_blocks(source, entry) -> bool:
    """The entry is stored in its GGUF tensor's own block type: its bytes are copied, not re-quantized."""
    stored = DType.parse(entry.dtype)
    return source.kind == "gguf" and stored.is_quantized and stored_type_of(source.tensors[entry.source].dtype) is stored


def _add_tensor(writer: BlobWriter, read, source, family, config: ModelConfig, entry, layout: str):
    raw = _copies_blocks(source, entry)
    layout = layout if layout in layouts_of(DType.parse(entry.dtype)) else None
    array, stored = read(entry.source, raw)
    if entry.rows is not None:  # a row holds whole ggml blocks, so a raw slice is a slice of every plane
        array = array[entry.rows[0]:entry.rows[1]]
    if entry.form:  # only safetensors components: float values, never ggml blocks
        array = in_form(array, entry.form)
    if source.kind == "gguf" and entry.component == "text":
        array = family.gguf_sanitize(entry.name, array, config)
    if raw:
        writer.add_quantized(entry.name, planes_from_ggml(entry.dtype, array), dtype=entry.dtype, shape=entry.shape,
                             component=entry.component, source=entry.source_label, layout=layout)
        return
    if stored == "bf16":
        if entry.dtype == "bf16":  # the raw bits go in untouched
            writer.add(entry.name, memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)), dtype="bf16",
                       shape=entry.shape, component=entry.component, source=entry.source_label)
            return
        array = bf16_to_f32(array)
    writer.add(entry.name, array, dtype=entry.dtype, component=entry.component, source=entry.source_label,
               layout=layout)


def _component_metadata(raw: dict, variant, plan: Plan) -> dict:
    """The vision and projector components present: their tensor counts and configs, the class
    defaults config.json omits filled in."""
    configs = {"vision": {**variant.vision_defaults, **(raw.get("vision_config") or {})},
               "projector": {k: raw.get(k, v) for k, v in variant.projector_defaults.items()}}
    components = {}
    for name, config in configs.items():
        count = sum(e.component == name for e in plan.entries)
        if count:
            components[name] = {"tensors": count, "config": config, "required": False}
    return components


def _metadata(source, variant, plan: Plan, options: Options, tok) -> dict:
    from .. import __version__

    components = {"text": {"tensors": sum(e.component == "text" for e in plan.entries)}}
    if source.kind == "safetensors":
        components.update(_component_metadata(source.config, variant, plan))
    source_info = {"format": source.kind, "name": source.path.name, "packer": f"blob-pack {__version__}",
                   "files": provenance(source.provenance_files())}
    if source.hub:
        source_info.update(name=source.hub["repo_id"], hub=source.hub)
    if source.kind == "safetensors":
        source_info.update(config=source.config, generation_config=source.generation_config)
    else:
        source_info.update(gguf_metadata=source.scalar_metadata())
    return {
        "model": plan.config.to_dict(),
        "tokenizer": tok.settings,
        "components": components,
        "source": source_info,
        "conversion": {"dtype": options.dtype, "embed_dtype": resolved_embed_dtype(options), "layout": options.layout,
                       "keep_f32": list(options.keep_f32), "text_only": options.text_only,
                       "allow_unknown": options.allow_unknown, "dropped": {c: len(s) for c, s in plan.dropped.items()},
                       "requantized": {name: f"{src} -> {dst}" for name, src, dst in plan.requantized}},
    }

"""The mapping plan: which source tensor becomes which stored tensor, in which dtype — or why not.

Planning reads only names, shapes and dtypes (plus, for a present output head, its bytes and the
embedding's, to detect a duplicated tied head), so `--dry-run` and every error come before any
output is written.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass, field

import numpy as np

from ..config import ModelConfig
from ..format import INTERLEAVE8, DType, dtype_of_ggml
from .families import GGUF_ROPE_TENSORS, STORED_FORMS, map_component_name, map_gguf_name, map_text_name
from .problems import Problems, classify

FLOAT_SOURCE_DTYPES = ("f32", "f16", "bf16")
WEIGHT_DTYPES = tuple(d.label for d in DType if d.spec.weight_choice)  # choices for --dtype and --embed-dtype
KEEP = "keep"  # --dtype keep: each weight matrix in its source type (the default for a GGUF source)
# GGUF types a weight matrix cannot keep — not stored here, or stored but not yet multiplied by the
# kernels — are re-quantized to the first of these that the kernels multiply and blob-pack quantizes
# to: the nearest type with at least the source's bits, then q8_0, which always qualifies.
REQUANTIZE_TO = {
    **dict.fromkeys(("Q2_K", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "TQ1_0", "TQ2_0", "Q1_0"),
                    ("q3_k", "q4_k", "q8_0")),
    **dict.fromkeys(("Q3_K", "IQ3_XXS", "IQ3_S"), ("q4_k", "q5_k", "q8_0")),
    **dict.fromkeys(("Q4_1", "IQ4_NL", "IQ4_XS", "MXFP4", "NVFP4"), ("q4_k", "q5_k", "q8_0")),
    **dict.fromkeys(("Q4_K",), ("q5_k", "q6_k", "q8_0")),
    **dict.fromkeys(("Q5_0", "Q5_1", "Q5_K"), ("q5_k", "q6_k", "q8_0")),
    **dict.fromkeys(("Q6_K", "Q8_1", "Q8_K"), ("q8_0",)),
    **dict.fromkeys(("F64", "I8", "I16", "I32", "I64"), ("f32",)),
}
# Under a 4-bit --dtype, and a mix of a 4-bit base (q4_k_m), the embedding and output head default
# to q8_0, as llama.cpp's 4-bit files keep the output head at 6 bits: every logit is a dot with one
# of its rows, so its error decides the top token directly. Mean KL divergence to f32
# (bench/bench_quality.py): Gemma 3 270M (from its Q4_K_M GGUF) 0.50 with q4_0 throughout, 0.38
# with a q8_0 embedding; the demo model 0.041 and 0.020. q4_k_m with a q6_k embedding instead: 1.5x
# the KL divergence on the tiny trained checkpoints, whose embeddings are half their weights (docs/CONVERT.md).
FOUR_BIT_DTYPES = tuple(label for label in WEIGHT_DTYPES if DType.parse(label).spec.bits <= 4)
FOUR_BIT_EMBED_DTYPE = "q8_0"


@dataclass(frozen=True)
class Mix:
    """A per-tensor mix under one --dtype name, as llama.cpp's Q4_K_M / Q5_K_M: most matrices in
    `base`; in `more`, the ones the output is most sensitive to (MORE_BITS), and the embedding
    unless the base is 4-bit (resolved_embed_dtype)."""

    base: str
    more: str


MIXES = {"q4_k_m": Mix("q4_k", "q6_k"), "q5_k_m": Mix("q5_k", "q6_k")}
# Which matrices a mix gives more bits, by measurement on trained models (KL divergence to f32,
# docs/CONVERT.md): the embedding / output head (every logit is a dot with one of its rows), and
# the attention K, V and FFN down of every layer. One class at a time in q4_k, K and V cost the most
# KL divergence per weight (under grouped-query attention they are also the smallest matrices), and
# down the most of the large ones; V and down in only llama.cpp's layers (first and last eighth,
# every third between) lost 55 % more on the demo model.
MORE_BITS = re.compile(r"layers\.\d+\.(k|v|down)")
DTYPE_CHOICES = WEIGHT_DTYPES + tuple(MIXES)  # choices for --dtype
# A row that is not a whole number of its type's blocks (Gemma 3 270M's 640 columns and 256-value
# k-quant super-blocks) takes the type llama.cpp falls back to; q4_0 and q8_0 pad a last partial block.
ROW_FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0",
                "q4_1": "q8_0", "q5_0": "q8_0", "q5_1": "q8_0"}
IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # a derived buffer older checkpoints saved


@dataclass(frozen=True)
class Options:
    """Conversion choices; see `blob-pack convert --help`."""

    dtype: str = "q8_0"             # 2-D weight matrices: a stored type, or KEEP
    embed_dtype: str | None = None  # embedding and output head (None: see resolved_embed_dtype)
    keep_f32: tuple = ()            # fnmatch patterns over stored names kept in f32
    text_only: bool = False
    allow_unknown: bool = False
    alignment: int = 4096
    strict: bool = False            # under KEEP, refuse a GGUF type that cannot be kept instead of re-quantizing it
    layout: str = INTERLEAVE8       # how q8_0 / q4_0 tensors are arranged: planar or interleave8 (format.layouts_of)


STORED_FORM_LABELS = {"transpose": "transposed", "flatten": "flattened"}   # in a record's source


@dataclass(frozen=True)
class Entry:
    name: str          # stored name
    source: str        # source tensor name
    component: str     # "text" | "vision" | "projector" | "extra"
    shape: tuple
    dtype: str         # stored dtype
    rows: tuple | None = None  # (start, stop): the rows of a fused source tensor this one is, else None
    form: str | None = None    # "transpose" | "flatten": stored in another form than the source's (STORED_FORMS)

    @property
    def source_label(self) -> str:
        """The source tensor, with the row slice when this entry is one part of a fused tensor.

        >>> Entry("layers.0.k", "qkv_proj.weight", "text", (8, 16), "f32", rows=(16, 24)).source_label
        'qkv_proj.weight[16:24]'
        """
        label = self.source if self.rows is None else f"{self.source}[{self.rows[0]}:{self.rows[1]}]"
        return f"{label} ({STORED_FORM_LABELS[self.form]})" if self.form else label


@dataclass
class Plan:
    config: ModelConfig
    entries: list = field(default_factory=list)
    ties: list = field(default_factory=list)        # (name, target, reason)
    dropped: dict = field(default_factory=dict)     # component → source names left out by --text-only
    ignored: list = field(default_factory=list)
    in_config: list = field(default_factory=list)   # source tensors read into the config (GGUF rope factors)
    notes: list = field(default_factory=list)       # things the summary should say
    requantized: list = field(default_factory=list)  # (stored name, source type, stored type): KEEP could not keep


def make_plan(source, config: ModelConfig, variant, options: Options, problems: Problems) -> Plan:
    """Every stored tensor (a fused source tensor yields one entry per part, its rows stacked in
    the name table's order), tie and left-out tensor; problems go to `problems`."""
    plan = Plan(config)
    mapped = _map_names(source, variant, options, plan, problems)
    expected = config.expected_tensors()
    for src, (names, component) in mapped.items():
        ref = source.tensors[src]
        if len(names) > 1:
            entries = _split(src, names, component, ref, expected, options, problems)
        else:
            name = names[0]
            if component == "text" and name in expected and name != "lm_head" and ref.shape != expected[name]:
                problems.mismatched.append((name, expected[name], ref.shape, src))
            form = STORED_FORMS.get(name) if component != "text" else None
            shape = stored_shape(ref.shape, form)
            entries = [Entry(name, src, component, shape, target_dtype(name, shape, options, ref.dtype), form=form)]
        if ref.dtype not in FLOAT_SOURCE_DTYPES and source.kind == "safetensors":
            problems.bad_dtypes.append((" + ".join(names), ref.dtype, src))
            continue
        plan.entries += entries
    stored = {name for names, _ in mapped.values() for name in names}
    problems.missing += [n for n in expected if n not in stored and n != "lm_head"]
    _plan_head(source, plan, expected, problems)
    plan.requantized = [(e.name, source.tensors[e.source].dtype, e.dtype) for e in plan.entries
                        if _requantized(e, source.tensors[e.source].dtype, options)]
    if plan.requantized:
        if options.strict:
            problems.unkept += plan.requantized
        else:
            problems.warnings.append(describe_requantized(plan.requantized))
    return plan


def describe_requantized(requantized: list) -> str:
    """One warning naming the matrices KEEP re-quantizes, grouped by (source type, stored type).

    >>> describe_requantized([("layers.0.q", "IQ4_XS", "q8_0")])
    '1 weight matrix of a GGUF type this build cannot keep is re-quantized (--strict refuses instead): IQ4_XS -> q8_0: layers.0.q'
    """
    groups: dict = {}
    for name, source_dtype, stored in requantized:
        groups.setdefault((source_dtype, stored), []).append(name)
    parts = [f"{src} -> {dst}: {_listed(names)}" for (src, dst), names in groups.items()]
    count = len(requantized)
    return (f"{count} weight {'matrix' if count == 1 else 'matrices'} of a GGUF type this build cannot keep "
            f"{'is' if count == 1 else 'are'} re-quantized (--strict refuses instead): " + "; ".join(parts))


def _listed(names: list, shown: int = 8) -> str:
    more = f", … ({len(names)} in all)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _split(src: str, names: tuple, component: str, ref, expected: dict, options: Options,
           problems: Problems) -> list:
    """The entries of a fused source tensor: row slices sized by the config (q, k, v or gate, up)."""
    parts = [expected[n] for n in names]
    stacked = (sum(p[0] for p in parts), *parts[0][1:])
    if ref.shape != stacked:
        problems.mismatched.append((" + ".join(names), stacked, ref.shape, src))
        return []
    entries, start = [], 0
    for name, part in zip(names, parts):
        rows = (start, start + part[0])
        entries.append(Entry(name, src, component, part, target_dtype(name, part, options, ref.dtype), rows=rows))
        start += part[0]
    return entries


def stored_shape(shape: tuple, form: str | None) -> tuple:
    """The shape a source tensor is stored in, in `form` (STORED_FORMS) or as it is.

    >>> stored_shape((32, 3, 4, 4), "flatten"), stored_shape((32, 64), "transpose")
    ((32, 48), (64, 32))
    """
    if form == "transpose":
        return tuple(reversed(shape))
    return (shape[0], int(np.prod(shape[1:]))) if form == "flatten" else tuple(shape)


def in_form(array: np.ndarray, form: str | None) -> np.ndarray:
    """A source tensor's values in its stored form (stored_shape)."""
    if form is None:
        return array
    return np.ascontiguousarray(array.T if form == "transpose" else array.reshape(stored_shape(array.shape, form)))


def target_dtype(name: str, shape: tuple, options: Options, source_dtype: str) -> str:
    """f32 for norms, biases, --keep-f32 matches and unknown (extra.) tensors; the embedding choice for
    embed/lm_head (resolved_embed_dtype); under a mix its `more` type for MORE_BITS matrices and
    its `base` for the rest; else dtype — then ROW_FALLBACK while the rows do not fit the type.
    Under KEEP a matrix stays in `source_dtype` (a safetensors float label or a GGUF type name)
    when it can (kept_dtype).

    >>> target_dtype("layers.0.q", (64, 64), Options(dtype="keep"), "F16")
    'f16'
    >>> target_dtype("layers.0.down", (64, 640), Options(dtype="q4_k_m"), "f32")
    'q8_0'
    """
    chosen = _choice(name, shape, options)
    return kept_dtype(source_dtype) if chosen == KEEP else chosen


def _choice(name: str, shape: tuple, options: Options) -> str:
    if len(shape) != 2 or name.startswith("extra.") or any(fnmatch.fnmatchcase(name, p) for p in options.keep_f32):
        return "f32"
    mix = MIXES.get(options.dtype)
    if name in ("embed", "lm_head"):
        label = resolved_embed_dtype(options)
    elif mix:
        label = mix.more if MORE_BITS.fullmatch(name) else mix.base
    else:
        label = options.dtype
    while label in ROW_FALLBACK and shape[-1] % DType.parse(label).spec.block:
        label = ROW_FALLBACK[label]
    return label


def kept_dtype(source_dtype: str) -> str:
    """The stored type of a matrix of `source_dtype` under KEEP: its own type when the format stores it
    and the kernels multiply it (the bytes are copied), else its REQUANTIZE_TO choice.

    >>> kept_dtype("Q8_0"), kept_dtype("bf16"), kept_dtype("IQ4_XS") in ("q4_k", "q5_k", "q8_0")
    ('q8_0', 'bf16', True)
    """
    own = stored_type_of(source_dtype)
    if own is not None and own.spec.matmul:
        return own.label
    for label in REQUANTIZE_TO.get(source_dtype, ("q8_0",)):
        spec = DType.parse(label).spec
        if spec.matmul and spec.weight_choice:
            return label
    raise AssertionError(f"REQUANTIZE_TO[{source_dtype!r}] must end in a type every build multiplies")


def stored_type_of(source_dtype: str) -> DType | None:
    """The stored type with the same values and bytes as a source type (a safetensors float label or a
    GGUF type name), or None.

    >>> stored_type_of("Q6_K"), stored_type_of("IQ4_XS")
    (<DType.Q6_K: 16>, None)
    """
    if source_dtype in FLOAT_SOURCE_DTYPES:
        return DType.parse(source_dtype)
    try:
        from gguf import GGMLQuantizationType
    except ImportError:  # a safetensors source: its types are the float labels above
        return None
    return dtype_of_ggml(GGMLQuantizationType[source_dtype]) if source_dtype in GGMLQuantizationType.__members__ \
        else None


def _requantized(entry: Entry, source_dtype: str, options: Options) -> bool:
    """A matrix KEEP could not keep in its own type (the conversion warns, or refuses under strict)."""
    own = stored_type_of(source_dtype)
    return _choice(entry.name, entry.shape, options) == KEEP and (own is None or own.label != entry.dtype)


def resolved_embed_dtype(options: Options) -> str:
    """The stored type of embed and lm_head: --embed-dtype when given, else q8_0 under a 4-bit --dtype
    or a mix of a 4-bit base, else a mix's `more` type, else --dtype.

    >>> [resolved_embed_dtype(Options(dtype=d)) for d in ("q4_k_m", "q5_k_m", "q6_k")]
    ['q8_0', 'q6_k', 'q6_k']
    """
    if options.embed_dtype:
        return options.embed_dtype
    mix = MIXES.get(options.dtype)
    if (mix.base if mix else options.dtype) in FOUR_BIT_DTYPES:
        return FOUR_BIT_EMBED_DTYPE
    return mix.more if mix else options.dtype


def _map_names(source, variant, options: Options, plan: Plan, problems: Problems) -> dict:
    """source name → (stored names, component); unmapped names go to `problems` with their cause."""
    if source.kind == "gguf":
        text_name = lambda n: map_gguf_name(n, variant.gguf_layer_names)  # noqa: E731
    else:
        text_name = lambda n: map_text_name(n, variant.layer_names)  # noqa: E731
    expected = plan.config.expected_tensors()
    mapped, sources_of = {}, {}
    for src in source.tensors:
        if IGNORED.search(src):
            plan.ignored.append(src)
            continue
        if source.kind == "gguf" and src in GGUF_ROPE_TENSORS:
            plan.in_config.append(src)
            continue
        target = _map_one(src, text_name, variant)
        if target and target[0] != "text" and options.text_only:
            plan.dropped.setdefault(target[0], []).append(src)
            continue
        if target is None or (target[0] == "text" and not set(target[1]) <= expected.keys()):
            if options.allow_unknown:
                target = ("extra", (f"extra.{src}",))
                plan.notes.append(f"kept unmapped {src} as extra.{src}")
            else:
                problems.add_unmapped(src, "config" if target else classify(src, text_name))
                continue
        for name in target[1]:
            sources_of.setdefault(name, []).append(src)
        mapped[src] = (target[1], target[0])
    problems.duplicates += [(name, srcs) for name, srcs in sources_of.items() if len(srcs) > 1]
    return mapped


def _map_one(src: str, text_name, variant) -> tuple[str, tuple] | None:
    """(component, stored names) of a source tensor: one name, or several for a fused tensor."""
    name = text_name(src)
    if name:
        return "text", name if isinstance(name, tuple) else (name,)
    component = map_component_name(src) if variant.multimodal else None
    return (component[0], (component[1],)) if component else None


def _plan_head(source, plan: Plan, expected: dict, problems: Problems):
    """The four head cases: tie by config, dedupe an identical copy, keep a distinct one, or report it missing."""
    config = plan.config
    head = next((e for e in plan.entries if e.name == "lm_head"), None)
    if head is None:
        if config.tie_word_embeddings:
            plan.ties.append(("lm_head", "embed", "tie_word_embeddings in the config"))
        else:
            problems.missing.append("lm_head")
        return
    embed = next((e for e in plan.entries if e.name == "embed"), None)
    if head.shape != expected["lm_head"]:
        problems.mismatched.append(("lm_head", expected["lm_head"], head.shape, head.source))
    elif embed is not None and _same_bytes(source, head.source, embed.source):
        plan.entries.remove(head)
        plan.ties.append(("lm_head", "embed", f"{head.source} is bit-identical to the embedding"))
        plan.notes.append(f"{head.source} is bit-identical to the embedding: stored as a tie, not a copy")
        plan.config = dataclasses.replace(config, tie_word_embeddings=True)
    else:
        if config.tie_word_embeddings:
            problems.warnings.append(f"config.json says tie_word_embeddings, but {head.source} differs from the "
                                     f"embedding; it is stored as its own tensor (the file's config says untied)")
        plan.config = dataclasses.replace(config, tie_word_embeddings=False)


def _same_bytes(source, first: str, second: str) -> bool:
    a, b = source.tensors[first], source.tensors[second]
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    (x, _), (y, _) = source.read(first), source.read(second)
    return bool(np.array_equal(x.view(np.uint8), y.view(np.uint8)))

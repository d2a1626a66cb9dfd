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
from ..format import DType
from .families import GGUF_ROPE_TENSORS, map_component_name, map_gguf_name, map_text_name
from .problems import Problems, classify

FLOAT_SOURCE_DTYPES = ("f32", "f16", "bf16")
WEIGHT_DTYPES = tuple(d.label for d in DType if d.spec.weight_choice)  # choices for --dtype and --embed-dtype
# Under a 4-bit --dtype the embedding and output head default to q8_0, as llama.cpp's 4-bit files
# keep the output head at 6 bits: every logit is a dot with one of its rows, so its error decides
# the top token directly. Mean KL divergence to f32 (bench/bench_quality.py): Gemma 3 270M (from its
# Q4_K_M GGUF) 0.50 with q4_0 throughout, 0.38 with a q8_0 embedding; the demo model 0.041 and 0.020.
FOUR_BIT_DTYPES = tuple(label for label in WEIGHT_DTYPES if DType.parse(label).spec.bits <= 4)
FOUR_BIT_EMBED_DTYPE = "q8_0"
IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # a derived buffer older checkpoints saved


@dataclass(frozen=True)
class Options:
    """Conversion choices; see `blob-pack convert --help`."""

    dtype: str = "q8_0"             # 2-D weight matrices
    embed_dtype: str | None = None  # embedding and output head (None: see resolved_embed_dtype)
    keep_f32: tuple = ()            # fnmatch patterns over stored names kept in f32
    text_only: bool = False
    allow_unknown: bool = False
    alignment: int = 4096


@dataclass(frozen=True)
class Entry:
    name: str          # stored name
    source: str        # source tensor name
    component: str     # "text" | "vision" | "projector" | "extra"
    shape: tuple
    dtype: str         # stored dtype
    rows: tuple | None = None  # (start, stop): the rows of a fused source tensor this one is, else None

    @property
    def source_label(self) -> str:
        """The source tensor, with the row slice when this entry is one part of a fused tensor.

        >>> Entry("layers.0.k", "qkv_proj.weight", "text", (8, 16), "f32", rows=(16, 24)).source_label
        'qkv_proj.weight[16:24]'
        """
        return self.source if self.rows is None else f"{self.source}[{self.rows[0]}:{self.rows[1]}]"


@dataclass
class Plan:
    config: ModelConfig
    entries: list = field(default_factory=list)
    ties: list = field(default_factory=list)        # (name, target, reason)
    dropped: dict = field(default_factory=dict)     # component → source names left out by --text-only
    ignored: list = field(default_factory=list)
    in_config: list = field(default_factory=list)   # source tensors read into the config (GGUF rope factors)
    notes: list = field(default_factory=list)       # things the summary should say


def make_plan(source, config: ModelConfig, variant, options: Options, problems: Problems) -> Plan:
    """Every stored tensor (a fused source tensor yields one entry per part, its rows stacked in
    the name table's order), tie and left-out tensor; problems go to `problems`."""
    plan = Plan(config)
    mapped = _map_names(source, variant, options, plan, problems)
    expected = config.expected_tensors()
    for src, (names, component) in mapped.items():
        ref = source.tensors[src]
        if len(names) > 1:
            entries = _split(src, names, component, ref.shape, expected, options, problems)
        else:
            name = names[0]
            if component == "text" and name in expected and name != "lm_head" and ref.shape != expected[name]:
                problems.mismatched.append((name, expected[name], ref.shape, src))
            entries = [Entry(name, src, component, ref.shape, target_dtype(name, ref.shape, options))]
        if ref.dtype not in FLOAT_SOURCE_DTYPES and source.kind == "safetensors":
            problems.bad_dtypes.append((" + ".join(names), ref.dtype, src))
            continue
        plan.entries += entries
    stored = {name for names, _ in mapped.values() for name in names}
    problems.missing += [n for n in expected if n not in stored and n != "lm_head"]
    _plan_head(source, plan, expected, problems)
    return plan


def _split(src: str, names: tuple, component: str, shape: tuple, expected: dict, options: Options,
           problems: Problems) -> list:
    """The entries of a fused source tensor: row slices sized by the config (q, k, v or gate, up)."""
    parts = [expected[n] for n in names]
    stacked = (sum(p[0] for p in parts), *parts[0][1:])
    if shape != stacked:
        problems.mismatched.append((" + ".join(names), stacked, shape, src))
        return []
    entries, start = [], 0
    for name, part in zip(names, parts):
        rows = (start, start + part[0])
        entries.append(Entry(name, src, component, part, target_dtype(name, part, options), rows=rows))
        start += part[0]
    return entries


def target_dtype(name: str, shape: tuple, options: Options) -> str:
    """f32 for norms, biases, --keep-f32 matches and unknown (extra.) tensors; the embedding choice for
    embed/lm_head (resolved_embed_dtype); else dtype."""
    if len(shape) != 2 or name.startswith("extra.") or any(fnmatch.fnmatchcase(name, p) for p in options.keep_f32):
        return "f32"
    if name in ("embed", "lm_head"):
        return resolved_embed_dtype(options)
    return options.dtype


def resolved_embed_dtype(options: Options) -> str:
    """The stored type of embed and lm_head: --embed-dtype when given, else q8_0 under a 4-bit
    --dtype, else --dtype."""
    if options.embed_dtype:
        return options.embed_dtype
    return FOUR_BIT_EMBED_DTYPE if options.dtype in FOUR_BIT_DTYPES else options.dtype


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

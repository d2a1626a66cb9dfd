"""Collect every problem with a checkpoint, then report them together in one error.

Users lose hours to converters that stop at the first unmapped key, or that fail on the tokenizer
after minutes of converting; this module gathers config and tokenizer problems, unmapped source
tensors (grouped by their likely cause), missing required tensors and shape mismatches, and
renders them as one message.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

# Likely causes of an unmapped tensor, tried in order; each with advice for the user.
CAUSES = {
    "vision": "vision tower / projector tensors, but this architecture has no vision component here",
    "quantization": "quantization side tensors (bitsandbytes / GPTQ / AWQ / FP8): the checkpoint was saved while "
                    "quantized; save a dequantized (merged) copy in float and convert that",
    "prefix": "known tensors under an unexpected key prefix (expected none, 'model.', 'model.language_model.' "
              "or 'language_model.model.')",
    "config": "known tensor names that this config does not use (a layer index beyond num_hidden_layers, or a "
              "bias / norm the config does not enable)",
    "unknown": "names this architecture does not have",
}
VISION_NAME = re.compile(r"(^|\.)(vision_tower|vision_model|multi_modal_projector|visual|vision_encoder|"
                         r"mm_projector|image_newline)(\.|$)")
QUANT_SIDE_NAME = re.compile(r"(\.SCB|\.absmax|\.quant_map|\.nested_absmax|\.nested_quant_map|\.quant_state\..*|"
                             r"\.qweight|\.qzeros|\.scales|\.g_idx|_scale|\.weight_scale_inv|\.weight_format)$")


class ConversionError(ValueError):
    """The source cannot be converted; the message lists every problem found."""


@dataclass
class Problems:
    source: str
    config: list = field(default_factory=list)         # why the config cannot be normalized
    tokenizer: list = field(default_factory=list)      # why no loadable tokenizer can be stored
    tensors_checked: bool = True                       # False when no config says which tensors are needed
    unmapped: dict = field(default_factory=lambda: {cause: [] for cause in CAUSES})
    missing: list = field(default_factory=list)        # canonical names
    mismatched: list = field(default_factory=list)     # (canonical, expected shape, found shape, source name)
    duplicates: list = field(default_factory=list)     # (canonical, [source names])
    bad_dtypes: list = field(default_factory=list)     # (canonical, source dtype, source name)
    unkept: list = field(default_factory=list)         # (canonical, GGUF type, fallback): --dtype keep --strict
    warnings: list = field(default_factory=list)

    def add_unmapped(self, name: str, cause: str):
        self.unmapped[cause].append(name)

    def unmapped_names(self) -> list[str]:
        return [name for names in self.unmapped.values() for name in names]

    def fatal(self, allow_unknown: bool) -> bool:
        return bool(self.config or self.tokenizer or self.missing or self.mismatched or self.duplicates or
                    self.bad_dtypes or self.unkept or (self.unmapped_names() and not allow_unknown))

    def raise_if_fatal(self, allow_unknown: bool, found: int):
        if self.fatal(allow_unknown):
            raise ConversionError(self.report(allow_unknown, found))

    def report(self, allow_unknown: bool, found: int) -> str:
        lines = [f"cannot convert {self.source}:"]
        if self.config:
            lines.append("  the config cannot be used:")
            lines += [_indented(problem, "    ") for problem in self.config]
        if self.tokenizer:
            lines.append("  the tokenizer cannot be stored (blobstore.runtime.load needs one):")
            lines += [_indented(problem, "    ") for problem in self.tokenizer]
        if not self.tensors_checked:
            lines.append("  (tensors not checked: the config says which tensors the model needs)")
        unmapped = [] if allow_unknown else self.unmapped_names()
        if unmapped:
            lines.append(f"  {len(unmapped)} source tensor(s) map to no runtime tensor:")
            for cause, names in self.unmapped.items():
                if names:
                    lines.append(f"    {CAUSES[cause]} ({len(names)}):")
                    lines += [f"      {name}" for name in names]
            lines.append("    (--allow-unknown keeps unmapped tensors under 'extra.'; --text-only drops a vision tower)")
        if self.missing:
            lines.append(f"  {len(self.missing)} required tensor(s) missing (- expected by the config, "
                         f"not found among the {found} mapped source tensors):")
            lines += [f"    - {name}" for name in self.missing]
        if self.mismatched:
            lines.append(f"  {len(self.mismatched)} tensor(s) with the wrong shape:")
            lines += [f"    {name}: expected {_shape(want)} from the config, found {_shape(got)} in {src}"
                      for name, want, got, src in self.mismatched]
        if self.bad_dtypes:
            lines.append(f"  {len(self.bad_dtypes)} tensor(s) not stored as F32, F16 or BF16 (saved while quantized? "
                         f"save a float copy and convert that):")
            lines += [f"    {name}: {dtype} in {src}" for name, dtype, src in self.bad_dtypes]
        if self.unkept:
            lines.append(f"  {len(self.unkept)} weight matrix(es) of GGUF types this build cannot keep as they are "
                         f"(--strict; without it each is re-quantized to the type shown):")
            lines += [f"    {name}: {dtype} -> {fallback}" for name, dtype, fallback in self.unkept]
        if self.duplicates:
            lines.append(f"  {len(self.duplicates)} runtime tensor(s) given by more than one source tensor:")
            lines += [f"    {name}: {', '.join(sources)}" for name, sources in self.duplicates]
        return "\n".join(lines)


def _indented(text: str, prefix: str) -> str:
    """Every line of a (possibly multi-line) message under the section's indent."""
    return "\n".join(prefix + line for line in text.splitlines())


def _shape(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def classify(name: str, maps_after_prefix) -> str:
    """The likely cause of an unmapped name; `maps_after_prefix(tail)` says whether a tail maps."""
    if QUANT_SIDE_NAME.search(name):
        return "quantization"
    if VISION_NAME.search(name):
        return "vision"
    parts = name.split(".")
    if any(maps_after_prefix(".".join(parts[k:])) for k in range(1, len(parts))):
        return "prefix"
    return "unknown"

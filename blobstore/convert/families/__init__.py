"""The supported model families, looked up by HF architecture name or GGUF architecture."""
from __future__ import annotations

from ...config import ConfigError
from .base import (GGUF_ROPE_TENSORS, STORED_FORMS, Family, Variant, architecture_of, map_component_name,
                   map_gguf_name, map_text_name)
from .gemma import GEMMA
from .llama import LLAMA
from .phi3 import PHI3
from .qwen import QWEN

FAMILIES = (GEMMA, LLAMA, PHI3, QWEN)


def supported_architectures() -> list[str]:
    return [arch for family in FAMILIES for arch in family.variants]


def family_for_hf(config: dict) -> Family:
    """The family that handles this config.json's architecture."""
    arch = architecture_of(config)
    for family in FAMILIES:
        if arch in family.variants:
            return family
    raise ConfigError(f"config.json architecture {arch!r} is not supported; supported: "
                      f"{', '.join(supported_architectures())}")


def family_for_gguf(metadata: dict) -> Family:
    arch = metadata.get("general.architecture")
    for family in FAMILIES:
        if arch in family.gguf_arches:
            return family
    known = [a for family in FAMILIES for a in family.gguf_arches]
    raise ConfigError(f"GGUF general.architecture {arch!r} is not supported; supported: {', '.join(known)}")


__all__ = ["FAMILIES", "GGUF_ROPE_TENSORS", "Family", "Variant", "family_for_gguf", "family_for_hf",
           "STORED_FORMS", "map_component_name", "map_gguf_name", "map_text_name", "supported_architectures"]

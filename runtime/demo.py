"""The built-in demo model, used when no model file is given.

A 4-million-parameter Gemma 3 trained here on the King James Bible (public domain) by
tools/train_demo_model.py and packed at q8_0: it exists so that a fresh install generates text
at once. It writes KJV-style English and knows nothing else.
"""
from __future__ import annotations

from pathlib import Path

DEMO_PATH = Path(__file__).resolve().parent / "data" / "demo.blob"

NOTICE = ("blobstore: no model given, so using the built-in demo model (4M parameters, trained on the King "
          "James Bible: it only writes Bible-style text). For a real model: blob-pack convert SRC -o MODEL.blob")


def demo_path() -> Path:
    """The packaged demo blob; a clear error when a build left it out."""
    if not DEMO_PATH.is_file():
        raise FileNotFoundError(f"the built-in demo model is missing: expected {DEMO_PATH} (it ships in the wheel; "
                                f"in a source checkout, make it with: python tools/train_demo_model.py)")
    return DEMO_PATH

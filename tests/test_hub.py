"""Hub ids as conversion sources, read from a Hugging Face cache laid out as huggingface_hub does.

The cache is built here on disk exactly as huggingface_hub writes it — models--org--name/blobs/
(files named by the sha256 of LFS files, the git blob sha1 of others), snapshots/<commit>/ holding
relative symlinks into blobs/, refs/<branch> holding the commit — and the network is closed
(socket connect fails the test), so every id resolves offline through huggingface_hub's own code.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import blobstore
from blobstore.convert import ConversionError, convert

hub_constants = pytest.importorskip("huggingface_hub.constants")

MAIN = hashlib.sha1(b"first commit").hexdigest()
OLDER = hashlib.sha1(b"an older commit").hexdigest()
LFS_SUFFIXES = (".safetensors", ".gguf", ".model")  # tracked by git-lfs in Hub repos


def cache_repo(cache, repo_id: str, commit: str, files: dict, refs=()):
    """Add `files` (name → bytes) to `cache` as the snapshot `commit` of `repo_id`, named by `refs`."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for name, data in files.items():
        key = hashlib.sha256(data).hexdigest() if name.endswith(LFS_SUFFIXES) else \
            hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        blob = repo / "blobs" / key
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it


def folder_files(folder) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache in HF_HUB_CACHE, offline, with the network closed."""
    root = tmp_path / "hf-cache"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads both variables when first imported, which this session already did
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    def no_network(*args):
        raise AssertionError(f"network access attempted: {args}")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    return root


def same_tensors(a, b):
    """Two open files hold the same tensor records (but where they lie) and the same bytes."""
    assert a.keys() == b.keys()
    for name in a.keys():
        assert dataclasses.replace(a.info(name), offset=0) == dataclasses.replace(b.info(name), offset=0), name
        np.testing.assert_array_equal(a.float32(name), b.float32(name), err_msg=name)


def same_blob(first, second) -> dict:
    """Both files hold the same tensors, tokenizer and metadata but the source's name; the second's source."""
    with blobstore.open(first) as a, blobstore.open(second) as b:
        same_tensors(a, b)
        meta_a, meta_b = dict(a.metadata), dict(b.metadata)
        source_a, source_b = meta_a.pop("source"), meta_b.pop("source")
        assert meta_a == meta_b
        assert {k: v for k, v in source_a.items() if k != "name"} == \
            {k: v for k, v in source_b.items() if k not in ("name", "hub")}
        return source_b


def test_an_id_in_the_cache_converts_like_its_folder(cache, checkpoints, tmp_path):
    folder = checkpoints("gemma3")
    cache_repo(cache, "org/tiny-gemma3", MAIN, folder_files(folder), refs=["main"])
    convert(folder, tmp_path / "folder.blob", quiet=True)
    convert("org/tiny-gemma3", tmp_path / "hub.blob", quiet=True)
    source = same_blob(tmp_path / "folder.blob", tmp_path / "hub.blob")
    assert source["name"] == "org/tiny-gemma3"
    assert source["hub"] == {"repo_id": "org/tiny-gemma3", "revision": "main", "commit": MAIN}


@pytest.mark.parametrize("revision", ["v0.1", OLDER])
def test_revision_picks_the_other_snapshot(revision, cache, checkpoints, tmp_path):
    cache_repo(cache, "org/tiny", MAIN, folder_files(checkpoints("qwen3")), refs=["main"])
    cache_repo(cache, "org/tiny", OLDER, folder_files(checkpoints("gemma")), refs=["v0.1"])
    convert("org/tiny", tmp_path / "main.blob", quiet=True)
    convert("org/tiny", tmp_path / "older.blob", revision=revision, quiet=True)
    with blobstore.open(tmp_path / "main.blob") as main, blobstore.open(tmp_path / "older.blob") as older:
        assert main.metadata["model"]["family"] == "qwen" and main.metadata["source"]["hub"]["commit"] == MAIN
        assert older.metadata["model"]["family"] == "gemma"
        assert older.metadata["source"]["hub"] == {"repo_id": "org/tiny", "revision": revision, "commit": OLDER}


def test_an_id_not_in_the_cache_says_so(cache, tmp_path):
    with pytest.raises(ConversionError) as caught:
        convert("org/absent-model", tmp_path / "out.blob", quiet=True)
    message = str(caught.value)
    assert message.startswith("org/absent-model: not in the local Hugging Face cache")
    assert str(cache) in message and "(--offline or HF_HUB_OFFLINE=1)" in message
    assert not (tmp_path / "out.blob").exists()


def test_an_unknown_revision_of_a_cached_id_says_so(cache, checkpoints, tmp_path):
    cache_repo(cache, "org/tiny", MAIN, folder_files(checkpoints("qwen3")), refs=["main"])
    with pytest.raises(ConversionError, match=r"org/tiny \(revision v9\): not in the local Hugging Face cache"):
        convert("org/tiny", tmp_path / "out.blob", revision="v9", quiet=True)


def test_a_repo_without_a_model(cache, tmp_path):
    cache_repo(cache, "org/notes", MAIN, {"README.md": b"# notes\n"}, refs=["main"])
    with pytest.raises(ConversionError, match="org/notes: not a model repo blob-pack can convert"):
        convert("org/notes", tmp_path / "out.blob", quiet=True)


@pytest.fixture
def gguf_bytes(checkpoints, tmp_path, spm_model) -> bytes:
    pytest.importorskip("gguf")
    from test_convert_gguf import LLAMA_NORMS, gguf_from_checkpoint, llama_transform

    path = tmp_path / "tiny.gguf"
    gguf_from_checkpoint(checkpoints("llama"), path, "llama", LLAMA_NORMS, llama_transform, spm_model)
    return path.read_bytes()


def test_a_gguf_repo_converts_its_one_gguf_file(cache, gguf_bytes, tmp_path):
    cache_repo(cache, "org/tiny-GGUF", MAIN, {"README.md": b"# gguf\n", "tiny-Q8_0.gguf": gguf_bytes},
               refs=["main"])
    (tmp_path / "tiny-Q8_0.gguf").write_bytes(gguf_bytes)
    convert(tmp_path / "tiny-Q8_0.gguf", tmp_path / "file.blob", quiet=True)
    convert("org/tiny-GGUF", tmp_path / "hub.blob", quiet=True)
    source = same_blob(tmp_path / "file.blob", tmp_path / "hub.blob")
    assert source["format"] == "gguf" and source["hub"]["commit"] == MAIN


def test_several_gguf_files_need_a_choice(cache, gguf_bytes, tmp_path):
    names = ["tiny-Q4_0.gguf", "tiny-Q8_0.gguf"]
    cache_repo(cache, "org/tiny-GGUF", MAIN, {name: gguf_bytes for name in names}, refs=["main"])
    with pytest.raises(ConversionError) as caught:
        convert("org/tiny-GGUF", tmp_path / "out.blob", quiet=True)
    assert "org/tiny-GGUF: the repo holds 2 GGUF files; choose one with --gguf-file NAME:\n" \
           "  tiny-Q4_0.gguf\n  tiny-Q8_0.gguf" in str(caught.value)
    convert("org/tiny-GGUF", tmp_path / "out.blob", gguf_file="tiny-Q4_0.gguf", quiet=True)
    with blobstore.open(tmp_path / "out.blob") as blob:
        assert blob.metadata["source"]["files"][0]["name"] == "tiny-Q4_0.gguf"
    with pytest.raises(ConversionError, match="org/tiny-GGUF: no file 'tiny-F16.gguf' in the repo"):
        convert("org/tiny-GGUF", tmp_path / "other.blob", gguf_file="tiny-F16.gguf", quiet=True)


def test_hub_options_on_a_local_path_are_refused(checkpoints, tmp_path):
    with pytest.raises(ConversionError, match="--revision applies to Hub ids"):
        convert(checkpoints("qwen3"), tmp_path / "out.blob", revision="main", quiet=True)


def test_without_huggingface_hub_the_extra_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes `import huggingface_hub` fail
    with pytest.raises(ConversionError, match=r"org/model: no such local file or folder; to read it as a Hugging "
                                              r"Face Hub id, install the hub extra: pip install "
                                              r"'blobstore-runtime\[hub\]'"):
        convert("org/model", tmp_path / "out.blob", quiet=True)


def run_cli(argv):
    from blobstore.convert.cli import add_parser

    parser = argparse.ArgumentParser(prog="blob-pack")
    add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_flags(cache, checkpoints, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)  # --offline alone keeps it off the network
    cache_repo(cache, "org/tiny", MAIN, folder_files(checkpoints("qwen3")), refs=["main"])
    cache_repo(cache, "org/tiny", OLDER, folder_files(checkpoints("gemma")))
    assert run_cli(["convert", "org/tiny", "-o", str(tmp_path / "a.blob"), "--offline", "--quiet"]) == 0
    assert run_cli(["convert", "org/tiny", "-o", str(tmp_path / "b.blob"), "--offline", "--revision", OLDER,
                    "--quiet"]) == 0
    with blobstore.open(tmp_path / "a.blob") as a, blobstore.open(tmp_path / "b.blob") as b:
        assert (a.metadata["model"]["family"], b.metadata["model"]["family"]) == ("qwen", "gemma")
    assert run_cli(["convert", "org/other", "-o", str(tmp_path / "c.blob"), "--offline"]) == 1
    assert "blob-pack convert: error: org/other: not in the local Hugging Face cache" in capsys.readouterr().err


def test_cli_help_explains_the_hub_options(capsys):
    with pytest.raises(SystemExit):
        run_cli(["convert", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("Hub id (org/name)", "--revision REV", "branch, tag or commit", "--offline",
                  "HF_HUB_OFFLINE=1", "--gguf-file NAME", "blobstore-runtime[hub]"):
        assert words in text, words


def test_blob_pack_reads_the_cache_from_the_environment(checkpoints, tmp_path):
    """A fresh process, as a user runs it: HF_HOME and HF_HUB_OFFLINE from the environment alone."""
    home = tmp_path / "hf-home"
    cache_repo(home / "hub", "org/tiny", MAIN, folder_files(checkpoints("qwen2")), refs=["main"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1")
    # cwd away from the checkout: `python -m` puts the cwd first on sys.path, and the source tree's
    # blobstore/ (no compiled extension) would shadow the installed package
    done = subprocess.run([sys.executable, "-m", "blobstore", "convert", "org/tiny", "-o", str(tmp_path / "t.blob")],
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with blobstore.open(tmp_path / "t.blob") as blob:
        assert blob.metadata["source"]["hub"]["commit"] == MAIN

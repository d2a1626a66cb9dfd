"""The pre-flight of blob-pack convert: everything load() needs is checked before a tensor is read.

Each problem class — no tokenizer, an unusable tokenizer, an unsupported rope kind, a missing, a
misshapen and an unmapped tensor; in a folder or a GGUF file — fails the conversion (and the dry
run) with one ConversionError, while the source's `read` is watched: a tied model's plan reads no
tensor bytes at all, an untied one only its head and embedding (the plan compares them to spot a
duplicated head).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import blobstore
from blobstore.convert import ConversionError, convert, tokenizer
from blobstore.convert.sources import GGUFFile, SafetensorsFolder

from conftest import build_checkpoint
from test_convert_errors import edit_weights

torch = pytest.importorskip("torch")


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def no_tokenizer(folder):
    (folder / "tokenizer.model").unlink()


def bad_tokenizer_config(folder):
    (folder / "tokenizer_config.json").write_text("{not json")


def yarn_rope(folder):
    edit_config(folder, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})


def missing_tensor(folder):
    edit_weights(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))


def misshapen_tensor(folder):
    edit_weights(folder, lambda t: t.update({"model.layers.0.mlp.down_proj.weight": torch.zeros(64, 95)}))


def unmapped_tensor(folder):
    edit_weights(folder, lambda t: t.update({"model.layers.0.mlp.mystery.weight": torch.ones(3, 5)}))


PROBLEMS = {  # edit → what the message must say
    no_tokenizer: "no tokenizer; expected tokenizer.model (SentencePiece) or tokenizer.json",
    bad_tokenizer_config: "tokenizer_config.json: not valid JSON",
    yarn_rope: "rope type 'yarn' is not supported",
    missing_tensor: "    - layers.1.up",
    misshapen_tensor: "layers.0.down: expected (64, 96) from the config, found (64, 95)",
    unmapped_tensor: "names this architecture does not have (1):\n      model.layers.0.mlp.mystery.weight",
}


@pytest.fixture
def reads(monkeypatch):
    """The source tensors read so far (SafetensorsFolder.read is watched, not replaced)."""
    seen = []
    real = SafetensorsFolder.read

    def watched(self, name):
        seen.append(name)
        return real(self, name)
    monkeypatch.setattr(SafetensorsFolder, "read", watched)
    return seen


def preflight_error(folder, out_dir, **options) -> str:
    """The one ConversionError of converting `folder`; nothing may be left in `out_dir`."""
    out_dir.mkdir(exist_ok=True)
    with pytest.raises(ConversionError) as caught:
        convert(folder, out_dir / "out.blob", quiet=True, **options)
    assert list(out_dir.iterdir()) == []  # neither the output nor a temporary file
    return str(caught.value)


@pytest.mark.parametrize("dry_run", [False, True], ids=["convert", "dry-run"])
@pytest.mark.parametrize("edit", PROBLEMS, ids=lambda edit: edit.__name__)
def test_each_problem_fails_before_any_tensor_is_read(edit, dry_run, checkpoint_copy, tmp_path, reads):
    folder = checkpoint_copy("gemma")  # tied embeddings: no head to compare, so no bytes to read
    edit(folder)
    message = preflight_error(folder, tmp_path / "out", dry_run=dry_run)
    assert message.startswith(f"cannot convert {folder}:")
    assert PROBLEMS[edit] in message
    assert reads == []


def test_every_problem_comes_in_one_message(checkpoint_copy, tmp_path, reads):
    folder = checkpoint_copy("gemma")
    for edit in (no_tokenizer, missing_tensor, misshapen_tensor, unmapped_tensor):
        edit(folder)
    message = preflight_error(folder, tmp_path / "out")
    for edit in (no_tokenizer, missing_tensor, misshapen_tensor, unmapped_tensor):
        assert PROBLEMS[edit] in message, edit.__name__
    assert message.count("cannot convert") == 1
    assert reads == []


def test_an_unusable_config_is_reported_with_the_tokenizer_problems(checkpoint_copy, tmp_path, reads):
    folder = checkpoint_copy("llama")
    edit_config(folder, rope_parameters=None, rope_scaling={"type": "dynamic", "factor": 2.0})
    no_tokenizer(folder)
    message = preflight_error(folder, tmp_path / "out")
    assert "the config cannot be used:\n    config.json field rope_scaling: rope type 'dynamic' is not supported" \
        in message
    assert "the tokenizer cannot be stored" in message and PROBLEMS[no_tokenizer] in message
    assert "(tensors not checked: the config says which tensors the model needs)" in message
    assert reads == []


def test_an_untied_head_is_the_only_read_of_the_plan(checkpoint_copy, tmp_path, reads):
    folder = checkpoint_copy("qwen3")  # untied: lm_head.weight is compared with the embedding
    no_tokenizer(folder)
    assert PROBLEMS[no_tokenizer] in preflight_error(folder, tmp_path / "out")
    assert sorted(reads) == ["lm_head.weight", "model.embed_tokens.weight"]


def test_a_vocabulary_larger_than_the_embedding_is_refused(tmp_path, spm_model, reads):
    folder = tmp_path / "small-vocab"
    folder.mkdir()
    build_checkpoint(folder, "gemma", spm_model, vocab_size=300)  # next to a 400-piece sentencepiece model
    message = preflight_error(folder, tmp_path / "out")
    assert "the tokenizer cannot be stored" in message and "300" in message and "400" in message
    assert reads == []


def test_the_tokenizer_is_built_once_and_stored(checkpoints, tmp_path, monkeypatch):
    calls = []
    real = tokenizer.from_folder
    monkeypatch.setattr(tokenizer, "from_folder", lambda *args: calls.append(args) or real(*args))
    folder = checkpoints("gemma3")
    convert(folder, tmp_path / "out.blob", quiet=True)
    assert len(calls) == 1
    with blobstore.open(tmp_path / "out.blob") as blob:
        assert blob.file_bytes("tokenizer.model") == (folder / "tokenizer.model").read_bytes()
        assert blob.metadata["tokenizer"]["kind"] == "sentencepiece"


def test_a_gguf_of_an_unknown_architecture_without_a_vocabulary(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "falcon.gguf"
    writer = gguf.GGUFWriter(str(path), "falcon")
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    message = preflight_error(path, tmp_path / "out")
    assert "the config cannot be used:\n    GGUF general.architecture 'falcon' is not supported" in message
    assert "GGUF tokenizer: no tokenizer.ggml.tokens" in message


def test_a_gguf_vocabulary_without_a_supported_form(checkpoints, tmp_path, spm_model, monkeypatch):
    gguf = pytest.importorskip("gguf")
    from test_convert_gguf import LLAMA_NORMS, gguf_from_checkpoint, llama_transform

    real = gguf.GGUFWriter.add_tokenizer_model
    monkeypatch.setattr(gguf.GGUFWriter, "add_tokenizer_model", lambda writer, model: real(writer, "bert"))
    path = tmp_path / "llama.gguf"
    gguf_from_checkpoint(checkpoints("llama"), path, "llama", LLAMA_NORMS, llama_transform, spm_model)
    monkeypatch.undo()
    read = []
    real_read = GGUFFile.read
    monkeypatch.setattr(GGUFFile, "read", lambda source, name: read.append(name) or real_read(source, name))
    message = preflight_error(path, tmp_path / "out", dry_run=True)
    assert "GGUF tokenizer: tokenizer.ggml.model 'bert'; supported: 'llama' (sentencepiece)" in message
    assert set(read) <= {"output.weight", "token_embd.weight"}  # the head compared with the embedding, nothing else


def test_a_multi_line_problem_stays_inside_its_section():
    from blobstore.convert.problems import Problems

    problems = Problems("model/")
    problems.tokenizer.append("tokenizer.json: 2 problems:\n  id 500 beyond the embedding\n  id 501 too")
    assert problems.fatal(allow_unknown=True)
    assert problems.report(allow_unknown=True, found=0) == (
        "cannot convert model/:\n"
        "  the tokenizer cannot be stored (blobstore.runtime.load needs one):\n"
        "    tokenizer.json: 2 problems:\n      id 500 beyond the embedding\n      id 501 too")

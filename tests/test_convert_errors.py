"""Every conversion error path: one message naming every problem, grouped by likely cause."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

import blobstore
from blobstore.convert import ConversionError, convert

torch = pytest.importorskip("torch")
st = pytest.importorskip("safetensors.torch")


def edit_weights(folder, edit):
    """Rewrite model.safetensors through `edit(dict of torch tensors)`."""
    tensors = st.load_file(folder / "model.safetensors")
    edit(tensors)
    st.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def convert_error(folder, tmp_path, **options) -> str:
    with pytest.raises(ConversionError) as caught:
        convert(folder, tmp_path / "out.blob", quiet=True, **options)
    assert not (tmp_path / "out.blob").exists()
    return str(caught.value)


def test_vision_tower_in_a_text_architecture(checkpoint_copy, tmp_path):
    folder = checkpoint_copy("gemma3")
    names = ["vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight", "multi_modal_projector.mm_input_projection_weight"]
    edit_weights(folder, lambda t: t.update({n: torch.zeros(4, 4) for n in names}))
    message = convert_error(folder, tmp_path)
    assert "vision tower / projector tensors, but this architecture has no vision component here (2):" in message
    for name in names:
        assert f"      {name}\n" in message


def test_identical_explicit_head_in_a_tied_config_becomes_a_tie(checkpoint_copy, tmp_path):
    folder = checkpoint_copy("gemma2")
    edit_weights(folder, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    summary = convert(folder, tmp_path / "out.blob", quiet=True)
    assert any("lm_head.weight is bit-identical to the embedding" in note for note in summary.notes)
    with blobstore.open(tmp_path / "out.blob") as blob:
        assert blob.info("lm_head").tie == "embed"
        assert blob.metadata["model"]["tie_word_embeddings"] is True


def test_distinct_explicit_head_in_a_tied_config_is_kept_with_a_warning(checkpoint_copy, tmp_path):
    folder = checkpoint_copy("gemma2")
    edit_weights(folder, lambda t: t.update({"lm_head": t["model.embed_tokens.weight"] * 2}))  # MLX-style name
    summary = convert(folder, tmp_path / "out.blob", dtype="f32", quiet=True)
    assert any("says tie_word_embeddings, but lm_head differs from the embedding" in w for w in summary.warnings)
    with blobstore.open(tmp_path / "out.blob") as blob:
        assert blob.info("lm_head").tie is None
        np.testing.assert_array_equal(blob.float32("lm_head"), 2 * blob.float32("embed"))
        assert blob.metadata["model"]["tie_word_embeddings"] is False


def test_untied_config_without_a_head(checkpoint_copy, tmp_path):
    folder = checkpoint_copy("qwen3")
    edit_weights(folder, lambda t: t.pop("lm_head.weight"))
    message = convert_error(folder, tmp_path)
    assert "required tensor(s) missing" in message and "    - lm_head" in message


def test_missing_layer_lists_every_missing_tensor(checkpoint_copy, tmp_path):
    folder = checkpoint_copy("llama")
    edit_weights(folder, lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.1.")])
    message = convert_error(folder, tmp_path)
    assert "9 required tensor(s) missing" in message
    for part in ("attn_norm", "q", "k", "v", "o", "ffn_norm", "gate", "up", "down"):
        assert f"    - layers.1.{part}\n" in message + "\n"


def test_wrong_shape_names_expected_and_found(checkpoint_copy, tmp_path):
    folder = checkpoint_copy("qwen2")
    edit_weights(folder, lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 64)}))
    message = convert_error(folder, tmp_path)
    assert ("layers.0.q: expected (64, 64) from the config, found (32, 64) in "
            "model.layers.0.self_attn.q_proj.weight") in message


def test_pickle_only_folder_is_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 not loaded")
    message = convert_error(folder, tmp_path)
    assert "only pickled weights (pytorch_model.bin)" in message
    assert "never unpickles" in message and "Convert them to safetensors first" in message


def test_unknown_tensor_fails_then_is_kept_with_allow_unknown(checkpoint_copy, tmp_path):
    folder = checkpoint_copy("qwen3")
    edit_weights(folder, lambda t: t.update({"model.layers.0.mlp.mystery.weight": torch.ones(3, 5)}))
    message = convert_error(folder, tmp_path)
    assert "names this architecture does not have (1):\n      model.layers.0.mlp.mystery.weight" in message
    convert(folder, tmp_path / "out.blob", allow_unknown=True, quiet=True)
    with blobstore.open(tmp_path / "out.blob") as blob:
        info = blob.info("extra.model.layers.0.mlp.mystery.weight")
        assert info.component == "extra" and info.source == "model.layers.0.mlp.mystery.weight"
        np.testing.assert_array_equal(blob.float32(info.name), np.ones((3, 5), np.float32))


def test_quantization_side_tensors_and_prefix_drift_are_grouped(checkpoint_copy, tmp_path):
    folder = checkpoint_copy("llama")

    def edit(t):
        t["model.layers.0.mlp.down_proj.SCB"] = torch.ones(64)
        t["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 96, dtype=torch.int8)
        t["model.layers.0.mlp.up_proj.weight.absmax"] = torch.ones(4)
        t["base_model.model.model.layers.0.self_attn.q_proj.weight"] = t.pop("model.layers.0.self_attn.q_proj.weight")
    edit_weights(folder, edit)
    message = convert_error(folder, tmp_path)
    assert "quantization side tensors (bitsandbytes / GPTQ / AWQ / FP8)" in message
    assert "model.layers.0.mlp.down_proj.SCB" in message and "model.layers.0.mlp.up_proj.weight.absmax" in message
    assert "known tensors under an unexpected key prefix" in message
    assert "base_model.model.model.layers.0.self_attn.q_proj.weight" in message
    assert "    - layers.0.q" in message  # and the consequence, in the same message
    assert "layers.0.down: I8 in model.layers.0.mlp.down_proj.weight" in message


def test_all_problems_come_in_one_message(checkpoint_copy, tmp_path):
    folder = checkpoint_copy("gemma")

    def edit(t):
        t.pop("model.layers.1.mlp.up_proj.weight")
        t["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 95)
        t["vision_tower.patch.weight"] = torch.zeros(2)
    edit_weights(folder, edit)
    message = convert_error(folder, tmp_path)
    assert "vision_tower.patch.weight" in message
    assert "    - layers.1.up" in message
    assert "layers.0.down: expected (64, 96) from the config, found (64, 95)" in message


@pytest.mark.parametrize("prefix", ["", "model.", "model.language_model.", "language_model.model."])
def test_every_known_key_prefix_is_accepted(prefix, checkpoint_copy, tmp_path):
    folder = checkpoint_copy("qwen3")
    edit_weights(folder, lambda t: t.update({(prefix + k[len("model."):] if k.startswith("model.") else k): t.pop(k)
                                             for k in list(t)}))
    convert(folder, tmp_path / "out.blob", dtype="f32", quiet=True)
    with blobstore.open(tmp_path / "out.blob") as blob:
        assert blob.info("layers.1.k_norm").source == f"{prefix}layers.1.self_attn.k_norm.weight"


def test_truncated_and_pointer_files(checkpoint_copy, tmp_path):
    folder = checkpoint_copy("qwen2")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert "outside the" in convert_error(folder, tmp_path) and "truncated file?" in convert_error(folder, tmp_path)
    weights.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n")
    assert "git-lfs pointer" in convert_error(folder, tmp_path)


def test_unsupported_architecture_and_rope(checkpoint_copy, tmp_path):
    folder = checkpoint_copy("llama")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["FalconForCausalLM"]}))
    assert "'FalconForCausalLM' is not supported; supported: GemmaForCausalLM" in convert_error(folder, tmp_path)
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}
    (folder / "config.json").write_text(json.dumps(config))
    assert "rope type 'yarn' is not supported" in convert_error(folder, tmp_path)


def run_cli(argv):
    from blobstore.convert.cli import add_parser

    parser = argparse.ArgumentParser(prog="blob-pack")
    add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_reports_errors_with_exit_status_1(checkpoint_copy, tmp_path, capsys):
    folder = checkpoint_copy("qwen3")
    edit_weights(folder, lambda t: t.pop("model.norm.weight"))
    assert run_cli(["convert", str(folder), "-o", str(tmp_path / "out.blob")]) == 1
    assert "blob-pack convert: error: cannot convert" in capsys.readouterr().err


def test_cli_converts_and_summarizes(checkpoints, tmp_path, capsys):
    out = tmp_path / "out.blob"
    assert run_cli(["convert", str(checkpoints("gemma")), "-o", str(out), "--dtype", "q4_0", "--keep-f32",
                    "layers.0.*", "--embed-dtype", "bf16", "--align", "64"]) == 0
    assert "wrote " in capsys.readouterr().out
    with blobstore.open(out) as blob:
        assert blob.alignment == 64
        assert blob.info("layers.0.q").dtype.label == "f32" and blob.info("layers.1.q").dtype.label == "q4_0"
        assert blob.info("embed").dtype.label == "bf16"


def test_cli_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        run_cli(["convert", "--help"])
    text = capsys.readouterr().out
    for option in ("--output", "--dtype", "--keep-f32", "--embed-dtype", "--text-only", "--allow-unknown", "--align",
                   "--force", "--dry-run", "--quiet", "--strict"):
        assert option in text
    assert "q8_0 when --dtype is 4-bit" in " ".join(text.split())  # the embedding default is explained


@pytest.mark.parametrize("options, message", [
    ({"dtype": "i8"}, "dtype: expected keep or one of f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, "
                      "q5_k, q6_k, q4_k_m, q5_k_m, found 'i8'"),
    ({"embed_dtype": "iq4_xs"}, "embed_dtype: expected keep or one of f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, "
                                "q2_k, q3_k, q4_k, q5_k, q6_k, found 'iq4_xs'"),
    ({"embed_dtype": "q4_k_m"}, "embed_dtype: expected keep or one of .*, found 'q4_k_m'"),
    ({"align": 100}, "--align: expected a power of two from 64"),
])
def test_bad_options_are_named(options, message, checkpoints, tmp_path):
    with pytest.raises(ConversionError, match=message):
        convert(checkpoints("qwen2"), tmp_path / "out.blob", quiet=True, **options)

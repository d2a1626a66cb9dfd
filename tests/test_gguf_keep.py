"""`blob-pack convert` of a GGUF keeps every weight matrix in its GGUF type (--dtype keep, the default):
the ggml block bytes land in the planes unchanged — after the family's row fix-ups (llama's q/k
unpermute, phi3's fused row slices) — where the kernels multiply the type (DTypeSpec.matmul); other
types are re-quantized with one warning naming them, or refused with --strict.

The GGUFs are written here with random blocks of every type (sane float16 scales of both signs). Tests of
the lossless path switch `matmul` on for the new types in the table, since reading a blob back through
blobstore.open needs no kernels; after the kernels land the same tests run on the real table.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import blobstore
from blobstore import quant
from blobstore.convert import ConversionError, convert
from blobstore.convert.plan import REQUANTIZE_TO, kept_dtype
from blobstore.convert.sources import open_source
from blobstore.format import DTYPE_SPECS, DType
from blobstore.runtime import load
from kquant_blocks import NEW_TYPES

gguf = pytest.importorskip("gguf")
spm = pytest.importorskip("sentencepiece")
from test_convert_gguf import permute_like_llama_cpp, sentencepiece_vocabulary  # noqa: E402

T = gguf.GGMLQuantizationType
HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 256, 512, 4, 2, 64, 400
# Every stored block type, the float types, and one type the format does not store (IQ4_NL).
LLAMA_TYPES = {
    "token_embd.weight": T.Q8_0, "output.weight": T.Q6_K,
    "blk.0.attn_q.weight": T.Q4_K, "blk.0.attn_k.weight": T.Q5_K, "blk.0.attn_v.weight": T.Q6_K,
    "blk.0.attn_output.weight": T.Q2_K, "blk.0.ffn_gate.weight": T.Q3_K, "blk.0.ffn_up.weight": T.Q4_1,
    "blk.0.ffn_down.weight": T.Q5_1,
    "blk.1.attn_q.weight": T.Q5_0, "blk.1.attn_k.weight": T.Q4_0, "blk.1.attn_v.weight": T.F16,
    "blk.1.attn_output.weight": T.BF16, "blk.1.ffn_gate.weight": T.IQ4_NL, "blk.1.ffn_up.weight": T.F32,
    "blk.1.ffn_down.weight": T.Q8_0,
}
SHAPES = {"token_embd": (VOCAB, HIDDEN), "output": (VOCAB, HIDDEN), "attn_q": (HEADS * HEAD_DIM, HIDDEN),
          "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN), "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN),
          "attn_output": (HIDDEN, HEADS * HEAD_DIM), "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN),
          "ffn_down": (HIDDEN, FFN), "attn_qkv": ((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN)}
FUSED_SHAPES = {**SHAPES, "ffn_up": (2 * FFN, HIDDEN)}  # phi3: gate and up in one tensor


def shape_of(name: str, arch: str) -> tuple[int, int]:
    return (FUSED_SHAPES if arch == "phi3" else SHAPES)[name.split(".")[-2]]


def random_tensor(qtype, shape, rng) -> np.ndarray:
    """The GGUF bytes of a random tensor: uint8 (rows, row bytes); scales and floats small (~0.02 weights)."""
    rows, cols = shape
    if qtype in (T.F32, T.F16):
        values = (rng.standard_normal(shape) * 0.02).astype(np.float32 if qtype == T.F32 else np.float16)
        return values.view(np.uint8)
    if qtype == T.BF16:
        return quant.f32_to_bf16((rng.standard_normal(shape) * 0.02).astype(np.float32)).view(np.uint8)
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block * block_bytes), dtype=np.uint8)
    dtype = blobstore.format.dtype_of_ggml(qtype)
    if dtype is None:  # IQ4_NL: a float16 scale, then 16 bytes of 4-bit indices
        blocks = raw.reshape(-1, block_bytes)
        blocks[:, :2] = (rng.uniform(-1, 1, (len(blocks), 1)) * 2e-3).astype(np.float16).view(np.uint8)
        return raw
    planes = list(quant.planes_from_ggml(dtype, raw))
    for index, plane in enumerate(dtype.spec.planes):
        if plane.element == "<f2":  # d and dmin of both signs, at most 2e-3
            planes[index] = (rng.uniform(-1, 1, planes[index].shape) * 2e-3).astype(np.float16)
    return quant.ggml_from_planes(dtype, planes)


def gguf_values(qtype, raw: np.ndarray, shape) -> np.ndarray:
    """The gguf package's float32 values of a tensor's bytes."""
    if qtype == T.F32:
        return raw.view(np.float32).reshape(shape)
    if qtype == T.F16:
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    return gguf.quants.dequantize(raw, qtype).astype(np.float32).reshape(shape)


def write_random_gguf(path, arch: str, types: dict, spm_model: bytes, seed: int = 0) -> dict:
    """A GGUF of `arch` with random tensors of the given types; returns name → (qtype, bytes, shape)."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in (("context_length", 256), ("embedding_length", HIDDEN), ("feed_forward_length", FFN),
                       ("block_count", 2), ("attention.head_count", HEADS), ("attention.head_count_kv", KV_HEADS),
                       ("rope.dimension_count", HEAD_DIM)):
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_float32(f"{arch}.rope.freq_base", 10000.0)
    sentencepiece_vocabulary(spm_model)(writer)
    tensors = {}
    norms = ["output_norm.weight"] + [f"blk.{i}.{n}.weight" for i in range(2) for n in ("attn_norm", "ffn_norm")]
    for name in norms:
        writer.add_tensor(name, (1 + rng.standard_normal(HIDDEN) * 0.1).astype(np.float32))
    for name, qtype in types.items():
        shape = shape_of(name, arch)
        raw = random_tensor(qtype, shape, rng)
        tensors[name] = (qtype, raw, shape)
        if qtype == T.F32:
            writer.add_tensor(name, raw.view(np.float32).reshape(shape))
        elif qtype == T.F16:
            writer.add_tensor(name, raw.view(np.float16).reshape(shape))
        else:
            writer.add_tensor(name, raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


@pytest.fixture
def kernels_for_every_type(monkeypatch):
    """The table as it reads once the kernels multiply every new type."""
    for dtype in NEW_TYPES:
        monkeypatch.setitem(DTYPE_SPECS, dtype, dataclasses.replace(dtype.spec, matmul=True))


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory, spm_model):
    path = tmp_path_factory.mktemp("keep") / "llama.gguf"
    return path, write_random_gguf(path, "llama", LLAMA_TYPES, spm_model)


def stored_name(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "embed"
    if gguf_name == "output.weight":
        return "lm_head"
    _, layer, part, _ = gguf_name.split(".")
    return f"layers.{layer}.{dict(attn_q='q', attn_k='k', attn_v='v', attn_output='o', ffn_gate='gate', ffn_up='up', ffn_down='down')[part]}"


def llama_rows(name: str, array: np.ndarray) -> np.ndarray:
    """Stored rows back in the GGUF's order: llama.cpp's q/k permutation redone."""
    if name.endswith(".q"):
        return permute_like_llama_cpp(array, HEADS)
    if name.endswith(".k"):
        return permute_like_llama_cpp(array, KV_HEADS)
    return array


def test_every_runnable_type_keeps_its_bytes_and_values(llama_gguf, tmp_path, kernels_for_every_type):
    path, tensors = llama_gguf
    lines = []
    convert(path, tmp_path / "out.blob", align=64, quiet=True, log=lines.append)
    with blobstore.open(tmp_path / "out.blob", verify="full") as blob:
        assert blob.version == (1, 3)   # 1.1 for the ggml types, 1.2 / 1.3 for q8_0 / q4_0, q5_0 in the default interleave8
        assert blob.info(stored_name("blk.1.attn_q.weight")).layout == "interleave8"   # the Q5_0 matrix
        assert blob.metadata["conversion"]["dtype"] == "keep"
        for gguf_name, (qtype, raw, shape) in tensors.items():
            name = stored_name(gguf_name)
            info = blob.info(name)
            expected = gguf_values(qtype, raw, shape)
            if qtype == T.IQ4_NL:
                # not stored: re-quantized to the first REQUANTIZE_TO type that runs and blob-pack quantizes to
                assert info.dtype is DType.Q4_K
                continue
            assert info.dtype.spec.ggml_type == qtype, name
            stored = llama_rows(name, blob.float32(name))
            assert stored.tobytes() == expected.tobytes(), name  # bit for bit, -0.0 included
            if info.dtype.is_quantized:
                blocks = quant.ggml_from_planes(info.dtype, blob[name].planar())
                assert np.array_equal(llama_rows(name, blocks), raw), name  # the GGUF's bytes, unchanged
    assert [line for line in lines if line.startswith("warning:")] == [
        "warning: 1 weight matrix of a GGUF type this build cannot keep is re-quantized (--strict refuses instead): "
        "IQ4_NL -> q4_k: layers.1.gate"]


def test_the_blob_is_the_ggufs_size_plus_padding(llama_gguf, tmp_path, kernels_for_every_type):
    path, tensors = llama_gguf
    convert(path, tmp_path / "out.blob", align=64, quiet=True)
    with blobstore.open(tmp_path / "out.blob") as blob:
        for gguf_name, (qtype, raw, _) in tensors.items():
            info = blob.info(stored_name(gguf_name))
            if qtype != T.IQ4_NL:  # each plane after the first starts on a 64-byte boundary
                assert raw.nbytes <= info.nbytes <= raw.nbytes + 64 * (len(info.dtype.spec.planes) - 1), gguf_name
        stored = sum(i.nbytes for i in blob.infos() if i.tie is None and i.component == "text")
    gguf_size, blob_size = path.stat().st_size, (tmp_path / "out.blob").stat().st_size
    # The one re-quantized matrix grows from 4.5 to 8.5 bits per weight; the file is padded to 64 KiB.
    iq4 = tensors["blk.1.ffn_gate.weight"][1].nbytes
    assert blob_size <= 1.03 * gguf_size + iq4 * (34 / 18 - 1) + 64 * 1024, (blob_size, gguf_size, stored)


def test_types_the_kernels_cannot_multiply_are_re_quantized_with_one_warning_and_the_model_runs(llama_gguf, tmp_path):
    path, tensors = llama_gguf
    lines = []
    convert(path, tmp_path / "out.blob", quiet=True, log=lines.append)
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1
    runnable = {t for t in T if (d := blobstore.format.dtype_of_ggml(t)) is not None and d.spec.matmul}
    with blobstore.open(tmp_path / "out.blob") as blob:
        for gguf_name, (qtype, raw, shape) in tensors.items():
            name, info = stored_name(gguf_name), blob.info(stored_name(gguf_name))
            if qtype in runnable:
                assert info.dtype.spec.ggml_type == qtype and name not in warnings[0], name
                assert llama_rows(name, blob.float32(name)).tobytes() == gguf_values(qtype, raw, shape).tobytes()
            else:
                assert info.dtype.label == kept_dtype(qtype.name), name
                assert f"{qtype.name} -> {info.dtype.label}: " in warnings[0] and name in warnings[0], name
                assert blob.metadata["conversion"]["requantized"][name] == f"{qtype.name} -> {info.dtype.label}"
    result = load(tmp_path / "out.blob").generate("Hello", max_new_tokens=3, temperature=0, ignore_eos=True)
    assert len(result.token_ids) == 3


def test_strict_refuses_what_it_cannot_keep_and_writes_nothing(llama_gguf, tmp_path):
    path, tensors = llama_gguf
    with pytest.raises(ConversionError) as caught:
        convert(path, tmp_path / "out.blob", quiet=True, strict=True)
    message = str(caught.value)
    assert "cannot keep" in message and "--strict" in message
    assert "layers.1.gate: IQ4_NL -> q4_k" in message
    for gguf_name, (qtype, _, _) in tensors.items():
        own = blobstore.format.dtype_of_ggml(qtype)
        if own is None or not own.spec.matmul:
            assert f"{stored_name(gguf_name)}: {qtype.name} -> {kept_dtype(qtype.name)}" in message
    assert not (tmp_path / "out.blob").exists()


def test_strict_accepts_a_gguf_of_runnable_types(tmp_path, spm_model):
    types = {name: T.Q8_0 if i % 2 else T.F16 for i, name in enumerate(LLAMA_TYPES)}
    path = tmp_path / "plain.gguf"
    tensors = write_random_gguf(path, "llama", types, spm_model, seed=1)
    convert(path, tmp_path / "out.blob", quiet=True, strict=True)
    with blobstore.open(tmp_path / "out.blob") as blob:
        assert {blob.info(stored_name(n)).dtype.label for n in tensors} == {"q8_0", "f16"}
        assert blob.info("final_norm").dtype is DType.F32


def test_an_explicit_dtype_still_re_quantizes_but_copies_blocks_already_in_it(llama_gguf, tmp_path):
    path, tensors = llama_gguf
    convert(path, tmp_path / "out.blob", dtype="q8_0", quiet=True, strict=True)  # strict only concerns keep
    with blobstore.open(tmp_path / "out.blob") as blob:
        assert {i.dtype.label for i in blob.infos() if len(i.shape) == 2} == {"q8_0"}
        qtype, raw, _ = tensors["blk.1.ffn_down.weight"]
        assert np.array_equal(quant.ggml_from_planes(DType.Q8_0, blob["layers.1.down"].planar()), raw)
        assert blob.metadata["conversion"]["requantized"] == {}


def test_phi3_fused_quantized_tensors_split_into_whole_rows_of_every_plane(tmp_path, spm_model, kernels_for_every_type):
    types = {"token_embd.weight": T.Q8_0, "output.weight": T.Q6_K}
    for i, (qkv, up) in enumerate([(T.Q4_K, T.Q5_K), (T.Q3_K, T.Q5_1)]):
        types.update({f"blk.{i}.attn_qkv.weight": qkv, f"blk.{i}.attn_output.weight": T.Q6_K,
                      f"blk.{i}.ffn_up.weight": up, f"blk.{i}.ffn_down.weight": T.Q2_K})
    path = tmp_path / "phi3.gguf"
    fused = write_random_gguf(path, "phi3", types, spm_model)
    convert(path, tmp_path / "out.blob", quiet=True)
    with blobstore.open(tmp_path / "out.blob") as blob:
        for i in range(2):
            for source, parts in ((f"blk.{i}.attn_qkv.weight", ("q", "k", "v")), (f"blk.{i}.ffn_up.weight", ("gate", "up"))):
                qtype, raw, shape = fused[source]
                pieces = [blob[f"layers.{i}.{p}"] for p in parts]
                assert all(p.dtype.spec.ggml_type == qtype for p in pieces)
                joined = np.concatenate([quant.ggml_from_planes(p.dtype, p.planes) for p in pieces])
                assert np.array_equal(joined, raw), source
                values = np.concatenate([blob.float32(f"layers.{i}.{p}") for p in parts])
                assert values.tobytes() == gguf_values(qtype, raw, shape).tobytes()


def test_the_fallback_table_takes_the_first_type_that_runs_and_can_be_quantized_to(monkeypatch):
    for chain in REQUANTIZE_TO.values():  # each ends in a type every build multiplies and quantizes to
        assert DType.parse(chain[-1]).spec.matmul and DType.parse(chain[-1]).spec.weight_choice
    assert kept_dtype("IQ4_XS") == ("q4_k" if DType.Q4_K.spec.matmul and DType.Q4_K.spec.weight_choice else
                                    "q5_k" if DType.Q5_K.spec.matmul and DType.Q5_K.spec.weight_choice else "q8_0")
    monkeypatch.setitem(DTYPE_SPECS, DType.Q4_K, dataclasses.replace(DType.Q4_K.spec, matmul=True, weight_choice=True))
    assert (kept_dtype("IQ4_XS"), kept_dtype("IQ3_S"), kept_dtype("Q4_K"), kept_dtype("Q6_K")) == \
        ("q4_k", "q4_k", "q4_k", kept_dtype("Q6_K"))
    assert kept_dtype("SOMETHING_NEW") == "q8_0"


@pytest.mark.parametrize("checkpoint, stored", [("gemma3", "bf16"), ("gemma", "f32")])
def test_keep_on_a_hugging_face_folder_stores_its_float_type_unchanged(checkpoints, tmp_path, checkpoint, stored):
    folder = checkpoints(checkpoint)
    convert(folder, tmp_path / "out.blob", dtype="keep", quiet=True)
    source = open_source(folder)
    with blobstore.open(tmp_path / "out.blob") as blob:
        matrices = [i for i in blob.infos() if len(i.shape) == 2 and i.tie is None]
        assert matrices and {i.dtype.label for i in matrices} == {stored}
        for info in matrices:
            bits, label = source.read(info.source)
            assert label == stored and np.array_equal(np.asarray(blob[info.name]), bits), info.name


def test_a_gemma_gguf_keeps_its_matrices_and_takes_the_plus_one_off_its_f32_norms(checkpoints, tmp_path, spm_model):
    from test_convert_gguf import GEMMA_NORMS, gemma_transform, gguf_from_checkpoint

    path = tmp_path / "gemma3.gguf"
    keys = [("rope.freq_base", 1e6), ("attention.sliding_window", 8), ("attention.sliding_window_pattern", 3)]
    _, tensors, _ = gguf_from_checkpoint(checkpoints("gemma3"), path, "gemma3", GEMMA_NORMS, gemma_transform,
                                         spm_model, extra_keys=keys)
    convert(path, tmp_path / "out.blob", quiet=True, strict=True)
    reader = gguf.GGUFReader(path)
    with blobstore.open(tmp_path / "out.blob") as blob:
        for t in reader.tensors:
            info = next(i for i in blob.infos() if i.source == t.name and i.tie is None)
            values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(info.shape)
            if info.name.endswith("norm"):  # llama.cpp stored 1 + w
                assert info.dtype is DType.F32 and tensors[t.name][1] == T.F32
                assert blob.float32(info.name).tobytes() == (values - np.float32(1)).tobytes(), info.name
                continue
            assert info.dtype.spec.ggml_type == t.tensor_type, info.name  # Q8_0 and F16 kept as they are
            assert blob.float32(info.name).tobytes() == values.tobytes(), info.name
            if info.dtype.is_quantized:
                assert np.array_equal(quant.ggml_from_planes(info.dtype, blob[info.name].planar()),
                                      np.asarray(t.data).reshape(info.shape[0], -1)), info.name

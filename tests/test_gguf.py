"""Export to GGUF for llama.cpp (python -m llama.formats.convert --to gguf): every metadata key and
value, every tensor's name, shape, type and values, read back by a small reader written here
(apart from the writer's code) and, when the gguf package is installed, by llama.cpp's own
reader; LoRA-merged and int8-split sources; each bad input in one line with nothing written.
Run: python3 -m pytest -q tests/test_gguf.py
"""
import json
import struct
from dataclasses import replace
import subprocess
import sys

import numpy as np
import pytest
import torch

from launch import REPO
from llama.errors import BadInput
from llama.formats import convert
from llama.formats.checkpoint import open_source, write_split
from llama.formats.hf import meta_to_hf_name
from llama.formats.files import sha256_of
from llama.formats.layouts import save_meta
from llama.formats.tensor_files import write_safetensors
from llama.model.quant import dequantize, quantized_tensors
from llama.model.tokenizer import Tokenizer
from llama.model.transformer import Transformer

TYPES = {0: "f32", 1: "f16", 8: "q8_0"}
VALUE_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}
# llama.cpp's tensor names for each of ours (gguf-py's constants.py, TENSOR_NAMES).
LAYER_NAMES = {"attention_norm": "attn_norm", "attention.wq": "attn_q", "attention.wk": "attn_k",
               "attention.wv": "attn_v", "attention.wo": "attn_output", "ffn_norm": "ffn_norm",
               "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
               "feed_forward.w3": "ffn_up"}


# ---- a reader of the file, from the GGUF specification ----

def read_gguf(path):
    """(metadata {key: (type, value)}, tensors {name: (ggml type, shape as torch's, float32
    array)}) of a GGUF v3 file, checking alignment and that the data fills the file."""
    raw = path.read_bytes()
    position = 0

    def unpack(fmt):
        nonlocal position
        values = struct.unpack_from(fmt, raw, position)
        position += struct.calcsize(fmt)
        return values[0]

    def string():
        nonlocal position
        length = unpack("<Q")
        position += length
        return raw[position - length:position].decode("utf-8")

    def value(value_type):
        if value_type == 8:
            return string()
        if value_type == 9:
            item_type, count = unpack("<I"), unpack("<Q")
            return item_type, [value(item_type) for _ in range(count)]
        return unpack(VALUE_FORMATS[value_type])

    assert raw[:4] == b"GGUF"
    position = 4
    assert unpack("<I") == 3
    n_tensors, n_kv = unpack("<Q"), unpack("<Q")
    metadata = {}
    for _ in range(n_kv):
        key = string()
        value_type = unpack("<I")
        metadata[key] = (value_type, value(value_type))
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = [unpack("<Q") for _ in range(unpack("<I"))]
        infos.append((name, dims, unpack("<I"), unpack("<Q")))
    data_start = position + (-position % 32)
    tensors, end = {}, data_start
    for name, dims, ggml_type, offset in infos:
        assert offset % 32 == 0 and data_start + offset >= end, name
        count = int(np.prod(dims))
        size = {0: 4 * count, 1: 2 * count, 8: count // 32 * 34}[ggml_type]
        blob = raw[data_start + offset:data_start + offset + size]
        end = data_start + offset + size
        tensors[name] = (ggml_type, tuple(reversed(dims)), decode(blob, ggml_type))
    assert len(raw) - end < 32, "data beyond the last tensor"
    return metadata, tensors


def decode(blob: bytes, ggml_type: int):
    if ggml_type == 0:
        return np.frombuffer(blob, "<f4")
    if ggml_type == 1:
        return np.frombuffer(blob, "<f2").astype(np.float32)
    blocks = np.frombuffer(blob, np.uint8).reshape(-1, 34)  # fp16 scale, then 32 int8
    scales = blocks[:, :2].copy().view("<f2").astype(np.float32)
    return (blocks[:, 2:].copy().view(np.int8).astype(np.float32) * scales).reshape(-1)


# ---- fixtures ----

@pytest.fixture(scope="module")
def stories(model_bin):
    source = open_source(model_bin)
    return source.args, {name: source.load(name) for name in source.names()}


@pytest.fixture(scope="module")
def exported(model_bin, tmp_path_factory):
    """stories260K exported in each type, once."""
    folder = tmp_path_factory.mktemp("gguf")
    for gguf_type in ("f32", "f16", "q8_0"):
        convert.main(str(model_bin), str(folder / f"{gguf_type}.gguf"), to="gguf",
                     gguf_type=gguf_type)
    return folder


def gguf_name(meta_name: str) -> str:
    top = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
           "output.weight": "output.weight"}
    if meta_name in top:
        return top[meta_name]
    _, index, inner = meta_name.split(".", 2)
    return f"blk.{index}.{LAYER_NAMES[inner[:-len('.weight')]]}.weight"


def expected_type(tensor, gguf_type: str) -> str:
    if tensor.dim() == 1:
        return "f32"  # norms stay f32 in every type, as llama.cpp's converter keeps them
    if gguf_type == "q8_0" and tensor.shape[1] % 32:
        return "f16"  # ffn_down rows of 172: not whole blocks, f16 as llama.cpp falls back
    return gguf_type


def check_tensor(name, stored, source, gguf_type):
    ggml_type, shape, values = stored
    assert TYPES[ggml_type] == expected_type(source, gguf_type), name
    assert shape == tuple(source.shape), name
    values = torch.from_numpy(values.copy()).reshape(shape)
    if TYPES[ggml_type] == "f32":
        assert torch.equal(values, source.float()), name
    elif TYPES[ggml_type] == "f16":
        assert torch.equal(values, source.half().float()), name
    else:  # per block: |error| <= half a step, plus the fp16 rounding of the scale (127 steps)
        blocks, error = source.float().reshape(-1, 32), (values - source).reshape(-1, 32).abs()
        step = blocks.abs().amax(dim=1, keepdim=True) / 127
        assert (error <= step * (0.5 + 127 * 2 ** -11) + 1e-12).all(), name


def expected_metadata(args, gguf_type, name, tokenizer_path):
    sp = Tokenizer(str(tokenizer_path)).sp
    kinds = [2 if sp.IsUnknown(i) else 3 if sp.IsControl(i) else 5 if sp.IsUnused(i) else
             6 if sp.IsByte(i) else 1 for i in range(sp.vocab_size())]
    f32 = lambda x: struct.unpack("<f", struct.pack("<f", x))[0]  # noqa: E731
    return {
        "general.architecture": (8, "llama"), "general.name": (8, name),
        "general.file_type": (4, {"f32": 0, "f16": 1, "q8_0": 7}[gguf_type]),
        "general.quantization_version": (4, 2),
        "llama.vocab_size": (4, args.vocab_size), "llama.context_length": (4, args.max_seq_len),
        "llama.embedding_length": (4, args.dim), "llama.block_count": (4, args.n_layers),
        "llama.feed_forward_length": (4, args.hidden_dim),
        "llama.attention.head_count": (4, args.n_heads),
        "llama.attention.head_count_kv": (4, args.n_kv_heads),
        "llama.rope.freq_base": (6, f32(args.rope_theta)),
        "llama.rope.dimension_count": (4, args.head_dim),
        "llama.attention.layer_norm_rms_epsilon": (6, f32(args.norm_eps)),
        "tokenizer.ggml.model": (8, "llama"), "tokenizer.ggml.pre": (8, "default"),
        "tokenizer.ggml.tokens": (9, (8, [sp.IdToPiece(i) for i in range(sp.vocab_size())])),
        "tokenizer.ggml.scores": (9, (6, [f32(sp.GetScore(i)) for i in range(sp.vocab_size())])),
        "tokenizer.ggml.token_type": (9, (5, kinds)),
        "tokenizer.ggml.bos_token_id": (4, 1), "tokenizer.ggml.eos_token_id": (4, 2),
        "tokenizer.ggml.unknown_token_id": (4, 0),  # tok512 has no pad piece: no padding id
        "tokenizer.ggml.add_bos_token": (7, True), "tokenizer.ggml.add_eos_token": (7, False),
        "llama_pp_prompt.written_by": (8, "llama.formats.convert"),
        "llama_pp_prompt.source": (8, "stories260K.bin"),
        "llama_pp_prompt.source_format": (8, "llama2c")}


# ---- what the file holds ----

@pytest.mark.parametrize("gguf_type", ["f32", "f16", "q8_0"])
def test_gguf_holds_every_key_and_tensor_of_stories260K(exported, stories, assets, gguf_type):
    args, tensors = stories
    metadata, stored = read_gguf(exported / f"{gguf_type}.gguf")
    assert metadata == expected_metadata(args, gguf_type, gguf_type,
                                         assets / "stories260K" / "tok512.model")
    # Tied classifier: only token_embd is written (llama.cpp falls back to it for output).
    wanted = {gguf_name(n): t for n, t in tensors.items() if n != "output.weight"}
    assert list(stored)[0] == "token_embd.weight" and set(stored) == set(wanted)
    for name, source in wanted.items():
        # q/k rows as this model keeps them (Meta's interleaved pairs): llama.cpp's rope
        # rotates adjacent pairs, and its converter un-permutes HF's rotate-half rows to this.
        check_tensor(name, stored[name], source, gguf_type)


def model_from_gguf(path, args):
    """This project's model built from the tensors the GGUF file holds."""
    _, stored = read_gguf(path)
    state = {}
    model = Transformer(args, (0, args.n_layers), True, True)
    for name in model.state_dict():
        key = gguf_name(name) if name != "output.weight" else "token_embd.weight"
        state[name] = torch.from_numpy(stored[key][2].copy()).reshape(stored[key][1])
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_gguf_weights_give_the_reference_logits(exported, stories, assets):
    """The f32 file's weights, put back under our names, compute the fixture's logits (from an
    independent implementation); q8_0's pick the same next tokens."""
    fixture = json.loads((assets / "stories260K" / "reference_outputs.json").read_text())
    fixture = fixture["logits_fixture"]
    ids = torch.tensor([fixture["input_ids"]])
    expected = torch.tensor(fixture["last_position_logits"])
    with torch.no_grad():
        logits = model_from_gguf(exported / "f32.gguf", stories[0])(ids)[0, -1]
        quantized = model_from_gguf(exported / "q8_0.gguf", stories[0])(ids)[0, -1]
    assert (logits - expected).abs().max() < fixture["suggested_abs_tolerance"]
    assert quantized.argmax() == expected.argmax()


def test_embedding_rows_beyond_the_pieces_get_pad_pieces(stories, assets, tmp_path):
    """A vocabulary padded past the tokenizer (to a multiple of 8, say): llama.cpp's converter
    names the extra rows [PAD<id>], unused, score -10000; so do we."""
    args, tensors = stories
    padded = dict(tensors)
    for name in ("tok_embeddings.weight", "output.weight"):
        padded[name] = torch.cat([tensors[name], torch.zeros(8, args.dim)])
    save_meta(padded, replace(args, vocab_size=520), tmp_path / "padded")
    (tmp_path / "padded" / "tokenizer.model").write_bytes(
        (assets / "stories260K" / "tok512.model").read_bytes())
    convert.main(str(tmp_path / "padded"), str(tmp_path / "p.gguf"), to="gguf", gguf_type="f32")
    metadata, stored = read_gguf(tmp_path / "p.gguf")
    assert metadata["llama.vocab_size"] == (4, 520)
    assert metadata["tokenizer.ggml.tokens"][1][1][512:] == [f"[PAD{i}]" for i in range(512, 520)]
    assert metadata["tokenizer.ggml.scores"][1][1][512:] == [-10000.0] * 8
    assert metadata["tokenizer.ggml.token_type"][1][1][512:] == [5] * 8
    assert stored["token_embd.weight"][1] == (520, args.dim)


def test_lora_merged_into_the_gguf_equals_the_merged_checkpoint(model_bin, stories, tmp_path):
    args, tensors = stories
    generator = torch.Generator().manual_seed(0)
    adapter, folder = {}, tmp_path / "lora"
    for name in ("layers.1.attention.wq.weight", "layers.2.feed_forward.w2.weight"):
        out_dim, in_dim = tensors[name].shape
        module = "base_model.model." + meta_to_hf_name(name)[:-len(".weight")]
        adapter[f"{module}.lora_A.weight"] = torch.randn(4, in_dim, generator=generator) * 0.1
        adapter[f"{module}.lora_B.weight"] = torch.randn(out_dim, 4, generator=generator) * 0.1
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"]}))
    write_safetensors(folder / "adapter_model.safetensors", adapter)
    convert.main(str(model_bin), str(tmp_path / "merged"), lora=str(folder))
    convert.main(str(model_bin), str(tmp_path / "merged.gguf"), lora=str(folder), to="gguf",
                 gguf_type="f32")
    merged = open_source(tmp_path / "merged")
    metadata, stored = read_gguf(tmp_path / "merged.gguf")
    assert metadata["llama_pp_prompt.lora"] == (8, "lora")
    for name in merged.names():
        if name != "output.weight":
            check_tensor(gguf_name(name), stored[gguf_name(name)], merged.load(name), "f32")
    assert not torch.equal(merged.load("layers.1.attention.wq.weight"),
                           tensors["layers.1.attention.wq.weight"])


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_split_is_dequantized_then_written(model_bin, assets, stories, tmp_path,
                                                     scheme):
    args, tensors = stories
    split = tmp_path / f"pp2_{scheme}"
    write_split(open_source(model_bin), split, 2, quantize=scheme, log=lambda *_: None,
                tokenizer_path=assets / "stories260K" / "tok512.model")
    group_size = json.loads((split / "split.json").read_text())["quantization"].get("group_size")
    convert.main(str(split), str(tmp_path / "q.gguf"), to="gguf", gguf_type="f32")
    _, stored = read_gguf(tmp_path / "q.gguf")
    for name, tensor in tensors.items():
        if name == "output.weight":
            continue
        if ".attention.w" in name or ".feed_forward.w" in name:  # the split's packed linears
            packed = quantized_tensors("w", tensor, scheme, group_size)
            tensor = dequantize(scheme, packed["w.weight"], packed["w.scales"],
                                packed.get("w.zeros"), tensor.dtype)
        check_tensor(gguf_name(name), stored[gguf_name(name)], tensor, "f32")


# ---- llama.cpp's own reader (the gguf package; skipped where it is not installed) ----

def test_llama_cpp_gguf_package_reads_the_file(exported, stories):
    gguf = pytest.importorskip("gguf")
    args, tensors = stories
    for gguf_type in ("f32", "f16", "q8_0"):
        reader = gguf.GGUFReader(str(exported / f"{gguf_type}.gguf"))
        fields = {name: field.contents() for name, field in reader.fields.items()}
        assert fields["general.architecture"] == "llama"
        assert fields["llama.attention.head_count_kv"] == args.n_kv_heads
        assert fields["llama.rope.dimension_count"] == args.head_dim
        assert len(fields["tokenizer.ggml.tokens"]) == args.vocab_size
        assert fields["tokenizer.ggml.tokens"][1] == "<s>"
        assert fields["tokenizer.ggml.token_type"][3] == 6  # <0x00>: a byte piece
        assert len(reader.tensors) == len(tensors) - 1
        for tensor in reader.tensors:
            meta_name = next(n for n in tensors if gguf_name(n) == tensor.name)
            source = tensors[meta_name]
            assert tensor.tensor_type.name.lower() == expected_type(source, gguf_type)
            assert list(tensor.shape) == list(reversed(source.shape))
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            ours = read_gguf(exported / f"{gguf_type}.gguf")[1][tensor.name][2]
            assert np.array_equal(values.reshape(-1), ours)
            if tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0:  # bit-exact quantization
                again = gguf.quants.quantize(source.numpy(), gguf.GGMLQuantizationType.Q8_0)
                assert np.array_equal(again, tensor.data)


# ---- bad input: one line each, nothing written ----

def assert_nothing_written(folder, *keep):
    assert sorted(p.name for p in folder.iterdir()) == sorted(keep)


@pytest.mark.parametrize("arguments, message", [
    ({"gguf_type": "q4_k"}, r"--gguf_type 'q4_k' is not a GGUF type written here: use f32, f16, "
                            r"q8_0"),
    ({"gguf_type": "f16", "to": "meta"}, r"--gguf_type f16 is for --to gguf"),
    ({"dtype": "float16"}, r"--dtype float16 is for the Meta and HF layouts"),
    ({"n_shards": 2}, r"--n_shards 2 is for the Meta layout: --to gguf writes one file"),
])
def test_bad_arguments_are_refused(model_bin, tmp_path, arguments, message):
    with pytest.raises(BadInput, match=message):
        convert.main(str(model_bin), str(tmp_path / "m.gguf"), **{"to": "gguf", **arguments})
    assert_nothing_written(tmp_path)


def test_dst_is_replaced_only_when_it_is_our_gguf_and_overwrite_is_given(model_bin, exported,
                                                                          tmp_path):
    other = tmp_path / "notes.gguf"
    other.write_bytes(b"not a model")
    foreign = tmp_path / "foreign.gguf"  # GGUF, but without our key (llama.cpp's own, say)
    foreign.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))
    ours = tmp_path / "ours.gguf"
    ours.write_bytes((exported / "q8_0.gguf").read_bytes())
    for dst in (other, foreign):
        with pytest.raises(BadInput, match=r"is not a GGUF file that llama.formats.convert "
                                           r"wrote .* never replaced"):
            convert.main(str(model_bin), str(dst), to="gguf", overwrite=True)
    with pytest.raises(BadInput, match=r"already exists .*: pass --overwrite"):
        convert.main(str(model_bin), str(ours), to="gguf")
    with pytest.raises(BadInput, match=r"is a folder"):
        convert.main(str(model_bin), str(tmp_path), to="gguf")
    with pytest.raises(BadInput, match=r"which this command reads"):
        convert.main(str(model_bin), str(model_bin), to="gguf", overwrite=True)
    assert other.read_bytes() == b"not a model"
    assert ours.read_bytes() == (exported / "q8_0.gguf").read_bytes()
    convert.main(str(model_bin), str(ours), to="gguf", gguf_type="f32", overwrite=True)
    assert read_gguf(ours)[0]["general.file_type"] == (4, 0)
    assert_nothing_written(tmp_path, "notes.gguf", "foreign.gguf", "ours.gguf")


def test_models_gguf_cannot_describe_are_refused(model_bin, assets, stories, tmp_path):
    alone = tmp_path / "alone"  # no tokenizer beside it: a GGUF must carry one
    alone.mkdir()
    (alone / "model.bin").write_bytes(model_bin.read_bytes())
    with pytest.raises(BadInput, match=r"no tokenizer.model found .* --tokenizer_path"):
        convert.main(str(alone / "model.bin"), str(tmp_path / "a.gguf"), to="gguf")
    # The 32k LLaMA tokenizer beside a 512-row model: more pieces than embedding rows.
    (alone / "tokenizer.model").write_bytes((assets / "llama" / "tokenizer.model").read_bytes())
    with pytest.raises(BadInput, match=r"has 32000 pieces but the model has only 512 embedding "
                                       r"rows, which GGUF cannot describe"):
        convert.main(str(alone / "model.bin"), str(tmp_path / "a.gguf"), to="gguf")
    # A weight beyond float16's range cannot be written as f16.
    args, tensors = stories
    huge = dict(tensors, **{"layers.0.attention.wo.weight":
                            tensors["layers.0.attention.wo.weight"] * 1e6})
    save_meta(huge, args, tmp_path / "huge")
    (tmp_path / "huge" / "tokenizer.model").write_bytes(
        (assets / "stories260K" / "tok512.model").read_bytes())
    with pytest.raises(BadInput, match=r"blk.0.attn_output.weight holds values beyond "
                                       r"float16's range .* --gguf_type f32"):
        convert.main(str(tmp_path / "huge"), str(tmp_path / "a.gguf"), to="gguf")
    assert_nothing_written(tmp_path, "alone", "huge")


@pytest.mark.parametrize("kind", ["ours", "peft"])
def test_a_soft_prompt_is_not_merged(model_bin, tmp_path, kind):
    folder = tmp_path / "prompt"
    folder.mkdir()
    if kind == "ours":
        (folder / "tuning.json").write_text(json.dumps({"method": "prefix"}))
        (folder / "tuning.pt").write_bytes(b"")
    else:
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
    with pytest.raises(BadInput, match=r"holds .* \(method (prefix|prompt)\): it adds inputs "
                                       r"to the model instead of changing its weights, so it "
                                       r"cannot be merged"):
        convert.main(str(model_bin), str(tmp_path / "m.gguf"), to="gguf", lora=str(folder))
    assert_nothing_written(tmp_path, "prompt")


def test_sha256_list_checks_the_inputs(model_bin, assets, tmp_path, capsys):
    good = tmp_path / "good.sha256"
    good.write_text(f"{sha256_of(model_bin)}  stories260K.bin\n")
    convert.main(str(model_bin), str(tmp_path / "m.gguf"), to="gguf", sha256=str(good))
    assert f"{sha256_of(tmp_path / 'm.gguf')}  m.gguf" in capsys.readouterr().out
    bad = tmp_path / "bad.sha256"
    bad.write_text(f"{'0' * 64}  stories260K.bin\n")
    with pytest.raises(BadInput, match=r"input \S+stories260K\.bin has sha256 [0-9a-f]{64}, but"):
        convert.main(str(model_bin), str(tmp_path / "n.gguf"), to="gguf", sha256=str(bad))
    unrelated = tmp_path / "unrelated.sha256"
    unrelated.write_text(f"{'0' * 64}  other.bin\n")
    with pytest.raises(BadInput, match=r"names none of the files read"):
        convert.main(str(model_bin), str(tmp_path / "n.gguf"), to="gguf", sha256=str(unrelated))
    assert_nothing_written(tmp_path, "m.gguf", "good.sha256", "bad.sha256", "unrelated.sha256")


def test_a_failure_while_writing_leaves_no_file(model_bin, tmp_path, monkeypatch):
    from llama.formats import gguf

    def fail(*_):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(gguf, "tensor_bytes", fail)
    with pytest.raises(BadInput, match=r"could not write .*m.gguf \(No space left on device\)"):
        convert.main(str(model_bin), str(tmp_path / "m.gguf"), to="gguf")
    assert_nothing_written(tmp_path)


def test_a_temp_file_left_by_a_killed_export_is_removed(model_bin, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / f".m.gguf.tmp-{dead}").write_bytes(b"GGUF half")
    (tmp_path / ".other.gguf.tmp-1").write_bytes(b"not ours to remove")  # another name
    convert.main(str(model_bin), str(tmp_path / "m.gguf"), to="gguf")
    assert_nothing_written(tmp_path, "m.gguf", ".other.gguf.tmp-1")


def test_the_command_line_says_one_line(model_bin, tmp_path):
    result = subprocess.run([sys.executable, "-m", "llama.formats.convert", "--src",
                             str(model_bin), "--dst", str(tmp_path / "m.gguf"), "--to", "gguf",
                             "--gguf_type", "q4_0"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "--gguf_type 'q4_0'" in result.stderr


@pytest.mark.parametrize("family", ["llama3.2", "qwen2.5", "mistral"])
def test_what_gguf_export_does_not_describe_is_refused_by_name(family, tmp_path):
    from tiny_families import llama32_config, mistral_config, qwen25_config, write_family
    config = {"llama3.2": llama32_config, "qwen2.5": qwen25_config, "mistral": mistral_config}
    what = {"llama3.2": "rope scaling 'llama3'", "qwen2.5": "q/k/v biases",
            "mistral": "a sliding window of 8"}[family]
    folder = write_family(tmp_path / family, config[family]())
    dst = tmp_path / "model.gguf"
    with pytest.raises(BadInput, match=rf"--to gguf writes the LLaMA 1/2 architecture with a "
                                       rf"sentencepiece tokenizer; this model has {what}"):
        convert.main(str(folder), str(dst), to="gguf", gguf_type="f32")
    assert not dst.exists() and list(tmp_path.iterdir()) == [folder]

"""Merging PEFT LoRA adapters into the real stories260K model, exporting to the Hugging Face
layout and checking sha256 lists (llama.formats.convert --lora / --to hf / --sha256). The adapters are
written here in PEFT's file layout (adapter_config.json + adapter_model.safetensors or .bin)
with random A/B; no peft or transformers is needed.
Run: python3 -m pytest -q tests/test_lora.py
"""
import json
import math
import re
import struct

import pytest
import torch

from llama.formats import convert
from llama.formats.checksums import Sha256List
from llama.formats.checkpoint import load_model, open_source, write_split
from llama.errors import BadInput
from llama.formats.hf import interleaved_to_rotate_half, meta_to_hf_name, rotate_half_to_interleaved
from llama.formats.files import sha256_of

# Meta name -> the module name PEFT's keys carry, for the modules the adapters here target.
TARGETS = {"q_proj": "attention.wq", "k_proj": "attention.wk", "v_proj": "attention.wv",
           "down_proj": "feed_forward.w2"}


@pytest.fixture(scope="module")
def base(model_bin):
    source = open_source(model_bin)
    return source.args, {name: source.load(name) for name in source.names()}


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(3, 512, (2, 10), generator=torch.Generator().manual_seed(0))


def write_safetensors(tensors: dict, path):
    header, blobs, offset = {}, [], 0
    for key, tensor in tensors.items():
        blob = tensor.contiguous().view(torch.uint8).numpy().tobytes()
        header[key] = {"dtype": "F32", "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def hf_module(meta_name: str) -> str:
    return meta_to_hf_name(meta_name)[:-len(".weight")]


def make_adapter(folder, args, base, seed, r=4, alpha=8, rslora=False, layers=(0, 3),
                 saved=None, as_bin=False, config_changes=None):
    """Write a LoRA adapter in PEFT's layout; returns {Meta name: (A, B, scaling)} in HF's
    row order, and the saved modules {Meta name: tensor}."""
    generator = torch.Generator().manual_seed(seed)
    tensors, pairs = {}, {}
    for layer in layers:
        for meta_kind in TARGETS.values():
            meta_name = f"layers.{layer}.{meta_kind}.weight"
            out_dim, in_dim = base[meta_name].shape
            a = torch.randn(r, in_dim, generator=generator) * 0.1
            b = torch.randn(out_dim, r, generator=generator) * 0.1
            module = hf_module(meta_name)
            tensors[f"base_model.model.{module}.lora_A.weight"] = a
            tensors[f"base_model.model.{module}.lora_B.weight"] = b
            pairs[meta_name] = (a, b, alpha / (math.sqrt(r) if rslora else r))
    for meta_name, tensor in (saved or {}).items():
        tensors[f"base_model.model.{hf_module(meta_name)}.weight"] = tensor
    folder.mkdir(parents=True)
    peft_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
                   "use_rslora": rslora, "fan_in_fan_out": False, "bias": "none",
                   "target_modules": list(TARGETS),
                   "modules_to_save": ["embed_tokens", "lm_head"] if saved else None,
                   **(config_changes or {})}
    (folder / "adapter_config.json").write_text(json.dumps(peft_config))
    if as_bin:
        torch.save(tensors, folder / "adapter_model.bin")
    else:
        write_safetensors(tensors, folder / "adapter_model.safetensors")
    return pairs, dict(saved or {})


def expected_weight(meta_name, tensor, args, adapters):
    """The float64 reference: base + scale * B @ A in HF's row order, then back to Meta's."""
    heads = {"attention.wq": args.n_heads, "attention.wk": args.n_kv_heads}.get(
        meta_name.split(".", 2)[-1][:-len(".weight")])
    hf = interleaved_to_rotate_half(tensor, heads) if heads else tensor
    total = hf.double()
    for pairs, _ in adapters:
        if meta_name in pairs:
            a, b, scaling = pairs[meta_name]
            total = total + scaling * (b.double() @ a.double())
    total = rotate_half_to_interleaved(total, heads) if heads else total
    return total.to(tensor.dtype)


def merged_tensors(folder):
    return torch.load(folder / "consolidated.00.pth", weights_only=True)


def runtime_lora_logits(model_bin, adapters, tokens, args):
    """The base model with each low-rank update applied at run time by forward hooks."""
    model = load_model(model_bin)
    for pairs, _ in adapters:
        for meta_name, (a, b, scaling) in pairs.items():
            heads = args.n_heads if ".wq." in meta_name else \
                args.n_kv_heads if ".wk." in meta_name else None
            b_meta = rotate_half_to_interleaved(b, heads) if heads else b
            module = model.get_submodule(meta_name[:-len(".weight")])
            module.register_forward_hook(
                lambda mod, inputs, out, a=a, b=b_meta, s=scaling: out + s * (inputs[0] @ a.T @ b.T))
    with torch.no_grad():
        return model(tokens)


# ---- merging ----

def test_merged_weights_are_base_plus_scaled_update_and_logits_match_runtime_lora(
        model_bin, base, tokens, tmp_path, capsys):
    args, tensors = base
    adapter = make_adapter(tmp_path / "lora", args, tensors, seed=1, rslora=True)
    convert.main(str(model_bin), str(tmp_path / "merged"), lora=str(tmp_path / "lora"))
    merged = merged_tensors(tmp_path / "merged")
    assert sorted(merged) == sorted(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(merged[name], expected_weight(name, tensor, args, [adapter])), name
    assert not torch.equal(merged["layers.0.attention.wq.weight"],
                           tensors["layers.0.attention.wq.weight"])
    with torch.no_grad():
        merged_logits = load_model(tmp_path / "merged")(tokens)
    reference = runtime_lora_logits(model_bin, [adapter], tokens, args)
    assert (merged_logits - reference).abs().max() <= 1e-4
    marker = json.loads((tmp_path / "merged" / "converted.json").read_text())
    assert marker["lora"][0]["path"] == str((tmp_path / "lora").resolve())
    assert marker["lora"][0]["use_rslora"] and marker["lora"][0]["modules"] == 8
    # The printed list of the result is sha256sum's, and right.
    printed = capsys.readouterr().out
    digest = sha256_of(tmp_path / "merged" / "consolidated.00.pth")
    assert f"{digest}  consolidated.00.pth" in printed.splitlines()


def test_two_adapters_in_sequence_equal_their_sum_and_order_is_recorded(model_bin, base,
                                                                        tmp_path):
    args, tensors = base
    first = make_adapter(tmp_path / "a", args, tensors, seed=2, r=2, alpha=16)
    second = make_adapter(tmp_path / "b", args, tensors, seed=3, r=8, alpha=4, layers=(3, 4),
                          as_bin=True)
    convert.main(str(model_bin), str(tmp_path / "merged"),
                 lora=f"{tmp_path / 'a'},{tmp_path / 'b'}")
    merged = merged_tensors(tmp_path / "merged")
    for name, tensor in tensors.items():
        assert torch.equal(merged[name], expected_weight(name, tensor, args, [first, second])), name
    marker = json.loads((tmp_path / "merged" / "converted.json").read_text())
    assert [entry["path"] for entry in marker["lora"]] == \
        [str((tmp_path / name).resolve()) for name in ("a", "b")]
    assert [entry["r"] for entry in marker["lora"]] == [2, 8]


def test_saved_embeddings_resize_the_vocabulary_with_the_adapters_tokenizer(
        model_bin, base, assets, tmp_path, tokens):
    args, tensors = base
    generator = torch.Generator().manual_seed(4)
    saved = {}
    for name in ("tok_embeddings.weight", "output.weight"):
        grown = torch.randn(32000, args.dim, generator=generator) * 0.02
        grown[:512] = tensors[name]  # as Chinese-LLaMA does: the old rows kept, new ones added
        saved[name] = grown
    adapter = make_adapter(tmp_path / "lora", args, tensors, seed=5, saved=saved)
    # The adapter's own tokenizer (32000 pieces, the LLaMA one here) is taken by default.
    (tmp_path / "lora" / "tokenizer.model").symlink_to(assets / "llama" / "tokenizer.model")
    convert.main(str(model_bin), str(tmp_path / "merged"), lora=str(tmp_path / "lora"))
    params = json.loads((tmp_path / "merged" / "params.json").read_text())
    assert params["vocab_size"] == 32000
    assert sha256_of(tmp_path / "merged" / "tokenizer.model") == \
        sha256_of(assets / "llama" / "tokenizer.model")
    merged = merged_tensors(tmp_path / "merged")
    assert torch.equal(merged["tok_embeddings.weight"], saved["tok_embeddings.weight"])
    assert torch.equal(merged["output.weight"], saved["output.weight"])
    assert torch.equal(merged["layers.3.attention.wk.weight"],
                       expected_weight("layers.3.attention.wk.weight",
                                       tensors["layers.3.attention.wk.weight"], args, [adapter]))
    # The merged model goes straight into a split, and runs there.
    write_split(open_source(tmp_path / "merged"), tmp_path / "pp2", 2, log=lambda *_: None)
    with torch.no_grad():
        logits = load_model(tmp_path / "pp2")(tokens)
    assert logits.shape == (2, 10, 32000)
    reference = runtime_lora_logits(model_bin, [adapter], tokens, args)
    assert (logits[..., :512] - reference).abs().max() <= 1e-4


# ---- Hugging Face export ----

def test_meta_to_hf_to_meta_is_bitwise_and_hf_loads_with_identical_logits(model_bin, tmp_path,
                                                                           tokens):
    convert.main(str(model_bin), str(tmp_path / "meta"))
    convert.main(str(tmp_path / "meta"), str(tmp_path / "hf"), to="hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == \
        ["config.json", "converted.json", "model.safetensors", "tokenizer.model"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 10000.0
    assert config["rope_parameters"]["rope_type"] == "default"
    assert config["head_dim"] == 8 and config["tie_word_embeddings"] is False
    convert.main(str(tmp_path / "hf"), str(tmp_path / "back"))
    before, after = merged_tensors(tmp_path / "meta"), merged_tensors(tmp_path / "back")
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert json.loads((tmp_path / "meta" / "params.json").read_text()) == \
        json.loads((tmp_path / "back" / "params.json").read_text())
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "hf")(tokens), load_model(tmp_path / "meta")(tokens))
    with pytest.raises(BadInput, match="--to 'onnx' is not a layout written here"):
        convert.main(str(model_bin), str(tmp_path / "x"), to="onnx")
    with pytest.raises(BadInput, match="--n_shards 2 is for the Meta layout"):
        convert.main(str(model_bin), str(tmp_path / "x"), to="hf", n_shards=2)


# ---- sha256 lists ----

def test_sha256_list_checks_inputs_and_outputs_and_prints_in_its_format(model_bin, base,
                                                                        tmp_path, capsys):
    args, tensors = base
    make_adapter(tmp_path / "lora", args, tensors, seed=6)
    good = sha256_of(model_bin)
    adapter_digest = sha256_of(tmp_path / "lora" / "adapter_model.safetensors")
    table = tmp_path / "SHA256.md"
    table.write_text(f"| Model | File | SHA256 |\n| --- | --- | --- |\n"
                     f"| stories | stories260K.bin | {good} |\n"
                     f"| LoRA | adapter_model.safetensors | {adapter_digest} |\n")
    convert.main(str(model_bin), str(tmp_path / "merged"), lora=str(tmp_path / "lora"),
                 sha256=str(table))
    printed = capsys.readouterr().out
    digest = sha256_of(tmp_path / "merged" / "consolidated.00.pth")
    assert f"| consolidated.00.pth | {digest} |" in printed.splitlines()

    # A wrong input hash stops before anything is written.
    wrong = tmp_path / "wrong.txt"
    wrong.write_text(f"{'0' * 64}  stories260K.bin\n")
    with pytest.raises(BadInput, match=r"input \S+stories260K\.bin has sha256 [0-9a-f]{64}, but "
                                       r"\S+wrong\.txt lists 0{64}"):
        convert.main(str(model_bin), str(tmp_path / "second"), sha256=str(wrong))
    assert not (tmp_path / "second").exists()

    # A wrong output hash leaves the good checkpoint already at dst as it was, and no leftovers.
    before = sorted((p.name, sha256_of(p)) for p in (tmp_path / "merged").iterdir())
    (tmp_path / "wrong.json").write_text(json.dumps({"consolidated.00.pth": "1" * 64}))
    with pytest.raises(BadInput, match=r"output \S+merged/consolidated\.00\.pth has sha256"):
        convert.main(str(model_bin), str(tmp_path / "merged"), sha256=str(tmp_path / "wrong.json"),
                     overwrite=True)
    assert sorted((p.name, sha256_of(p)) for p in (tmp_path / "merged").iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        ["SHA256.md", "lora", "merged", "wrong.json", "wrong.txt"]

    # JSON in, JSON out; a list naming none of the files is refused.
    (tmp_path / "list.json").write_text(json.dumps({"stories260K.bin": good}))
    convert.main(str(model_bin), str(tmp_path / "plain"), sha256=str(tmp_path / "list.json"))
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{"):])["consolidated.00.pth"] == \
        sha256_of(tmp_path / "plain" / "consolidated.00.pth")
    (tmp_path / "other.txt").write_text(f"{good}  another.bin\n")
    with pytest.raises(BadInput, match="names none of the files read or written"):
        convert.main(str(model_bin), str(tmp_path / "none"), sha256=str(tmp_path / "other.txt"))
    (tmp_path / "empty.md").write_text("# SHA256\n| Model | SHA256 |\n")
    with pytest.raises(BadInput, match=r"empty\.md holds no 'hash  file' pair"):
        convert.main(str(model_bin), str(tmp_path / "none"), sha256=str(tmp_path / "empty.md"))
    assert not (tmp_path / "none").exists()



def test_sha256_lists_in_every_shape_a_user_may_give(tmp_path):
    """sha256sum's lines (with -b's '*', from Windows with a byte-order mark and CRLF), a
    Markdown table, JSON either way round, a JSON list of objects: the same names and hashes."""
    a, b = "ab" * 32, "CD" * 32
    lists = {"sums.txt": f"\ufeff{a}  7B/consolidated.00.pth\r\n{b} *tokenizer.model\r\n",
             "SHA256.md": f"| Model | File | SHA256 |\n| --- | --- | --- |\n"
                          f"| 7B | `7B/consolidated.00.pth` | {a} |\n| - | tokenizer.model | {b} |\n",
             "by_name.json": json.dumps({"7B/consolidated.00.pth": a, "tokenizer.model": b}),
             "by_hash.json": json.dumps({a: "7B/consolidated.00.pth", b: "tokenizer.model"}),
             "list.json": json.dumps([{"file": "7B/consolidated.00.pth", "sha256": a},
                                      {"name": "tokenizer.model", "hash": b}])}
    for name, text in lists.items():
        (tmp_path / name).write_text(text, encoding="utf-8", newline="")
        sha_list = Sha256List(tmp_path / name)
        assert sha_list.hashes == {"7B/consolidated.00.pth": {a}, "tokenizer.model": {b.lower()}}
        assert sha_list.listed("/models/llama/7B/consolidated.00.pth") == {a}, name
        assert sha_list.listed("13B/consolidated.00.pth") == set()
    assert [Sha256List(tmp_path / name).format for name in ("sums.txt", "SHA256.md", "list.json")] \
        == ["plain", "markdown", "json"]
    (tmp_path / "broken.json").write_text('{"a.bin": ')
    with pytest.raises(BadInput, match=r"broken\.json is not valid JSON \(.*\): pass a list of "):
        Sha256List(tmp_path / "broken.json")

# ---- bad adapters: one line each, nothing written ----

@pytest.mark.parametrize("change, message", [
    ({"target_modules": ["c_attn"]}, r"target_modules names 'c_attn', which this model does not "
                                     r"have .*: the adapter is for another model"),
    ({"r": 0}, r"adapter_config\.json: r=0 must be a positive integer"),
    ({"lora_alpha": -8}, r"adapter_config\.json: lora_alpha=-8 must be a positive number"),
    ({"peft_type": "PREFIX_TUNING"}, r"peft_type='PREFIX_TUNING' is not LoRA"),
    ({"r": 2}, r"lora: model\.layers\.0\.mlp\.down_proj\.lora_A\.weight \[4, 172\] and "
               r"model\.layers\.0\.mlp\.down_proj\.lora_B\.weight \[64, 4\] are not of rank r=2 "
               r"as adapter_config\.json says"),
    ({"modules_to_save": ["score"]}, r"modules_to_save names 'score'; only embed_tokens and "
                                     r"lm_head can be merged"),
])
def test_bad_adapter_configs_are_refused_by_name(model_bin, base, tmp_path, change, message):
    args, tensors = base
    make_adapter(tmp_path / "lora", args, tensors, seed=7, config_changes=change)
    with pytest.raises(BadInput, match=message):
        convert.main(str(model_bin), str(tmp_path / "merged"), lora=str(tmp_path / "lora"))
    assert not (tmp_path / "merged").exists()


def test_adapter_for_another_model_shape_is_refused(model_bin, base, tmp_path):
    args, tensors = base
    wider = {name: torch.zeros(t.shape[0], t.shape[-1] * 2) if t.dim() == 2 else t
             for name, t in tensors.items()}
    make_adapter(tmp_path / "wide", args, wider, seed=8)
    with pytest.raises(BadInput, match=r"the LoRA update of model\.layers\.0\.mlp\.down_proj "
                                       r"has shape \[64, 344\], but the model's weight is \[64, 172\]"
                                       r": the adapter is for another model shape"):
        convert.main(str(model_bin), str(tmp_path / "merged"), lora=str(tmp_path / "wide"))
    deeper = {**tensors, **{name.replace("layers.4.", "layers.7."): t
                            for name, t in tensors.items() if name.startswith("layers.4.")}}
    make_adapter(tmp_path / "deep", args, deeper, seed=8, layers=(0, 7))
    with pytest.raises(BadInput, match=r"LoRA weights for model\.layers\.7\.mlp\.down_proj, "
                                       r"which this model \(5 layers\) does not have"):
        convert.main(str(model_bin), str(tmp_path / "merged"), lora=str(tmp_path / "deep"))
    assert not (tmp_path / "merged").exists()


def test_tokenizer_whose_size_differs_from_the_resized_vocabulary_is_refused(model_bin, base,
                                                                           assets, tmp_path):
    args, tensors = base
    saved = {name: torch.randn(600, args.dim) for name in ("tok_embeddings.weight",
                                                            "output.weight")}
    make_adapter(tmp_path / "lora", args, tensors, seed=9, saved=saved)
    with pytest.raises(BadInput, match=r"resize the vocabulary from 512 to 600 pieces but none "
                                       r"holds a tokenizer\.model: pass the adapter's tokenizer"):
        convert.main(str(model_bin), str(tmp_path / "merged"), lora=str(tmp_path / "lora"))
    with pytest.raises(BadInput, match=r"tokenizer \S+tokenizer\.model has 32000 pieces but the "
                                       r"merged model's vocabulary has 600 \(the adapters resized "
                                       r"it from 512\)"):
        convert.main(str(model_bin), str(tmp_path / "merged"), lora=str(tmp_path / "lora"),
                     tokenizer_path=str(assets / "llama" / "tokenizer.model"))
    only_embeddings = {"tok_embeddings.weight": saved["tok_embeddings.weight"]}
    make_adapter(tmp_path / "half", args, tensors, seed=9, saved=only_embeddings)
    with pytest.raises(BadInput, match=r"embed_tokens has 600 rows but lm_head 512"):
        convert.main(str(model_bin), str(tmp_path / "merged"), lora=str(tmp_path / "half"))
    assert not (tmp_path / "merged").exists()


def test_adapter_files_that_cannot_be_merged_are_refused(model_bin, base, tmp_path):
    args, tensors = base

    def refused(folder, message):
        with pytest.raises(BadInput, match=message):
            convert.main(str(model_bin), str(tmp_path / "merged"), lora=str(folder))

    make_adapter(tmp_path / "dora", args, tensors, seed=10, config_changes={"use_dora": True})
    refused(tmp_path / "dora", r"use_dora=True \(DoRA's magnitude vectors\) is not merged here")
    make_adapter(tmp_path / "bias", args, tensors, seed=10)
    weights = tmp_path / "bias" / "adapter_model.safetensors"
    write_safetensors({"base_model.model.model.layers.0.self_attn.q_proj.bias": torch.zeros(64),
                       "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
                           torch.zeros(4, 64)}, weights)
    refused(tmp_path / "bias", r"'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.bias' is "
                               r"not a LoRA weight or a saved embed_tokens/lm_head")
    write_safetensors({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
                       torch.zeros(4, 64)}, weights)
    refused(tmp_path / "bias", r"the LoRA weight of 'model\.layers\.0\.self_attn\.q_proj' has "
                               r"lora_A without its other half")
    weights.unlink()
    refused(tmp_path / "bias", r"has neither adapter_model\.safetensors nor adapter_model\.bin")
    refused(tmp_path / "nowhere", r"--lora \S+nowhere is not a folder")
    assert not (tmp_path / "merged").exists()


# ---- adapters whose values would ruin the model (issue 18, item 5) ----

def adapter_with_value(folder, args, tensors, value, key_end="q_proj.lora_A.weight"):
    """A LoRA adapter with `value` written into one element of the tensor ending in key_end."""
    make_adapter(folder, args, tensors, seed=11)
    weights = folder / "adapter_model.safetensors"
    from llama.formats.tensor_files import read_safetensor, read_safetensors_header
    data_start, header = read_safetensors_header(weights)
    loaded = {key: read_safetensor(weights, data_start, entry) for key, entry in header.items()}
    key = next(k for k in loaded if k.endswith("layers.0.self_attn." + key_end))
    loaded[key] = loaded[key].clone()
    loaded[key][0, 0] = value
    write_safetensors(loaded, weights)
    return key


@pytest.mark.parametrize("value, message", [
    (float("nan"), r"adapter_model\.safetensors: {key} holds NaN or inf values: the adapter is "
                   r"damaged"),
    (float("inf"), r"adapter_model\.safetensors: {key} holds NaN or inf values: the adapter is "
                   r"damaged"),
    (1e30, r"the LoRA update of model\.layers\.0\.self_attn\.q_proj has an RMS of \S+, over 100 "
           r"times its weight's"),
])
def test_adapter_values_that_would_break_the_model_are_refused_naming_the_tensor(
        model_bin, base, tmp_path, value, message):
    """NaN or inf in an adapter, or an update absurdly larger than its weight, is refused."""
    args, tensors = base
    key = adapter_with_value(tmp_path / "lora", args, tensors, value)
    with pytest.raises(BadInput, match=message.format(key=re.escape(key))):
        convert.main(str(model_bin), str(tmp_path / "merged"), lora=str(tmp_path / "lora"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]


def test_merge_that_overflows_the_stored_dtype_is_refused(model_bin, base, tmp_path):
    args, tensors = base
    big = {name: torch.full_like(t, 1e5) if name == "tok_embeddings.weight" else t
           for name, t in tensors.items()}
    make_adapter(tmp_path / "lora", args, tensors, seed=12, saved={
        "tok_embeddings.weight": big["tok_embeddings.weight"],
        "output.weight": tensors["output.weight"]})
    with pytest.raises(BadInput, match=r"makes tok_embeddings\.weight NaN or inf in float16"):
        convert.main(str(model_bin), str(tmp_path / "merged"), lora=str(tmp_path / "lora"),
                     dtype="float16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]


def test_adapter_without_tensors_and_with_a_bad_pattern_is_refused(model_bin, base, tmp_path):
    args, tensors = base
    make_adapter(tmp_path / "empty", args, tensors, seed=13, layers=())
    with pytest.raises(BadInput, match=r"--lora \S+empty holds no tensors to merge"):
        convert.main(str(model_bin), str(tmp_path / "merged"), lora=str(tmp_path / "empty"))
    make_adapter(tmp_path / "regex", args, tensors, seed=13,
                 config_changes={"rank_pattern": {"(": 2}})
    with pytest.raises(BadInput, match=r"adapter_config\.json: rank_pattern pattern '\(' is not "
                                       r"a valid regular expression"):
        convert.main(str(model_bin), str(tmp_path / "merged"), lora=str(tmp_path / "regex"))
    assert not (tmp_path / "merged").exists()

"""Model families beyond LLaMA 1/2 (issue 23): Llama 3.1/3.2 rope scaling, Qwen2/2.5 q/k/v biases,
Mistral's sliding window. Tiny random models whose config.json is written as the real family's
(tests/tiny_families.py); no transformers needed (test_interop_families.py compares with it).
Run: python3 -m pytest -q tests/test_families.py
"""
import dataclasses
import json
import math

import pytest
import torch

from llama.errors import BadInput
from llama.formats.checkpoint import load_model, open_source, write_split
from llama.formats.hf import HFSource, save_hf_safetensors
from llama.formats.layouts import MetaSource, save_meta
from llama.formats.tensor_files import (read_safetensor, read_safetensors_header,
                                        write_safetensors)
from llama.model.fused import apply_fused_projections
from llama.model.static_decode import StepGraphs
from llama.model.rotary import rope_frequencies, rotary_tables
from llama.model.named_shapes import NAMED_SHAPES
from llama.model.transformer import (ModelArgs, Transformer, attention_mask, causal_mask,
                                     params_digest)
from tiny_families import (as_transformers5, llama32_config, mistral_config, qwen25_config,
                           write_family)

TOKENS = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))


def logits(folder, tokens=TOKENS):
    with torch.no_grad():
        return load_model(folder)(tokens)


# ---- rope scaling: llama3 (Llama 3.1/3.2) and linear ----

def llama3_table(head_dim, theta, factor, low_freq_factor, high_freq_factor, original):
    """The frequencies of Llama 3.1's rope scaling, one at a time in float64, as the formula in
    Meta's llama-models reads (apply_scaling): written here apart from llama/model/rotary.py."""
    low_freq_wavelen, high_freq_wavelen = original / low_freq_factor, original / high_freq_factor
    table = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            table.append(freq)
        elif wavelen > low_freq_wavelen:
            table.append(freq / factor)
        else:
            smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            table.append((1 - smooth) * freq / factor + smooth * freq)
    return torch.tensor(table, dtype=torch.float64)


@pytest.mark.parametrize("head_dim, factor, original", [(64, 32.0, 8192), (128, 8.0, 8192),
                                                        (16, 32.0, 64)],
                         ids=["llama3.2-1b", "llama3.1-8b", "tiny"])
def test_llama3_frequencies_equal_the_formula_table(head_dim, factor, original):
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": original}
    ours = rope_frequencies(head_dim, 500000.0, scaling, "cpu").double()
    expected = llama3_table(head_dim, 500000.0, factor, 1.0, 4.0, original)
    torch.testing.assert_close(ours, expected, rtol=2e-6, atol=0)
    plain = rope_frequencies(head_dim, 500000.0, None, "cpu").double()
    # All three regimes occur: kept, slowed by factor, and blended between.
    assert (ours == plain).any() and torch.isclose(ours, plain / factor, rtol=1e-6).any()
    assert ((ours < plain) & ~torch.isclose(ours, plain / factor, rtol=1e-6)).any()


def test_linear_scaling_divides_every_frequency():
    plain = rope_frequencies(16, 10000.0, None, "cpu")
    scaled = rope_frequencies(16, 10000.0, {"rope_type": "linear", "factor": 4.0}, "cpu")
    torch.testing.assert_close(scaled, plain / 4.0, rtol=0, atol=0)


@pytest.mark.parametrize("writer", ["transformers4", "transformers5"])
def test_llama32_rope_scaling_is_read_and_changes_the_logits(tmp_path, writer):
    config = llama32_config() if writer == "transformers4" else as_transformers5(llama32_config())
    folder = write_family(tmp_path / "llama32", config)
    assert HFSource(folder).args.rope_scaling == {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}
    scaled = logits(folder)
    (folder / "config.json").write_text(json.dumps(llama32_config(rope_scaling=None)))
    assert (scaled - logits(folder)).abs().max() > 1e-3  # the scaling is not a no-op here


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 2.0},
    {"type": "linear", "factor": 2.0}])  # older transformers wrote "type"
def test_linear_scaling_runs_position_2p_as_position_p(tmp_path, scaling):
    folder = write_family(tmp_path / "linear", llama32_config(rope_scaling=scaling))
    args = load_model(folder).args
    assert args.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    scaled = rotary_tables(args.head_dim, args.rope_theta, 0, 16, "cpu", args.rope_scaling)
    plain = rotary_tables(args.head_dim, args.rope_theta, 0, 8, "cpu")
    torch.testing.assert_close(scaled[0::2], plain, rtol=0, atol=1e-6)


def test_meta_use_scaled_rope_means_llama3_with_meta_defaults(tmp_path):
    folder = write_family(tmp_path / "hf", llama32_config())
    source = HFSource(folder)
    tensors = {name: source.load(name) for name in source.names()}
    save_meta(tensors, source.args, tmp_path / "meta")
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert params["use_scaled_rope"] is True and params["rope_scaling_factor"] == 32.0
    assert torch.equal(logits(tmp_path / "meta"), logits(folder))
    # Meta's own params.json of Llama 3.1: only the flag; factor 8, low 1, high 4, 8192.
    for key in ("rope_scaling", "rope_scaling_factor"):
        del params[key]
    (tmp_path / "meta" / "params.json").write_text(json.dumps(params))
    assert MetaSource(tmp_path / "meta").args.rope_scaling == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}


def chained_logits(split_dir, n_stages, tokens=TOKENS):
    """Logits of a split run stage after stage in one process."""
    with torch.no_grad():
        h = tokens
        for stage in range(n_stages):
            h = load_model(split_dir, stage, n_stages)(h)
    return h


def test_a_split_keeps_the_rope_scaling(tmp_path):
    folder = write_family(tmp_path / "hf", llama32_config())
    write_split(open_source(folder), tmp_path / "pp2", 2, log=lambda *_: None)
    assert json.loads((tmp_path / "pp2" / "params.json").read_text())["rope_scaling"] == \
        HFSource(folder).args.rope_scaling
    torch.testing.assert_close(chained_logits(tmp_path / "pp2", 2), logits(folder),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("scaling, message", [
    ({"rope_type": "yarn", "factor": 4.0}, r"rope type 'yarn' is not implemented here \(only "
                                           r"'default', 'linear', 'llama3'\)"),
    ({"rope_type": "llama3", "factor": 8.0}, r"llama3 rope scaling needs low_freq_factor as a "
                                             r"positive number, not None"),
    ({"rope_type": "linear", "factor": -2}, r"linear rope scaling needs factor as a positive "
                                            r"number, not -2"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192},
     r"llama3 rope scaling needs high_freq_factor \(4.0\) above"),
])
def test_bad_rope_scaling_is_refused_by_name(tmp_path, scaling, message):
    folder = write_family(tmp_path / "bad", llama32_config(rope_scaling=scaling))
    with pytest.raises(BadInput, match=r"config\.json: rope_scaling: " + message):
        HFSource(folder)


# ---- Qwen2 / Qwen2.5: q/k/v biases, tied embeddings ----

@pytest.mark.parametrize("tied", [True, False])
def test_qwen25_biases_and_tied_embeddings_are_used(tmp_path, tied):
    folder = write_family(tmp_path / "qwen", qwen25_config(tie_word_embeddings=tied))
    source = HFSource(folder)
    assert source.args.qkv_bias
    assert {f"layers.1.attention.{w}.bias" for w in ("wq", "wk", "wv")} <= set(source.names())
    model = load_model(folder)
    assert torch.equal(model.output.weight, model.tok_embeddings.weight) == tied
    with torch.no_grad():
        expected = model(TOKENS)
        for block in model.layers.values():  # the biases matter
            block.attention.wk.bias.zero_()
        assert (model(TOKENS) - expected).abs().max() > 1e-3


def test_qwen25_round_trips_through_meta_shards_hf_and_a_split(tmp_path):
    folder = write_family(tmp_path / "qwen", qwen25_config())
    source = HFSource(folder)
    expected = logits(folder)
    tensors = {name: source.load(name) for name in source.names()}
    save_meta(tensors, source.args, tmp_path / "meta", n_shards=2)
    assert MetaSource(tmp_path / "meta").args.qkv_bias
    assert torch.equal(logits(tmp_path / "meta"), expected)
    save_hf_safetensors(tensors, source.args, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "qwen2"
    assert torch.equal(logits(tmp_path / "hf"), expected)
    write_split(source, tmp_path / "pp2", 2, log=lambda *_: None)
    torch.testing.assert_close(chained_logits(tmp_path / "pp2", 2), expected, atol=1e-5, rtol=0)


def test_qwen25_quantized_and_fused_keep_the_biases(tmp_path):
    folder = write_family(tmp_path / "qwen", qwen25_config())
    plain = load_model(folder)
    expected = logits(folder)
    fused = apply_fused_projections(load_model(folder))
    assert fused.layers["0"].attention.wqkv.bias is not None  # one GEMM, biases joined
    with torch.no_grad():
        quantized = load_model(folder, quantize="int8")(TOKENS)
        torch.testing.assert_close(fused(TOKENS), expected, atol=1e-4, rtol=1e-6)
    assert (quantized - expected).abs().max() < 0.05 * expected.abs().max()
    assert load_model(folder, quantize="int8").layers["0"].attention.wq.bias is not None
    # Saved and loaded under the unfused names, biases included.
    state = fused.state_dict()
    assert list(state) == list(plain.state_dict())
    assert all(torch.equal(state[k], v) for k, v in plain.state_dict().items())
    fused.load_state_dict(plain.state_dict(), strict=True)


@pytest.mark.parametrize("change, message", [
    ({"use_sliding_window": True}, r"use_sliding_window=true \(Qwen2's sliding window"),
    ({"model_type": "gemma", "architectures": ["GemmaForCausalLM"]},
     r"model_type='gemma' is not one of the families this model runs"),
    ({"architectures": ["LlamaForCausalLM"]},
     r"architectures=\['LlamaForCausalLM'\] with model_type 'qwen2' is not a family"),
])
def test_what_qwen2_reader_lacks_is_refused_by_name(tmp_path, change, message):
    folder = write_family(tmp_path / "qwen", qwen25_config(**change))
    with pytest.raises(BadInput, match=r"config\.json: " + message):
        HFSource(folder)


def test_a_bias_qwen2_does_not_have_is_refused_by_name(tmp_path):
    folder = write_family(tmp_path / "qwen", qwen25_config())
    data_start, header = read_safetensors_header(folder / "model.safetensors")
    tensors = {name: read_safetensor(folder / "model.safetensors", data_start, entry)
               for name, entry in header.items() }
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    write_safetensors(folder / "model.safetensors", tensors)
    with pytest.raises(BadInput, match=r"holds 'model\.layers\.0\.self_attn\.o_proj\.bias', "
                                       r"which a Qwen2 does not have"):
        HFSource(folder)


# ---- Mistral: the sliding window ----

def test_mistral_window_limits_what_the_last_position_sees(tmp_path):
    """Rotary angles are relative, so with 2 layers and a window of 8 the last position depends
    on the last 2 * 7 + 1 tokens only, wherever they stand; without the window, on all 40."""
    folder = write_family(tmp_path / "mistral", mistral_config())
    model = load_model(folder)
    assert model.args.sliding_window == 8
    reach = 2 * (8 - 1) + 1
    with torch.no_grad():
        full = model(TOKENS)[:, -1]
        torch.testing.assert_close(model(TOKENS[:, -reach:])[:, -1], full, atol=1e-5, rtol=0)
        assert (model(TOKENS[:, -reach + 1:])[:, -1] - full).abs().max() > 1e-3
        for block in model.layers.values():
            block.attention.window = None
        assert (model(TOKENS)[:, -1] - full).abs().max() > 1e-3


def test_mistral_cached_decoding_equals_recomputing(tmp_path):
    model = load_model(write_family(tmp_path / "mistral", mistral_config()))
    with torch.no_grad():
        expected = model(TOKENS)
        model.setup_kv_cache(2, 64)
        chunks = [model(TOKENS[:, :5], 0), model(TOKENS[:, 5:12], 5)]  # a chunk crosses it
        chunks += [model(TOKENS[:, p:p + 1], p) for p in range(12, 40)]
        model.clear_kv_cache()
    torch.testing.assert_close(torch.cat(chunks, dim=1), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("config", [mistral_config, qwen25_config, llama32_config],
                         ids=["mistral", "qwen25", "llama32"])
def test_static_decode_steps_equal_recomputing(tmp_path, config):
    """The fixed-shape decode path of the generation engine (CUDA graphs on a GPU; the same step
    uncaptured here): each row's position a device tensor, the whole cache comes back and the
    mask keeps the window, the biases and the scaled rope."""
    model = load_model(write_family(tmp_path / "family", config()), max_seq_len=48)
    step = StepGraphs(lambda x, positions: model(x, positions)[:, -1], "cpu")
    with torch.no_grad():
        expected = model(TOKENS)[:, -1]
        model.setup_kv_cache(2, 48)
        model(TOKENS[:, :6], 0)  # prefill, eager, into the same cache
        for position in range(6, 40):
            logits = step(2, TOKENS[:, position:position + 1], torch.tensor([position] * 2))
        model.clear_kv_cache()
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-6)  # logits here reach ~100


def test_the_static_cache_mask_keeps_the_window():
    for start in (0, 3, 9, 20):
        static = attention_mask(2, 32, "cpu", torch.tensor([start]), window=8)[0][0, 0]
        visible = causal_mask(2, start + 2, "cpu", window=8)
        assert torch.equal(static[:, :start + 2], visible) and not static[:, start + 2:].any()
        assert visible.sum(1).max() <= 8


@pytest.mark.parametrize("window, expected", [(None, None), ("missing", 4096)])
def test_mistral_null_window_is_plain_llama_and_a_missing_one_is_mistralconfigs(
        tmp_path, window, expected):
    config = mistral_config(sliding_window=window)
    if window == "missing":
        del config["sliding_window"]
    folder = write_family(tmp_path / "mistral", config)
    assert HFSource(folder).args.sliding_window == expected
    if window is None:
        mistral = logits(folder)
        (folder / "config.json").write_text(json.dumps(mistral_config(
            model_type="llama", architectures=["LlamaForCausalLM"], sliding_window=None)))
        assert torch.equal(logits(folder), mistral)


def test_mistral_window_survives_meta_hf_and_a_split(tmp_path):
    folder = write_family(tmp_path / "mistral", mistral_config())
    source = HFSource(folder)
    expected = logits(folder)
    tensors = {name: source.load(name) for name in source.names()}
    save_meta(tensors, source.args, tmp_path / "meta")
    assert torch.equal(logits(tmp_path / "meta"), expected)
    save_hf_safetensors(tensors, source.args, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["sliding_window"] == 8
    assert torch.equal(logits(tmp_path / "hf"), expected)
    write_split(source, tmp_path / "pp2", 2, log=lambda *_: None)
    torch.testing.assert_close(chained_logits(tmp_path / "pp2", 2), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("window", [0, 2.5, True, "4096"])
def test_a_bad_window_is_refused_by_name(tmp_path, window):
    folder = write_family(tmp_path / "mistral", mistral_config(sliding_window=window))
    with pytest.raises(BadInput, match=rf"config\.json: sliding_window={window!r} must be a "
                                       r"positive number of tokens, or null"):
        HFSource(folder)


# ---- the planner's named shapes ----

# Parameters each model card on the Hugging Face Hub gives (its safetensors total), and whether
# the classifier is the embedding (counted once there; a stage here holds its own copy).
PUBLISHED_PARAMETERS = {
    "Llama-3.2-1B": (1_235_814_400, True), "Llama-3.2-3B": (3_212_749_824, True),
    "Qwen2.5-0.5B": (494_032_768, True), "Qwen2.5-1.5B": (1_543_714_304, True),
    "TinyLlama-1.1B": (1_100_048_384, False), "SmolLM2-360M": (361_821_120, True),
    "Mistral-7B": (7_241_732_096, False)}


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMETERS))
def test_named_shapes_give_the_published_parameter_counts(name):
    args = ModelArgs(**NAMED_SHAPES[name])
    with torch.device("meta"):
        model = Transformer(args)
    total = sum(p.numel() for n, p in model.named_parameters()
                if not (PUBLISHED_PARAMETERS[name][1] and n == "output.weight"))
    assert total == PUBLISHED_PARAMETERS[name][0]


def test_the_new_fields_leave_a_plain_models_digest_as_it_was(source):
    """Prompts and splits store params_digest: stories260K's is the one computed before
    rope_scaling, qkv_bias and sliding_window existed, and each of them set changes it."""
    assert params_digest(source.args) == "b06df37f3151aced"
    for change in ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, {"qkv_bias": True},
                   {"sliding_window": 4096}):
        assert params_digest(dataclasses.replace(source.args, **change)) != "b06df37f3151aced"

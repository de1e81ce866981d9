"""Hugging Face config.json as transformers 4 and 5 write it: every rope setting is read wherever
it lives, and every setting that changes the numbers is implemented or refused by name.
stories260K is written in the HF layout; its config.json is rewritten field by field (no
transformers import). Run: python3 -m pytest -q tests/test_hf_config.py
"""
import dataclasses
import json

import pytest
import torch

from llama.formats.checkpoint import load_model
from llama.errors import BadInput
from llama.formats.hf import (HFSource, interleaved_to_rotate_half, meta_to_hf_name,
                              save_hf_safetensors)
from llama.formats.layouts import save_meta
from llama.formats.tensor_files import write_safetensors


@pytest.fixture(scope="module")
def tensors(source):
    return {name: source.load(name) for name in source.names()}


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(0))


def logits(folder, tokens):
    with torch.no_grad():
        return load_model(folder)(tokens)


def transformers4_config(args, **changes) -> dict:
    """What LlamaConfig.save_pretrained wrote in transformers 4.4x (rope_theta at the top)."""
    return {"architectures": ["LlamaForCausalLM"], "attention_bias": False,
            "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
            "head_dim": args.dim // args.n_heads, "hidden_act": "silu", "hidden_size": args.dim,
            "initializer_range": 0.02, "intermediate_size": args.hidden_dim,
            "max_position_embeddings": args.max_seq_len, "mlp_bias": False, "model_type": "llama",
            "num_attention_heads": args.n_heads, "num_hidden_layers": args.n_layers,
            "num_key_value_heads": args.n_kv_heads, "pretraining_tp": 1,
            "rms_norm_eps": args.norm_eps, "rope_scaling": None, "rope_theta": args.rope_theta,
            "tie_word_embeddings": False, "torch_dtype": "float32",
            "transformers_version": "4.46.0", "use_cache": True, "vocab_size": args.vocab_size,
            **changes}


def transformers5_config(args, **changes) -> dict:
    """What transformers 5 writes: rope_theta moved into rope_parameters, torch_dtype -> dtype."""
    config = transformers4_config(args)
    for key in ("rope_scaling", "rope_theta", "torch_dtype"):
        del config[key]
    config.update(dtype="float32", transformers_version="5.0.0",
                  rope_parameters={"rope_theta": args.rope_theta, "rope_type": "default"})
    return {**config, **changes}


def hf_folder(tmp_path, tensors, args, config: dict, name="hf"):
    folder = tmp_path / name
    save_hf_safetensors(tensors, args, folder)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="module")
def theta_500k(source, tensors, tmp_path_factory, tokens):
    """(args, logits) of stories260K with rope_theta 500000, from the Meta layout."""
    args = dataclasses.replace(source.args, rope_theta=500000.0)
    folder = tmp_path_factory.mktemp("meta500k")
    save_meta(tensors, args, folder)
    return args, logits(folder, tokens)


@pytest.mark.parametrize("writer", ["transformers4", "transformers5",
                                    "transformers5_per_layer_type", "rope_scaling_default"])
def test_rope_theta_is_read_wherever_transformers_puts_it(writer, theta_500k, tensors, tmp_path,
                                                          tokens, source):
    args, expected = theta_500k
    if writer == "transformers4":
        config = transformers4_config(args)
    elif writer == "transformers5":
        config = transformers5_config(args)
    elif writer == "transformers5_per_layer_type":  # one dict per attention kind
        config = transformers5_config(args, layer_types=["full_attention"] * args.n_layers,
                                      rope_parameters={"full_attention": {
                                          "rope_theta": 500000.0, "rope_type": "default"}})
    else:  # an older writer: the type under "type", theta at the top
        config = transformers4_config(args, rope_scaling={"type": "default"})
    folder = hf_folder(tmp_path, tensors, args, config)
    assert HFSource(folder).args.rope_theta == 500000.0
    assert (logits(folder, tokens) - expected).abs().max().item() <= 1e-5
    # The setting matters: at the old fallback of 10000 the logits are far apart.
    assert (logits(folder, tokens) - logits(hf_folder(
        tmp_path, tensors, source.args, transformers5_config(source.args), "hf10k"),
        tokens)).abs().max().item() > 0.1


def test_rms_norm_eps_is_carried_through_and_defaults_as_transformers_does(source, tensors,
                                                                          tmp_path):
    args = dataclasses.replace(source.args, norm_eps=1e-6)
    folder = hf_folder(tmp_path, tensors, args, transformers5_config(args))
    assert HFSource(folder).args.norm_eps == 1e-6
    config = transformers5_config(args)
    del config["rms_norm_eps"]  # LlamaConfig's own default then applies: 1e-6
    folder = hf_folder(tmp_path, tensors, args, config, "no_eps")
    assert HFSource(folder).args.norm_eps == 1e-6


@pytest.mark.parametrize("rope_type", ["dynamic", "yarn", "longrope"])
@pytest.mark.parametrize("where", ["rope_parameters", "rope_scaling", "rope_scaling_type"])
def test_rope_types_the_model_lacks_are_refused_by_name(rope_type, where, source, tensors,
                                                        tmp_path):
    args = source.args
    scaling = {"factor": 8.0, "original_max_position_embeddings": 256}
    if where == "rope_parameters":
        config = transformers5_config(args, rope_parameters={
            "rope_theta": 10000.0, "rope_type": rope_type, **scaling})
    elif where == "rope_scaling":
        config = transformers4_config(args, rope_scaling={"rope_type": rope_type, **scaling})
    else:
        config = transformers4_config(args, rope_scaling={"type": rope_type, **scaling})
    folder = hf_folder(tmp_path, tensors, args, config)
    with pytest.raises(BadInput, match=rf"config.json: {where.replace('_type', '')}: rope type "
                                       rf"'{rope_type}' is not implemented here \(only "
                                       r"'default', 'linear', 'llama3'\)"):
        HFSource(folder)


@pytest.mark.parametrize("change, message", [
    ({"attention_bias": True}, r"attention_bias=True \(biases on q/k/v/o\)"),
    ({"mlp_bias": True}, r"mlp_bias=True \(biases in the feed-forward\)"),
    ({"head_dim": 16}, r"head_dim=16 differs from hidden_size/num_attention_heads=8"),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu'; this model uses silu"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                          "partial_rotary_factor": 0.5}}, r"partial_rotary_factor=0.5"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e6}}},
     r"rope_parameters differ between layer types"),
    ({"rope_theta": 500000.0}, r"rope_theta=500000.0 at the top but rope_theta=10000.0 in "
                               r"rope_parameters"),
    ({"rope_parameters": "default"}, r"rope_parameters='default' must be a JSON object"),
])
def test_settings_that_change_the_numbers_are_refused_by_name(change, message, source, tensors,
                                                              tmp_path):
    folder = hf_folder(tmp_path, tensors, source.args, transformers5_config(source.args, **change))
    with pytest.raises(BadInput, match=r"config.json: " + message):
        HFSource(folder)


def test_harmless_settings_load(source, tensors, tmp_path, tokens):
    """pretraining_tp only slices the same matmuls; swish is silu under another name."""
    config = transformers4_config(source.args, pretraining_tp=2, hidden_act="swish",
                                  head_dim=None, rope_scaling=None)
    folder = hf_folder(tmp_path, tensors, source.args, config)
    with torch.no_grad():
        expected = load_model(source.path)(tokens)
    assert (logits(folder, tokens) - expected).abs().max().item() <= 1e-5


def test_tied_embeddings_use_the_embedding_as_transformers_does(source, tensors, tmp_path, tokens):
    """tie_word_embeddings: the classifier is the embedding table, whether or not lm_head.weight
    is stored (transformers ties the two after loading, so a stored lm_head is not used)."""
    untied = {**tensors, "output.weight": torch.randn_like(tensors["output.weight"])}
    config = transformers5_config(source.args, tie_word_embeddings=True)
    with_head = hf_folder(tmp_path, untied, source.args, config, "with_head")
    without_head = hf_folder(tmp_path, {k: v for k, v in tensors.items() if k != "output.weight"},
                             source.args, config, "without_head")
    with torch.no_grad():
        expected = load_model(source.path)(tokens)  # stories260K's classifier is its embedding
    for folder in (with_head, without_head):
        assert (logits(folder, tokens) - expected).abs().max().item() <= 1e-5


# ---- other architectures and tensors a LLaMA does not have (issue 18, item 13; issue 23) ----

def qwen2_folder(tmp_path, tensors, args, config: dict, name="qwen2"):
    """A Qwen2 checkpoint in miniature: a LLaMA's tensors plus q/k/v biases, and a config.json
    as Qwen2Config writes it (no attention_bias field: Qwen2 always has them)."""
    folder = hf_folder(tmp_path, tensors, args, config, name)
    hf = {meta_to_hf_name(n): t for n, t in tensors.items()}
    for layer in range(args.n_layers):
        for proj in ("q_proj", "k_proj", "v_proj"):
            weight = hf[f"model.layers.{layer}.self_attn.{proj}.weight"]
            hf[f"model.layers.{layer}.self_attn.{proj}.bias"] = torch.ones(weight.shape[0])
    write_safetensors(folder / "model.safetensors", hf)
    return folder


def qwen2_config(args, **changes) -> dict:
    config = transformers4_config(args, architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                                  sliding_window=None, use_sliding_window=False, **changes)
    for key in ("attention_bias", "mlp_bias", "head_dim", "pretraining_tp"):
        config.pop(key)
    return config


def test_qwen2_biases_in_a_checkpoint_labelled_llama_are_refused_by_name(source, tensors,
                                                                          tmp_path):
    """Qwen2 runs (tests/test_families.py), but a config relabelled as a LLaMA does not let its
    biases be dropped silently."""
    args = source.args
    folder = qwen2_folder(tmp_path, tensors, args, qwen2_config(args))
    load_model(folder)
    (folder / "config.json").write_text(json.dumps(transformers4_config(args)))
    with pytest.raises(BadInput, match=r"qwen2/model\.safetensors holds "
                                       r"'model\.layers\.0\.self_attn\.q_proj\.bias', which a "
                                       r"LLaMA does not have"):
        HFSource(folder)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gemma", "architectures": ["GemmaForCausalLM"]},
     r"model_type='gemma' is not one of the families this model runs \(llama "
     r"\(LlamaForCausalLM\), qwen2 \(Qwen2ForCausalLM\)"),
    ({"architectures": ["Qwen2ForCausalLM"]},
     r"architectures=\['Qwen2ForCausalLM'\] with model_type 'llama' is not a family this model "
     r"runs"),
    ({"model_type": None, "architectures": ["PhiForCausalLM"]},
     r"architectures=\['PhiForCausalLM'\] is not a family this model runs"),
])
def test_other_architectures_are_refused_by_name(change, message, source, tensors, tmp_path):
    config = {k: v for k, v in transformers4_config(source.args, **change).items()
              if v is not None or k != "model_type"}
    folder = hf_folder(tmp_path, tensors, source.args, config)
    with pytest.raises(BadInput, match=message):
        load_model(folder)


def test_rotary_inverse_frequencies_of_older_transformers_are_accepted(source, tensors, tmp_path,
                                                                      tokens):
    """Older transformers saved rotary's inv_freq buffers; they follow from rope_theta."""
    args = source.args
    folder = hf_folder(tmp_path, tensors, args, transformers4_config(args))
    plain = logits(folder, tokens)
    heads = {"q_proj": args.n_heads, "k_proj": args.n_kv_heads}
    hf = {meta_to_hf_name(n): t for n, t in tensors.items()}
    hf["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(args.head_dim // 2)
    write_safetensors(folder / "model.safetensors", hf, lambda name, t: next(
        (interleaved_to_rotate_half(t, n) for proj, n in heads.items()
         if name.endswith(f"{proj}.weight")), t))
    assert torch.equal(logits(folder, tokens), plain)

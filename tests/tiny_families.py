"""Tiny random models of the real families, in the Hugging Face layout: tensors written by the
project's own writer (save_hf_safetensors), config.json written field for field as the real
model's config.json is (names and values as there, sizes scaled down). Used by test_families.py
and test_interop_families.py; nothing here imports transformers.
"""
import json

import torch

from llama.formats.hf import save_hf_safetensors
from llama.model.transformer import ModelArgs, Transformer

# Scaled-down sizes shared by the families: 4 heads of 16, 2 kv heads, 2 layers.
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 256}


def llama32_config(**changes) -> dict:
    """meta-llama/Llama-3.2-1B's config.json (transformers 4.45), scaled down; llama3 rope
    scaling with the real factors, the original context shrunk so that short texts reach all
    three regimes of the scaling (kept, blended, slowed)."""
    return {"architectures": ["LlamaForCausalLM"], "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": 254, "eos_token_id": 255,  # the real 128000/128001 lie beyond 256
            "head_dim": 16, "hidden_act": "silu", "initializer_range": 0.02,
            "max_position_embeddings": 1024, "mlp_bias": False, "model_type": "llama",
            "pretraining_tp": 1, "rms_norm_eps": 1e-05,
            "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 64, "rope_type": "llama3"},
            "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "float32",
            "transformers_version": "4.45.0.dev0", "use_cache": True, **TINY, **changes}


def as_transformers5(config: dict) -> dict:
    """The same config as transformers 5 writes it: rope settings in rope_parameters."""
    config = dict(config)
    scaling = config.pop("rope_scaling", None) or {"rope_type": "default"}
    config["rope_parameters"] = {**scaling, "rope_theta": config.pop("rope_theta")}
    config["dtype"] = config.pop("torch_dtype")
    return {**config, "transformers_version": "5.0.0"}


def args_of(config: dict, qkv_bias=False) -> ModelArgs:
    """The ModelArgs a tiny config describes (before rope scaling and family settings)."""
    return ModelArgs(dim=config["hidden_size"], n_layers=config["num_hidden_layers"],
                     n_heads=config["num_attention_heads"],
                     n_kv_heads=config["num_key_value_heads"], vocab_size=config["vocab_size"],
                     hidden_dim=config["intermediate_size"], norm_eps=config["rms_norm_eps"],
                     **({"qkv_bias": True} if qkv_bias else {}))


def random_tensors(args: ModelArgs, seed: int = 0, tied: bool = False) -> dict:
    """A random model's tensors under Meta names; norms away from 1 so that they count too."""
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                parameter.normal_(0.0, 0.5)
    tensors = {name: t.detach().clone() for name, t in model.state_dict().items()}
    if tied:
        tensors.pop("output.weight")
    return tensors


def write_family(folder, config: dict, seed: int = 0):
    """A folder with random weights (Qwen2's with q/k/v biases) and exactly this config.json;
    returns the folder."""
    args = args_of(config, qkv_bias=config.get("model_type") == "qwen2")
    save_hf_safetensors(random_tensors(args, seed, config.get("tie_word_embeddings", False)),
                        args, folder)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def qwen25_config(**changes) -> dict:
    """Qwen/Qwen2.5-0.5B's config.json, scaled down: no attention_bias field (Qwen2 always has
    q/k/v biases), a sliding_window that use_sliding_window=false leaves unused, tied
    embeddings (Qwen2.5-7B and larger are untied)."""
    return {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0,
            "bos_token_id": 254, "eos_token_id": 254,  # 151643 lies beyond 256
            "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 32768,
            "max_window_layers": 2, "model_type": "qwen2", "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
            "torch_dtype": "float32", "transformers_version": "4.40.1", "use_cache": True,
            "use_mrope": False, "use_sliding_window": False, **TINY, **changes}


def mistral_config(**changes) -> dict:
    """mistralai/Mistral-7B-v0.1's config.json, scaled down: a sliding window of 8 tokens
    (4096 there), so that a 40-token text crosses it. Mistral-7B-v0.2/v0.3 say null."""
    return {"architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
            "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 32768,
            "model_type": "mistral", "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
            "sliding_window": 8, "tie_word_embeddings": False, "torch_dtype": "float32",
            "transformers_version": "4.34.0.dev0", "use_cache": True, **TINY, **changes}


TEXTS = ["Once upon a time there was a little girl named Lily.", "Hello, world! 123 4567",
         "Grüße aus Köln: café, naïve, 東京, emoji 🙂.",
         "The cat sat on the mat.\n\tTabs too."]
# Llama 3's special tokens (it has 256 after its 128000 BPE ids; a few are enough here).
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>"]


def write_llama3_tokenizer(folder, tokenizers, bos_token="<|begin_of_text|>", eos_ids=None):
    """A byte-level BPE tokenizer.json built as Llama 3's is (GPT-style split, byte-level
    pre-tokenizer and decoder, BOS added by a template post-processor, special tokens after
    the BPE ids), trained on a few sentences, with tokenizer_config.json and
    generation_config.json as Llama-3.1-8B-Instruct writes them. Returns the folder."""
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False)
    tokenizer.train_from_iterator(TEXTS * 20, trainer)
    tokenizer.add_special_tokens(LLAMA3_SPECIALS)
    ids = {token: tokenizer.token_to_id(token) for token in LLAMA3_SPECIALS}
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>",
                                                         ids["<|begin_of_text|>"])])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": bos_token, "clean_up_tokenization_spaces": True,
        "eos_token": "<|eot_id|>", "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast"}))
    eos = [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]] \
        if eos_ids is None else eos_ids
    (folder / "generation_config.json").write_text(json.dumps({
        "bos_token_id": ids["<|begin_of_text|>"], "do_sample": True, "eos_token_id": eos,
        "temperature": 0.6, "top_p": 0.9, "transformers_version": "4.42.3"}))
    return folder

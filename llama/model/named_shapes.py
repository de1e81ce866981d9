"""The model shapes the planner (llama.tools.plan --model), llama.tools.explain and the benchmarks
know by name: ModelArgs keyword arguments, read from each model's own params.json or config.json.

The Hugging Face config.json values were read from copies of those files found with the project's
code search (named beside each entry); tests/test_families.py checks that every shape gives the
parameter count its model card publishes, which a wrong width or count would not.
"""

LLAMA3_ROPE_SCALING_32 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

NAMED_SHAPES = {
    # Meta's params.json of LLaMA-1/2 7B and 13B (hidden_dim follows from multiple_of: 11008
    # and 13824).
    "7B": {"dim": 4096, "n_layers": 32, "n_heads": 32, "vocab_size": 32000, "multiple_of": 256},
    "13B": {"dim": 5120, "n_layers": 40, "n_heads": 40, "vocab_size": 32000, "multiple_of": 256},
    # meta-llama/Llama-3.2-1B(-Instruct) config.json (copy: kevinstephano/thunder_model_blocks,
    # hf_llama/llama_config.py, commit 4e20de36 of the Hub repo); tied embeddings.
    "Llama-3.2-1B": {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8,
                     "hidden_dim": 8192, "vocab_size": 128256, "norm_eps": 1e-5,
                     "rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE_SCALING_32,
                     "max_seq_len": 131072},
    # meta-llama/Llama-3.2-3B config.json (copy: LocalResearchGroup/llm-foundry,
    # llmfoundry/models/llama/config.py); tied embeddings.
    "Llama-3.2-3B": {"dim": 3072, "n_layers": 28, "n_heads": 24, "n_kv_heads": 8,
                     "hidden_dim": 8192, "vocab_size": 128256, "norm_eps": 1e-5,
                     "rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE_SCALING_32,
                     "max_seq_len": 131072},
    # Qwen/Qwen2.5-0.5B config.json (copies: rwth-i6/i6_experiments qwen2_configs.py has the same
    # shape for Qwen2-0.5B; Abandon-ht/LLM-tutorial's model page: 24 layers, 14/2 heads); q/k/v
    # biases, tied embeddings, 151936 embedding rows for 151665 tokenizer ids.
    "Qwen2.5-0.5B": {"dim": 896, "n_layers": 24, "n_heads": 14, "n_kv_heads": 2,
                     "hidden_dim": 4864, "vocab_size": 151936, "norm_eps": 1e-6,
                     "rope_theta": 1000000.0, "qkv_bias": True, "max_seq_len": 32768},
    # Qwen/Qwen2.5-1.5B config.json (28 layers, 12/2 heads, 1536 x 8960, as the Qwen2 1.5B
    # config copied in the index; a third-party model page that says 24 layers and 32/8 heads
    # contradicts both and the published parameter count); q/k/v biases, tied embeddings.
    "Qwen2.5-1.5B": {"dim": 1536, "n_layers": 28, "n_heads": 12, "n_kv_heads": 2,
                     "hidden_dim": 8960, "vocab_size": 151936, "norm_eps": 1e-6,
                     "rope_theta": 1000000.0, "qkv_bias": True, "max_seq_len": 32768},
    # TinyLlama/TinyLlama-1.1B-Chat-v1.0 config.json (copies in the index pin Hub revision
    # fe8a4ea1); a LLaMA 2 shape with GQA and the LLaMA sentencepiece tokenizer.
    "TinyLlama-1.1B": {"dim": 2048, "n_layers": 22, "n_heads": 32, "n_kv_heads": 4,
                       "hidden_dim": 5632, "vocab_size": 32000, "norm_eps": 1e-5,
                       "max_seq_len": 2048},
    # HuggingFaceTB/SmolLM2-360M config.json (copies: JXL884/Entropy-aware-branching
    # entropix/models/smollm.py for the widths and heads; a WebGPU port's SMOLLM2_CONFIGS for
    # intermediate_size 2560); a LlamaForCausalLM with tied embeddings. Its rope_theta is left
    # at the default: the copies disagree (10000 or 100000), and shapes do not depend on it.
    "SmolLM2-360M": {"dim": 960, "n_layers": 32, "n_heads": 15, "n_kv_heads": 5,
                     "hidden_dim": 2560, "vocab_size": 49152, "norm_eps": 1e-5},
    # mistralai/Mistral-7B-v0.1 config.json (copy of its shape: sumitdotml/transformers,
    # mistral-7b-v0.1/README.md); a 4096-token sliding window (v0.2/v0.3: none).
    "Mistral-7B": {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8,
                   "hidden_dim": 14336, "vocab_size": 32000, "norm_eps": 1e-5,
                   "sliding_window": 4096, "max_seq_len": 32768},
}

"""The families of issue 23 against the real transformers (skipped when it is not installed):
tiny random Llama 3.2 / Qwen2.5 / Mistral folders (tests/tiny_families.py) give the logits
transformers gives, and a Llama-3-style tokenizer.json the ids its tokenizer gives. The product
never imports transformers; only this file does.
Run (in a venv that has transformers): python3 -m pytest -q tests/test_interop_families.py
"""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llama.formats.checkpoint import load_model  # noqa: E402
from llama.formats.hf import HFSource, save_hf_safetensors  # noqa: E402
from llama.model.tokenizer import Tokenizer  # noqa: E402
from tiny_families import (TEXTS, as_transformers5, llama32_config,  # noqa: E402
                           mistral_config, qwen25_config, write_family, write_llama3_tokenizer)

TOKENS = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))


def assert_logits_as_transformers(folder, tokens=TOKENS):
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = theirs(tokens).logits
        torch.testing.assert_close(load_model(folder)(tokens), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("writer", ["transformers4", "transformers5"])
def test_llama32_rope_scaling_gives_transformers_logits(tmp_path, writer):
    config = llama32_config() if writer == "transformers4" else as_transformers5(llama32_config())
    assert_logits_as_transformers(write_family(tmp_path / "llama32", config))


def test_linear_rope_scaling_gives_transformers_logits(tmp_path):
    config = llama32_config(rope_scaling={"rope_type": "linear", "factor": 4.0})
    assert_logits_as_transformers(write_family(tmp_path / "linear", config))


@pytest.mark.parametrize("tied", [True, False])
def test_qwen25_gives_transformers_logits(tmp_path, tied):
    config = qwen25_config(tie_word_embeddings=tied)
    assert_logits_as_transformers(write_family(tmp_path / "qwen25", config))


def test_qwen25_written_by_us_gives_transformers_logits(tmp_path):
    """Our HF writer's Qwen2 config.json and q/k bias permutation, read by transformers."""
    source = HFSource(write_family(tmp_path / "qwen25", qwen25_config(tie_word_embeddings=False)))
    save_hf_safetensors({n: source.load(n) for n in source.names()}, source.args, tmp_path / "out")
    assert_logits_as_transformers(tmp_path / "out")


@pytest.mark.parametrize("window", [8, None])
def test_mistral_gives_transformers_logits_across_the_window(tmp_path, window):
    config = mistral_config(sliding_window=window)
    assert_logits_as_transformers(write_family(tmp_path / "mistral", config))


def test_mistral_greedy_ids_past_the_window_are_transformers(tmp_path):
    """Cached decoding (ours and theirs) well past the window of 8."""
    folder = write_family(tmp_path / "mistral", mistral_config())
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    theirs.generation_config.eos_token_id = None  # random weights: id 2 is not an end here
    prompt = TOKENS[:1, :6]
    generated = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                                do_sample=False)[0, 6:].tolist()
    model, ids = load_model(folder), prompt[0].tolist()
    with torch.no_grad():
        model.setup_kv_cache(1, 32)
        logits = model(prompt, 0)
        for _ in range(20):
            ids.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([ids[-1:]]), len(ids) - 1)
    assert ids[6:] == generated


def hostile_texts(n: int, seed: int = 0) -> list:
    """n seeded texts of what tokenizers trip on: unicode of several scripts and emoji, runs of
    spaces, tabs and newlines, digit runs, punctuation, special tokens inside words."""
    import random
    pieces = ["a", "Hello", " world", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "0", "12",
              "3456789", "1,000.50", "ü", "Köln", "東京", "русский", "العربية", "🙂", "👍🏽",
              "e\u0301", "!?", "...", "--", "'s", "n't", "<|eot_id|>", "<|begin_of_text|>",
              "<|start_header_id|>", "<", "|", ">", "\u00a0", "\u200b", "ﬁ", "Ⅻ"]
    rng = random.Random(seed)
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))) for _ in range(n)]


def test_llama3_style_tokenizer_json_encodes_and_decodes_as_transformers(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    folder = write_llama3_tokenizer(tmp_path / "tok", tokenizers)
    ours = Tokenizer(str(folder / "tokenizer.json"))
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id)
    for text in TEXTS + ["Hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nOk"] + \
            hostile_texts(300):
        ids = ours.encode(text, bos=True, eos=False)
        assert ids == theirs(text)["input_ids"]  # its post-processor adds BOS
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("config", [llama32_config, qwen25_config, mistral_config],
                         ids=["llama32", "qwen25", "mistral"])
def test_folders_transformers_itself_writes_give_its_logits(tmp_path, config):
    """transformers' own save_pretrained (its config.json as this version writes it: for
    transformers 5 rope_parameters, layer_types, dtype), read here."""
    fields = {k: v for k, v in config().items()
              if k not in ("architectures", "model_type", "transformers_version", "torch_dtype")}
    config_class = transformers.AutoConfig.for_model(config()["model_type"], **fields)
    torch.manual_seed(0)
    theirs = transformers.AutoModelForCausalLM.from_config(config_class).eval()
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():  # transformers starts biases at 0
            if name.endswith("bias") or name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
    theirs.save_pretrained(tmp_path / "saved")
    written = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert written["model_type"] == config()["model_type"]
    assert_logits_as_transformers(tmp_path / "saved")


@pytest.mark.parametrize("family", ["llama3.2", "qwen2.5", "mistral"])
@pytest.mark.parametrize("method", ["prompt", "prefix", "adapter", "lora"])
def test_every_methods_peft_export_runs_in_peft_on_each_family(tmp_path, family, method):
    """A tuning made here, exported to PEFT's layout, loads in peft onto the family's own folder
    and gives our logits (the model's q/k rows, biases, rope scaling and window all matter)."""
    peft = pytest.importorskip("peft")
    if (family, method) == ("qwen2.5", "adapter"):
        pytest.skip("peft's adaption prompts know llama and mistral models only (ValueError: "
                    "Unsupported model type for adaption prompt: 'qwen2')")
    from llama.parallel.distributed import DistContext
    from llama.parallel.pipeline import Stage
    from llama.tuning.peft import export_peft
    from test_interop import tuned_logits
    from test_methods import with_tuning
    configs = {"llama3.2": llama32_config, "qwen2.5": qwen25_config, "mistral": mistral_config}
    folder = write_family(tmp_path / family, configs[family](num_hidden_layers=4))
    model = load_model(folder)
    tuning, metadata = tuned(model, method, with_tuning)
    export_peft(tmp_path / "peft", method, {k: t.detach() for k, t in tuning.trainable.items()},
                model.args, {"base_model": str(folder), **metadata})
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "peft",
                                                           dtype=torch.float32).eval()
    tokens = TOKENS[:1, :12]
    stage = Stage(model, DistContext(), tuning=tuning)
    with torch.no_grad():
        expected = theirs(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits
    torch.testing.assert_close(tuned_logits(stage, tokens), expected[:, -tokens.shape[1]:],
                               atol=1e-4, rtol=0)


def tuned(model, method, with_tuning):
    """(the method on the model with values that change its output, export metadata)."""
    from llama.tuning.lora import TARGETS, LoraSettings, apply_lora
    from llama.tuning.methods import apply_prompt
    from llama.tuning.prompt import SoftPrompt, init_prompt_weight
    if method == "prompt":
        weight = init_prompt_weight("random", 4, model.tok_embeddings.weight, seed=1)
        return apply_prompt(SoftPrompt(weight), 4), {}
    if method != "lora":
        return with_tuning(model, method), {"adapter_layers": 3}
    settings = LoraSettings(r=4, alpha=8.0, dropout=0.0, targets=tuple(TARGETS),
                            use_rslora=False)
    tuning = apply_lora(model, settings, seed=0)
    with torch.no_grad():  # B starts at zero (the base model): give it values that show
        for key, tensor in tuning.trainable.items():
            if key.endswith("lora_B"):
                tensor.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(len(key)))
    return tuning, {"lora": settings.describe()}

"""The families of issue 23 against the real transformers (skipped when it is not installed):
tiny random Llama 3.2 / Qwen2.5 / Mistral folders (tests/tiny_families.py) give the logits
transformers gives. The product never imports transformers; only this file does.
Run (in a venv that has transformers): python3 -m pytest -q tests/test_interop_families.py
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from llama.formats.checkpoint import load_model  # noqa: E402
from llama.formats.hf import HFSource, save_hf_safetensors  # noqa: E402
from tiny_families import as_transformers5, llama32_config, qwen25_config, write_family  # noqa: E402

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

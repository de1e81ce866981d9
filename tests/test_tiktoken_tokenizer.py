"""Meta's Llama 3 tokenizer.model (tiktoken's BPE ranks format), read with the optional tiktoken
library: refused naming the extra without it; with it, the sentencepiece Tokenizer's interface
(BOS/EOS ours to add, special tokens in a text as single ids, stop ids), and a Meta-layout
Llama 3 folder (params.json + this tokenizer.model) runs in example.py.
Run: python3 -m pytest -q tests/test_tiktoken_tokenizer.py
"""
import base64
import subprocess
import sys

import pytest
import torch

from launch import REPO
from llama.errors import BadInput
from llama.formats.layouts import save_meta
from llama.model import tiktoken_tokenizer
from llama.model.tokenizer import Tokenizer
from llama.model.transformer import ModelArgs, Transformer

MERGES = [b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b"ld", b" world"]


def write_ranks(path) -> int:
    """A tiny ranks file: the 256 bytes, then a few merges; returns the number of ranks."""
    tokens = [bytes([b]) for b in range(256)] + MERGES
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(tokens)))
    return len(tokens)


def test_only_the_ranks_format_is_read_as_tiktoken(tmp_path, assets):
    write_ranks(tmp_path / "tokenizer.model")
    assert tiktoken_tokenizer.is_tiktoken_file(tmp_path / "tokenizer.model")
    assert not tiktoken_tokenizer.is_tiktoken_file(assets / "llama" / "tokenizer.model")
    assert not tiktoken_tokenizer.is_tiktoken_file(assets / "stories260K" / "tok512.model")


def test_without_the_library_it_is_refused_naming_the_extra(tmp_path, monkeypatch):
    write_ranks(tmp_path / "tokenizer.model")
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # import tiktoken raises ImportError
    with pytest.raises(BadInput, match=r"is Llama 3's tiktoken format, which needs the optional "
                                       r"tiktoken library: pip install -e \"\.\[tiktoken\]\""):
        Tokenizer(str(tmp_path / "tokenizer.model"))


def test_encodes_decodes_and_keeps_special_tokens_whole(tmp_path):
    pytest.importorskip("tiktoken")
    n_ranks = write_ranks(tmp_path / "tokenizer.model")
    tokenizer = Tokenizer(str(tmp_path / "tokenizer.model"))
    assert (tokenizer.n_words, tokenizer.bos_id, tokenizer.eos_id) == \
        (n_ranks + 256, n_ranks, n_ranks + 1)
    assert tokenizer.encode("hello world", bos=True, eos=True) == \
        [n_ranks, 256 + MERGES.index(b"hello"), 256 + MERGES.index(b" world"), n_ranks + 1]
    eot = n_ranks + 9
    ids = tokenizer.encode("hi<|eot_id|>Grüße 🙂", bos=False, eos=False)
    assert ids.count(eot) == 1 and eot in tokenizer.stop_ids
    assert tokenizer.decode(ids) == "hiGrüße 🙂"
    with pytest.raises(BadInput, match=r"makes ids up to \d+ but the model's vocabulary has 300"):
        tokenizer.check_matches(300)


def test_a_meta_llama3_folder_with_its_tokenizer_model_generates(tmp_path):
    pytest.importorskip("tiktoken")
    (tmp_path / "meta").mkdir()
    n_ranks = write_ranks(tmp_path / "meta" / "tokenizer.model")
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=n_ranks + 256,
                     multiple_of=32, rope_theta=500000.0, max_seq_len=64,
                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192})
    torch.manual_seed(0)
    model = Transformer(args)
    save_meta({k: v.detach() for k, v in model.state_dict().items()}, args, tmp_path / "meta")
    done = subprocess.run([sys.executable, "example.py", "--ckpt_dir", str(tmp_path / "meta"),
                           "--prompts", "hello world", "--max_gen_len", "4"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "hello world" in done.stdout

"""Hugging Face tokenizer.json (byte-level BPE: Llama 3, Qwen2.5, SmolLM2) behind the Tokenizer
interface, through the optional tokenizers library. A tiny tokenizer built as Llama 3's is
(tests/tiny_families.py); the tests that need the library skip without it, the refusal without
it always runs. Run: python3 -m pytest -q tests/test_hf_tokenizer.py
"""
import json
import sys

import pytest

from llama.errors import BadInput
from llama.formats.checkpoint import copy_tokenizer, find_tokenizer, open_source, write_split
from llama.model.tokenizer import Tokenizer
from tiny_families import (LLAMA3_SPECIALS, TEXTS, llama32_config, write_family,
                           write_llama3_tokenizer)

TEXT = "Grüße, world!<|eot_id|> 🙂 <|start_header_id|>user<|end_header_id|>"


@pytest.fixture
def tokenizers():
    return pytest.importorskip("tokenizers")


@pytest.fixture
def llama3(tmp_path, tokenizers):
    return write_llama3_tokenizer(tmp_path / "llama3", tokenizers)


def special_id(folder, token):
    vocab = json.loads((folder / "tokenizer.json").read_text())["added_tokens"]
    return next(entry["id"] for entry in vocab if entry["content"] == token)


def test_without_the_library_a_tokenizer_json_is_refused_naming_the_extra(tmp_path, monkeypatch):
    (tmp_path / "tokenizer.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers now fails
    with pytest.raises(BadInput, match=r"tokenizer .*tokenizer\.json is a Hugging Face "
                                       r"tokenizer\.json, which needs the optional tokenizers "
                                       r'library: pip install -e "\.\[hf-tokenizers\]"$'):
        Tokenizer(str(tmp_path / "tokenizer.json"))


def test_a_missing_tokenizer_json_is_refused_by_name(tmp_path):
    with pytest.raises(BadInput, match=r"tokenizer .*nowhere/tokenizer\.json does not exist"):
        Tokenizer(str(tmp_path / "nowhere" / "tokenizer.json"))


def test_text_round_trips_and_bos_eos_are_ours_to_add(llama3):
    tokenizer = Tokenizer(str(llama3 / "tokenizer.json"))
    bos = special_id(llama3, "<|begin_of_text|>")
    assert tokenizer.bos_id == bos
    for text in TEXTS:
        ids = tokenizer.encode(text, bos=False, eos=False)
        assert bos not in ids  # the post-processor's BOS is not added behind our back
        assert tokenizer.decode(ids) == text
        assert tokenizer.encode(text, bos=True, eos=True) == [bos] + ids + [tokenizer.eos_id]


def test_special_tokens_in_the_text_are_single_ids_and_left_out_of_decoding(llama3):
    tokenizer = Tokenizer(str(llama3 / "tokenizer.json"))
    ids = tokenizer.encode(TEXT, bos=False, eos=False)
    for token in ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"):
        assert ids.count(special_id(llama3, token)) == 1
    assert tokenizer.decode(ids) == "Grüße, world! 🙂 user"


def test_stop_ids_come_from_the_configs_beside_it(llama3, tmp_path, tokenizers):
    """tokenizer_config's eos_token is eos_id; generation_config's list all stop generation."""
    tokenizer = Tokenizer(str(llama3))  # the folder works too
    ids = {token: special_id(llama3, token) for token in LLAMA3_SPECIALS}
    assert tokenizer.eos_id == ids["<|eot_id|>"] == tokenizer.pad_id
    assert set(tokenizer.stop_ids) == {ids["<|end_of_text|>"], ids["<|eom_id|>"],
                                       ids["<|eot_id|>"]}
    # Qwen2.5 names no bos_token in tokenizer_config: the configs' bos_token_id is used.
    qwen_like = write_llama3_tokenizer(tmp_path / "qwen", tokenizers, bos_token=None,
                                       eos_ids=ids["<|end_of_text|>"])
    (qwen_like / "generation_config.json").write_text(json.dumps({
        "bos_token_id": ids["<|end_of_text|>"], "eos_token_id": ids["<|end_of_text|>"]}))
    tokenizer = Tokenizer(str(qwen_like / "tokenizer.json"))
    assert tokenizer.bos_id == ids["<|end_of_text|>"]
    assert tokenizer.stop_ids == (ids["<|eot_id|>"], ids["<|end_of_text|>"])


def test_without_a_bos_anywhere_it_is_refused_by_name(llama3):
    (llama3 / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot_id|>"}))
    (llama3 / "generation_config.json").unlink()
    with pytest.raises(BadInput, match=r"tokenizer .*tokenizer\.json: no BOS token the tokenizer "
                                       r"has \(ids \[\]\) in tokenizer_config\.json, "
                                       r"generation_config\.json or config\.json beside it"):
        Tokenizer(str(llama3 / "tokenizer.json"))


def test_vocabulary_check_allows_padded_embeddings_only(llama3):
    tokenizer = Tokenizer(str(llama3 / "tokenizer.json"))
    tokenizer.check_matches(tokenizer.n_words)
    tokenizer.check_matches(tokenizer.n_words + 100)  # Qwen2.5: 151665 ids, 151936 rows
    with pytest.raises(BadInput, match=rf"makes ids up to {tokenizer.n_words - 1} but the "
                                       rf"model's vocabulary has {tokenizer.n_words - 1}"):
        tokenizer.check_matches(tokenizer.n_words - 1)


def test_a_split_finds_and_carries_the_tokenizer_json_and_its_configs(tmp_path, tokenizers):
    folder = write_family(tmp_path / "llama32", llama32_config(vocab_size=320))
    write_llama3_tokenizer(folder, tokenizers)
    found = find_tokenizer(folder)
    assert found == str(folder / "tokenizer.json")
    write_split(open_source(folder), tmp_path / "pp2", 2, tokenizer_path=found,
                log=lambda *_: None)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "pp2" / name).is_file()
    original, carried = Tokenizer(found), Tokenizer(find_tokenizer(tmp_path / "pp2"))
    assert (carried.bos_id, carried.stop_ids) == (original.bos_id, original.stop_ids)
    assert carried.encode(TEXT, True, True) == original.encode(TEXT, True, True)


def test_without_generation_config_the_ids_of_config_json_are_used_and_carried(llama3, tmp_path):
    """As transformers derives a generation config from config.json when there is none."""
    (llama3 / "generation_config.json").unlink()
    (llama3 / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot_id|>"}))
    bos, eom = special_id(llama3, "<|begin_of_text|>"), special_id(llama3, "<|eom_id|>")
    (llama3 / "config.json").write_text(json.dumps({"bos_token_id": bos,
                                                    "eos_token_id": [eom]}))
    tokenizer = Tokenizer(str(llama3 / "tokenizer.json"))
    assert tokenizer.bos_id == bos
    assert tokenizer.stop_ids == (special_id(llama3, "<|eot_id|>"), eom)
    copy_tokenizer(str(llama3 / "tokenizer.json"), tmp_path)
    carried = Tokenizer(str(tmp_path / "tokenizer.json"))
    assert (carried.bos_id, carried.stop_ids) == (tokenizer.bos_id, tokenizer.stop_ids)


def test_a_damaged_file_beside_it_is_refused_by_name(llama3):
    (llama3 / "generation_config.json").write_text("[" * 100_000)
    with pytest.raises(BadInput, match=r"generation_config\.json is not readable JSON \("):
        Tokenizer(str(llama3 / "tokenizer.json"))
    (llama3 / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(BadInput, match=r"generation_config\.json must hold a JSON object$"):
        Tokenizer(str(llama3 / "tokenizer.json"))


@pytest.mark.parametrize("content", ["{}", "not json", '{"model": {"type": "Unknown"}}'])
def test_a_tokenizer_json_the_library_cannot_read_is_refused_by_name(llama3, content):
    (llama3 / "tokenizer.json").write_text(content)
    with pytest.raises(BadInput, match=r"tokenizer .*tokenizer\.json is not a Hugging Face "
                                       r"tokenizer\.json \(.*\): pass the tokenizer\.json that "
                                       r"came with the checkpoint$"):
        Tokenizer(str(llama3 / "tokenizer.json"))

"""Hugging Face tokenizer.json (byte-level BPE, as Llama 3, Qwen2.5 and SmolLM2 ship it), behind
the interface of llama/model/tokenizer.py: encode/decode, bos_id, eos_id, pad_id, stop_ids,
n_words, check_matches.

It runs through the optional `tokenizers` library (pip install -e ".[hf-tokenizers]"), imported
only when such a tokenizer is opened. BOS and stop tokens come from the files beside
tokenizer.json: tokenizer_config.json, generation_config.json, config.json.
"""
import json
import os
from pathlib import Path

from llama.errors import BadInput
from llama.model.text import check_text

INSTALL = 'pip install -e ".[hf-tokenizers]"'
# The files beside tokenizer.json that say which ids start and end a text.
SPECIAL_FILES = ("tokenizer_config.json", "generation_config.json")
# The names a split or a conversion writes them under (a regular expression).
TOKENIZER_JSON_NAMES = r"tokenizer\.json|tokenizer_config\.json|generation_config\.json"


def is_hf_tokenizer(path) -> bool:
    """A tokenizer.json file, or a folder holding one (and no sentencepiece tokenizer.model)."""
    path = Path(path)
    if path.is_dir():
        return (path / "tokenizer.json").is_file() and not (path / "tokenizer.model").is_file()
    return path.suffix == ".json"


def import_tokenizers(path):
    try:
        import tokenizers
    except ImportError:
        raise BadInput(f"tokenizer {path} is a Hugging Face tokenizer.json, which needs the "
                       f"optional tokenizers library: {INSTALL}") from None
    return tokenizers


def read_beside(folder: Path, name: str) -> dict:
    """A JSON object beside tokenizer.json, or {} when there is none."""
    path = folder / name
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:  # ValueError: also bad UTF-8
        raise BadInput(f"{path} is not readable JSON ({error}): use the file that came with "
                       "the tokenizer") from None
    if not isinstance(value, dict):
        raise BadInput(f"{path} must hold a JSON object")
    return value


def token_text(value):
    """tokenizer_config.json writes a special token as its text or as {"content": text, ...}."""
    return value.get("content") if isinstance(value, dict) else value


def id_list(value) -> list:
    """eos_token_id as configs write it: an int, a list of ints, or null."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


class HFTokenizerFiles:
    """The tokenizer.json and what the files beside it say about BOS and stop tokens."""

    def __init__(self, path):
        path = Path(path)
        self.json_path = path / "tokenizer.json" if path.is_dir() else path
        if not self.json_path.is_file():
            raise BadInput(f"tokenizer {self.json_path} does not exist: pass --tokenizer_path "
                           "to the tokenizer.json that came with the checkpoint")
        folder = self.json_path.parent
        self.config = read_beside(folder, "config.json")  # only where generation_config is not
        self.generation = read_beside(folder, "generation_config.json")
        self.tokenizer_config = read_beside(folder, "tokenizer_config.json")

    def bos_ids(self, token_to_id) -> list:
        """BOS in order of authority: tokenizer_config's bos_token, then the configs' ids.
        Qwen2.5 names none in tokenizer_config: its configs give <|endoftext|>, which Qwen
        places between documents."""
        text = token_text(self.tokenizer_config.get("bos_token"))
        named = [token_to_id(text)] if isinstance(text, str) and \
            token_to_id(text) is not None else []
        return named + id_list(self.generation_setting("bos_token_id"))

    def eos_ids(self, token_to_id) -> list:
        """Every end a model was trained to emit: tokenizer_config's eos_token first (the EOS
        the tokenizer itself appends: <|eot_id|> in Llama 3 Instruct, <|end_of_text|> in the
        base model), then generation_config's eos_token_id (Llama 3.1 Instruct:
        <|end_of_text|>, <|eom_id|>, <|eot_id|>) and config.json's."""
        text = token_text(self.tokenizer_config.get("eos_token"))
        named = [token_to_id(text)] if isinstance(text, str) and \
            token_to_id(text) is not None else []
        ids = named + id_list(self.generation_setting("eos_token_id"))
        return list(dict.fromkeys(ids))  # in order, each once

    def generation_setting(self, key: str):
        """As transformers generates: from generation_config.json where there is one, else
        from config.json (which is what it then derives a generation config from)."""
        return (self.generation if self.generation else self.config).get(key)


class HFTokenizer:
    """A tokenizer.json through the tokenizers library, with the sentencepiece Tokenizer's
    interface. Special tokens written in the text ("<|eot_id|>") encode as their single id."""

    def __init__(self, path):
        files = HFTokenizerFiles(path)
        tokenizers = import_tokenizers(files.json_path)
        try:
            self.hf = tokenizers.Tokenizer.from_file(str(files.json_path))
        except Exception as error:  # the library raises plain Exceptions for a bad file
            raise BadInput(f"tokenizer {files.json_path} is not a Hugging Face tokenizer.json "
                           f"({str(error).splitlines()[0][:200]}): pass the tokenizer.json that "
                           "came with the checkpoint") from None
        self.path = str(files.json_path)
        # The highest id + 1: the ids the tokenizer can make (Qwen2.5's embedding has more rows).
        self.n_words = max(self.hf.get_vocab(with_added_tokens=True).values()) + 1
        bos, eos = files.bos_ids(self.hf.token_to_id), files.eos_ids(self.hf.token_to_id)
        for what, ids, where in (("BOS", bos, "bos_token"), ("EOS", eos, "eos_token")):
            if not ids or not all(0 <= i < self.n_words for i in ids):
                raise BadInput(f"tokenizer {self.path}: no {what} token the tokenizer has (ids "
                               f"{ids}) in {', '.join(SPECIAL_FILES)} or config.json beside it: "
                               f"copy those files of the checkpoint beside it (they name its "
                               f"{where})")
        self.bos_id, self.eos_id = bos[0], eos[0]
        self.pad_id = self.eos_id  # any id works: padding is never read (see tokenizer.py)
        self.stop_ids = tuple(eos)

    def encode(self, text: str, bos: bool, eos: bool) -> list:
        check_text(text)
        # add_special_tokens=False: BOS/EOS are ours to add (Llama 3's post-processor would
        # prepend <|begin_of_text|> again); added tokens in the text still match as single ids.
        ids = self.hf.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        # Special tokens are left out of the text, as sentencepiece leaves out BOS and EOS.
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def check_matches(self, vocab_size: int):
        """Refuse a tokenizer that makes ids the model's embedding table lacks; a table with
        more rows than the tokenizer has ids is fine (Qwen2.5 pads 151665 ids to 151936)."""
        if self.n_words > vocab_size:
            raise BadInput(f"tokenizer {self.path} makes ids up to {self.n_words - 1} but the "
                           f"model's vocabulary has {vocab_size}: pass the tokenizer that "
                           "matches the checkpoint (--tokenizer_path)")


def tokenizer_files_to_copy(path) -> list:
    """(source, name in the destination) of a tokenizer and the files that go with it: a split
    or a conversion carries them, so that BOS and stop tokens stay known there."""
    path = Path(path)
    if not is_hf_tokenizer(path):
        return [(path, "tokenizer.model")]
    json_path = path / "tokenizer.json" if path.is_dir() else path
    beside = [json_path.parent / name for name in SPECIAL_FILES]
    return [(json_path, "tokenizer.json")] + [(p, p.name) for p in beside if os.path.isfile(p)]


def derived_generation_config(path):
    """The BOS/EOS ids of config.json as a generation_config.json, for a tokenizer.json that
    has config.json beside it but no generation_config.json (None otherwise): a split or a
    conversion does not carry config.json, so it writes this instead."""
    files = HFTokenizerFiles(path)
    if files.generation or not files.config:
        return None
    ids = {k: files.config[k] for k in ("bos_token_id", "eos_token_id") if k in files.config}
    return ids or None

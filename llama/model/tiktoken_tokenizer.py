"""Meta's Llama 3 tokenizer.model: byte-level BPE ranks in tiktoken's format, one
'base64-of-the-token rank' line per token, read with the optional tiktoken library.

The same interface as the sentencepiece Tokenizer (llama/model/tokenizer.py): Tokenizer(path)
gives this class when the file is in this format. Meta's release adds 256 special tokens after
the ranks (<|begin_of_text|> = BOS, <|end_of_text|> = EOS, the chat headers, <|eot_id|> ...);
written in a text they encode as single ids, as Hugging Face's tokenizer.json of the same model
does.
"""
import base64
import re

from llama.errors import BadInput
from llama.model.text import check_text

INSTALL = 'pip install -e ".[tiktoken]"'
# How Llama 3 splits text into pieces before BPE (Meta's tokenizer.py; tiktoken's cl100k_base
# pattern): contractions, letters, 1-3 digits, punctuation, newlines, spaces.
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
           r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Meta's Llama 3.1+ names of the first special tokens; the rest are reserved_special_token_N.
NAMED_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                  "<|python_tag|>"]
N_SPECIALS = 256
RANK_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} \d+")


def is_tiktoken_file(path) -> bool:
    """The first line is 'base64 rank' (a sentencepiece model is a binary protobuf)."""
    try:
        with open(path, "rb") as file:
            first = file.readline(4096).strip()
    except OSError:
        return False
    return bool(RANK_LINE.fullmatch(first))


def special_tokens(n_ranks: int) -> dict:
    names = NAMED_SPECIALS + [f"<|reserved_special_token_{2 + i}|>"
                              for i in range(N_SPECIALS - len(NAMED_SPECIALS))]
    return {name: n_ranks + i for i, name in enumerate(names)}


def read_ranks(path) -> dict:
    ranks = {}
    with open(path, "rb") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            if not RANK_LINE.fullmatch(line.strip()):
                raise BadInput(f"tokenizer {path} line {number} is not 'base64-token rank': pass "
                               "the tokenizer.model that came with the checkpoint")
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


class TiktokenTokenizer:
    def __init__(self, path):
        try:
            import tiktoken
        except ImportError:
            raise BadInput(f"tokenizer {path} is Llama 3's tiktoken format, which needs the "
                           f"optional tiktoken library: {INSTALL}") from None
        ranks = read_ranks(path)
        self.specials = special_tokens(len(ranks))
        self.encoding = tiktoken.Encoding(name=str(path), pat_str=PATTERN,
                                          mergeable_ranks=ranks, special_tokens=self.specials)
        self.path, self.n_ranks = str(path), len(ranks)
        self.n_words = len(ranks) + N_SPECIALS
        self.bos_id = self.specials["<|begin_of_text|>"]
        self.eos_id = self.specials["<|end_of_text|>"]
        self.pad_id = self.eos_id  # never read (see llama/model/tokenizer.py)
        # a text ends with EOS; an instruct model's turn with <|eot_id|> (<|eom_id|>: a tool call)
        self.stop_ids = (self.eos_id, self.specials["<|eot_id|>"], self.specials["<|eom_id|>"])

    def encode(self, text: str, bos: bool, eos: bool) -> list:
        check_text(text)
        ids = self.encoding.encode(text, allowed_special="all")
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        """The text of the ids, special tokens left out (as the other tokenizers do)."""
        return self.encoding.decode([int(i) for i in ids if 0 <= int(i) < self.n_ranks])

    def check_matches(self, vocab_size: int):
        if self.n_words > vocab_size:
            raise BadInput(f"tokenizer {self.path} makes ids up to {self.n_words - 1} but the "
                           f"model's vocabulary has {vocab_size}: pass the tokenizer that matches "
                           "the checkpoint (--tokenizer_path)")

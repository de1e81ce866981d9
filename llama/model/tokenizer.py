"""SentencePiece tokenizer wrapper: text <-> ids with explicit BOS/EOS handling.

Tokenizer(path) of a Hugging Face tokenizer.json (Llama 3, Qwen2.5, SmolLM2) gives an
HFTokenizer (llama/model/hf_tokenizer.py), of Meta's Llama 3 tokenizer.model (tiktoken's
format) a TiktokenTokenizer (llama/model/tiktoken_tokenizer.py), each with the same interface;
sentencepiece stays for LLaMA 1/2 and TinyLlama.
"""
import os

from sentencepiece import SentencePieceProcessor

from llama.errors import BadInput
from llama.model.hf_tokenizer import HFTokenizer, is_hf_tokenizer
from llama.model.tiktoken_tokenizer import TiktokenTokenizer, is_tiktoken_file
from llama.model.text import check_text


class Tokenizer:
    """Tokenizer(path): sentencepiece for a tokenizer.model, HFTokenizer for a tokenizer.json."""

    def __new__(cls, model_path: str = None):  # None: unpickling and copying call it bare
        if cls is Tokenizer and model_path is not None and is_hf_tokenizer(model_path):
            return HFTokenizer(model_path)  # imports the optional tokenizers library
        if cls is Tokenizer and model_path is not None and is_tiktoken_file(model_path):
            return TiktokenTokenizer(model_path)  # Meta's Llama 3: the optional tiktoken library
        return super().__new__(cls)

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise BadInput(f"tokenizer {model_path} does not exist: pass --tokenizer_path to a "
                           "sentencepiece tokenizer.model or a Hugging Face tokenizer.json")
        self.sp = SentencePieceProcessor()
        try:
            self.sp.Load(model_path)
        except (RuntimeError, OSError, ValueError) as error:  # ValueError: undecodable text
            raise BadInput(f"tokenizer {model_path} is not a sentencepiece model ({error}); "
                           "pass the tokenizer.model that came with the checkpoint") from None
        self.path = model_path
        self.n_words = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        if not (0 <= self.bos_id < self.n_words and 0 <= self.eos_id < self.n_words):
            raise BadInput(f"tokenizer {model_path} has no BOS or EOS piece (ids {self.bos_id}, "
                           f"{self.eos_id}), which LLaMA needs: pass the tokenizer.model that "
                           "came with the checkpoint")
        # LLaMA's tokenizer has no pad piece (pad_id() is -1); padding uses a value the loss and
        # attention never read, so any id works; EOS keeps embeddings lookups in range.
        self.pad_id = self.eos_id
        # Generation stops at either: LLaMA ends a text with EOS, llama2.c's story models
        # (stories260K) with the BOS of the next story.
        self.stop_ids = (self.eos_id, self.bos_id)

    def encode(self, text: str, bos: bool, eos: bool) -> list:
        check_text(text)
        ids = self.sp.EncodeAsIds(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])

    def check_matches(self, vocab_size: int):
        """Refuse a tokenizer whose vocabulary differs from the model's embedding table."""
        if self.n_words != vocab_size:
            raise BadInput(f"tokenizer {self.path} has {self.n_words} pieces but the model's "
                           f"vocabulary has {vocab_size}: pass the tokenizer that matches the "
                           "checkpoint (--tokenizer_path)")

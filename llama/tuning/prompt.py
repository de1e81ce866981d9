"""The soft prompt: n_virtual_tokens trainable fp32 vectors prepended to the token embeddings.

Initialised from text, from sampled vocabulary rows, or randomly at the scale of the real
embeddings. Its files are every method's (llama/tuning/files.py, llama/tuning/peft.py).
"""
import math

import torch
from torch import nn

from llama.errors import BadInput

INITS = ("text", "vocab", "random")


class SoftPrompt(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().clone())  # the only trained tensor

    @property
    def n_virtual_tokens(self) -> int:
        return self.weight.shape[0]

    def prepend(self, h):
        """(B, T, dim) token embeddings -> (B, n_virtual + T, dim), the prompt cast to h's dtype."""
        prompt = self.weight.to(h.dtype).unsqueeze(0).expand(h.shape[0], -1, -1)
        return torch.cat([prompt, h], dim=1)


def init_prompt_weight(init: str, n_virtual_tokens: int, embedding_weight, tokenizer=None,
                       text: str = "", seed: int = 0):
    """Starting vectors (n_virtual_tokens, dim) in float32.

    text: the embeddings of the text's tokens, repeated to fill (PEFT's TEXT init). vocab: rows
    of randomly chosen vocabulary entries. random: a normal draw with the real embeddings' own
    standard deviation (N(0, 1) would be tens of times larger than any real token).
    """
    embeddings = embedding_weight.detach().float()
    vocab_size = embeddings.shape[0]
    generator = torch.Generator().manual_seed(seed)
    if init == "text":
        if tokenizer is None or not text:
            raise BadInput("--init text needs --init_text (a non-empty string) and a tokenizer")
        ids = tokenizer.encode(text, bos=False, eos=False)
        if not ids:
            raise BadInput(f"--init_text {text!r} has no tokens (the tokenizer reads nothing in "
                           "it): give a few words, or use --init vocab or --init random")
        ids = (ids * math.ceil(n_virtual_tokens / len(ids)))[:n_virtual_tokens]
        return embeddings[torch.tensor(ids, device=embeddings.device)].cpu().clone()
    if init == "vocab":
        # Skip the special and byte-fallback pieces at the start of LLaMA-style vocabularies.
        low = 259 if vocab_size > 1000 else 3
        ids = torch.randint(low, vocab_size, (n_virtual_tokens,), generator=generator)
        return embeddings[ids.to(embeddings.device)].cpu().clone()
    if init == "random":
        std = float(embeddings.std())
        return torch.randn(n_virtual_tokens, embeddings.shape[1], generator=generator) * std
    raise BadInput(f"--init {init!r} must be one of {', '.join(INITS)}")

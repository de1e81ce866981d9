"""The LLaMA transformer, built for all layers or for one pipeline stage's range of them.

Plain PyTorch: nothing here knows devices, ranks or files. A stage built for layers [a, b) keeps
its blocks under their global index, so its state-dict keys (`layers.17.attention.wq.weight`)
are the full model's and a stage file loads with strict key checking.
"""
import hashlib
import json
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from llama.model.rotary import apply_rotary, rotary_tables


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # fewer than n_heads means grouped-query attention
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    hidden_dim: Optional[int] = None  # llama2.c stores the FFN width; Meta derives it (below)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    # Rotary scaling for long contexts (llama/model/rotary.py): None, or e.g. {"rope_type":
    # "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    # "original_max_position_embeddings": 8192} (Llama 3.1/3.2) or {"rope_type": "linear", ...}
    rope_scaling: Optional[dict] = None
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2, Qwen2.5)
    sliding_window: Optional[int] = None  # each query sees the last this many keys (Mistral)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            self.hidden_dim = meta_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """SwiGLU width as Meta computes it: 2/3 of 4*dim, scaled, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# Fields added after digests were first stored: at these defaults they leave the digest as it
# was, so prompts and splits made for a plain LLaMA before still load.
LATER_FIELDS = {"rope_scaling": None, "qkv_bias": False, "sliding_window": None}


def params_digest(args: ModelArgs) -> str:
    """A short fingerprint of the model's shape, stored with prompts to refuse a wrong model.

    max_seq_len is left out: it is a runtime limit, not part of the weights.
    """
    params = {k: v for k, v in args_to_params(args).items() if k != "max_seq_len"
              and not (k in LATER_FIELDS and v == LATER_FIELDS[k])}
    text = json.dumps(params, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def args_to_params(args: ModelArgs) -> dict:
    return {k: getattr(args, k) for k in ModelArgs.__dataclass_fields__}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in float32 even when x is fp16: the mean of squares overflows fp16.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class KVCache:
    """Keys and values of one attention layer for every position generated so far."""

    def __init__(self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype, device):
        shape = (batch_size, max_seq_len, n_kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)

    def row(self, index: int) -> "KVCache":
        """A cache of one row that writes into this one (views, no copy): a row runs alone."""
        return self.view(self.keys[index:index + 1], self.values[index:index + 1])

    def narrow(self, length: int) -> "KVCache":
        """The first length positions of every row (views): attention looks no further."""
        return self.view(self.keys[:, :length], self.values[:, :length])

    @staticmethod
    def view(keys, values) -> "KVCache":
        view = KVCache.__new__(KVCache)
        view.keys, view.values = keys, values
        return view

    def update(self, start_pos, keys, values):
        """Store keys/values (B, T, kv_heads, hd) at start_pos; return all up to start_pos + T.

        With start_pos a device tensor (one start per row, or one for all) every shape stays
        fixed (what a CUDA graph needs, and what rows at different positions need): the write is
        an in-place indexed copy and the whole cache comes back; a mask hides the rest.
        """
        B, T = keys.shape[:2]
        if torch.is_tensor(start_pos):
            positions = (start_pos[:, None] + torch.arange(T, device=keys.device)).expand(B, T)
            rows = torch.arange(B, device=keys.device)[:, None].expand(B, T)
            self.keys[rows, positions] = keys
            self.values[rows, positions] = values
            return self.keys[:B], self.values[:B]
        self.keys[:B, start_pos:start_pos + T] = keys
        self.values[:B, start_pos:start_pos + T] = values
        return self.keys[:B, :start_pos + T], self.values[:B, :start_pos + T]

    def keep_rows(self, rows, length: int = None):
        """Move the given batch rows (a list of indices) to the front, in that order. In place:
        a captured CUDA graph keeps reading the same memory. length: only the first positions
        hold anything yet (the rest is masked until written), so only they are moved."""
        index = torch.tensor(rows, dtype=torch.long, device=self.keys.device)
        length = self.keys.shape[1] if length is None else length
        self.keys[:len(rows), :length] = self.keys[index, :length]
        self.values[:len(rows), :length] = self.values[index, :length]


def causal_mask(n_queries: int, n_keys: int, device, start_pos=None, window=None):
    """Boolean mask: query t, at position start_pos + t, sees keys up to its own position
    (and, with a sliding window, only the last `window` of them, its own included).

    start_pos defaults to S - T (the keys end with the queries): a (T, S) mask. A device tensor
    (one start per row, or one for all) for the static cache, whose S is its whole length:
    (B|1, 1, T, S), one mask per row, shared by the heads.
    """
    key_pos = torch.arange(n_keys, device=device)
    if torch.is_tensor(start_pos):
        query_pos = start_pos[:, None] + torch.arange(n_queries, device=device)  # (B|1, T)
        visible = key_pos <= query_pos[..., None]  # (B|1, T, S)
        if window is not None:
            visible &= key_pos > query_pos[..., None] - window
        return visible.unsqueeze(1)
    offset = n_keys - n_queries if start_pos is None else start_pos
    query_pos = torch.arange(n_queries, device=device) + offset
    visible = key_pos[None, :] <= query_pos[:, None]
    if window is not None:
        visible &= key_pos[None, :] > query_pos[:, None] - window
    return visible


def attention_mask(n_queries: int, n_keys: int, device, start_pos, window=None):
    """(mask, is_causal) for scaled_dot_product_attention.

    Without earlier positions the plain causal flag does it (and picks the fast kernels); one
    new query sees every cached key; a chunk after a prefix needs the offset mask. A device-side
    start_pos means the whole static cache came back: always masked. A sliding window needs a
    mask only once there are more keys than it spans.
    """
    static = torch.is_tensor(start_pos)
    if static or (window is not None and n_keys > window):
        return causal_mask(n_queries, n_keys, device, start_pos if static else None, window), \
            False
    if n_queries == 1:
        return None, False
    if n_keys == n_queries:
        return None, True
    return causal_mask(n_queries, n_keys, device), False


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.window = args.sliding_window
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.wqkv: Optional[nn.Linear] = None  # wq, wk, wv as one matrix (llama/model/fused.py)
        self.cache: Optional[KVCache] = None  # set by Transformer.setup_kv_cache for generation
        # Optional keys/values every query sees before the text (prefix tuning): a function
        # returning ((P, kv_heads, hd) keys, values), or None. With a cache they sit in its
        # first P positions instead (written there by whoever set the prefix).
        self.prefix = None

    def project_qkv(self, x):
        """(q, k, v) of x: three matrix products, or one once the projections are fused."""
        if self.wqkv is None:
            return self.wq(x), self.wk(x), self.wv(x)
        kv_width = self.n_kv_heads * self.head_dim
        return self.wqkv(x).split([self.n_heads * self.head_dim, kv_width, kv_width], dim=-1)

    def forward(self, x, turns, start_pos):
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.reshape(B, T, self.n_heads, self.head_dim)
        k = k.reshape(B, T, self.n_kv_heads, self.head_dim)
        v = v.reshape(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary(q, turns), apply_rotary(k, turns)
        if self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)  # (B, start_pos + T, kv_heads, hd)
        elif self.prefix is not None and (prefix := self.prefix()) is not None:
            k, v = (torch.cat([p.to(x.dtype).expand(B, -1, -1, -1), t], dim=1)
                    for p, t in zip(prefix, (k, v)))  # (B, P + T, kv_heads, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T|S, hd)
        mask, is_causal = attention_mask(T, k.shape[2], x.device, start_pos, self.window)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                             enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w13: Optional[nn.Linear] = None  # w1 and w3 as one matrix (llama/model/fused.py)

    def forward(self, x):
        if self.w13 is None:
            gate, up = self.w1(x), self.w3(x)
        else:
            gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)

    def forward(self, x, turns, start_pos):
        h = x + self.attention(self.attention_norm(x), turns, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """All of LLaMA, or the part of it one pipeline stage owns.

    layer_range=(a, b) builds blocks a..b-1; `embeddings` adds the token embedding table (the
    first stage), `head` the final norm and output projection (the last stage).
    """

    def __init__(self, args: ModelArgs, layer_range=None, embeddings: bool = True,
                 head: bool = True):
        super().__init__()
        self.args = args
        first, last = layer_range if layer_range is not None else (0, args.n_layers)
        if not 0 <= first < last <= args.n_layers:
            raise ValueError(f"layer range {first}..{last} is outside 0..{args.n_layers}")
        self.layer_range = (first, last)
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim) if embeddings else None
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args) for i in range(first, last)})
        self.norm = RMSNorm(args.dim, args.norm_eps) if head else None
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False) if head else None
        self.turns = None  # rotary_tables from position 0, made on first use (not saved)
        # (rank, count): which tensor-parallel shard of every block this holds (all: (0, 1));
        # llama/model/tensor_shards.py cuts the blocks and sets it
        self.tp_shard = (0, 1)

    @property
    def has_embeddings(self) -> bool:
        return self.tok_embeddings is not None

    @property
    def has_head(self) -> bool:
        return self.output is not None

    def embed(self, tokens):
        """(B, T) token ids -> (B, T, dim) hidden states."""
        return self.tok_embeddings(tokens)

    def run_layers(self, h, start_pos=0):
        """Pass hidden states (B, T, dim) at positions start_pos.. through this stage's blocks.

        start_pos: an int, or a device tensor of one start per row (or one for all), for rows at
        different positions and for the static KV cache (fixed shapes).
        """
        turns = self.rotary_turns(start_pos, h.shape[1], h.device)
        for block in self.layers.values():
            h = block(h, turns, start_pos)
        return h

    def rotary_turns(self, start_pos, length: int, device):
        """The rotary turns of positions start_pos.., cut from one table made once (rotary_tables
        from 0: the same numbers), rather than made again at every step. A device start_pos
        reads it by index, with no host value: the table then spans max_seq_len."""
        end = self.args.max_seq_len if torch.is_tensor(start_pos) else start_pos + length
        if self.turns is None or self.turns.device != torch.device(device) or \
                len(self.turns) < end:
            # room to grow: a decode step asks for one position more each time
            size = max(end, min(self.args.max_seq_len, 2 * end))
            self.turns = rotary_tables(self.args.head_dim, self.args.rope_theta, 0, size, device,
                                       self.args.rope_scaling)
        if torch.is_tensor(start_pos):
            return self.turns[start_pos[:, None] + torch.arange(length, device=device)]
        return self.turns[start_pos:end]

    def logits(self, h):
        """Final norm and output projection: (..., dim) -> (..., vocab)."""
        return self.output(self.norm(h))

    def forward(self, x, start_pos: int = 0):
        """Token ids (first stage) or hidden states (others) -> logits (last) or hidden states."""
        h = self.embed(x) if self.has_embeddings else x
        h = self.run_layers(h, start_pos)
        return self.logits(h) if self.has_head else h

    def setup_kv_cache(self, batch_size: int, max_seq_len: int):
        # the activations' dtype: a norm's gain is float even when the linears hold packed codes
        weight = next(iter(self.layers.values())).attention_norm.weight
        for block in self.layers.values():  # the kv heads this (TP shard of the) block holds
            block.attention.cache = KVCache(batch_size, max_seq_len, block.attention.n_kv_heads,
                                            self.args.head_dim, weight.dtype, weight.device)

    def keep_cache_rows(self, rows):
        """Drop the cache rows of sequences that have finished (rows: the indices kept)."""
        for block in self.layers.values():
            block.attention.cache.keep_rows(rows)

    def clear_kv_cache(self):
        for block in self.layers.values():
            block.attention.cache = None

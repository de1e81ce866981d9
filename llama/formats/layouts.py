"""Readers and writers for the checkpoint layouts LLaMA weights come in.

Each reader is a TensorSource: the model's ModelArgs plus tensors by their Meta names, loaded one
at a time, so splitting a 7B model never holds two copies of it. Layouts: Meta (params.json +
consolidated.NN.pth shards), llama2.c legacy .bin, Hugging Face (config.json + safetensors/.bin).
"""
import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import torch

from llama.errors import BadInput
from llama.formats.files import atomic_torch_save, atomic_write_text
from llama.formats.tensor_files import read_json, safe_torch_load, state_dict_of_tensors
from llama.model.rotary import META_LLAMA3_SCALING, check_rope_scaling
from llama.model.transformer import ModelArgs

# Which dimension Meta's model-parallel shards cut: column-parallel layers split their output
# rows (dim 0), row-parallel layers their input columns (dim 1), the embedding its width (dim 1).
META_SHARD_DIM = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0,
                  "w3": 0, "wo": 1, "w2": 1}
# Tensors some checkpoints carry that the model recomputes instead of loading.
IGNORED_KEYS = {"rope.freqs"}


# Far beyond any LLaMA (405B: dim 16384, 126 layers, 128 heads): a value above these comes from
# a damaged or foreign file, and would otherwise overflow tensor sizes or take ages to build.
PARAM_LIMITS = {"dim": 1 << 20, "hidden_dim": 1 << 22, "n_layers": 1 << 12, "n_heads": 1 << 12,
                "n_kv_heads": 1 << 12, "vocab_size": 1 << 24, "multiple_of": 1 << 20,
                "max_seq_len": 1 << 24, "sliding_window": 1 << 24}


# Settings that are true or false (Qwen2's q/k/v biases).
FLAGS = {"qkv_bias"}


def model_args_from_dict(params: dict, source: str, **overrides) -> ModelArgs:
    """ModelArgs from a params.json dict, refusing missing keys and wrong types by name."""
    if not isinstance(params, dict):
        raise BadInput(f"{source} must hold a JSON object of model parameters")
    known = {f for f in ModelArgs.__dataclass_fields__}
    values = {"rope_scaling": meta_rope_scaling(params, source)}
    for key, value in {**params, **overrides}.items():
        if key not in known or key == "rope_scaling":
            continue
        if key in FLAGS:
            if value not in (True, False):
                raise BadInput(f"{source}: {key}={value!r} must be true or false")
            values[key] = bool(value)
            continue
        if value is None:
            values[key] = None
            continue
        wanted = int if key in PARAM_LIMITS else float
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (wanted is int and not (isinstance(value, int) or float(value).is_integer())) or \
                (wanted is float and not math.isfinite(value)):
            raise BadInput(f"{source}: {key}={value!r} must be {'an integer' if wanted is int else 'a finite number'}")
        if wanted is int and abs(value) > PARAM_LIMITS[key]:
            raise BadInput(f"{source}: {key}={value!r} is beyond any LLaMA (at most "
                           f"{PARAM_LIMITS[key]} here): the file is damaged or not this model's")
        values[key] = wanted(value)
    for key in ("dim", "n_layers", "n_heads"):
        if values.get(key) is None:
            raise BadInput(f"{source} lacks {key!r}: use the params.json that came with the weights")
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim",
                "max_seq_len", "multiple_of", "norm_eps", "rope_theta", "ffn_dim_multiplier",
                "sliding_window"):
        if values.get(key) is not None and values[key] <= 0:
            raise BadInput(f"{source}: {key}={values[key]} must be positive")
    if values["dim"] % values["n_heads"] or (values["dim"] // values["n_heads"]) % 2:
        raise BadInput(f"{source}: dim={values['dim']} is not n_heads={values['n_heads']} "
                       "heads of an even width")
    if values["n_heads"] % (values.get("n_kv_heads") or values["n_heads"]):
        raise BadInput(f"{source}: n_heads={values['n_heads']} is not a multiple of "
                       f"n_kv_heads={values['n_kv_heads']}")
    args = ModelArgs(**values)
    if args.hidden_dim > PARAM_LIMITS["hidden_dim"]:  # derived from ffn_dim_multiplier
        raise BadInput(f"{source}: the feed-forward width {args.hidden_dim} is beyond any LLaMA: "
                       "check ffn_dim_multiplier and multiple_of")
    return args


def meta_rope_scaling(params: dict, source: str):
    """rope_scaling as our own params.json writes it, or Meta's "use_scaled_rope": true (Llama
    3.1/3.2), which means llama3 scaling with Meta's defaults (factor 8 unless
    rope_scaling_factor, as later llama-models params.json files give, says otherwise)."""
    if params.get("rope_scaling") is not None:
        return check_rope_scaling(params["rope_scaling"], source)
    scaled = params.get("use_scaled_rope", False)
    if scaled not in (True, False):
        raise BadInput(f"{source}: use_scaled_rope={scaled!r} must be true or false")
    if not scaled:
        return None
    factor = params.get("rope_scaling_factor")
    return check_rope_scaling({**META_LLAMA3_SCALING, **({"factor": factor} if factor is not None
                                                         else {})}, source)


class TensorSource:
    """A checkpoint's ModelArgs and its tensors under Meta names, loaded on demand."""

    args: ModelArgs
    description: dict

    def names(self) -> list:
        raise NotImplementedError

    def load(self, name: str) -> torch.Tensor:
        raise NotImplementedError


class MetaSource(TensorSource):
    """params.json + consolidated.00.pth … (model-parallel shards merged tensor by tensor)."""

    def __init__(self, folder, **overrides):
        folder = Path(folder)
        self.shard_paths = sorted(folder.glob("consolidated.*.pth"))
        if not self.shard_paths:
            raise BadInput(f"{folder} has no consolidated.NN.pth files")
        self.shards = [state_dict_of_tensors(safe_torch_load(p), p) for p in self.shard_paths]
        params = read_json(folder / "params.json")
        if not isinstance(params, dict):
            raise BadInput(f"{folder / 'params.json'} must hold a JSON object of model parameters")
        if params.get("vocab_size", -1) in (-1, None) and "tok_embeddings.weight" in self.shards[0]:
            params["vocab_size"] = self.shards[0]["tok_embeddings.weight"].shape[0]  # LLaMA 1 says -1
        self.args = model_args_from_dict(params, str(folder / "params.json"), **overrides)
        self.description = {"format": "meta", "path": folder.name, "shards": len(self.shards)}

    def names(self):
        return [k for k in self.shards[0] if k not in IGNORED_KEYS]

    def load(self, name):
        parts = [shard[name] for shard in self.shards]
        if len(parts) == 1 or (parts[0].dim() == 1 and not name.endswith(".bias")):
            return parts[0]  # one shard, or a norm weight that every shard repeats
        return torch.cat(parts, dim=META_SHARD_DIM[name.split(".")[-2]])


def owns_its_storage(tensor) -> bool:
    """torch.save writes a view's whole storage: only a tensor that is all of its storage (a
    merged tensor, one loaded from its own file) is saved without a copy."""
    return (tensor.is_contiguous() and tensor.storage_offset() == 0 and
            tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size())


def save_meta(tensors: dict, args: ModelArgs, folder, n_shards: int = 1):
    """Write the Meta layout, cutting each tensor along Meta's model-parallel dimension."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(n_shards):
        part = {}
        for name, tensor in tensors.items():
            if tensor.dim() > 1 or name.endswith(".bias"):  # a bias is cut as its rows are
                tensor = tensor.chunk(n_shards, dim=META_SHARD_DIM[name.split(".")[-2]])[shard]
            part[name] = tensor if owns_its_storage(tensor) else tensor.clone()
        atomic_torch_save(part, folder / f"consolidated.{shard:02d}.pth")
    params = {k: getattr(args, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                                             "multiple_of", "ffn_dim_multiplier", "norm_eps",
                                             "rope_theta", "hidden_dim", "max_seq_len")}
    if args.qkv_bias:
        params["qkv_bias"] = True  # not Meta's: our own name for Qwen2's biases
    if args.sliding_window is not None:
        params["sliding_window"] = args.sliding_window  # Mistral's (Meta's files have none)
    if args.rope_scaling is not None:
        params["rope_scaling"] = args.rope_scaling
        if args.rope_scaling["rope_type"] == "llama3":  # what Meta's own code reads
            params.update(use_scaled_rope=True, rope_scaling_factor=args.rope_scaling["factor"])
    atomic_write_text(folder / "params.json", json.dumps(params, indent=2))


class Llama2cSource(TensorSource):
    """llama2.c's legacy (version 0) export: a 7-int header, then float32 arrays by kind."""

    HEADER = struct.Struct("<7i")

    def __init__(self, path, **overrides):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            raw = f.read(self.HEADER.size)
        if len(raw) < self.HEADER.size:
            raise BadInput(f"{self.path} is too short to be a llama2.c checkpoint")
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = self.HEADER.unpack(raw)
        if dim == 0x616B3432:  # b"ak42": the newer versioned export
            raise BadInput(f"{self.path} is a versioned llama2.c export; export it with "
                           "--version 0 (legacy), or convert it to the Meta layout")
        if min(dim, hidden, n_layers, n_heads, n_kv, seq_len) <= 0 or vocab == 0 or dim % n_heads:
            raise BadInput(f"{self.path} has an impossible llama2.c header "
                           f"{(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len)}")
        self.shared_classifier = vocab > 0  # llama2.c marks an unshared classifier by negating
        self.args = ModelArgs(**{"dim": dim, "hidden_dim": hidden, "n_layers": n_layers,
                                 "n_heads": n_heads, "n_kv_heads": n_kv, "vocab_size": abs(vocab),
                                 "max_seq_len": seq_len, **overrides})
        # Checked before the layout is listed: a damaged header may claim a billion layers.
        expected = self.HEADER.size + 4 * self._count_floats(seq_len)
        if os.path.getsize(self.path) != expected:
            raise BadInput(f"{self.path} has {os.path.getsize(self.path)} bytes but its header "
                           f"implies {expected}: the file is truncated or not a llama2.c v0 export")
        self.offsets = self._layout(seq_len)
        self.floats = np.memmap(self.path, dtype="<f4", mode="r", offset=self.HEADER.size)
        self.description = {"format": "llama2c", "path": self.path.name}

    def _per_layer(self):
        """(kind, shape) of each array a layer has, in file order."""
        a = self.args
        kv_dim = a.n_kv_heads * a.head_dim
        return [("attention_norm", (a.dim,)), ("attention.wq", (a.dim, a.dim)),
                ("attention.wk", (kv_dim, a.dim)), ("attention.wv", (kv_dim, a.dim)),
                ("attention.wo", (a.dim, a.dim)), ("ffn_norm", (a.dim,)),
                ("feed_forward.w1", (a.hidden_dim, a.dim)),
                ("feed_forward.w2", (a.dim, a.hidden_dim)),
                ("feed_forward.w3", (a.hidden_dim, a.dim))]

    def _count_floats(self, seq_len) -> int:
        a = self.args
        layer = sum(math.prod(shape) for _, shape in self._per_layer())
        tables = 2 * seq_len * a.head_dim // 2
        classifier = 0 if self.shared_classifier else a.vocab_size * a.dim
        return a.vocab_size * a.dim + a.n_layers * layer + a.dim + tables + classifier

    def _layout(self, seq_len):
        """(name, offset in floats, shape) of every array, in file order."""
        a = self.args
        per_layer = self._per_layer()
        layout, offset = {}, 0

        def place(name, shape):
            nonlocal offset
            layout[name] = (offset, shape)
            offset += int(np.prod(shape))

        place("tok_embeddings.weight", (a.vocab_size, a.dim))
        for kind, shape in per_layer:  # grouped by kind across layers, not by layer
            for i in range(a.n_layers):
                place(f"layers.{i}.{kind}.weight", shape)
        place("norm.weight", (a.dim,))
        offset += 2 * seq_len * a.head_dim // 2  # the stored rotary tables; recomputed instead
        if not self.shared_classifier:
            place("output.weight", (a.vocab_size, a.dim))
        return layout

    def names(self):
        names = list(self.offsets)
        return names if not self.shared_classifier else names + ["output.weight"]

    def load(self, name):
        if name == "output.weight" and self.shared_classifier:
            name = "tok_embeddings.weight"  # tied: the classifier is the embedding table
        start, shape = self.offsets[name]
        values = np.array(self.floats[start:start + int(np.prod(shape))])
        return torch.from_numpy(values).view(shape)

"""Readers and writers for the checkpoint layouts LLaMA weights come in.

Each reader is a TensorSource: the model's ModelArgs plus tensors by their Meta names, loaded one
at a time, so splitting a 7B model never holds two copies of it. Layouts: Meta (params.json +
consolidated.NN.pth shards), llama2.c legacy .bin, Hugging Face (config.json + safetensors/.bin).
"""
import json
import math
import os
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import torch

from llama.errors import BadInput
from llama.files import atomic_torch_save, atomic_write, atomic_write_text
from llama.model import ModelArgs

# Which dimension Meta's model-parallel shards cut: column-parallel layers split their output
# rows (dim 0), row-parallel layers their input columns (dim 1), the embedding its width (dim 1).
META_SHARD_DIM = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0,
                  "w3": 0, "wo": 1, "w2": 1}
# Tensors some checkpoints carry that the model recomputes instead of loading.
IGNORED_KEYS = {"rope.freqs"}


def safe_torch_load(path, mmap=True):
    """torch.load of plain tensors only: a pickle that needs code to unpickle is refused, and a
    damaged file is a BadInput whatever torch's reader trips over inside it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        code = re.search(r"GLOBAL ([\w.]+)", str(error))
        if code:  # a crafted file, or a damaged one whose flipped bytes spell another name
            raise BadInput(f"{path} needs code to unpickle and was refused (it calls "
                           f"{code.group(1)}; only tensors, numbers and strings are loaded): the "
                           "file is corrupt or was made to run code; re-save it as a plain state "
                           "dict from a trusted copy") from None
        raise BadInput(f"{path} is corrupt or truncated ({unpickling_detail(error)}); download "
                       "or split it again") from None
    except RuntimeError as error:
        if mmap and "mmap" in str(error):
            return safe_torch_load(path, mmap=False)  # the legacy (non-zip) torch.save format
        detail = str(error).splitlines()[0].split(". This is an internal")[0]  # not torch's advice
        raise BadInput(f"{path} is corrupt or truncated ({detail}); download or split it "
                       "again") from None
    except Exception as error:  # EOFError, ValueError, IndexError, ...: the bytes are damaged
        raise BadInput(f"{path} is corrupt or truncated ({type(error).__name__}: {error}); "
                       "download or split it again") from None


def state_dict_of_tensors(state, path):
    """state, refused unless it is a dict of named tensors (what a checkpoint file holds)."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise BadInput(f"{path} is not a state dict of tensors: download the checkpoint again")
    return state


def unpickling_detail(error) -> str:
    """The line of torch's weights-only message that says what was wrong, not its advice."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = [line for line in lines if line.startswith("WeightsUnpickler error:")]
    return (detail or lines or [type(error).__name__])[0]


# Far beyond any LLaMA (405B: dim 16384, 126 layers, 128 heads): a value above these comes from
# a damaged or foreign file, and would otherwise overflow tensor sizes or take ages to build.
PARAM_LIMITS = {"dim": 1 << 20, "hidden_dim": 1 << 22, "n_layers": 1 << 12, "n_heads": 1 << 12,
                "n_kv_heads": 1 << 12, "vocab_size": 1 << 24, "multiple_of": 1 << 20,
                "max_seq_len": 1 << 24}


def model_args_from_dict(params: dict, source: str, **overrides) -> ModelArgs:
    """ModelArgs from a params.json dict, refusing missing keys and wrong types by name."""
    if not isinstance(params, dict):
        raise BadInput(f"{source} must hold a JSON object of model parameters")
    known = {f for f in ModelArgs.__dataclass_fields__}
    values = {}
    for key, value in {**params, **overrides}.items():
        if key not in known:
            continue  # e.g. Llama 3.1's use_scaled_rope: not a field this model has
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
                "max_seq_len", "multiple_of", "norm_eps", "rope_theta", "ffn_dim_multiplier"):
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


def read_json(path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise BadInput(f"{path} is missing") from None
    except ValueError as error:  # also UnicodeDecodeError, and integers of thousands of digits
        raise BadInput(f"{path} is not valid JSON ({error}); restore it from the checkpoint") from None
    except RecursionError:
        raise BadInput(f"{path} is not valid JSON (nested too deeply); restore it from the "
                       "checkpoint") from None


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
        if len(parts) == 1 or parts[0].dim() == 1:
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
            if tensor.dim() > 1:
                tensor = tensor.chunk(n_shards, dim=META_SHARD_DIM[name.split(".")[-2]])[shard]
            part[name] = tensor if owns_its_storage(tensor) else tensor.clone()
        atomic_torch_save(part, folder / f"consolidated.{shard:02d}.pth")
    params = {k: getattr(args, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                                             "multiple_of", "ffn_dim_multiplier", "norm_eps",
                                             "rope_theta", "hidden_dim", "max_seq_len")}
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


# Hugging Face Llama names -> Meta names (per layer, then the rest).
HF_LAYER_NAMES = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
                  "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
                  "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
                  "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
                  "post_attention_layernorm": "ffn_norm"}
HF_TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight",
                "model.norm.weight": "norm.weight", "lm_head.weight": "output.weight"}
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F64": torch.float64, "I64": torch.int64, "I32": torch.int32}


def hf_to_meta_name(hf_name: str):
    """'model.layers.3.self_attn.q_proj.weight' -> 'layers.3.attention.wq.weight' (None: not ours)."""
    if hf_name in HF_TOP_NAMES:
        return HF_TOP_NAMES[hf_name]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", hf_name)
    if match and match.group(2) in HF_LAYER_NAMES:
        return f"layers.{match.group(1)}.{HF_LAYER_NAMES[match.group(2)]}.weight"
    return None


def meta_to_hf_name(meta_name: str):
    top = {meta: hf for hf, meta in HF_TOP_NAMES.items()}
    if meta_name in top:
        return top[meta_name]
    layer_names = {meta: hf for hf, meta in HF_LAYER_NAMES.items()}
    _, index, inner = meta_name.split(".", 2)
    return f"model.layers.{index}.{layer_names[inner[:-len('.weight')]]}.weight"


def rotate_half_to_interleaved(weight, n_heads: int):
    """Undo HF's q/k row permutation: per head, rows [evens..., odds...] back to pairs."""
    rows, cols = weight.shape
    return weight.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def interleaved_to_rotate_half(weight, n_heads: int):
    """HF's permutation of q/k rows, used by its Meta->HF conversion (and our writer)."""
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def read_safetensors_header(path):
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise BadInput(f"{path} is too short to be a safetensors file")
        (length,) = struct.unpack("<Q", raw)
        if length > 100_000_000 or length + 8 > os.path.getsize(path):
            raise BadInput(f"{path} has a corrupt safetensors header (length {length})")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise BadInput(f"{path} has a corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise BadInput(f"{path} has a corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_bytes = os.path.getsize(path) - 8 - length
    for name, entry in header.items():
        check_safetensor_entry(path, name, entry, data_bytes)
    return 8 + length, header


def check_safetensor_entry(path, name, entry, data_bytes: int):
    """Refuse a header entry whose dtype, shape or byte range cannot describe a tensor there."""
    def is_count(value):
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    fields = entry if isinstance(entry, dict) else {}
    dtype, shape, offsets = fields.get("dtype"), fields.get("shape"), fields.get("data_offsets")
    if not (isinstance(dtype, str) and isinstance(shape, list) and all(map(is_count, shape))
            and isinstance(offsets, list) and len(offsets) == 2 and all(map(is_count, offsets))
            and offsets[0] <= offsets[1] <= data_bytes):
        raise BadInput(f"{path} has a corrupt safetensors header: the entry of {name!r} is "
                       f"{str(entry)[:120]}; download the file again")
    if dtype not in SAFETENSORS_DTYPES:
        raise BadInput(f"{path}: tensor {name!r} has dtype {dtype}, which is not supported")
    itemsize = SAFETENSORS_DTYPES[dtype].itemsize
    if math.prod(shape) * itemsize != offsets[1] - offsets[0]:
        raise BadInput(f"{path} has a corrupt safetensors header: {name!r} of shape {shape} "
                       f"({dtype}) cannot fill bytes {offsets[0]}..{offsets[1]}; download the "
                       "file again")


def read_safetensor(path, data_start: int, entry: dict):
    """One tensor, its entry already checked by read_safetensors_header."""
    dtype = SAFETENSORS_DTYPES[entry["dtype"]]
    begin, end = entry["data_offsets"]
    with open(path, "rb") as f:
        f.seek(data_start + begin)
        raw = bytearray(f.read(end - begin))
    if len(raw) != end - begin:
        raise BadInput(f"{path} is truncated: download it again")
    return torch.frombuffer(raw, dtype=dtype).reshape(entry["shape"]) if raw else \
        torch.empty(entry["shape"], dtype=dtype)


CANNOT_RUN_HERE = "this model does not implement it, so the checkpoint cannot be run here"


def refuse_hf_settings_not_implemented(config: dict, where: str):
    """Refuse, by name, a LlamaConfig setting that would change the numbers this model computes
    (pretraining_tp is not one: it only slices the same matmuls)."""
    if config.get("attention_bias") is True:
        raise BadInput(f"{where}: attention_bias=True (biases on q/k/v/o): {CANNOT_RUN_HERE}")
    if config.get("mlp_bias") is True:
        raise BadInput(f"{where}: mlp_bias=True (biases in the feed-forward): {CANNOT_RUN_HERE}")
    if config.get("hidden_act", "silu") not in ("silu", "swish"):  # transformers: the same act
        raise BadInput(f"{where}: hidden_act={config['hidden_act']!r}; this model uses silu "
                       f"(SwiGLU): {CANNOT_RUN_HERE}")
    head_dim, dim, n_heads = (config.get(k) for k in ("head_dim", "hidden_size",
                                                      "num_attention_heads"))
    if head_dim is not None and all(type(v) is int and v > 0 for v in (dim, n_heads)) and \
            head_dim != dim // n_heads:
        raise BadInput(f"{where}: head_dim={head_dim!r} differs from hidden_size/"
                       f"num_attention_heads={dim // n_heads}: {CANNOT_RUN_HERE}")


def hf_rope_theta(config: dict, where: str) -> float:
    """rope_theta wherever transformers put it: at the top (4.x), in rope_parameters (5.x, maybe
    one dict per layer type) or in rope_scaling. Any rope type but 'default' is refused by name."""
    thetas = {"at the top": config.get("rope_theta")}
    factors = [config.get("partial_rotary_factor")]
    for key in ("rope_parameters", "rope_scaling"):
        rope = config.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise BadInput(f"{where}: {key}={rope!r} must be a JSON object or null")
        if rope and all(isinstance(v, dict) for v in rope.values()):  # per layer type
            kinds = list(rope.values())
            if any(kind != kinds[0] for kind in kinds):
                raise BadInput(f"{where}: {key} differ between layer types ({', '.join(rope)}); "
                               f"{CANNOT_RUN_HERE}")
            rope = kinds[0]
        rope_type = rope.get("rope_type", rope.get("type"))
        if rope_type not in (None, "default"):
            raise BadInput(f"{where}: {key} has rope type {rope_type!r}, which this model does "
                           f"not implement (only 'default' rope, unscaled), so the checkpoint "
                           "cannot be run here")
        thetas[f"in {key}"] = rope.get("rope_theta")
        factors.append(rope.get("partial_rotary_factor"))
    for factor in factors:
        if factor not in (None, 1, 1.0):
            raise BadInput(f"{where}: partial_rotary_factor={factor!r} (rope on part of each "
                           f"head): {CANNOT_RUN_HERE}")
    given = {place: theta for place, theta in thetas.items() if theta is not None}
    if any(theta != next(iter(given.values())) for theta in given.values()):
        raise BadInput(f"{where}: " + " but ".join(f"rope_theta={theta!r} {place}"
                                                    for place, theta in given.items())
                       + ": keep one value (transformers 5 reads the one in rope_parameters)")
    return next(iter(given.values()), 10000.0)


# Older transformers saved rotary's inverse frequencies as a buffer: they follow from
# rope_theta, which config.json gives, so they carry no weight of their own.
HF_DERIVED_BUFFER = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
HF_LLAMA = {"model_type": "llama", "architectures": "LlamaForCausalLM"}


def refuse_other_architectures(config: dict, where: str):
    """Refuse, by name, a checkpoint of another architecture: a Qwen2 or Mistral folder looks
    like a LLaMA's, but its config lacks the settings (Qwen2's biases are implied by its
    model_type) that would tell the rest of this reader that it computes something else."""
    model_type, architectures = config.get("model_type"), config.get("architectures")
    if model_type is not None and model_type != HF_LLAMA["model_type"]:
        raise BadInput(f"{where}: model_type={model_type!r} is not a LLaMA (only model_type "
                       f"'llama', {HF_LLAMA['architectures']}): {CANNOT_RUN_HERE}")
    if architectures is not None and architectures != [HF_LLAMA["architectures"]]:
        raise BadInput(f"{where}: architectures={architectures!r} is not a LLaMA (only "
                       f"['{HF_LLAMA['architectures']}'], model_type 'llama'): {CANNOT_RUN_HERE}")


class HFSource(TensorSource):
    """config.json + model*.safetensors or pytorch_model*.bin, read without transformers."""

    def __init__(self, folder, **overrides):
        folder = Path(folder)
        config = read_json(folder / "config.json")
        if not isinstance(config, dict):
            raise BadInput(f"{folder / 'config.json'} must hold a JSON object (a Hugging Face config)")
        where = str(folder / "config.json")
        refuse_other_architectures(config, where)
        refuse_hf_settings_not_implemented(config, where)
        # Defaults are LlamaConfig's own, for configs written by hand without them.
        params = {"dim": config.get("hidden_size"), "n_layers": config.get("num_hidden_layers"),
                  "n_heads": config.get("num_attention_heads"),
                  "n_kv_heads": config.get("num_key_value_heads"),
                  "vocab_size": config.get("vocab_size"), "hidden_dim": config.get("intermediate_size"),
                  "norm_eps": config.get("rms_norm_eps", 1e-6),
                  "rope_theta": hf_rope_theta(config, where),
                  "max_seq_len": config.get("max_position_embeddings", 2048)}
        self.args = model_args_from_dict({k: v for k, v in params.items() if v is not None},
                                         where, **overrides)
        self.tied = bool(config.get("tie_word_embeddings", False))
        self.where = {}  # Meta name -> reader
        for path in sorted(folder.glob("*.safetensors")):
            data_start, header = read_safetensors_header(path)
            for hf_name, entry in header.items():
                self._register(path, hf_name,
                               lambda e=entry, p=path, s=data_start: read_safetensor(p, s, e))
        if not self.where:
            for path in sorted(folder.glob("pytorch_model*.bin")):
                state = state_dict_of_tensors(safe_torch_load(path), path)
                for hf_name in state:
                    self._register(path, hf_name, lambda s=state, n=hf_name: s[n])
        if not self.where:
            raise BadInput(f"{folder} has no model*.safetensors or pytorch_model*.bin weights")
        self.description = {"format": "hf", "path": folder.name}

    def _register(self, path, hf_name, reader):
        """Strict, as for the Meta layout: every tensor is used or refused by name. Skipping one
        would drop it silently (Qwen2's q/k/v biases, say) and the model would print garbage."""
        meta_name = hf_to_meta_name(hf_name)
        if meta_name is not None:
            self.where[meta_name] = reader
        elif not HF_DERIVED_BUFFER.fullmatch(hf_name):
            raise BadInput(f"{path} holds {hf_name!r}, which a LLaMA does not have (a bias, or a "
                           "module of another architecture): this model cannot use it, so the "
                           "checkpoint cannot be run here")

    def names(self):
        names = list(self.where)
        if "output.weight" not in names and self.tied:
            names.append("output.weight")
        return names

    def load(self, name):
        if name == "output.weight" and self.tied:
            # transformers ties the classifier to the embedding after loading, so a stored
            # lm_head.weight is not what a tied model computes with.
            name = "tok_embeddings.weight"
        tensor = self.where[name]()
        if name.endswith("attention.wq.weight"):
            return rotate_half_to_interleaved(tensor, self.args.n_heads)
        if name.endswith("attention.wk.weight"):
            return rotate_half_to_interleaved(tensor, self.args.n_kv_heads)
        return tensor


def write_safetensors(path, tensors: dict, prepare=None):
    """Write {name: tensor} as one safetensors file, each tensor passed through
    prepare(name, tensor) (same shape and dtype) only as it is written, so no second copy of
    the model is ever joined in memory."""
    dtype_name = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    header, offset = {}, 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": dtype_name[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header).encode()

    def write(file):
        file.write(struct.pack("<Q", len(head)) + head)
        for name, tensor in tensors.items():
            tensor = prepare(name, tensor) if prepare else tensor
            if tensor.numel():
                file.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())

    atomic_write(path, write)


def save_hf_safetensors(tensors: dict, args: ModelArgs, folder):
    """Write the HF Llama layout: one model.safetensors (q/k rows permuted for rotate-half, as
    HF expects) and a config.json that transformers 4 (rope_theta at the top) and 5
    (rope_parameters) read alike. Tensors are written one at a time, never joined in memory."""
    def rotate_half_rows(hf_name, tensor):
        if hf_name.endswith("self_attn.q_proj.weight"):
            return interleaved_to_rotate_half(tensor, args.n_heads)
        if hf_name.endswith("self_attn.k_proj.weight"):
            return interleaved_to_rotate_half(tensor, args.n_kv_heads)
        return tensor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "model.safetensors",
                      {meta_to_hf_name(name): tensor for name, tensor in tensors.items()},
                      rotate_half_rows)
    stored = str(next(iter(tensors.values())).dtype).replace("torch.", "")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
              "intermediate_size": args.hidden_dim, "num_attention_heads": args.n_heads,
              "num_hidden_layers": args.n_layers, "num_key_value_heads": args.n_kv_heads,
              "head_dim": args.head_dim, "hidden_act": "silu",
              "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps,
              "rope_theta": args.rope_theta,
              "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
              "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": False,
              "attention_bias": False, "mlp_bias": False,
              "torch_dtype": stored, "dtype": stored}
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2))

"""The Hugging Face layout: config.json + model.safetensors (or pytorch_model.bin), read as
Meta names (q/k rows from rotate-half back to interleaved pairs) and written back.

Only what this model implements is read: every tensor is used or refused by name, and settings
or architectures it does not implement are refused by name.
"""
import json
import re
from pathlib import Path

from llama.errors import BadInput
from llama.formats.files import atomic_write_text
from llama.formats.hf_families import (CANNOT_RUN_HERE, FAMILIES, FAMILY_NAMES, family_args,
                                        hf_family)
from llama.formats.layouts import TensorSource, model_args_from_dict
from llama.formats.tensor_files import (read_json, read_safetensor, read_safetensors_header,
                                        safe_torch_load, state_dict_of_tensors,
                                        write_safetensors)
from llama.model.rotary import check_rope_scaling
from llama.model.transformer import ModelArgs


# Hugging Face Llama names -> Meta names (per layer, then the rest).
HF_LAYER_NAMES = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
                  "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
                  "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
                  "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
                  "post_attention_layernorm": "ffn_norm"}
HF_TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight",
                "model.norm.weight": "norm.weight", "lm_head.weight": "output.weight"}
# The projections Qwen2 gives biases (o_proj and the feed-forward have none).
HF_BIASED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def hf_to_meta_name(hf_name: str):
    """'model.layers.3.self_attn.q_proj.weight' -> 'layers.3.attention.wq.weight' (None: not ours)."""
    if hf_name in HF_TOP_NAMES:
        return HF_TOP_NAMES[hf_name]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf_name)
    if match and match.group(2) in HF_LAYER_NAMES and \
            (match.group(3) == "weight" or match.group(2) in HF_BIASED):
        return f"layers.{match.group(1)}.{HF_LAYER_NAMES[match.group(2)]}.{match.group(3)}"
    return None


def meta_to_hf_name(meta_name: str):
    top = {meta: hf for hf, meta in HF_TOP_NAMES.items()}
    if meta_name in top:
        return top[meta_name]
    layer_names = {meta: hf for hf, meta in HF_LAYER_NAMES.items()}
    _, index, inner = meta_name.split(".", 2)
    module, kind = inner.rsplit(".", 1)
    return f"model.layers.{index}.{layer_names[module]}.{kind}"


def rotate_half_to_interleaved(weight, n_heads: int):
    """Undo HF's q/k row permutation: per head, rows [evens..., odds...] back to pairs (a bias's
    entries are rows of one column)."""
    rows, cols = weight.shape[0], weight[0].numel()
    return weight.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2) \
        .reshape(weight.shape)


def interleaved_to_rotate_half(weight, n_heads: int):
    """HF's permutation of q/k rows, used by its Meta->HF conversion (and our writer)."""
    rows, cols = weight.shape[0], weight[0].numel()
    return weight.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2) \
        .reshape(weight.shape)




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


def hf_rope(config: dict, where: str):
    """(rope_theta, rope scaling or None) wherever transformers put them: at the top (4.x), in
    rope_parameters (5.x, maybe one dict per layer type) or in rope_scaling. Rope types other
    than default, llama3 and linear are refused by name (llama/model/rotary.py)."""
    thetas = {"at the top": config.get("rope_theta")}
    factors = [config.get("partial_rotary_factor")]
    scalings = {}
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
        scalings[key] = check_rope_scaling(rope, f"{where}: {key}")
        thetas[f"in {key}"] = rope.get("rope_theta")
        factors.append(rope.get("partial_rotary_factor"))
    for factor in factors:
        if factor not in (None, 1, 1.0):
            raise BadInput(f"{where}: partial_rotary_factor={factor!r} (rope on part of each "
                           f"head): {CANNOT_RUN_HERE}")
    if len(scalings) == 2 and scalings["rope_parameters"] != scalings["rope_scaling"]:
        raise BadInput(f"{where}: rope_parameters and rope_scaling give different rope scaling: "
                       "keep one (transformers 5 reads rope_parameters)")
    given = {place: theta for place, theta in thetas.items() if theta is not None}
    if any(theta != next(iter(given.values())) for theta in given.values()):
        raise BadInput(f"{where}: " + " but ".join(f"rope_theta={theta!r} {place}"
                                                    for place, theta in given.items())
                       + ": keep one value (transformers 5 reads the one in rope_parameters)")
    return next(iter(given.values()), 10000.0), next(iter(scalings.values()), None)


# Older transformers saved rotary's inverse frequencies as a buffer: they follow from
# rope_theta, which config.json gives, so they carry no weight of their own.
HF_DERIVED_BUFFER = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


class HFSource(TensorSource):
    """config.json + model*.safetensors or pytorch_model*.bin, read without transformers."""

    def __init__(self, folder, **overrides):
        folder = Path(folder)
        config = read_json(folder / "config.json")
        if not isinstance(config, dict):
            raise BadInput(f"{folder / 'config.json'} must hold a JSON object (a Hugging Face config)")
        where = str(folder / "config.json")
        self.family = family = hf_family(config, where)
        refuse_hf_settings_not_implemented(config, where)
        rope_theta, rope_scaling = hf_rope(config, where)
        # Defaults are LlamaConfig's own, for configs written by hand without them.
        params = {"dim": config.get("hidden_size"), "n_layers": config.get("num_hidden_layers"),
                  "n_heads": config.get("num_attention_heads"),
                  "n_kv_heads": config.get("num_key_value_heads"),
                  "vocab_size": config.get("vocab_size"), "hidden_dim": config.get("intermediate_size"),
                  "norm_eps": config.get("rms_norm_eps", 1e-6),
                  "rope_theta": rope_theta, "rope_scaling": rope_scaling,
                  "max_seq_len": config.get("max_position_embeddings", 2048),
                  **family_args(family, config, where)}
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
        if meta_name is not None and (self.args.qkv_bias or not meta_name.endswith(".bias")):
            self.where[meta_name] = reader
        elif not HF_DERIVED_BUFFER.fullmatch(hf_name):
            raise BadInput(f"{path} holds {hf_name!r}, which a {FAMILY_NAMES[self.family]} does "
                           "not have (a bias, or a module of another architecture): this model "
                           "cannot use it, so the checkpoint cannot be run here")

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
        if name.endswith(("attention.wq.weight", "attention.wq.bias")):
            return rotate_half_to_interleaved(tensor, self.args.n_heads)
        if name.endswith(("attention.wk.weight", "attention.wk.bias")):
            return rotate_half_to_interleaved(tensor, self.args.n_kv_heads)
        return tensor


def save_hf_safetensors(tensors: dict, args: ModelArgs, folder):
    """Write the HF Llama layout: one model.safetensors (q/k rows permuted for rotate-half, as
    HF expects) and a config.json that transformers 4 (rope_theta at the top) and 5
    (rope_parameters) read alike. Tensors are written one at a time, never joined in memory."""
    def rotate_half_rows(hf_name, tensor):
        if hf_name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            return interleaved_to_rotate_half(tensor, args.n_heads)
        if hf_name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            return interleaved_to_rotate_half(tensor, args.n_kv_heads)
        return tensor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "model.safetensors",
                      {meta_to_hf_name(name): tensor for name, tensor in tensors.items()},
                      rotate_half_rows)
    stored = str(next(iter(tensors.values())).dtype).replace("torch.", "")
    config = {**hf_family_config(args), "hidden_size": args.dim,
              "intermediate_size": args.hidden_dim, "num_attention_heads": args.n_heads,
              "num_hidden_layers": args.n_layers, "num_key_value_heads": args.n_kv_heads,
              "head_dim": args.head_dim, "hidden_act": "silu",
              "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps,
              "rope_theta": args.rope_theta, "rope_scaling": args.rope_scaling,
              "rope_parameters": {"rope_type": "default", **(args.rope_scaling or {}),
                                  "rope_theta": args.rope_theta},
              "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": False,
              "torch_dtype": stored, "dtype": stored}
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2))


def hf_family_config(args: ModelArgs) -> dict:
    """The config.json fields that name the family whose settings args has (hf_families.py)."""
    if args.qkv_bias and args.sliding_window is not None:
        raise BadInput(f"q/k/v biases and sliding_window={args.sliding_window} together are "
                       "no family's (Qwen2 or Mistral) that transformers reads: convert to the "
                       "Meta layout instead")
    if args.qkv_bias:  # Qwen2: the biases come with the model_type; no sliding window
        return {"architectures": [FAMILIES["qwen2"]], "model_type": "qwen2",
                "use_sliding_window": False}
    if args.sliding_window is not None:
        return {"architectures": [FAMILIES["mistral"]], "model_type": "mistral",
                "sliding_window": args.sliding_window}
    return {"architectures": [FAMILIES["llama"]], "model_type": "llama",
            "attention_bias": False, "mlp_bias": False}

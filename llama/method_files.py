"""The files of the prefix and adapter methods: tuning.pt + tuning.json, and PEFT's layouts.

tuning.pt is a plain dict of float32 tensors under global layer keys ("layers.3.prefix": keys
and values (2, n_virtual, n_kv_heads, head_dim); "layers.4.adaption_prompt" (len, dim) and
"layers.4.adaption_gate" (1,)), so a folder trained on p stages loads on q. Export/import:
PEFT's PREFIX_TUNING (one `prompt_embeddings` (n_virtual, n_layers*2*n_kv_heads*head_dim); keys
in Hugging Face's rotate-half order) and ADAPTION_PROMPT (`...layers.N.self_attn.adaption_*`).
A folder with prompt.pt, or PEFT's PROMPT_TUNING, is the prompt method (llama/prompt.py).
"""
import json
import re
from pathlib import Path

import torch

from llama.checkpoint import params_digest
from llama.errors import BadInput
from llama.files import atomic_torch_save, atomic_write_text, sha256_of
from llama.formats import read_json, read_safetensor, read_safetensors_header, safe_torch_load
from llama.methods import METHODS, expected_shapes
from llama.prompt import PEFT_EXTRA_FILE, load_prompt

PEFT_TYPES = {"PROMPT_TUNING": "prompt", "PREFIX_TUNING": "prefix", "ADAPTION_PROMPT": "adapter"}
TUNING_FILES = ("tuning.json", "tuning.pt")  # what save_tuning writes


def save_tuning(folder, method: str, tensors: dict, args, metadata: dict):
    """tuning.pt (global key -> float32 tensor) + tuning.json, each written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({k: v.detach().float().cpu().clone() for k, v in sorted(tensors.items())},
                      folder / "tuning.pt")
    info = {"method": method, "n_virtual_tokens": n_virtual_of(method, tensors),
            "n_layers": args.n_layers, "dim": args.dim, "n_heads": args.n_heads,
            "n_kv_heads": args.n_kv_heads, "params_digest": params_digest(args),
            "tuning_sha256": sha256_of(folder / "tuning.pt"), **metadata}
    atomic_write_text(folder / "tuning.json", json.dumps(info, indent=2))


def n_virtual_of(method: str, tensors: dict) -> int:
    for key, tensor in tensors.items():
        if method == "prefix" and key.endswith(".prefix"):
            return tensor.shape[1]
        if key.endswith(".adaption_prompt") or key == "prompt":
            return tensor.shape[0]
    return 0


def load_tuning(path, args):
    """(method, {global key: tensor} of the whole model, info) from any folder we can read:
    ours (prompt.pt or tuning.pt) or PEFT's (PROMPT_TUNING, PREFIX_TUNING, ADAPTION_PROMPT),
    checked against the model's shape."""
    folder = Path(path)
    if (folder / "tuning.pt").is_file():
        method, tensors, info, source = read_our_tuning(folder)
    elif (folder / "adapter_config.json").is_file() and peft_method(folder) != "prompt":
        method, tensors, info = import_peft_method(folder, args)
        source = folder / "adapter_config.json"
    else:
        weight, info = load_prompt(folder, args)
        return "prompt", {"prompt": weight}, info
    check_shapes(source, method, tensors, args, info.get("adapter_layers"))
    digest = info.get("params_digest")
    if digest is not None and digest != params_digest(args):
        raise BadInput(f"{source} was trained for another model (params digest {digest}, this "
                       f"model's is {params_digest(args)}): use the matching --ckpt_dir")
    if not all(torch.isfinite(t).all() for t in tensors.values()):
        raise BadInput(f"{source} contains NaN or inf values: use an earlier checkpoint")
    return method, {k: t.float() for k, t in tensors.items()}, info


def read_our_tuning(folder: Path):
    info_path, pt = folder / "tuning.json", folder / "tuning.pt"
    if not info_path.is_file():
        raise BadInput(f"{info_path} is missing beside tuning.pt: pass the folder ft_main.py "
                       "--out wrote (tuning.pt + tuning.json) or its peft/ export")
    info = read_json(info_path)
    if not isinstance(info, dict) or info.get("method") not in ("prefix", "adapter"):
        raise BadInput(f"{info_path} names method {info.get('method') if isinstance(info, dict) else None!r}, "
                       "not prefix or adapter: pass a folder ft_main.py --method prefix|adapter wrote")
    if info.get("tuning_sha256") not in (None, sha256_of(pt)):
        raise BadInput(f"{info_path} describes another tuning.pt than the one beside it (a save "
                       "was interrupted, or the files were mixed up): train again")
    tensors = safe_torch_load(pt, mmap=False)
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) and t.is_floating_point()
                                                for t in tensors.values()):
        raise BadInput(f"{pt} does not hold a dict of float tensors")
    return info["method"], tensors, info, pt


def check_shapes(source, method: str, tensors: dict, args, adapter_layers):
    """Every key the model needs, each of the right shape; a file for another model, or for
    another method, names the first difference."""
    n_virtual = n_virtual_of(method, tensors)
    if method == "adapter":  # the layers it has must be the top ones, as many as it has
        adapter_layers = min(max(sum(k.endswith(".adaption_prompt") for k in tensors), 1),
                             args.n_layers)
    expected = expected_shapes(method, args, n_virtual, adapter_layers)
    foreign = sorted(k for k in tensors if k.rsplit(".", 1)[-1] not in
                     {e.rsplit(".", 1)[-1] for e in expected})
    if foreign:
        raise BadInput(f"{source} holds {foreign[0]!r}, not a tensor of the {method} method it "
                       "is described as: the files were mixed up; pass a folder one run wrote")
    if not 1 <= n_virtual < args.max_seq_len:
        raise BadInput(f"{source} has {n_virtual} virtual tokens; the model allows 1.."
                       f"{args.max_seq_len - 1}")
    for key in sorted(set(expected) | set(tensors)):
        if key not in tensors or key not in expected:
            where = "lacks" if key not in tensors else "has"
            raise BadInput(f"{source} {where} {key!r}, which the {method} method for this model "
                           f"(n_layers={args.n_layers}) {'needs' if where == 'lacks' else 'does not have'}: "
                           "it was trained for another model or method; use the matching --ckpt_dir")
        if tuple(tensors[key].shape) != expected[key]:
            raise BadInput(f"{source}: {key} has shape {tuple(tensors[key].shape)}, but this model "
                           f"(dim={args.dim}, n_kv_heads={args.n_kv_heads}) needs {expected[key]}: "
                           "it was trained for another model; use the matching --ckpt_dir")


# ---- PEFT ----

def to_rotate_half(keys):
    """Per head, Meta's interleaved pairs (x0, x1, x2, x3...) -> HF's (x0, x2, ..., x1, x3, ...):
    HF's converted wk rows are so permuted, and its cached keys with them."""
    return torch.cat([keys[..., 0::2], keys[..., 1::2]], dim=-1)


def to_interleaved(keys):
    half = keys.shape[-1] // 2
    return torch.stack([keys[..., :half], keys[..., half:]], dim=-1).flatten(-2)


def export_peft_method(folder, method: str, tensors: dict, args, metadata: dict):
    """PEFT's PREFIX_TUNING or ADAPTION_PROMPT layout (adapter_model.bin + adapter_config.json)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    common = {"task_type": "CAUSAL_LM", "inference_mode": True,
              "base_model_name_or_path": metadata.get("base_model") or metadata.get("ckpt_dir")}
    if method == "prefix":
        # PEFT views prompt_embeddings as (P, n_layers * 2, kv_heads, head_dim): layer l's keys
        # at 2l, its values at 2l + 1 (get_prompt), kv heads for GQA (token_dim = kv * hd).
        per_layer = [tensors[f"layers.{i}.prefix"] for i in range(args.n_layers)]
        pairs = torch.stack([torch.stack([to_rotate_half(p[0]), p[1]], dim=1) for p in per_layer],
                            dim=1)  # (P, n_layers, 2, kv_heads, hd)
        state = {"prompt_embeddings": pairs.reshape(pairs.shape[0], -1).float().contiguous()}
        token_dim = args.n_kv_heads * args.head_dim
        config = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": pairs.shape[0],
                  "token_dim": token_dim, "num_transformer_submodules": 1,
                  "num_attention_heads": args.n_kv_heads, "num_layers": args.n_layers,
                  "encoder_hidden_size": token_dim, "prefix_projection": False, **common}
    else:
        layers = sorted(int(k.split(".")[1]) for k in tensors if k.endswith(".adaption_prompt"))
        state = {}
        for i in layers:
            name = f"base_model.model.model.layers.{i}.self_attn"
            state[f"{name}.adaption_prompt"] = tensors[f"layers.{i}.adaption_prompt"][None].float()
            state[f"{name}.adaption_gate"] = tensors[f"layers.{i}.adaption_gate"].float()
        config = {"peft_type": "ADAPTION_PROMPT", "adapter_len": n_virtual_of(method, tensors),
                  "adapter_layers": len(layers), "target_modules": "self_attn", **common}
    atomic_torch_save(state, folder / "adapter_model.bin")
    atomic_write_text(folder / "adapter_config.json", json.dumps(config, indent=2))
    extra = {"params_digest": params_digest(args), "template": metadata.get("template")}
    atomic_write_text(folder / PEFT_EXTRA_FILE, json.dumps(extra, indent=2))


def peft_method(folder: Path) -> str:
    config_path = folder / "adapter_config.json"
    config = read_json(config_path)
    kind = config.get("peft_type") if isinstance(config, dict) else None
    if kind not in PEFT_TYPES:
        raise BadInput(f"{config_path} is a PEFT {kind!r} adapter; this project reads "
                       f"{', '.join(PEFT_TYPES)} (--method {', '.join(METHODS)}): pass one of those")
    return PEFT_TYPES[kind]


def read_peft_weights(folder: Path):
    if (folder / "adapter_model.safetensors").is_file():
        path = folder / "adapter_model.safetensors"
        start, header = read_safetensors_header(path)
        return path, {k: read_safetensor(path, start, e) for k, e in header.items()
                      if k != "__metadata__"}
    if (folder / "adapter_model.bin").is_file():
        path = folder / "adapter_model.bin"
        return path, safe_torch_load(path, mmap=False)
    raise BadInput(f"{folder} has adapter_config.json but no adapter_model.bin/.safetensors")


def import_peft_method(folder, args):
    """(method, tensors, info) from a PEFT PREFIX_TUNING or ADAPTION_PROMPT folder."""
    folder = Path(folder)
    method = peft_method(folder)
    config = read_json(folder / "adapter_config.json")
    path, state = read_peft_weights(folder)
    if not isinstance(state, dict):
        raise BadInput(f"{path} does not hold a dict of tensors")
    info = {"peft": True, "method": method}
    if method == "prefix":
        tensors = prefix_from_peft(path, state, config, args)
    else:
        tensors = {}
        for key, tensor in state.items():
            match = re.search(r"layers\.(\d+)\.self_attn\.(adaption_prompt|adaption_gate)$", key)
            if match:
                value = tensor[0] if match.group(2) == "adaption_prompt" and tensor.dim() == 3 else tensor
                tensors[f"layers.{match.group(1)}.{match.group(2)}"] = value
        if not tensors:
            raise BadInput(f"{path} holds no '...layers.N.self_attn.adaption_prompt' tensors")
        info["adapter_layers"] = config.get("adapter_layers")
    if (folder / PEFT_EXTRA_FILE).is_file():
        extra = read_json(folder / PEFT_EXTRA_FILE)
        if isinstance(extra, dict):
            info.update(extra)
    return method, tensors, info


def prefix_from_peft(path, state, config, args):
    embeddings = state.get("prompt_embeddings")
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
        raise BadInput(f"{path} holds no (n_virtual_tokens, n) 'prompt_embeddings' tensor")
    per_token = args.n_layers * 2 * args.n_kv_heads * args.head_dim
    if config.get("prefix_projection") and not config.get("inference_mode", True):
        raise BadInput(f"{path.parent / 'adapter_config.json'} has prefix_projection and is not "
                       "an inference-mode save: save it with PEFT's save_pretrained, which stores "
                       "the projected prefix")
    if embeddings.shape[1] != per_token:
        raise BadInput(f"{path}: prompt_embeddings has {embeddings.shape[1]} values per virtual "
                       f"token, but this model (n_layers={args.n_layers}, n_kv_heads="
                       f"{args.n_kv_heads}, head_dim={args.head_dim}) needs {per_token}: it was "
                       "trained for another model; use the matching --ckpt_dir")
    view = embeddings.reshape(embeddings.shape[0], args.n_layers, 2, args.n_kv_heads,
                              args.head_dim)
    return {f"layers.{i}.prefix": torch.stack([to_interleaved(view[:, i, 0]), view[:, i, 1]])
            for i in range(args.n_layers)}

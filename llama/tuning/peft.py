"""Export to and import from PEFT's layouts, one per tuning method (adapter_model.bin, or
.safetensors for LoRA, + adapter_config.json): PROMPT_TUNING (`prompt_embeddings` (n_virtual,
dim)), PREFIX_TUNING (one `prompt_embeddings` (n_virtual, n_layers*2*n_kv_heads*head_dim), keys
in Hugging Face's rotate-half order), ADAPTION_PROMPT (`...layers.N.self_attn.adaption_*`) and
LORA (`...layers.N.self_attn.q_proj.lora_A.weight`, q/k lora_B rows in rotate-half order).
Tensors go in and come out under our global names (llama/tuning/files.py), so the rest of the
code sees one format.
"""
import json
import re
from pathlib import Path

import torch

from llama.model.transformer import params_digest
from llama.errors import BadInput
from llama.formats.files import atomic_torch_save, atomic_write_text
from llama.formats.hf import (interleaved_to_rotate_half, meta_to_hf_name,
                              rotate_half_to_interleaved)
from llama.formats.tensor_files import (read_json, read_safetensor, read_safetensors_header,
                                        safe_torch_load, write_safetensors)
from llama.tuning.lora import LORA_KEY, TARGETS

PEFT_TYPES = {"PROMPT_TUNING": "prompt", "PREFIX_TUNING": "prefix", "ADAPTION_PROMPT": "adapter",
              "LORA": "lora"}
PEFT_EXTRA_FILE = "llama_prompt.json"  # what our export adds: model digest and template
PEFT_WEIGHTS = ("adapter_model.bin", "adapter_model.safetensors")  # one of them, by method
PEFT_FILES = ("adapter_config.json", *PEFT_WEIGHTS, PEFT_EXTRA_FILE)  # what export writes


def export_peft(folder, method: str, tensors: dict, args, metadata: dict):
    """The PEFT layout of `method`, so the tuning can be used with transformers + peft too."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    to_peft = {"prompt": prompt_to_peft, "prefix": prefix_to_peft, "adapter": adapter_to_peft,
               "lora": lora_to_peft}
    state, config = to_peft[method](tensors, args, metadata)
    # What AutoPeftModelForCausalLM loads: a Hugging Face id or folder when the user named one
    # (--base_model); a split folder otherwise, which transformers cannot load.
    config.update(task_type="CAUSAL_LM", inference_mode=True,
                  base_model_name_or_path=metadata.get("base_model") or metadata.get("ckpt_dir"))
    # PEFT reads the .safetensors first: the one not written must not be an older run's.
    weights = folder / PEFT_WEIGHTS[method == "lora"]
    for name in PEFT_WEIGHTS:
        if name != weights.name:
            (folder / name).unlink(missing_ok=True)
    if method == "lora":  # what PEFT writes for LoRA, and what convert --lora reads fastest
        write_safetensors(weights, state)
    else:
        atomic_torch_save(state, weights)
    atomic_write_text(folder / "adapter_config.json", json.dumps(config, indent=2))
    # PEFT's config has no place for these; a file beside it that PEFT ignores keeps them, so
    # importing our own export still checks the model and wraps text in the same template.
    extra = {"params_digest": params_digest(args), "template": metadata.get("template")}
    atomic_write_text(folder / PEFT_EXTRA_FILE, json.dumps(extra, indent=2))


def import_peft(folder, args):
    """(method, tensors under our global names, info) from a PEFT folder of any of the three;
    the caller checks them as it checks our own files."""
    folder = Path(folder)
    config_path = folder / "adapter_config.json"
    config = read_json(config_path)
    kind = config.get("peft_type") if isinstance(config, dict) else None
    if kind not in PEFT_TYPES:
        raise BadInput(f"{config_path} is a PEFT {kind!r} adapter; this project reads "
                       f"{', '.join(PEFT_TYPES)} (--method {', '.join(PEFT_TYPES.values())}): "
                       "pass one of those")
    method = PEFT_TYPES[kind]
    path, state = read_peft_weights(folder)
    from_peft = {"prompt": prompt_from_peft, "prefix": prefix_from_peft,
                 "adapter": adapter_from_peft, "lora": lora_from_peft}
    tensors, info = from_peft[method](path, state, config, args)
    if (folder / PEFT_EXTRA_FILE).is_file():
        extra = read_json(folder / PEFT_EXTRA_FILE)
        if not isinstance(extra, dict):
            raise BadInput(f"{folder / PEFT_EXTRA_FILE} must hold a JSON object")
        info.update(extra)
    return method, tensors, {"peft": True, "method": method, **info}


def read_peft_weights(folder: Path):
    """(path, state dict) from adapter_model.safetensors (what current PEFT writes) or .bin."""
    if (folder / "adapter_model.safetensors").is_file():
        path = folder / "adapter_model.safetensors"
        start, header = read_safetensors_header(path)
        state = {k: read_safetensor(path, start, e) for k, e in header.items()
                 if k != "__metadata__"}
    elif (folder / "adapter_model.bin").is_file():
        path = folder / "adapter_model.bin"
        state = safe_torch_load(path, mmap=False)
    else:
        raise BadInput(f"{folder} has adapter_config.json but no adapter_model.bin/.safetensors")
    if not isinstance(state, dict):
        raise BadInput(f"{path} does not hold a dict of tensors")
    return path, state


# ---- PROMPT_TUNING ----

def prompt_to_peft(tensors, args, metadata):
    weight = tensors["prompt"]
    config = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": weight.shape[0],
              "token_dim": weight.shape[1], "num_transformer_submodules": 1,
              "num_attention_heads": args.n_heads, "num_layers": args.n_layers,
              "prompt_tuning_init": "TEXT" if metadata.get("init") == "text" else "RANDOM",
              "prompt_tuning_init_text": metadata.get("init_text"),
              "tokenizer_name_or_path": metadata.get("tokenizer")}
    return {"prompt_embeddings": weight.detach().float().cpu().clone()}, config


def prompt_from_peft(path, state, config, args):
    if not isinstance(state.get("prompt_embeddings"), torch.Tensor):
        raise BadInput(f"{path} holds no 'prompt_embeddings' tensor")
    refuse_config_of_another_model(path.parent / "adapter_config.json", config, args)
    info = {"n_virtual_tokens": config.get("num_virtual_tokens"),
            "init": config.get("prompt_tuning_init")}
    return {"prompt": state["prompt_embeddings"]}, info


def refuse_config_of_another_model(path, config, args):
    """PEFT records the model's shape in adapter_config.json: the only check a folder PEFT
    wrote (without our llama_prompt.json and its params digest) can have."""
    for field, name, value in (("num_layers", "n_layers", args.n_layers),
                               ("num_attention_heads", "n_heads", args.n_heads),
                               ("token_dim", "dim", args.dim)):
        recorded = config.get(field)
        if recorded is not None and recorded != value:
            raise BadInput(f"{path}: {field}={recorded!r} but the model has {name}={value}: the "
                           "prompt was trained for another model; use the matching --ckpt_dir")


# ---- PREFIX_TUNING ----

def to_rotate_half(keys):
    """Per head, Meta's interleaved pairs (x0, x1, x2, x3...) -> HF's (x0, x2, ..., x1, x3, ...):
    HF's converted wk rows are so permuted, and its cached keys with them."""
    return torch.cat([keys[..., 0::2], keys[..., 1::2]], dim=-1)


def to_interleaved(keys):
    half = keys.shape[-1] // 2
    return torch.stack([keys[..., :half], keys[..., half:]], dim=-1).flatten(-2)


def prefix_to_peft(tensors, args, metadata):
    # PEFT views prompt_embeddings as (P, n_layers * 2, kv_heads, head_dim): layer l's keys
    # at 2l, its values at 2l + 1 (get_prompt), kv heads for GQA (token_dim = kv * hd).
    per_layer = [tensors[f"layers.{i}.prefix"] for i in range(args.n_layers)]
    pairs = torch.stack([torch.stack([to_rotate_half(p[0]), p[1]], dim=1) for p in per_layer],
                        dim=1)  # (P, n_layers, 2, kv_heads, hd)
    token_dim = args.n_kv_heads * args.head_dim
    config = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": pairs.shape[0],
              "token_dim": token_dim, "num_transformer_submodules": 1,
              "num_attention_heads": args.n_kv_heads, "num_layers": args.n_layers,
              "encoder_hidden_size": token_dim, "prefix_projection": False}
    return {"prompt_embeddings": pairs.reshape(pairs.shape[0], -1).float().contiguous()}, config


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
    tensors = {f"layers.{i}.prefix": torch.stack([to_interleaved(view[:, i, 0]), view[:, i, 1]])
               for i in range(args.n_layers)}
    return tensors, {}


# ---- ADAPTION_PROMPT ----

def adapter_to_peft(tensors, args, metadata):
    layers = sorted(int(k.split(".")[1]) for k in tensors if k.endswith(".adaption_prompt"))
    state = {}
    for i in layers:
        name = f"base_model.model.model.layers.{i}.self_attn"
        state[f"{name}.adaption_prompt"] = tensors[f"layers.{i}.adaption_prompt"][None].float()
        state[f"{name}.adaption_gate"] = tensors[f"layers.{i}.adaption_gate"].float()
    adapter_len = tensors[f"layers.{layers[0]}.adaption_prompt"].shape[0]
    config = {"peft_type": "ADAPTION_PROMPT", "adapter_len": adapter_len,
              "adapter_layers": len(layers), "target_modules": "self_attn"}
    return state, config


def adapter_from_peft(path, state, config, args):
    tensors = {}
    for key, tensor in state.items():
        match = re.search(r"layers\.(\d+)\.self_attn\.(adaption_prompt|adaption_gate)$", key)
        if match and isinstance(tensor, torch.Tensor):  # PEFT keeps a batch dim of 1 on prompts
            squeeze = match.group(2) == "adaption_prompt" and tensor.dim() == 3
            tensors[f"layers.{match.group(1)}.{match.group(2)}"] = tensor[0] if squeeze else tensor
    if not tensors:
        raise BadInput(f"{path} holds no '...layers.N.self_attn.adaption_prompt' tensors")
    return tensors, {"adapter_layers": config.get("adapter_layers")}


# ---- LORA ----

HF_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
              "up": "up_proj", "down": "down_proj"}
PEFT_LORA_KEY = re.compile(r"(?:base_model\.model\.)?(model\.layers\.\d+\.\w+\.\w+)"
                           r"\.lora_(A|B)(?:\.[\w-]+)?\.weight")


def rotate_half_rows(key: str, args):
    """Heads of a q or k lora_B, whose rows follow the q/k weight's order (None for others)."""
    return {"attention.wq": args.n_heads, "attention.wk": args.n_kv_heads}.get(
        LORA_KEY.fullmatch(key).group(2))


def lora_to_peft(tensors, args, metadata):
    """HF module names; B's q/k rows permuted as Hugging Face's conversion permutes q/k weights,
    since HF applies rotary to halves where Meta (and this project) pairs neighbours."""
    state = {}
    for key, tensor in sorted(tensors.items()):
        match = LORA_KEY.fullmatch(key)
        heads = rotate_half_rows(key, args) if match.group(3) == "B" else None
        module = meta_to_hf_name(f"layers.{match.group(1)}.{match.group(2)}.weight")
        tensor = tensor.detach().float().cpu()
        tensor = interleaved_to_rotate_half(tensor, heads) if heads else tensor
        state[f"base_model.model.{module[:-len('.weight')]}.lora_{match.group(3)}.weight"] = \
            tensor.contiguous()
    settings = metadata["lora"]
    config = {"peft_type": "LORA", "r": settings["r"], "lora_alpha": settings["alpha"],
              "lora_dropout": settings["dropout"], "use_rslora": settings["use_rslora"],
              "target_modules": [HF_TARGETS[t] for t in settings["targets"]],
              "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
              "init_lora_weights": True}
    return state, config


def lora_from_peft(path, state, config, args):
    """A PEFT LoRA of plain linears with one r and alpha: what this project's method runs."""
    where = path.parent / "adapter_config.json"
    refused = {"rank_pattern": bool(config.get("rank_pattern")),
               "alpha_pattern": bool(config.get("alpha_pattern")),
               "use_dora": bool(config.get("use_dora")),
               "modules_to_save": bool(config.get("modules_to_save")),
               "bias": config.get("bias") not in (None, "none")}
    for field in (name for name, found in refused.items() if found):
        raise BadInput(f"{where}: {field}={config[field]!r} is not run here (one r and "
                       "lora_alpha, no DoRA, biases or saved modules): merge it into the "
                       "weights with python -m llama.formats.convert --lora instead")
    modules = {meta_to_hf_name(f"layers.{i}.{target}.weight")[:-len(".weight")]:
               f"layers.{i}.{target}" for i in range(args.n_layers) for target in TARGETS.values()}
    tensors = {}
    for key, tensor in state.items():
        match = PEFT_LORA_KEY.fullmatch(key)
        module = modules.get(match.group(1)) if match else None
        if module is None or not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
            raise BadInput(f"{path}: {key!r} is not the lora_A/lora_B of a LLaMA projection: "
                           "merge the adapter with python -m llama.formats.convert --lora instead")
        ours = f"{module}.lora_{match.group(2)}"
        heads = rotate_half_rows(ours, args) if match.group(2) == "B" else None
        tensors[ours] = rotate_half_to_interleaved(tensor, heads) if heads else tensor
    described = {"r": config.get("r"), "alpha": config.get("lora_alpha"),
                 "dropout": config.get("lora_dropout") or 0.0,
                 "use_rslora": bool(config.get("use_rslora"))}
    return tensors, {"lora": described}

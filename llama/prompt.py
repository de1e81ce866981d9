"""The soft prompt: n_virtual_tokens trainable fp32 vectors prepended to the token embeddings.

Initialised from text, from sampled vocabulary rows, or randomly at the scale of the real
embeddings; saved as prompt.pt (a bare tensor) + prompt.json, and exported to / imported from
the PEFT prompt-tuning layout (adapter_model.bin with `prompt_embeddings` + adapter_config.json).
"""
import json
import math
from pathlib import Path

import torch
from torch import nn

from llama.checkpoint import params_digest
from llama.errors import BadInput
from llama.files import atomic_torch_save, atomic_write_text, sha256_of
from llama.formats import read_json, read_safetensor, read_safetensors_header, safe_torch_load

INITS = ("text", "vocab", "random")
PEFT_EXTRA_FILE = "llama_prompt.json"  # what our PEFT export adds: model digest and template
# What save_prompt writes, and what both PEFT exports (this one, the other methods') write
PROMPT_FILES = ("prompt.json", "prompt.pt")
PEFT_FILES = ("adapter_config.json", "adapter_model.bin", PEFT_EXTRA_FILE)


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


def save_prompt(folder, weight, args, metadata: dict):
    """prompt.pt (a plain fp32 tensor) + prompt.json, each written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensor = weight.detach().float().cpu().clone()
    atomic_torch_save(tensor, folder / "prompt.pt")
    # The two files are replaced one after the other: the digest lets a reader tell a pair
    # that belongs together from one left half-replaced by a crash between the two writes.
    info = {"n_virtual_tokens": tensor.shape[0], "dim": tensor.shape[1],
            "params_digest": params_digest(args), "prompt_sha256": sha256_of(folder / "prompt.pt"),
            **metadata}
    atomic_write_text(folder / "prompt.json", json.dumps(info, indent=2))


def load_prompt(path, args):
    """(weight, info) from our folder or a PEFT folder, checked against the model's shape."""
    folder = Path(path)
    if (folder / "prompt.pt").is_file():
        if not (folder / "prompt.json").is_file():
            raise BadInput(f"{folder / 'prompt.json'} is missing beside prompt.pt: the folder is "
                           "not a complete prompt checkpoint; pass the folder ft_main.py --out "
                           "wrote (prompt.pt + prompt.json) or its peft/ export")
        info = read_json(folder / "prompt.json")
        if not isinstance(info, dict):
            raise BadInput(f"{folder / 'prompt.json'} must hold a JSON object")
        recorded = info.get("prompt_sha256")
        if recorded is not None and recorded != sha256_of(folder / "prompt.pt"):
            raise BadInput(f"{folder / 'prompt.json'} describes another prompt.pt than the one "
                           "beside it (a save was interrupted, or the files were mixed up): "
                           "resume the run from its checkpoint.pt, or train again")
        weight = safe_torch_load(folder / "prompt.pt", mmap=False)
        source, peft_config = folder / "prompt.pt", None
    elif (folder / "adapter_config.json").is_file():
        weight, info = import_peft(folder)
        source, peft_config = folder, folder / "adapter_config.json"
    else:
        raise BadInput(f"{folder} holds no prompt.pt or adapter_config.json: pass the --out "
                       "folder of ft_main.py or a PEFT prompt-tuning folder")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise BadInput(f"{source} does not hold a (n_virtual_tokens, dim) float tensor")
    declared = info.get("n_virtual_tokens")
    if declared is not None and declared != weight.shape[0]:
        raise BadInput(f"{source} holds {weight.shape[0]} virtual tokens but its description "
                       f"says {declared!r}: the files do not belong together")
    if not isinstance(info.get("template") or "", str):
        raise BadInput(f"the description of {source} names template {info['template']!r}, "
                       "which is not a template name")
    if weight.shape[1] != args.dim:
        raise BadInput(f"{source} is a prompt of width {weight.shape[1]} but the model's dim is "
                       f"{args.dim}: it was trained for another model")
    if peft_config is not None:
        refuse_peft_config_of_another_model(peft_config, args)
    digest = info.get("params_digest")
    if digest is not None and digest != params_digest(args):
        raise BadInput(f"{source} was trained for another model (params digest {digest}, this "
                       f"model's is {params_digest(args)}): use the matching --ckpt_dir")
    if weight.shape[0] < 1 or weight.shape[0] >= args.max_seq_len:
        raise BadInput(f"{source} has {weight.shape[0]} virtual tokens; the model allows 1.."
                       f"{args.max_seq_len - 1}")
    if not torch.isfinite(weight).all():
        raise BadInput(f"{source} contains NaN or inf values: use an earlier checkpoint")
    return weight.float(), info


def export_peft(folder, weight, args, metadata: dict):
    """The PEFT PROMPT_TUNING layout, so the prompt can be used with transformers + peft too."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"prompt_embeddings": weight.detach().float().cpu().clone()},
                      folder / "adapter_model.bin")
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM",
              "num_virtual_tokens": weight.shape[0], "token_dim": weight.shape[1],
              "num_transformer_submodules": 1, "num_attention_heads": args.n_heads,
              "num_layers": args.n_layers,
              "prompt_tuning_init": "TEXT" if metadata.get("init") == "text" else "RANDOM",
              "prompt_tuning_init_text": metadata.get("init_text"),
              "tokenizer_name_or_path": metadata.get("tokenizer"),
              # What AutoPeftModelForCausalLM loads: a Hugging Face id or folder when the user
              # named one (--base_model); a split folder otherwise, which transformers cannot load.
              "base_model_name_or_path": metadata.get("base_model") or metadata.get("ckpt_dir"),
              "inference_mode": True}
    atomic_write_text(folder / "adapter_config.json", json.dumps(config, indent=2))
    # PEFT's config has no place for these; a file beside it that PEFT ignores keeps them, so
    # importing our own export still checks the model and wraps text in the same template.
    extra = {"params_digest": params_digest(args), "template": metadata.get("template")}
    atomic_write_text(folder / PEFT_EXTRA_FILE, json.dumps(extra, indent=2))


def refuse_peft_config_of_another_model(path, args):
    """PEFT records the model's shape in adapter_config.json: the only check a folder PEFT
    wrote (without our llama_prompt.json and its params digest) can have."""
    config = read_json(path)
    for field, name, value in (("num_layers", "n_layers", args.n_layers),
                               ("num_attention_heads", "n_heads", args.n_heads),
                               ("token_dim", "dim", args.dim)):
        recorded = config.get(field)
        if recorded is not None and recorded != value:
            raise BadInput(f"{path}: {field}={recorded!r} but the model has {name}={value}: the "
                           "prompt was trained for another model; use the matching --ckpt_dir")


def import_peft(folder):
    """(weight, info) from adapter_model.bin or adapter_model.safetensors + adapter_config.json."""
    folder = Path(folder)
    config = read_json(folder / "adapter_config.json")
    if not isinstance(config, dict) or config.get("peft_type") != "PROMPT_TUNING":
        raise BadInput(f"{folder / 'adapter_config.json'} is not a PEFT PROMPT_TUNING adapter")
    if (folder / "adapter_model.safetensors").is_file():
        path = folder / "adapter_model.safetensors"
        start, header = read_safetensors_header(path)
        state = {k: read_safetensor(path, start, e) for k, e in header.items()}
    elif (folder / "adapter_model.bin").is_file():
        path = folder / "adapter_model.bin"
        state = safe_torch_load(path, mmap=False)
    else:
        raise BadInput(f"{folder} has adapter_config.json but no adapter_model.bin/.safetensors")
    if not isinstance(state, dict) or "prompt_embeddings" not in state:
        raise BadInput(f"{path} holds no 'prompt_embeddings' tensor")
    info = {"n_virtual_tokens": config.get("num_virtual_tokens"),
            "init": config.get("prompt_tuning_init"), "peft": True}
    if (folder / PEFT_EXTRA_FILE).is_file():
        extra = read_json(folder / PEFT_EXTRA_FILE)
        if not isinstance(extra, dict):
            raise BadInput(f"{folder / PEFT_EXTRA_FILE} must hold a JSON object")
        info.update(extra)
    return state["prompt_embeddings"], info

"""Merge PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors or .bin) into a
checkpoint's weights under Meta names, without peft or transformers. Used by llama.formats.convert:

    python -m llama.formats.convert --src ckpts/7B --lora lora_a,lora_b --dst ckpts/7B-merged

The rules are PEFT's: a LoRA pair adds scaling * B @ A to the weight of the module it targets,
with scaling = lora_alpha / r (lora_alpha / sqrt(r) under use_rslora; rank_pattern and
alpha_pattern override r and lora_alpha by module name); an embedding pair adds (B @ A)^T;
fan_in_fan_out is ignored because LLaMA's modules are nn.Linear (PEFT resets it to False for
them); modules_to_save (embed_tokens, lm_head) are whole replacement tensors and may resize the
vocabulary. Hugging Face permutes q/k rows for rotate-half rotary, so a q/k delta is permuted
back to Meta's interleaved rows, as the HF reader does for the weights themselves.
"""
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llama.errors import BadInput
from llama.formats.hf import hf_to_meta_name, rotate_half_to_interleaved
from llama.formats.tensor_files import (read_json, read_safetensor, read_safetensors_header,
                                        safe_torch_load, state_dict_of_tensors)
from llama.model.transformer import ModelArgs

# What PEFT prepends to a module's name in a saved LoRA adapter of a causal LM.
PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<kind>A|B)(\.[\w-]+)?\.weight")
LORA_EMBEDDING_KEY = re.compile(r"(?P<module>.+)\.lora_embedding_(?P<kind>A|B)(\.[\w-]+)?")
# A whole embed_tokens/lm_head tensor: current PEFT saves a modules_to_save one as
# 'model.embed_tokens.weight', older versions left 'modules_to_save[.<adapter name>]' in the key;
# when LoRA targets the layer itself, PEFT saves its base weight as '<layer>.base_layer.weight'
# (save_embedding_layers, on by default then) and loads it over the model's before the LoRA adds.
SAVED_MODULE_KEY = re.compile(r"(?P<module>model\.embed_tokens|lm_head)"
                              r"(\.modules_to_save(\.[\w-]+)?|\.base_layer)?\.weight")
SAVABLE_MODULES = {"embed_tokens": "model.embed_tokens", "lm_head": "lm_head"}
# A LoRA update is a correction: PEFT starts B at zero, and a trained update stays a fraction of
# the weight it corrects. One whose root-mean-square is over this many times the weight's comes
# from damaged values (1e30) or a wrong lora_alpha, and the merged model would print garbage.
MAX_DELTA_RATIO = 100.0


def hf_module_names(args: ModelArgs) -> list:
    """Every module of a Hugging Face Llama that LoRA can target, by its full name."""
    per_layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    return (["model.embed_tokens"] + [f"model.layers.{i}.{name}" for i in range(args.n_layers)
                                      for name in per_layer] + ["lm_head"])


def meta_name_of_module(module: str):
    """'model.layers.3.self_attn.q_proj' -> 'layers.3.attention.wq.weight' (None: not a module)."""
    return hf_to_meta_name(module + ".weight")


def target_matches(target_modules, module: str) -> bool:
    """PEFT's rule: a string is a regular expression for the whole name; a list names modules
    by their full name or its last parts."""
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return module != "lm_head" and module != "model.embed_tokens"
        return re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith("." + t) for t in target_modules)


def pattern_value(patterns: dict, module: str, default):
    """PEFT's get_pattern_key: the first pattern that matches the end of the module's name."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


@dataclass
class LoraPair:
    """One module's low-rank update: the weight gains scaling * B @ A (transposed for an
    embedding), with B's rows permuted for q/k."""
    module: str
    load_a: object
    load_b: object
    scaling: float
    embedding: bool


@dataclass
class Adapter:
    folder: Path
    config: dict
    pairs: dict = field(default_factory=dict)         # Meta name -> LoraPair
    replacements: dict = field(default_factory=dict)  # Meta name -> loader of the whole tensor
    shapes: dict = field(default_factory=dict)        # adapter key -> shape


def positive_number(config: dict, key: str, where, integer: bool):
    value = config.get(key)
    wrong_type = isinstance(value, bool) or not isinstance(value, int if integer else (int, float))
    if wrong_type or not math.isfinite(value) or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise BadInput(f"{where}: {key}={value!r} must be {kind}: use the adapter_config.json "
                       "the adapter was trained with")
    return value


def check_config(config: dict, where, args: ModelArgs):
    """Refuse, by name, what is not a LoRA adapter this tool can merge into this model."""
    if not isinstance(config, dict):
        raise BadInput(f"{where} must hold a JSON object (a PEFT adapter config)")
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise BadInput(f"{where}: peft_type={peft_type!r} is not LoRA; only LoRA adapters are "
                       "merged (a prompt-tuning adapter is used with --prompt, not merged)")
    positive_number(config, "r", where, integer=True)
    positive_number(config, "lora_alpha", where, integer=False)
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise BadInput(f"{where}: {key} must be a JSON object of module pattern: value")
        for pattern, value in patterns.items():
            check_regex(pattern, f"{key} pattern", where)
            positive_number({f"{key}[{pattern!r}]": value}, f"{key}[{pattern!r}]", where,
                            integer=key == "rank_pattern")
    if config.get("use_dora"):
        raise BadInput(f"{where}: use_dora=True (DoRA's magnitude vectors) is not merged here: "
                       "merge it with peft, or use a plain LoRA adapter")
    modules = hf_module_names(args)
    targets = config.get("target_modules")
    if isinstance(targets, str):
        check_regex(targets, "target_modules", where)
    wanted = [targets] if isinstance(targets, str) else list(targets or [])
    for target in wanted:
        if not isinstance(target, str) or not any(
                target_matches(target if isinstance(targets, str) else [target], m)
                for m in modules):
            raise BadInput(f"{where}: target_modules names {target!r}, which this model does not "
                           "have (a LLaMA has q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                           "down_proj, embed_tokens, lm_head): the adapter is for another model")
    for name in config.get("modules_to_save") or []:
        if name not in SAVABLE_MODULES and name not in SAVABLE_MODULES.values():
            raise BadInput(f"{where}: modules_to_save names {name!r}; only embed_tokens and "
                           "lm_head can be merged into a LLaMA: the adapter is for another model")


def check_regex(pattern: str, what: str, where):
    """PEFT reads these names as regular expressions: a broken one is the user's to fix."""
    try:
        re.compile(pattern)
    except re.error as error:
        raise BadInput(f"{where}: {what} {pattern!r} is not a valid regular expression "
                       f"({error}): fix it in adapter_config.json") from None


def adapter_tensor_loaders(folder: Path) -> dict:
    """{key: (shape, loader)} of adapter_model.safetensors, else adapter_model.bin."""
    safetensors = folder / "adapter_model.safetensors"
    if safetensors.is_file():
        data_start, header = read_safetensors_header(safetensors)
        return {key: (tuple(entry["shape"]), lambda e=entry, k=key: finite(
                    read_safetensor(safetensors, data_start, e), k, safetensors))
                for key, entry in header.items()}
    pickled = folder / "adapter_model.bin"
    if pickled.is_file():
        state = state_dict_of_tensors(safe_torch_load(pickled), pickled)
        return {key: (tuple(t.shape), lambda t=t, k=key: finite(t, k, pickled))
                for key, t in state.items()}
    raise BadInput(f"--lora {folder} has neither adapter_model.safetensors nor adapter_model.bin: "
                   "pass the folder PEFT saved the adapter in")


def finite(tensor: torch.Tensor, key: str, path) -> torch.Tensor:
    """tensor, refused when it holds NaN or inf: merged, it would spread them through the model."""
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise BadInput(f"{path}: {key} holds NaN or inf values: the adapter is damaged; use "
                       "another copy or an earlier checkpoint of it")
    return tensor


def read_adapter(folder, args: ModelArgs) -> Adapter:
    """The adapter in folder, its config checked against the model and its keys sorted into
    LoRA pairs and whole replacement tensors by Meta name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInput(f"--lora {folder} is not a folder: pass the folder holding "
                       "adapter_config.json and adapter_model.safetensors (or .bin)")
    where = folder / "adapter_config.json"
    config = read_json(where)
    check_config(config, where, args)
    adapter = Adapter(folder, config)
    halves = {}  # (module, embedding) -> {"A": loader, "B": loader}
    for key, (shape, loader) in adapter_tensor_loaders(folder).items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        adapter.shapes[name] = shape
        for pattern, embedding in ((LORA_KEY, False), (LORA_EMBEDDING_KEY, True)):
            match = pattern.fullmatch(name)
            if match:
                halves.setdefault((match.group("module"), embedding), {})[match.group("kind")] = \
                    (loader, name)
                break
        else:
            match = SAVED_MODULE_KEY.fullmatch(name)
            if not match:
                raise BadInput(f"{folder}: {key!r} is not a LoRA weight or a saved embed_tokens/"
                               "lm_head that can be merged into a LLaMA (biases, DoRA and other "
                               "modules are not): the adapter is for another model")
            adapter.replacements[meta_name_of_module(match.group("module"))] = (loader, name)
    for (module, embedding), pair in sorted(halves.items()):
        meta_name = meta_name_of_module(module)
        if meta_name is None or len(pair) != 2:
            what = "names a module this model does not have" if meta_name is None else \
                f"has lora_{'A' if 'A' in pair else 'B'} without its other half"
            raise BadInput(f"{folder}: the LoRA weight of {module!r} {what}: the adapter is "
                           "for another model or incomplete")
        adapter.pairs[meta_name] = LoraPair(module, pair["A"], pair["B"],
                                            scaling_of(config, module), embedding)
    if not adapter.pairs and not adapter.replacements:
        raise BadInput(f"--lora {folder} holds no tensors to merge (no lora_A/lora_B pair and no "
                       "saved embed_tokens/lm_head): pass the folder PEFT saved a trained "
                       "adapter in")
    return adapter


def scaling_of(config: dict, module: str) -> float:
    r = pattern_value(config.get("rank_pattern"), module, config["r"])
    alpha = pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


# ---- planning: every shape checked before anything is computed or written ----

def plan_shapes(adapters: list, shapes: dict, args: ModelArgs) -> dict:
    """The merged model's tensor shapes, refusing any adapter tensor that does not fit the
    model as the adapters before it left it."""
    shapes = dict(shapes)
    for adapter in adapters:
        for meta_name, (_, key) in adapter.replacements.items():
            shape = adapter.shapes[key]
            if len(shape) != 2 or shape[1] != args.dim:
                raise BadInput(f"{adapter.folder}: {key} has shape {list(shape)}, but this model's "
                               f"embeddings are {args.dim} wide: the adapter is for another "
                               "model shape")
            shapes[meta_name] = shape
        for meta_name, pair in adapter.pairs.items():
            if meta_name not in shapes:
                raise BadInput(f"{adapter.folder}: the adapter has LoRA weights for "
                               f"{pair.module}, which this model ({args.n_layers} layers) does "
                               "not have: the adapter is for another model")
            check_pair_shape(adapter, meta_name, pair, shapes[meta_name])
    vocab = {shapes["tok_embeddings.weight"][0], shapes["output.weight"][0]}
    if len(vocab) != 1:
        raise BadInput(f"{adapters[-1].folder}: after merging, embed_tokens has "
                       f"{shapes['tok_embeddings.weight'][0]} rows but lm_head "
                       f"{shapes['output.weight'][0]}: an adapter that resizes the vocabulary "
                       "must save both (modules_to_save: embed_tokens, lm_head)")
    return shapes


def check_pair_shape(adapter: Adapter, meta_name: str, pair: LoraPair, base_shape):
    a_key, b_key = pair.load_a[1], pair.load_b[1]
    a_shape, b_shape = adapter.shapes[a_key], adapter.shapes[b_key]
    rank = pattern_value(adapter.config.get("rank_pattern"), pair.module, adapter.config["r"])
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != rank or b_shape[1] != rank:
        raise BadInput(f"{adapter.folder}: {a_key} {list(a_shape)} and {b_key} {list(b_shape)} "
                       f"are not of rank r={rank} as adapter_config.json says: the adapter's "
                       "files do not belong together")
    # An embedding's A is (r, vocab) and B (dim, r); a linear's A is (r, in) and B (out, r).
    out_in = (a_shape[1], b_shape[0]) if pair.embedding else (b_shape[0], a_shape[1])
    if tuple(out_in) != tuple(base_shape):
        raise BadInput(f"{adapter.folder}: the LoRA update of {pair.module} has shape "
                       f"{list(out_in)}, but the model's weight is {list(base_shape)}: the "
                       "adapter is for another model shape")


# ---- merging, one tensor at a time ----

def lora_delta(pair: LoraPair, args: ModelArgs, meta_name: str) -> torch.Tensor:
    """scaling * B @ A in float64, in the Meta layout."""
    a = pair.load_a[0]().double()
    b = pair.load_b[0]().double()
    delta = b @ a
    if pair.embedding:
        delta = delta.T
    if meta_name.endswith("attention.wq.weight"):
        delta = rotate_half_to_interleaved(delta, args.n_heads)
    elif meta_name.endswith("attention.wk.weight"):
        delta = rotate_half_to_interleaved(delta, args.n_kv_heads)
    return pair.scaling * delta


def merged_tensor(meta_name: str, base: torch.Tensor, adapters: list, args: ModelArgs,
                  dtype=None):
    """base with every adapter applied in order: a saved module replaces the tensor, a LoRA pair
    adds to it. Summed in float64 and rounded once to dtype (default: base's), so the result is
    base + the deltas to the precision stored, whatever the number of adapters."""
    dtype = dtype or base.dtype
    total = None
    for adapter in adapters:
        if meta_name in adapter.replacements:
            total = adapter.replacements[meta_name][0]().double()
        if meta_name in adapter.pairs:
            if total is None:
                total = base.double()
            delta = lora_delta(adapter.pairs[meta_name], args, meta_name)
            check_delta_size(adapter, adapter.pairs[meta_name], delta, total)
            total = total + delta
    if total is None:
        return base.to(dtype)
    merged = total.to(dtype)
    if not torch.isfinite(merged).all():
        raise BadInput(f"merging {', '.join(str(a.folder) for a in adapters)} makes {meta_name} "
                       f"NaN or inf in {str(dtype).replace('torch.', '')}: the adapters' values "
                       "are too large for it; check them, or pick a wider --dtype")
    return merged


def check_delta_size(adapter: Adapter, pair: LoraPair, delta: torch.Tensor, weight: torch.Tensor):
    """Refuse an update absurdly large next to the weight it corrects (see MAX_DELTA_RATIO)."""
    delta_rms, weight_rms = delta.square().mean().sqrt(), weight.square().mean().sqrt()
    if weight_rms > 0 and not delta_rms <= MAX_DELTA_RATIO * weight_rms:
        raise BadInput(f"{adapter.folder}: the LoRA update of {pair.module} has an RMS of "
                       f"{float(delta_rms):.3g}, over {MAX_DELTA_RATIO:g} times its weight's "
                       f"({float(weight_rms):.3g}): the adapter is damaged or its lora_alpha is "
                       "wrong, and merging it would ruin the model")


def describe(adapter: Adapter) -> dict:
    """What converted.json records of one adapter."""
    config = adapter.config
    return {"path": str(adapter.folder.resolve()), "r": config["r"],
            "lora_alpha": config["lora_alpha"], "use_rslora": bool(config.get("use_rslora")),
            "modules": len(adapter.pairs),
            "modules_to_save": sorted(adapter.replacements)}

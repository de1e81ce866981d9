"""The one file format of every tuning method: tuning.pt + tuning.json, written and checked here.

tuning.pt is a plain dict of float32 tensors under global names ("prompt" (n_virtual, dim);
"layers.3.prefix" (2, n_virtual, n_kv_heads, head_dim); "layers.4.adaption_prompt" (len, dim) and
"layers.4.adaption_gate" (1,); "layers.2.attention.wq.lora_A" (r, in) and "...lora_B" (out, r)),
so a folder trained on p stages loads on q. tuning.json holds the method, its sizes (a LoRA's
"lora": r, alpha, dropout, targets, use_rslora), the model's params digest, init, data, steps
and losses. load_tuning also reads
PEFT folders (llama/tuning/peft.py) and the prompt.pt + prompt.json folders of earlier versions.
"""
import json
from pathlib import Path

import torch

from llama.model.transformer import params_digest
from llama.errors import BadInput
from llama.formats.files import atomic_torch_save, atomic_write_text, sha256_of
from llama.formats.tensor_files import read_json, safe_torch_load
from llama.tuning.lora import saved_settings
from llama.tuning.methods import METHODS, apply_saved, expected_shapes
from llama.tuning.peft import import_peft

TUNING_FILES = ("tuning.json", "tuning.pt")  # what save_tuning writes
OLD_PROMPT_FILES = ("prompt.json", "prompt.pt")  # a prompt run of earlier versions; read only


def save_tuning(folder, method: str, tensors: dict, args, metadata: dict):
    """tuning.pt (global name -> float32 tensor) + tuning.json, each written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({k: v.detach().float().cpu().clone() for k, v in sorted(tensors.items())},
                      folder / "tuning.pt")
    # The two files are replaced one after the other: the sha256 lets a reader tell a pair
    # that belongs together from one left half-replaced by a crash between the two writes.
    info = {"method": method, "n_virtual_tokens": n_virtual_of(method, tensors),
            "n_layers": args.n_layers, "dim": args.dim, "n_heads": args.n_heads,
            "n_kv_heads": args.n_kv_heads, "params_digest": params_digest(args),
            "tuning_sha256": sha256_of(folder / "tuning.pt"), **metadata}
    atomic_write_text(folder / "tuning.json", json.dumps(info, indent=2))


def n_virtual_of(method: str, tensors: dict) -> int:
    """Virtual tokens (prefix positions, adaption prompt length) of a method's tensors."""
    for key, tensor in tensors.items():
        if method == "prefix" and key.endswith(".prefix") and tensor.dim() > 1:
            return tensor.shape[1]
        if (key.endswith(".adaption_prompt") or key == "prompt") and tensor.dim() > 0:
            return tensor.shape[0]
    return 0


def load_tuning(path, args):
    """(method, {global name: float32 tensor} of the whole model, info) from ours (tuning.pt, or
    an earlier version's prompt.pt) or PEFT's folder, checked against the model."""
    folder = Path(path)
    if (folder / "tuning.pt").is_file():
        method, tensors, info, source = read_tuning_pt(folder)
    elif (folder / "prompt.pt").is_file():
        method, tensors, info, source = read_old_prompt_pt(folder)
    elif (folder / "adapter_config.json").is_file():
        method, tensors, info = import_peft(folder, args)
        source = folder
    else:
        raise BadInput(f"{folder} holds no tuning.pt, prompt.pt or adapter_config.json: pass the "
                       "--out folder of ft_main.py or a PEFT folder (PROMPT_TUNING, "
                       "PREFIX_TUNING, ADAPTION_PROMPT, LORA)")
    validate(source, method, tensors, info, args)
    return method, {k: t.float() for k, t in tensors.items()}, info


def load_soft_prompt(path, args):
    """(weight, info) for the callers that only put a soft prompt in front (chat, serve)."""
    method, tensors, info = load_tuning(path, args)
    if method != "prompt":
        raise BadInput(f"{path} holds a {method} tuning, not a soft prompt: pass a folder of "
                       "ft_main.py --method prompt, or use example_ft.py, which runs every method")
    return tensors["prompt"], info


def read_pair(folder: Path, stem: str):
    """(what <stem>.pt holds, the dict of <stem>.json, the .pt path), the pair's sha256 checked."""
    pt, info_path = folder / f"{stem}.pt", folder / f"{stem}.json"
    if not info_path.is_file():
        raise BadInput(f"{info_path} is missing beside {pt.name}: the folder is not a complete "
                       f"tuning checkpoint; pass the folder ft_main.py --out wrote ({pt.name} + "
                       f"{info_path.name}) or its peft/ export")
    info = read_json(info_path)
    if not isinstance(info, dict):
        raise BadInput(f"{info_path} must hold a JSON object")
    if info.get(f"{stem}_sha256") not in (None, sha256_of(pt)):
        raise BadInput(f"{info_path} describes another {pt.name} than the one beside it (a save "
                       "was interrupted, or the files were mixed up): resume the run from its "
                       "checkpoint.pt, or train again")
    return safe_torch_load(pt, mmap=False), info, pt


def read_tuning_pt(folder: Path):
    tensors, info, pt = read_pair(folder, "tuning")
    if info.get("method") not in METHODS:
        raise BadInput(f"{pt.with_suffix('.json')} names method {info.get('method')!r}, not one "
                       f"of {', '.join(METHODS)}: pass a folder ft_main.py wrote")
    if not isinstance(tensors, dict):
        raise BadInput(f"{pt} does not hold a dict of tensors: pass a folder ft_main.py wrote")
    return info["method"], tensors, info, pt


def read_old_prompt_pt(folder: Path):
    """Earlier versions saved a prompt as a bare tensor in prompt.pt + prompt.json."""
    weight, info, pt = read_pair(folder, "prompt")
    return "prompt", {"prompt": weight}, {**info, "method": "prompt"}, pt


def validate(source, method: str, tensors: dict, info: dict, args):
    """Every check a tuning passes before use, whatever file it came from."""
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise BadInput(f"{source}: {key!r} is not a float tensor: the file is not a tuning "
                           "checkpoint; pass a folder ft_main.py wrote")
    check_shapes(source, method, tensors, args, info)
    declared, n_virtual = info.get("n_virtual_tokens"), n_virtual_of(method, tensors)
    if declared is not None and declared != n_virtual:
        raise BadInput(f"{source} holds {n_virtual} virtual tokens but its description says "
                       f"{declared!r}: the files do not belong together")
    if not isinstance(info.get("template") or "", str):
        raise BadInput(f"the description of {source} names template {info['template']!r}, "
                       "which is not a template name")
    digest = info.get("params_digest")
    if digest is not None and digest != params_digest(args):
        raise BadInput(f"{source} was trained for another model (params digest {digest}, this "
                       f"model's is {params_digest(args)}): use the matching --ckpt_dir")
    if not all(torch.isfinite(t).all() for t in tensors.values()):
        raise BadInput(f"{source} contains NaN or inf values: use an earlier checkpoint")


def check_shapes(source, method: str, tensors: dict, args, info: dict):
    """Every name the model needs, each of the right shape; a file for another model, or for
    another method, names the first difference."""
    n_virtual = n_virtual_of(method, tensors)
    # An adapter's layers must be the top ones, as many as it has.
    adapter_layers = min(max(sum(k.endswith(".adaption_prompt") for k in tensors), 1),
                         args.n_layers)
    # A LoRA's rank and targets are its tensors' (every layer the same), its alpha the info's.
    lora = saved_settings(source, tensors, info) if method == "lora" else None
    expected = expected_shapes(method, args, n_virtual, adapter_layers, lora)
    kinds = {e.rsplit(".", 1)[-1] for e in expected}
    foreign = sorted(k for k in tensors if k.rsplit(".", 1)[-1] not in kinds)
    if foreign:
        raise BadInput(f"{source} holds {foreign[0]!r}, not a tensor of the {method} method it "
                       "is described as: the files were mixed up; pass a folder one run wrote")
    if method != "lora" and not 1 <= n_virtual < args.max_seq_len:
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


def saved_tuning(folder):
    """The method for prepare_stage (llama/prepare/stage.py): rank 0 reads and checks the folder
    and sends it to every stage, which keeps the tensors of its own layers. Returns the tuning;
    its description (template, ...) is kept on the function for the caller."""
    def method(ctx, model, tokenizer):
        loaded = load_tuning(folder, model.args) if ctx.rank == 0 else None
        name, tensors, method.info = ctx.broadcast_object(loaded)
        return apply_saved(model, name, tensors, ctx.is_first, method.info)
    return method

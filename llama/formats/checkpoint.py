"""Our own files: split directories (split.json + one file per stage), atomic writes, and loading
any checkpoint (split, Meta, llama2.c, Hugging Face) into the model of one pipeline stage.

A stage file is a plain state dict with the model's own key names, holding only that stage's
tensors; split.json records which layers each file holds and its sha256.
"""
import json
import shutil
from pathlib import Path

import torch

from llama.errors import BadInput
from llama.formats.files import (atomic_torch_save, atomic_write_text, check_output_folder,
                         clean_stale_folders_beside, fsync_dir, make_temp_folder, replace_folder,
                         sha256_of)
from llama.formats.hf import HFSource
from llama.formats.layouts import Llama2cSource, MetaSource, TensorSource, model_args_from_dict
from llama.formats.tensor_files import read_json, safe_torch_load
from llama.formats.tp_files import (TP_SPLIT_FORMAT, check_tp_manifest, stage_files,
                                    stage_shard_tensors, tp_fetch, write_tp_shards)
from llama.model.transformer import ModelArgs, Transformer, args_to_params, params_digest
from llama.model.partition import (balanced_ranges, check_stage_memory, check_weights_fit,
                                   describe_stage, ranges_from_counts)
from llama.model.tensor_shards import check_tp, shard_stage
from llama.model.dtypes import dtype_named
from llama.model.hf_tokenizer import (TOKENIZER_JSON_NAMES, derived_generation_config,
                                      is_hf_tokenizer, tokenizer_files_to_copy)
from llama.model.quant import SCHEMES, apply_quantization, quantizing_fetch
from llama.model.quant_scheme import check_quantizable, quantization_args, quantization_entry

SPLIT_FORMAT = 1
# A quantized split says format 2, so that a reader from before quantization refuses it at once
# ("not a format-1 split manifest") instead of failing on its packed weights.
QUANTIZED_SPLIT_FORMAT = 2


# ---- which tensors a stage owns ----

def stage_tensor_names(args: ModelArgs, layer_range, embeddings: bool, head: bool):
    with torch.device("meta"):
        model = Transformer(args, layer_range, embeddings, head)
    return list(model.state_dict().keys())


def refuse_unknown_tensors(source: TensorSource, where):
    """Strict loading for whole checkpoints: a tensor the model has no place for (a bias, a
    layer beyond params.json's n_layers) means the weights and params.json disagree."""
    known = stage_tensor_names(source.args, (0, source.args.n_layers), True, True)
    unknown = sorted(set(source.names()) - set(known))
    if unknown:
        raise BadInput(f"{where} has {len(unknown)} weights this model does not have (first: "
                       f"{unknown[0]}): its params.json does not match the weights, or it is not "
                       "a LLaMA checkpoint")


def stage_plan(args: ModelArgs, n_stages: int, capacities=None, layer_counts=None):
    """[(layer_range, has_embeddings, has_head)] for each stage: balanced by parameters, in
    proportion to each card's capacity (GiB) if given, or the given number of layers a stage."""
    if isinstance(n_stages, bool) or not isinstance(n_stages, int) or \
            not 1 <= n_stages <= args.n_layers:
        raise BadInput(f"n_stages={n_stages!r} must be an integer from 1 to the model's "
                       f"n_layers={args.n_layers}")
    if layer_counts is not None:
        try:
            ranges = ranges_from_counts(args.n_layers, list(layer_counts))
        except (ValueError, TypeError):
            raise BadInput(f"--layers {list(layer_counts)} must be one positive number of layers "
                           f"per stage, adding up to the model's n_layers={args.n_layers}") from None
        if len(ranges) != n_stages:
            raise BadInput(f"--layers {list(layer_counts)} gives {len(ranges)} stages but "
                           f"--n_stages is {n_stages}: give one count per stage")
    elif capacities is not None:
        ranges = balanced_ranges(args, n_stages, check_stage_memory(capacities, n_stages))
    else:
        ranges = balanced_ranges(args, n_stages)
    return [(r, i == 0, i == n_stages - 1) for i, r in enumerate(ranges)]


# ---- opening checkpoints ----

def is_split_dir(path) -> bool:
    return (Path(path) / "split.json").is_file()


def open_source(path, **overrides) -> TensorSource:
    """A TensorSource for a Meta folder, a Hugging Face folder or a llama2.c .bin (file or folder)."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"checkpoint {path} does not exist: download it (python -m llama.formats.download) "
                       "or fix --ckpt_dir")
    if path.is_file():
        return Llama2cSource(path, **overrides)
    if (path / "params.json").is_file() and list(path.glob("consolidated.*.pth")):
        return MetaSource(path, **overrides)
    if (path / "config.json").is_file():
        return HFSource(path, **overrides)
    bins = [p for p in path.glob("*.bin") if not p.name.startswith("tok")]
    if len(bins) == 1:
        return Llama2cSource(bins[0], **overrides)
    if list(path.glob("consolidated.*.pth")):
        raise BadInput(f"{path / 'params.json'} is missing: the Meta layout needs it beside the shards")
    raise BadInput(f"{path} holds no checkpoint this tool reads (split.json, params.json + "
                   "consolidated.NN.pth, config.json + safetensors, or one llama2.c .bin)")


def find_tokenizer(ckpt_dir) -> str:
    """tokenizer.model beside the weights, in the parent folder (Meta's layout) or any *.model;
    else a Hugging Face tokenizer.json beside them (Llama 3, Qwen2.5: no tokenizer.model)."""
    folder = Path(ckpt_dir)
    folder = folder.parent if folder.is_file() else folder
    for candidate in (folder / "tokenizer.model", folder.parent / "tokenizer.model"):
        if candidate.is_file():
            return str(candidate)
    models = sorted(folder.glob("*.model"))
    if len(models) == 1:
        return str(models[0])
    if (folder / "tokenizer.json").is_file():
        return str(folder / "tokenizer.json")
    raise BadInput(f"no tokenizer.model or tokenizer.json found beside {ckpt_dir}: pass "
                   "--tokenizer_path")


def copy_tokenizer(tokenizer_path, folder: Path):
    """Copy a tokenizer into folder: tokenizer.model, or tokenizer.json with the files beside it
    that name its BOS and stop tokens."""
    for source, name in tokenizer_files_to_copy(tokenizer_path):
        shutil.copyfile(source, folder / name)
    if is_hf_tokenizer(tokenizer_path) and derived_generation_config(tokenizer_path):
        atomic_write_text(folder / "generation_config.json",
                          json.dumps(derived_generation_config(tokenizer_path), indent=2))


# ---- split directories ----

def safe_child(folder: Path, name, what: str) -> Path:
    """folder/name, refusing names that would leave the folder (../x, /abs, sub/dirs)."""
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise BadInput(f"{folder / 'split.json'} names {what} {name!r}, which is not a plain file "
                       "name inside the folder; split the model again")
    return folder / name


# What a split folder holds: only these are ever replaced by --overwrite.
SPLIT_FILE_NAMES = r"params\.json|split\.json|tokenizer\.model|stage\.\d+(\.tp\d+)?\.pth|" + \
    TOKENIZER_JSON_NAMES


def write_stage_file(source: TensorSource, folder: Path, index: int, stage, target_dtype,
                     quantization, tp: int = 1):
    """Write stage.NN.pth of one (layer_range, embeddings, head) into folder (with tp > 1: one
    stage.NN.tpR.pth per TP rank, llama/formats/tp_files.py): (its split.json entry, the dtype of
    its float tensors). Quantized stages store the block linears packed (quantized whole, then
    cut)."""
    layer_range, embeddings, head = stage

    def load_float(name):
        tensor = source.load(name)
        return tensor if target_dtype is None else tensor.to(target_dtype)
    names, fetch = stage_tensor_names(source.args, layer_range, embeddings, head), load_float
    if quantization:
        with torch.device("meta"):
            model = apply_quantization(Transformer(source.args, layer_range, embeddings, head),
                                       **quantization_args(quantization))
        names = list(model.state_dict())
        fetch = quantizing_fetch(load_float, model, **quantization_args(quantization))
    tensors = {name: fetch(name).detach().clone().contiguous() for name in names}
    # the dtype of the float tensors (a norm's weight), not of the packed codes
    stored_dtype = str(tensors[names[-1]].dtype if not quantization else next(
        t.dtype for t in tensors.values() if t.is_floating_point())).replace("torch.", "")
    entry = {"layers": list(layer_range), "embeddings": embeddings, "head": head}
    if tp > 1:
        entry["files"] = write_tp_shards(tensors, folder, index, tp)
        return {**entry, "bytes": sum(f["bytes"] for f in entry["files"])}, stored_dtype
    file_name = f"stage.{index:02d}.pth"
    atomic_torch_save(tensors, folder / file_name)
    return {"file": file_name, **entry, "bytes": (folder / file_name).stat().st_size,
            "sha256": sha256_of(folder / file_name)}, stored_dtype


def write_split(source: TensorSource, out_dir, n_stages: int, dtype: str = "auto",
                tokenizer_path=None, overwrite: bool = False, log=print, reads=(),
                quantize=None, group_size=None, stage_memory=None, layer_counts=None, tp: int = 1):
    """Write out_dir/{params.json, split.json, stage.NN.pth, tokenizer.model}, atomically as a folder.

    One stage's tensors are in memory at a time, each cloned so a file never carries the bytes
    of a bigger tensor it was a view of. An existing out_dir is replaced only when it is a split
    (with overwrite) and holds none of `reads` (the checkpoint's path) nor the tokenizer.
    quantize ("int8"/"int4") stores the block linears packed (llama/model/quant.py); stage_memory
    (GiB per card) or layer_counts (layers per stage) size the stages to unequal cards. tp:
    each stage as that many tensor-parallel shard files (llama/formats/tp_files.py).
    """
    out_dir = Path(out_dir)
    clean_stale_folders_beside(out_dir)
    check_output_folder(out_dir, "--out_dir", "a split folder that split_model.py wrote",
                        "split.json", SPLIT_FILE_NAMES, [*reads, tokenizer_path], overwrite)
    target_dtype = None if dtype == "auto" else dtype_named(dtype)
    check_tp(source.args, tp)
    quantization = quantization_entry(source.args, quantize, group_size, tp)
    plan = stage_plan(source.args, n_stages, stage_memory, layer_counts)
    if stage_memory is not None:
        float_bytes = target_dtype.itemsize if target_dtype else \
            source.load(source.names()[0]).dtype.itemsize
        check_weights_fit(source.args, plan, stage_memory, float_bytes, quantization)
    refuse_unknown_tensors(source, source.description.get("path", "the checkpoint"))
    tmp_dir = make_temp_folder(out_dir, "--out_dir")
    try:
        stages, stored_dtype = [], None
        for index, stage in enumerate(plan):
            entry, stored_dtype = write_stage_file(source, tmp_dir, index, stage, target_dtype,
                                                   quantization, tp)
            stages.append(entry)
            log(f"stage {index}: {describe_stage(*stage)}: {entry['bytes'] / 2**20:.1f} MiB"
                + (f" in {tp} TP files" if tp > 1 else ""))
        manifest = {"format": TP_SPLIT_FORMAT if tp > 1 else
                    QUANTIZED_SPLIT_FORMAT if quantization else SPLIT_FORMAT,
                    **({"tp": tp} if tp > 1 else {}), "n_stages": n_stages, "n_layers": source.args.n_layers,
                    "stages": stages, "source": source.description, "dtype": stored_dtype,
                    "params_digest": params_digest(source.args)}
        if quantization:
            manifest["quantization"] = quantization
        if stage_memory is not None:
            manifest["stage_memory_gib"] = list(stage_memory)
        atomic_write_text(tmp_dir / "params.json", json.dumps(args_to_params(source.args), indent=2))
        atomic_write_text(tmp_dir / "split.json", json.dumps(manifest, indent=2))
        if tokenizer_path:
            copy_tokenizer(tokenizer_path, tmp_dir)
        fsync_dir(tmp_dir)
        replace_folder(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return manifest


def read_split(split_dir, **overrides):
    """(ModelArgs, manifest) of a split directory, with the manifest checked against the model."""
    split_dir = Path(split_dir)
    manifest = read_json(split_dir / "split.json")
    written = model_args_from_dict(read_json(split_dir / "params.json"), str(split_dir / "params.json"))
    stages = manifest.get("stages") if isinstance(manifest, dict) else None
    known = (SPLIT_FORMAT, QUANTIZED_SPLIT_FORMAT, TP_SPLIT_FORMAT)
    if isinstance(manifest, dict) and isinstance(manifest.get("format"), int) and \
            manifest["format"] > max(known):
        raise BadInput(f"{split_dir / 'split.json'} is format {manifest['format']}, newer than "
                       f"this reader (up to {max(known)}): update the project or "
                       "split the model again with this one")
    if manifest.get("format") not in known or \
            not isinstance(stages, list) or not stages:
        raise BadInput(f"{split_dir / 'split.json'} is not a format-{SPLIT_FORMAT} split manifest; "
                       "split the model again with split_model.py")
    check_tp_manifest(split_dir, manifest)
    check_manifest_quantization(split_dir, manifest, written)
    if manifest.get("n_layers") != written.n_layers or \
            manifest.get("params_digest") != params_digest(written):
        raise BadInput(f"{split_dir / 'split.json'} was written for another model than "
                       f"{split_dir / 'params.json'}: split the model again")
    args = ModelArgs(**{**args_to_params(written), **overrides})
    expected_start = 0
    for i, stage in enumerate(stages):
        layers = stage.get("layers") if isinstance(stage, dict) else None
        if not (isinstance(layers, list) and len(layers) == 2 and layers[0] == expected_start
                and layers[0] < layers[1] <= args.n_layers):
            raise BadInput(f"{split_dir / 'split.json'}: stage {i} has layers {layers!r}, which do "
                           "not continue the previous stage; split the model again")
        for entry in stage_files(split_dir, manifest, i):
            safe_child(split_dir, entry.get("file"), f"stage {i} file")
        expected_start = layers[1]
    if expected_start != args.n_layers:
        raise BadInput(f"{split_dir / 'split.json'}: stages cover layers 0..{expected_start - 1} "
                       f"of {args.n_layers}; split the model again")
    return args, manifest


def check_manifest_quantization(split_dir, manifest, args):
    """A quantized split must say format 2 and a scheme and group size this reader knows."""
    quantization = manifest.get("quantization")
    if quantization is None and manifest["format"] != QUANTIZED_SPLIT_FORMAT:
        return
    scheme = quantization.get("scheme") if isinstance(quantization, dict) else None
    if manifest["format"] == SPLIT_FORMAT or scheme not in SCHEMES:
        raise BadInput(f"{split_dir / 'split.json'} records quantization {quantization!r}, which "
                       f"this reader does not know (it reads {' and '.join(SCHEMES)} in format "
                       f"{QUANTIZED_SPLIT_FORMAT}): update the project or split the model again")
    try:
        check_quantizable(args, quantization, manifest.get("tp", 1))
    except BadInput as error:
        raise BadInput(f"{split_dir / 'split.json'}: {error}") from None


def load_stage_tensors(split_dir, manifest, index: int, verify: bool = True,
                       tp_rank: int = 0) -> dict:
    """The tensors of stage index's file (of its TP rank tp_rank's file in a TP split)."""
    split_dir = Path(split_dir)
    entry = stage_files(split_dir, manifest, index)[tp_rank]
    path = safe_child(split_dir, entry["file"], f"stage {index} file")
    if not path.is_file():
        raise BadInput(f"stage file {path} is missing: split the model again")
    if verify and entry.get("sha256") and sha256_of(path) != entry["sha256"]:
        raise BadInput(f"stage file {path} does not match the sha256 in split.json (corrupt or "
                       "replaced): split the model again")
    tensors = safe_torch_load(path)
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise BadInput(f"stage file {path} is not a state dict of tensors: split the model again")
    return tensors


# ---- the runtime's view: the model of one stage ----

def _split_stage_source(ckpt_dir, stage: int, n_stages: int, overrides: dict, verify: bool,
                        tp_rank: int, tp_size: int):
    """(args, stage plan, tensors by name) from a split directory: the split's own stages, or
    every stage file when one process runs them all; TP rank tp_rank's shards of them."""
    args, manifest = read_split(ckpt_dir, **overrides)
    split_stages = manifest["stages"]
    if n_stages == 1 and len(split_stages) > 1:
        plan, files = ((0, args.n_layers), True, True), range(len(split_stages))
    elif n_stages == len(split_stages):
        layers = tuple(split_stages[stage]["layers"])
        plan, files = (layers, stage == 0, stage == n_stages - 1), [stage]
    else:
        raise BadInput(f"{ckpt_dir} is split into {len(split_stages)} stages but "
                       f"{n_stages} were asked for (torchrun --nproc_per_node): launch "
                       f"{len(split_stages)} processes or split again with --n_stages {n_stages}")
    tensors = {}
    for i in files:
        tensors.update(stage_shard_tensors(
            lambda r, i=i: load_stage_tensors(ckpt_dir, manifest, i, verify, r),
            manifest.get("tp", 1), tp_rank, tp_size))
    return args, plan, tensors, manifest.get("quantization")


def stage_skeleton(args, plan, quantization, tp_rank: int = 0, tp_size: int = 1):
    """The stage on the meta device, quantized and cut to its TP shard as asked: its state dict
    names and shapes are what a load must supply."""
    with torch.device("meta"):
        model = Transformer(args, *plan)
        if quantization:
            model = apply_quantization(model, **quantization_args(quantization))
        return shard_stage(model, tp_rank, tp_size) if tp_size > 1 else model


def load_model(ckpt_dir, stage: int = 0, n_stages: int = 1, device="cpu", dtype=torch.float32,
               max_seq_len=None, verify: bool = True, quantize=None, group_size=None,
               tp_rank: int = 0, tp_size: int = 1):
    """The Transformer for `stage` of `n_stages`, weights loaded strictly, frozen, on device.

    From a split directory the stages are the split's own (n_stages must match); from any other
    checkpoint the layers are balanced on the fly and only this stage's tensors are read.
    A quantized split loads its packed weights as they are; quantize ("int8"/"int4") quantizes
    a float checkpoint's block linears while loading, one layer at a time. tp_size > 1: TP rank
    tp_rank's shard of the stage (llama/model/tensor_shards.py), read from its own file where
    the split or Meta's shards have one, else cut from the whole tensors (quantized first).
    """
    overrides = {"max_seq_len": max_seq_len} if max_seq_len else {}
    split, source = is_split_dir(ckpt_dir), None
    stored_quantization = None
    whole_first = quantize is not None and tp_size > 1  # quantize whole tensors, then cut
    if split:
        args, plan, tensors, stored_quantization = _split_stage_source(
            ckpt_dir, stage, n_stages, overrides, verify,
            *((0, 1) if whole_first else (tp_rank, tp_size)))
        fetch, available = tensors.__getitem__, set(tensors)
    else:
        source = open_source(ckpt_dir, **overrides)
        refuse_unknown_tensors(source, ckpt_dir)
        args, plan = source.args, stage_plan(source.args, n_stages)[stage]
        fetch, available = source.load, set(source.names())
    if stored_quantization and quantize is not None:
        raise BadInput(f"{ckpt_dir} is already quantized ({stored_quantization['scheme']}): drop "
                       "--quantize, or give the float checkpoint")
    check_tp(args, tp_size)
    quantization = stored_quantization or quantization_entry(args, quantize, group_size, tp_size)
    model = stage_skeleton(args, plan, quantization, tp_rank, tp_size)
    if quantization and not stored_quantization:
        fetch = quantizing_fetch(fetch, model, **quantization_args(quantization))
        available |= set(model.state_dict())
    if not split or whole_first:
        fetch = tp_fetch(source, fetch, tp_rank, tp_size, quantizing=whole_first)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = [name for name in expected if name not in available]
    if missing:
        raise BadInput(f"{ckpt_dir} lacks {len(missing)} weights of stage {stage} "
                       f"(first: {missing[0]}): the checkpoint is incomplete or for another model")
    unexpected = sorted(available - set(expected)) if split else []
    if unexpected:
        raise BadInput(f"{ckpt_dir} stage {stage} has unexpected weights (first: "
                       f"{unexpected[0]}): split the model again")
    state = {}
    for name, shape in expected.items():
        tensor = fetch(name)
        if tuple(tensor.shape) != shape:
            raise BadInput(f"{ckpt_dir}: {name} has shape {tuple(tensor.shape)}, the model expects "
                           f"{shape} (params.json does not match the weights)")
        # packed integer codes keep their type; floats (scales too) take the run's dtype
        state[name] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
    model.load_state_dict(state, strict=True, assign=True)
    return model.requires_grad_(False).eval()

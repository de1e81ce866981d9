"""Convert any checkpoint this project reads (llama2.c .bin, Hugging Face, Meta, a split folder)
to Meta's layout (params.json + consolidated.NN.pth) or Hugging Face's (--to hf), with
tokenizer.model when one is found and converted.json saying what it was made from; optionally
merging PEFT LoRA adapters on the way and checking files against a published sha256 list;
or to one GGUF file for llama.cpp (--to gguf, llama/formats/gguf.py).

    python -m llama.formats.convert --src ckpts/stories260K --dst ckpts/stories260K_meta [--n_shards 1]
    python -m llama.formats.convert --src ckpts/7B --lora lora_a,lora_b --dst ckpts/7B-merged \
        [--tokenizer_path lora_b/tokenizer.model] [--sha256 SHA256.md] [--to hf]
    python -m llama.formats.convert --src ckpts/stories260K --dst stories260K.gguf --to gguf \
        [--gguf_type f32|f16|q8_0]
"""
import json
import shutil
from pathlib import Path

from dataclasses import replace

from llama.formats.checkpoint import (copy_tokenizer, find_tokenizer, is_split_dir,
                              load_stage_tensors, open_source, read_split, refuse_unknown_tensors,
                              stage_tensor_names)
from llama.formats.checksums import Sha256List, check_files, format_list
from llama.cli import run_cli
from llama.errors import BadInput
from llama.formats.files import (atomic_write_text, check_output_folder, clean_stale_folders_beside,
                         make_temp_folder, replace_folder, sha256_of)
from llama.formats.layouts import META_SHARD_DIM, save_meta
from llama.formats.gguf import (GGUF_TYPES, TYPE_NAMES, check_describable, check_destination,
                                write_gguf)
from llama.formats.hf import save_hf_safetensors
from llama.formats.tensor_files import read_json
from llama.formats.lora import describe, merged_tensor, plan_shapes, read_adapter
from llama.model.dtypes import dtype_named
from llama.model.hf_tokenizer import TOKENIZER_JSON_NAMES, is_hf_tokenizer
from llama.model.quant import dequantize
from llama.model.tokenizer import Tokenizer

# Written into every converted folder: --overwrite replaces only a folder that has it and
# nothing but the files listed here (a Meta download of one's own has no marker).
MARKER = "converted.json"
CONVERTED_FILE_NAMES = (r"converted\.json|params\.json|tokenizer\.model|consolidated\.\d+\.pth"
                        r"|config\.json|model\.safetensors|" + TOKENIZER_JSON_NAMES)
LAYOUTS = ("meta", "hf", "gguf")
# What a tuning folder trained here (tuning.json's "method") or by PEFT (peft_type) holds when
# it is not LoRA: inputs added to the model, not a change of its weights.
NOT_MERGEABLE = {"prompt": "a soft prompt", "prefix": "per-layer key/value prefixes",
                 "adapter": "LLaMA-Adapter's gated adaption prompts"}
PEFT_NOT_MERGEABLE = {"PROMPT_TUNING": "prompt", "P_TUNING": "prompt",
                      "PREFIX_TUNING": "prefix", "ADAPTION_PROMPT": "adapter"}


def read_all_tensors(src):
    """(ModelArgs, {Meta name: tensor}, description) of every weight in the checkpoint at src;
    a quantized split's packed linears come back dequantized, in the split's float dtype."""
    if is_split_dir(src):
        args, manifest = read_split(src)
        tensors = {}
        for index in range(len(manifest["stages"])):
            tensors.update(load_stage_tensors(src, manifest, index))
        if manifest.get("quantization"):
            tensors = dequantized(tensors, manifest["quantization"]["scheme"])
        wanted = stage_tensor_names(args, (0, args.n_layers), True, True)
        if sorted(tensors) != sorted(wanted):
            odd = sorted(set(tensors) ^ set(wanted))[0]
            raise BadInput(f"{src} does not hold exactly the model's weights ({odd!r} is "
                           f"{'extra' if odd in tensors else 'missing'}): split the model again")
        return args, tensors, f"a {len(manifest['stages'])}-stage split"
    source = open_source(src)
    refuse_unknown_tensors(source, src)
    tensors = {name: source.load(name) for name in source.names()}
    return source.args, tensors, source.description["format"]


def dequantized(tensors: dict, scheme: str) -> dict:
    """A quantized split's tensors with each packed linear (weight + scales [+ zeros]) turned
    back into its float weight, w = code * scale (int8) or (code - 8) * scale + zero (int4)."""
    result = {}
    for name, tensor in tensors.items():
        prefix, field = name.rsplit(".", 1)
        if field in ("scales", "zeros"):
            continue
        scales = tensors.get(f"{prefix}.scales")
        result[name] = tensor if scales is None else dequantize(
            scheme, tensor, scales, tensors.get(f"{prefix}.zeros"), scales.dtype)
    return result


def check_shardable(tensors: dict, n_shards: int):
    """Every tensor Meta cuts must divide evenly into n_shards along its model-parallel dim."""
    for name, tensor in tensors.items():
        if tensor.dim() < 2:
            continue
        size = tensor.shape[META_SHARD_DIM[name.split(".")[-2]]]
        if size % n_shards:
            raise BadInput(f"--n_shards {n_shards} does not divide {name} (size {size} along "
                           "its model-parallel dimension): pick a divisor of it, or 1")


def files_in(path) -> list:
    """The files a checkpoint or adapter path stands for: itself, or the files in the folder."""
    path = Path(path)
    return sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else \
        [path] if path.is_file() else []


def refuse_unmergeable(folder: Path):
    """A soft prompt, prefix or adapter (ours or PEFT's) passed as --lora: say in one line that
    it is not a weight change, rather than fail on the LoRA files it lacks."""
    method, what = None, f"--lora {folder}"
    if (folder / "tuning.json").is_file():
        info = read_json(folder / "tuning.json")
        method = info.get("method") if isinstance(info, dict) else None
    elif (folder / "prompt.pt").is_file():
        method = "prompt"
    elif (folder / "adapter_config.json").is_file():
        config = read_json(folder / "adapter_config.json")
        peft_type = config.get("peft_type") if isinstance(config, dict) else None
        method = PEFT_NOT_MERGEABLE.get(str(peft_type).upper())
        what = f"{folder / 'adapter_config.json'}: peft_type={peft_type!r} is not LoRA; it"
    if method in NOT_MERGEABLE:
        raise BadInput(f"{what} holds {NOT_MERGEABLE[method]} (method {method}): it adds inputs "
                       "to the model instead of changing its weights, so it cannot be merged "
                       "into a checkpoint or GGUF: run it with example_ft.py --prompt "
                       f"{folder} (docs/convert.md says what llama.cpp runs)")


def merge_adapters(args, tensors: dict, lora_folders: list, target_dtype):
    """(merged args, merged tensors, adapters): every adapter checked against the model before
    any tensor is computed, then each tensor merged on its own (the base stays memory-mapped)."""
    adapters = [read_adapter(folder, args) for folder in lora_folders]
    shapes = plan_shapes(adapters, {name: tuple(t.shape) for name, t in tensors.items()}, args)
    merged_args = replace(args, vocab_size=shapes["tok_embeddings.weight"][0])
    for name in list(tensors):
        tensors[name] = merged_tensor(name, tensors[name], adapters, args, target_dtype)
    return merged_args, tensors, adapters


def tokenizer_for(tokenizer_path, base_tokenizer, adapters, args, base_vocab: int):
    """The tokenizer to ship with the result, checked against its vocabulary when it was given
    or when an adapter resized the vocabulary (then the adapter's own is the default)."""
    resized = args.vocab_size != base_vocab
    tokenizer = tokenizer_path
    if tokenizer is None and resized:
        own = [a.folder / "tokenizer.model" for a in adapters
               if (a.folder / "tokenizer.model").is_file()]
        if not own:
            raise BadInput(f"the adapters resize the vocabulary from {base_vocab} to "
                           f"{args.vocab_size} pieces but none holds a tokenizer.model: pass "
                           "the adapter's tokenizer with --tokenizer_path")
        tokenizer = own[-1]
    if tokenizer is None:
        return base_tokenizer
    pieces = Tokenizer(str(tokenizer)).n_words
    # a tokenizer.json may make fewer ids than the embedding has rows (Qwen2.5 pads it)
    if pieces > args.vocab_size or (pieces != args.vocab_size and not is_hf_tokenizer(tokenizer)):
        why = f" (the adapters resized it from {base_vocab})" if resized else ""
        raise BadInput(f"tokenizer {tokenizer} has {pieces} pieces but the merged model's "
                       f"vocabulary has {args.vocab_size}{why}: pass the tokenizer that came "
                       "with the adapter (--tokenizer_path)")
    return tokenizer


def check_outputs(tmp_dir: Path, dst: Path, sha_list, checked: dict) -> dict:
    """{file name: sha256} of what was written, checked against the --sha256 list if any."""
    written = {p.name: p for p in files_in(tmp_dir)}
    hashes = {name: sha256_of(path) for name, path in written.items()}
    if sha_list:
        checked.update(check_files(sha_list, [(dst / name, p) for name, p in written.items()],
                                   "output", set(checked.values()),
                                   {written[name]: digest for name, digest in hashes.items()}))
        if not checked:
            raise BadInput(f"--sha256 {sha_list.path} names none of the files read or written "
                           f"(first listed: {next(iter(sha_list.hashes))}): list them as "
                           "'hash  file name'")
    return hashes


def check_inputs(sha_list, src, lora_folders, tokenizer_path, base_tokenizer) -> dict:
    """Every file read that the --sha256 list names, checked before any work."""
    if not sha_list:
        return {}
    inputs = [*files_in(src), *(f for folder in lora_folders if folder.is_dir()
                                for f in files_in(folder))]
    inputs += [Path(t) for t in (tokenizer_path, base_tokenizer) if t and Path(t).is_file()]
    return check_files(sha_list, [(p, p) for p in inputs], "input")


def write_layout(tensors: dict, args, folder: Path, to: str, n_shards: int):
    if to == "hf":
        save_hf_safetensors(tensors, args, folder)
    else:
        save_meta(tensors, args, folder, n_shards)


def check_arguments(n_shards, to: str, dtype: str, gguf_type):
    if isinstance(n_shards, bool) or not isinstance(n_shards, int) or n_shards < 1:
        raise BadInput(f"--n_shards={n_shards!r} must be a positive integer")
    if to not in LAYOUTS:
        raise BadInput(f"--to {to!r} is not a layout written here: use meta, hf or gguf")
    if to in ("hf", "gguf") and n_shards != 1:
        raise BadInput(f"--n_shards {n_shards} is for the Meta layout: --to {to} writes one "
                       f"{'model.safetensors' if to == 'hf' else 'file'}, so leave --n_shards out")
    if to == "gguf" and dtype != "auto":
        raise BadInput(f"--dtype {dtype} is for the Meta and HF layouts: a GGUF's precision is "
                       f"--gguf_type ({', '.join(GGUF_TYPES)})")
    if to != "gguf" and gguf_type is not None:
        raise BadInput(f"--gguf_type {gguf_type} is for --to gguf: add it, or drop --gguf_type")
    if to == "gguf" and gguf_type not in GGUF_TYPES:
        raise BadInput(f"--gguf_type {gguf_type!r} is not a GGUF type written here: use "
                       f"{', '.join(GGUF_TYPES)}")


def export_gguf(src, dst: Path, lora_folders, tokenizer_path, base_tokenizer, gguf_type: str):
    """The model (LoRA adapters merged) as one GGUF file with its tokenizer inside."""
    args, tensors, what = read_all_tensors(src)
    check_describable(args, tokenizer_path or base_tokenizer)
    base_vocab = args.vocab_size
    args, tensors, adapters = merge_adapters(args, tensors, lora_folders, None)
    tokenizer = tokenizer_for(tokenizer_path, base_tokenizer, adapters, args, base_vocab)
    if tokenizer is None:
        raise BadInput(f"no tokenizer.model found beside {src}, and a GGUF file carries its "
                       "tokenizer: pass it with --tokenizer_path")
    provenance = {"source": Path(src).name, "source_format": what}
    if adapters:
        provenance["lora"] = ",".join(a.folder.name for a in adapters)
    plan = write_gguf(dst, args, tensors, tokenizer, gguf_type, provenance)
    types = sorted({TYPE_NAMES[ggml_type] for _, _, ggml_type in plan})
    merged = f", {len(adapters)} LoRA adapter(s) merged" if adapters else ""
    print(f"wrote {dst}: {what} as GGUF {gguf_type} ({'/'.join(types)}), {len(plan)} tensors, "
          f"{dst.stat().st_size / 2**20:.1f} MiB{merged}")
    fallback = [name for name, tensor, t in plan if gguf_type == "q8_0" and tensor.dim() > 1
                and t != GGUF_TYPES["q8_0"][0]]
    if fallback:
        print(f"note: {len(fallback)} matrices (first: {fallback[0]}) have rows that are not whole "
              "q8_0 blocks of 32, so they are f16, as llama.cpp's own converter writes them")
    if not any(name == "output.weight" for name, _, _ in plan):
        print("note: the classifier equals the embedding (tied), so only token_embd is written; "
              "llama.cpp uses it for both")
    print(f"run it with llama.cpp: llama-simple -m {dst} -n 64 'Once upon a time'")
    print(f"sha256 of the file written:\n{sha256_of(dst)}  {dst.name}")


def main(src: str, dst: str, n_shards: int = 1, dtype: str = "auto", overwrite: bool = False,
         lora: str = None, tokenizer_path: str = None, sha256: str = None, to: str = "meta",
         gguf_type: str = None):
    """Convert a checkpoint (llama2.c .bin, Hugging Face, Meta, a split folder) to Meta's or HF's
    layout, or to one GGUF file for llama.cpp.

    Writes dst/params.json and dst/consolidated.NN.pth … (+ tokenizer.model when one is found),
    or dst/config.json and dst/model.safetensors with --to hf, or the file dst with --to gguf;
    merges LoRA adapters on the way.

    src: the checkpoint to read: a llama2.c .bin, a Hugging Face, Meta or split folder
    dst: the folder to write (with --to gguf, the file)
    n_shards: how many model-parallel shards (consolidated.NN.pth) to write
    dtype: auto keeps the checkpoint's own precision; float32, float16 or bfloat16 converts
    overwrite: replace dst if it already exists
    lora: PEFT LoRA adapter folders to merge, in order, separated by commas (a,b)
    tokenizer_path: the tokenizer to ship, checked against the merged vocabulary (default: the
      one beside src, or the adapter's own when an adapter resizes the vocabulary)
    sha256: a published list ('hash  file' lines, a SHA256.md table or JSON): every input and
      output file it names is checked (inputs only with --to gguf), and the result's list is
      printed in its format
    to: the layout to write: meta, hf (Hugging Face safetensors + config.json) or gguf (one
      file for llama.cpp, tokenizer inside)
    gguf_type: with --to gguf, the matrices' type: f32, f16 (default) or q8_0; norms stay f32
    """
    if to == "gguf" and gguf_type is None:
        gguf_type = "f16"  # llama.cpp's converter's default too
    check_arguments(n_shards, to, dtype, gguf_type)
    target_dtype = None if dtype == "auto" else dtype_named(dtype)
    lora_folders = [Path(str(p).strip()) for p in
                    (lora.split(",") if isinstance(lora, str) else lora or []) if str(p).strip()]
    dst = Path(dst)
    clean_stale_folders_beside(dst)
    try:
        base_tokenizer = find_tokenizer(src)
    except BadInput:
        base_tokenizer = None
    reads = [src, base_tokenizer, tokenizer_path, sha256, *lora_folders]
    if to == "gguf":
        check_destination(dst, reads, overwrite)
    else:
        check_output_folder(dst, "--dst", "a folder that llama.formats.convert wrote", MARKER,
                            CONVERTED_FILE_NAMES, reads, overwrite)
    for folder in lora_folders:
        refuse_unmergeable(folder)
    sha_list = Sha256List(sha256) if sha256 else None
    checked = check_inputs(sha_list, src, lora_folders, tokenizer_path, base_tokenizer)
    if to == "gguf":
        if sha_list and not checked:
            raise BadInput(f"--sha256 {sha_list.path} names none of the files read (first "
                           f"listed: {next(iter(sha_list.hashes))}): list them as 'hash  file name'")
        return export_gguf(src, dst, lora_folders, tokenizer_path, base_tokenizer, gguf_type)

    export_folder(src, dst, lora_folders, tokenizer_path, base_tokenizer, target_dtype, to,
                  n_shards, sha_list, checked)

def export_folder(src, dst: Path, lora_folders, tokenizer_path, base_tokenizer, target_dtype,
                  to: str, n_shards: int, sha_list, checked: dict):
    """The model (LoRA adapters merged) in the Meta or HF layout, with converted.json."""
    # Written beside dst and renamed at the end: a failure, whatever it is, leaves no
    # half-converted folder; made before the work so an unwritable --dst is refused at once.
    tmp_dir = make_temp_folder(dst, "--dst")
    try:
        args, tensors, what = read_all_tensors(src)
        base_vocab = args.vocab_size
        args, tensors, adapters = merge_adapters(args, tensors, lora_folders, target_dtype)
        tokenizer = tokenizer_for(tokenizer_path, base_tokenizer, adapters, args, base_vocab)
        if to == "meta":
            check_shardable(tensors, n_shards)
        if tokenizer is None:
            print(f"note: no tokenizer found beside {src}; copy tokenizer.model into {dst} yourself")
        dtype_name = str(next(iter(tensors.values())).dtype).replace("torch.", "")
        write_layout(tensors, args, tmp_dir, to, n_shards)
        if tokenizer is not None:
            copy_tokenizer(tokenizer, tmp_dir)
        hashes = check_outputs(tmp_dir, dst, sha_list, checked)
        marker = {"written_by": "llama.formats.convert", "source": str(Path(src).resolve()),
                  "source_format": what, "layout": to, "n_shards": n_shards, "dtype": dtype_name,
                  "lora": [describe(adapter) for adapter in adapters], "sha256": hashes}
        atomic_write_text(tmp_dir / MARKER, json.dumps(marker, indent=2))
        replace_folder(tmp_dir, dst)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    merged = f", {len(adapters)} LoRA adapter(s) merged" if adapters else ""
    print(f"wrote {dst}: {what} as {'Hugging Face' if to == 'hf' else 'Meta'} layout, "
          f"{n_shards} shard(s), {len(tensors)} tensors ({dtype_name}){merged}")
    print(f"sha256 of the files written:\n{format_list(hashes, sha_list.format if sha_list else 'plain')}")


if __name__ == "__main__":
    run_cli(main)

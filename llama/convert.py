"""Convert any checkpoint this project reads (llama2.c .bin, Hugging Face, Meta, a split folder)
to Meta's layout: params.json + consolidated.NN.pth (+ tokenizer.model when one is found), and
converted.json saying what it was converted from.

    python -m llama.convert --src ckpts/stories260K --dst ckpts/stories260K_meta [--n_shards 1]
"""
import json
import os
import shutil
from pathlib import Path

from llama.checkpoint import (find_tokenizer, is_split_dir, load_stage_tensors,
                              open_source, read_split, refuse_unknown_tensors,
                              stage_tensor_names)
from llama.errors import BadInput, run_cli
from llama.files import atomic_write_text, check_output_folder
from llama.formats import META_SHARD_DIM, save_meta
from llama.precision import dtype_named

# Written into every converted folder: --overwrite replaces only a folder that has it and
# nothing but the files listed here (a Meta download of one's own has no marker).
MARKER = "converted.json"
CONVERTED_FILE_NAMES = r"converted\.json|params\.json|tokenizer\.model|consolidated\.\d+\.pth"


def read_all_tensors(src):
    """(ModelArgs, {Meta name: tensor}, description) of every weight in the checkpoint at src."""
    if is_split_dir(src):
        args, manifest = read_split(src)
        tensors = {}
        for index in range(len(manifest["stages"])):
            tensors.update(load_stage_tensors(src, manifest, index))
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


def check_shardable(tensors: dict, n_shards: int):
    """Every tensor Meta cuts must divide evenly into n_shards along its model-parallel dim."""
    for name, tensor in tensors.items():
        if tensor.dim() < 2:
            continue
        size = tensor.shape[META_SHARD_DIM[name.split(".")[-2]]]
        if size % n_shards:
            raise BadInput(f"--n_shards {n_shards} does not divide {name} (size {size} along "
                           "its model-parallel dimension): pick a divisor of it, or 1")


def main(src: str, dst: str, n_shards: int = 1, dtype: str = "auto", overwrite: bool = False):
    """Convert a checkpoint (llama2.c .bin, Hugging Face, Meta, a split folder) to Meta's layout.

    Writes dst/params.json and dst/consolidated.00.pth … (+ tokenizer.model when one is found).

    src: the checkpoint to read: a llama2.c .bin, a Hugging Face, Meta or split folder
    dst: the folder to write
    n_shards: how many model-parallel shards (consolidated.NN.pth) to write
    dtype: auto keeps the checkpoint's own precision; float32, float16 or bfloat16 converts
    overwrite: replace dst if it already exists
    """
    if isinstance(n_shards, bool) or not isinstance(n_shards, int) or n_shards < 1:
        raise BadInput(f"--n_shards={n_shards!r} must be a positive integer")
    target_dtype = None if dtype == "auto" else dtype_named(dtype)
    dst = Path(dst)
    try:
        tokenizer = find_tokenizer(src)
    except BadInput:
        tokenizer = None
    check_output_folder(dst, "--dst", "a folder that llama.convert wrote", MARKER,
                        CONVERTED_FILE_NAMES, [src, tokenizer], overwrite)
    args, tensors, what = read_all_tensors(src)
    if target_dtype is not None:
        tensors = {name: t.to(target_dtype) for name, t in tensors.items()}
    check_shardable(tensors, n_shards)
    if tokenizer is None:
        print(f"note: no tokenizer found beside {src}; copy tokenizer.model into {dst} yourself")
    dtype_name = str(next(iter(tensors.values())).dtype).replace("torch.", "")
    # Written beside dst and renamed at the end: a failure leaves no half-converted folder.
    tmp_dir = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    try:
        save_meta(tensors, args, tmp_dir, n_shards)
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp_dir / "tokenizer.model")
        marker = {"written_by": "llama.convert", "source": str(Path(src).resolve()),
                  "source_format": what, "n_shards": n_shards, "dtype": dtype_name}
        atomic_write_text(tmp_dir / MARKER, json.dumps(marker, indent=2))
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp_dir, dst)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    print(f"wrote {dst}: {what} as Meta layout, {n_shards} shard(s), {len(tensors)} tensors "
          f"({dtype_name})")


if __name__ == "__main__":
    run_cli(main)

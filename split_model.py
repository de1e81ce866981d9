"""Split a LLaMA checkpoint into one file per pipeline stage (and tensor-parallel rank), optionally quantized.

    python split_model.py --ckpt_dir ckpts/7B --n_stages 4        # writes ckpts/7B_pp4/
    python split_model.py --ckpt_dir ckpts/7B --n_stages 2 --stage_memory 4,8 --quantize int4
    python split_model.py --ckpt_dir ckpts/7B --n_stages 2 --tp 2  # ckpts/7B_pp2_tp2/, 4 files
Reads the Meta, llama2.c or Hugging Face layout; see llama/formats/checkpoint.py for the output format.
"""
import time
from pathlib import Path
from typing import Sequence

from llama.formats.checkpoint import find_tokenizer, is_split_dir, open_source, read_split, write_split
from llama.cli import run_cli
from llama.errors import BadInput


def main(ckpt_dir: str, n_stages: int, out_dir: str = None, dtype: str = "auto",
         tokenizer_path: str = None, overwrite: bool = False, quantize: str = None,
         group_size: int = None, stage_memory: Sequence[float] = None,
         layers: Sequence[int] = None, tp: int = 1):
    """Split a LLaMA checkpoint into one file per pipeline stage, for torchrun or one process.

    Writes <out_dir> with params.json, split.json and stage.NN.pth (each stage's weights only;
    with --tp N, stage.NN.tpR.pth: TP rank R's shard of stage NN).

    ckpt_dir: the checkpoint: a Meta folder, a llama2.c .bin or a Hugging Face folder
    n_stages: how many pipeline stages (processes) to split into, from 1 to the model's layers
    out_dir: the folder to write (default: <ckpt_dir>_pp<n_stages>[_tp<tp>][_int8|_int4])
    dtype: auto keeps the checkpoint's own precision; float16, bfloat16 or float32 converts
    tokenizer_path: the tokenizer.model to copy beside the stages (default: found beside the
        checkpoint)
    overwrite: replace an existing split at out_dir
    quantize: int8 (a scale per output channel) or int4 (a scale and zero per group) for the
        block linears; embeddings, norms and head stay in --dtype (docs/quantization.md)
    group_size: int4 inputs per scale (default: the largest power of two up to 128 dividing
        every width)
    stage_memory: GiB of each stage's card, e.g. 4,4,8: layers are shared in proportion
    layers: the number of layers of each stage, e.g. 12,10,10 (instead of a balanced split)
    tp: tensor-parallel ranks per stage: each stage's block linears cut into tp files (heads and
        FFN rows; embeddings, norms and head whole in each), run with torchrun --nproc_per_node
        n_stages x tp (docs/tensor_parallel.md)
    """
    if is_split_dir(ckpt_dir):
        stored = read_split(ckpt_dir)[1].get("quantization")
        what = f"a split quantized to {stored['scheme']}" if stored else "a split"
        raise BadInput(f"{ckpt_dir} is already {what} (split.json): give the float checkpoint "
                       "it was split from")
    source = open_source(ckpt_dir)
    if out_dir is None:
        out_dir = f"{str(ckpt_dir).rstrip('/')}_pp{n_stages}" + (f"_tp{tp}" if tp != 1 else "") + \
            (f"_{quantize}" if quantize else "")
    try:
        tokenizer_path = tokenizer_path or find_tokenizer(ckpt_dir)
    except BadInput:
        print(f"note: no tokenizer found beside {ckpt_dir}; pass --tokenizer_path to the scripts")
    started = time.monotonic()

    def log_with_time(line):  # a big model takes minutes per stage: show that it is moving
        print(f"{line} ({time.monotonic() - started:.1f} s)", flush=True)

    manifest = write_split(source, out_dir, n_stages, dtype, tokenizer_path, overwrite,
                           log=log_with_time, reads=[ckpt_dir], quantize=quantize,
                           group_size=group_size, stage_memory=stage_memory, layer_counts=layers,
                           tp=tp)
    total = sum(stage["bytes"] for stage in manifest["stages"])
    scheme = manifest.get("quantization", {}).get("scheme")
    grid = f"{n_stages} stages" + (f" x TP {tp} ({n_stages * tp} files)" if tp != 1 else "")
    print(f"wrote {Path(out_dir)}: {grid}, {total / 2**20:.1f} MiB in all "
          f"({manifest['dtype']}{', block linears ' + scheme if scheme else ''}) in "
          f"{time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    run_cli(main)

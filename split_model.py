"""Split a LLaMA checkpoint into one file per pipeline stage.

    python split_model.py --ckpt_dir ckpts/7B --n_stages 4        # writes ckpts/7B_pp4/
Reads the Meta, llama2.c or Hugging Face layout; see llama/checkpoint.py for the output format.
"""
import time
from pathlib import Path

from llama.checkpoint import find_tokenizer, open_source, write_split
from llama.errors import BadInput, run_cli


def main(ckpt_dir: str, n_stages: int, out_dir: str = None, dtype: str = "auto",
         tokenizer_path: str = None, overwrite: bool = False):
    """Split a LLaMA checkpoint into one file per pipeline stage, for torchrun or one process.

    Writes <out_dir> with params.json, split.json and stage.NN.pth (each stage's weights only).

    ckpt_dir: the checkpoint: a Meta folder, a llama2.c .bin or a Hugging Face folder
    n_stages: how many pipeline stages (processes) to split into, from 1 to the model's layers
    out_dir: the folder to write (default: <ckpt_dir>_pp<n_stages>)
    dtype: auto keeps the checkpoint's own precision; float16, bfloat16 or float32 converts
    tokenizer_path: the tokenizer.model to copy beside the stages (default: found beside the
        checkpoint)
    overwrite: replace an existing split at out_dir
    """
    source = open_source(ckpt_dir)
    if out_dir is None:
        out_dir = f"{str(ckpt_dir).rstrip('/')}_pp{n_stages}"
    try:
        tokenizer_path = tokenizer_path or find_tokenizer(ckpt_dir)
    except BadInput:
        print(f"note: no tokenizer found beside {ckpt_dir}; pass --tokenizer_path to the scripts")
    started = time.monotonic()

    def log_with_time(line):  # a big model takes minutes per stage: show that it is moving
        print(f"{line} ({time.monotonic() - started:.1f} s)", flush=True)

    manifest = write_split(source, out_dir, n_stages, dtype, tokenizer_path, overwrite,
                           log=log_with_time, reads=[ckpt_dir])
    total = sum(stage["bytes"] for stage in manifest["stages"])
    print(f"wrote {Path(out_dir)}: {n_stages} stages, {total / 2**20:.1f} MiB in all "
          f"({manifest['dtype']}) in {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    run_cli(main)

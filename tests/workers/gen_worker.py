"""Worker: generate for a batch of prompts through however many stages are running.

Run as one process or as a group of ranks (tests/launch.py); rank 0 writes the new ids of a
greedy run and of a sampled run (same seed) to --out as JSON. --cuda_graph: the static decode path.
"""
import json

from llama.cli import run_cli

from llama.formats.checkpoint import load_model
from llama.parallel.distributed import init_distributed
from llama.serving.generation import generate
from llama.parallel.pipeline import Stage


def main(ckpt, out, prompts, max_gen_len=12, temperature=0.8, top_p=0.9, seed=0, stop_ids=(1, 2),
         cuda_graph=False):
    prompts = json.loads(prompts) if isinstance(prompts, str) else prompts
    ctx = init_distributed(device="cpu", timeout_s=60)
    stage = Stage(load_model(ckpt, ctx.rank, ctx.world_size), ctx, cuda_graph=cuda_graph)
    results = {
        "greedy": generate(stage, prompts, max_gen_len, 0.0, top_p, tuple(stop_ids), seed),
        "sampled": generate(stage, prompts, max_gen_len, temperature, top_p, tuple(stop_ids), seed),
    }
    if ctx.is_first:
        with open(out, "w") as f:
            json.dump(results, f)
    ctx.close()


if __name__ == "__main__":
    run_cli(main)

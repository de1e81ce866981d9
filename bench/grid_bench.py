"""Per-token decode latency of one process, a 2-stage pipeline and 2 tensor-parallel ranks, side
by side in one job, timed in alternating rounds (a busy machine slows all three alike).

    python -m bench.grid_bench --shape small                  # starts its own 2 processes
    python -m bench.grid_bench --shape 7B --dtype float16     # on a GPU (nccl with 2 GPUs)

One 2-process job holds three set-ups of the same random model: the whole model on rank 0 (rank
1 waits), stage 0 and stage 1 of a pipeline, and the two TP shards of the whole model. Each round
runs greedy generation of --gen_len tokens and of 1 token (the prefill) on each; a token's
latency is their difference over gen_len - 1. One JSON line per set-up (median and range over
the rounds, and the median paired ratio to one process), then a table. On a CPU the two
processes share the same cores and memory bandwidth, so the numbers show what each layout
costs, not what two devices gain.
"""
import dataclasses
import statistics
import sys

import torch
import torch.distributed as dist

from bench import common
from bench.decode_bench import random_prompts
from bench.shapes import model_args, random_model, random_stage, shape_name
from llama.cli import run_cli
from llama.errors import BadInput
from llama.model.tensor_shards import check_tp, shard_stage
from llama.parallel.distributed import DistContext, init_distributed
from llama.parallel.pipeline import Stage
from llama.parallel.tensor_parallel import apply_tensor_parallel
from llama.prepare.stage import pick_dtype
from llama.serving.generation import generate

TABLE = ["layout", "batch", "ms_per_token_median", "ms_per_token_min", "ms_per_token_max",
         "vs_one_process", "vs_one_process_min", "vs_one_process_max"]


def layouts(ctx, args, dtype, seed):
    """{name: the Stage this rank runs it with, or None where it sits out}: the same weights
    (random_model's values depend on the tensor's name only) in three layouts."""
    pipeline = Stage(random_stage(args, ctx.rank, 2, ctx.device, dtype, seed), ctx)
    # every rank of the job is one stage's TP rank; the TP group is the whole job's
    tp_ctx = dataclasses.replace(ctx, tp_size=2, tp_group=dist.group.WORLD, pending_sends=[])
    whole = random_model(args, device=ctx.device, dtype=dtype, seed=seed)
    tp_model = apply_tensor_parallel(shard_stage(whole, ctx.rank, 2), tp_ctx)
    alone = DistContext(device=ctx.device, timeout_s=ctx.timeout_s)
    one = Stage(random_model(args, device=ctx.device, dtype=dtype, seed=seed), alone) \
        if ctx.rank == 0 else None
    return {"one process": one, "2 stages (PP 2)": pipeline, "TP 2": Stage(tp_model, tp_ctx)}


def rounds(ctx, stages, prompts, gen_len: int, repeats: int) -> dict:
    """{name: seconds per token of each round} on rank 0 (every rank runs every layout it is in,
    in the same order; a rank that sits one out waits at the barrier after it)."""
    clock = common.Clock(ctx.device)

    def seconds(stage, n_new):
        started = clock.now()
        generate(stage, prompts, n_new, temperature=0.0, stop_ids=())
        return clock.now() - started

    per_token = {name: [] for name in stages}
    for round_index in range(repeats + 1):  # the first round warms up and is not kept
        for name, stage in stages.items():
            if stage is not None:
                decode_s = seconds(stage, gen_len) - seconds(stage, 1)
                if round_index:
                    per_token[name].append(decode_s / (gen_len - 1))
            ctx.barrier()
    return per_token


def summary(name, times, first_times, batch: int, gen_len: int) -> dict:
    ratios = [mine / first for mine, first in zip(times, first_times) if first > 0]
    kept = [t for t in times if t > 0] or [float("nan")]
    return {"bench": "grid_decode", "layout": name, "batch": batch, "gen_len": gen_len,
            "rounds": len(times), "ms_per_token_median": 1e3 * statistics.median(kept),
            "ms_per_token_min": 1e3 * min(kept), "ms_per_token_max": 1e3 * max(kept),
            "vs_one_process": statistics.median(ratios) if ratios else None,
            "vs_one_process_min": min(ratios, default=None),
            "vs_one_process_max": max(ratios, default=None)}


def main(shape: str = "small", batch: int = 1, prompt_len: int = 16, gen_len: int = 32,
         repeats: int = 5, dtype: str = "auto", device: str = None, seed: int = 0,
         timeout_s: float = 600.0):
    """Per-token decode latency: one process, PP 2 and TP 2, in alternating rounds.

    shape: a named shape (tiny, small, 7B, ...) or a params.json
    batch: rows decoded together
    prompt_len: tokens of each random prompt
    gen_len: tokens generated per timing (the latency is over the gen_len - 1 after the first)
    repeats: rounds kept (after one warm-up round)
    dtype: float32 on a CPU, float16 on a GPU unless given
    device: cpu, cuda (default: a GPU if there is one)
    """
    for name, value in (("batch", batch), ("prompt_len", prompt_len), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BadInput(f"--{name} {value!r} must be a positive integer")
    if isinstance(gen_len, bool) or not isinstance(gen_len, int) or gen_len < 2:
        raise BadInput(f"--gen_len {gen_len!r} must be an integer of at least 2")
    args = model_args(shape, max_seq_len=prompt_len + gen_len + 1)
    check_tp(args, 2)
    if not common.started_by_torchrun():
        sys.exit(common.relaunch_as_stages("bench.grid_bench", 2))
    ctx = init_distributed(device, timeout_s)
    if ctx.world_size != 2:
        raise BadInput(f"torchrun started {ctx.world_size} processes: this bench runs on 2")
    dtype = pick_dtype(dtype, ctx.device)
    with torch.no_grad():
        stages = layouts(ctx, args, dtype, seed)
    prompts = random_prompts(args.vocab_size, batch, prompt_len, seed)
    times = rounds(ctx, stages, prompts, gen_len, repeats)
    ctx.close()
    if ctx.rank != 0:
        return
    env = {"shape": shape_name(shape), "dtype": str(dtype).replace("torch.", ""),
           "backend": ctx.backend, "threads": torch.get_num_threads(),
           **common.environment(ctx.device)}
    records = [summary(name, found, times["one process"], batch, gen_len)
               for name, found in times.items()]
    for record in records:
        common.emit({**record, **env})
    common.print_table(records, TABLE)


if __name__ == "__main__":
    run_cli(main)

"""What fits on the cards you have: every configuration (quantization, micro-batch, recompute /
offload) of pipelined soft-prompt or LoRA training, each stage's estimated peak and margin, best
first.

    python -m llama.tools.plan --model 7B --gpus 4,4 --global_batch 32 --seq_len 512
    python -m llama.tools.plan --model 7B --gpus 4,4 --method lora --lora_r 8 --lora_targets all
    python -m llama.tools.plan --model 7B --gpus 4,4 --tp 2    # 2 stages x 2 TP ranks: 4 cards

Arithmetic only (llama/training/memory.py), nothing runs; stages are one per card, layers shared in
proportion to the cards (split_model.py --stage_memory makes the same split).
"""
import math
from typing import Sequence

from llama.formats.checkpoint import is_split_dir, open_source, read_split, stage_plan
from llama.cli import run_cli
from llama.errors import BadInput
from llama.training.memory import all_reduce_bytes_per_token, stage_estimates
from llama.model.named_shapes import NAMED_SHAPES
from llama.model.transformer import ModelArgs
from llama.model.partition import parameter_costs
from llama.model.dtypes import DTYPES
from llama.model.quant import largest_group_size
from llama.model.tensor_shards import check_tp
from llama.tuning.lora import lora_settings
from llama.tuning.methods import METHODS

MODES = ("plain", "recompute", "offload")
# Step time, for ordering only: compute at an assumed rate, offloaded activations over PCIe, and
# a dequantized copy of each weight per layer pass where no fused kernel runs (int4 here).
ASSUMED_TFLOPS = 20.0
ASSUMED_PCIE_GBPS = 16.0
ASSUMED_MEMORY_GBPS = 300.0


def model_args_for(model):
    if str(model) in NAMED_SHAPES:
        return ModelArgs(**NAMED_SHAPES[str(model)])
    if is_split_dir(model):
        return read_split(model)[0]
    return open_source(model).args


def quantization_options(args, dtype_name, tp: int = 1):
    group_size = largest_group_size(args.dim // tp, args.hidden_dim // tp)
    return [(dtype_name, None), ("int8", {"scheme": "int8"}),
            ("int4", {"scheme": "int4", "group_size": group_size})]


def step_seconds(args, rows, mode, quantization, tokens_per_micro, dtype_bytes) -> float:
    """Rough step time: the slowest stage's work per micro-batch times (n_micro + p - 1); a TP
    rank does a tp-th of the blocks' work and waits for its all-reduces (over PCIe here)."""
    layer, embeddings, head = parameter_costs(args)
    flops_per_param = 6 if mode in ("recompute", "offload") else 4  # forward + input grad (+ fwd)
    per_micro = []
    for row in rows:
        n_layers = row["layers"][1] - row["layers"][0]
        params = n_layers * layer / row["tp"] + (row["stage"] == len(rows) - 1) * head
        seconds = flops_per_param * params * tokens_per_micro / (ASSUMED_TFLOPS * 1e12)
        if mode == "offload":  # each layer input out to pinned memory and back
            seconds += 2 * n_layers * tokens_per_micro * args.dim * dtype_bytes / \
                (ASSUMED_PCIE_GBPS * 1e9)
        if quantization and quantization["scheme"] == "int4":  # dequantized per pass
            passes = 3 if mode != "plain" else 2
            seconds += passes * n_layers * layer / row["tp"] * dtype_bytes / \
                (ASSUMED_MEMORY_GBPS * 1e9)
        seconds += tokens_per_micro * row["all_reduce_bytes_per_token"] / (ASSUMED_PCIE_GBPS * 1e9)
        per_micro.append(seconds)
    return max(per_micro) * (rows[0]["n_micro"] + len(rows) - 1)


def configurations(args, gpus, global_batch, seq_len, n_virtual_tokens, dtype_name, schedule,
                   reserve_gib, lora=None, tp: int = 1):
    """One dict per (quantization, micro-batch, mode), with per-stage peaks and margins (of each
    of a stage's tp cards)."""
    dtype_bytes = DTYPES[dtype_name].itemsize
    plan = stage_plan(args, len(gpus), capacities=gpus)
    micro_batches = [b for b in (1, 2, 4, 8, 16, 32, 64) if b <= global_batch and
                     global_batch % b == 0]
    found = []
    for name, quantization in quantization_options(args, dtype_name, tp):
        for micro_batch in micro_batches:
            rows = stage_estimates(args, plan, global_batch, micro_batch, seq_len,
                                   n_virtual_tokens, dtype_bytes, schedule, 1.0, quantization,
                                   lora, tp)
            for mode in MODES:
                peaks = [row[f"peak_{mode}_gib"] + reserve_gib for row in rows]
                margins = [gpu - peak for gpu, peak in zip(gpus, peaks)]
                found.append({
                    "quantization": name, "micro_batch": micro_batch, "mode": mode,
                    "layers": [row["layers"] for row in rows], "peaks": peaks,
                    "margins": margins, "fits": min(margins) >= 0,
                    "step_s": step_seconds(args, rows, mode, quantization,
                                           micro_batch * (seq_len + n_virtual_tokens), dtype_bytes)})
    return found


def describe(config) -> str:
    layers = " ".join(f"[{a},{b})" for a, b in config["layers"])
    stages = ", ".join(f"{p:.2f} ({m:+.2f})" for p, m in zip(config["peaks"], config["margins"]))
    return (f"{config['quantization']:<8} micro_batch {config['micro_batch']:<3} "
            f"{config['mode']:<9} layers {layers}  peak GiB (margin): {stages}  "
            f"~{config['step_s']:.1f} s/step")


def cards_said(sizes, tp: int) -> str:
    cards = " + ".join(f"{g:g} GiB" for g in sizes)
    return cards if tp == 1 else f"{len(sizes)} stages x TP {tp} of ({cards}) cards"


def tp_wire_line(args, layers, dtype_bytes: int, tp: int) -> str:
    """What a TP rank of the largest stage sends per token: its all-reduces, beside what the
    pipeline sends between stages (one hidden vector a token, each way in training)."""
    n_layers = max(b - a for a, b in layers)
    step = all_reduce_bytes_per_token(args, n_layers, dtype_bytes, tp, backward=True)
    decode = all_reduce_bytes_per_token(args, n_layers, dtype_bytes, tp, backward=False)
    return (f"TP all-reduces, one card of the largest stage ({n_layers} layers): "
            f"{step / 1024:.1f} KiB sent per token of a training step, {decode / 1024:.1f} KiB "
            f"per generated token (the pipeline sends {args.dim * dtype_bytes / 1024:.1f} KiB "
            "per token per stage boundary)")


def check_counts(**counts):
    """Each of these flags counts something, so it must be a positive integer."""
    for flag, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BadInput(f"--{flag}={value!r} must be a positive integer")


def check_arguments(gpus, dtype, schedule, global_batch, seq_len, top, n_virtual_tokens,
                    reserve_gib, method) -> list:
    """Refuse, in one line each, what main cannot plan with; the card sizes as a list."""
    sizes = list(gpus) if isinstance(gpus, (list, tuple)) else [gpus]
    if not sizes or any(isinstance(g, bool) or not isinstance(g, (int, float)) or not g > 0
                        for g in sizes):
        raise BadInput(f"--gpus {sizes} must be one size in GiB per card, e.g. --gpus 4,4")
    if dtype not in DTYPES or schedule not in ("1f1b", "gpipe"):
        raise BadInput(f"--dtype {dtype!r} must be one of {', '.join(DTYPES)} and --schedule "
                       f"{schedule!r} 1f1b or gpipe")
    check_counts(global_batch=global_batch, seq_len=seq_len, top=top)
    if isinstance(n_virtual_tokens, bool) or not isinstance(n_virtual_tokens, int) or \
            n_virtual_tokens < 0:
        raise BadInput(f"--n_virtual_tokens={n_virtual_tokens!r} must be a whole number, 0 or more")
    if isinstance(reserve_gib, bool) or not isinstance(reserve_gib, (int, float)) or \
            not 0 <= reserve_gib < math.inf:
        raise BadInput(f"--reserve_gib={reserve_gib!r} must be a number of GiB, 0 or more")
    if method not in METHODS:
        raise BadInput(f"--method {method!r} must be one of {', '.join(METHODS)}")
    return sizes


def main(model: str = "7B", gpus: Sequence[float] = (4.0, 4.0), global_batch: int = 32,
         seq_len: int = 512, n_virtual_tokens: int = 32, dtype: str = "float16",
         schedule: str = "1f1b", reserve_gib: float = 0.5, top: int = 10,
         method: str = "prompt", lora_r: int = 8, lora_targets: str = "q,v", tp: int = 1):
    """Print the training configurations that fit on the given cards, best first.

    model: a named shape (7B, 13B, Llama-3.2-1B, Qwen2.5-0.5B, Mistral-7B and the others in llama/model/named_shapes.py) or a checkpoint folder (its params.json)
    gpus: GiB of each card, one pipeline stage per card, e.g. 4,4 or 4,4,8
    global_batch: sequences per optimizer step
    seq_len: tokens per sequence (the soft prompt's tokens come on top)
    n_virtual_tokens: soft-prompt length
    dtype: the float dtype of the unquantized weights and activations
    schedule: 1f1b or gpipe (how many micro-batches a stage holds at once)
    reserve_gib: GiB of each card kept for the CUDA context and the allocator's slack
    top: how many fitting configurations to print
    method: prompt (also prefix, adapter: their few numbers are not counted) or lora
    lora_r: with --method lora, the rank of each update
    lora_targets: with --method lora, the projections updated (q,k,v,o,gate,up,down, attention,
        mlp or all), as ft_main.py takes them
    tp: tensor-parallel cards per stage, each the size --gpus gives its stage: the peaks are
        one card's, and the all-reduce bytes a card sends per token are printed
    """
    sizes = check_arguments(gpus, dtype, schedule, global_batch, seq_len, top, n_virtual_tokens,
                            reserve_gib, method)
    lora = lora_settings(r=lora_r, targets=lora_targets) if method == "lora" else None
    n_virtual_tokens = 0 if lora else n_virtual_tokens  # a LoRA takes no positions
    args = model_args_for(model)
    check_tp(args, tp)
    if len(sizes) > args.n_layers:
        raise BadInput(f"--gpus lists {len(sizes)} cards but the model has {args.n_layers} layers")
    found = configurations(args, [float(g) for g in sizes], global_batch, seq_len,
                           n_virtual_tokens, dtype, schedule, reserve_gib, lora, tp)
    fits = sorted((c for c in found if c["fits"]), key=lambda c: (c["step_s"], -min(c["margins"])))
    what = (f"LoRA r {lora.r} on {','.join(lora.targets)}" if lora else
            f"+{n_virtual_tokens} virtual")
    print(f"{model} on {cards_said(sizes, tp)}, global batch {global_batch} x {seq_len} tokens "
          f"({what}), {schedule}, {reserve_gib:g} GiB reserved a card; estimates, not measured:")
    if tp > 1:
        print(tp_wire_line(args, [c["layers"] for c in found][0], DTYPES[dtype].itemsize, tp))
    for config in fits[:top]:
        print(f"fits  {describe(config)}")
    if not fits:
        closest = max(found, key=lambda c: min(c["margins"]))
        short = -min(closest["margins"])
        print(f"nothing fits: the closest is {describe(closest)}, {short:.2f} GiB short on its "
              "fullest card; add a card, use bigger ones, or shorten --seq_len")
    return fits


if __name__ == "__main__":
    run_cli(main)

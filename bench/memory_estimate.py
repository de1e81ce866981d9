"""Per-stage GPU memory of pipelined soft-prompt training, by arithmetic (nothing is run).

    python -m bench.memory_estimate --shape 7B --n_stages 4,2 --micro_batch 1,2,4,8,32
    python -m bench.memory_estimate --shape tiny --check    # formula vs what autograd saves

Which switches a memory target needs, before a GPU is at hand. The formulas are in
docs/PERFORMANCE.md; `--check` runs one block and compares the formula with the bytes that
autograd really saves on this device (with fp16 and flash attention on a GPU, fp32 on a CPU).
"""
import torch

from bench import common
from bench.shapes import model_args, random_model, shape_name
from llama.checkpoint import stage_plan
from llama.errors import BadInput, run_cli
from llama.model import ModelArgs, rotary_tables
from llama.partition import parameter_costs
from llama.pipeline import LOSS_CHUNK_TOKENS
from llama.precision import DTYPES, dtype_named

GIB = 2**30
TABLE = ["n_stages", "stage", "layers", "micro_batch", "in_flight", "weights_gib",
         "kept_plain_gib", "kept_recompute_gib", "kept_offload_gib", "peak_plain_gib",
         "peak_recompute_gib", "peak_offload_gib"]


def saved_bytes_per_token(args: ModelArgs, dtype_bytes: int) -> int:
    """Bytes autograd keeps per token per block when only the block's input needs a gradient.

    Frozen weights mean no linear layer keeps its input. What stays: each RMSNorm's fp32 input
    and its 1/rms (two norms); SDPA's q, k, v and output (dtype) and log-sum-exp (fp32, per
    head); SwiGLU's three hidden-wide tensors (w1 x, silu(w1 x), w3 x).
    """
    kv_dim = args.n_kv_heads * args.head_dim
    norms = 2 * (4 * args.dim + 4)
    attention = dtype_bytes * (2 * args.dim + 2 * kv_dim) + 4 * args.n_heads
    feed_forward = 3 * dtype_bytes * args.hidden_dim
    return norms + attention + feed_forward


def head_bytes_per_target(args: ModelArgs, dtype_bytes: int) -> int:
    """The loss's peak per target position of one chunk: dtype logits, fp32 logits, fp32
    log-probabilities (saved) and their fp32 gradient."""
    return args.vocab_size * (dtype_bytes + 4 + 4 + 4)


def stage_estimates(args, n_stages, global_batch, micro_batch, seq_len, n_virtual_tokens,
                    dtype_bytes, schedule, target_fraction):
    """One dict per stage: weights, what one micro-batch keeps, how many are in flight, peaks."""
    layer, embeddings, head = parameter_costs(args)
    n_micro = global_batch // micro_batch
    tokens = micro_batch * (seq_len + n_virtual_tokens)  # of one micro-batch
    targets = micro_batch * max(1, round(target_fraction * (seq_len - 1)))
    hidden = tokens * dtype_bytes * args.dim  # one (b, T, dim) activation
    per_layer = tokens * saved_bytes_per_token(args, dtype_bytes)
    ffn_grads = tokens * 3 * dtype_bytes * args.hidden_dim  # SwiGLU's gradients in backward
    rows = []
    for stage, ((first, last), has_embeddings, has_head) in enumerate(stage_plan(args, n_stages)):
        n_layers = last - first
        weights = dtype_bytes * (n_layers * layer + has_embeddings * embeddings + has_head * head)
        in_flight = n_micro if schedule == "gpipe" else min(n_stages - stage, n_micro)
        # kept until the micro-batch's backward; + one hidden: the stage's output (or input)
        kept = {"plain": n_layers * per_layer + hidden,
                "recompute": (n_layers + 1) * hidden,
                "offload": hidden}  # the layer inputs wait in pinned CPU memory instead
        # the transient of one micro-batch's backward through one block
        working = {"plain": ffn_grads, "recompute": per_layer + ffn_grads,
                   "offload": per_layer + ffn_grads}
        # The loss runs in chunks (llama/pipeline.py): one chunk's logits at a time, plus the
        # picked hidden states of every target position, saved to recompute each chunk.
        loss = (min(targets, LOSS_CHUNK_TOKENS) * head_bytes_per_target(args, dtype_bytes)
                + targets * dtype_bytes * args.dim) if has_head else 0
        row = {"bench": "memory_estimate", "n_stages": n_stages, "stage": stage,
               "layers": [first, last], "micro_batch": micro_batch, "n_micro": n_micro,
               "in_flight": in_flight, "weights_gib": weights / GIB,
               "cpu_pinned_offload_gib": in_flight * n_layers * hidden / GIB}
        for mode in ("plain", "recompute", "offload"):
            row[f"kept_{mode}_gib"] = kept[mode] / GIB
            row[f"peak_{mode}_gib"] = (weights + in_flight * kept[mode] + working[mode] + loss) / GIB
        rows.append(row)
    return rows


def measured_saved_bytes_per_token(args: ModelArgs, dtype, device, batch=2, seq_len=64) -> float:
    """Run one frozen block forward with its input requiring a gradient and add up the bytes of
    the distinct tensors autograd saves (the weights and the shared rotary tables left out)."""
    model = random_model(args, (0, 1), False, False, device, dtype)
    block = model.layers["0"]
    cos, sin = rotary_tables(args.head_dim, args.rope_theta, 0, seq_len, device)
    left_out = {t.data_ptr() for t in [*block.parameters(), cos, sin]}
    saved = {}

    def pack(tensor):
        if tensor.data_ptr() not in left_out:
            saved[tensor.data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    h = torch.randn(batch, seq_len, args.dim, device=device, dtype=dtype, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        block(h, cos, sin, 0)
    return sum(saved.values()) / (batch * seq_len)


def main(shape: str = "7B", n_stages=(4, 2), global_batch: int = 32, micro_batch=(1, 2, 4, 8, 32),
         seq_len: int = 512, n_virtual_tokens: int = 32, dtype: str = "float16",
         schedule: str = "1f1b", target_fraction: float = 1.0, check: bool = False,
         device: str = None):
    """JSON lines per stage and micro-batch size, then the table; arithmetic, not a measurement.

    check: also run one block of this shape on --device (default: cuda if present, else cpu; a
    CPU check uses float32) and compare saved bytes per token with saved_bytes_per_token.
    """
    dtype_named(dtype)  # refuses an unknown name
    if schedule not in ("gpipe", "1f1b"):
        raise BadInput(f"--schedule {schedule!r} must be gpipe or 1f1b")
    args = model_args(shape)
    dtype_bytes = DTYPES[dtype].itemsize
    rows = []
    for p in common.as_list(n_stages):
        for b in common.as_list(micro_batch):
            if global_batch % b:
                raise BadInput(f"--micro_batch {b} does not divide --global_batch {global_batch}")
            rows += stage_estimates(args, p, global_batch, b, seq_len, n_virtual_tokens,
                                    dtype_bytes, schedule, target_fraction)
    for row in rows:
        common.emit({**row, "shape": shape_name(shape), "dtype": dtype, "schedule": schedule,
                     "global_batch": global_batch, "seq_len": seq_len,
                     "n_virtual_tokens": n_virtual_tokens, "kind": "arithmetic, not measured"})
    if check:
        run_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        run_dtype = DTYPES[dtype] if run_device.type == "cuda" else torch.float32
        measured = measured_saved_bytes_per_token(args, run_dtype, run_device)
        common.emit({"bench": "memory_check", "shape": shape_name(shape), "dtype":
                     str(run_dtype).replace("torch.", ""), "formula_bytes_per_token_per_layer":
                     saved_bytes_per_token(args, run_dtype.itemsize),
                     "measured_bytes_per_token_per_layer": measured,
                     **common.environment(run_device)})
    common.print_table(rows, TABLE)


if __name__ == "__main__":
    run_cli(main)

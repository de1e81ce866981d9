"""Per-stage GPU memory of pipelined soft-prompt training, by arithmetic (nothing is run).

    python -m bench.memory_estimate --shape 7B --n_stages 4,2 --micro_batch 1,2,4,8,32
    python -m bench.memory_estimate --shape tiny --check    # formula vs what autograd saves

Which switches a memory target needs, before a GPU is at hand. The arithmetic is llama/training/memory.py
(python -m llama.tools.plan uses it to say what fits on given cards); the formulas are in
docs/PERFORMANCE.md; `--check` runs one block and compares the formula with the bytes that
autograd really saves on this device (with fp16 and flash attention on a GPU, fp32 on a CPU).
"""
import torch

from bench import common
from bench.shapes import model_args, random_model, shape_name
from llama.formats.checkpoint import stage_plan
from llama.cli import run_cli
from llama.errors import BadInput
from llama.training.memory import saved_bytes_per_token, stage_estimates
from llama.model.transformer import ModelArgs
from llama.model.rotary import rotary_tables
from llama.model.dtypes import DTYPES, dtype_named
TABLE = ["n_stages", "stage", "layers", "micro_batch", "in_flight", "weights_gib",
         "kept_plain_gib", "kept_recompute_gib", "kept_offload_gib", "peak_plain_gib",
         "peak_recompute_gib", "peak_offload_gib"]


def measured_saved_bytes_per_token(args: ModelArgs, dtype, device, batch=2, seq_len=64) -> float:
    """Run one frozen block forward with its input requiring a gradient and add up the bytes of
    the distinct tensors autograd saves (the weights and the shared rotary tables left out)."""
    model = random_model(args, (0, 1), False, False, device, dtype)
    block = model.layers["0"]
    turns = rotary_tables(args.head_dim, args.rope_theta, 0, seq_len, device)
    h = torch.randn(batch, seq_len, args.dim, device=device, dtype=dtype, requires_grad=True)
    saved = common.autograd_saved_bytes(lambda: block(h, turns, 0),
                                        [*block.parameters(), turns])
    return saved / (batch * seq_len)


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
            rows += [{"bench": "memory_estimate", **row} for row in stage_estimates(
                args, stage_plan(args, p), global_batch, b, seq_len, n_virtual_tokens,
                dtype_bytes, schedule, target_fraction)]
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

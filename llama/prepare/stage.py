"""What every script does first: join the process group, load this rank's stage, find the tokenizer.

One function for example.py, example_ft.py and ft_main.py, so they cannot drift apart.
"""
import torch

from llama.formats.checkpoint import find_tokenizer, is_split_dir, load_model, read_split
from llama.prepare.compiling import apply_compile, compiler_missing
from llama.parallel.distributed import init_distributed
from llama.errors import BadInput
from llama.model.fused import apply_fused_projections
from llama.model.dtypes import dtype_named
from llama.model.tokenizer import Tokenizer


def pick_dtype(name, device: torch.device):
    """fp16 on a GPU and fp32 on the CPU unless asked otherwise."""
    if name in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    return dtype_named(name)


def start_stage(ckpt_dir, tokenizer_path=None, device=None, dtype=None, max_seq_len=None,
                timeout_s: float = 300.0, fuse_projections: bool = False, quantize=None,
                group_size=None):
    """(ctx, model of this rank's stage, tokenizer) for a split directory or any checkpoint.

    fuse_projections: one wqkv and one w13 matrix per block (llama/model/fused.py; generation uses it:
    decode steps measured faster, see docs/PERFORMANCE.md). quantize: int8 or int4 frozen block
    linears made while a float checkpoint loads, one layer at a time (llama/model/quant.py)."""
    if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 2):
        raise BadInput(f"--max_seq_len={max_seq_len!r} must be an integer of at least 2")
    expected = len(read_split(ckpt_dir)[1]["stages"]) if is_split_dir(ckpt_dir) else None
    ctx = init_distributed(device, timeout_s, expected_world_size=expected)
    model = load_model(ckpt_dir, ctx.rank, ctx.world_size, ctx.device,
                       pick_dtype(dtype, ctx.device), max_seq_len, quantize=quantize,
                       group_size=group_size)
    tokenizer = Tokenizer(tokenizer_path or find_tokenizer(ckpt_dir))
    tokenizer.check_matches(model.args.vocab_size)
    if fuse_projections:
        apply_fused_projections(model)
    return ctx, model, tokenizer


def compile_blocks(model, compile):
    """--compile: torch.compile each block (after any recompute wrapper); refused with one line
    when this machine cannot build the compiled kernels. compile: False, True (inductor) or a
    backend's name (the benchmarks' CPU rehearsal uses aot_eager, which builds no kernels)."""
    if not compile:
        return model
    backend = compile if isinstance(compile, str) else "inductor"
    missing = compiler_missing(backend)
    if missing:
        raise BadInput(f"--compile: {missing}; install one or leave out --compile")
    return apply_compile(model, backend)

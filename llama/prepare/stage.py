"""What every script does first: join the process group, load this rank's stage, find the
tokenizer, then prepare the stage for the run.

    ctx, model, tokenizer = start_stage(ckpt_dir, ..., quantize="int4")  # quantized while loading
    tuning = prepare_stage(model, ctx.device, Preparation(method=..., recompute="full"))

prepare_stage applies the run's transforms in one declared order, after refusing combinations
that cannot work together:

    fuse projections -> int8 products -> tuning method -> recompute (and offload) -> CPU linears
    -> compile

The order matters: a method attaches to the plain blocks (through the projection the attention
uses, fused or not); recompute wraps the blocks the method changed; the CPU linears change the
products of the modules in place, after every other change; compile sees the final blocks,
wrappers included. run_on_stage is the start-up path of every script that loads a model.
"""
from dataclasses import dataclass, replace
from typing import Callable, Optional, Union

import torch

from llama.errors import BadInput
from llama.formats.checkpoint import find_tokenizer, is_split_dir, load_model, read_split
from llama.model.cpu_linear import apply_cpu_linears
from llama.model.dtypes import dtype_named
from llama.model.fused import apply_fused_projections
from llama.model.quant import QuantizedLinear, pack_int8_products, quantize_head, use_dynamic_int8
from llama.model.tokenizer import Tokenizer
from llama.options import MODEL, pick
from llama.parallel.distributed import env_int, init_distributed
from llama.parallel.faults import PeerLost, report_and_exit
from llama.parallel.tensor_parallel import apply_tensor_parallel
from llama.prepare.compiling import apply_compile, compiler_missing
from llama.prepare.offload import RECOMPUTE_MODES, apply_recompute, apply_weight_streaming


CPU_LINEARS = (None, "onednn", "packed")  # Preparation.cpu_linears


def pick_dtype(name, device: torch.device):
    """fp16 on a GPU and fp32 on the CPU unless asked otherwise."""
    if name in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    return dtype_named(name)


def start_stage(ckpt_dir, tokenizer_path=None, device=None, dtype=None, max_seq_len=None,
                timeout_s: float = 300.0, quantize=None, group_size=None, tp=None):
    """(ctx, model of this rank's stage, tokenizer) for a split directory or any checkpoint.

    quantize: int8 or int4 frozen block linears made while a float checkpoint loads, one layer
    at a time (llama/model/quant.py), so the float model is never whole in memory. tp: tensor-
    parallel ranks per stage (None: a split's own when torchrun started its stages x tp
    processes, else 1); the rank's stage is cut to its TP shard and hooked to its TP group."""
    if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 2):
        raise BadInput(f"--max_seq_len={max_seq_len!r} must be an integer of at least 2")
    manifest = read_split(ckpt_dir)[1] if is_split_dir(ckpt_dir) else None
    expected = len(manifest["stages"]) if manifest else None
    if tp is None:
        split_tp = manifest.get("tp", 1) if manifest else 1
        tp = split_tp if manifest and env_int("WORLD_SIZE", 1) == expected * split_tp else 1
    ctx = init_distributed(device, timeout_s, expected_stages=expected, tp=tp)
    model = load_model(ckpt_dir, ctx.stage, ctx.n_stages, ctx.device,
                       pick_dtype(dtype, ctx.device), max_seq_len, quantize=quantize,
                       group_size=group_size, tp_rank=ctx.tp_rank, tp_size=ctx.tp_size)
    apply_tensor_parallel(model, ctx)
    tokenizer = Tokenizer(tokenizer_path or find_tokenizer(ckpt_dir))
    tokenizer.check_matches(model.args.vocab_size)
    return ctx, model, tokenizer


@dataclass(frozen=True)
class Preparation:
    """What a run does to its loaded stage (prepare_stage applies it in the order of the fields).

    fuse_projections: one wqkv and one w13 matrix per block (llama/model/fused.py; generation
        uses it, see docs/PERFORMANCE.md)
    method: (ctx, model, tokenizer) -> the run's tuning (a soft prompt, prefixes or adaption
        prompts), or None
    recompute: None, "full" or "selective" (recompute each block in backward)
    offload_activations: keep what recompute saves in pinned CPU memory (needs "full")
    stream_weights: keep the block weights in pinned CPU memory, each brought in as it runs
        (needs "full")
    compile: False, True (inductor) or a backend's name
    cpu_linears: on a CPU, the frozen float linears' products: "onednn" (oneDNN's, measured
        faster than torch's default here: llama/model/cpu_linear.py), "packed" (generation:
        their weights in oneDNN's blocked layout, faster still at one row; the int8 codes of
        dynamic_int8 too) or None (F.linear); not with compile, which makes its own kernels
    dynamic_int8: generation only, on a CPU, for a stage with int8/int4 block linears: they
        multiply in int8 with their inputs quantized per row (llama/model/int8_matmul.py; int4
        through an int8 copy of its weights, 1 byte a parameter, its int4 codes dropped once the
        copy is packed) and the output head is int8
        too, about 1% from the exact products (docs/quantization.md; speed in
        docs/PERFORMANCE.md). Training keeps the exact products; --exact_quantized turns this off
    """
    fuse_projections: bool = False
    dynamic_int8: bool = False
    method: Optional[Callable] = None
    recompute: Optional[str] = None
    offload_activations: bool = False
    stream_weights: bool = False
    compile: Union[bool, str] = False
    cpu_linears: Optional[str] = "onednn"


def check_transforms(prep: Preparation):
    """Refuse, in one line, the transforms that cannot go together (before any weight is read)."""
    if prep.recompute not in (None, *RECOMPUTE_MODES):
        raise BadInput(f"--recompute_mode {prep.recompute!r} must be one of "
                       f"{', '.join(RECOMPUTE_MODES)}")
    if prep.cpu_linears not in CPU_LINEARS:
        raise BadInput(f"cpu_linears {prep.cpu_linears!r} must be one of "
                       f"{', '.join(map(str, CPU_LINEARS))}")
    if prep.cpu_linears == "packed" and prep.recompute:
        raise BadInput("packed CPU linears have no backward (generation only): they cannot go "
                       "with --recompute")
    moved = [name for name, on in (("activations", prep.offload_activations),
                                   ("weights", prep.stream_weights)) if on]
    if moved and prep.recompute != "full":
        raise BadInput(f"--recompute_mode {prep.recompute or 'none'} keeps activations on the "
                       f"device, so it cannot go with --offload {','.join(moved)}: use "
                       "--recompute_mode full with offload, or leave offload out")


def check_preparation(model, prep: Preparation):
    """check_transforms, and what depends on the loaded stage."""
    check_transforms(prep)
    if prep.stream_weights and any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise BadInput("--offload weights streams float block weights, but this stage's are "
                       "quantized (int8/int4) and stay on the device: leave out one of the two")


def prepare_stage(ctx, model, tokenizer, prep: Preparation):
    """Apply prep to a loaded stage in the declared order; returns the method's tuning (or None)."""
    check_preparation(model, prep)
    if prep.fuse_projections:
        apply_fused_projections(model)
    if prep.dynamic_int8:
        use_int8_products(ctx, model, packed=prep.cpu_linears == "packed" and not prep.compile)
    tuning = prep.method(ctx, model, tokenizer) if prep.method is not None else None
    if prep.recompute:
        apply_recompute(model, offload_activations=prep.offload_activations, mode=prep.recompute)
    if prep.stream_weights:
        apply_weight_streaming(model, ctx.device)
    if prep.cpu_linears and ctx.device.type == "cpu" and not prep.compile:
        apply_cpu_linears(model, packed=prep.cpu_linears == "packed")
    compile_blocks(model, prep.compile)
    return tuning


def use_int8_products(ctx, model, packed: bool):
    """Preparation.dynamic_int8 on a quantized stage on a CPU (elsewhere: nothing), with the
    int8 codes in oneDNN's layout when packed (cpu_linears="packed"); one line says what it
    costs and how to turn it off."""
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if not quantized or ctx.device.type != "cpu":
        return
    quantize_head(model)
    use_dynamic_int8(model)  # the head too
    int4 = [m for m in quantized if m.scheme == "int4" and m.int8_codes is not None]
    copy_bytes = sum(m.int8_codes.numel() + 4 * m.int8_scales.numel() for m in int4)
    if packed:
        pack_int8_products(model)  # drops the codes the packed copies stand for
    kept_bytes = sum(m.weight.numel() for m in int4 if m.weight is not None)  # 2 codes a byte
    gathered = ctx.gather_objects((copy_bytes, kept_bytes)) or [(0, 0)]
    copy_bytes, kept_bytes = (sum(column) for column in zip(*gathered))
    kept = f" beside their int4 codes ({kept_bytes / 2**30:.2f} GiB)" if kept_bytes else ""
    int4 = f"; int4 layers run on an int8 copy ({copy_bytes / 2**30:.2f} GiB){kept}" \
        if copy_bytes else ""
    ctx.log(f"quantized weights on the CPU: int8 products with inputs quantized per row and an "
            f"int8 output head{int4}; --exact_quantized True runs the exact products instead")


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


def run_on_stage(options: dict, work, prep: Preparation = Preparation()):
    """The start-up path of every script that loads a model: join the job, load this rank's
    stage with the MODEL options, prepare it (prep, with --compile from the options), then
    work(ctx, model, tokenizer, tuning); a lost peer ends the rank with one line naming the
    stage at fault; after the work the process group is left."""
    model_options = pick(options, MODEL)
    prep = replace(prep, compile=model_options.pop("compile"))
    check_transforms(prep)  # before any weight is read
    ctx, model, tokenizer = start_stage(**model_options)
    try:
        tuning = prepare_stage(ctx, model, tokenizer, prep)
        result = work(ctx, model, tokenizer, tuning)
    except PeerLost as error:
        report_and_exit(error, ctx.rank)
    # Left only after the work: a rank that stops with an error of its own must first say so
    # in the job's store (llama/cli.py), or its neighbours, seeing the group close, would
    # blame a silent stage.
    ctx.close()
    return result

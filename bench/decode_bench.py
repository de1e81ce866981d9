"""Decode speed of llama.serving.generation.generate against the device's memory-bandwidth limit.

    python -m bench.decode_bench --shape 7B                    # one stage, batch 1 and 8
    python -m bench.decode_bench --shape 7B --n_stages 4 --compare_single_stage
    python -m bench.decode_bench --shape tiny --gen_len 8      # CPU check that it still runs
    python -m bench.decode_bench --shape small --batch 1 --quantize none,int8,int4

--cuda_graph: the product's static-cache decode (llama/model/static_decode.py), each step a CUDA graph
on a GPU; on a CPU the same static path uncaptured ("mode": "static"). --compile: torch.compile
of each block (True for inductor, or a backend's name). Prepared as example.py prepares it:
fused projections (quantized ones too), oneDNN's packed products on a CPU. --quantize: one or
several of VARIANTS, built once each and timed in alternation (one process), each round beside
a copy's bandwidth. One JSON line per batch size (or variant), then a short table.
"""
import gc
import sys
import time

import torch

from bench import common
from bench.rounds import paired_ratios, spread
from bench.shapes import model_args, parameter_bytes, random_stage, shape_name
from llama.parallel.distributed import DistContext, init_distributed
from llama.cli import run_cli
from llama.errors import BadInput
from llama.model.quant import (QuantizedLinear, largest_group_size, pack_int8_products,
                              quantize_head, use_dynamic_int8, use_int4_kernels)
from llama.serving.generation import generate
from llama.parallel.pipeline import Stage
from llama.prepare.stage import Preparation, pick_dtype, prepare_stage

TABLE = ["impl", "mode", "n_stages", "batch", "decode_tokens_per_s", "bandwidth_limit_tokens_per_s",
         "bandwidth_share", "copy_bandwidth_gb_s", "model_gb"]
VARIANT_TABLE = ["variant", "batch", "decode_tokens_per_s_median", "decode_tokens_per_s_min",
                 "decode_tokens_per_s_max", "vs_first_median", "vs_first_min", "vs_first_max",
                 "bandwidth_share_median", "bandwidth_share_min", "bandwidth_share_max",
                 "vs_first_cpu_median", "bandwidth_share_cpu_median", "step_read_gb", "model_gb"]
# --quantize names: the block linears' scheme, then what their forward (and the head) run on a
# CPU (llama/model/quant.py). "none" is the float model; the names without a suffix are what
# example.py, chat.py and serve.py run (prepare_stage with their Preparation).
VARIANTS = {
    "none": (None, "float, q/k/v and w1/w3 fused (example.py's)"),
    "none_unfused": (None, "float, unfused projections"),
    "none_f_linear": (None, "float, fused, torch's default product (F.linear), not oneDNN's"),
    "none_onednn_plain": (None, "float, fused, oneDNN's product on the plain weights"),
    "none_int8_head": (None, "float blocks, an int8 head (quantize_head)"),
    "int8": ("int8", "int8 products on oneDNN's blocked codes, int8 head (generation's default)"),
    "int4": ("int4", "int8 products on an int8 copy, blocked, int8 head (generation's default)"),
    "int8_plain_codes": ("int8", "as int8, torch._int_mm on the plain codes"),
    "int4_plain_codes": ("int4", "as int4, torch._int_mm on the plain int8 copy"),
    "int8_unfused": ("int8", "as int8, unfused projections"),
    "int4_unfused": ("int4", "as int4, unfused projections"),
    "int8_float_head": ("int8", "int8 products, the float head"),
    "int4_float_head": ("int4", "int8 products on an int8 copy, the float head"),
    "int8_exact": ("int8", "--exact_quantized: dequantize each layer per call, float head"),
    "int4_exact": ("int4", "--exact_quantized: dequantize each layer per call, float head"),
    "int8_weight_only": ("int8", "torch._weight_int8pack_mm, float head"),
    "int4_kernel": ("int4", "torch's int4 kernel (use_int4_kernels), float head"),
}


def default_copy_bytes(device) -> int:
    """1 GiB on a GPU; on a CPU at least 4x the last-level cache (and 128 MiB), so that the copy
    measures memory, not the cache."""
    if torch.device(device).type == "cuda":
        return 2**30
    return max(128 * 2**20, 4 * common.last_level_cache_bytes())


def step_read_bytes(model) -> int:
    """Weight bytes one decode step reads: every matrix once, but none of the embedding table (a
    step reads one row of it a token, added by decode_record) and, of a quantized layer, only the
    tensors its forward uses (int4's packed codes are not read when its int8 copy is)."""
    def size(*tensors):
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)
    table = model.tok_embeddings.weight if model.tok_embeddings is not None else None
    tied = model.output is not None and model.output.weight is table
    total = parameter_bytes(model) - (size(table) if table is not None and not tied else 0)
    for layer in model.modules():
        if isinstance(layer, QuantizedLinear):
            total -= size(layer.weight, layer.scales, layer.zeros, layer.int8_codes,
                          layer.int8_scales, layer.int8_packed)
            if layer.use_dynamic_int8:
                total += size(*layer.int8_codes_and_scales())
            elif layer.int4_kernel_weight is not None:
                total += size(layer.int4_kernel_weight, layer.scales, layer.zeros)
            else:
                total += size(layer.weight, layer.scales, layer.zeros)
    return total


class CopyProbe:
    """A device-to-device copy of n_bytes, its buffers made once, so that the bandwidth can be
    measured again beside each timing (bytes moved per second, counting read + write)."""

    def __init__(self, device, n_bytes: int):
        self.source = torch.empty(n_bytes, dtype=torch.uint8, device=device).fill_(1)
        self.target = torch.empty_like(self.source)
        self.target.copy_(self.source)
        self.clock = common.Clock(torch.device(device))

    def bandwidth(self, repeats: int = 10) -> float:
        times = []
        for _ in range(repeats):
            started = self.clock.now()
            self.target.copy_(self.source)
            times.append(self.clock.now() - started)
        return 2 * self.source.numel() / min(times)


def copy_bandwidth(device, n_bytes: int, repeats: int = 10) -> float:
    """Bytes moved per second by a device-to-device copy of n_bytes, counting read + write."""
    return CopyProbe(device, n_bytes).bandwidth(repeats)


def random_prompts(vocab_size: int, batch: int, prompt_len: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (batch, prompt_len), generator=generator).tolist()


def fastest_times(make_tokens, clock, gen_len: int, repeats: int):
    """Fastest seconds of make_tokens(gen_len), and of make_tokens(1) (the prefill).

    The two are interleaved and the minimum kept, so a busy machine inflates neither one alone.
    """
    def seconds(n_new):
        started = clock.now()
        make_tokens(n_new)
        return clock.now() - started

    seconds(gen_len)  # warm-up: kernels, allocator, caches
    seconds(1)
    times = [(seconds(gen_len), seconds(1)) for _ in range(repeats)]
    return min(t for t, _ in times), min(t for _, t in times)


def decode_record(impl, batch, gen_len, full_s, prefill_s, model_bytes, bandwidth,
                  mode="eager", read_bytes=None, row_bytes=0):
    """tokens/s of the gen_len - 1 steps after the prefill, and their share of the limit.

    Each decode step reads every weight it uses once for the whole batch (read_bytes: not the
    embedding table, only a row of it per token, row_bytes), so the limit is bandwidth / those
    bytes steps per second, i.e. batch x that in tokens/s. Without read_bytes, model_bytes.
    """
    decode_s = full_s - prefill_s
    # Only timing noise makes gen_len tokens faster than one; then there is no figure to give.
    tokens_per_s = batch * (gen_len - 1) / decode_s if decode_s > 0 else None
    step_bytes = (model_bytes if read_bytes is None else read_bytes) + batch * row_bytes
    limit = batch * bandwidth / step_bytes
    return {"bench": "decode", "impl": impl, "mode": mode, "batch": batch, "gen_len": gen_len,
            "decode_tokens_per_s": tokens_per_s, "end_to_end_tokens_per_s": batch * gen_len / full_s,
            "prefill_s": prefill_s, "model_bytes": model_bytes, "model_gb": model_bytes / 1e9,
            "step_read_gb": step_bytes / 1e9,
            "copy_bandwidth_gb_s": bandwidth / 1e9, "bandwidth_limit_tokens_per_s": limit,
            "bandwidth_share": tokens_per_s / limit if tokens_per_s else None}


def decode_mode(cuda_graph: bool, device) -> str:
    if not cuda_graph:
        return "eager"
    return "cuda_graph" if torch.device(device).type == "cuda" else "static"


def run_ours(ctx, args, dtype, batches, prompt_len, gen_len, repeats, bandwidth, seed,
             cuda_graph=False, compile=False):
    """Every batch size through this rank's stage; records on rank 0."""
    common.reset_peak_memory(ctx.device)
    model = random_stage(args, ctx.rank, ctx.world_size, ctx.device, dtype, seed)
    model_bytes = sum(ctx.gather_objects(parameter_bytes(model)) or [0])
    model_bytes = ctx.broadcast_object(model_bytes)
    read_bytes = ctx.broadcast_object(sum(ctx.gather_objects(step_read_bytes(model)) or [0]))
    prepare_stage(ctx, model, None, Preparation(fuse_projections=True, compile=compile,
                                                cpu_linears="packed"))  # as example.py
    stage = Stage(model, ctx, cuda_graph=cuda_graph)
    records = []
    for batch in batches:
        prompts = random_prompts(args.vocab_size, batch, prompt_len, seed)
        full_s, prefill_s = fastest_times(
            lambda n_new: generate(stage, prompts, n_new, temperature=0.0, stop_ids=()),
            common.Clock(ctx.device), gen_len, repeats)
        peaks = ctx.gather_objects(round(common.peak_memory_gib(ctx.device), 3))
        if ctx.rank == 0:
            record = decode_record("ours", batch, gen_len, full_s, prefill_s, model_bytes, bandwidth,
                                   decode_mode(cuda_graph, ctx.device), read_bytes,
                                   args.dim * dtype.itemsize)
            records.append({**record, "compile": compile, "n_stages": ctx.world_size, "backend": ctx.backend,
                            "prompt_len": prompt_len, "dtype": str(dtype).replace("torch.", ""),
                            "peak_mem_gib": peaks})
    return records


def build_variant(ctx, name, args, dtype, seed, group_size):
    """One process's whole model for a VARIANTS name, prepared as generation prepares it."""
    scheme = VARIANTS[name][0]
    model = random_stage(args, 0, 1, ctx.device, dtype, seed, scheme, group_size)
    exact = name.endswith("_exact") or name in ("int8_weight_only", "int4_kernel")
    ours = name in ("none", "none_unfused", "int8", "int4", "int8_unfused", "int4_unfused",
                    "int8_plain_codes", "int4_plain_codes") or exact
    # "onednn" leaves the int8 codes plain (only "packed" reorders them); no float linear is
    # left in the quantized variants to tell the two apart otherwise
    linears = {"none_f_linear": None, "none_onednn_plain": "onednn", "int8_plain_codes": "onednn",
               "int4_plain_codes": "onednn"}.get(name, "packed")
    if name == "none_int8_head":
        quantize_head(model)  # before its float matrix is packed
    prepare_stage(ctx, model, None, Preparation(fuse_projections=not name.endswith("_unfused"),
                                                dynamic_int8=ours and not exact,
                                                cpu_linears=linears))
    if name in ("none_int8_head", "int8_float_head", "int4_float_head"):
        use_dynamic_int8(model)
        pack_int8_products(model)  # as "packed" does for generation's own variants
    if name == "int8_weight_only":
        for layer in model.modules():
            if isinstance(layer, QuantizedLinear):
                layer.use_kernel = True
    elif name == "int4_kernel" and not use_int4_kernels(model):
        raise BadInput(f"--quantize int4_kernel: this torch has no int4 kernel for group size "
                       f"{group_size} on {ctx.device}")
    return model


def cache_read_bytes(args, dtype, batch: int, prompt_len: int, gen_len: int) -> int:
    """The keys and values a decode step reads, on average over the gen_len steps: every layer's
    (batch, positions so far, kv heads, head_dim) twice."""
    per_position = 2 * args.n_layers * args.n_kv_heads * args.head_dim * dtype.itemsize
    return batch * per_position * (prompt_len + gen_len // 2)


def run_variants(ctx, args, dtype, names, batches, prompt_len, gen_len, repeats, probe,
                 seed, group_size):
    """Every variant built once and timed in alternation (alternating_rounds); per variant the
    median and range of the rounds' decode tokens/s, of their share of the bandwidth limit
    (each round's copy bandwidth, measured beside its timing), and of the paired ratio to the
    first variant's tokens/s in the same round (a round's load slows both)."""
    models = {name: build_variant(ctx, name, args, dtype, seed, group_size) for name in names}
    stages = {name: Stage(model, ctx) for name, model in models.items()}
    records = []
    for batch in batches:
        prompts = random_prompts(args.vocab_size, batch, prompt_len, seed)
        rounds = alternating_rounds(stages, prompts, common.Clock(ctx.device), gen_len, repeats,
                                    probe)
        for name in names:
            read = step_read_bytes(models[name]) + batch * args.dim * dtype.itemsize + \
                cache_read_bytes(args, dtype, batch, prompt_len, gen_len)
            speeds = [speed for speed, _, _ in rounds[name]]
            cpu_speeds = [speed for _, speed, _ in rounds[name]]
            limits = [batch * bandwidth / read for _, _, bandwidth in rounds[name]]
            records.append({
                "bench": "decode_variants", "variant": name, "batch": batch,
                "path": VARIANTS[name][1], "gen_len": gen_len, "prompt_len": prompt_len,
                "rounds": len([v for v in speeds if v is not None]),
                **spread(speeds, "decode_tokens_per_s"),
                **paired_ratios(speeds, [speed for speed, _, _ in rounds[names[0]]], "vs_first"),
                **paired_ratios(speeds, limits, "bandwidth_share"),
                **spread(cpu_speeds, "decode_tokens_per_cpu_s"),
                **paired_ratios(cpu_speeds, [speed for _, speed, _ in rounds[names[0]]],
                                "vs_first_cpu"),
                **paired_ratios(cpu_speeds, limits, "bandwidth_share_cpu"),
                **spread([bandwidth / 1e9 for _, _, bandwidth in rounds[name]], "copy_gb_s"),
                "tokens_per_s_by_round": speeds, "tokens_per_cpu_s_by_round": cpu_speeds,
                "step_read_gb": read / 1e9, "model_gb": parameter_bytes(models[name]) / 1e9,
                "copy_mib": probe.source.numel() / 2**20, "group_size": group_size,
                "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads()})
    return records


def alternating_rounds(stages, prompts, clock, gen_len: int, repeats: int, probe) -> dict:
    """{name: [(decode tokens/s, decode tokens per CPU-second, copy bandwidth) of each round]}:
    a round times every stage in turn, gen_len tokens then the prefill alone (the figures from
    the difference; None where noise left none), each beside a copy's bandwidth, so a busy
    machine slows them alike. The CPU time leaves out the moments the process waited for a core
    (this process's threads only)."""
    def seconds(stage, n_new):
        started, cpu_started = clock.now(), time.process_time()
        generate(stage, prompts, n_new, temperature=0.0, stop_ids=())
        return clock.now() - started, time.process_time() - cpu_started
    for stage in stages.values():  # warm-up: kernels, allocator, caches
        seconds(stage, gen_len)
    rounds = {name: [] for name in stages}
    tokens = len(prompts) * (gen_len - 1)
    for _ in range(repeats):
        for name, stage in stages.items():
            bandwidth = probe.bandwidth(3)
            (wall, cpu), (prefill_wall, prefill_cpu) = seconds(stage, gen_len), seconds(stage, 1)
            rounds[name].append((tokens / (wall - prefill_wall) if wall > prefill_wall else None,
                                 tokens / (cpu - prefill_cpu) if cpu > prefill_cpu else None,
                                 max(bandwidth, probe.bandwidth(3))))
    return rounds


def run_hf(args, dtype, device, batches, prompt_len, gen_len, repeats, bandwidth, seed,
           **ours_only):
    """HF greedy generate of the same shape, for the side-by-side ratio."""
    from bench import hf
    model = hf.random_llama(args, device, dtype, use_cache=True).eval()
    model_bytes = parameter_bytes(model)
    clock = common.Clock(device)
    records = []
    for batch in batches:
        ids = torch.tensor(random_prompts(args.vocab_size, batch, prompt_len, seed), device=device)
        full_s, prefill_s = fastest_times(lambda n_new: hf.generate_ids(model, ids, n_new),
                                          clock, gen_len, repeats)
        record = decode_record("hf_generate", batch, gen_len, full_s, prefill_s, model_bytes,
                               bandwidth)
        records.append({**record, "n_stages": 1, "prompt_len": prompt_len,
                        "dtype": str(dtype).replace("torch.", ""), **hf.versions()})
    return records


def main_variants(ctx, args, dtype, batches, quantize, group_size, env, copy_bytes, **run_args):
    names = [str(name) for name in common.as_list(quantize)]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown or ctx.world_size > 1:
        raise BadInput(f"--quantize {quantize!r} must list names of {', '.join(VARIANTS)}, run "
                       "in one process (no --n_stages)")
    if group_size is None:
        group_size = largest_group_size(args.dim, args.hidden_dim)  # as split_model.py picks it
    probe = CopyProbe(ctx.device, copy_bytes)
    records = run_variants(ctx, args, dtype, names, batches, probe=probe, group_size=group_size,
                           **run_args)
    for record in records:
        common.emit({**record, **env})
    ctx.close()
    common.print_table(records, VARIANT_TABLE)


def main(shape: str = "tiny", n_stages: int = None, batch=(1, 8), prompt_len: int = 32,
         gen_len: int = 128, dtype: str = "auto", repeats: int = 3, copy_mib: int = None,
         compare_hf: bool = False, compare_single_stage: bool = False, cuda_graph: bool = False,
         compile=False, device: str = None, seed: int = 0, timeout_s: float = 600.0,
         quantize=None, group_size: int = None):
    """Greedy decode tokens/s at each batch size (no early stop), with the model's bytes, the
    measured copy bandwidth (default 1 GiB copied on a GPU; on a CPU 4x its last-level cache, at
    least 128 MiB) and the share of the bandwidth limit. quantize: VARIANTS names (none for the
    float model), timed in alternation in one process; group_size for int4 (default as
    split_model.py picks it). compare_hf: the same through transformers' generate (skipped, with a
    note, when not installed); compare_single_stage: after n stages, one process with the whole
    model, for the pipeline's loss. cuda_graph: the static-cache decode, captured on a GPU;
    compile: torch.compile each block (True: inductor; or a backend's name, e.g. aot_eager)."""
    if not isinstance(cuda_graph, bool):
        raise BadInput(f"--cuda_graph {cuda_graph!r} must be True or False")
    if n_stages is not None and (isinstance(n_stages, bool) or not isinstance(n_stages, int)
                                 or n_stages < 1):
        raise BadInput(f"--n_stages {n_stages!r} must be a positive integer")
    if n_stages and n_stages > 1 and not common.started_by_torchrun():
        sys.exit(common.relaunch_as_stages("bench.decode_bench", n_stages))
    batches = common.as_list(batch)
    for name, value in [("prompt_len", prompt_len), ("gen_len", gen_len), ("repeats", repeats),
                        *(("batch", b) for b in batches)]:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BadInput(f"--{name} {value!r} must be a positive integer")
    if gen_len < 2:
        raise BadInput(f"--gen_len {gen_len} must be at least 2 (decode speed is the steps after the first)")
    args = model_args(shape, max_seq_len=prompt_len + gen_len + 1)
    ctx = init_distributed(device, timeout_s)
    if n_stages is not None and ctx.world_size != n_stages:
        raise BadInput(f"torchrun started {ctx.world_size} processes but --n_stages is {n_stages}")
    dtype = pick_dtype(dtype, ctx.device)
    copy_bytes = copy_mib * 2**20 if copy_mib else default_copy_bytes(ctx.device)
    env = {"shape": shape_name(shape), **common.environment(ctx.device)}
    if quantize is not None:
        return main_variants(ctx, args, dtype, batches, quantize, group_size, env, copy_bytes,
                             prompt_len=prompt_len, gen_len=gen_len, repeats=repeats, seed=seed)
    bandwidth = ctx.broadcast_object(copy_bandwidth(ctx.device, copy_bytes) if ctx.rank == 0 else None)
    run_args = dict(prompt_len=prompt_len, gen_len=gen_len, repeats=repeats, bandwidth=bandwidth,
                    seed=seed, cuda_graph=cuda_graph, compile=compile)
    records = run_ours(ctx, args, dtype, batches, **run_args)
    gc.collect()  # this rank's stage, before another model is built
    for record in records:
        common.emit({**record, **env})
    ctx.barrier()
    ctx.close()
    if ctx.rank != 0:
        return
    # The other stages have finished: this process alone now runs the anchors.
    if compare_single_stage and ctx.world_size > 1:
        single = run_ours(DistContext(device=ctx.device, timeout_s=timeout_s), args, dtype,
                          batches, **run_args)
        for piped, one in zip(records, single):
            common.emit({**one, **env})
            common.emit({"bench": "decode_ratio", "ratio_of": f"{ctx.world_size} stages / 1 stage",
                         "batch": one["batch"], "tokens_per_s_ratio":
                         common.ratio(piped["decode_tokens_per_s"], one["decode_tokens_per_s"])})
        records += single
    if compare_hf:
        missing = common.hf_missing()
        if missing:
            common.emit({"bench": "decode", "impl": "hf_generate", "skipped": missing})
        else:
            theirs = run_hf(args, dtype, ctx.device, batches, **run_args)
            for ours, other in zip(records, theirs):
                common.emit({**other, **env})
                common.emit({"bench": "decode_ratio", "ratio_of": f"ours ({ours['n_stages']} "
                             "stages) / hf_generate", "batch": other["batch"], "tokens_per_s_ratio":
                             common.ratio(ours["decode_tokens_per_s"], other["decode_tokens_per_s"])})
            records += theirs
    common.print_table(records, TABLE)


if __name__ == "__main__":
    run_cli(main)

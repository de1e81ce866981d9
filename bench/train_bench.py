"""Training throughput and per-stage peak memory of soft-prompt (or LoRA) tuning through the real
pipeline.

    python -m bench.train_bench --shape 7B --n_stages 4 --global_batch 32 --micro_batch 2 --recompute
    python -m bench.train_bench --shape tiny --steps 2        # CPU check that it still runs
    python -m bench.train_bench --shape 7B --recompute --recompute_mode selective --compile --fused
    python -m bench.train_bench --shape 7B --n_stages 2 --quantize int4 --method lora --lora_r 8

With --n_stages n > 1 it starts itself as n processes (torch.distributed.run, this machine);
under torchrun it runs as started. One JSON line per configuration, then a short table.
"""
import contextlib
import functools
import gc
import itertools
import statistics
import sys

import torch

from bench import common
from bench.rounds import alternate, paired_ratios, spread
from bench.shapes import model_args, parameter_bytes, random_stage, shape_name
from llama.formats.checkpoint import stage_plan
from llama.training.data import MicroBatch
from llama.parallel.distributed import DistContext, init_distributed
from llama.cli import run_cli
from llama.options import TRAINING, takes
from llama.errors import BadInput
from llama.prepare.offload import RECOMPUTE_MODES, optimizer_device
from llama.parallel.loss import LOSS_LOGITS, loss_sum
from llama.parallel.pipeline import SCHEDULES, Stage
from llama.training.memory import choose_loss_logits
from llama.training.precision import LossScaler, ScaledAdamW, agree, finish_step
from llama.model.quant import check_scheme, largest_group_size
from llama.tuning.lora import apply_lora, lora_settings
from llama.tuning.methods import apply_prompt
from llama.tuning.prompt import SoftPrompt, init_prompt_weight
from llama.prepare.stage import Preparation, pick_dtype, prepare_stage
from llama.parallel.trace import Tracer, bubble_fraction, ideal_bubble_fraction, write_chrome_trace
from llama.training.config import parse_offload

TABLE = ["impl", "n_stages", "schedule", "global_batch", "micro_batch", "recompute", "mode",
         "compile", "offload", "keep_logits", "cpu_linears",
         "tokens_per_s", "step_time_s", "peak_mem_gib", "bubble_measured", "bubble_ideal"]
RATIO_TABLE = ["global_batch", "micro_batch", "recompute", "keep_logits", "cpu_linears", "rounds",
               "tokens_per_s_ratio_median", "tokens_per_s_ratio_min", "tokens_per_s_ratio_max",
               "fastest_step_ratio_median", "tokens_per_cpu_s_ratio_median",
               "ours_peak_gib_median", "other_peak_gib_median"]
CONFIG_KEYS = ("global_batch", "micro_batch", "schedule", "recompute", "loss_logits",
               "cpu_linears")


def synthetic_batches(vocab_size: int, global_batch: int, micro_batch: int, seq_len: int,
                      target_fraction: float, seed: int):
    """Random token ids; the last target_fraction of each row's next-token predictions train.

    Returned twice: as llama.training.data.MicroBatch for our pipeline, and as (input_ids, labels) in
    Hugging Face's convention (labels = ids, -100 where not trained, shifted inside the model),
    so both sides compute the loss on exactly the same positions.
    """
    generator = torch.Generator().manual_seed(seed)
    n_trained = max(1, round(target_fraction * (seq_len - 1)))
    ours, theirs = [], []
    for _ in range(global_batch // micro_batch):
        tokens = torch.randint(3, vocab_size, (micro_batch, seq_len), generator=generator)
        targets = torch.full_like(tokens, -100)
        targets[:, seq_len - 1 - n_trained:seq_len - 1] = tokens[:, seq_len - n_trained:]
        labels = torch.full_like(tokens, -100)
        labels[:, seq_len - n_trained:] = tokens[:, seq_len - n_trained:]
        ours.append(MicroBatch(tokens, targets, int((targets != -100).sum())))
        theirs.append((tokens, labels))
    return ours, theirs


def configurations(global_batch, micro_batch, schedule, recompute, loss_logits="recompute",
                   cpu_linears="onednn"):
    """Every combination of the (possibly several) values given; checked before any work."""
    configs = []
    for gb, mb, sched, rc, logits, linears in itertools.product(
            *(common.as_list(v) for v in (global_batch, micro_batch, schedule, recompute,
                                          loss_logits, cpu_linears))):
        if isinstance(gb, bool) or not isinstance(gb, int) or gb < 1 or \
                isinstance(mb, bool) or not isinstance(mb, int) or mb < 1 or gb % mb:
            raise BadInput(f"--micro_batch {mb!r} must be a positive integer that divides "
                           f"--global_batch {gb!r}")
        if sched not in SCHEDULES:
            raise BadInput(f"--schedule {sched!r} must be one of {', '.join(SCHEDULES)}")
        if not isinstance(rc, bool):
            raise BadInput(f"--recompute {rc!r} must be True or False")
        if logits not in LOSS_LOGITS:
            raise BadInput(f"--loss_logits {logits!r} must be one of {', '.join(LOSS_LOGITS)}")
        if linears not in ("onednn", "none"):
            raise BadInput(f"--cpu_linears {linears!r} must be onednn or none")
        configs.append({"global_batch": gb, "micro_batch": mb, "schedule": sched,
                        "recompute": rc, "loss_logits": logits, "cpu_linears": linears})
    return configs


def cap_memory(device, cap_gib):
    """Let this process allocate at most cap_gib of the GPU: a small card on a big one."""
    if cap_gib is None:
        return
    if isinstance(cap_gib, bool) or not isinstance(cap_gib, (int, float)) or cap_gib <= 0:
        raise BadInput(f"--memory_cap_gib {cap_gib!r} must be a positive number of GiB")
    if device.type != "cuda":
        print(f"note: --memory_cap_gib {cap_gib} applies to GPUs only; {device} is not capped")
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total), device)


def tuning_maker(method, n_virtual_tokens, lora_r, lora_targets, seed):
    """The method transform prepare_stage applies (before recompute, as ft_main's): a random
    soft prompt on the first stage, or LoRA pairs (alpha 2r) on every stage's layers."""
    def make(ctx, model, tokenizer):
        if method == "lora":
            return apply_lora(model, lora_settings(lora_r, 2 * lora_r, 0.0, lora_targets), seed)
        prompt = None
        if ctx.is_first:
            weight = init_prompt_weight("random", n_virtual_tokens, model.tok_embeddings.weight,
                                        seed=seed)
            prompt = SoftPrompt(weight).to(ctx.device)
        return apply_prompt(prompt, n_virtual_tokens)
    return make


class PipelineRun:
    """This rank's stage with random weights, its tuning and optimizer, as train.py sets them up."""

    def __init__(self, ctx, args, dtype, n_virtual_tokens, cfg, offload, seed, seq_len,
                 recompute_mode="full", compile=False, fused=False, quantize=None,
                 group_size=None, method="prompt", lora_r=8, lora_targets="q,v"):
        self.ctx = ctx
        recompute = cfg["recompute"]
        common.reset_peak_memory(ctx.device)
        model = random_stage(args, ctx.rank, ctx.world_size, ctx.device, dtype, seed, quantize,
                             group_size)
        self.weight_bytes = parameter_bytes(model)
        recomputes = recompute or offload & {"activations", "weights"}
        tuning = prepare_stage(ctx, model, None, Preparation(
            fuse_projections=fused,
            method=tuning_maker(method, n_virtual_tokens, lora_r, lora_targets, seed),
            recompute=recompute_mode if recomputes else None,
            offload_activations="activations" in offload, stream_weights="weights" in offload,
            compile=compile, cpu_linears=None if cfg["cpu_linears"] == "none" else "onednn"))
        sync = torch.cuda.synchronize if ctx.device.type == "cuda" else None
        self.tracer = Tracer(ctx.rank, enabled=False, synchronize=sync)
        keep, self.loss_line = False, None
        if ctx.is_last:  # the loss's choice as training makes it (llama/training/memory.py)
            mode = "offload" if offload & {"activations", "weights"} else \
                "recompute" if recomputes else "plain"
            keep, self.loss_line = choose_loss_logits(
                cfg["loss_logits"], model, ctx.device, cfg["global_batch"], cfg["micro_batch"],
                seq_len, tuning.hidden_virtual, cfg["schedule"], mode,
                lora_settings(lora_r, 2 * lora_r, 0.0, lora_targets) if method == "lora" else None)
        self.keep_logits, self.loss_line = ctx.broadcast_object((keep, self.loss_line),
                                                                src=ctx.world_size - 1)
        self.stage = Stage(model, ctx, tracer=self.tracer, tuning=tuning,
                           loss_fn=functools.partial(loss_sum, keep_logits=keep))
        self.scaler = LossScaler(enabled=dtype == torch.float16)
        first = next(iter(tuning.trainable.values()), None)
        self.optimizer = ScaledAdamW(tuning.trainable, 1e-3, 0.0, (0.9, 0.999),
                                     optimizer_device(first, "optimizer" in offload)) \
            if first is not None else None
        self.trainable_floats = sum(t.numel() for t in tuning.trainable.values())
        self.skipped = 0
        common.reset_peak_memory(ctx.device)  # the peak from here on includes the resident weights

    def step(self, batches, schedule) -> float:
        """One training step exactly as llama.training.train runs it; the global batch's mean loss."""
        loss_scale = self.scaler.scale
        loss, n_targets = self.stage.train_step(batches, schedule, loss_scale)
        found_inf, _, loss, _, grad_norm = agree(self.ctx, self.optimizer, loss_scale, loss,
                                                  False, 0.0)
        traced = self.tracer.span("optimizer step", "optimizer", step=self.stage.step) \
            if self.optimizer is not None else contextlib.nullcontext()
        with traced:
            skip, _ = finish_step(self.scaler, self.optimizer, found_inf, 1e-3, 1.0, grad_norm)
        self.skipped += int(skip)
        self.stage.step += 1
        return loss / max(n_targets, 1)


def run_ours(ctx, args, dtype, cfg, n_virtual_tokens, offload, steps, warmup_steps, seq_len,
             target_fraction, seed, trace_dir, variant):
    """One configuration on every rank; the record (complete on rank 0). variant: recompute_mode,
    compile, fused, quantization and the tuning method, the same for every configuration."""
    rss_at_start = common.resident_gib()
    run = PipelineRun(ctx, args, dtype, n_virtual_tokens, cfg, offload, seed, seq_len, **variant)
    batches, _ = synthetic_batches(args.vocab_size, cfg["global_batch"], cfg["micro_batch"],
                                   seq_len, target_fraction, seed)
    for _ in range(warmup_steps):
        run.step(batches, cfg["schedule"])
    ctx.barrier()
    with common.StepTimer(ctx.device) as timer:
        for _ in range(steps):
            loss = run.step(batches, cfg["schedule"])
            timer.lap()
    ctx.barrier()
    run.tracer.enabled = True  # one more step, traced (with syncs) and not timed
    run.step(batches, cfg["schedule"])
    run.tracer.enabled = False
    events = ctx.gather_objects(run.tracer.events)
    peaks = ctx.gather_objects(round(common.peak_memory_gib(ctx.device), 3))
    reserved = ctx.gather_objects(common.peak_reserved_gib(ctx.device))
    weights = ctx.gather_objects(run.weight_bytes)
    trainable = ctx.gather_objects(run.trainable_floats)
    skipped, keep_logits, loss_line = run.skipped, run.keep_logits, run.loss_line
    del run
    gc.collect()
    n_micro = cfg["global_batch"] // cfg["micro_batch"]
    if ctx.rank != 0:
        return None
    name = (f"train_{ctx.world_size}st_{cfg['schedule']}_gb{cfg['global_batch']}"
            f"_mb{cfg['micro_batch']}{'_rc' if cfg['recompute'] else ''}")
    if trace_dir:
        write_chrome_trace(f"{trace_dir}/{name}.json", events,
                           {"n_micro_batches": n_micro, "schedule": cfg["schedule"]})
    tokens = cfg["global_batch"] * seq_len
    return {"bench": "train", "impl": "ours", "name": name, "n_stages": ctx.world_size,
            "backend": ctx.backend, **cfg, **variant,
            "mode": variant["recompute_mode"] if cfg["recompute"] else None, "n_micro": n_micro,
            "seq_len": seq_len,
            "n_virtual_tokens": n_virtual_tokens if variant["method"] == "prompt" else 0,
            "trainable_floats": trainable, "dtype": str(dtype).replace("torch.", ""),
            "offload": sorted(offload), "steps": steps, "warmup_steps": warmup_steps,
            **timer.record(tokens), "keep_logits": keep_logits, "loss_line": loss_line,
            "peak_mem_gib": peaks, "peak_mem_kind": common.peak_memory_kind(ctx.device),
            "rss_at_start_gib": rss_at_start,
            "peak_reserved_gib": reserved, "weight_bytes": weights,
            "stage_layers": [list(r) for r, _, _ in stage_plan(args, ctx.world_size)],
            "bubble_measured": bubble_fraction(events),
            "bubble_ideal": ideal_bubble_fraction(ctx.world_size, n_micro),
            "loss": loss, "skipped_steps": skipped}


def run_hf(args, dtype, device, cfg, n_virtual_tokens, steps, warmup_steps, seq_len,
           target_fraction, seed, variant):
    """The same configuration through transformers + peft in this process (one device)."""
    from bench import hf
    rss_at_start = common.resident_gib()
    common.reset_peak_memory(device)
    config = hf.peft_config(variant["method"], n_virtual_tokens, variant["lora_r"],
                            lora_settings(targets=variant["lora_targets"]).targets)
    run = hf.PeftRun(args, config, device, dtype, cfg["recompute"])
    common.reset_peak_memory(device)
    _, batches = synthetic_batches(args.vocab_size, cfg["global_batch"], cfg["micro_batch"],
                                   seq_len, target_fraction, seed)
    for _ in range(warmup_steps):
        run.step(batches)
    with common.StepTimer(device) as timer:
        for _ in range(steps):
            loss = run.step(batches)
            timer.lap()
    peak = round(common.peak_memory_gib(device), 3)
    reserved = common.peak_reserved_gib(device)
    del run
    gc.collect()
    return {"bench": "train", "impl": "hf_peft", "n_stages": 1, **cfg,
            "method": variant["method"], "lora_r": variant["lora_r"],
            "lora_targets": variant["lora_targets"],
            "n_micro": cfg["global_batch"] // cfg["micro_batch"], "seq_len": seq_len,
            "n_virtual_tokens": n_virtual_tokens if variant["method"] == "prompt" else 0,
            "dtype": str(dtype).replace("torch.", ""),
            "steps": steps, "warmup_steps": warmup_steps,
            **timer.record(cfg["global_batch"] * seq_len), "peak_mem_gib": [peak],
            "peak_mem_kind": common.peak_memory_kind(device), "peak_reserved_gib": [reserved],
            "rss_at_start_gib": rss_at_start,
            "loss": loss, **hf.versions()}


def ratio_record(what: str, ours: dict, other: dict) -> dict:
    return {"bench": "train_ratio", "ratio_of": what,
            **{k: ours[k] for k in ("schedule", "global_batch", "micro_batch", "recompute")},
            "tokens_per_s_ratio": ours["tokens_per_s"] / other["tokens_per_s"],
            "ours_max_stage_peak_gib": max(ours["peak_mem_gib"]),
            "other_max_stage_peak_gib": max(other["peak_mem_gib"])}


def pipeline_ratio_record(piped: dict, single: dict) -> dict:
    """The pipeline against one process, plus its distance from the ideal on separate devices:
    the single process's step time split over p stages, stretched by the (p-1)/(m+p-1) bubble."""
    p = piped["n_stages"]
    ideal = single["step_time_s"] / p / (1 - piped["bubble_ideal"])
    return {**ratio_record(f"{p} stages / 1 stage", piped, single),
            "ideal_step_time_s_separate_devices": ideal,
            "step_time_over_ideal": piped["step_time_s"] / ideal}


@takes(TRAINING)
def main(shape: str = "tiny", n_stages: int = None, schedule="1f1b", global_batch=8, micro_batch=8,
         seq_len: int = 512, n_virtual_tokens: int = 32, dtype: str = "auto", recompute=False,
         offload=None, steps: int = 5, warmup_steps: int = 2, target_fraction: float = 1.0,
         compare_hf: bool = False, rounds: int = 1, impl: str = "ours",
         compare_single_stage: bool = False, trace_dir: str = None,
         recompute_mode: str = "full", compile=False, fused: bool = False, quantize: str = None,
         group_size: int = None, memory_cap_gib: float = None, method: str = "prompt",
         lora_r: int = 8, lora_targets: str = "q,v", cpu_linears="onednn",
         device: str = None, seed: int = 0, timeout_s: float = 1800.0, **options):
    """Tokens/s (text tokens: global_batch x seq_len per step; the virtual tokens ride along),
    step time, every stage's peak memory and the traced bubble, per configuration.

    global_batch, micro_batch, schedule, recompute and loss_logits take one value or several
    (`--micro_batch 1,2,4`, `--loss_logits keep,recompute`): every combination runs, each with a
    freshly built model. offload is one set of switches for the whole run
    (optimizer,activations,weights). compare_hf: every configuration, and the same through
    transformers + peft, each in a process of its own (its own peak memory), `rounds` times,
    alternating the sides round by round; then one train_ratio line per configuration: the
    median and range of the rounds' paired tokens/s ratios (skipped, with a note, when
    transformers and peft are not installed). impl: the side this process runs (ours or
    hf_peft; compare_hf sets it for each process). compare_single_stage runs the configurations
    in one process holding the whole model after the pipeline's processes have finished, the
    anchor for the pipeline's overhead.
    recompute_mode: full or selective, for the configurations that recompute; compile: torch.compile
    each block (True: inductor, or a backend's name such as aot_eager); fused: one wqkv and one
    w13 matrix per block (llama/model/fused.py). quantize: int8 or int4 block linears with random codes
    (llama/model/quant.py; group_size for int4, default as split_model.py picks it: 128 for 7B). memory_cap_gib: each process may allocate
    at most this much GPU memory (torch.cuda.set_per_process_memory_fraction), so one large GPU
    shows whether a stage fits a small card; a stage that hits it stops the run, named.
    method: prompt (a random --n_virtual_tokens soft prompt) or lora (rank --lora_r updates, alpha
    2r, of --lora_targets, as ft_main.py takes them: QLoRA with --quantize); --compare_hf then
    runs PEFT's PROMPT_TUNING or LORA of the same size.
    cpu_linears: on a CPU, the frozen linears' products by oneDNN (onednn, as training runs
    them: llama/model/cpu_linear.py) or by torch's default (none); one value or both.
    """
    if method not in ("prompt", "lora"):
        raise BadInput(f"--method {method!r} must be prompt or lora")
    lora_targets = ",".join(lora_settings(lora_r, 2 * lora_r, 0.0, lora_targets).targets)
    given = {name: value for name, value in locals().items() if name != "options"}
    given.update(options)
    if impl not in ("ours", "hf_peft"):
        raise BadInput(f"--impl {impl!r} must be ours or hf_peft")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise BadInput(f"--rounds {rounds!r} must be a positive integer")
    if recompute_mode not in RECOMPUTE_MODES:
        raise BadInput(f"--recompute_mode {recompute_mode!r} must be one of {', '.join(RECOMPUTE_MODES)}")
    if not isinstance(fused, bool):
        raise BadInput(f"--fused {fused!r} must be True or False")
    if n_stages is not None and (isinstance(n_stages, bool) or not isinstance(n_stages, int)
                                 or n_stages < 1):
        raise BadInput(f"--n_stages {n_stages!r} must be a positive integer")
    for name, value in (("seq_len", seq_len), ("n_virtual_tokens", n_virtual_tokens),
                        ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BadInput(f"--{name} {value!r} must be a positive integer")
    if not 0 < target_fraction <= 1:
        raise BadInput(f"--target_fraction {target_fraction} must be in (0, 1]")
    offload_set = parse_offload(offload)
    if recompute_mode == "selective" and offload_set & {"activations", "weights"}:
        raise BadInput("--recompute_mode selective keeps activations on the device: it cannot go "
                       "with --offload activations or weights")
    configs = configurations(global_batch, micro_batch, schedule, recompute,
                             options["loss_logits"], cpu_linears)
    if offload_set & {"activations", "weights"}:  # both work through recomputation
        configs = [c for c in configs if c["recompute"]] or [{**c, "recompute": True} for c in configs]
    if compare_hf and not common.started_by_torchrun():
        missing = common.hf_missing()
        if not missing:
            return compare_with_hf(given, configs)
        common.emit({"bench": "train", "impl": "hf_peft", "skipped": missing})  # ours still runs
    if n_stages and n_stages > 1 and impl == "ours" and not common.started_by_torchrun():
        sys.exit(common.relaunch_as_stages("bench.train_bench", n_stages))
    run_configurations(given, configs, offload_set)


def run_configurations(given: dict, configs: list, offload: frozenset):
    """This process's side (--impl) of every configuration: one JSON line each, then a table."""
    shape, n_stages, timeout_s = given["shape"], given["n_stages"], given["timeout_s"]
    args = model_args(shape, max_seq_len=given["seq_len"] + given["n_virtual_tokens"])
    ctx = init_distributed(given["device"], timeout_s)
    if n_stages is not None and ctx.world_size != n_stages:
        raise BadInput(f"torchrun started {ctx.world_size} processes but --n_stages is {n_stages}")
    dtype = pick_dtype(given["dtype"], ctx.device)
    cap_memory(ctx.device, given["memory_cap_gib"])
    quantize, group_size = given["quantize"], given["group_size"]
    if quantize == "int4" and group_size is None:
        group_size = largest_group_size(args.dim, args.hidden_dim)  # as split_model.py picks it
    if quantize is not None:
        check_scheme(quantize, group_size)
    run_args = {name: given[name] for name in ("n_virtual_tokens", "steps", "warmup_steps",
                                               "seq_len", "target_fraction", "seed")}
    run_args["variant"] = {"recompute_mode": given["recompute_mode"], "compile": given["compile"],
                           "fused": given["fused"], "quantize": quantize, "group_size": group_size,
                           "method": given["method"], "lora_r": given["lora_r"],
                           "lora_targets": given["lora_targets"]}
    env = {"shape": shape_name(shape), **common.environment(ctx.device)}
    if given["impl"] == "hf_peft":
        records = run_hf_configurations(args, dtype, ctx.device, configs, env, run_args)
    else:
        records = run_our_configurations(ctx, args, dtype, configs, offload, given, env, run_args)
    if records is not None:
        common.print_table(records, TABLE)


def run_our_configurations(ctx, args, dtype, configs, offload, given, env, run_args):
    """Ours, on every rank; then (rank 0) the one-process anchor of compare_single_stage."""
    trace_dir, memory_cap_gib = given["trace_dir"], given["memory_cap_gib"]
    records = []
    for cfg in configs:
        try:
            record = run_ours(ctx, args, dtype, cfg, offload=offload, trace_dir=trace_dir,
                              **run_args)
        except torch.cuda.OutOfMemoryError:
            if ctx.distributed:  # torchrun stops the other stages when this one fails
                cap = f" of --memory_cap_gib {memory_cap_gib}" if memory_cap_gib else ""
                raise BadInput(f"stage {ctx.rank} ran out of GPU memory{cap} in {cfg} (peak "
                               f"{common.peak_memory_gib(ctx.device):.2f} GiB): try --recompute, "
                               "a smaller --micro_batch or --offload") from None
            record = {"bench": "train", "impl": "ours", **cfg, "error": "out of GPU memory"}
            gc.collect()
        if record is not None:
            record.update(env)
            common.emit(record)
            records.append(record)
    ctx.barrier()
    ctx.close()
    if ctx.rank != 0:
        return None
    records = [r for r in records if "error" not in r]
    # The other stages have finished: this process alone now runs the anchor.
    if given["compare_single_stage"] and ctx.world_size > 1:
        single = DistContext(device=ctx.device, timeout_s=given["timeout_s"])
        for record in list(records):
            cfg = {k: record[k] for k in CONFIG_KEYS}
            one = run_ours(single, args, dtype, cfg, offload=offload, trace_dir=trace_dir, **run_args)
            one.update(env)
            common.emit(one)
            common.emit(pipeline_ratio_record(record, one))
            records.append(one)
    return records


def run_hf_configurations(args, dtype, device, configs, env, run_args):
    """transformers + peft, once per (batch, micro-batch, recompute): it has no schedules, and
    its loss keeps its logits."""
    records, done = [], set()
    for cfg in configs:
        key = (cfg["global_batch"], cfg["micro_batch"], cfg["recompute"])
        if key not in done:
            done.add(key)
            record = {**run_hf(args, dtype, device, cfg, **run_args), **env}
            common.emit(record)
            records.append(record)
    return records


def compare_with_hf(given: dict, configs: list):
    """Each configuration of ours and of transformers + peft in its own process, alternated for
    --rounds rounds (bench/rounds.py); one train_ratio line per configuration of ours."""
    child = {**given, "compare_hf": False, "rounds": None, "impl": "ours"}
    sides = {("ours", i): {**child, **cfg} for i, cfg in enumerate(configs)}
    for cfg in configs:
        key = ("hf_peft", cfg["global_batch"], cfg["micro_batch"], cfg["recompute"])
        sides.setdefault(key, {**child, **cfg, "impl": "hf_peft", "n_stages": None,
                               "compare_single_stage": False})
    results = alternate("bench.train_bench", sides, given["rounds"], given["timeout_s"])
    n_stages = given["n_stages"] or 1
    summaries = []
    for i, cfg in enumerate(configs):
        ours = [next(r for r in records if r.get("n_stages") == n_stages)
                for records in results[("ours", i)]]
        theirs = [records[0] for records in
                  results[("hf_peft", cfg["global_batch"], cfg["micro_batch"], cfg["recompute"])]]
        summaries.append(paired_hf_ratio(n_stages, cfg, ours, theirs))
        common.emit(summaries[-1])
    common.print_table(summaries, RATIO_TABLE)


def paired_hf_ratio(n_stages: int, cfg: dict, ours: list, theirs: list) -> dict:
    """Ours against HF over the rounds: the medians and ranges of each side and of the paired
    ratios (tokens/s, and tokens per CPU-second), and each side's peak memory."""
    def each(records, field):
        return [r[field] for r in records]
    ours_peaks = [max(r["peak_mem_gib"]) for r in ours]
    their_peaks = [max(r["peak_mem_gib"]) for r in theirs]
    ratios = paired_ratios(each(ours, "tokens_per_s"), each(theirs, "tokens_per_s"),
                                  "tokens_per_s_ratio")
    return {"bench": "train_ratio", "ratio_of": f"ours ({n_stages} stages) / hf_peft, paired by "
            "round", **cfg, "keep_logits": ours[0]["keep_logits"], "rounds": len(ours),
            "tokens_per_s_ratio": ratios["tokens_per_s_ratio_median"], **ratios,
            **paired_ratios(each(ours, "tokens_per_s_fastest"),
                            each(theirs, "tokens_per_s_fastest"), "fastest_step_ratio"),
            **paired_ratios(each(ours, "tokens_per_cpu_s"), each(theirs, "tokens_per_cpu_s"),
                            "tokens_per_cpu_s_ratio"),
            **spread(each(ours, "tokens_per_s"), "ours_tokens_per_s"),
            **spread(each(theirs, "tokens_per_s"), "other_tokens_per_s"),
            "ours_max_stage_peak_gib": statistics.median(ours_peaks),
            "other_max_stage_peak_gib": statistics.median(their_peaks),
            **spread(ours_peaks, "ours_peak_gib"), **spread(their_peaks, "other_peak_gib"),
            "ours_rss_at_start_gib": statistics.median(each(ours, "rss_at_start_gib")),
            "other_rss_at_start_gib": statistics.median(each(theirs, "rss_at_start_gib"))}


if __name__ == "__main__":
    run_cli(main)

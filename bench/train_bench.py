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
import gc
import sys

import torch

from bench import common
from bench.shapes import model_args, parameter_bytes, random_stage, shape_name
from llama.formats.checkpoint import stage_plan
from llama.training.data import MicroBatch
from llama.parallel.distributed import DistContext, init_distributed
from llama.cli import run_cli
from llama.errors import BadInput
from llama.prepare.offload import RECOMPUTE_MODES, optimizer_device
from llama.parallel.pipeline import SCHEDULES, Stage
from llama.training.precision import LossScaler, ScaledAdamW, agree, finish_step
from llama.model.quant import check_scheme, largest_group_size
from llama.tuning.lora import apply_lora, lora_settings
from llama.tuning.methods import apply_prompt
from llama.tuning.prompt import SoftPrompt, init_prompt_weight
from llama.prepare.stage import Preparation, pick_dtype, prepare_stage
from llama.parallel.trace import Tracer, bubble_fraction, ideal_bubble_fraction, write_chrome_trace
from llama.training.config import parse_offload

TABLE = ["impl", "n_stages", "schedule", "global_batch", "micro_batch", "recompute", "mode",
         "compile", "offload",
         "tokens_per_s", "step_time_s", "peak_mem_gib", "bubble_measured", "bubble_ideal"]


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


def configurations(global_batch, micro_batch, schedule, recompute):
    """Every combination of the (possibly several) values given; checked before any work."""
    configs = []
    for gb in common.as_list(global_batch):
        for mb in common.as_list(micro_batch):
            for sched in common.as_list(schedule):
                for rc in common.as_list(recompute):
                    if isinstance(gb, bool) or not isinstance(gb, int) or gb < 1 or \
                            isinstance(mb, bool) or not isinstance(mb, int) or mb < 1 or gb % mb:
                        raise BadInput(f"--micro_batch {mb!r} must be a positive integer that "
                                       f"divides --global_batch {gb!r}")
                    if sched not in SCHEDULES:
                        raise BadInput(f"--schedule {sched!r} must be one of {', '.join(SCHEDULES)}")
                    if not isinstance(rc, bool):
                        raise BadInput(f"--recompute {rc!r} must be True or False")
                    configs.append({"global_batch": gb, "micro_batch": mb, "schedule": sched,
                                    "recompute": rc})
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

    def __init__(self, ctx, args, dtype, n_virtual_tokens, recompute, offload, seed,
                 recompute_mode="full", compile=False, fused=False, quantize=None,
                 group_size=None, method="prompt", lora_r=8, lora_targets="q,v"):
        self.ctx = ctx
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
            compile=compile))
        sync = torch.cuda.synchronize if ctx.device.type == "cuda" else None
        self.tracer = Tracer(ctx.rank, enabled=False, synchronize=sync)
        self.stage = Stage(model, ctx, tracer=self.tracer, tuning=tuning)
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
    run = PipelineRun(ctx, args, dtype, n_virtual_tokens, cfg["recompute"], offload, seed,
                      **variant)
    batches, _ = synthetic_batches(args.vocab_size, cfg["global_batch"], cfg["micro_batch"],
                                   seq_len, target_fraction, seed)
    clock = common.Clock(ctx.device)
    for _ in range(warmup_steps):
        run.step(batches, cfg["schedule"])
    ctx.barrier()
    started = clock.now()
    for _ in range(steps):
        loss = run.step(batches, cfg["schedule"])
    step_time = (clock.now() - started) / steps
    ctx.barrier()
    run.tracer.enabled = True  # one more step, traced (with syncs) and not timed
    run.step(batches, cfg["schedule"])
    run.tracer.enabled = False
    events = ctx.gather_objects(run.tracer.events)
    peaks = ctx.gather_objects(round(common.peak_memory_gib(ctx.device), 3))
    reserved = ctx.gather_objects(common.peak_reserved_gib(ctx.device))
    weights = ctx.gather_objects(run.weight_bytes)
    trainable = ctx.gather_objects(run.trainable_floats)
    skipped = run.skipped
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
            "mode": variant["recompute_mode"] if cfg["recompute"] else None, "n_micro": n_micro, "seq_len": seq_len,
            "n_virtual_tokens": n_virtual_tokens if variant["method"] == "prompt" else 0,
            "trainable_floats": trainable, "dtype": str(dtype).replace("torch.", ""),
            "offload": sorted(offload), "steps": steps, "warmup_steps": warmup_steps,
            "step_time_s": step_time, "tokens_per_s": tokens / step_time,
            "peak_mem_gib": peaks, "peak_mem_kind": common.peak_memory_kind(ctx.device),
            "peak_reserved_gib": reserved, "weight_bytes": weights,
            "stage_layers": [list(r) for r, _, _ in stage_plan(args, ctx.world_size)],
            "bubble_measured": bubble_fraction(events),
            "bubble_ideal": ideal_bubble_fraction(ctx.world_size, n_micro),
            "loss": loss, "skipped_steps": skipped}


def run_hf(args, dtype, device, cfg, n_virtual_tokens, steps, warmup_steps, seq_len,
           target_fraction, seed, variant):
    """The same configuration through transformers + peft in this process (one device)."""
    from bench import hf
    common.reset_peak_memory(device)
    config = hf.peft_config(variant["method"], n_virtual_tokens, variant["lora_r"],
                            lora_settings(targets=variant["lora_targets"]).targets)
    run = hf.PeftRun(args, config, device, dtype, cfg["recompute"])
    common.reset_peak_memory(device)
    _, batches = synthetic_batches(args.vocab_size, cfg["global_batch"], cfg["micro_batch"],
                                   seq_len, target_fraction, seed)
    clock = common.Clock(device)
    for _ in range(warmup_steps):
        run.step(batches)
    started = clock.now()
    for _ in range(steps):
        loss = run.step(batches)
    step_time = (clock.now() - started) / steps
    peak = round(common.peak_memory_gib(device), 3)
    reserved = common.peak_reserved_gib(device)
    del run
    gc.collect()
    return {"bench": "train", "impl": "hf_peft", "n_stages": 1, **cfg,
            "method": variant["method"], "lora_r": variant["lora_r"],
            "lora_targets": variant["lora_targets"],
            "n_micro": cfg["global_batch"] // cfg["micro_batch"], "seq_len": seq_len,
            "n_virtual_tokens": n_virtual_tokens if variant["method"] == "prompt" else 0,
            "dtype": str(dtype).replace("torch.", ""), "steps": steps, "warmup_steps": warmup_steps, "step_time_s": step_time,
            "tokens_per_s": cfg["global_batch"] * seq_len / step_time, "peak_mem_gib": [peak],
            "peak_mem_kind": common.peak_memory_kind(device), "peak_reserved_gib": [reserved],
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


def main(shape: str = "tiny", n_stages: int = None, schedule="1f1b", global_batch=8, micro_batch=8,
         seq_len: int = 512, n_virtual_tokens: int = 32, dtype: str = "auto", recompute=False,
         offload=None, steps: int = 5, warmup_steps: int = 2, target_fraction: float = 1.0,
         compare_hf: bool = False, compare_single_stage: bool = False, trace_dir: str = None,
         recompute_mode: str = "full", compile=False, fused: bool = False, quantize: str = None,
         group_size: int = None, memory_cap_gib: float = None, method: str = "prompt",
         lora_r: int = 8, lora_targets: str = "q,v",
         device: str = None, seed: int = 0, timeout_s: float = 1800.0):
    """Tokens/s (text tokens: global_batch x seq_len per step; the virtual tokens ride along),
    step time, every stage's peak memory and the traced bubble, per configuration.

    global_batch, micro_batch, schedule and recompute take one value or several (`--micro_batch
    1,2,4`): every combination runs, each with a freshly built model. offload is one set of
    switches for the whole run (optimizer,activations,weights). compare_hf runs the same
    configurations through transformers + peft in one process (skipped, with a note, when they are
    not installed); compare_single_stage runs them in one process holding the whole model, the
    anchor for the pipeline's overhead. Both run after the pipeline's processes have finished.
    recompute_mode: full or selective, for the configurations that recompute; compile: torch.compile
    each block (True: inductor, or a backend's name such as aot_eager); fused: one wqkv and one
    w13 matrix per block (llama/model/fused.py). quantize: int8 or int4 block linears with random codes
    (llama/model/quant.py; group_size for int4, default as split_model.py picks it: 128 for 7B). memory_cap_gib: each process may allocate
    at most this much GPU memory (torch.cuda.set_per_process_memory_fraction), so one large GPU
    shows whether a stage fits a small card; a stage that hits it stops the run, named.
    method: prompt (a random --n_virtual_tokens soft prompt) or lora (rank --lora_r updates, alpha
    2r, of --lora_targets, as ft_main.py takes them: QLoRA with --quantize); --compare_hf then
    runs PEFT's PROMPT_TUNING or LORA of the same size.
    """
    if method not in ("prompt", "lora"):
        raise BadInput(f"--method {method!r} must be prompt or lora")
    lora_targets = ",".join(lora_settings(lora_r, 2 * lora_r, 0.0, lora_targets).targets)
    if recompute_mode not in RECOMPUTE_MODES:
        raise BadInput(f"--recompute_mode {recompute_mode!r} must be one of {', '.join(RECOMPUTE_MODES)}")
    if not isinstance(fused, bool):
        raise BadInput(f"--fused {fused!r} must be True or False")
    if n_stages is not None and (isinstance(n_stages, bool) or not isinstance(n_stages, int)
                                 or n_stages < 1):
        raise BadInput(f"--n_stages {n_stages!r} must be a positive integer")
    if n_stages and n_stages > 1 and not common.started_by_torchrun():
        sys.exit(common.relaunch_as_stages("bench.train_bench", n_stages))
    for name, value in (("seq_len", seq_len), ("n_virtual_tokens", n_virtual_tokens),
                        ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BadInput(f"--{name} {value!r} must be a positive integer")
    if not 0 < target_fraction <= 1:
        raise BadInput(f"--target_fraction {target_fraction} must be in (0, 1]")
    offload = parse_offload(offload)
    if recompute_mode == "selective" and offload & {"activations", "weights"}:
        raise BadInput("--recompute_mode selective keeps activations on the device: it cannot go "
                       "with --offload activations or weights")
    configs = configurations(global_batch, micro_batch, schedule, recompute)
    if offload & {"activations", "weights"}:  # both work through recomputation
        configs = [c for c in configs if c["recompute"]] or [{**c, "recompute": True} for c in configs]
    args = model_args(shape, max_seq_len=seq_len + n_virtual_tokens)
    ctx = init_distributed(device, timeout_s)
    if n_stages is not None and ctx.world_size != n_stages:
        raise BadInput(f"torchrun started {ctx.world_size} processes but --n_stages is {n_stages}")
    dtype = pick_dtype(dtype, ctx.device)
    cap_memory(ctx.device, memory_cap_gib)
    if quantize == "int4" and group_size is None:
        group_size = largest_group_size(args.dim, args.hidden_dim)  # as split_model.py picks it
    if quantize is not None:
        check_scheme(quantize, group_size)
    run_args = dict(n_virtual_tokens=n_virtual_tokens, steps=steps, warmup_steps=warmup_steps,
                    seq_len=seq_len, target_fraction=target_fraction, seed=seed,
                    variant={"recompute_mode": recompute_mode, "compile": compile, "fused": fused,
                             "quantize": quantize, "group_size": group_size, "method": method,
                             "lora_r": lora_r, "lora_targets": lora_targets})
    env = common.environment(ctx.device)
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
            record.update(shape=shape_name(shape), **env)
            common.emit(record)
            records.append(record)
    ctx.barrier()
    ctx.close()
    if ctx.rank != 0:
        return
    records = [r for r in records if "error" not in r]
    # The other stages have finished: this process alone now runs the anchors.
    if compare_single_stage and ctx.world_size > 1:
        single = DistContext(device=ctx.device, timeout_s=timeout_s)
        for record in list(records):
            cfg = {k: record[k] for k in ("global_batch", "micro_batch", "schedule", "recompute")}
            one = run_ours(single, args, dtype, cfg, offload=offload, trace_dir=trace_dir, **run_args)
            one.update(shape=shape_name(shape), **env)
            common.emit(one)
            common.emit(pipeline_ratio_record(record, one))
            records.append(one)
    if compare_hf:
        missing = common.hf_missing()
        if missing:
            common.emit({"bench": "train", "impl": "hf_peft", "skipped": missing})
        else:
            done = {}  # HF has no schedules: one run per (batch, micro-batch, recompute)
            for record in [r for r in records if r["n_stages"] == ctx.world_size]:
                cfg = {k: record[k] for k in ("global_batch", "micro_batch", "schedule", "recompute")}
                key = (cfg["global_batch"], cfg["micro_batch"], cfg["recompute"])
                if key in done:
                    common.emit(ratio_record(f"ours ({ctx.world_size} stages) / hf_peft", record,
                                             done[key]))
                    continue
                theirs = done[key] = run_hf(args, dtype, ctx.device, cfg, **run_args)
                theirs.update(shape=shape_name(shape), **env)
                common.emit(theirs)
                common.emit(ratio_record(f"ours ({ctx.world_size} stages) / hf_peft", record, theirs))
                records.append(theirs)
    common.print_table(records, TABLE)


if __name__ == "__main__":
    run_cli(main)

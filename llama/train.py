"""The soft-prompt training loop, run by every pipeline rank (ft_main.py is its command line).

Every rank builds the same batches; stage 0 owns the prompt and its optimizer; the last stage
owns the loss. Once per step all ranks agree, in one small all-reduce, on whether the step
overflowed, whether to stop, and what to report; so every rank takes the same decisions.
"""
import contextlib
import json
import math
import os
import resource
import signal
import time
from pathlib import Path

import torch

from llama.checkpoint import atomic_torch_save, atomic_write_text, params_digest
from llama.data import (END_TARGETS, BatchLoader, end_target_ids, eval_batches, load_dataset,
                        load_records, make_micro_batch, split_dataset, tokenize_record)
from llama.distributed import PeerLost, report_and_exit
from llama.errors import BadInput
from llama.formats import safe_torch_load
from llama.offload import (OFFLOAD_CHOICES, apply_recompute, apply_weight_streaming,
                           optimizer_device)
from llama.pipeline import SCHEDULES, Stage
from llama.precision import LossScaler, ScaledAdamW, finish_step
from llama.progress import elapsed_and_eta
from llama.prompt import SoftPrompt, export_peft, init_prompt_weight, save_prompt
from llama.runtime import start_stage
from llama.trace import Tracer, write_chrome_trace

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"
# What a run writes into --out; a folder holding any of them is a used one. --overwrite deletes
# the first two at the start (a new run would append to one and could resume from the other);
# the prompt files are replaced, atomically, when the new run saves its prompt.
RUN_FILES = (CHECKPOINT_FILE, METRICS_FILE, "prompt.json", "prompt.pt", "peft")
LOCK_FILE = ".lock"
# The settings a resumed run must share with the run it continues.
RUN_IDENTITY = ("data", "template", "n_virtual_tokens", "global_batch_size", "micro_batch_size",
                "seed", "eval_fraction", "train_on_prompt", "max_seq_len", "steps", "epochs",
                "eos_target")
STOP_PROBE_ROWS = 8  # rows of the data that model_stop_token asks the model about


def parse_offload(offload):
    if offload in (None, "", "none", False):
        return set()
    names = offload.split(",") if isinstance(offload, str) else list(offload)
    unknown = [n for n in names if n not in OFFLOAD_CHOICES]
    if unknown:
        raise BadInput(f"--offload {unknown[0]!r} is not one of {', '.join(OFFLOAD_CHOICES)} "
                       "(comma-separated, e.g. --offload optimizer,activations)")
    return set(names)


def check_config(cfg, max_seq_len: int):
    def positive_int(name):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise BadInput(f"--{name}={value!r} must be a positive integer")
    for name in ("n_virtual_tokens", "micro_batch_size", "global_batch_size", "log_every",
                 "max_skipped_steps"):
        positive_int(name)
    if cfg.n_virtual_tokens >= max_seq_len - 1:
        raise BadInput(f"--n_virtual_tokens={cfg.n_virtual_tokens} leaves no room for text in "
                       f"max_seq_len={max_seq_len}: use fewer virtual tokens or a larger --max_seq_len")
    if cfg.global_batch_size % cfg.micro_batch_size:
        raise BadInput(f"--micro_batch_size={cfg.micro_batch_size} does not divide "
                       f"--global_batch_size={cfg.global_batch_size}")
    if cfg.schedule not in SCHEDULES:
        raise BadInput(f"--schedule {cfg.schedule!r} must be one of {', '.join(SCHEDULES)}")
    if cfg.steps is not None:
        positive_int("steps")
    if not (isinstance(cfg.lr, (int, float)) and cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise BadInput(f"--lr={cfg.lr!r} must be a positive number")
    if cfg.lr_schedule not in ("cosine", "linear", "constant"):
        raise BadInput(f"--lr_schedule {cfg.lr_schedule!r} must be cosine, linear or constant")
    if not 0 <= cfg.eval_fraction < 1:
        raise BadInput(f"--eval_fraction={cfg.eval_fraction} must be in [0, 1)")
    if cfg.eos_target not in END_TARGETS:
        raise BadInput(f"--eos_target {cfg.eos_target!r} must be one of {', '.join(END_TARGETS)}")
    if cfg.resume and cfg.overwrite:
        raise BadInput("--resume and --overwrite contradict each other: pass --resume to continue "
                       "the run in --out, or --overwrite to start it again")


def lr_at(step: int, total: int, base: float, warmup: int, schedule: str, min_ratio: float = 0.1):
    """Linear warmup to `base`, then cosine or linear decay (to min_ratio * base) or constant."""
    if step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return base
    progress = (step - warmup) / max(total - warmup, 1)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return base * (min_ratio + (1 - min_ratio) * shape)


def peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the end of the step and stops."""

    def __init__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handle)
                         for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        """Give the signals back, so a caller in the same process (a test, a notebook) can be
        interrupted again once training is over."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def model_stop_token(cfg, ctx, model, tokenizer, max_len) -> str:
    """"eos" or "bos": of the two tokens generation stops at, the one this model predicts more
    after the end of the first rows of the data. LLaMA ends a text with EOS; llama2.c's story
    models (stories260K) were trained on stories separated by BOS alone, never emit EOS, and
    end a story with the BOS of the next one. Every rank takes part (one forward per token)."""
    records, _ = load_records(cfg.data, strict=False, log=lambda line: None)
    rows = []
    for record in records[:STOP_PROBE_ROWS]:
        ids, _ = tokenize_record(record, tokenizer, cfg.template, cfg.train_on_prompt, "none")
        if len(ids) < max_len:
            rows.append(ids)
    if not rows:
        return "eos"  # every row is cut at max_len, so none is trained with an end target
    stage, mean_loss = Stage(model, ctx), {}
    for name in ("eos", "bos"):
        end = end_target_ids(tokenizer, name)
        # the end token is the only target of each row: its mean -log p after the text
        examples = [(ids + end, len(ids)) for ids in rows]
        batches = [make_micro_batch(examples[i:i + cfg.micro_batch_size], tokenizer.pad_id)
                   for i in range(0, len(examples), cfg.micro_batch_size)]
        mean_loss[name] = evaluate(stage, ctx, batches, with_prompt=False)
    chosen = min(mean_loss, key=mean_loss.get)
    ctx.log(f"end-of-text target: {chosen.upper()} (the model's stop token: after {len(rows)} rows "
            f"of the data its -log p is {mean_loss['eos']:.2f} for EOS, {mean_loss['bos']:.2f} "
            "for BOS); --eos_target eos, bos or none overrides")
    return chosen


def build_data(cfg, ctx, tokenizer, max_len, end_target):
    """Rank 0 tokenises and writes the cache first, so the other ranks only read it."""
    log = ctx.log
    if ctx.rank != 0:
        ctx.barrier()
    dataset = load_dataset(cfg.data, tokenizer, cfg.template, max_len, cfg.train_on_prompt,
                           cfg.strict, cfg.cache_dir, log=log, end_target=end_target)
    if ctx.rank == 0:
        ctx.barrier()
    train_set, held_out = split_dataset(dataset, cfg.eval_fraction, cfg.seed)
    # Checked here, not in BatchLoader: the loader never hears of the held-out fraction.
    if len(held_out) and len(train_set) < cfg.global_batch_size:
        raise BadInput(f"the dataset has {len(train_set)} examples, fewer than one global batch "
                       f"of {cfg.global_batch_size}, once --eval_fraction {cfg.eval_fraction} "
                       f"holds out {len(held_out)} of its {len(dataset)}: lower "
                       "--global_batch_size or --eval_fraction, or add data")
    loader = BatchLoader(train_set, cfg.global_batch_size, cfg.micro_batch_size, tokenizer.pad_id,
                         cfg.seed)
    held_out_batches = eval_batches(held_out, cfg.micro_batch_size, tokenizer.pad_id) \
        if len(held_out) else []
    log(f"data: {len(train_set)} training and {len(held_out)} held-out examples from {cfg.data}")
    return loader, held_out_batches


def build_prompt(cfg, model, tokenizer, ctx):
    if not ctx.is_first:
        return None
    weight = init_prompt_weight(cfg.init, cfg.n_virtual_tokens, model.tok_embeddings.weight,
                                tokenizer, cfg.init_text, cfg.seed)
    return SoftPrompt(weight).to(ctx.device)


def run_identity(cfg):
    return {name: getattr(cfg, name) for name in RUN_IDENTITY}


def save_training_state(path, step, prompt, optimizer, scaler, loader, identity, digest, losses):
    """Everything a resumed run needs, in one file written atomically (rank 0 only)."""
    atomic_torch_save({"step": step, "prompt": prompt.weight.detach().cpu().clone(),
                       "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                       "loader": loader.state_dict(), "identity": json.dumps(identity),
                       "params_digest": digest, "losses": json.dumps(losses),
                       "rng": torch.get_rng_state()}, path)


def read_training_state(path, identity, digest):
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"--resume {path}: no training checkpoint there (it is written every "
                       "--save_every steps as <out>/checkpoint.pt)")
    state = safe_torch_load(path, mmap=False)
    if not isinstance(state, dict) or "step" not in state:
        raise BadInput(f"{path} is not a training checkpoint of ft_main.py")
    if state.get("params_digest") != digest:
        raise BadInput(f"--resume {path} was trained on another model: use its --ckpt_dir")
    kinds = {"step": int, "prompt": torch.Tensor, "optimizer": dict, "scaler": dict,
             "loader": dict, "identity": str, "losses": str, "rng": torch.Tensor}
    wrong = [name for name, kind in kinds.items() if not isinstance(state.get(name), kind)]
    wrong += ["step"] if not wrong and state["step"] < 0 else []
    try:
        saved = json.loads(state["identity"]) if not wrong else None
        if not wrong and not isinstance(json.loads(state["losses"]), dict):
            wrong = ["losses"]
    except ValueError:
        wrong = ["identity or losses"]
    if wrong or not isinstance(saved, dict):
        raise BadInput(f"--resume {path} is damaged ({(wrong or ['identity'])[0]!r} is missing or "
                       "not what ft_main.py writes): resume from another checkpoint or train again")
    different = [k for k in identity if saved.get(k) != identity[k]]
    if different:
        k = different[0]
        raise BadInput(f"--resume {path} belongs to another run: it had --{k}={saved.get(k)!r}, "
                       f"this run has {identity[k]!r}; resume with the same settings")
    return state


@contextlib.contextmanager
def claim_out(out: Path, resume, overwrite: bool, log):
    """Hold --out for the run's life: one run at a time, and a used folder only with --resume
    or --overwrite. Files that are not a run's (RUN_FILES) are never touched."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BadInput(f"--out {out} cannot be created ({error.strerror or error}): pick a "
                       "writable folder") from None
    lock = _lock_folder(out)
    try:
        found = [name for name in RUN_FILES if (out / name).exists()]
        if found and not resume and not overwrite:
            raise BadInput(f"--out {out} already holds a training run ({', '.join(found)}): pass "
                           "--resume to continue it, --overwrite to replace it, or pick another "
                           "--out")
        if found and overwrite:
            for name in (CHECKPOINT_FILE, METRICS_FILE):
                (out / name).unlink(missing_ok=True)
            log(f"--overwrite: replacing the run in {out} (other files there are kept)")
        yield
    finally:
        _unlock_folder(out, lock)


def _lock_folder(out: Path):
    """An exclusive flock on <out>/.lock. The kernel drops it when the process ends, so a
    crashed run never leaves the folder locked. None where flock does not exist (Windows) or
    the file system refuses it: there, nothing stops a second run at the same time."""
    try:
        import fcntl
    except ImportError:
        return None
    path = out / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise BadInput(f"--out {out} is not writable ({error.strerror or error}): pick a "
                           "writable folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BadInput(f"--out {out} is in use by another training run (it holds the "
                           "folder's lock): wait for it to end, or pick another --out") from None
        except OSError:  # a file system without flock
            os.close(fd)
            return None
        # The lock file may have been deleted by a run that just ended (_unlock_folder) after
        # we opened it: then the lock we hold is on a file nobody else will look at; retry.
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _unlock_folder(out: Path, fd):
    """Delete the lock file while still holding the lock, so a finished run leaves none."""
    if fd is None:
        return
    with contextlib.suppress(OSError):
        (out / LOCK_FILE).unlink()
    os.close(fd)


def train(cfg):
    ctx, model, tokenizer = start_stage(cfg.ckpt_dir, cfg.tokenizer_path, cfg.device, cfg.dtype,
                                        cfg.max_seq_len, cfg.timeout_s)
    stop = StopRequest()  # only now: before this point a signal has nothing to save
    try:
        with contextlib.ExitStack() as held:
            return _train(cfg, ctx, model, tokenizer, stop, held)
    except PeerLost as error:
        report_and_exit(error, ctx.rank)
    finally:
        ctx.close()
        stop.restore()


def _train(cfg, ctx, model, tokenizer, stop, held):
    """held: an ExitStack that lives as long as the run (it keeps --out locked)."""
    args, log = model.args, ctx.log
    check_config(cfg, args.max_seq_len)
    offload = parse_offload(cfg.offload)
    prompt = build_prompt(cfg, model, tokenizer, ctx)  # before --out: a bad --init_text leaves none
    out = Path(cfg.out)
    if ctx.rank == 0:  # before any work: a second run into the same --out stops here at once
        held.enter_context(claim_out(out, cfg.resume, cfg.overwrite, log))
    if cfg.recompute or "activations" in offload or "weights" in offload:
        apply_recompute(model, offload_activations="activations" in offload)
    if "weights" in offload:
        apply_weight_streaming(model, ctx.device)
    max_len = args.max_seq_len - cfg.n_virtual_tokens
    end_target = cfg.eos_target if cfg.eos_target != "auto" else \
        model_stop_token(cfg, ctx, model, tokenizer, max_len)
    loader, held_out = build_data(cfg, ctx, tokenizer, max_len, end_target)
    total_steps = cfg.steps or cfg.epochs * loader.steps_per_epoch
    sync = torch.cuda.synchronize if ctx.device.type == "cuda" else None
    tracer = Tracer(ctx.rank, enabled=bool(cfg.trace), synchronize=sync)
    stage = Stage(model, ctx, prompt, cfg.n_virtual_tokens, tracer)
    scaler = LossScaler(enabled=next(model.parameters()).dtype == torch.float16)
    optimizer = ScaledAdamW(prompt.weight, cfg.lr, cfg.weight_decay, (0.9, 0.999),
                            optimizer_device(prompt.weight, "optimizer" in offload)) \
        if prompt is not None else None
    identity, digest = run_identity(cfg), params_digest(args)
    start_step, losses = 0, {}
    if cfg.resume:
        resume_path = out / CHECKPOINT_FILE if cfg.resume is True else Path(cfg.resume)
        state = read_training_state(resume_path, identity, digest) if ctx.rank == 0 else None
        shared = ctx.broadcast_object(None if state is None else
                                      {k: state[k] for k in ("step", "scaler", "loader", "losses")})
        try:
            start_step, losses = shared["step"], json.loads(shared["losses"])
            scaler.load_state_dict(shared["scaler"])
            loader.load_state_dict(shared["loader"])
            if prompt is not None:
                with torch.no_grad():
                    prompt.weight.copy_(state["prompt"])
                optimizer.load_state_dict(state["optimizer"])
                torch.set_rng_state(state["rng"])
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
            raise BadInput(f"--resume {resume_path} is damaged ({type(error).__name__}: "
                           f"{str(error).splitlines()[0] if str(error) else ''}): resume from "
                           "another checkpoint or train again") from None
        log(f"resumed from {resume_path} at step {start_step}")
    elif held_out:
        losses["eval_loss_no_prompt"] = evaluate(stage, ctx, held_out, with_prompt=False)
        losses["eval_loss_init"] = evaluate(stage, ctx, held_out, with_prompt=True)
        log(f"held-out loss: {losses['eval_loss_no_prompt']:.4f} without a prompt, "
            f"{losses['eval_loss_init']:.4f} with the initial prompt")

    metrics = None
    if ctx.rank == 0:
        if cfg.resume:
            drop_metrics_after(out / METRICS_FILE, start_step)
        try:
            metrics = open(out / METRICS_FILE, "a", encoding="utf-8")
        except OSError as error:
            raise BadInput(f"cannot write {out / METRICS_FILE} ({error.strerror or error}): "
                           "pick a writable --out") from None
    checkpoint_path = out / CHECKPOINT_FILE
    inject = set(cfg.debug_overflow_steps or ())
    skipped_in_a_row, step = 0, start_step
    run_started = time.monotonic()
    for step in range(start_step, total_steps):
        started = time.perf_counter()
        batches = loader.next_global_batch()
        # test hook: a forced overflow; steps are numbered from 1, as in the log and metrics
        scaler_scale = scaler.scale  # what metrics report: the forced inf is not valid JSON
        scale = float("inf") if step + 1 in inject else scaler_scale
        stage.step = step
        loss, n_targets = run_train_step(stage, batches, cfg, scale, ctx)
        overflow = optimizer is not None and optimizer.found_overflow()
        report = ctx.all_reduce_max([overflow, stop.requested, loss or 0.0, *memory_slots(ctx)])
        found_inf, stop_now, loss = bool(report[0]), bool(report[1]), report[2] / max(n_targets, 1)
        lr = lr_at(step, total_steps, cfg.lr, cfg.warmup_steps, cfg.lr_schedule)
        traced = tracer.span("optimizer step", "optimizer", step=step) \
            if optimizer is not None else contextlib.nullcontext()
        with traced:
            skip, grad_norm = finish_step(scaler, optimizer, found_inf, lr, cfg.max_grad_norm)
        skipped_in_a_row = skipped_in_a_row + 1 if skip else 0
        tokens = sum(b.tokens.numel() for b in batches)
        record = {"step": step + 1, "loss": None if skip else loss, "lr": lr,
                  "loss_scale": scaler_scale,
                  "skipped": skip, "grad_norm": grad_norm if not skip else None,
                  "tokens_per_s": tokens / (time.perf_counter() - started),
                  "peak_mem_gib": [round(m, 3) for m in report[3:]]}
        if held_out and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            record["eval_loss"] = evaluate(stage, ctx, held_out, with_prompt=True)
        if not skip:
            losses["train_loss"] = loss
        losses.update({k: record[k] for k in ("eval_loss",) if k in record})
        timing = elapsed_and_eta(time.monotonic() - run_started, step + 1 - start_step,
                                 total_steps - start_step)  # the pace of this run, resumed or not
        log_step(ctx, metrics, record, total_steps, cfg.log_every, timing)
        if skipped_in_a_row >= cfg.max_skipped_steps:
            raise BadInput(f"the loss has overflowed or been NaN for {skipped_in_a_row} steps in a "
                           f"row (step {step + 1}); stopped. The last good checkpoint is "
                           f"{checkpoint_path if checkpoint_path.exists() else 'none (none was saved)'}; "
                           "lower --lr, or use --dtype bfloat16 or float32")
        finished = step + 1 == total_steps
        if ctx.rank == 0 and (stop_now or finished or (cfg.save_every and (step + 1) % cfg.save_every == 0)):
            save_training_state(checkpoint_path, step + 1, prompt, optimizer, scaler, loader,
                                identity, digest, losses)
        if cfg.trace and step + 1 == start_step + cfg.trace_steps:
            write_trace(cfg, ctx, tracer, len(batches))
        if stop_now:
            log(f"stopped by a signal after step {step + 1}; checkpoint saved to {checkpoint_path}; "
                "continue with --resume")
            return None
    if held_out:
        losses["eval_loss"] = evaluate(stage, ctx, held_out, with_prompt=True)
        log(f"held-out loss {losses['eval_loss']:.4f} with the trained prompt "
            f"(no prompt: {losses.get('eval_loss_no_prompt', float('nan')):.4f})")
    if cfg.trace and total_steps - start_step < cfg.trace_steps:
        write_trace(cfg, ctx, tracer, cfg.global_batch_size // cfg.micro_batch_size)
    if ctx.rank == 0:
        metadata = {"init": cfg.init, "init_text": cfg.init_text if cfg.init == "text" else None,
                    "data": str(cfg.data), "template": cfg.template, "eos_target": end_target,
                    "steps": total_steps, "ckpt_dir": str(cfg.ckpt_dir), "tokenizer": tokenizer.path,
                    "losses": losses, "base_model": cfg.base_model}
        save_prompt(out, prompt.weight, args, metadata)
        export_peft(out / "peft", prompt.weight, args, metadata)
        metrics.close()
        log(f"saved the prompt to {out}/prompt.pt (+ prompt.json, PEFT layout in {out}/peft)")
    return losses


def drop_metrics_after(path, step: int):
    """Forget the lines of steps after the checkpoint: a crashed run logged them, the resumed
    run logs them again, and each step must appear once."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the crash
            continue
        if record.get("step", 0) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    atomic_write_text(path, "".join(kept))


def run_train_step(stage, batches, cfg, scale, ctx):
    try:
        return stage.train_step(batches, cfg.schedule, scale)
    except torch.cuda.OutOfMemoryError:
        raise BadInput(f"stage {ctx.rank} ran out of GPU memory: try --offload activations, a "
                       f"smaller --micro_batch_size (now {cfg.micro_batch_size}), more stages, "
                       "or --offload weights") from None


def memory_slots(ctx):
    """One slot per rank holding that rank's peak memory; the max-reduce fills in the others."""
    slots = [0.0] * ctx.world_size
    slots[ctx.rank] = peak_memory_gib(ctx.device)
    return slots


def evaluate(stage, ctx, batches, with_prompt: bool) -> float:
    total, n_targets = stage.eval_loss(batches, with_prompt)
    return ctx.all_reduce_max([total or 0.0])[0] / max(n_targets, 1)


def log_step(ctx, metrics, record, total_steps, log_every, timing: str = ""):
    if ctx.rank != 0:
        return
    try:
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
    except OSError as error:  # a full disk, most likely
        raise BadInput(f"could not write {metrics.name} ({error.strerror or error}) after step "
                       f"{record['step']}: free some space; the last checkpoint is kept, continue "
                       "with --resume") from None
    if record["step"] % log_every and record["step"] != total_steps and "eval_loss" not in record:
        return
    loss = "skipped (overflow)" if record["skipped"] else f"{record['loss']:.4f}"
    evaluation = f" | eval {record['eval_loss']:.4f} (ppl {math.exp(min(record['eval_loss'], 50)):.2f})" \
        if "eval_loss" in record else ""
    memory = "/".join(f"{m:.2f}" for m in record["peak_mem_gib"])
    ctx.log(f"step {record['step']}/{total_steps} | loss {loss}{evaluation} | "
            f"{record['tokens_per_s']:.0f} tok/s | lr {record['lr']:.2e} | "
            f"scale {record['loss_scale']:g} | peak mem {memory} GiB"
            + (f" | {timing}" if timing else ""))


def write_trace(cfg, ctx, tracer, n_micro):
    events = ctx.gather_objects(tracer.events)
    if ctx.rank == 0:
        write_chrome_trace(str(cfg.trace), events, {"n_stages": ctx.world_size,
                                                    "n_micro_batches": n_micro,
                                                    "schedule": cfg.schedule})
        ctx.log(f"wrote the schedule trace to {cfg.trace}")
    tracer.enabled = False

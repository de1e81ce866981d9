"""What a training run reports: metrics.jsonl (a line per step), the log lines, the trace.

Rank 0 writes; the other ranks' numbers reach it through the step's all-reduce (their peak
memory) or a gather (their trace events).
"""
import json
import math
import resource
import time
from pathlib import Path

import torch

from llama.errors import BadInput
from llama.formats.files import atomic_write_text
from llama.progress import elapsed_and_eta
from llama.training.run_folder import CHECKPOINT_FILE, METRICS_FILE
from llama.parallel.trace import write_chrome_trace


def peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def step_record(step: int, loss: float, lr: float, loss_scale: float, skipped: bool,
                grad_norm: float, batches, seconds: float, peaks) -> dict:
    """One line of metrics.jsonl; steps are numbered from 1, as in the log."""
    tokens = sum(b.tokens.numel() for b in batches)
    return {"step": step + 1, "loss": None if skipped else loss, "lr": lr,
            "loss_scale": loss_scale, "skipped": skipped,
            "grad_norm": None if skipped else grad_norm, "tokens_per_s": tokens / seconds,
            "peak_mem_gib": [round(m, 3) for m in peaks]}


class RunLog:
    """metrics.jsonl and the printed lines of one run (rank 0 writes, every rank may call)."""

    def __init__(self, ctx, out, total_steps: int, start_step: int, log_every: int,
                 resumed: bool):
        self.ctx, self.total_steps, self.start_step = ctx, total_steps, start_step
        self.log_every = log_every
        self.started = time.monotonic()
        self.metrics = None
        if ctx.rank != 0:
            return
        path = out / METRICS_FILE
        if resumed:
            drop_metrics_after(path, start_step)
        try:
            self.metrics = open(path, "a", encoding="utf-8")
        except OSError as error:
            raise BadInput(f"cannot write {path} ({error.strerror or error}): "
                           "pick a writable --out") from None

    def step(self, record: dict):
        if self.ctx.rank != 0:
            return
        self._write(record)
        step = record["step"]
        if step % self.log_every and step != self.total_steps and "eval_loss" not in record:
            return
        # the pace of this run, resumed or not
        timing = elapsed_and_eta(time.monotonic() - self.started, step - self.start_step,
                                 self.total_steps - self.start_step)
        self.ctx.log(f"step {step}/{self.total_steps} | {describe(record)} | {timing}")

    def _write(self, record):
        try:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
        except OSError as error:  # a full disk, most likely
            checkpoint = Path(self.metrics.name).with_name(CHECKPOINT_FILE)
            kept = f"the last checkpoint, {checkpoint}, is kept: continue with --resume" \
                if checkpoint.is_file() else "no checkpoint was saved yet (every --save_every " \
                "steps), so start the run again"
            raise BadInput(f"could not write {self.metrics.name} ({error.strerror or error}) "
                           f"after step {record['step']}: free some space; {kept}") from None

    def close(self):
        if self.metrics is not None:
            self.metrics.close()


def describe(record: dict) -> str:
    loss = "skipped (overflow)" if record["skipped"] else f"{record['loss']:.4f}"
    evaluation = ""
    if "eval_loss" in record:
        evaluation = f" | eval {record['eval_loss']:.4f} (ppl {math.exp(min(record['eval_loss'], 50)):.2f})"
    memory = "/".join(f"{m:.2f}" for m in record["peak_mem_gib"])
    return (f"loss {loss}{evaluation} | {record['tokens_per_s']:.0f} tok/s | "
            f"lr {record['lr']:.2e} | scale {record['loss_scale']:g} | peak mem {memory} GiB")


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


def write_trace(path, ctx, tracer, schedule: str, n_micro: int):
    """Gather every stage's spans on rank 0 and write them as one Chrome trace; stop tracing."""
    events = ctx.gather_objects(tracer.events)
    if ctx.rank == 0:
        write_chrome_trace(str(path), events, {"n_stages": ctx.n_stages, "tp": ctx.tp_size,
                                               "n_micro_batches": n_micro, "schedule": schedule})
        ctx.log(f"wrote the schedule trace to {path}")
    tracer.enabled = False

"""The tuning loop, run by every pipeline rank (ft_main.py is its command line).

Every rank builds the same batches; each stage owns the trainable tensors of its tuning method
(llama/tuning/methods.py, lora.py: the prompt on stage 0, every layer's prefix, adaption prompt or
LoRA pairs on the stage that runs the layer) and their optimizer; the last stage owns the loss. Once per step all ranks agree, in one small
all-reduce, on whether the step overflowed, whether to stop, what to report and every stage's
squared gradient norm (one slot per rank: the max fills in the others, the sum is the global
norm); so every rank takes the same decisions and clips by the same norm.
Set-up happens once (`set_up`); then `_train`'s loop is the whole step: forward and backward
through the pipeline, agree, unscale + clip + AdamW (llama/training/precision.py), log, save.
"""
import contextlib
import functools
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from llama.model.transformer import params_digest
from llama.training.config import RunConfig
from llama.training.batches import BatchLoader, eval_batches, split_dataset
from llama.training.data import load_dataset, model_stop_token
from llama.errors import BadInput
from llama.prepare.offload import optimizer_device
from llama.tuning.lora import apply_lora
from llama.tuning.methods import (apply_adapter, apply_prefix, apply_prompt, init_ids,
                           init_prefix_from_tokens)
from llama.tuning.peft import export_peft
from llama.parallel.loss import loss_sum
from llama.parallel.pipeline import Stage
from llama.training.precision import LossScaler, ScaledAdamW, agree, finish_step, lr_at
from llama.tuning.prompt import SoftPrompt, init_prompt_weight
from llama.training.resume import (checkpoint_path, restore, resume_path, run_identity,
                          save_training_state)
from llama.training.run_folder import PEFT_FOLDER, claim_out
from llama.training.memory import choose_loss_logits
from llama.training.runlog import RunLog, peak_memory_gib, step_record, write_trace
from llama.prepare.stage import run_on_stage
from llama.parallel.trace import Tracer
from llama.tuning.files import save_tuning
from llama.tuning.sharding import join_grid, tuning_shard_dim


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


@dataclass
class Run:
    """What set_up builds once: this rank's part of the pipeline and everything around it."""
    stage: Stage
    tuning: object  # a methods.Tuning: what this stage trains
    optimizer: ScaledAdamW  # None where the stage trains nothing
    scaler: LossScaler
    loader: BatchLoader
    held_out: list  # micro-batches of the held-out examples ([] for none)
    total_steps: int
    end_target: str
    tracer: Tracer

    def save_due(self, cfg, step: int, stop_now: bool) -> bool:
        """After the step numbered `step` (from 1): at the end, on a stop, every --save_every."""
        return bool(stop_now or step == self.total_steps
                    or (cfg.save_every and step % cfg.save_every == 0))

    def save(self, cfg, step: int, losses: dict):
        """checkpoint.pt for --resume: every stage's tensors and optimizer state, gathered by
        global key to rank 0, which writes the one file."""
        optimizer_states = self.stage.ctx.gather_objects(
            self.optimizer.state_dict() if self.optimizer is not None else {})
        if self.stage.ctx.rank == 0:  # the TP ranks' parts joined: one file for any grid
            optimizer_states = [join_grid(optimizer_states, self.stage.ctx.tp_size)]
        # Every rank's: a LoRA's dropout draws from the random state of the rank it runs on.
        rng_states = self.stage.ctx.gather_objects(torch.get_rng_state())
        if self.stage.ctx.rank == 0:
            save_training_state(checkpoint_path(cfg), step, optimizer_states, self.scaler,
                                self.loader, run_identity(cfg),
                                params_digest(self.stage.model.args), losses, rng_states)

    def optimizer_span(self, step: int):
        if self.optimizer is None:
            return contextlib.nullcontext()
        return self.tracer.span("optimizer step", "optimizer", step=step)


def train(cfg: RunConfig):
    """ft_main.py's run on this rank's stage: loaded and prepared (the method, then recompute,
    offload and --compile) by the one start-up path every script uses."""
    def method(ctx, model, tokenizer):
        cfg.check_fits(model.args.max_seq_len)  # before --out exists: a bad value leaves nothing
        return build_tuning(cfg, model, tokenizer, ctx)

    run_on_stage(vars(cfg), lambda *stage: train_stage(cfg, *stage), cfg.preparation(method))


def train_stage(cfg, ctx, model, tokenizer, tuning):
    stop = StopRequest()  # only now: before this point a signal has nothing to save
    try:
        with contextlib.ExitStack() as held:
            return _train(cfg, ctx, model, tokenizer, tuning, stop, held)
    finally:
        stop.restore()


def _train(cfg, ctx, model, tokenizer, tuning, stop, held):
    """held: an ExitStack that lives as long as the run (it keeps --out locked)."""
    run = set_up(cfg, ctx, model, tokenizer, tuning, held)
    start_step, losses = start_or_resume(cfg, ctx, run)
    log = RunLog(ctx, Path(cfg.out), run.total_steps, start_step, cfg.log_every, bool(cfg.resume))
    skipped_in_a_row = 0
    for step in range(start_step, run.total_steps):
        started, batches = time.perf_counter(), run.loader.next_global_batch()
        run.stage.step, loss_scale = step, run.scaler.scale
        loss, n_targets = run_train_step(run.stage, batches, cfg,
                                         scale_for_step(cfg, step, loss_scale), ctx)
        found_inf, stop_now, loss, peaks, grad_norm = agree(
            ctx, run.optimizer, loss_scale, loss, stop.requested, peak_memory_gib(ctx.device))
        lr = lr_at(step, run.total_steps, cfg.lr, cfg.warmup_steps, cfg.lr_schedule)
        with run.optimizer_span(step):
            skipped, grad_norm = finish_step(run.scaler, run.optimizer, found_inf, lr,
                                             cfg.max_grad_norm, grad_norm)
        record = step_record(step, loss / max(n_targets, 1), lr, loss_scale, skipped, grad_norm,
                             batches, time.perf_counter() - started, peaks)
        if run.held_out and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            record["eval_loss"] = losses["eval_loss"] = run.stage.mean_loss(run.held_out)
        losses.update({} if skipped else {"train_loss": record["loss"]})
        log.step(record)
        skipped_in_a_row = skipped_in_a_row + 1 if skipped else 0
        check_overflow_streak(cfg, skipped_in_a_row, step)
        if run.save_due(cfg, step + 1, stop_now):
            run.save(cfg, step + 1, losses)
        if cfg.trace and step + 1 == start_step + cfg.trace_steps:
            write_trace(cfg.trace, ctx, run.tracer, cfg.schedule, len(batches))
        if stop_now:
            return stopped_by_signal(cfg, ctx, step, log)
    log.close()
    return finish(cfg, ctx, run, tokenizer, start_step, losses)


def scale_for_step(cfg, step: int, loss_scale: float) -> float:
    """The loss scale this step's backward uses: --debug_overflow_steps (numbered from 1, as in
    the log) forces an overflow with an infinite one, to show the loss scaler at work."""
    return math.inf if step + 1 in cfg.debug_overflow_steps else loss_scale


def stopped_by_signal(cfg, ctx, step: int, log):
    ctx.log(f"stopped by a signal after step {step + 1}; checkpoint saved to "
            f"{checkpoint_path(cfg)}; continue with --resume")
    log.close()


def set_up(cfg, ctx, model, tokenizer, tuning, held) -> Run:
    # A LoRA's dropout draws from torch's global generator: a run starts it from --seed, not
    # from wherever an earlier run in the same process (a test, a notebook) left it.
    torch.manual_seed(cfg.seed)
    if ctx.rank == 0:  # before any work: a second run into the same --out stops here at once
        held.enter_context(claim_out(Path(cfg.out), cfg.resume, cfg.overwrite, ctx.log,
                                     cfg.ckpt_dir))
    sync = torch.cuda.synchronize if ctx.device.type == "cuda" else None
    tracer = Tracer(ctx.rank, enabled=bool(cfg.trace), synchronize=sync)
    max_len = model.args.max_seq_len - tuning.n_virtual
    stage = Stage(model, ctx, tracer=tracer, tuning=tuning,
                  loss_fn=run_loss(cfg, ctx, model, tuning, max_len))
    ctx.span = stage.span  # the TP all-reduces in the trace, under the step they belong to
    end_target = cfg.eos_target if cfg.eos_target != "auto" else model_stop_token(
        cfg.data, tokenizer, cfg.template, cfg.train_on_prompt, max_len, cfg.micro_batch_size,
        lambda batches: Stage(model, ctx, tuning=tuning).mean_loss(batches, with_prompt=False),
        log=ctx.log)
    max_len_said = f"--max_seq_len {model.args.max_seq_len}" + (
        f" minus the {tuning.n_virtual} virtual tokens" if tuning.n_virtual else "")
    loader, held_out = build_data(cfg, ctx, tokenizer, max_len, max_len_said, end_target)
    optimizer = None
    if tuning.trainable:
        first = next(iter(tuning.trainable.values()))
        # a tensor whole on every TP rank counts once in the global norm (TP rank 0's)
        norm_keys = [key for key, t in tuning.trainable.items()
                     if ctx.tp_rank == 0 or tuning_shard_dim(key, t) is not None]
        optimizer = ScaledAdamW(tuning.trainable, cfg.lr, cfg.weight_decay, (0.9, 0.999),
                                optimizer_device(first, "optimizer" in cfg.offload), norm_keys)
    scaler = LossScaler(enabled=next(model.parameters()).dtype == torch.float16)
    total_steps = cfg.steps or cfg.epochs * loader.steps_per_epoch
    return Run(stage, tuning, optimizer, scaler, loader, held_out, total_steps, end_target, tracer)


def run_loss(cfg, ctx, model, tuning, max_len: int):
    """The cross-entropy this run trains on: its logits kept for backward or recomputed
    (--loss_logits; auto by the last stage's memory), said in one start-up line."""
    keep, line = False, None
    if ctx.is_last:
        keep, line = choose_loss_logits(
            cfg.loss_logits, model, ctx.device, cfg.global_batch_size, cfg.micro_batch_size,
            max_len, tuning.hidden_virtual, cfg.schedule, cfg.activation_mode(),
            cfg.lora() if cfg.method == "lora" else None)
    ctx.log(ctx.broadcast_object(line, src=ctx.world_size - 1))
    return functools.partial(loss_sum, keep_logits=keep)


def build_tuning(cfg, model, tokenizer, ctx):
    """The --method transform on this stage's part of the model (seeded per global layer)."""
    if cfg.method == "prefix":
        tuning = apply_prefix(model, cfg.n_virtual_tokens, cfg.seed)
        if cfg.init != "random":  # else PEFT's N(0, 1)
            ids = init_ids(cfg.init, cfg.n_virtual_tokens, tokenizer, cfg.init_text, cfg.seed)
            init_prefix_from_tokens(Stage(model, ctx, tuning=tuning), ids)
        return tuning
    if cfg.method == "adapter":
        return apply_adapter(model, cfg.n_virtual_tokens, cfg.adapter_layers, cfg.seed)
    if cfg.method == "lora":
        return apply_lora(model, cfg.lora(), cfg.seed)
    prompt = None
    if ctx.is_first:
        weight = init_prompt_weight(cfg.init, cfg.n_virtual_tokens, model.tok_embeddings.weight,
                                    tokenizer, cfg.init_text, cfg.seed)
        prompt = SoftPrompt(weight).to(ctx.device)
    return apply_prompt(prompt, cfg.n_virtual_tokens)


def build_data(cfg, ctx, tokenizer, max_len, max_len_said, end_target):
    """Rank 0 tokenises and writes the cache first, so the other ranks only read it."""
    if ctx.rank != 0:
        ctx.barrier()
    dataset = load_dataset(cfg.data, tokenizer, cfg.template, max_len, cfg.train_on_prompt,
                           cfg.strict, cfg.cache_dir, log=ctx.log, end_target=end_target,
                           max_len_said=max_len_said)
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
    ctx.log(f"data: {len(train_set)} training and {len(held_out)} held-out examples from {cfg.data}")
    if cfg.eval_fraction > 0 and not len(held_out):
        # split_dataset keeps the only example for training: say so, or the user waits for a
        # held-out loss that never comes
        ctx.log(f"note: --eval_fraction {cfg.eval_fraction} holds out nothing: {cfg.data} has "
                f"only {len(dataset)} usable example, which is kept for training, so no held-out "
                "loss is reported; add data for one, or pass --eval_fraction 0")
    return loader, held_out_batches


def start_or_resume(cfg, ctx, run: Run):
    """(first step, losses so far): from the checkpoint with --resume; else the held-out loss
    without a prompt and with the initial one, the baselines the trained prompt must beat."""
    if cfg.resume:
        path = resume_path(cfg)
        start_step, losses = restore(path, ctx, run_identity(cfg),
                                     params_digest(run.stage.model.args), run.optimizer,
                                     run.scaler, run.loader)
        ctx.log(f"resumed from {path} at step {start_step}")
        return start_step, losses
    losses = {}
    if run.held_out:
        losses["eval_loss_no_prompt"] = run.stage.mean_loss(run.held_out, with_prompt=False)
        losses["eval_loss_init"] = run.stage.mean_loss(run.held_out, with_prompt=True)
        what = tuned_thing(cfg)
        ctx.log(f"held-out loss: {losses['eval_loss_no_prompt']:.4f} without a {what}, "
                f"{losses['eval_loss_init']:.4f} with the initial {what}")
    return 0, losses


def tuned_thing(cfg) -> str:
    """What the log calls the trained tensors: a prompt (the deep methods' too, as before), or
    a LoRA, which is no prompt at all."""
    return "LoRA" if cfg.method == "lora" else "prompt"


def run_train_step(stage, batches, cfg, scale, ctx):
    try:
        return stage.train_step(batches, cfg.schedule, scale)
    except torch.cuda.OutOfMemoryError:
        raise BadInput(f"stage {ctx.rank} ran out of GPU memory: try --offload activations, a "
                       f"smaller --micro_batch_size (now {cfg.micro_batch_size}), more stages, "
                       "or --offload weights") from None


def check_overflow_streak(cfg, skipped_in_a_row: int, step: int):
    if skipped_in_a_row < cfg.max_skipped_steps:
        return
    path = checkpoint_path(cfg)
    raise BadInput(f"the loss has overflowed or been NaN for {skipped_in_a_row} steps in a row "
                   f"(step {step + 1}); stopped. The last good checkpoint is "
                   f"{path if path.exists() else 'none (none was saved)'}; lower --lr, or use "
                   "--dtype bfloat16 or float32")


def finish(cfg, ctx, run: Run, tokenizer, start_step: int, losses: dict):
    """The final held-out loss, a trace of a run too short for one, the prompt's files."""
    if run.held_out:
        losses["eval_loss"] = run.stage.mean_loss(run.held_out)
        what = tuned_thing(cfg)
        ctx.log(f"held-out loss {losses['eval_loss']:.4f} with the trained {what} "
                f"(no {what}: {losses.get('eval_loss_no_prompt', float('nan')):.4f})")
    if cfg.trace and run.total_steps - start_step < cfg.trace_steps:
        write_trace(cfg.trace, ctx, run.tracer, cfg.schedule,
                    cfg.global_batch_size // cfg.micro_batch_size)
    # Every stage's tensors under their global keys, gathered to rank 0, which joins the TP
    # ranks' parts and writes the files: the same files whatever grid trained them.
    tensors = ctx.gather_objects({k: p.detach().cpu().clone() for k, p in run.tuning.trainable.items()})
    if ctx.rank == 0:
        out, args = Path(cfg.out), run.stage.model.args
        tensors = join_grid(tensors, ctx.tp_size)
        metadata = {"init": cfg.init, "init_text": cfg.init_text if cfg.init == "text" else None,
                    "data": str(cfg.data), "template": cfg.template, "eos_target": run.end_target,
                    "steps": run.total_steps, "ckpt_dir": str(cfg.ckpt_dir),
                    "tokenizer": tokenizer.path, "losses": losses, "base_model": cfg.base_model}
        if cfg.method == "adapter":
            metadata.update(adapter_layers=cfg.adapter_layers)
        if cfg.method == "lora":  # A starts seeded, B at zero: --init does not apply
            metadata.update(lora=cfg.lora().describe(), init=None, init_text=None)
        save_tuning(out, cfg.method, tensors, args, metadata)
        export_peft(out / PEFT_FOLDER, cfg.method, tensors, args, metadata)
        ctx.log(f"saved the {cfg.method} tensors to {out}/tuning.pt (+ tuning.json, PEFT layout "
                f"in {out}/peft)")
    return losses

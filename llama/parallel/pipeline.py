"""Pipeline parallelism by hand: one rank per stage, activations forward, their gradients back.

A Stage is one rank's model plus its neighbours (with tensor parallelism, the same TP rank of the
stages before and after it: llama/parallel/distributed.py). `train_step` runs a GPipe or 1F1B schedule of
micro-batches through it (generation runs on it in llama/serving/engine.py); with one stage (one
process) the same code is plain gradient accumulation, which is why the pipeline's gradient can
be checked against it exactly.
"""
import contextlib

import torch

from llama.errors import BadInput
from llama.parallel.loss import loss_sum
from llama.parallel.tensor_parallel import sum_partial_grads
from llama.tuning.methods import Tuning, apply_prompt

SCHEDULES = ("gpipe", "1f1b")


def schedule_actions(schedule: str, stage: int, n_stages: int, n_micro: int):
    """The order of ("F", i) forwards and ("B", i) backwards that `stage` runs in one step.

    GPipe: every forward, then every backward. 1F1B: stage s first runs p-s-1 forwards (filling
    the pipe), then alternates one forward and one backward, then drains the backwards; so at
    most p micro-batches are ever in flight on stage 0 instead of m.
    """
    if schedule == "gpipe":
        return [("F", i) for i in range(n_micro)] + [("B", i) for i in range(n_micro)]
    if schedule != "1f1b":
        raise BadInput(f"--schedule {schedule!r} must be one of {', '.join(SCHEDULES)}")
    warmup = min(n_stages - stage - 1, n_micro)
    actions = [("F", i) for i in range(warmup)]
    for i in range(n_micro - warmup):
        actions += [("F", warmup + i), ("B", i)]
    return actions + [("B", i) for i in range(n_micro - warmup, n_micro)]


class Stage:
    """One rank's part of the pipeline: its layers, what its tuning method trains, the transport.

    soft_prompt + n_virtual is the prompt method's short form; `tuning` (llama/tuning/methods.py) any
    method's. loss_fn(model, h, targets) -> the loss summed over the positions that have a target
    (-100 marks the others), on the last stage's hidden states after the virtual tokens; the
    Stage divides it by the global batch's target count. Cross-entropy (loss_sum) by default:
    another loss is this one argument, not an edit of the schedule.
    """

    def __init__(self, model, ctx, soft_prompt=None, n_virtual: int = 0, tracer=None,
                 tuning: Tuning = None, cuda_graph: bool = False, loss_fn=loss_sum):
        self.model, self.ctx = model, ctx
        self.loss_fn = loss_fn
        self.tuning = tuning if tuning is not None else apply_prompt(soft_prompt, n_virtual)
        self.n_virtual = self.tuning.n_virtual  # every stage must know it: positions before text
        self.dtype = next(model.parameters()).dtype
        self.device = ctx.device
        self.tracer = tracer
        self.step = 0  # the training step, for the trace
        self.in_flight = {}  # micro-batch -> what its backward needs
        # cuda_graph: the generation engine replays its decode steps as CUDA graphs on a GPU
        # (run uncaptured on a CPU); prefill stays eager.
        self.cuda_graph = cuda_graph

    @property
    def is_first(self):
        return self.ctx.is_first

    @property
    def is_last(self):
        return self.ctx.is_last

    @property
    def max_seq_len(self):
        return self.model.args.max_seq_len

    def span(self, name, category, **args):
        if self.tracer is None:
            return contextlib.nullcontext()
        return self.tracer.span(name, category, step=self.step, **args)

    def hidden_virtual(self, with_prompt: bool) -> int:
        """Positions the method adds before the text in the hidden states (the prompt's)."""
        return self.tuning.hidden_virtual if with_prompt else 0

    def text_start(self, with_prompt: bool) -> int:
        """The first rotary position of what the stage's layers run (after a prefix's keys)."""
        return self.n_virtual - self.tuning.hidden_virtual if with_prompt else 0

    def run_layers(self, h, with_prompt: bool, start_pos: int = 0):
        if with_prompt:
            return self.model.run_layers(h, start_pos + self.text_start(True))
        with self.tuning.off():
            return self.model.run_layers(h, start_pos)

    def hidden_in(self, tokens, with_prompt: bool):
        """First stage: embed tokens (B, T) and let the method prepend (the prompt); others:
        receive h."""
        B, T = tokens.shape
        if self.is_first:
            h = self.model.embed(tokens.to(self.device))
            return self.tuning.prepend(h) if with_prompt else h
        length = T + self.hidden_virtual(with_prompt)
        with self.span("recv h", "recv_wait"):
            return self.ctx.recv((B, length, self.model.args.dim), self.dtype, self.ctx.prev_rank)

    def hidden_out(self, h):
        """Pass h on to the next stage (all but the last); the last stage keeps it."""
        if not self.is_last:
            self.ctx.send(h, self.ctx.next_rank)

    # ---- training ----

    def forward_micro_batch(self, i: int, batch, loss_weight: float):
        with self.span(f"F{i}", "forward", micro_batch=i):
            h_in = self.hidden_in(batch.tokens, with_prompt=True)
            if not h_in.requires_grad:
                # The received activation is a leaf here; asking for its gradient is what makes
                # backward produce dL/dh to send upstream (the weights themselves are frozen).
                # On the first stage, without a prompt, it gives backward a path through a
                # recomputed block to the layers' own trainable tensors.
                h_in.requires_grad_(True)
            h_out = self.run_layers(h_in, with_prompt=True)
            if self.is_last:
                summed = self.loss_fn(self.model, h_out[:, self.hidden_virtual(True):], batch.targets)
                self.in_flight[i] = (h_in, summed * loss_weight)
                return summed.detach()
            self.hidden_out(h_out)
            self.in_flight[i] = (h_in, h_out)

    def backward_micro_batch(self, i: int):
        with self.span(f"B{i}", "backward", micro_batch=i):
            h_in, out = self.in_flight.pop(i)
            if self.is_last:
                out.backward()
            else:
                with self.span("recv dL/dh", "recv_wait"):
                    grad = self.ctx.recv(out.shape, self.dtype, self.ctx.next_rank)
                out.backward(grad)
            if not self.is_first:
                self.ctx.send(h_in.grad, self.ctx.prev_rank)

    def train_step(self, micro_batches, schedule: str, loss_scale: float = 1.0):
        """Forward and backward every micro-batch; returns the summed loss (last stage) or None.

        The loss is the token-weighted mean over the whole global batch: each micro-batch's
        summed cross-entropy is divided by the global number of target tokens, which every rank
        knows because every rank builds the same batches.
        """
        n_targets = sum(int(b.n_targets) for b in micro_batches)
        weight = loss_scale / max(n_targets, 1)
        total = torch.zeros((), dtype=torch.float64, device=self.device)  # read once, at the end
        for kind, i in schedule_actions(schedule, self.ctx.stage, self.ctx.n_stages,
                                         len(micro_batches)):
            if kind == "F":
                summed = self.forward_micro_batch(i, micro_batches[i], weight)
                if summed is not None:
                    total += summed.double()
            else:
                self.backward_micro_batch(i)
        self.ctx.flush_sends()
        sum_partial_grads(self.ctx, self.tuning.trainable)
        return (float(total), n_targets) if self.is_last else (None, n_targets)

    @torch.no_grad()
    def eval_loss(self, micro_batches, with_prompt: bool = True):
        """(summed loss, target tokens) over the batches, forward only; loss only on the last stage.

        with_prompt=False measures the frozen model alone, the baseline a prompt must beat.
        """
        total, n_targets = 0.0, 0
        skip = self.hidden_virtual(with_prompt)
        for i, batch in enumerate(micro_batches):
            with self.span(f"E{i}", "eval", micro_batch=i):
                h = self.run_layers(self.hidden_in(batch.tokens, with_prompt), with_prompt)
                if self.is_last:
                    total += float(self.loss_fn(self.model, h[:, skip:], batch.targets))
                self.hidden_out(h)
            n_targets += int(batch.n_targets)
        self.ctx.flush_sends()
        return (total if self.is_last else None), n_targets

    def mean_loss(self, micro_batches, with_prompt: bool = True) -> float:
        """The loss per target token over the batches, the same number on every rank."""
        total, n_targets = self.eval_loss(micro_batches, with_prompt)
        return self.ctx.all_reduce_max([total or 0.0])[0] / max(n_targets, 1)

    # ---- a cache for one forward (the generation engine keeps its own) ----

    def start_generation(self, batch_size: int, length: int):
        """A KV cache for this stage's layers: batch_size rows of length positions."""
        self.model.setup_kv_cache(batch_size, length)

    def end_generation(self):
        self.model.clear_kv_cache()

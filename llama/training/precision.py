"""fp16 training of a few fp32 tensors: the loss scale, the overflow check, unscale, clip, step.

The last stage multiplies the loss by `scale` so small activation gradients survive fp16; the
stages that own trainable tensors find inf/NaN in their gradients; that one flag is shared with
every rank (the training loop's all-reduce), and every rank applies the same update, so all
stages always hold the same scale and skip the same steps. The whole idea reads in this file:

    loss, n = stage.train_step(batches, schedule, scaler.scale)   # backward of scale * loss
    found_inf, stop, loss, peaks, grad_norm = agree(ctx, optimizer, scaler.scale, loss, ...)
    #   (unscale this stage's gradients, then the step's one all-reduce: an overflow anywhere,
    #    every stage's squared norm in its own slot -> the GLOBAL norm)
    skipped, grad_norm = finish_step(scaler, optimizer, found_inf, lr_at(step, ...),
                                     max_grad_norm, grad_norm)    # skip, or clip + AdamW
"""
import math

import torch
from torch import nn



class LossScaler:
    def __init__(self, enabled: bool, init_scale: float = 2.0 ** 16, growth_interval: int = 1000,
                 backoff: float = 0.5, growth: float = 2.0, min_scale: float = 1.0):
        self.enabled = enabled
        self.scale = init_scale if enabled else 1.0
        self.growth_interval, self.backoff, self.growth = growth_interval, backoff, growth
        self.min_scale = min_scale
        self.good_steps = 0

    @staticmethod
    def has_overflow(grad) -> bool:
        return grad is not None and not bool(torch.isfinite(grad).all())

    def update(self, found_inf: bool) -> bool:
        """Move the scale after a step; True means the step must be skipped."""
        if not self.enabled:
            return found_inf
        if found_inf:
            self.scale = max(self.scale * self.backoff, self.min_scale)
            self.good_steps = 0
            return True
        self.good_steps += 1
        if self.good_steps % self.growth_interval == 0:
            self.scale *= self.growth
        return False

    def state_dict(self):
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state):
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])


class ScaledAdamW:
    """AdamW for a stage's trainable tensors, whose gradients arrive multiplied by the loss scale.

    `params`: one tensor, or {global key: tensor}. The update runs on fp32 master copies on
    `master_device` (the tensors' own device, or the CPU with optimizer offload:
    offload.optimizer_device decides), which also hold AdamW's moments; only the new values are
    copied back into the tensors after each step. One path for both places, and the copy costs
    one tensor of the size of what trains.

    A step has two halves around the step's all-reduce: `unscale` (this stage's squared gradient
    norm, which the all-reduce turns into the global norm) and `step` (clip by the global norm,
    update).
    """

    def __init__(self, params, lr: float, weight_decay: float, betas, master_device,
                 norm_keys=None):
        self.params = params if isinstance(params, dict) else {"prompt": params}
        # the keys whose squares this rank adds to the global norm (None: all): a tensor whole
        # on every TP rank of a stage is counted by one of them only
        self.norm_keys = set(self.params if norm_keys is None else norm_keys)
        self.masters = {key: nn.Parameter(p.detach().to(master_device, torch.float32, copy=True))
                        for key, p in self.params.items()}
        self.optimizer = torch.optim.AdamW(list(self.masters.values()), lr=lr,
                                           weight_decay=weight_decay, betas=tuple(betas))

    @property
    def param(self):
        """The one tensor of a single-tensor optimizer (the prompt)."""
        (param,) = self.params.values()
        return param

    @property
    def master(self):
        (master,) = self.masters.values()
        return master

    def found_overflow(self) -> bool:
        return any(LossScaler.has_overflow(p.grad) for p in self.params.values())

    def zero_grad(self):
        for p in list(self.params.values()) + list(self.masters.values()):
            p.grad = None

    def unscale(self, loss_scale: float) -> float:
        """Move the gradients, divided by loss_scale, to the masters; this stage's squared norm.

        The sum of the tensors' squared norms, each the float32 norm torch computes, squared in
        float64: for one tensor the global norm sqrt(sum) is that float32 norm exactly."""
        squared = 0.0
        for key, p in self.params.items():
            grad = (p.grad.detach().to(self.masters[key].device, torch.float32) / loss_scale
                    if p.grad is not None else torch.zeros_like(self.masters[key]))
            self.masters[key].grad = grad
            squared += float(grad.norm()) ** 2 if key in self.norm_keys else 0.0
            p.grad = None
        return squared

    def step(self, lr: float, grad_norm: float, max_grad_norm: float):
        """Clip by the global gradient norm (of every stage's tensors) and apply the update."""
        for master in self.masters.values():
            if max_grad_norm and grad_norm > max_grad_norm:
                master.grad *= max_grad_norm / (grad_norm + 1e-6)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        with torch.no_grad():
            for key, p in self.params.items():
                p.copy_(self.masters[key], non_blocking=True)
        self.zero_grad()

    def state_dict(self):
        """By global key, so the state loads onto whatever stage holds the key."""
        state = self.optimizer.state
        return {key: {"master": m.detach().cpu().clone(),
                      **{name: v.detach().cpu().clone() for name, v in state.get(m, {}).items()}}
                for key, m in self.masters.items()}

    def load_state_dict(self, state):
        with torch.no_grad():
            for key, master in self.masters.items():
                saved = state[key]
                master.copy_(saved["master"])
                self.params[key].copy_(master)
                moments = {name: v.to(master.device) if name != "step" else v.clone()
                           for name, v in saved.items() if name != "master"}
                if moments:
                    self.optimizer.state[master] = moments


def finish_step(scaler: LossScaler, optimizer, found_inf: bool, lr: float,
                max_grad_norm: float, grad_norm: float):
    """(skipped, gradient norm): after an overflow anywhere the step is skipped on every stage
    and the scale backs off; otherwise the stage's optimizer (None on stages that train
    nothing) clips by the global norm (every stage's, from the step's all-reduce) and steps."""
    skipped = scaler.update(found_inf)
    if skipped:
        if optimizer is not None:
            optimizer.zero_grad()
        return True, math.nan
    if optimizer is not None:
        optimizer.step(lr, grad_norm, max_grad_norm)
    return False, grad_norm


def agree(ctx, optimizer, loss_scale: float, loss, stop_requested: bool, peak_memory: float):
    """The step's one all-reduce, after which every rank takes the same decisions: (an overflow
    on any stage, a stop asked on any rank, the loss (the last stage's), every rank's peak
    memory, the global gradient norm (each stage's squared norm in its own slot)). Before it,
    this stage's gradients are unscaled onto the optimizer's masters."""
    overflow, squared = unscale(optimizer, loss_scale)
    found_inf, stop_now, loss, *slots = ctx.all_reduce_max(
        [overflow, stop_requested, loss or 0.0, *rank_slot(ctx, peak_memory),
         *rank_slot(ctx, squared)])
    peaks, squares = slots[:ctx.world_size], slots[ctx.world_size:]
    return bool(found_inf), bool(stop_now), loss, peaks, math.sqrt(sum(squares))


def unscale(optimizer, loss_scale: float):
    """(overflow, squared gradient norm) of this stage; its gradients unscaled for the step."""
    if optimizer is None:
        return False, 0.0
    overflow = optimizer.found_overflow()
    squared = optimizer.unscale(loss_scale)
    return overflow, squared if math.isfinite(squared) else 0.0


def rank_slot(ctx, value: float):
    """One slot per rank holding value in this rank's: after the max-reduce, every rank's."""
    slots = [0.0] * ctx.world_size
    slots[ctx.rank] = value
    return slots


def lr_at(step: int, total: int, base: float, warmup: int, schedule: str, min_ratio: float = 0.1):
    """Linear warmup to `base`, then cosine or linear decay (to min_ratio * base) or constant."""
    if step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return base
    progress = (step - warmup) / max(total - warmup, 1)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return base * (min_ratio + (1 - min_ratio) * shape)

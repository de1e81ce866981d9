"""fp16 training of a few fp32 tensors: the loss scale, the overflow check, unscale, clip, step.

The last stage multiplies the loss by `scale` so small activation gradients survive fp16; the
stage that owns the trainable tensor finds inf/NaN in its gradient; that one flag is shared with
every rank (the training loop's all-reduce), and every rank applies the same update, so all
stages always hold the same scale and skip the same steps. The whole idea reads in this file:

    loss, n = stage.train_step(batches, schedule, scaler.scale)   # backward of scale * loss
    found_inf = all_reduce_max(optimizer.found_overflow())
    skipped, grad_norm = finish_step(scaler, optimizer, found_inf, lr, max_grad_norm)
"""
import math

import torch
from torch import nn

from llama.errors import BadInput

# The one table of dtype names every command accepts (--dtype); "auto" is each command's own.
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def dtype_named(name: str) -> torch.dtype:
    """torch.float16 for "float16" or "fp16", ...; anything else is refused with the choices."""
    if name not in DTYPES:
        raise BadInput(f"--dtype {name!r} must be one of auto, float32, float16, bfloat16 "
                       "(or fp32, fp16, bf16)")
    return DTYPES[name]


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
    """AdamW for one trainable tensor whose gradient arrives multiplied by the loss scale.

    The update runs on an fp32 master copy on `master_device` (the tensor's own device, or the
    CPU with optimizer offload: offload.optimizer_device decides), which also holds AdamW's
    moments; only the new value is copied back into the tensor after each step. One path for
    both places, and the copy costs one tensor of the size of what trains.
    """

    def __init__(self, param, lr: float, weight_decay: float, betas, master_device):
        self.param = param
        self.master = nn.Parameter(param.detach().to(master_device, torch.float32, copy=True))
        self.optimizer = torch.optim.AdamW([self.master], lr=lr, weight_decay=weight_decay,
                                           betas=tuple(betas))

    def found_overflow(self) -> bool:
        return LossScaler.has_overflow(self.param.grad)

    def zero_grad(self):
        self.param.grad = None

    def step(self, lr: float, loss_scale: float, max_grad_norm: float) -> float:
        """Unscale, clip and apply the gradient; returns the unclipped gradient norm."""
        grad = self.param.grad.detach().to(self.master.device, torch.float32) / loss_scale
        norm = float(grad.norm())
        if max_grad_norm and norm > max_grad_norm:
            grad *= max_grad_norm / (norm + 1e-6)
        self.master.grad = grad
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.master.grad = None
        with torch.no_grad():
            self.param.copy_(self.master, non_blocking=True)
        self.zero_grad()
        return norm

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict(), "master": self.master.detach().cpu().clone()}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])
        with torch.no_grad():
            self.master.copy_(state["master"])
            self.param.copy_(self.master)


def finish_step(scaler: LossScaler, optimizer, found_inf: bool, lr: float,
                max_grad_norm: float):
    """(skipped, gradient norm): after an overflow anywhere the step is skipped on every stage
    and the scale backs off; otherwise the stage's optimizer (None on stages that train
    nothing) unscales, clips and steps with the scale the step's loss was multiplied by."""
    loss_scale = scaler.scale
    skipped = scaler.update(found_inf)
    if optimizer is None:
        return skipped, math.nan
    if skipped:
        optimizer.zero_grad()
        return True, math.nan
    return False, optimizer.step(lr, loss_scale, max_grad_norm)

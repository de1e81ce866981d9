"""Dynamic loss scaling for fp16, kept in step across pipeline stages.

The last stage multiplies the loss by `scale` so small activation gradients survive fp16; stage
0 finds inf/NaN in the (fp32) prompt gradient; that one flag is shared with every rank, and every
rank applies the same update, so all stages always hold the same scale.
"""
import torch


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

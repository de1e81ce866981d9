"""What every tuning method gives the pipeline: a Tuning (its trainable tensors by global key,
and the hooks by which it changes a stage's forward); `off()` runs the plain model.

The methods themselves are in llama/tuning/methods.py (prompt, prefix, adapter) and
llama/tuning/lora.py (LoRA).
"""
import contextlib


class Tuning:
    """What a stage trains and how that changes its forward; `off()` runs the plain model."""
    method = ""
    hidden_virtual = 0  # positions the method adds to the hidden states sent between stages

    def __init__(self, n_virtual: int, trainable: dict):
        self.n_virtual = n_virtual  # positions before the text (rotary and KV cache count them)
        self.trainable = trainable  # global key -> nn.Parameter (float32), this stage's only
        self.active = True

    def prepend(self, h):
        """First stage: the token embeddings (B, T, dim) as the first layer sees them."""
        return h

    def fill_cache(self, model):
        """Before a prefill: whatever the method keeps in the first cache positions."""

    @contextlib.contextmanager
    def off(self):
        before, self.active = self.active, False
        try:
            yield
        finally:
            self.active = before

"""What every tuning method gives the pipeline: a Tuning (its trainable tensors by global key,
and the hooks by which it changes a stage's forward); `off()` runs the plain model.

The methods themselves are in llama/tuning/methods.py (prompt, prefix, adapter) and
llama/tuning/lora.py (LoRA).
"""
import contextlib

import torch


class Tuning:
    """What a stage trains and how that changes its forward; `off()` runs the plain model."""
    method = ""
    hidden_virtual = 0  # positions the method adds to the hidden states sent between stages
    # True for a method that changes every forward (adapter, LoRA), not only what a prefill
    # leaves in the KV cache (prompt, prefix): the generation engine then gates it per row.
    in_every_step = False

    def __init__(self, n_virtual: int, trainable: dict):
        self.n_virtual = n_virtual  # positions before the text (rotary and KV cache count them)
        self.trainable = trainable  # global key -> nn.Parameter (float32), this stage's only
        self.active = True
        # (B,) 1.0 for the rows of a batch that use this tuning, 0.0 for the others (the
        # generation engine mixes rows of several tunings); None: every row uses it.
        self.row_gate = None

    def prepend(self, h):
        """First stage: the token embeddings (B, T, dim) as the first layer sees them."""
        return h

    def fill_cache(self, model):
        """Before a prefill: whatever the method keeps in the first cache positions."""

    def gated(self, added):
        """What the method adds to an output (B, T, width), kept only on its own rows. x 1.0
        is exact, so a row computes what it would alone. An output that is no row's (an
        adapter projecting its own prompt, (L, width)) gets nothing while rows are gated: no
        row of an adapter uses this method too."""
        if self.row_gate is None:
            return added
        if added.dim() != 3:
            return torch.zeros_like(added)
        return added * self.row_gate[:, None, None].to(added.dtype)

    @contextlib.contextmanager
    def off(self):
        before, self.active = self.active, False
        try:
            yield
        finally:
            self.active = before

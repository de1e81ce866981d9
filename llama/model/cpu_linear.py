"""Frozen float linears on a CPU through oneDNN's matrix products instead of torch's default.

    apply_cpu_linears(model)                # training too: the same weights, oneDNN's products
    apply_cpu_linears(model, packed=True)   # generation: weights in oneDNN's blocked layout

On the CPU measured here torch's default float product (F.linear, through MKL) ran a 1536 x 512
layer's forward and input gradient at 81 GFLOP/s (256 rows, one core) and read one row's weights
at 14-22 GB/s; oneDNN's (torch.ops.mkldnn._linear_pointwise, the op torch's own compiler uses on
a CPU) ran 1.7-1.9x faster on the plain weights, and 1.4-2.9x faster at 1 and 16 rows on weights
reordered into its blocked layout (docs/PERFORMANCE.md, bench/linear_bench.py). A transform like
the others: each frozen float nn.Linear becomes a CpuLinear with the same parameters (the same
state dict), whose forward and input gradient run oneDNN's product (the same numbers to float
rounding). packed=True is for generation only: the blocked weight replaces the plain one (no
second copy, no backward, no state dict of it). A private op: where it refuses, a layer goes
back to F.linear for good.
"""
import torch
import torch.nn.functional as F
from torch import nn

# The dtypes it runs here (float32 timed, bfloat16 not yet); others keep F.linear.
DTYPES = (torch.float32, torch.bfloat16)
# oneDNN costs ~20 us more per call than F.linear here: a 256 x 256 layer ran slower through it
# at 1 and 16 rows, a 1536 x 512 one faster at 1, 16 and 512 (bench/linear_bench.py). Smaller
# layers than this many weights keep F.linear.
MIN_WEIGHTS = 512 * 512


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and \
        hasattr(torch.ops.mkldnn, "_linear_pointwise") and \
        hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def onednn_linear(x, weight, bias=None):
    """x @ weight.T (+ bias) by oneDNN; weight plain (out, in), a transposed view, or packed."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _FrozenOneDnnLinear(torch.autograd.Function):
    """x @ W.T + b for a frozen W: forward and the input gradient (grad @ W) both by oneDNN."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)  # a parameter: saving it keeps no new memory
        return onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        return onednn_linear(grad_output, weight.t()), None, None


class CpuLinear(nn.Linear):
    """An nn.Linear (same parameters, same state dict) whose frozen product runs on oneDNN on a
    CPU; a trainable weight, another device or dtype keep F.linear."""

    use_onednn = True  # False for good once oneDNN refused this layer

    def forward(self, x):
        packed = getattr(self, "packed_weight", None)  # a buffer once pack() ran
        if packed is not None:
            return onednn_linear(x, packed, self.bias)
        weight = self.weight
        if weight.requires_grad or x.device.type != "cpu" or weight.dtype not in DTYPES or \
                x.dtype != weight.dtype or not self.use_onednn:
            return F.linear(x, weight, self.bias)
        try:
            if torch.is_grad_enabled() and x.requires_grad:
                return _FrozenOneDnnLinear.apply(x, weight, self.bias)
            return onednn_linear(x, weight, self.bias)
        except (RuntimeError, NotImplementedError):
            self.use_onednn = False  # a private op: its dtypes and shapes vary by build
            return F.linear(x, weight, self.bias)

    def pack(self) -> bool:
        """Replace the weight by oneDNN's blocked copy of it (generation: no backward, nothing
        to save); whether it was done."""
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)
        except (RuntimeError, NotImplementedError):
            return False
        self.register_buffer("packed_weight", packed, persistent=False)
        del self.weight
        self.weight = None
        return True


def apply_cpu_linears(model, packed: bool = False, min_weights: int = MIN_WEIGHTS) -> int:
    """Turn every frozen float nn.Linear of a CPU stage with at least min_weights weights into a
    CpuLinear, in place (packed: for generation, their weights in oneDNN's blocked layout,
    except a head that is the embedding table too). Trainable linears (a LoRA's A and B) stay as
    they are. Returns how many."""
    if not onednn_available():
        return 0
    embeddings = getattr(model, "tok_embeddings", None)
    table = embeddings.weight.data_ptr() if embeddings is not None else None  # tied: one storage
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or child.weight.requires_grad or \
                    child.weight.device.type != "cpu" or child.weight.dtype not in DTYPES or \
                    child.weight.numel() < min_weights:
                continue
            child.__class__ = CpuLinear  # the same module, its parameters and hooks kept
            if packed and child.weight.data_ptr() != table:
                child.pack()
            count += 1
    return count

"""Memory savers, each a switch that wraps the plain model or optimizer (off means untouched).

- recompute (+ activation offload): a block keeps only its input during the forward pass and
  recomputes its insides in the backward pass; with offload that input waits in pinned CPU memory.
- selective recompute: a block keeps its matrix products' outputs (and attention's) and
  recomputes only the cheap elementwise work (RMSNorm, rotary, SiLU x up) in the backward pass.
- optimizer offload: the prompt's fp32 master copy, its gradient and AdamW state live on the CPU
  and the step runs there (precision.ScaledAdamW does the step; this file only says where).
- weight streaming: a stage's blocks stay in pinned CPU memory and each is copied to the GPU just
  before it runs (the next one already on its way), for stages that do not fit at all.
"""
import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

OFFLOAD_CHOICES = ("optimizer", "activations", "weights")
RECOMPUTE_MODES = ("full", "selective")


def pinned_like(tensor):
    """An empty CPU tensor like `tensor`, pinned when a GPU exists (pinned copies can overlap)."""
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu",
                       pin_memory=torch.cuda.is_available())


class _RecomputeBlock(torch.autograd.Function):
    """Forward without saving anything but the block's input; rebuild the rest in backward."""

    @staticmethod
    def forward(ctx, h, turns, wrapper, start_pos, offload):
        ctx.wrapper, ctx.start_pos, ctx.turns = wrapper, start_pos, turns
        ctx.device = h.device
        # With offload the kept input is a copy in host memory and h itself can go. A run on the
        # CPU takes the same path (one copy, nothing saved), so what it tests is what a GPU runs.
        ctx.saved_input = pinned_like(h).copy_(h, non_blocking=True) if offload else h.detach()
        with torch.no_grad():
            return wrapper.run(h, turns, start_pos, backward=False)

    @staticmethod
    def backward(ctx, grad_out):
        # Same stream as the copy to the CPU, so the copy back is ordered after it.
        h = ctx.saved_input.to(ctx.device, non_blocking=True).detach().requires_grad_(True)
        with torch.enable_grad():
            out = ctx.wrapper.run(h, ctx.turns, ctx.start_pos, backward=True, keep=True)
        torch.autograd.backward(out, grad_out)
        ctx.wrapper.done_with_weights()
        del ctx.saved_input
        return h.grad, None, None, None, None


class RecomputedBlock(nn.Module):
    def __init__(self, block, offload: bool):
        super().__init__()
        self.block, self.offload = block, offload
        self.streamer = None  # a WeightStreamer, when the weights live on the CPU

    def run(self, h, turns, start_pos: int, backward: bool, keep: bool = False):
        """The block itself, its weights streamed in first (and out after, unless keep)."""
        if self.streamer is None:
            return self.block(h, turns, start_pos)
        self.streamer.bring_in(self.block, backward)
        out = self.block(h, turns, start_pos)
        if not keep:
            self.streamer.release(self.block)
        return out

    def done_with_weights(self):
        if self.streamer is not None:
            self.streamer.release(self.block)

    def forward(self, h, turns, start_pos: int):
        if not torch.is_grad_enabled():  # eval and generation save nothing anyway
            return self.run(h, turns, start_pos, backward=False)
        return _RecomputeBlock.apply(h, turns, self, start_pos, self.offload)


def _matrix_products():
    """The ops whose outputs selective recomputation keeps: what costs FLOPs to redo."""
    aten = torch.ops.aten
    names = ("mm", "bmm", "addmm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu")
    ops = {getattr(aten, name).default for name in names if hasattr(aten, name)}
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):  # llama/model/cpu_linear.py's product
        ops.add(torch.ops.mkldnn._linear_pointwise.default)
    return ops


def _keep_matrix_products(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _matrix_products() else CheckpointPolicy.PREFER_RECOMPUTE


class SelectiveRecomputedBlock(nn.Module):
    """A block under torch.utils.checkpoint with a policy: matrix-product and attention outputs
    are saved in the forward pass, everything elementwise between them is recomputed."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, h, turns, start_pos: int):
        if not torch.is_grad_enabled():
            return self.block(h, turns, start_pos)
        return checkpoint(self.block, h, turns, start_pos, use_reentrant=False,
                          context_fn=functools.partial(create_selective_checkpoint_contexts,
                                                       _keep_matrix_products))


def apply_recompute(model, offload_activations: bool = False, mode: str = "full"):
    """Wrap every block of the stage for recomputation (after loading its weights).

    mode full: per-layer (only the block's input is kept); selective: the matrix products'
    outputs are kept too, which costs memory but no second pass of GEMMs. Activation offload
    and weight streaming work on full recomputation only.
    """
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"recompute mode {mode!r} is not one of {RECOMPUTE_MODES}")
    if mode == "selective" and offload_activations:
        raise ValueError("selective recomputation keeps activations on the device: no offload")
    for name, block in list(model.layers.items()):
        model.layers[name] = SelectiveRecomputedBlock(block) if mode == "selective" \
            else RecomputedBlock(block, offload_activations)
    return model


def optimizer_device(param, offload: bool) -> torch.device:
    """Where the optimizer keeps its fp32 master copy and AdamW state: the CPU with offload
    (the step then runs there and only the new value travels back), else beside the tensor."""
    return torch.device("cpu") if offload else param.device


class WeightStreamer:
    """Keep a stage's block weights in pinned CPU memory; bring each block in just before it runs.

    Needs recompute (apply_recompute first): then a block's weights are only needed during its
    no-grad forward and, later, during its recompute + backward. The next block's copy runs on a
    side stream while the current one computes (forward order going forward, reverse order in
    backward). Frozen weights never need to go back, so dropping the GPU copy is free.
    """

    def __init__(self, model, device):
        self.device = device
        self.wrappers = list(model.layers.values())
        if not all(isinstance(w, RecomputedBlock) for w in self.wrappers):
            raise ValueError("weight streaming needs recompute: call apply_recompute first")
        self.cpu_weights = []
        for wrapper in self.wrappers:
            weights = {}
            for name, param in wrapper.block.named_parameters():
                weights[name] = pinned_like(param).copy_(param.detach())
                param.data = torch.empty(0, dtype=param.dtype, device=device)  # frees the GPU copy
            self.cpu_weights.append(weights)
            wrapper.streamer = self
        self.index_of = {id(w.block): i for i, w in enumerate(self.wrappers)}
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.in_transit = {}  # block index -> (event, {name: GPU tensor})

    def _start_copy(self, i: int):
        if i in self.in_transit or not 0 <= i < len(self.wrappers):
            return
        if self.copy_stream is None:
            self.in_transit[i] = (None, {n: w.to(self.device) for n, w in self.cpu_weights[i].items()})
            return
        with torch.cuda.stream(self.copy_stream):
            gpu = {n: w.to(self.device, non_blocking=True) for n, w in self.cpu_weights[i].items()}
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        self.in_transit[i] = (event, gpu)

    def bring_in(self, block, backward: bool):
        i = self.index_of[id(block)]
        self._start_copy(i)
        event, gpu = self.in_transit.pop(i)
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for tensor in gpu.values():
                tensor.record_stream(compute)  # made on the copy stream, read on this one
        for name, param in block.named_parameters():
            param.data = gpu[name]
        self._start_copy(i - 1 if backward else i + 1)

    def release(self, block):
        for param in block.parameters():
            param.data = torch.empty(0, dtype=param.dtype, device=self.device)


def apply_weight_streaming(model, device):
    """Keep the stage's block weights in pinned CPU memory and stream each in as it runs (after
    apply_recompute); returns the model, like the other transforms."""
    WeightStreamer(model, device)
    return model

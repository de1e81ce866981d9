"""Tensor parallelism inside a stage: the all-reduces that make TP shards compute the whole block.

    model = load_model(ckpt, stage, n_stages, tp_rank=ctx.tp_rank, tp_size=ctx.tp_size)
    apply_tensor_parallel(model, ctx)     # llama/prepare/stage.py does both

Each block's attention and feed-forward read a replicated input through column-parallel
projections and end in a row-parallel one whose output is this rank's partial sum
(llama/model/tensor_shards.py). One all-reduce over the stage's TP group completes each: two per
block in the forward pass, two more in the backward pass (the input gradients), as Megatron-LM
does it. The two autograd functions below carry them; everything else in the model is
replicated and computes the same on every TP rank.
"""
import torch

from llama.tuning.sharding import grad_is_partial


class _SumOutput(torch.autograd.Function):
    """Forward: the sum of every TP rank's partial output (the row-parallel projection's).
    Backward: identity, since every rank's partial output adds to the sum with weight 1, the
    gradient of each is the gradient of the sum, which every rank already has whole."""

    @staticmethod
    def forward(ctx, partial, dist_ctx):
        return dist_ctx.tp_all_reduce(partial.clone())

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SumInputGrad(torch.autograd.Function):
    """Forward: identity (the input is replicated). Backward: the sum over the TP ranks of the
    input's gradient, because each rank's column-parallel projections see only their own heads
    or FFN rows and so give only their share of it."""

    @staticmethod
    def forward(ctx, x, dist_ctx):
        ctx.dist_ctx = dist_ctx
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.dist_ctx.tp_all_reduce(grad.clone()), None


def apply_tensor_parallel(model, ctx):
    """Hook the all-reduces onto every block of a stage already cut to ctx's TP shard; with one
    TP rank, nothing. A method attached later adds its own hooks: an adapter's output joins the
    attention's before the sum (it registers first), a LoRA's joins its projection's."""
    if ctx.tp_size == 1:
        return model
    if model.tp_shard != (ctx.tp_rank, ctx.tp_size):
        raise ValueError(f"the stage holds TP shard {model.tp_shard}, this rank is "
                         f"{(ctx.tp_rank, ctx.tp_size)}")
    for block in model.layers.values():
        block = getattr(block, "block", block)  # under apply_recompute's wrapper
        for part in (block.attention, block.feed_forward):
            part.register_forward_pre_hook(
                lambda module, args: (_SumInputGrad.apply(args[0], ctx), *args[1:]))
            part.register_forward_hook(
                lambda module, args, output: _SumOutput.apply(output, ctx))
    return model


def sum_partial_grads(ctx, trainable: dict):
    """After a backward: the gradients of replicated tensors that reach only this rank's heads
    (llama/tuning/sharding.py), summed over the TP ranks in one all-reduce, so every rank holds
    the whole (and the same) gradient."""
    keys = [key for key in trainable if grad_is_partial(key)]
    if ctx.tp_size == 1 or not keys:
        return
    grads = [trainable[key].grad if trainable[key].grad is not None
             else torch.zeros_like(trainable[key]) for key in keys]
    summed = ctx.tp_all_reduce(torch.cat([g.reshape(-1) for g in grads]))
    for key, piece in zip(keys, summed.split([g.numel() for g in grads])):
        trainable[key].grad = piece.view_as(trainable[key]).clone()

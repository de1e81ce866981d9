"""The default loss of the last stage: the output head's cross-entropy over the positions that
have a target, with its memory-for-speed trade as a choice.

    loss_sum(model, h, targets)                      # logits recomputed in backward (least memory)
    loss_sum(model, h, targets, keep_logits=True)    # logits kept: no second pass of the head

Only the target positions go through the head, a chunk of rows at a time. Each chunk's
gradient is written into its own logits in place (softmax minus the target's one-hot), so
backward makes no second vocabulary-wide tensor. With keep_logits the chunks' logits stay from
forward to backward (targets x vocab x dtype bytes); without, each chunk's are recomputed in
backward, so one chunk's are the most held at once, at the price of a second head forward.
llama/training/memory.py picks between the two from the memory a run has.
"""
import torch
from torch.utils.checkpoint import checkpoint

LOSS_LOGITS = ("auto", "keep", "recompute")  # the --loss_logits choices (auto: by memory)
LOSS_CHUNK_TOKENS = 1024  # target positions whose logits one chunk makes at once


class _CrossEntropySum(torch.autograd.Function):
    """sum over rows of logsumexp(logits) - logits[target], in float32. Saves the logits
    themselves and turns them into their gradient in backward, in place: backward runs once
    (a graph kept with retain_graph cannot be run backward again)."""

    @staticmethod
    def forward(ctx, logits, targets):
        x = logits.float()  # the same tensor in float32; a float32 copy in float16/bfloat16
        log_norm = torch.logsumexp(x, dim=-1)
        picked = x.gather(1, targets[:, None]).squeeze(1)
        ctx.save_for_backward(logits, targets, log_norm)
        ctx.spent = False
        return (log_norm - picked).sum()

    @staticmethod
    def backward(ctx, grad_sum):
        if ctx.spent:
            raise RuntimeError("the cross-entropy's backward ran twice: it writes its gradient "
                               "into the saved logits, so it cannot run again")
        ctx.spent = True
        logits, targets, log_norm = ctx.saved_tensors
        rows = torch.arange(len(targets), device=logits.device)
        if logits.dtype == torch.float32:
            grad = logits.sub_(log_norm[:, None]).exp_()  # softmax, in place
            grad[rows, targets] -= 1
            return grad.mul_(grad_sum), None
        probs = logits.float().sub_(log_norm[:, None]).exp_()  # float32 for the small ones
        probs[rows, targets] -= 1
        return logits.copy_(probs.mul_(grad_sum)), None


def _chunk_loss(stage_model, h_chunk, targets_chunk):
    return _CrossEntropySum.apply(stage_model.logits(h_chunk), targets_chunk)


def loss_sum(stage_model, h, targets, keep_logits: bool = False):
    """Summed cross-entropy over the positions that have a target (-100 marks the others).

    targets stays on the CPU, so finding those positions never waits for the GPU. Only they go
    through the output head, LOSS_CHUNK_TOKENS at a time. keep_logits: in training, keep every
    chunk's logits for backward (faster); else recompute each in backward (a chunk's logits
    are the most held at once). Without autograd both run the same chunks and keep nothing.
    """
    flat_targets = targets.reshape(-1)
    positions = (flat_targets != -100).nonzero().squeeze(1)
    picked = h.reshape(-1, h.shape[-1]).index_select(0, positions.to(h.device))  # (N, dim)
    picked_targets = flat_targets[positions].to(h.device)
    rows = LOSS_CHUNK_TOKENS
    recompute = torch.is_grad_enabled() and not keep_logits
    total = h.new_zeros((), dtype=torch.float32)
    for h_chunk, t_chunk in zip(picked.split(rows), picked_targets.split(rows)):
        if recompute:
            total = total + checkpoint(_chunk_loss, stage_model, h_chunk, t_chunk,
                                       use_reentrant=False)
        else:
            total = total + _chunk_loss(stage_model, h_chunk, t_chunk)
    return total

"""Worker: the soft-prompt gradient of one global batch through however many stages are running.

Run as one process or as a group of ranks (tests/launch.py); rank 0 saves the prompt gradient
and the summed loss to --out. Batches are random token ids with random padding and target masks.
"""
import sys

import fire
import torch

from llama.checkpoint import load_model
from llama.distributed import init_distributed
from llama.pipeline import Stage
from llama.prompt import SoftPrompt, init_prompt_weight


class Batch:
    def __init__(self, tokens, targets):
        self.tokens, self.targets = tokens, targets
        self.n_targets = int((targets != -100).sum())


def make_micro_batches(vocab_size, n_micro, micro_batch_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(n_micro):
        length = 6 + i % 3  # micro-batches of different lengths
        tokens = torch.randint(3, vocab_size, (micro_batch_size, length), generator=g)
        targets = torch.randint(3, vocab_size, (micro_batch_size, length), generator=g)
        targets[torch.rand(targets.shape, generator=g) < 0.4] = -100  # response-only mask
        targets[0, length - 2:] = -100  # right padding
        batches.append(Batch(tokens, targets))
    return batches


def main(ckpt, out, schedule="1f1b", n_micro=4, micro_batch_size=2, n_virtual=4):
    ctx = init_distributed(device="cpu", timeout_s=60)
    model = load_model(ckpt, ctx.rank, ctx.world_size)
    prompt = None
    if ctx.is_first:
        weight = init_prompt_weight("random", n_virtual, model.tok_embeddings.weight, seed=1)
        prompt = SoftPrompt(weight)
    stage = Stage(model, ctx, prompt, n_virtual)
    batches = make_micro_batches(model.args.vocab_size, n_micro, micro_batch_size)
    loss, n_targets = stage.train_step(batches, schedule)
    losses = ctx.gather_objects(loss)
    if ctx.is_first:
        torch.save({"grad": prompt.weight.grad, "loss": losses[-1], "n_targets": n_targets}, out)
    ctx.close()


if __name__ == "__main__":
    fire.Fire(main)

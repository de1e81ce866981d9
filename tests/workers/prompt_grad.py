"""Worker: the soft-prompt gradient of one global batch through however many stages are running.

Run as one process or as a group of ranks (tests/launch.py); rank 0 saves, per schedule, the
prompt gradient and the summed loss to --out. Batches are random token ids with random padding
and target masks, or, with --examples, real tokenised examples ([[ids, first_target], ...] as
JSON) cut into micro-batches of --micro_batch_size, each padded to its own longest example.
"""
import json

from llama.cli import run_cli
import torch

from llama.formats.checkpoint import load_model
from llama.training.data import make_micro_batch
from llama.parallel.distributed import init_distributed
from llama.parallel.pipeline import Stage
from llama.tuning.prompt import SoftPrompt, init_prompt_weight


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


def micro_batches_of(examples, micro_batch_size, pad_id):
    return [make_micro_batch(examples[i:i + micro_batch_size], pad_id)
            for i in range(0, len(examples), micro_batch_size)]


def main(ckpt, out, schedules="1f1b", n_micro=4, micro_batch_size=2, n_virtual=4,
         examples=None, pad_id=0):
    ctx = init_distributed(device="cpu", timeout_s=60)
    model = load_model(ckpt, ctx.rank, ctx.world_size)
    prompt = None
    if ctx.is_first:
        weight = init_prompt_weight("random", n_virtual, model.tok_embeddings.weight, seed=1)
        prompt = SoftPrompt(weight)
    stage = Stage(model, ctx, prompt, n_virtual)
    if examples:
        with open(examples) as file:
            batches = micro_batches_of(json.load(file), micro_batch_size, pad_id)
    else:
        batches = make_micro_batches(model.args.vocab_size, n_micro, micro_batch_size)
    results = {}
    for schedule in schedules.split(",") if isinstance(schedules, str) else schedules:
        if prompt is not None:
            prompt.weight.grad = None
        loss, n_targets = stage.train_step(batches, schedule)
        losses = ctx.gather_objects(loss)
        if ctx.is_first:
            results[schedule] = {"grad": prompt.weight.grad.clone(), "loss": losses[-1],
                                 "n_targets": n_targets}
    if ctx.is_first:
        torch.save(results, out)
    ctx.close()


if __name__ == "__main__":
    run_cli(main)

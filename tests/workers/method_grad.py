"""Worker: the gradient of every trainable tensor of a tuning method through however many stages
are running (one process, or ranks started by tests/launch.py), for one global batch of random
token ids with unequal lengths, right padding and response masks (prompt_grad.py's batches).

Rank 0 saves {schedule: {"grads": {global key: gradient}, "loss": summed loss}} to --out. The
adapter's gates start at 0.5 here, not 0, so that its prompts get a gradient to compare too; a
LoRA's B starts non-zero for the same reason (lora_setup.py). --quantize int8/int4 freezes the
block linears quantized (QLoRA).
"""
from llama.cli import run_cli
import torch

from llama.formats.checkpoint import load_model
from llama.parallel.distributed import init_distributed
from llama.tuning.methods import apply_adapter, apply_prefix, apply_prompt
from llama.prepare.offload import apply_recompute
from llama.parallel.pipeline import Stage
from llama.tuning.prompt import SoftPrompt, init_prompt_weight
from lora_setup import opened_lora
from prompt_grad import make_micro_batches


def build_tuning(model, ctx, method: str, n_virtual: int, recompute: bool):
    if method == "prefix":
        return apply_prefix(model, n_virtual, seed=3)
    if method == "lora":
        return opened_lora(model)
    if method == "adapter":
        tuning = apply_adapter(model, n_virtual, adapter_layers=3, seed=3)
        with torch.no_grad():
            for key, tensor in tuning.trainable.items():
                if key.endswith("gate"):
                    tensor.fill_(0.5)
        return tuning
    prompt = None
    if ctx.is_first:
        prompt = SoftPrompt(init_prompt_weight("random", n_virtual, model.tok_embeddings.weight,
                                               seed=1))
    return apply_prompt(prompt, n_virtual)


def main(ckpt, out, method="prefix", schedules="1f1b", n_micro=4, micro_batch_size=2,
         n_virtual=4, recompute=False, quantize=None):
    ctx = init_distributed(device="cpu", timeout_s=60)
    model = load_model(ckpt, ctx.rank, ctx.world_size, quantize=quantize)
    tuning = build_tuning(model, ctx, method, n_virtual, recompute)
    if recompute:
        apply_recompute(model, offload_activations=True)
    stage = Stage(model, ctx, tuning=tuning)
    batches = make_micro_batches(model.args.vocab_size, n_micro, micro_batch_size)
    results = {}
    for schedule in schedules.split(",") if isinstance(schedules, str) else schedules:
        for tensor in tuning.trainable.values():
            tensor.grad = None
        loss, _ = stage.train_step(batches, schedule)
        grads = ctx.gather_objects({k: t.grad.clone() for k, t in tuning.trainable.items()})
        losses = ctx.gather_objects(loss)
        if ctx.rank == 0:
            results[schedule] = {"grads": {k: g for part in grads for k, g in part.items()},
                                 "loss": losses[-1]}
    if ctx.rank == 0:
        torch.save(results, out)
    ctx.close()


if __name__ == "__main__":
    run_cli(main)

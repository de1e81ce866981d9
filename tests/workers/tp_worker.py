"""Worker: what a grid of pipeline stages x tensor-parallel ranks computes, for tests/test_tp.py.

Run as ranks started by tests/launch.py with --tp N (world size = stages x N). For each
--quantize in turn (none, int8) it loads this rank's shard as every script does (load_model with
the rank's TP shard, then the all-reduce hooks), and records on rank 0:
- "logits": the last stage's logits for a fixed batch of ids (and every last-stage rank's, to
  check they agree);
- "ids": greedy ids of two prompts through the generation engine (float only);
- "grads": {method: {global key: whole gradient}} of one global batch through the schedule,
  the TP ranks' parts joined, and "parts": every rank's own gradients, to check that a
  replicated tensor's gradient is the same on every TP rank.
--meta: a Meta-layout folder also loaded (its logits under "meta_logits").
"""
import torch

from llama.cli import run_cli
from llama.formats.checkpoint import load_model
from llama.model.fused import apply_fused_projections
from llama.parallel.distributed import init_distributed
from llama.parallel.pipeline import Stage
from llama.parallel.tensor_parallel import apply_tensor_parallel
from llama.prepare.offload import apply_recompute
from llama.serving.generation import generate
from llama.tuning.sharding import join_grid
from method_grad import build_tuning
from prompt_grad import make_micro_batches

PROMPTS = [[1, 20, 30, 40], [1, 7, 8]]


def stage_of(ctx, ckpt, quantize=None):
    model = load_model(ckpt, ctx.stage, ctx.n_stages, quantize=quantize, tp_rank=ctx.tp_rank,
                       tp_size=ctx.tp_size)
    return apply_tensor_parallel(model, ctx)


@torch.no_grad()
def logits_of(ctx, model, tokens):
    """The last stage's logits (B, T, vocab) on every rank of it, None elsewhere."""
    stage = Stage(model, ctx)
    h = stage.run_layers(stage.hidden_in(tokens, with_prompt=False), with_prompt=False)
    stage.hidden_out(h)
    ctx.flush_sends()
    return model.logits(h) if ctx.is_last else None


def gradients(ctx, ckpt, method: str, quantize):
    """method+recompute: the blocks recomputed in backward (their all-reduces run again);
    method+fused: the shard's projections fused first (wqkv, w13 of its own heads and rows)."""
    name, *variants = method.split("+")
    model = stage_of(ctx, ckpt, quantize)
    if "fused" in variants:
        apply_fused_projections(model)
    tuning = build_tuning(model, ctx, name, 4, recompute=False)
    if "recompute" in variants:
        apply_recompute(model, offload_activations=True)
    batches = make_micro_batches(model.args.vocab_size, 4, 2)
    Stage(model, ctx, tuning=tuning).train_step(batches, "1f1b")
    parts = ctx.gather_objects({k: t.grad.clone() for k, t in tuning.trainable.items()})
    return (join_grid(parts, ctx.tp_size), parts) if ctx.rank == 0 else (None, None)


def main(ckpt, out, tp: int = 2, methods="prompt,prefix,adapter,lora,lora+recompute,lora+fused",
         int8_methods="prompt,lora", meta=None):
    ctx = init_distributed(device="cpu", timeout_s=60, tp=tp)
    tokens = torch.randint(3, 512, (2, 9), generator=torch.Generator().manual_seed(5))
    results = {}
    for quantize, names in ((None, methods), ("int8", int8_methods)):
        found = results[quantize or "float"] = {"grads": {}, "parts": {}}
        found["logits"] = ctx.gather_objects(logits_of(ctx, stage_of(ctx, ckpt, quantize), tokens))
        if quantize is None:
            stage = Stage(stage_of(ctx, ckpt), ctx)
            found["ids"] = generate(stage, PROMPTS, max_gen_len=12)
        for method in names.split(",") if names else ():
            found["grads"][method], found["parts"][method] = gradients(ctx, ckpt, method, quantize)
    if meta:
        results["meta_logits"] = ctx.gather_objects(logits_of(ctx, stage_of(ctx, meta), tokens))
    if ctx.rank == 0:
        torch.save(results, out)
    ctx.close()


if __name__ == "__main__":
    run_cli(main)

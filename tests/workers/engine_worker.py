"""Worker: rows of every tuning (none, prompt, prefix, adapter, two LoRAs of other ranks and
projections) joining one engine at different steps, and each row alone, through however many
stages are running.

Run as one process or as ranks (tests/launch.py); rank 0 writes {"mixed": [ids per row],
"alone": [ids per row]} to --out. tests/test_engine.py imports its functions too.
"""
import json
import zlib

import torch

from llama.cli import run_cli
from llama.formats.checkpoint import load_model
from llama.parallel.distributed import init_distributed
from llama.parallel.pipeline import Stage
from llama.serving.engine import Engine
from llama.serving.sampling import Sampling
from llama.serving.scheduler import Batcher, Request
from llama.tuning.lora import apply_lora, lora_settings
from llama.tuning.methods import apply_adapter, apply_prefix, apply_prompt
from llama.tuning.prompt import SoftPrompt

# (tuning, prompt ids, temperature, the step before which it joins)
ROWS = [
    (None, [1, 403, 407, 261], 0.0, 0),
    ("prompt", [1, 403], 0.0, 0),
    ("prefix", [1, 403, 407, 261, 280, 300], 0.0, 0),
    ("adapter", [1, 403, 407], 0.0, 2),
    ("prompt", [1, 300, 400], 0.8, 3),
    ("adapter", [1, 403, 407, 261], 0.8, 5),
    (None, [1, 280], 0.0, 5),
    ("lora", [1, 300, 400], 0.0, 1),
    ("lora", [1, 403, 407], 0.8, 6),
    ("lora2", [1, 300, 400], 0.0, 1),  # beside the first LoRA's row with the same ids
    ("lora2", [1, 280], 0.8, 4),
]
MAX_NEW = 10


def tunings(model, ctx) -> dict:
    """A soft prompt, a prefix, an adapter (its gates opened) and two LoRAs (their B drawn), on
    the same model; the second's projections overlap the first's on q."""
    std = float(model.tok_embeddings.weight.std()) if ctx.is_first else 0.0
    weight = torch.randn(5, model.args.dim, generator=torch.Generator().manual_seed(7)) * std * 10
    prompt = apply_prompt(SoftPrompt(weight) if ctx.is_first else None, 5)
    adapter = apply_adapter(model, 4, adapter_layers=3, seed=3)
    with torch.no_grad():
        for key, tensor in adapter.trainable.items():
            if key.endswith("gate"):
                tensor.fill_(2.0)
    return {"prompt": prompt, "prefix": apply_prefix(model, 3, seed=5), "adapter": adapter,
            "lora": drawn_lora(model, 4, "q,v,down", seed=1),
            "lora2": drawn_lora(model, 2, "q,k,o,up", seed=2)}


def drawn_lora(model, r: int, targets: str, seed: int):
    """A LoRA whose B is drawn per global key (a fresh one starts at zero: the base model)."""
    lora = apply_lora(model, lora_settings(r=r, alpha=2 * r, targets=targets), seed=seed)
    with torch.no_grad():
        for key, tensor in lora.trainable.items():
            if key.endswith("lora_B"):
                generator = torch.Generator().manual_seed(zlib.crc32(f"{seed} {key}".encode()))
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5)
    return lora


def run_rows(stage, named: dict, rows, max_rows: int, cuda_graph: bool = False):
    """The new ids of every row, each joining before its step; on every rank."""
    engine = Engine(stage, named, max_rows=max_rows, cuda_graph=cuda_graph)
    try:
        if not stage.ctx.is_first:
            engine.follow()
            return stage.ctx.broadcast_object(None), engine
        requests = [Request(ids, MAX_NEW, tuning, Sampling(temperature, 0.9, seed=i))
                    for i, (tuning, ids, temperature, _) in enumerate(rows)]
        batcher, step = Batcher(engine), 0
        while batcher.busy or step <= max(r[3] for r in rows):
            for request, row in zip(requests, rows):
                if row[3] == step:
                    batcher.submit(request)
            if batcher.busy:
                batcher.step()
            step += 1
        batcher.quit()
    finally:
        engine.close()
    return stage.ctx.broadcast_object([r.new for r in requests]), engine


def mixed_and_alone(stage, named: dict, cuda_graph: bool = False) -> dict:
    mixed, _ = run_rows(stage, named, ROWS, max_rows=4, cuda_graph=cuda_graph)
    # Alone, a row keeps its seed: sampling draws from the row's own generator.
    alone = [run_alone(stage, named, row, seed=i) for i, row in enumerate(ROWS)]
    return {"mixed": mixed, "alone": alone}


def run_alone(stage, named: dict, row, seed: int) -> list:
    engine = Engine(stage, named, max_rows=1)
    try:
        if not stage.ctx.is_first:
            engine.follow()
            return stage.ctx.broadcast_object(None)
        request = Request(row[1], MAX_NEW, row[0], Sampling(row[2], 0.9, seed=seed))
        batcher = Batcher(engine)
        batcher.submit(request)
        batcher.run()
        batcher.quit()
    finally:
        engine.close()
    return stage.ctx.broadcast_object(request.new)


def main(ckpt, out):
    ctx = init_distributed(device="cpu", timeout_s=60)
    model = load_model(ckpt, ctx.rank, ctx.world_size)
    results = mixed_and_alone(Stage(model, ctx), tunings(model, ctx))
    if ctx.is_first:
        with open(out, "w") as f:
            json.dump(results, f)
    ctx.close()


if __name__ == "__main__":
    run_cli(main)

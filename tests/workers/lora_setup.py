"""The LoRA that both sides of the LoRA gradient comparisons run (tests/test_lora_train.py and
method_grad.py --method lora): every projection targeted, rank 4, and B drawn small and seeded
by its global key (a fresh B is zero, and then A would get no gradient to compare).
"""
import zlib

import torch

from llama.tuning.lora import apply_lora, expected_lora_shapes, lora_settings
from llama.tuning.sharding import own_shard


def opened_lora(model, use_rslora: bool = False):
    """(On a tensor-parallel shard, B is drawn whole and cut: every grid starts the same.)"""
    settings = lora_settings(r=4, alpha=8, targets="all", use_rslora=use_rslora)
    tuning = apply_lora(model, settings, seed=3)
    shapes = expected_lora_shapes(model.args, settings.r, settings.targets)
    with torch.no_grad():
        for key, tensor in tuning.trainable.items():
            if key.endswith("lora_B"):
                generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
                whole = torch.randn(shapes[key], generator=generator) * 0.05
                tensor.copy_(own_shard(key, whole, model.tp_shard))
    return tuning

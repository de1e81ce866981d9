"""The LoRA that both sides of the LoRA gradient comparisons run (tests/test_lora_train.py and
method_grad.py --method lora): every projection targeted, rank 4, and B drawn small and seeded
by its global key (a fresh B is zero, and then A would get no gradient to compare).
"""
import zlib

import torch

from llama.tuning.lora import apply_lora, lora_settings


def opened_lora(model, use_rslora: bool = False):
    tuning = apply_lora(model, lora_settings(r=4, alpha=8, targets="all", use_rslora=use_rslora),
                        seed=3)
    with torch.no_grad():
        for key, tensor in tuning.trainable.items():
            if key.endswith("lora_B"):
                generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.05)
    return tuning

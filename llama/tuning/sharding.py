"""How each method's trainable tensors lie across the tensor-parallel ranks of a stage.

A tensor follows the block tensor it works with (llama/model/tensor_shards.py):
- cut, each rank holding its block: a prefix's keys/values by kv heads (dim 2 of (2, P, kv_heads,
  head_dim)); LoRA's B (out, r) of a column-parallel projection by output rows; LoRA's A (r, in)
  of a row-parallel one (wo, w2) by input columns;
- replicated, whole on every rank: the soft prompt (it enters before the first block, and every
  block's input gradient is summed over the ranks, so its gradient is the whole one everywhere);
- replicated with a partial gradient, summed over the ranks after each backward: tensors that
  reach only a rank's own heads or FFN rows (LoRA's A of a column-parallel projection, B of a
  row-parallel one, an adapter's prompt and gate).
Files always hold whole tensors: methods cut them when they attach (own_shard), the training
loop joins them before it saves (join_grid), so what trains on any grid loads on any other.
"""
import torch

from llama.model.tensor_shards import take_shard
from llama.tuning.lora import LORA_KEY, lora_shard_dim


def tuning_shard_dim(key: str, tensor) -> int:
    """The dimension key's tensor is cut along across TP ranks, or None where it is whole."""
    if not torch.is_tensor(tensor) or tensor.dim() == 0:  # AdamW's step beside the moments
        return None
    if key.endswith(".prefix"):
        return 2
    lora = LORA_KEY.fullmatch(key)
    return lora_shard_dim(lora.group(2), lora.group(3)) if lora else None


def grad_is_partial(key: str) -> bool:
    """Whether a replicated tensor's gradient on one TP rank covers only that rank's heads."""
    lora = LORA_KEY.fullmatch(key)
    if lora:  # the one of the pair that is not cut
        return lora_shard_dim(lora.group(2), lora.group(3)) is None
    return key.endswith((".adaption_prompt", ".adaption_gate"))


def own_shard(key: str, tensor, tp_shard):
    """This TP rank's part of a whole tensor; tp_shard = (rank, count), the model's."""
    return take_shard(tensor, tuning_shard_dim(key, tensor), *tp_shard)


def join_parts(key: str, parts: list):
    """The whole tensor from every TP rank's part, in rank order."""
    dim = tuning_shard_dim(key, parts[0])
    return parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)


def join_grid(by_rank: list, tp_size: int) -> dict:
    """{key: whole value} from every rank's {key: part} (global rank order, stage-major). A
    value is a tensor or a dict of tensors (an optimizer state: master, moments, step)."""
    whole = {}
    for first in range(0, len(by_rank), tp_size):
        group = by_rank[first:first + tp_size]
        for key, value in group[0].items():
            if isinstance(value, dict):
                whole[key] = {name: join_parts(key, [part[key][name] for part in group])
                              for name in value}
            else:
                whole[key] = join_parts(key, [part[key] for part in group])
    return whole


def shard_grid_state(whole: dict, tp_shard) -> dict:
    """join_grid's inverse for one rank: its part of every value (tensors or dicts of them)."""
    return {key: {name: own_shard(key, t, tp_shard) for name, t in value.items()}
            if isinstance(value, dict) else own_shard(key, value, tp_shard)
            for key, value in whole.items()}

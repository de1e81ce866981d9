"""Which layers each pipeline stage owns: one pure function, used by split_model.py and the runtime.

Stages get contiguous layer ranges whose costs are as even as possible: the first stage also pays
for the token embeddings and the last for the final norm and output head.
"""
import math
from functools import lru_cache

from llama.errors import BadInput

from llama.model.transformer import ModelArgs


def parameter_costs(args: ModelArgs):
    """Parameters per block, in the embedding table and in the head (norm + output projection).

    Parameter count stands in for both memory and time: a block's FLOPs per token are twice its
    parameters, and the head's logits cost the same per parameter.
    """
    kv_dim = args.n_kv_heads * args.head_dim
    attention = 2 * args.dim * args.dim + 2 * args.dim * kv_dim
    feed_forward = 3 * args.dim * args.hidden_dim
    layer = attention + feed_forward + 2 * args.dim
    embeddings = args.vocab_size * args.dim
    head = args.vocab_size * args.dim + args.dim
    return layer, embeddings, head


def stage_layer_ranges(n_layers: int, n_stages: int, layer_cost: float = 1.0,
                       embed_cost: float = 0.0, head_cost: float = 0.0, capacities=None):
    """Split layers 0..n_layers-1 into n_stages contiguous [start, end) ranges of balanced cost.

    Minimises the cost of the most expensive stage (each stage keeps at least one layer), where
    a stage's cost is divided by its card's capacity when `capacities` (one per stage, e.g. GiB)
    are given; among equally good splits the earliest boundaries win, so the answer is
    deterministic.
    """
    if not isinstance(n_stages, int) or not 1 <= n_stages <= n_layers:
        raise ValueError(f"n_stages={n_stages} must be an integer from 1 to n_layers={n_layers}")
    capacities = list(capacities) if capacities is not None else [1.0] * n_stages
    if len(capacities) != n_stages or min(capacities) <= 0:
        raise ValueError(f"capacities={capacities} must be {n_stages} positive numbers")

    def stage_cost(start, end, stage):
        cost = (end - start) * layer_cost
        cost += embed_cost if start == 0 else 0.0
        cost += head_cost if end == n_layers else 0.0
        return cost / capacities[stage]

    @lru_cache(maxsize=None)
    def best(start, stages_left):
        """(max cost, ends) for layers start..n_layers-1 split into stages_left stages."""
        stage = n_stages - stages_left
        if stages_left == 1:
            return stage_cost(start, n_layers, stage), (n_layers,)
        options = []
        for end in range(start + 1, n_layers - stages_left + 2):
            rest_cost, rest_ends = best(end, stages_left - 1)
            options.append((max(stage_cost(start, end, stage), rest_cost), (end,) + rest_ends))
        return min(options)

    ends = best(0, n_stages)[1]
    starts = (0,) + ends[:-1]
    return [(s, e) for s, e in zip(starts, ends)]


def balanced_ranges(args: ModelArgs, n_stages: int, capacities=None):
    """stage_layer_ranges with the model's own parameter costs (per card capacity if given)."""
    layer, embeddings, head = parameter_costs(args)
    return stage_layer_ranges(args.n_layers, n_stages, layer, embeddings, head, capacities)


def ranges_from_counts(n_layers: int, layer_counts):
    """[(start, end)] from the number of layers of each stage, e.g. (12, 10, 10)."""
    if not layer_counts or any(isinstance(c, bool) or not isinstance(c, int) or c < 1
                               for c in layer_counts) or sum(layer_counts) != n_layers:
        raise ValueError(f"layer counts {list(layer_counts)} must be positive integers adding "
                         f"up to n_layers={n_layers}")
    ends = [sum(layer_counts[:i + 1]) for i in range(len(layer_counts))]
    return list(zip([0] + ends[:-1], ends))


def describe_stage(layer_range, embeddings: bool, head: bool) -> str:
    """'layers [3, 5) + head': what a stage holds, in split.json's terms (a half-open layer range,
    the embeddings, the head = final norm + output projection). split_model.py and
    llama.tools.explain both print it, so the two outputs read the same."""
    first, end = layer_range
    return f"layers [{first}, {end})" + (" + embeddings" if embeddings else "") + \
        (" + head" if head else "")


# ---- a stage's weights in bytes (split_model.py --stage_memory, python -m llama.tools.plan) ----

GIB = 2**30


def linear_parameters(args: ModelArgs, tp: int = 1):
    """[(out, in)] of one block's seven linears (wq, wk, wv, wo, w1, w2, w3), as one of tp
    tensor-parallel ranks holds them: column-parallel ones a tp-th of the rows, wo and w2 a
    tp-th of the columns (llama/model/tensor_shards.py)."""
    kv_dim = args.n_kv_heads * args.head_dim
    return [(args.dim // tp, args.dim), (kv_dim // tp, args.dim), (kv_dim // tp, args.dim),
            (args.dim, args.dim // tp), (args.hidden_dim // tp, args.dim),
            (args.dim, args.hidden_dim // tp), (args.hidden_dim // tp, args.dim)]


def layer_weight_bytes(args: ModelArgs, float_bytes: int, quantization=None, tp: int = 1) -> float:
    """Bytes of one block (a TP rank's share of it): its linears at 1 (int8) or 1/2 (int4)
    byte a weight plus their scales (and zeros) in the float dtype, or all float; the two norms
    always float (and whole on every TP rank)."""
    norms = 2 * args.dim * float_bytes
    scheme = (quantization or {}).get("scheme")
    total = 0
    for out_features, in_features in linear_parameters(args, tp):
        if scheme == "int8":
            total += out_features * in_features + out_features * float_bytes
        elif scheme == "int4":
            groups = out_features * in_features // quantization["group_size"]
            total += out_features * in_features // 2 + 2 * groups * float_bytes
        else:
            total += out_features * in_features * float_bytes
    return total + norms


def stage_weight_bytes(args: ModelArgs, stage, float_bytes: int, quantization=None,
                       tp: int = 1) -> float:
    """Bytes of one stage's weights (on each of its tp ranks: the embeddings and the head are
    whole on every one); stage = (layer_range, has_embeddings, has_head)."""
    (first, last), has_embeddings, has_head = stage
    _, embeddings, head = parameter_costs(args)
    return ((last - first) * layer_weight_bytes(args, float_bytes, quantization, tp)
            + (has_embeddings * embeddings + has_head * head) * float_bytes)


def check_stage_memory(stage_memory, n_stages: int) -> list:
    sizes = list(stage_memory) if isinstance(stage_memory, (list, tuple)) else [stage_memory]
    example = f"e.g. --stage_memory {','.join(['4'] * n_stages)}"
    if len(sizes) != n_stages:
        raise BadInput(f"--stage_memory {sizes} must give one size in GiB per stage "
                       f"({n_stages} stages): {example}")
    wrong = [g for g in sizes if isinstance(g, bool) or not isinstance(g, (int, float))
             or not 0 < g < math.inf]
    if wrong:
        raise BadInput(f"--stage_memory {sizes}: every size must be a positive number of GiB, "
                       f"not {wrong[0]!r}: {example}")
    return sizes


def check_weights_fit(args, plan, stage_memory, float_bytes: int, quantization):
    """--stage_memory: each card must hold at least its stage's weights (the activations come
    on top: python -m llama.tools.plan tells whether training fits)."""
    weights = [stage_weight_bytes(args, stage, float_bytes, quantization) for stage in plan]
    if any(w > g * GIB for w, g in zip(weights, stage_memory)):
        by_stage = ", ".join(f"{w / GIB:.3g}" for w in weights)
        raise BadInput(f"--stage_memory {list(stage_memory)} GiB is too small for this model: "
                       f"its weights alone need {sum(weights) / GIB:.3g} GiB ({by_stage} by stage); "
                       "give bigger cards, more stages or --quantize int8/int4")

"""Fused projections: wq/wk/wv as one matrix and w1/w3 as one, so a block runs 4 GEMMs, not 7.

    apply_fused_projections(model)   # after the stage's weights are loaded

A transform like the others: the blocks' forwards use the fused matrix once it exists. Files keep
Meta's key names: state_dict() still gives wq/wk/wv/w1/w3, and load_state_dict(strict=True)
still takes them (hooks split and join the fused matrices), so saving, loading and splitting are
unchanged. The unfused matrices are dropped, so the fused model holds no second copy.
"""
import torch
from torch import nn

# (fused name, the names it joins, in order), per kind of module
ATTENTION_PARTS = ("wqkv", ("wq", "wk", "wv"))
FEED_FORWARD_PARTS = ("w13", ("w1", "w3"))


def _fuse(module, fused_name: str, part_names):
    """Replace module's linears part_names by one whose weight is theirs stacked by rows."""
    parts = [getattr(module, name) for name in part_names]
    key_order = list(module.state_dict().keys())  # "wq.weight", ...: saved in this order again
    weight = torch.cat([p.weight.detach() for p in parts], dim=0)
    biased = parts[0].bias is not None  # Qwen2's q/k/v: their biases join as their rows do
    with torch.device("meta"):
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=biased)
    fused.weight = nn.Parameter(weight, requires_grad=parts[0].weight.requires_grad)
    if biased:
        fused.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]),
                                  requires_grad=parts[0].bias.requires_grad)
    sizes = [p.weight.shape[0] for p in parts]
    for name in part_names:
        delattr(module, name)
        setattr(module, name, None)  # forward checks the fused one first; keeps attribute access
    setattr(module, fused_name, fused)
    module.register_state_dict_post_hook(_split_on_save(fused_name, part_names, sizes, key_order))
    module.register_load_state_dict_pre_hook(_join_on_load(fused_name, part_names))


def _split_on_save(fused_name, part_names, sizes, key_order):
    def hook(module, state_dict, prefix, local_metadata):
        # This module's entries are the last ones so far: take them out, put them back in the
        # unfused model's order, the fused matrix as its parts.
        mine = {key[len(prefix):]: state_dict.pop(key) for key in list(state_dict)
                if key.startswith(prefix)}
        for kind in ("weight", "bias"):
            if f"{fused_name}.{kind}" in mine:
                fused = mine.pop(f"{fused_name}.{kind}")
                mine.update({f"{name}.{kind}": piece
                             for name, piece in zip(part_names, fused.split(sizes, dim=0))})
        for name in key_order:
            state_dict[prefix + name] = mine[name]
    return hook


def _join_on_load(fused_name, part_names):
    def hook(module, state_dict, prefix, *args):
        for kind in ("weight", "bias"):
            keys = [f"{prefix}{name}.{kind}" for name in part_names]
            if all(key in state_dict for key in keys):
                state_dict[f"{prefix}{fused_name}.{kind}"] = torch.cat(
                    [state_dict.pop(key) for key in keys], dim=0)
    return hook


def apply_fused_projections(model):
    """Fuse every block's q/k/v and w1/w3 projections in place; returns the model.

    Fusing twice is a no-op. Logits equal the unfused model's to rounding (one wider GEMM may
    sum in another order than three narrow ones).
    """
    for block in model.layers.values():
        block = getattr(block, "block", block)  # under apply_recompute's wrapper
        if block.attention.wqkv is None and _plain(block.attention, ATTENTION_PARTS[1]):
            _fuse(block.attention, *ATTENTION_PARTS)
        if block.feed_forward.w13 is None and _plain(block.feed_forward, FEED_FORWARD_PARTS[1]):
            _fuse(block.feed_forward, *FEED_FORWARD_PARTS)
    return model


def _plain(module, part_names) -> bool:
    """Float nn.Linear projections, all with biases (Qwen2's q/k/v) or none; a quantized stage's
    (llama/model/quant.py) stay as they are: their packed codes and per-row scales would need
    their own fused layout."""
    linears = [getattr(module, name) for name in part_names]
    return all(type(linear) is nn.Linear for linear in linears) and \
        len({linear.bias is None for linear in linears}) == 1  # all biased, or none

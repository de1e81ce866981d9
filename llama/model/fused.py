"""Fused projections: wq/wk/wv as one matrix and w1/w3 as one, so a block runs 4 GEMMs, not 7.

    apply_fused_projections(model)   # after the stage's weights are loaded

A transform like the others: the blocks' forwards use the fused matrix once it exists. Files keep
Meta's key names: state_dict() still gives wq/wk/wv/w1/w3, and load_state_dict(strict=True)
still takes them (hooks split and join the fused matrices), so saving, loading and splitting are
unchanged. The unfused matrices are dropped, so the fused model holds no second copy. Quantized
projections (llama/model/quant.py) join too: their codes, scales and zeros stack by rows.
"""
import torch
from torch import nn

from llama.model.quant import QuantizedLinear

# The tensors of a projection that stack by output rows when it joins others (a float linear's
# weight and bias; a quantized one's codes, scales and zeros too)
FUSED_KINDS = ("weight", "bias", "scales", "zeros")
# (fused name, the names it joins, in order), per kind of module
ATTENTION_PARTS = ("wqkv", ("wq", "wk", "wv"))
FEED_FORWARD_PARTS = ("w13", ("w1", "w3"))


def _fuse(module, fused_name: str, part_names):
    """Replace module's linears part_names by one whose weight is theirs stacked by rows."""
    parts = [getattr(module, name) for name in part_names]
    key_order = list(module.state_dict().keys())  # "wq.weight", ...: saved in this order again
    fused = _joined_quantized(parts) if isinstance(parts[0], QuantizedLinear) else \
        _joined_float(parts)
    sizes = [p.out_features for p in parts]
    for name in part_names:
        delattr(module, name)
        setattr(module, name, None)  # forward checks the fused one first; keeps attribute access
    setattr(module, fused_name, fused)
    module.register_state_dict_post_hook(_split_on_save(fused_name, part_names, sizes, key_order))
    module.register_load_state_dict_pre_hook(_join_on_load(fused_name, part_names))


def _joined_float(parts):
    weight = torch.cat([p.weight.detach() for p in parts], dim=0)
    biased = parts[0].bias is not None  # Qwen2's q/k/v: their biases join as their rows do
    with torch.device("meta"):
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=biased)
    fused.weight = nn.Parameter(weight, requires_grad=parts[0].weight.requires_grad)
    if biased:
        fused.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]),
                                  requires_grad=parts[0].bias.requires_grad)
    return fused


def _joined_quantized(parts):
    """One QuantizedLinear of the parts' rows: int8's codes and per-row scales, int4's packed
    codes and per-group scales and zeros all stack by output rows, so the fused layer computes
    each part's rows exactly as the part did (its int8 copy for the dynamic path too)."""
    first = parts[0]
    fused = QuantizedLinear(first.in_features, sum(p.out_features for p in parts), first.scheme,
                            first.group_size, first.scales.dtype, first.weight.device,
                            bias=first.bias is not None)
    state = {name: torch.cat([getattr(p, name).detach() for p in parts])
             for name in FUSED_KINDS if getattr(first, name) is not None}
    fused.load_state_dict(state, assign=True)
    if first.int8_codes is not None:
        fused.int8_codes = torch.cat([p.int8_codes for p in parts])
        fused.int8_scales = torch.cat([p.int8_scales for p in parts])
    fused.use_dynamic_int8, fused.use_kernel = first.use_dynamic_int8, first.use_kernel
    if first.int4_kernel_weight is not None:
        fused.prepare_int4_kernel()
    return fused.requires_grad_(False)


def _split_on_save(fused_name, part_names, sizes, key_order):
    def hook(module, state_dict, prefix, local_metadata):
        # This module's entries are the last ones so far: take them out, put them back in the
        # unfused model's order, the fused matrix as its parts.
        mine = {key[len(prefix):]: state_dict.pop(key) for key in list(state_dict)
                if key.startswith(prefix)}
        for kind in FUSED_KINDS:
            if f"{fused_name}.{kind}" in mine:
                fused = mine.pop(f"{fused_name}.{kind}")
                mine.update({f"{name}.{kind}": piece
                             for name, piece in zip(part_names, fused.split(sizes, dim=0))})
        for name in key_order:
            state_dict[prefix + name] = mine[name]
    return hook


def _join_on_load(fused_name, part_names):
    def hook(module, state_dict, prefix, *args):
        for kind in FUSED_KINDS:
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
    """Projections that can join: float nn.Linear, or QuantizedLinear of one scheme and group
    size; all with biases (Qwen2's q/k/v) or none."""
    linears = [getattr(module, name) for name in part_names]
    kinds = {(type(linear), getattr(linear, "scheme", None), getattr(linear, "group_size", None))
             for linear in linears}
    return len(kinds) == 1 and next(iter(kinds))[0] in (nn.Linear, QuantizedLinear) and \
        len({linear.bias is None for linear in linears}) == 1  # all biased, or none

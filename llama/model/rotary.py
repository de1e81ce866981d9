"""Rotary position embeddings: the frequencies (plain, or scaled for long contexts as Llama 3.1+
and linear position interpolation do), their table of turns (cos + i sin) and the rotation itself.

Plain PyTorch; check_rope_scaling is the one place a scaling setting is validated, for every
file layout (HF config.json, Meta params.json, our split params.json).
"""
import math

import torch

from llama.errors import BadInput

# The values Meta's own code uses when params.json says "use_scaled_rope": true (Llama 3.1).
META_LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# The numbers each rope type needs, beyond its name.
SCALING_FIELDS = {"linear": ("factor",),
                  "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                             "original_max_position_embeddings")}


def check_rope_scaling(scaling, where: str):
    """The scaling as ModelArgs keeps it ({"rope_type": ..., its numbers as floats/int}), or None
    for plain rope. Refuses, by name, a type this model does not implement and bad numbers."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise BadInput(f"{where}: rope scaling {scaling!r} must be a JSON object or null")
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type in (None, "default"):
        return None
    if rope_type not in SCALING_FIELDS:
        raise BadInput(f"{where}: rope type {rope_type!r} is not implemented here (only "
                       f"'default', {', '.join(map(repr, SCALING_FIELDS))}), so the checkpoint "
                       "cannot be run here")
    checked = {"rope_type": rope_type}
    for field in SCALING_FIELDS[rope_type]:
        value = scaling.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value) or value <= 0:
            raise BadInput(f"{where}: {rope_type} rope scaling needs {field} as a positive "
                           f"number, not {value!r}: use the config that came with the weights")
        checked[field] = int(value) if field == "original_max_position_embeddings" \
            else float(value)
    if rope_type == "llama3" and checked["high_freq_factor"] <= checked["low_freq_factor"]:
        raise BadInput(f"{where}: llama3 rope scaling needs high_freq_factor "
                       f"({checked['high_freq_factor']}) above low_freq_factor "
                       f"({checked['low_freq_factor']}): use the config that came with the weights")
    return checked


def rope_frequencies(head_dim: int, theta: float, scaling, device):
    """Angle per position of each of a head's head_dim/2 pairs: theta^(-2i/head_dim), scaled."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)
                         / head_dim)
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":  # position interpolation: positions / factor
        return inv_freq / scaling["factor"]
    return llama3_frequencies(inv_freq, scaling)


def llama3_frequencies(inv_freq, scaling):
    """Llama 3.1's scaling: waves longer than original/low_freq_factor positions are slowed by
    `factor` (they never completed a turn in training), waves shorter than
    original/high_freq_factor are kept, and those between are blended linearly in
    original/wavelength, so the frequencies stay monotonic."""
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelength = 2 * math.pi / inv_freq
    # 0 for the long waves, 1 for the short ones: the clamp gives both ends of the blend.
    smooth = ((original / wavelength - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rotary_tables(head_dim: int, theta: float, start_pos, length: int, device, scaling=None):
    """The rotary turns, cos + i sin of each angle, for positions [start_pos, start_pos + length).

    Meta's convention: pair i of a head is (x[2i], x[2i+1]) and turns at theta^(-2i/head_dim)
    per position (scaled, where the model says so). Computed on the fly in float32: it is tiny
    next to the matrix products. start_pos is an int: a complex table (T, head_dim/2); or a
    device tensor of one start per row (or one for all rows), so rows of a batch may sit at
    different positions with no host value (the generation engine, static decode):
    (B|1, T, head_dim/2).
    """
    inv_freq = rope_frequencies(head_dim, theta, scaling, device)
    steps = torch.arange(length, device=device, dtype=torch.float32)
    if torch.is_tensor(start_pos):
        # Whole numbers are exact in float32, so these equal the int path's positions.
        positions = start_pos.to(torch.float32)[:, None] + steps  # (B|1, T)
        angles = positions[..., None] * inv_freq  # (B|1, T, head_dim/2)
    else:
        angles = torch.outer(steps + start_pos, inv_freq)  # (T, head_dim/2)
    return torch.complex(angles.cos(), angles.sin())


def apply_rotary(x, turns):
    """Rotate interleaved pairs of x (B, T, heads, head_dim) by rotary_tables' turns.

    Each pair (x[2i], x[2i+1]) is read as the complex number x[2i] + i x[2i+1] and multiplied by
    its turn: one elementwise product (measured ~7x faster on a CPU than rotating the two halves
    apart and stacking them, forward and backward), in float32.
    """
    B, T, H, D = x.shape
    pairs = torch.view_as_complex(x.float().reshape(B, T, H, D // 2, 2))
    # (T, D/2) or one table per row (B|1, T, D/2): the same turn for every head
    return torch.view_as_real(pairs * turns.unsqueeze(-2)).flatten(3).type_as(x)

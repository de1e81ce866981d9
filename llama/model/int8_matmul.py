"""The CPU's fast matmul for int8 weights: the input quantized to int8 per row on the fly, an
int8 x int8 product accumulated in int32, then both scales. QuantizedLinear
(llama/model/quant.py) runs it at inference on a CPU; docs/quantization.md has its error and
docs/PERFORMANCE.md its speed.

Two products give the same numbers (int32 sums are exact; the scales are applied alike):
torch._int_mm on the plain (out, in) codes, and oneDNN's int8 matmul on its blocked copy of them
(pack_int8_weight, generation only). On the CPU measured the blocked one ran a 4096 x 4096 layer
1.6x faster at one row and 1.7x at 16 rows, and a whole decode step's products 1.3x faster, but
some narrow layers 24-57x slower, so each layer's choice is measured (docs/PERFORMANCE.md,
bench/linear_bench.py).
"""
import time
from typing import Optional

import torch

ZERO_POINT = torch.zeros(1, dtype=torch.long)  # symmetric codes: no zero point, for every layer


def onednn_int8_available() -> bool:
    return torch.backends.mkldnn.is_available() and \
        hasattr(torch.ops.onednn, "qlinear_prepack") and \
        hasattr(torch.ops.onednn, "qlinear_pointwise")


def pack_int8_weight(codes, scales, check_speed: bool = True) -> Optional[torch.Tensor]:
    """oneDNN's blocked copy of int8 codes (out, in) (the same size), or None where this torch
    has no such op, it refuses these codes (a private op: builds differ), its numbers differ
    from torch._int_mm's (a CPU without VNNI may sum pairs in int16), or it is much slower
    at one row. Picked by measurement: on the CPU measured it was faster on most layers and
    24-57x slower on some narrow ones (256 inputs, or 64 outputs; docs/PERFORMANCE.md), so
    one row is run through both products here, checked equal, and timed (check_speed=False:
    not timed)."""
    if not onednn_int8_available() or codes.device.type != "cpu" or codes.dtype != torch.int8:
        return None
    row = torch.randn(1, codes.shape[1], generator=torch.Generator().manual_seed(0))
    try:
        packed = torch.ops.onednn.qlinear_prepack(codes, None)
        if not torch.equal(dynamic_int8_matmul(row, packed, scales),
                           dynamic_int8_matmul(row, codes, scales)):
            return None
    except (RuntimeError, NotImplementedError):
        return None
    if check_speed and much_slower(lambda: dynamic_int8_matmul(row, packed, scales),
                                      lambda: dynamic_int8_matmul(row, codes, scales)):
        return None
    return packed


def much_slower(first, second, factor: float = 1.5, repeats: int = 5) -> bool:
    """Whether first() takes over `factor` times as long as second(): the fastest of `repeats`
    calls of each, alternated (a busy moment slows both), after one untimed call of each (a
    first call builds oneDNN's kernel). Timed here the weights sit in the cache, unlike in a
    decode step (they stream from memory there): only a large gap says which is slower."""
    first(), second()
    times = ([], [])
    for _ in range(repeats):
        for run, kept in zip((first, second), times):
            started = time.perf_counter()
            run()
            kept.append(time.perf_counter() - started)
    return min(times[0]) > factor * min(times[1])


def packed_int8_mm(x_codes, packed, scales):
    """x_codes (M, in) int8 @ packed (out, in).T, accumulated in int32, times scales (out,)
    float32: in float32. An input scale of 1: the caller applies its per-row scales after."""
    return torch.ops.onednn.qlinear_pointwise(x_codes, 1.0, 0, packed, scales, ZERO_POINT, None,
                                              1.0, 0, torch.float32, "none", [], "")


def dynamic_int8_matmul(rows, codes, scales):
    """rows (M, in) float @ codes (out, in) int8 .T, each row of `rows` quantized to int8 with its
    own scale max|row| / 127 (as llama.cpp's q8 activations and fbgemm's dynamic linear do),
    accumulated in int32, then times both scales; in rows' dtype.

    codes: the plain int8 matrix (torch._int_mm runs fastest on its transposed view, so it needs
    no second copy), or pack_int8_weight's blocked copy of it (oneDNN's product).
    """
    x = rows.float()
    x_scales = torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True)  # max |x| a row
    x_scales = x_scales.clamp_(min=1e-12).div_(127)
    x_codes = torch.round(x / x_scales).to(torch.int8)  # |x / scale| <= 127: no clamp needed
    if codes.is_mkldnn:
        out = packed_int8_mm(x_codes, codes, scales.float())
    else:
        out = torch.mul(torch._int_mm(x_codes, codes.t()), scales.float())
    return out.mul_(x_scales).to(rows.dtype)

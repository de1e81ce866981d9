"""The CPU's fast matmul for int8 weights: the input quantized to int8 per row on the fly, an
int8 x int8 product accumulated in int32 (torch._int_mm), then both scales. QuantizedLinear
(llama/model/quant.py) runs it at inference on a CPU; docs/quantization.md has its error and
docs/PERFORMANCE.md its speed.
"""
import torch


def dynamic_int8_matmul(rows, codes, scales):
    """rows (M, in) float @ codes (out, in) int8 .T, each row of `rows` quantized to int8 with its
    own scale max|row| / 127 (as llama.cpp's q8 activations and fbgemm's dynamic linear do),
    accumulated in int32 by torch._int_mm, then times both scales; in rows' dtype.

    The transposed view of codes is what _int_mm runs fastest on (measured: faster than a
    (in, out) contiguous copy at one row), so the int8 weight needs no second copy.
    """
    x = rows.float()
    x_scales = torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True)  # max |x| a row
    x_scales = x_scales.clamp_(min=1e-12).div_(127)
    x_codes = torch.round(x / x_scales).to(torch.int8)  # |x / scale| <= 127: no clamp needed
    out = torch._int_mm(x_codes, codes.t())
    return torch.mul(out, scales.float()).mul_(x_scales).to(rows.dtype)

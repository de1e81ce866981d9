"""One linear layer's time on each path a quantized weight can take (llama/model/quant.py).

    python -m bench.linear_bench --shapes 1536x512,4096x4096 --rows 1,16 --repeats 7
    python -m bench.linear_bench --shapes 1536x512 --rows 256,32 --train True

Forward under no_grad (decode's case), or with --train forward + backward of the input gradient
with the input tracked (training's case: only the exact paths run there). Every path is built
once per shape and the repeats alternate between them, so a busy machine slows them alike; one
JSON line per (shape, rows, path) with the median and range in microseconds, then a table.
Each path runs one layer again and again: a layer smaller than the CPU's cache is read from the
cache here, not from memory as in a decode step (bench/decode_bench.py times those).
"""
import statistics
import time

import torch

from bench import common
from llama.cli import run_cli
from llama.errors import BadInput
from llama.model.cpu_linear import apply_cpu_linears
from llama.model.quant import (QuantizedLinear, pack_int8_products, quantized_tensors,
                              use_dynamic_int8, use_int4_kernels)

TABLE = ["out_x_in", "rows", "path", "us_median", "us_min", "us_max", "vs_float"]
# path -> (scheme, what its forward runs)
PATHS = {
    "float": (None, "nn.Linear: torch's default product (F.linear)"),
    "float_onednn": (None, "CpuLinear: oneDNN's product on the plain weight (training's)"),
    "float_packed": (None, "CpuLinear: oneDNN's product on its blocked weight (generation's)"),
    "int8_packed": ("int8", "int8 products, inputs quantized per row, oneDNN's blocked codes "
                            "(generation's)"),
    "int8_dynamic": ("int8", "the same products by torch._int_mm on the plain codes"),
    "int8_dequantize": ("int8", "dequantize the layer per call (the CPU's exact path)"),
    "int8_weight_only": ("int8", "torch._weight_int8pack_mm"),
    "int4_packed": ("int4", "int8 products on an int8 copy, oneDNN's blocked (generation's)"),
    "int4_int8_copy": ("int4", "int8 products on an int8 copy, torch._int_mm"),
    "int4_dequantize": ("int4", "dequantize the layer per call (the CPU's exact path)"),
    "int4_kernel": ("int4", "torch's int4 kernel (use_int4_kernels)"),
}
EXACT = ("float", "float_onednn", "int8_dequantize", "int8_weight_only", "int4_dequantize", "int4_kernel")


class _Holder(torch.nn.Module):
    """A module holding the one linear, as apply_cpu_linears looks for it."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear


def build_path(name: str, out_features: int, in_features: int, group_size: int):
    """The layer of one path, with random weights ~ N(0, 0.02)."""
    scheme = PATHS[name][0]
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=False).requires_grad_(False)
    linear.weight.normal_(0.0, 0.02, generator=generator)
    if scheme is None:
        if name != "float":
            apply_cpu_linears(_Holder(linear), packed=name == "float_packed", min_weights=0)
        return linear
    layer = QuantizedLinear(in_features, out_features, scheme, group_size)
    state = quantized_tensors("", linear.weight, scheme, group_size)
    layer.load_state_dict({key[1:]: value for key, value in state.items()}, assign=True)
    layer.requires_grad_(False)
    if name in ("int8_dynamic", "int4_int8_copy", "int8_packed", "int4_packed"):
        use_dynamic_int8(layer)
        if name.endswith("_packed"):  # packed even where generation would find it much slower
            pack_int8_products(layer, check_speed=False)
    elif name == "int8_weight_only":
        layer.use_kernel = True
    elif name == "int4_kernel" and not use_int4_kernels(layer):
        return None  # this torch has no int4 kernel for the group size here
    return layer


def one_call(layer, rows, train: bool):
    """Seconds of one forward (no_grad), or forward + input-gradient backward."""
    started = time.perf_counter()
    if train:
        x = rows.detach().requires_grad_(True)
        layer(x).sum().backward()
    else:
        with torch.no_grad():
            layer(rows)
    return time.perf_counter() - started


def measure(shape, n_rows: int, train: bool, repeats: int, group_size: int) -> list:
    out_features, in_features = shape
    names = [n for n in PATHS if not train or n in EXACT]
    layers = {n: build_path(n, out_features, in_features, group_size) for n in names}
    layers = {n: layer for n, layer in layers.items() if layer is not None}
    rows = torch.randn(n_rows, in_features, generator=torch.Generator().manual_seed(1))
    times = {n: [] for n in layers}
    for layer in layers.values():  # warm-up
        one_call(layer, rows, train)
    for _ in range(repeats):
        for name, layer in layers.items():
            times[name].append(one_call(layer, rows, train) * 1e6)
    floats = times["float"]
    return [{"bench": "linear", "out_x_in": f"{out_features}x{in_features}", "rows": n_rows,
             "train": train, "path": name, "runs": PATHS[name][1], "group_size": group_size,
             "us_median": statistics.median(us), "us_min": min(us), "us_max": max(us),
             "vs_float": statistics.median(f / u for f, u in zip(floats, us)),
             "threads": torch.get_num_threads()} for name, us in times.items()]


def main(shapes: str = "1536x512,4096x4096", rows="1,16", train: bool = False, repeats: int = 7,
         group_size: int = 128):
    """Microseconds per call of one linear layer on each path (PATHS), alternated repeat by
    repeat; vs_float is the median over repeats of float's time / the path's (above 1: faster).

    shapes: out x in, comma-separated; rows: the input's rows (1 is decode at batch 1);
    train: forward + backward with the input tracked (the exact paths only)."""
    try:
        parsed = [tuple(int(v) for v in s.split("x")) for s in common.as_list(shapes)]
    except ValueError:
        raise BadInput(f"--shapes {shapes!r} must be OUTxIN pairs, e.g. 1536x512,4096x4096") from None
    env = common.environment(torch.device("cpu"))
    records = []
    for shape in parsed:
        if shape[1] % group_size:
            raise BadInput(f"--group_size {group_size} does not divide the width {shape[1]}")
        for n_rows in common.as_list(rows):
            for record in measure(shape, int(n_rows), train, repeats, group_size):
                common.emit({**record, **env})
                records.append(record)
    common.print_table(records, TABLE)


if __name__ == "__main__":
    run_cli(main)

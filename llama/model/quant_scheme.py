"""The quantization a run asked for, as split.json records it: the entry a split writes
(scheme, and int4's group size chosen to fit every block linear), and the checks a stored
entry must pass before a stage is built for it. The tensors and the module are in
llama/model/quant.py.
"""
from llama.errors import BadInput
from llama.model.quant import SCHEMES, check_group_size, largest_group_size


def quantization_entry(args, quantize, group_size, tp: int = 1):
    """split.json's "quantization" (None for float weights); int4's group size defaults to the
    largest power of two up to 128 that divides every block linear's input width (a TP rank's
    share of it, with tp ranks)."""
    if quantize is None:
        if group_size is not None:
            raise BadInput(f"--group_size {group_size} is for --quantize int4: add it or drop "
                           "--group_size")
        return None
    if quantize not in SCHEMES:
        raise BadInput(f"--quantize {quantize!r} must be one of {', '.join(SCHEMES)} "
                       "(or left out for float weights)")
    if quantize != "int4" and group_size is not None:
        raise BadInput(f"--group_size {group_size} is for --quantize int4 only ({quantize} keeps "
                       "one scale per output channel): drop --group_size, or use --quantize int4")
    entry = {"scheme": quantize, "tensors": "block linears (attention.wq/wk/wv/wo, "
             "feed_forward.w1/w2/w3); embeddings, norms and output stay float"}
    if quantize == "int4":
        entry["group_size"] = largest_group_size(args.dim // tp, args.hidden_dim // tp) \
            if group_size is None else group_size
    check_quantizable(args, entry, tp)
    return entry


def check_quantizable(args, quantization, tp: int = 1):
    """Every block linear's input width must be a whole number of int4 groups; with tp
    tensor-parallel ranks, so must a rank's share of a row-parallel one (wo, w2)."""
    if quantization["scheme"] == "int4":
        share = f"a TP rank's share (--tp {tp}) of " if tp > 1 else ""
        for width, name in ((args.dim, "layers.*.attention.wq"),
                            (args.hidden_dim, "layers.*.feed_forward.w2"),
                            (args.dim // tp, f"{share}layers.*.attention.wo"),
                            (args.hidden_dim // tp, f"{share}layers.*.feed_forward.w2")):
            check_group_size(quantization.get("group_size"), width, f"{name}.weight")


def quantization_args(quantization) -> dict:
    return {"scheme": quantization["scheme"], "group_size": quantization.get("group_size")}

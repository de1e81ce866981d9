"""Tensor-parallel shards of a stage: which rows or columns of each block tensor a TP rank holds.

    shard_stage(model, tp_rank=1, tp_size=2)   # a loaded stage (or a meta one) keeps its shard

Pure tensor work (no process group: llama/parallel/tensor_parallel.py adds the all-reduces).
Column-parallel projections (wq, wk, wv, w1, w3) keep a contiguous block of output rows: whole
heads, whole kv heads, a slice of the FFN width. Row-parallel ones (wo, w2) keep the matching
input columns, so each rank's output is a partial sum that one all-reduce completes. This is
Meta's own model-parallel layout (llama/formats/layouts.py META_SHARD_DIM), so consolidated.0R.pth
is shard R as it lies. Norms, the embeddings and the output head are replicated: see
docs/tensor_parallel.md for why. Quantized linears shard their packed codes and scales the same
way (int8's one scale per output row is replicated on a row-parallel layer; int4's groups must
not straddle a shard boundary).
"""
import torch
from torch import nn

from llama.errors import BadInput

COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3")
ROW_PARALLEL = ("wo", "w2")
BLOCK_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def valid_tp_sizes(args) -> list:
    """The TP sizes this model splits into: they divide the heads, the kv heads and the FFN."""
    return [n for n in range(1, args.n_kv_heads + 1) if not args.n_heads % n
            and not args.n_kv_heads % n and not args.hidden_dim % n]


def check_tp(args, tp_size) -> int:
    """tp_size, refused in one line unless every rank gets whole heads, kv heads and FFN rows."""
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise BadInput(f"--tp {tp_size!r} must be a positive integer (tensor-parallel ranks per "
                       "stage)")
    if tp_size not in valid_tp_sizes(args):
        raise BadInput(f"--tp {tp_size} does not divide this model's {args.n_heads} heads, "
                       f"{args.n_kv_heads} kv heads and FFN width {args.hidden_dim}: use --tp "
                       f"{' or '.join(str(n) for n in valid_tp_sizes(args))}")
    return tp_size


def shard_dim(name: str, tensor_rank: int):
    """The dimension a state-dict tensor is cut along across TP ranks, or None (replicated).

    name: 'layers.3.attention.wq.weight' (or .bias, .scales, .zeros of a quantized linear)."""
    parts = name.split(".")
    if len(parts) < 3 or parts[0] != "layers" or parts[-2] not in COLUMN_PARALLEL + ROW_PARALLEL:
        return None
    if parts[-2] in COLUMN_PARALLEL:
        return 0  # output rows: the weight's, and a bias's, scales' and zeros' with them
    # input columns; a per-output-row vector (int8 scales) belongs to every shard whole
    return 1 if tensor_rank == 2 else None


def take_shard(tensor, dim, tp_rank: int, tp_size: int):
    """The tp_rank-th of tp_size equal blocks of tensor along dim (tensor itself if dim is None)."""
    if dim is None or tp_size == 1:
        return tensor
    return tensor.chunk(tp_size, dim=dim)[tp_rank]


def shard_of(name: str, tensor, tp_rank: int, tp_size: int):
    return take_shard(tensor, shard_dim(name, tensor.dim()), tp_rank, tp_size)


def join_shards(name: str, parts: list):
    """The whole tensor from its TP shards in rank order (the inverse of shard_of)."""
    dim = shard_dim(name, parts[0].dim())
    return parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)


def shard_stage(model, tp_rank: int, tp_size: int):
    """Keep this TP rank's shard of every block linear, in place; attention counts its own heads.

    Works on a loaded stage and on one built on the meta device (whose shapes then say what a
    shard file holds). Run before fusing projections or attaching a tuning method: they read
    the shard's shapes. Returns the model."""
    check_tp(model.args, tp_size)
    if model.tp_shard != (0, 1):
        raise ValueError(f"the stage is already TP shard {model.tp_shard}")
    for index, block in model.layers.items():
        attention = block.attention
        if attention.wqkv is not None or block.feed_forward.w13 is not None:
            raise ValueError("shard the stage before fusing its projections")
        for path in BLOCK_LINEARS:
            _shard_linear(block.get_submodule(path), f"layers.{index}.{path}", tp_rank, tp_size)
        attention.n_heads //= tp_size
        attention.n_kv_heads //= tp_size
    model.tp_shard = (tp_rank, tp_size)
    return model


def _shard_linear(linear, name: str, tp_rank: int, tp_size: int):
    """Cut an nn.Linear's or a QuantizedLinear's tensors (parameters and buffers alike)."""
    group_size = getattr(linear, "group_size", None)
    if name.split(".")[-1] in ROW_PARALLEL and group_size and \
            (linear.in_features // tp_size) % group_size:
        raise BadInput(f"--group_size {group_size} does not divide the {linear.in_features // tp_size} "
                       f"inputs a TP rank holds of {name}.weight under --tp {tp_size}: quantize "
                       "with a group size that divides it, or use another --tp")
    for store in (linear._parameters, linear._buffers):
        for key, tensor in list(store.items()):
            if tensor is None:
                continue
            piece = shard_of(f"{name}.{key}", tensor, tp_rank, tp_size)
            # a copy: the shard must not keep the whole tensor's storage alive
            piece = piece if piece.device.type == "meta" else piece.contiguous().clone()
            store[key] = nn.Parameter(piece, requires_grad=False) \
                if isinstance(tensor, nn.Parameter) else piece
    if name.split(".")[-1] in COLUMN_PARALLEL:
        linear.out_features //= tp_size
    else:
        linear.in_features //= tp_size

"""Per-stage memory of pipelined tuning, by arithmetic (nothing is run): the weights of a stage
(float, int8 or int4), what autograd keeps per micro-batch, and a LoRA's tensors and what their
gradients keep; and, from that and the memory free when a run starts, whether the loss keeps its
logits for backward (--loss_logits auto).

Used by `python -m llama.tools.plan` (what fits on given cards), split_model.py --stage_memory,
training's start-up and bench/memory_estimate.py; the formulas are explained in
docs/PERFORMANCE.md.
"""
from pathlib import Path

import torch

from llama.errors import BadInput
from llama.model.transformer import ModelArgs
from llama.model.partition import GIB, linear_parameters, stage_weight_bytes
from llama.model.quant import QuantizedLinear
from llama.model.tensor_shards import COLUMN_PARALLEL
from llama.parallel.loss import LOSS_CHUNK_TOKENS, LOSS_LOGITS
from llama.tuning.lora import TARGETS, linear_shape

# A LoRA's float32 parameter, its gradient, ScaledAdamW's float32 master, the master's gradient
# and AdamW's two moments (the parameter's gradient is freed when the master's is made).
LORA_STATE_BYTES_PER_PARAMETER = 4 * 5

def saved_bytes_per_token(args: ModelArgs, dtype_bytes: int, tp: int = 1) -> int:
    """Bytes autograd keeps per token per block when only the block's input needs a gradient
    (on one of tp tensor-parallel ranks: attention and SwiGLU keep only its heads and rows).

    Frozen weights mean no linear layer keeps its input (a quantized linear keeps nothing
    either: llama/model/quant.py). What stays: each RMSNorm's fp32 input and its 1/rms (two norms);
    SDPA's q, k, v and output (dtype) and log-sum-exp (fp32, per head); SwiGLU's three
    hidden-wide tensors (w1 x, silu(w1 x), w3 x).
    """
    kv_dim = args.n_kv_heads * args.head_dim
    norms = 2 * (4 * args.dim + 4)
    attention = (dtype_bytes * (2 * args.dim + 2 * kv_dim) + 4 * args.n_heads) // tp
    feed_forward = 3 * dtype_bytes * args.hidden_dim // tp
    return norms + attention + feed_forward


def lora_parameters(args: ModelArgs, n_layers: int, r: int, targets, tp: int = 1) -> int:
    """A and B of every targeted projection of n_layers layers: r * (in + out) each (on one of
    tp ranks: B's rows of a column-parallel projection cut, A's columns of a row-parallel one)."""
    total = 0
    for target in targets:
        out_features, in_features = linear_shape(args, TARGETS[target])
        column = TARGETS[target].split(".")[-1] in COLUMN_PARALLEL
        total += r * (in_features + out_features // tp if column else
                      in_features // tp + out_features)
    return n_layers * total


def lora_saved_bytes_per_token(args: ModelArgs, dtype_bytes: int, r: int, targets,
                               tp: int = 1) -> int:
    """What a LoRA adds to saved_bytes_per_token: each targeted projection's input, which its
    A's gradient needs (one normed hidden state serves q, k and v, another gate and up; down's
    input, the SwiGLU product, is kept only for it; wo's input is SDPA's output, kept anyway),
    and A x (r wide) for B's gradient."""
    kept = dtype_bytes * r * len(targets)
    if set(targets) & {"q", "k", "v"}:
        kept += dtype_bytes * args.dim
    if set(targets) & {"gate", "up"}:
        kept += dtype_bytes * args.dim
    if "down" in targets:
        kept += dtype_bytes * args.hidden_dim // tp
    return kept


def loss_bytes(args: ModelArgs, dtype_bytes: int, targets: int, in_flight: int,
               keep_logits: bool) -> int:
    """The loss's peak on the last stage (llama/parallel/loss.py): every target's hidden state
    (saved to run the head again), one chunk's logits with their float32 work (counted as the
    dtype logits and three float32 copies: an upper bound, the chunk writes its gradient into
    its logits), and with keep_logits the logits of every target of every micro-batch in
    flight, kept from forward to backward."""
    chunk = min(targets, LOSS_CHUNK_TOKENS)
    kept = in_flight * targets * args.vocab_size * dtype_bytes if keep_logits else 0
    return targets * dtype_bytes * args.dim + chunk * args.vocab_size * (dtype_bytes + 12) + kept


def dequantized_layer_bytes(args: ModelArgs, dtype_bytes: int, quantization, tp: int = 1) -> int:
    """The transient of a quantized stage without a fused kernel: the widest linear of one
    block dequantized (forward and input-gradient backward both do it one layer at a time)."""
    if not quantization:
        return 0
    return max(o * i for o, i in linear_parameters(args, tp)) * dtype_bytes


def all_reduce_bytes_per_token(args: ModelArgs, n_layers: int, dtype_bytes: int, tp: int,
                               backward: bool) -> float:
    """Bytes one TP rank sends per token through n_layers blocks: two all-reduces of dim values
    a block in the forward pass (two more in the backward), a ring all-reduce sending 2(tp-1)/tp
    of its message. Pipeline stages send dim values per token once per stage boundary."""
    per_pass = 2 * n_layers * args.dim * dtype_bytes * 2 * (tp - 1) / tp
    return per_pass * (2 if backward else 1)


def stage_estimates(args, plan, global_batch, micro_batch, seq_len, n_virtual_tokens,
                    dtype_bytes, schedule, target_fraction, quantization=None, lora=None,
                    tp: int = 1, keep_logits=False):
    """One dict per stage of `plan` [(layer_range, has_embeddings, has_head)]: weights, what one
    micro-batch keeps, how many are in flight, and the peak in each activation mode (bytes in
    *_gib fields divided by GIB), on each of the stage's tp tensor-parallel ranks. lora: the
    LoraSettings of a LoRA run (None: a soft prompt's few numbers, not counted). keep_logits:
    the loss keeps its logits for backward (else it recomputes them, a chunk at a time)."""
    n_stages = len(plan)
    n_micro = global_batch // micro_batch
    tokens = micro_batch * (seq_len + n_virtual_tokens)  # of one micro-batch
    targets = micro_batch * max(1, round(target_fraction * (seq_len - 1)))
    hidden = tokens * dtype_bytes * args.dim  # one (b, T, dim) activation
    per_layer = tokens * saved_bytes_per_token(args, dtype_bytes, tp)
    if lora is not None:
        per_layer += tokens * lora_saved_bytes_per_token(args, dtype_bytes, lora.r, lora.targets,
                                                         tp)
    ffn_grads = tokens * 3 * dtype_bytes * args.hidden_dim // tp  # SwiGLU's gradients
    dequantized = dequantized_layer_bytes(args, dtype_bytes, quantization, tp)
    rows = []
    for stage, ((first, last), has_embeddings, has_head) in enumerate(plan):
        n_layers = last - first
        weights = stage_weight_bytes(args, ((first, last), has_embeddings, has_head),
                                     dtype_bytes, quantization, tp)
        trainable = lora_parameters(args, n_layers, lora.r, lora.targets, tp) if lora else 0
        state = trainable * LORA_STATE_BYTES_PER_PARAMETER  # held from the first step on
        in_flight = n_micro if schedule == "gpipe" else min(n_stages - stage, n_micro)
        # kept until the micro-batch's backward; + one hidden: the stage's output (or input)
        kept = {"plain": n_layers * per_layer + hidden,
                "recompute": (n_layers + 1) * hidden,
                # the block inputs wait in pinned CPU memory instead; the stage's input and (but
                # on the last stage) its output stay on the device (Stage.in_flight)
                "offload": hidden * (1 if has_head else 2)}
        # the transient of one micro-batch's backward through one block
        working = {"plain": ffn_grads, "recompute": per_layer + ffn_grads,
                   "offload": per_layer + ffn_grads}
        loss = loss_bytes(args, dtype_bytes, targets, in_flight, keep_logits) if has_head else 0
        row = {"n_stages": n_stages, "stage": stage, "tp": tp,
               "all_reduce_bytes_per_token": all_reduce_bytes_per_token(
                   args, n_layers, dtype_bytes, tp, backward=True),
               "layers": [first, last], "micro_batch": micro_batch, "n_micro": n_micro,
               "in_flight": in_flight, "weights_gib": weights / GIB, "trainable": trainable,
               "trainable_state_gib": state / GIB,
               "cpu_pinned_offload_gib": in_flight * n_layers * hidden / GIB}
        for mode in ("plain", "recompute", "offload"):
            row[f"kept_{mode}_gib"] = kept[mode] / GIB
            row[f"peak_{mode}_gib"] = (weights + state + in_flight * kept[mode] + working[mode] + loss
                                       + dequantized) / GIB
        rows.append(row)
    return rows


# --loss_logits auto keeps the logits when the stage's estimated peak beyond its weights is at
# most this share of the memory free at start-up: the rest is for what the arithmetic leaves
# out (allocator fragmentation, a CUDA context that grows, other work on a shared machine).
KEEP_LOGITS_SHARE = 0.8


def free_memory_bytes(device):
    """What this process could still allocate: the GPU's free memory, or the CPU's available
    memory as Linux reports it (None where it does not)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # reported in KiB
    except OSError:
        pass
    return None


def choose_loss_logits(requested: str, model, device, global_batch: int, micro_batch: int,
                       seq_len: int, hidden_virtual: int, schedule: str, mode: str, lora=None):
    """(keep the logits?, the start-up line saying which and why) for the last stage `model`.

    requested: keep, recompute, or auto: keep when the stage's estimated peak (stage_estimates
    with the logits kept, every position a target, activation mode `mode`: plain, recompute or
    offload) beyond its weights, which are resident already, is at most KEEP_LOGITS_SHARE of
    free_memory_bytes; recompute when that is unknown."""
    if requested not in LOSS_LOGITS:
        raise BadInput(f"--loss_logits {requested!r} must be one of {', '.join(LOSS_LOGITS)}")
    layer = next((m for m in model.modules() if isinstance(m, QuantizedLinear)), None)
    quantization = {"scheme": layer.scheme, "group_size": layer.group_size} if layer else None
    dtype_bytes = model.norm.weight.element_size()
    row = stage_estimates(model.args, [(model.layer_range, model.has_embeddings, True)],
                          global_batch, micro_batch, seq_len, hidden_virtual, dtype_bytes,
                          schedule, 1.0, quantization, lora, keep_logits=True)[0]
    needed = (row[f"peak_{mode}_gib"] - row["weights_gib"]) * GIB
    free = free_memory_bytes(device) if requested == "auto" else None
    keep = requested == "keep" or (free is not None and needed <= KEEP_LOGITS_SHARE * free)
    if requested != "auto":
        why = f"--loss_logits {requested}"
    elif free is None:
        why = "auto: the free memory is unknown here"
    else:
        why = (f"auto: this stage's estimated peak with them kept is {needed / GIB:.2f} GiB beyond "
               f"its weights, {'within' if keep else 'over'} {KEEP_LOGITS_SHARE:.0%} of the "
               f"{free / GIB:.2f} GiB free")
    if keep:
        what, other = "kept for backward", "--loss_logits recompute needs less memory"
    else:
        what = f"recomputed in backward, {LOSS_CHUNK_TOKENS} target positions at a time"
        other = "--loss_logits keep is faster"
    return keep, f"loss: the head's logits are {what} ({why}; {other})"

"""Per-stage memory of pipelined tuning, by arithmetic (nothing is run): the weights of a stage
(float, int8 or int4), what autograd keeps per micro-batch, and a LoRA's tensors and what their
gradients keep.

Used by `python -m llama.tools.plan` (what fits on given cards), split_model.py --stage_memory and
bench/memory_estimate.py; the formulas are explained in docs/PERFORMANCE.md.
"""
from llama.model.transformer import ModelArgs
from llama.model.partition import GIB, linear_parameters, stage_weight_bytes
from llama.parallel.pipeline import LOSS_CHUNK_TOKENS
from llama.model.tensor_shards import COLUMN_PARALLEL
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


def head_bytes_per_target(args: ModelArgs, dtype_bytes: int) -> int:
    """The loss's peak per target position of one chunk: dtype logits, fp32 logits, fp32
    log-probabilities (saved) and their fp32 gradient."""
    return args.vocab_size * (dtype_bytes + 4 + 4 + 4)


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
                    tp: int = 1):
    """One dict per stage of `plan` [(layer_range, has_embeddings, has_head)]: weights, what one
    micro-batch keeps, how many are in flight, and the peak in each activation mode (bytes in
    *_gib fields divided by GIB), on each of the stage's tp tensor-parallel ranks. lora: the
    LoraSettings of a LoRA run (None: a soft prompt's few numbers, not counted)."""
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
                "offload": hidden}  # the layer inputs wait in pinned CPU memory instead
        # the transient of one micro-batch's backward through one block
        working = {"plain": ffn_grads, "recompute": per_layer + ffn_grads,
                   "offload": per_layer + ffn_grads}
        # The loss runs in chunks (llama/parallel/pipeline.py): one chunk's logits at a time, plus the
        # picked hidden states of every target position, saved to recompute each chunk.
        loss = (min(targets, LOSS_CHUNK_TOKENS) * head_bytes_per_target(args, dtype_bytes)
                + targets * dtype_bytes * args.dim) if has_head else 0
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

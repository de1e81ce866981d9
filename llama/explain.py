"""Print the numbers behind the docs for a model shape: who owns what, what crosses the wire.

    python -m llama.explain --shape 7B --n_stages 4 --micro_batch_size 4 --seq_len 512
    python -m llama.explain --ckpt_dir ckpts/stories260K --n_stages 2
Arithmetic from the shape alone (no weights are read unless --ckpt_dir is given, for the
embedding scale).
"""
from llama.checkpoint import open_source, stage_plan
from llama.errors import BadInput, run_cli
from llama.model import ModelArgs
from llama.partition import parameter_costs
from llama.trace import ideal_bubble_fraction

SHAPES = {"7B": ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000),
          "13B": ModelArgs(dim=5120, n_layers=40, n_heads=40, vocab_size=32000)}
BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


def gib(n_bytes) -> str:
    if n_bytes >= 2**28:
        return f"{n_bytes / 2**30:.2f} GiB"
    return f"{n_bytes / 2**20:.2f} MiB" if n_bytes >= 2**18 else f"{n_bytes / 2**10:.1f} KiB"


def stage_table(args: ModelArgs, n_stages: int, weight_bytes: int):
    layer, embeddings, head = parameter_costs(args)
    rows = []
    for index, ((first, last), has_embeddings, has_head) in enumerate(stage_plan(args, n_stages)):
        params = (last - first) * layer + has_embeddings * embeddings + has_head * head
        parts = f"layers {first}..{last - 1}" + (" + embeddings" if has_embeddings else "") + \
            (" + norm/output" if has_head else "")
        rows.append(f"  stage {index}: {parts:<40} {params / 1e6:8.1f} M parameters, "
                    f"{gib(params * weight_bytes)}")
    return rows


def main(shape: str = "7B", ckpt_dir: str = None, n_stages: int = 4, micro_batch_size: int = 4,
         seq_len: int = 512, n_virtual_tokens: int = 32, global_batch_size: int = 32,
         dtype: str = "float16"):
    """Print who owns what and what crosses the wire for a model shape split into stages.

    Arithmetic from the shape alone: no weights are read.

    shape: a known shape, 7B or 13B (ignored when --ckpt_dir is given)
    ckpt_dir: a checkpoint whose params.json gives the shape instead
    n_stages: how many pipeline stages
    micro_batch_size: examples per micro-batch
    seq_len: text tokens per example
    n_virtual_tokens: length of the soft prompt
    global_batch_size: examples per optimizer step
    dtype: float16, bfloat16 or float32: the width of weights and activations
    """
    if dtype not in BYTES:
        raise BadInput(f"--dtype {dtype!r} must be one of {', '.join(BYTES)}")
    source = open_source(ckpt_dir) if ckpt_dir else None
    if source is None and shape not in SHAPES:
        raise BadInput(f"--shape {shape!r} must be one of {', '.join(SHAPES)} (or pass --ckpt_dir)")
    args = source.args if source else SHAPES[shape]
    width = BYTES[dtype]
    n_micro = global_batch_size // micro_batch_size
    print(f"model: dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads "
          f"({args.n_kv_heads} kv), ffn {args.hidden_dim}, vocab {args.vocab_size}; "
          f"weights in {dtype}")
    print(f"{n_stages} stages (balanced by parameters, embeddings and head counted):")
    print("\n".join(stage_table(args, n_stages, width)))
    length = n_virtual_tokens + seq_len
    hidden = micro_batch_size * length * args.dim * width
    print(f"per micro-batch of {micro_batch_size} x ({n_virtual_tokens} virtual + {seq_len}) tokens:")
    print(f"  forward sends h of shape ({micro_batch_size}, {length}, {args.dim}) = {gib(hidden)} "
          f"to the next stage; backward sends dL/dh of the same shape and size back")
    print(f"  per step ({n_micro} micro-batches) each boundary carries {gib(2 * n_micro * hidden)}")
    print(f"bubble (p-1)/(m+p-1) with p={n_stages}, m={n_micro}: "
          f"{ideal_bubble_fraction(n_stages, n_micro):.1%} (GPipe and 1F1B alike)")
    print(f"soft prompt: {n_virtual_tokens} x {args.dim} = {n_virtual_tokens * args.dim:,} fp32 "
          f"numbers ({gib(n_virtual_tokens * args.dim * 4)}); AdamW adds twice that")
    if source is not None:
        embeddings = source.load("tok_embeddings.weight").float()
        print(f"embedding table: std {embeddings.std():.4f}, mean row norm "
              f"{embeddings.norm(dim=1).mean():.3f}; an N(0,1) row has norm "
              f"{args.dim ** 0.5:.1f}, {args.dim ** 0.5 / float(embeddings.norm(dim=1).mean()):.0f}x larger")


if __name__ == "__main__":
    run_cli(main)

"""Print the numbers behind the docs for a model: who owns what, what crosses the wire.

    python -m llama.tools.explain --shape 7B --n_stages 4 --micro_batch_size 4 --seq_len 512
    python -m llama.tools.explain --ckpt_dir ckpts/stories260K --n_stages 2
    python -m llama.tools.explain --ckpt_dir ckpts/stories260K_pp2      # a split folder: its own stages
Arithmetic from the shape; a checkpoint adds its real precision and embedding statistics, a split
folder its stages and file sizes from split.json.
"""
from llama.formats.checkpoint import (is_split_dir, load_stage_tensors, open_source, read_split,
                              stage_plan)
from llama.cli import run_cli
from llama.errors import BadInput
from llama.model.named_shapes import NAMED_SHAPES
from llama.model.transformer import ModelArgs
from llama.model.partition import describe_stage, parameter_costs
from llama.parallel.trace import ideal_bubble_fraction

SHAPES = {name: ModelArgs(**params) for name, params in NAMED_SHAPES.items()}
BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
SHAPE_DTYPE = "float16"  # Meta's published LLaMA weights


def gib(n_bytes) -> str:
    if n_bytes >= 2**28:
        return f"{n_bytes / 2**30:.2f} GiB"
    return f"{n_bytes / 2**20:.2f} MiB" if n_bytes >= 2**18 else f"{n_bytes / 2**10:.1f} KiB"


def count(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 10**6 else f"{n:,}"


def stage_parameters(args: ModelArgs, layers, embeddings: bool, head: bool) -> int:
    layer, embedding_table, head_size = parameter_costs(args)
    return (layers[1] - layers[0]) * layer + embeddings * embedding_table + head * head_size


def computed_rows(args: ModelArgs, plan, width: int):
    rows = []
    for layers, embeddings, head in plan:
        params = stage_parameters(args, layers, embeddings, head)
        rows.append({"layers": list(layers), "embeddings": embeddings, "head": head,
                     "parameters": params, "bytes": params * width})
    return rows


def split_rows(split_dir, n_stages, dtype):
    """(args, dtype, rows) of a split folder: its own stages, and split.json's file sizes unless
    another dtype is asked for."""
    args, manifest = read_split(split_dir)
    stages = manifest["stages"]
    if n_stages is not None and n_stages != len(stages):
        raise BadInput(f"{split_dir} is split into {len(stages)} stages, not --n_stages "
                       f"{n_stages}: drop --n_stages, or explain the unsplit checkpoint")
    stored = manifest.get("dtype")
    plan = [(stage["layers"], stage["embeddings"], stage["head"]) for stage in stages]
    if dtype not in (None, stored):
        return args, dtype, computed_rows(args, plan, BYTES[dtype])
    if stored not in BYTES:
        raise BadInput(f"{split_dir / 'split.json'} records dtype {stored!r}, not one of "
                       f"{', '.join(BYTES)}: split the model again")
    rows = computed_rows(args, plan, BYTES[stored])
    for row, stage in zip(rows, stages):
        row.update(bytes=stage["bytes"], file=stage.get("file") or ", ".join(  # a TP split's
            f["file"] for f in stage["files"]))
    return args, stored, rows


def stage_rows(ckpt_dir, n_stages, dtype, shape: str = "7B"):
    """(ModelArgs, dtype name, one dict per stage: layers, embeddings, head, parameters, bytes).

    dtype None means the checkpoint's own precision (float16 for a --shape without weights).
    """
    if dtype is not None and dtype not in BYTES:
        raise BadInput(f"--dtype {dtype!r} must be one of {', '.join(BYTES)}")
    if ckpt_dir is not None and is_split_dir(ckpt_dir):
        return split_rows(ckpt_dir, n_stages, dtype)
    n_stages = 4 if n_stages is None else n_stages
    if ckpt_dir is None:
        if shape not in SHAPES:
            raise BadInput(f"--shape {shape!r} must be one of {', '.join(SHAPES)} (or pass --ckpt_dir)")
        args, own_dtype = SHAPES[shape], SHAPE_DTYPE
    else:
        source = open_source(ckpt_dir)
        args = source.args
        own_dtype = str(source.load("tok_embeddings.weight").dtype).replace("torch.", "")
    dtype = dtype or own_dtype
    if dtype not in BYTES:
        raise BadInput(f"{ckpt_dir} holds {dtype} weights: pass --dtype with one of {', '.join(BYTES)}")
    return args, dtype, computed_rows(args, stage_plan(args, n_stages), BYTES[dtype])


def stage_lines(rows):
    lines = []
    for index, row in enumerate(rows):
        name = describe_stage(row["layers"], row["embeddings"], row["head"])
        where = f" in {row['file']}" if "file" in row else ""
        lines.append(f"  stage {index}: {name:<34} {count(row['parameters']):>8} parameters, "
                     f"{gib(row['bytes'])}{where}")
    return lines


def embedding_table(ckpt_dir):
    if is_split_dir(ckpt_dir):
        _, manifest = read_split(ckpt_dir)
        return load_stage_tensors(ckpt_dir, manifest, 0, verify=False)["tok_embeddings.weight"]
    return open_source(ckpt_dir).load("tok_embeddings.weight")


def main(shape: str = "7B", ckpt_dir: str = None, n_stages: int = None, micro_batch_size: int = 4,
         seq_len: int = 512, n_virtual_tokens: int = 32, global_batch_size: int = 32,
         dtype: str = None):
    """Print who owns what and what crosses the wire for a model split into stages.

    Stage sizes, bytes sent per micro-batch, the bubble and the soft prompt's size: arithmetic
    from the shape (and a split folder's split.json); no weights are read but one table.

    shape: a named shape (7B, 13B, Llama-3.2-1B, Qwen2.5-0.5B, Mistral-7B and the others in llama/model/named_shapes.py), used when no --ckpt_dir is given
    ckpt_dir: a checkpoint (Meta, Hugging Face, llama2.c .bin) or a split folder (its stages)
    n_stages: how many pipeline stages (default: the split folder's own, else 4)
    micro_batch_size: examples per micro-batch
    seq_len: text tokens per example
    n_virtual_tokens: length of the soft prompt
    global_batch_size: examples per optimizer step
    dtype: float16, bfloat16 or float32: the width of weights and activations (default: the
        checkpoint's own; float16 for a --shape)
    """
    args, dtype, rows = stage_rows(ckpt_dir, n_stages, dtype, shape)
    n_stages, width = len(rows), BYTES[dtype]
    n_micro = global_batch_size // micro_batch_size
    print(f"model: dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads "
          f"({args.n_kv_heads} kv), ffn {args.hidden_dim}, vocab {args.vocab_size}; "
          f"weights in {dtype}")
    origin = "as in split.json" if ckpt_dir is not None and is_split_dir(ckpt_dir) else \
        "balanced by parameters"
    print(f"{n_stages} stages ({origin}; [a, b) is layers a to b-1, head is norm + output):")
    print("\n".join(stage_lines(rows)))
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
    if ckpt_dir is not None:
        embeddings = embedding_table(ckpt_dir).float()
        print(f"embedding table: std {embeddings.std():.4f}, mean row norm "
              f"{embeddings.norm(dim=1).mean():.3f}; an N(0,1) row has norm "
              f"{args.dim ** 0.5:.1f}, {args.dim ** 0.5 / float(embeddings.norm(dim=1).mean()):.0f}x larger")


if __name__ == "__main__":
    run_cli(main)

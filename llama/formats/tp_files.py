"""Tensor-parallel shards on disk: a split folder's per-(stage, TP rank) files, and Meta's
consolidated.0R.pth read as TP rank R as it lies.

A split made with split_model.py --tp N stores stage s as N files stage.SS.tpR.pth, each holding
TP rank R's shard (llama/model/tensor_shards.py) of the stage's tensors under their global names;
split.json's stage entry lists them ("files": [{"file", "bytes", "sha256"}, ...] in rank order)
with "tp": N at the top. Whatever TP a run asks for, the stage's tensors are the files' own
shards when the counts match, else joined and cut again (so one process runs a TP split too).
"""
from pathlib import Path

from llama.errors import BadInput
from llama.formats.files import atomic_torch_save, sha256_of
from llama.formats.layouts import MetaSource
from llama.model.tensor_shards import join_shards, shard_dim, shard_of

# The manifest format of a TP split: a reader from before TP refuses it at once, and this
# reader also reads what format 2 (quantized) adds.
TP_SPLIT_FORMAT = 3


def tp_file_name(stage_index: int, tp_rank: int) -> str:
    return f"stage.{stage_index:02d}.tp{tp_rank}.pth"


def write_tp_shards(tensors: dict, folder: Path, stage_index: int, tp_size: int) -> list:
    """Write one file per TP rank of a stage's whole tensors; their split.json entries."""
    entries = []
    for tp_rank in range(tp_size):
        name = tp_file_name(stage_index, tp_rank)
        # each shard cloned: a file must not carry the whole tensor it was cut from
        atomic_torch_save({key: shard_of(key, t, tp_rank, tp_size).contiguous().clone()
                           for key, t in tensors.items()}, folder / name)
        entries.append({"file": name, "bytes": (folder / name).stat().st_size,
                        "sha256": sha256_of(folder / name)})
    return entries


def stage_files(split_dir: Path, manifest: dict, index: int) -> list:
    """The split.json entries of stage `index`'s files, in TP rank order (one without TP)."""
    stage = manifest["stages"][index]
    return stage["files"] if manifest.get("tp", 1) > 1 else [stage]


def check_tp_manifest(split_dir: Path, manifest: dict):
    """A TP split says format 3, a TP size, and N files per stage."""
    tp = manifest.get("tp", 1)
    if tp == 1 and manifest["format"] != TP_SPLIT_FORMAT:
        return
    if manifest["format"] != TP_SPLIT_FORMAT or isinstance(tp, bool) or not isinstance(tp, int) \
            or tp < 2:
        raise BadInput(f"{split_dir / 'split.json'} records tp {tp!r} in format "
                       f"{manifest['format']}: split the model again")
    for i, stage in enumerate(manifest["stages"]):
        files = stage.get("files") if isinstance(stage, dict) else None
        if not isinstance(files, list) or len(files) != tp or \
                not all(isinstance(f, dict) for f in files):
            raise BadInput(f"{split_dir / 'split.json'}: stage {i} lists {files!r}, not one file "
                           f"per TP rank of {tp}: split the model again")


def stage_shard_tensors(load_entry, split_tp: int, tp_rank: int, tp_size: int) -> dict:
    """One stage's tensors as TP rank tp_rank of tp_size holds them, from its split_tp files
    (load_entry(r) reads file r): the file itself when the counts match, else the files joined
    and cut again."""
    if split_tp == tp_size:
        return load_entry(tp_rank)
    parts = [load_entry(r) for r in range(split_tp)]
    whole = {key: join_shards(key, [p[key] for p in parts]) for key in parts[0]}
    return {key: shard_of(key, t, tp_rank, tp_size) for key, t in whole.items()}


def tp_fetch(source, fetch, tp_rank: int, tp_size: int, quantizing: bool):
    """fetch(name) -> this TP rank's shard of the tensor. Meta's N shards, read as N TP ranks,
    give each block tensor from consolidated.0R.pth alone (its cut is the same as ours); the
    replicated ones (norms, embeddings, head) come whole. Meta cuts the block tensors as
    llama/model/tensor_shards.py does (layouts.META_SHARD_DIM: wq/wk/wv/w1/w3 by rows, wo/w2 by
    columns), so shard R is TP rank R's as it lies. Quantizing while loading needs the
    whole weight first (an int8 row's scale spans every shard), so it cuts after fetch."""
    if tp_size == 1:
        return fetch
    if isinstance(source, MetaSource) and len(source.shards) == tp_size and not quantizing:
        def from_own_shard(name):
            if shard_dim(name, source.shards[0][name].dim()) is not None:
                return source.shards[tp_rank][name]
            return source.load(name)  # joined across the shards, or repeated in each
        return from_own_shard
    return lambda name: shard_of(name, fetch(name), tp_rank, tp_size)

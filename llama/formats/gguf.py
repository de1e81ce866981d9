"""GGUF, the one file llama.cpp runs on any CPU: a header, typed key-value metadata (the llama
architecture and its sentencepiece tokenizer), tensor descriptors, then the tensors' bytes,
each aligned. Written here without the gguf package; llama.formats.convert calls it:

    python -m llama.formats.convert --src ckpts/stories260K --dst stories260K.gguf --to gguf [--gguf_type q8_0]

The conventions are llama.cpp's (gguf-py's constants, convert_hf_to_gguf.py): tensor names
token_embd / blk.N.attn_q … / output_norm / output; q/k rows in Meta's interleaved-pair order,
which is what llama.cpp's converter restores from Hugging Face's rotate-half order; norms
and other 1-D tensors in f32 whatever the file type; q8_0 blocks of 32 int8 and one fp16 scale.
"""
import math
import os
import re
import struct
from pathlib import Path

import torch

from llama.errors import BadInput
from llama.model.hf_tokenizer import is_hf_tokenizer
from llama.formats.files import atomic_write, process_is_alive
from llama.model.tokenizer import Tokenizer

MAGIC = b"GGUF"
VERSION = 3
ALIGNMENT = 32  # GGUF's default, so general.alignment is left out
QUANTIZATION_VERSION = 2  # ggml's GGML_QNT_VERSION, which llama.cpp's converter records

# Metadata value types (GGUF spec) and the struct format of the scalar ones.
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = \
    range(13)
SCALAR_FORMATS = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i",
                  FLOAT32: "<f", BOOL: "<?", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}

# ggml's tensor type ids, and for each --gguf_type the type of matrices and llama.cpp's
# general.file_type (LLAMA_FTYPE_ALL_F32, MOSTLY_F16, MOSTLY_Q8_0).
F32, F16, Q8_0 = 0, 1, 8
GGUF_TYPES = {"f32": (F32, 0), "f16": (F16, 1), "q8_0": (Q8_0, 7)}
TYPE_NAMES = {F32: "f32", F16: "f16", Q8_0: "q8_0"}
Q8_BLOCK = 32  # weights per q8_0 block; stored as one fp16 scale + 32 int8 = 34 bytes

# sentencepiece piece kinds as llama.cpp's vocabulary reads them (tokenizer.ggml.token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = range(1, 7)

# The key that says this project wrote the file: --overwrite replaces nothing without it.
WRITTEN_BY = "llama_pp_prompt.written_by"
WRITER = "llama.formats.convert"

LAYER_NAMES = {"attention_norm": "attn_norm", "attention.wq": "attn_q", "attention.wk": "attn_k",
               "attention.wv": "attn_v", "attention.wo": "attn_output", "ffn_norm": "ffn_norm",
               "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
               "feed_forward.w3": "ffn_up"}
TOP_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "output.weight": "output.weight"}


def gguf_name(meta_name: str) -> str:
    """'layers.3.attention.wq.weight' -> 'blk.3.attn_q.weight' (llama.cpp's names)."""
    if meta_name in TOP_NAMES:
        return TOP_NAMES[meta_name]
    _, index, inner = meta_name.split(".", 2)
    return f"blk.{index}.{LAYER_NAMES[inner.removesuffix('.weight')]}.weight"


# ---- what goes in: tensors and their types ----

def tensor_type(tensor, gguf_type: str) -> int:
    """1-D tensors (the norms) stay f32, as llama.cpp's converter keeps them; a matrix whose
    rows are not whole q8_0 blocks falls back to f16, as its converter does too."""
    matrix_type = GGUF_TYPES[gguf_type][0]
    if tensor.dim() < 2:
        return F32
    if matrix_type == Q8_0 and tensor.shape[-1] % Q8_BLOCK:
        return F16
    return matrix_type


def tensor_plan(tensors: dict, gguf_type: str) -> list:
    """[(gguf name, tensor, ggml type)] in llama.cpp's order. A classifier equal to the
    embedding (tied, as in stories260K) is left out: llama.cpp then uses token_embd for it."""
    order = ["tok_embeddings.weight"] + sorted(
        (n for n in tensors if n.startswith("layers.")),
        key=lambda n: (int(n.split(".")[1]),
                       list(LAYER_NAMES).index(n.split(".", 2)[2].removesuffix(".weight"))))
    order += ["norm.weight", "output.weight"]
    if torch.equal(tensors["output.weight"], tensors["tok_embeddings.weight"]):
        order.remove("output.weight")
    return [(gguf_name(n), tensors[n], tensor_type(tensors[n], gguf_type)) for n in order]


def data_size(shape, ggml_type: int) -> int:
    count = math.prod(shape)
    return {F32: 4 * count, F16: 2 * count, Q8_0: count // Q8_BLOCK * (2 + Q8_BLOCK)}[ggml_type]


def quantize_q8_0(tensor) -> torch.Tensor:
    """(blocks, 34) uint8: per 32 weights the fp16 scale amax/127, then round(w / scale) as
    int8, rounding halves away from zero as ggml's roundf does (torch.round goes to even)."""
    blocks = tensor.float().reshape(-1, Q8_BLOCK)
    scales = blocks.abs().amax(dim=1, keepdim=True) / 127
    inverse = torch.where(scales == 0, torch.zeros_like(scales), 1 / scales)
    scaled = blocks * inverse
    codes = (scaled.sign() * (scaled.abs() + 0.5).floor()).to(torch.int8)
    return torch.cat([scales.half().view(torch.uint8), codes.view(torch.uint8)], dim=1)


def tensor_bytes(name: str, tensor, ggml_type: int) -> bytes:
    if ggml_type == Q8_0:
        data = quantize_q8_0(tensor)
    else:
        data = tensor.float() if ggml_type == F32 else tensor.to(torch.float16)
        if not torch.isfinite(data).all() and torch.isfinite(tensor).all():
            raise BadInput(f"{name} holds values beyond float16's range (±65504): export it with "
                           "--gguf_type f32")
    return data.contiguous().view(torch.uint8).numpy().tobytes()


# ---- metadata ----

def model_metadata(args, gguf_type: str, name: str) -> list:
    """[(key, value type, value)] of the llama architecture, under llama.cpp's key names."""
    # No llama.rope.scaling.*: check_describable refuses models with rope scaling, so
    # llama.cpp computes the same unscaled rotary as this project.
    return [("general.architecture", STRING, "llama"), ("general.name", STRING, name),
            ("general.file_type", UINT32, GGUF_TYPES[gguf_type][1]),
            ("general.quantization_version", UINT32, QUANTIZATION_VERSION),
            ("llama.vocab_size", UINT32, args.vocab_size),
            ("llama.context_length", UINT32, args.max_seq_len),
            ("llama.embedding_length", UINT32, args.dim),
            ("llama.block_count", UINT32, args.n_layers),
            ("llama.feed_forward_length", UINT32, args.hidden_dim),
            ("llama.attention.head_count", UINT32, args.n_heads),
            ("llama.attention.head_count_kv", UINT32, args.n_kv_heads),
            ("llama.rope.freq_base", FLOAT32, args.rope_theta),
            ("llama.rope.dimension_count", UINT32, args.head_dim),
            ("llama.attention.layer_norm_rms_epsilon", FLOAT32, args.norm_eps)]


def tokenizer_metadata(tokenizer_path, vocab_size: int) -> list:
    """The sentencepiece vocabulary as llama.cpp's 'llama' tokenizer reads it: every piece, its
    score and kind, the special ids. Rows beyond the pieces (a padded embedding) get
    [PAD<i>] pieces as llama.cpp's converter writes them."""
    sp = Tokenizer(str(tokenizer_path)).sp
    if sp.vocab_size() > vocab_size:
        raise BadInput(f"tokenizer {tokenizer_path} has {sp.vocab_size()} pieces but the model "
                       f"has only {vocab_size} embedding rows, which GGUF cannot describe: pass "
                       "the tokenizer that matches the checkpoint (--tokenizer_path)")
    pieces, scores, kinds = [], [], []
    for i in range(sp.vocab_size()):
        pieces.append(sp.IdToPiece(i))
        scores.append(sp.GetScore(i))
        kinds.append(UNKNOWN if sp.IsUnknown(i) else CONTROL if sp.IsControl(i) else
                     UNUSED if sp.IsUnused(i) else BYTE if sp.IsByte(i) else NORMAL)
    for i in range(sp.vocab_size(), vocab_size):
        pieces.append(f"[PAD{i}]")
        scores.append(-10000.0)
        kinds.append(UNUSED)
    special = [(key, UINT32, value) for key, value in
               (("tokenizer.ggml.bos_token_id", sp.bos_id()),
                ("tokenizer.ggml.eos_token_id", sp.eos_id()),
                ("tokenizer.ggml.unknown_token_id", sp.unk_id()),
                ("tokenizer.ggml.padding_token_id", sp.pad_id())) if value >= 0]
    return [("tokenizer.ggml.model", STRING, "llama"), ("tokenizer.ggml.pre", STRING, "default"),
            ("tokenizer.ggml.tokens", ARRAY, (STRING, pieces)),
            ("tokenizer.ggml.scores", ARRAY, (FLOAT32, scores)),
            ("tokenizer.ggml.token_type", ARRAY, (INT32, kinds)), *special,
            ("tokenizer.ggml.add_bos_token", BOOL, True),
            ("tokenizer.ggml.add_eos_token", BOOL, False)]


def provenance_metadata(provenance: dict) -> list:
    """Our own keys (llama.cpp ignores keys it does not know): who wrote the file, from what."""
    return [(WRITTEN_BY, STRING, WRITER)] + [
        (f"llama_pp_prompt.{key}", STRING, str(value)) for key, value in provenance.items()]


# ---- the file ----

def packed_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def packed_value(value_type: int, value) -> bytes:
    if value_type == STRING:
        return packed_string(value)
    if value_type == ARRAY:
        item_type, items = value
        return struct.pack("<IQ", item_type, len(items)) + b"".join(
            packed_value(item_type, item) for item in items)
    return struct.pack(SCALAR_FORMATS[value_type], value)


def padding(size: int) -> bytes:
    return bytes(-size % ALIGNMENT)


def header_bytes(metadata: list, plan: list) -> bytes:
    """Magic, version, counts, key-values, tensor descriptors, padded so the data starts aligned.
    Dimensions are ggml's order, fastest first: a (rows, cols) matrix is [cols, rows]."""
    parts = [MAGIC, struct.pack("<IQQ", VERSION, len(plan), len(metadata))]
    for key, value_type, value in metadata:
        parts += [packed_string(key), struct.pack("<I", value_type), packed_value(value_type, value)]
    offset = 0
    for name, tensor, ggml_type in plan:
        shape = list(reversed(tensor.shape))
        parts += [packed_string(name), struct.pack(f"<I{len(shape)}QIQ", len(shape), *shape,
                                                   ggml_type, offset)]
        size = data_size(shape, ggml_type)
        offset += size + len(padding(size))
    header = b"".join(parts)
    return header + padding(len(header))


def check_describable(args, tokenizer_path):
    """What this writer does not describe yet (llama.cpp's own converter does for some) is
    refused by name: rope scaling (Llama 3.1/3.2), q/k/v biases (Qwen2), a sliding window
    (Mistral) and Hugging Face tokenizer.json files (byte-level BPE)."""
    unsupported = [what for what, present in (
        (f"rope scaling {(args.rope_scaling or {}).get('rope_type')!r}", args.rope_scaling),
        ("q/k/v biases", args.qkv_bias), (f"a sliding window of {args.sliding_window}",
                                          args.sliding_window),
        (f"the tokenizer {tokenizer_path} (tokenizer.json)",
         tokenizer_path and is_hf_tokenizer(tokenizer_path))) if present]
    if unsupported:
        raise BadInput(f"--to gguf writes the LLaMA 1/2 architecture with a sentencepiece "
                       f"tokenizer; this model has {', '.join(unsupported)}, which it does not "
                       "describe yet: export --to hf and use llama.cpp's own converter")


def write_gguf(path, args, tensors: dict, tokenizer_path, gguf_type: str, provenance: dict):
    """Write the model as one GGUF file, atomically (a temp file beside it, then a rename);
    tensors are converted one at a time as they are written. Returns the tensor plan."""
    check_describable(args, tokenizer_path)
    plan = tensor_plan(tensors, gguf_type)
    metadata = (model_metadata(args, gguf_type, Path(path).stem) +
                tokenizer_metadata(tokenizer_path, args.vocab_size) +
                provenance_metadata(provenance))
    header = header_bytes(metadata, plan)

    def write(file):
        file.write(header)
        for name, tensor, ggml_type in plan:
            data = tensor_bytes(name, tensor, ggml_type)
            if len(data) != data_size(tensor.shape, ggml_type):
                raise RuntimeError(f"{name}: {len(data)} bytes written for its descriptor's "
                                   f"{data_size(tensor.shape, ggml_type)}")
            file.write(data + padding(len(data)))

    atomic_write(path, write)
    return plan


# ---- reading back what --overwrite may replace ----

class MetadataReader:
    """Reads a GGUF file's header and metadata from a file object, refusing (ValueError) any
    length beyond the file, so a damaged or foreign file cannot make it allocate much."""

    def __init__(self, file, size: int):
        self.file, self.size = file, size

    def take(self, count: int) -> bytes:
        if count > self.size:
            raise ValueError(f"a length of {count} bytes is beyond the file")
        raw = self.file.read(count)
        if len(raw) != count:
            raise ValueError("the file is truncated")
        return raw

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def value(self, value_type: int):
        if value_type == STRING:
            return self.take(self.unpack("<Q")).decode("utf-8")
        if value_type == ARRAY:
            item_type, count = self.unpack("<I"), self.unpack("<Q")
            if count > self.size:
                raise ValueError(f"an array of {count} items is beyond the file")
            return [self.value(item_type) for _ in range(count)]
        if value_type not in SCALAR_FORMATS:
            raise ValueError(f"unknown value type {value_type}")
        return self.unpack(SCALAR_FORMATS[value_type])


def read_metadata(path) -> dict:
    """{key: value} of a GGUF file's metadata; ValueError when it is not a GGUF file."""
    with open(path, "rb") as file:
        reader = MetadataReader(file, os.path.getsize(path))
        if reader.take(len(MAGIC)) != MAGIC:
            raise ValueError("no GGUF magic")
        reader.unpack("<I")  # version
        reader.unpack("<Q")  # tensor count
        metadata = {}
        for _ in range(reader.unpack("<Q")):
            key = reader.value(STRING)
            metadata[key] = reader.value(reader.unpack("<I"))
        return metadata


def written_here(path) -> bool:
    try:
        return read_metadata(path).get(WRITTEN_BY) == WRITER
    except (OSError, ValueError, struct.error, RecursionError):  # not GGUF, or damaged
        return False


def check_destination(dst, reads, overwrite: bool):
    """Refuse, in one line, to write --dst over anything but a GGUF file this project wrote
    (and that only with --overwrite), over a file the command reads, or where nothing can be
    written; checked before any work."""
    dst = Path(dst)
    for read in (Path(r) for r in reads if r):
        if read.resolve() == dst.resolve():
            raise BadInput(f"--dst {dst} is {read}, which this command reads: choose another --dst")
    if dst.is_dir():
        raise BadInput(f"--dst {dst} is a folder: --to gguf writes one file, so give its name "
                       f"(e.g. {dst / 'model.gguf'})")
    if dst.exists() or dst.is_symlink():
        if not written_here(dst):
            raise BadInput(f"{dst} already exists and is not a GGUF file that {WRITER} wrote "
                           f"(no {WRITTEN_BY} key), so it is never replaced: choose another --dst")
        if not overwrite:
            raise BadInput(f"{dst} already exists (a GGUF file {WRITER} wrote): pass --overwrite "
                           "to replace it, or choose another --dst")
    remove_stale_temp_file(dst)
    folder = dst.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise BadInput(f"--dst {dst} cannot be written: {folder} does not take new files; pick a "
                       "writable place for --dst")


def remove_stale_temp_file(dst: Path):
    """A killed export leaves atomic_write's temp file (as big as the model) beside dst: it is
    deleted once the process that wrote it is gone; a live run's file is its own."""
    ours = re.compile(rf"\.{re.escape(dst.name)}\.tmp-(\d+)")
    if not dst.parent.is_dir():
        return
    for path in dst.parent.iterdir():
        match = ours.fullmatch(path.name)
        if match and path.is_file() and not process_is_alive(int(match.group(1))):
            path.unlink(missing_ok=True)

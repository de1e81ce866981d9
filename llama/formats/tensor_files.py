"""Reading and writing tensors safely: torch.load limited to tensors (weights_only), JSON with
a clear error, and safetensors files (header checked against the file before any tensor is read).
"""
import json
import math
import os
import pickle
import re
import struct

import torch

from llama.errors import BadInput
from llama.formats.files import atomic_write


def safe_torch_load(path, mmap=True):
    """torch.load of plain tensors only: a pickle that needs code to unpickle is refused, and a
    damaged file is a BadInput whatever torch's reader trips over inside it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        code = re.search(r"GLOBAL ([\w.]+)", str(error))
        if code:  # a crafted file, or a damaged one whose flipped bytes spell another name
            raise BadInput(f"{path} needs code to unpickle and was refused (it calls "
                           f"{code.group(1)}; only tensors, numbers and strings are loaded): the "
                           "file is corrupt or was made to run code; re-save it as a plain state "
                           "dict from a trusted copy") from None
        raise BadInput(f"{path} is corrupt or truncated ({unpickling_detail(error)}); download "
                       "or split it again") from None
    except RuntimeError as error:
        if mmap and "mmap" in str(error):
            return safe_torch_load(path, mmap=False)  # the legacy (non-zip) torch.save format
        detail = str(error).splitlines()[0].split(". This is an internal")[0]  # not torch's advice
        raise BadInput(f"{path} is corrupt or truncated ({detail}); download or split it "
                       "again") from None
    except Exception as error:  # EOFError, ValueError, IndexError, ...: the bytes are damaged
        raise BadInput(f"{path} is corrupt or truncated ({type(error).__name__}: {error}); "
                       "download or split it again") from None


def state_dict_of_tensors(state, path):
    """state, refused unless it is a dict of named tensors (what a checkpoint file holds)."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise BadInput(f"{path} is not a state dict of tensors: download the checkpoint again")
    return state


def unpickling_detail(error) -> str:
    """The line of torch's weights-only message that says what was wrong, not its advice."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = [line for line in lines if line.startswith("WeightsUnpickler error:")]
    return (detail or lines or [type(error).__name__])[0]


def read_json(path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise BadInput(f"{path} is missing") from None
    except ValueError as error:  # also UnicodeDecodeError, and integers of thousands of digits
        raise BadInput(f"{path} is not valid JSON ({error}); restore it from the checkpoint") from None
    except RecursionError:
        raise BadInput(f"{path} is not valid JSON (nested too deeply); restore it from the "
                       "checkpoint") from None


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F64": torch.float64, "I64": torch.int64, "I32": torch.int32}


def read_safetensors_header(path):
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise BadInput(f"{path} is too short to be a safetensors file")
        (length,) = struct.unpack("<Q", raw)
        if length > 100_000_000 or length + 8 > os.path.getsize(path):
            raise BadInput(f"{path} has a corrupt safetensors header (length {length})")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise BadInput(f"{path} has a corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise BadInput(f"{path} has a corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_bytes = os.path.getsize(path) - 8 - length
    for name, entry in header.items():
        check_safetensor_entry(path, name, entry, data_bytes)
    return 8 + length, header


def check_safetensor_entry(path, name, entry, data_bytes: int):
    """Refuse a header entry whose dtype, shape or byte range cannot describe a tensor there."""
    def is_count(value):
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    fields = entry if isinstance(entry, dict) else {}
    dtype, shape, offsets = fields.get("dtype"), fields.get("shape"), fields.get("data_offsets")
    if not (isinstance(dtype, str) and isinstance(shape, list) and all(map(is_count, shape))
            and isinstance(offsets, list) and len(offsets) == 2 and all(map(is_count, offsets))
            and offsets[0] <= offsets[1] <= data_bytes):
        raise BadInput(f"{path} has a corrupt safetensors header: the entry of {name!r} is "
                       f"{str(entry)[:120]}; download the file again")
    if dtype not in SAFETENSORS_DTYPES:
        raise BadInput(f"{path}: tensor {name!r} has dtype {dtype}, which is not supported")
    itemsize = SAFETENSORS_DTYPES[dtype].itemsize
    if math.prod(shape) * itemsize != offsets[1] - offsets[0]:
        raise BadInput(f"{path} has a corrupt safetensors header: {name!r} of shape {shape} "
                       f"({dtype}) cannot fill bytes {offsets[0]}..{offsets[1]}; download the "
                       "file again")


def read_safetensor(path, data_start: int, entry: dict):
    """One tensor, its entry already checked by read_safetensors_header."""
    dtype = SAFETENSORS_DTYPES[entry["dtype"]]
    begin, end = entry["data_offsets"]
    with open(path, "rb") as f:
        f.seek(data_start + begin)
        raw = bytearray(f.read(end - begin))
    if len(raw) != end - begin:
        raise BadInput(f"{path} is truncated: download it again")
    return torch.frombuffer(raw, dtype=dtype).reshape(entry["shape"]) if raw else \
        torch.empty(entry["shape"], dtype=dtype)


def write_safetensors(path, tensors: dict, prepare=None):
    """Write {name: tensor} as one safetensors file, each tensor passed through
    prepare(name, tensor) (same shape and dtype) only as it is written, so no second copy of
    the model is ever joined in memory."""
    dtype_name = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    header, offset = {}, 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": dtype_name[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header).encode()

    def write(file):
        file.write(struct.pack("<Q", len(head)) + head)
        for name, tensor in tensors.items():
            tensor = prepare(name, tensor) if prepare else tensor
            if tensor.numel():
                file.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())

    atomic_write(path, write)

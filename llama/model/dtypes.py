"""The floating-point types a checkpoint or a run may be given by name (--dtype)."""
import torch

from llama.errors import BadInput

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def dtype_named(name: str) -> torch.dtype:
    """torch.float16 for "float16" or "fp16", ...; anything else is refused with the choices."""
    if name not in DTYPES:
        raise BadInput(f"--dtype {name!r} must be one of auto, float32, float16, bfloat16 "
                       "(or fp32, fp16, bf16)")
    return DTYPES[name]

"""--compile: torch.compile of each transformer block of a stage (off by default).

    apply_compile(model)   # after apply_recompute, if that is used

Each block is compiled in place (nn.Module.compile), so parameter names and state dicts do not
change. Blocks of one shape share one compiled graph. Under per-layer recomputation the block
inside the wrapper is compiled (the wrapper's autograd.Function stays eager); under selective
recomputation the whole checkpointed block is, so the compiler sees the save/recompute policy.
The first step pays the compile time (minutes for 7B on a GPU, a minute or more on a CPU).
"""
import shutil

from llama.prepare.offload import RecomputedBlock


def compiler_missing(backend: str = "inductor"):
    """None when torch.compile's backend can build kernels here, else why not (one line)."""
    try:
        import torch._dynamo  # noqa: F401  (part of torch, but not of every build)
    except ImportError as error:
        return f"torch.compile is not available in this torch build ({error})"
    if backend == "inductor" and not (shutil.which("cc") or shutil.which("gcc")
                                      or shutil.which("g++") or shutil.which("clang")):
        return "torch.compile's inductor backend needs a C/C++ compiler (cc, gcc or clang) on PATH"
    return None


def apply_compile(model, backend: str = "inductor"):
    """Compile every block of the stage in place; returns the model, like the other transforms."""
    for layer in model.layers.values():
        target = layer.block if isinstance(layer, RecomputedBlock) else layer
        target.compile(backend=backend)
    return model

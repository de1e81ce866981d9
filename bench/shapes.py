"""Model shapes for benchmarks, and stages of that shape with random frozen weights.

Speed does not depend on the weights' values, so a benchmark builds LLaMA-7B's or 13B's shape
(or any params.json) directly on the device, in the dtype it will run in, without a checkpoint.
"""
import zlib
from pathlib import Path

import torch

from llama.formats.checkpoint import stage_plan
from llama.errors import BadInput
from llama.formats.layouts import model_args_from_dict
from llama.formats.tensor_files import read_json
from llama.model.named_shapes import LLAMA3_ROPE_SCALING_32, NAMED_SHAPES
from llama.model.transformer import ModelArgs, Transformer
from llama.model.quant import apply_quantization

# The named shapes of llama/model/transformer.py (7B, 13B), and a tiny shape of the stories260K family for
# checking on a CPU that a benchmark still runs.
SHAPES = {
    "tiny": {"dim": 64, "n_layers": 4, "n_heads": 8, "n_kv_heads": 4, "vocab_size": 512,
             "multiple_of": 32},
    # issue 21's CPU decode shape: FFN 1536 (dim 512 rounded to a multiple of 256), vocab of 7B
    "small": {"dim": 512, "n_layers": 8, "n_heads": 8, "vocab_size": 32000, "multiple_of": 256},
    **NAMED_SHAPES,
}
# Tiny shapes with each family's features (GQA 4:1 and llama3 rope scaling; q/k/v biases; a
# sliding window shorter than the benchmark's sequence), for rehearsing the GPU check's family
# parts on a CPU.
SHAPES.update({
    "tiny-llama3": {**SHAPES["tiny"], "n_kv_heads": 2, "rope_theta": 500000.0,
                    "rope_scaling": {**LLAMA3_ROPE_SCALING_32, "original_max_position_embeddings": 32}},
    "tiny-qwen2": {**SHAPES["tiny"], "n_kv_heads": 2, "qkv_bias": True},
    "tiny-mistral": {**SHAPES["tiny"], "sliding_window": 16},
})

# Every matrix ~ N(0, 0.02): Hugging Face's initializer_range for LLaMA, the order of a trained
# model's weights. nn.Embedding's default N(0, 1) would make the soft prompt (initialised at the
# embeddings' own scale) and the residual stream ~50x too large, and fp16 overflow sooner.
INIT_STD = 0.02


def model_args(shape, max_seq_len: int = None) -> ModelArgs:
    """ModelArgs for a name in SHAPES, a params.json file, or a folder holding one."""
    overrides = {"max_seq_len": max_seq_len} if max_seq_len else {}
    if str(shape) in SHAPES:
        return ModelArgs(**{**SHAPES[str(shape)], **overrides})
    path = Path(str(shape))
    if path.is_dir():
        path = path / "params.json"
    if not path.is_file():
        raise BadInput(f"--shape {shape!r} is neither a named shape ({', '.join(SHAPES)}) nor a "
                       "params.json file or a folder holding one")
    return model_args_from_dict(read_json(path), str(path), **overrides)


def shape_name(shape) -> str:
    return str(shape) if str(shape) in SHAPES else str(Path(str(shape)))


@torch.no_grad()
def random_model(args: ModelArgs, layer_range=None, embeddings: bool = True, head: bool = True,
                 device="cpu", dtype=torch.float32, seed: int = 0) -> Transformer:
    """A Transformer for layer_range with random weights made on `device` in `dtype`, frozen.

    Built on the meta device and allocated once where it runs: a 7B stage never exists in
    float32 or on the CPU first. Each tensor's values depend only on (seed, its name, device), so
    the stages of any split together hold the same model as one process does.
    """
    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(args, layer_range, embeddings, head)
    model = model.to(dtype).to_empty(device=device)
    generator = torch.Generator(device=device)
    for name, param in model.named_parameters():
        if param.dim() == 1:  # RMSNorm gains
            param.fill_(1.0)
        else:
            generator.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            param.normal_(0.0, INIT_STD, generator=generator)
    return model.requires_grad_(False).eval()


def random_stage(args: ModelArgs, stage: int, n_stages: int, device="cpu", dtype=torch.float32,
                 seed: int = 0, quantize: str = None, group_size: int = None) -> Transformer:
    """Stage `stage` of `n_stages` as the runtime would split the model (balanced_ranges); with
    quantize, its block linears hold random int8/int4 codes (made where they run: a quantized 7B
    stage never exists in float)."""
    layer_range, embeddings, head = stage_plan(args, n_stages)[stage]
    if quantize is None:
        return random_model(args, layer_range, embeddings, head, device, dtype, seed)
    return random_quantized_model(args, layer_range, embeddings, head, device, dtype, seed,
                                  quantize, group_size)


def random_quantized_model(args, layer_range, embeddings, head, device, dtype, seed, scheme,
                           group_size):
    """Random codes and scales of the size a real quantized stage has; the float parts
    (embeddings, norms, head) as random_model makes them. Speed and memory, not text."""
    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(args, layer_range, embeddings, head).to(dtype)
    apply_quantization(model, scheme, group_size)
    model = model.to_empty(device=device)
    model.requires_grad_(False)  # frozen, and filled in place below
    generator = torch.Generator(device=device)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        generator.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        if not tensor.is_floating_point():  # packed codes: any byte is a valid code
            low, high = (-127, 128) if tensor.dtype == torch.int8 else (0, 256)
            tensor.random_(low, high, generator=generator)
        elif tensor.dim() == 1 and not name.endswith(("scales", "zeros")):  # RMSNorm gains
            tensor.fill_(1.0)
        elif name.endswith("scales"):  # codes of +-127 (int8) or +-8 (int4) reach ~3 INIT_STD
            tensor.fill_(3 * INIT_STD / (127 if scheme == "int8" else 8))
        elif name.endswith("zeros"):
            tensor.zero_()
        else:
            tensor.normal_(0.0, INIT_STD, generator=generator)
    return model.eval()


def parameter_bytes(model) -> int:
    """The bytes of the weights: float parameters and, in a quantized stage, the packed codes
    and scales that QuantizedLinear keeps as buffers."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)

"""Frozen weights in int8 (one scale per output channel) or int4 (a scale and a zero per group of
`group_size` inputs): quantizing a tensor, the QuantizedLinear that runs on the packed weights,
and the transform that swaps a stage's block linears for it.

    model = apply_quantization(model, "int4", group_size=32)   # on a loaded float stage

A stage file of a quantized split stores, per block linear, `<name>.weight` packed (int8 (out, in),
or uint8 (out, in/2) with two 4-bit codes a byte: the even input column in the high nibble),
`<name>.scales` and, for int4, `<name>.zeros` (out, in/group_size), so that
w = (code - 8) * scale + zero (torch's own int4 convention). docs/quantization.md has the numbers.

Forward is exact under autograd (training) and on a GPU; on a CPU without autograd it
quantizes the input per row and multiplies in int8 (llama/model/int8_matmul.py), ~1% off, for
speed (use_dynamic_int8 switches it).
"""
import torch
from torch import nn

from llama.errors import BadInput
from llama.model.int8_matmul import dynamic_int8_matmul, pack_int8_weight

SCHEMES = ("int8", "int4")
# The linears inside each block. The embeddings and the output head stay in the stage's float
# dtype: they are a small share of 7B (6%) and the head's logits feed the loss directly.
QUANTIZED_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                     "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
# torch's fused int4 kernels take these group sizes only.
KERNEL_GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_GROUP_SIZE = 128


# ---- tensors ----

def quantize_int8(weight):
    """(int8 codes (out, in), scales (out,)): symmetric, one scale per output channel."""
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    codes = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scales


def quantize_int4(weight, group_size: int):
    """(packed uint8 (out, in/2), scales, zeros (out, in/group_size)): asymmetric per group, so
    the 16 codes span each group's own [min, max]."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // group_size, group_size)
    low, high = groups.amin(dim=2), groups.amax(dim=2)
    scales = ((high - low) / 15).clamp(min=1e-12)
    codes = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, 15)
    zeros = low + 8 * scales  # w = (code - 8) * scale + zero
    return pack_int4(codes.reshape(out_features, in_features).to(torch.uint8)), scales, zeros


def pack_int4(codes):
    """uint8 codes 0..15 (out, in) -> (out, in/2), the even column in the high nibble."""
    return (codes[:, 0::2] << 4) | codes[:, 1::2]


def unpack_int4(packed):
    """(out, in/2) -> uint8 codes (out, in)."""
    return torch.stack((packed >> 4, packed & 15), dim=-1).flatten(1)


def dequantize(scheme: str, weight, scales, zeros, dtype):
    """The float matrix (out, in) that the packed weight stands for, in dtype. In place on the
    one new matrix, and scales broadcast per group: one full-size allocation, not three (at
    4096 x 4096 the fresh pages cost more than the arithmetic)."""
    if scheme == "int8":
        return weight.to(dtype).mul_(scales.to(dtype)[:, None])
    codes = unpack_int4(weight).to(dtype).sub_(8)
    groups = codes.view(codes.shape[0], scales.shape[1], -1)  # (out, in/group_size, group_size)
    groups.mul_(scales.to(dtype)[..., None]).add_(zeros.to(dtype)[..., None])
    return codes


def check_group_size(group_size, in_features: int, name: str):
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or \
            group_size % 2:
        raise BadInput(f"--group_size {group_size!r} must be an even integer of at least 2 "
                       f"(default {DEFAULT_GROUP_SIZE})")
    if in_features % group_size:
        raise BadInput(f"--group_size {group_size} does not divide the width {in_features} of "
                       f"{name}: pick a divisor of it, such as {largest_group_size(in_features)}")


def largest_group_size(*widths) -> int:
    """The largest power of two up to DEFAULT_GROUP_SIZE dividing every width: the default."""
    size = DEFAULT_GROUP_SIZE
    while size > 2 and any(width % size for width in widths):
        size //= 2
    return size


def quantized_tensors(prefix: str, weight, scheme: str, group_size):
    """{prefix.weight, prefix.scales[, prefix.zeros]} of one float weight (out, in)."""
    if scheme == "int8":
        codes, scales = quantize_int8(weight)
        return {f"{prefix}.weight": codes, f"{prefix}.scales": scales.to(weight.dtype)}
    check_group_size(group_size, weight.shape[1], f"{prefix}.weight")
    packed, scales, zeros = quantize_int4(weight, group_size)
    return {f"{prefix}.weight": packed, f"{prefix}.scales": scales.to(weight.dtype),
            f"{prefix}.zeros": zeros.to(weight.dtype)}


# ---- the module ----

class _FrozenQuantizedMatmul(torch.autograd.Function):
    """x @ W.T for a frozen quantized W: the input gradient only, and nothing saved but the
    module (its packed weight is dequantized again in backward, one layer at a time)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return layer.matmul(x)

    @staticmethod
    def backward(ctx, grad_output):
        weight = ctx.layer.dequantized(grad_output.dtype)
        return grad_output @ weight, None


class QuantizedLinear(nn.Module):
    """An nn.Linear whose frozen weight is stored packed (its bias, where it has one, such as
    Qwen2's q/k/v, stays float); see the module docstring."""

    def __init__(self, in_features: int, out_features: int, scheme: str, group_size=None,
                 scale_dtype=torch.float32, device=None, bias: bool = False):
        super().__init__()
        self.bias = nn.Parameter(torch.empty(out_features, dtype=scale_dtype, device=device),
                                 requires_grad=False) if bias else None
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.group_size = scheme, group_size
        if scheme == "int8":
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8,
                                                       device=device))
            self.register_buffer("scales", torch.empty(out_features, dtype=scale_dtype,
                                                       device=device))
            self.zeros = None
        else:
            groups = (out_features, in_features // group_size)
            self.register_buffer("weight", torch.empty(out_features, in_features // 2,
                                                       dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.empty(groups, dtype=scale_dtype, device=device))
            self.register_buffer("zeros", torch.empty(groups, dtype=scale_dtype, device=device))
        # Whether the exact path tries torch's fused weight-only kernel. None: by the rule, on a
        # GPU only (on a CPU they were measured 5-35x slower than dequantizing the layer for
        # training's rows, docs/PERFORMANCE.md); True: try; False: never, as after a refusal
        # (a private op: its dtypes and shapes vary by device and version).
        self.use_kernel = None
        self.int4_kernel_weight = None  # the int4 kernel's own packing, made by prepare_int4_kernel
        # Whether a forward on the CPU that autograd does not track runs dynamic_int8_matmul (the
        # input quantized per row): the fastest path measured on a CPU at batch 1
        # (docs/PERFORMANCE.md), ~1% from the exact one (docs/quantization.md). int8 runs it on
        # its own codes; int4 on an int8 copy (1 byte a parameter; its own codes dropped once
        # the copy is packed for generation, pack_int8), so only after
        # use_dynamic_int8(model) asks for it.
        # off until generation asks for it (use_dynamic_int8): training and held-out losses keep
        # the exact path, and a recomputed block gives what its first forward gave
        self.use_dynamic_int8 = False
        self.register_buffer("int8_codes", None, persistent=False)
        self.register_buffer("int8_scales", None, persistent=False)
        # Generation only (pack_int8_products): the codes the dynamic path multiplies by, in
        # oneDNN's blocked layout, in place of the plain ones (int8's own or int4's copy)
        self.register_buffer("int8_packed", None, persistent=False)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.scheme == "int4" else ""
        return f"{self.in_features}, {self.out_features}, {self.scheme}{group}"

    def dequantized(self, dtype):
        if self.weight is None:
            raise RuntimeError("this layer's codes were packed for generation "
                               "(pack_int8_products): it has no exact product left")
        return dequantize(self.scheme, self.weight, self.scales, self.zeros, dtype)

    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad:
            out = _FrozenQuantizedMatmul.apply(x, self)  # exact: training's numbers
        elif self.dynamic_int8_applies(x):
            out = self.dynamic_int8(x)
        else:
            out = self.matmul(x)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def int8_codes_and_scales(self):
        """The int8 matrix (out, in) and per-row scales the dynamic path multiplies by: int8's
        own, or int4's copy (None before prepare_int8_copy); either in oneDNN's blocked layout
        once packed."""
        if self.scheme == "int8":
            return self.int8_packed if self.int8_packed is not None else self.weight, self.scales
        if self.int8_packed is not None:
            return self.int8_packed, self.int8_scales
        return self.int8_codes, self.int8_scales

    def dynamic_int8_applies(self, x) -> bool:
        # The rule, not a timing: measured faster on the CPU only; on a GPU torch's weight-only
        # kernels stay (torch._int_mm wants more than 16 rows there, and it was not measured).
        # (use_dynamic_int8 is only ever on with int8 codes to multiply by.) Cheap checks: a
        # decode step asks this 33 times at issue 21's shape.
        return self.use_dynamic_int8 and x.is_cpu and x.is_floating_point()

    def dynamic_int8(self, x):
        """(..., in) -> (..., out) by dynamic_int8_matmul; the exact path where it refuses."""
        codes, scales = self.int8_codes_and_scales()
        try:
            out = dynamic_int8_matmul(x.reshape(-1, self.in_features), codes, scales)
        except (RuntimeError, NotImplementedError, AttributeError):
            self.use_dynamic_int8 = False  # a private op: may be missing from a torch build
            return self.matmul(x)
        return out.reshape(*x.shape[:-1], self.out_features)

    def prepare_int8_copy(self) -> bool:
        """int4 only: requantize the dequantized weight to int8 per output channel, kept beside
        the packed codes (+1 byte a parameter), for the dynamic int8 path. The copy follows the
        weight as it is now: make it after loading."""
        if self.scheme != "int4" or self.weight.device.type == "meta":
            return False
        self.int8_codes, self.int8_scales = quantize_int8(self.dequantized(torch.float32))
        self.use_dynamic_int8 = True
        return True

    def pack_int8(self, check_speed: bool = True) -> bool:
        """Generation only: the dynamic path's int8 codes in oneDNN's blocked layout
        (pack_int8_weight: the same numbers, where not measured much slower), replacing the plain
        ones. The stored codes go too (int8's own; int4's, which its int8 copy stands for): the
        layer then has no exact product and no codes in its state dict, as a packed float layer
        (llama/model/cpu_linear.py), and int4 costs what int8 costs. Whether it was done."""
        codes, scales = self.int8_codes_and_scales()
        if not self.use_dynamic_int8 or codes is None or codes.is_mkldnn:
            return False
        packed = pack_int8_weight(codes, scales, check_speed)
        if packed is None:
            return False
        self.int8_packed, self.int8_codes, self.weight = packed, None, None
        return True

    def matmul(self, x):
        """(..., in) -> (..., out), exactly: the fused kernel where use_kernel (or, when None, the
        device) asks for it and it runs, else dequantize this layer."""
        rows = x.reshape(-1, self.in_features)
        kernel = self.use_kernel if self.use_kernel is not None else rows.device.type != "cpu"
        out = self.kernel_matmul(rows) if kernel else None
        if out is None:
            out = rows @ self.dequantized(x.dtype).t()
        return out.reshape(*x.shape[:-1], self.out_features)

    def kernel_matmul(self, rows):
        try:
            if self.scheme == "int8" and rows.dtype in (torch.float32, torch.float16,
                                                        torch.bfloat16):
                return torch._weight_int8pack_mm(rows.contiguous(), self.weight,
                                                 self.scales.to(rows.dtype))
            if self.scheme == "int4" and self.int4_kernel_weight is not None:
                return int4_kernel(rows.contiguous(), self.int4_kernel_weight, self.group_size,
                                   self.scales_and_zeros(rows.dtype))
        except (RuntimeError, NotImplementedError, AttributeError):
            self.use_kernel = False
        return None

    def scales_and_zeros(self, dtype):
        """(in/group, out, 2): the int4 kernels' layout of scales and zeros."""
        return torch.stack((self.scales.t(), self.zeros.t()), dim=-1).to(dtype).contiguous()

    def prepare_int4_kernel(self) -> bool:
        """Repack the int4 codes for torch's fused kernel on this device. Costs a second copy
        of the packed weight (half a byte a parameter), so it is a choice (use_int4_kernels)."""
        if self.scheme != "int4" or self.group_size not in KERNEL_GROUP_SIZES:
            return False
        try:
            if self.weight.device.type == "cuda":
                self.int4_kernel_weight = torch._convert_weight_to_int4pack(self.weight, 2)
            else:
                codes = unpack_int4(self.weight).to(torch.int32)
                self.int4_kernel_weight = \
                    torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        except (RuntimeError, NotImplementedError, AttributeError):
            return False
        self.use_kernel = True  # asked for, on a CPU too
        return True


def int4_kernel(rows, packed, group_size: int, scales_and_zeros):
    if rows.device.type == "cuda":
        return torch._weight_int4pack_mm(rows, packed, group_size, scales_and_zeros)
    return torch._weight_int4pack_mm_for_cpu(rows, packed, group_size, scales_and_zeros)


# ---- transforms ----

def quantized_linear_names(model):
    """Names ('layers.3.attention.wq') of the linears a quantized stage stores packed."""
    return [f"layers.{index}.{name}" for index in model.layers for name in QUANTIZED_LINEARS]


def check_scheme(scheme, group_size):
    if scheme not in SCHEMES:
        raise BadInput(f"--quantize {scheme!r} must be one of {', '.join(SCHEMES)} "
                       "(or left out for float weights)")
    if scheme == "int4":
        check_group_size(group_size, 0, "a layer")  # the type and sign; widths are checked per layer


def apply_quantization(model, scheme: str, group_size=None):
    """Swap the block linears of a stage for QuantizedLinear, in place: a float model's weights
    are quantized one layer at a time; a meta-device model gets empty buffers to load into."""
    check_scheme(scheme, group_size)
    for name in quantized_linear_names(model):
        parent_name, attr = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, attr)
        weight = linear.weight
        if scheme == "int4":
            check_group_size(group_size, linear.in_features, f"{name}.weight")
        layer = QuantizedLinear(linear.in_features, linear.out_features, scheme, group_size,
                                weight.dtype, weight.device, bias=linear.bias is not None)
        if weight.device.type != "meta":
            state = quantized_tensors("", weight.detach(), scheme, group_size)
            if linear.bias is not None:
                state[".bias"] = linear.bias.detach()
            layer.load_state_dict({k[1:]: v for k, v in state.items()}, assign=True)
        setattr(parent, attr, layer.requires_grad_(False))
    return model


def use_int4_kernels(model) -> int:
    """Repack every int4 layer for torch's fused kernel (faster forward, +0.5 byte/parameter);
    returns how many layers took it."""
    return sum(layer.prepare_int4_kernel() for layer in model.modules()
               if isinstance(layer, QuantizedLinear))


def use_dynamic_int8(model, enabled: bool = True, int4_copy: bool = True) -> int:
    """Switch the CPU's dynamic int8 path on or off for every quantized layer: int8 layers run
    it on their own codes; int4 layers get an int8 copy (+1 byte a parameter) when int4_copy,
    and drop it when switched off. Generation turns it on (Preparation.dynamic_int8); training
    never does. A layer packed for generation (pack_int8) keeps it whatever is asked: it has no
    other path. Returns how many layers run it."""
    count = 0
    for layer in model.modules():
        if isinstance(layer, QuantizedLinear):
            if layer.weight is None:  # packed for generation: the dynamic path is all it has
                count += layer.use_dynamic_int8
                continue
            if layer.scheme == "int4" and (int4_copy or not enabled):
                layer.int8_codes = layer.int8_scales = layer.int8_packed = None
                if enabled:
                    layer.prepare_int8_copy()
            layer.use_dynamic_int8 = enabled and layer.int8_codes_and_scales()[0] is not None
            count += layer.use_dynamic_int8
    return count


def pack_int8_products(model, check_speed: bool = True) -> int:
    """Generation on a CPU: every layer on the dynamic int8 path multiplies by oneDNN's blocked
    copy of its codes instead of the plain ones, unless oneDNN refuses the layer or (with
    check_speed) is much slower on it (QuantizedLinear.pack_int8); how many."""
    return sum(layer.pack_int8(check_speed) for layer in model.modules()
               if isinstance(layer, QuantizedLinear))


def quantize_head(model) -> bool:
    """For generation on a CPU: the output head as an int8 QuantizedLinear (run by the dynamic int8
    path), its float matrix dropped unless it is the embedding table too. At dim 512 and vocab
    32000 the float head is a third of the bytes a decode step reads (docs/PERFORMANCE.md). The
    logits carry the dynamic path's ~1% error (docs/quantization.md). Not for training, nor for saving: the head's file
    keys change, and strict loading refuses them. Returns whether the head is int8 now (not a
    head already packed for oneDNN, llama/model/cpu_linear.py)."""
    head = model.output
    if head is None or isinstance(head, QuantizedLinear) or head.weight is None:
        return head is not None and head.weight is not None  # None: packed for oneDNN already
    weight = head.weight.detach()
    layer = QuantizedLinear(head.in_features, head.out_features, "int8", None, weight.dtype,
                            weight.device, bias=head.bias is not None)
    state = quantized_tensors("", weight, "int8", None)
    if head.bias is not None:
        state[".bias"] = head.bias.detach()
    layer.load_state_dict({key[1:]: value for key, value in state.items()}, assign=True)
    model.output = layer.requires_grad_(False)
    return True


def quantizing_fetch(fetch, model, scheme: str, group_size):
    """A fetch(name) for a stage with quantized linears that reads float weights with `fetch`
    and quantizes each linear's weight when its first tensor is asked for."""
    prefixes = set(quantized_linear_names(model))
    done = {}

    def fetch_quantized(name):
        prefix, field = name.rsplit(".", 1)
        if prefix not in prefixes or field == "bias":  # a bias stays float
            return fetch(name)
        if prefix not in done:
            done.clear()  # one layer's tensors at a time
            done[prefix] = quantized_tensors(prefix, fetch(f"{prefix}.weight"), scheme, group_size)
        return done[prefix][name]
    return fetch_quantized

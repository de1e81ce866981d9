"""Tuning methods: each one a transform that attaches trainable tensors to what a stage owns.

    tuning = apply_prefix(model, n_virtual_tokens=16, seed=0)   # or apply_prompt / apply_adapter
    Stage(model, ctx, tuning=tuning)                             # the schedule never hears of it

prompt: virtual-token embeddings before the text (the first stage only). prefix: P-tuning v2 /
PEFT's PREFIX_TUNING: n_virtual keys and values in front of every layer's attention, as many
kv heads as the model has (GQA). adapter: LLaMA-Adapter / PEFT's ADAPTION_PROMPT: in the top
layers, a zero-gated attention of each query to adaption-prompt keys and values. lora
(llama/tuning/lora.py): low-rank updates of the projections. Every method's tensors are float32
and named by global layer keys ("layers.3.prefix"), so what trained on p stages loads on q;
apply_saved puts any method's saved tensors on a stage.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from llama.errors import BadInput
from llama.model.rotary import apply_rotary
from llama.tuning.base import Tuning
from llama.tuning.lora import apply_lora, expected_lora_shapes, saved_settings
from llama.tuning.prompt import SoftPrompt
from llama.tuning.sharding import own_shard

METHODS = ("prompt", "prefix", "adapter", "lora")


class PromptTuning(Tuning):
    method = "prompt"

    def __init__(self, soft_prompt, n_virtual: int):
        super().__init__(n_virtual, {"prompt": soft_prompt.weight} if soft_prompt is not None else {})
        self.soft_prompt = soft_prompt
        self.hidden_virtual = n_virtual

    def prepend(self, h):
        return self.soft_prompt.prepend(h) if self.soft_prompt is not None else h


def apply_prompt(soft_prompt, n_virtual: int) -> PromptTuning:
    """The soft prompt (a SoftPrompt on the first stage, None elsewhere) as a method."""
    return PromptTuning(soft_prompt, n_virtual)


class PrefixTuning(Tuning):
    method = "prefix"

    def __init__(self, model, prefixes: dict):
        n_virtual = next(iter(prefixes.values())).shape[1] if prefixes else 0
        super().__init__(n_virtual, prefixes)
        for key, prefix in prefixes.items():
            model.layers[layer_of(key)].attention.prefix = self._reader(prefix)

    def _reader(self, prefix):
        # A plain function, not a submodule: the model's own state dict stays what it was.
        return lambda: (prefix[0], prefix[1]) if self.active else None

    def fill_cache(self, model):
        if not self.active:
            return
        for key, prefix in self.trainable.items():
            attention = model.layers[layer_of(key)].attention
            keys, values = (p.to(attention.cache.keys.dtype).unsqueeze(0)
                            .expand(attention.cache.keys.shape[0], -1, -1, -1) for p in prefix)
            attention.cache.update(0, keys, values)


def prefix_key(layer: int) -> str:
    return f"layers.{layer}.prefix"


def layer_of(key: str) -> str:
    return key.split(".")[1]


def init_prefix(args, layer: int, n_virtual: int, seed: int):
    """(2, n_virtual, n_kv_heads, head_dim): keys then values, N(0, 1) as PEFT's embedding.

    Drawn per global layer from (seed, layer), so the start does not depend on the split."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    return torch.randn(2, n_virtual, args.n_kv_heads, args.head_dim, generator=generator)


def apply_prefix(model, n_virtual: int, seed: int = 0, tensors: dict = None) -> PrefixTuning:
    """Key/value prefixes for the layers the stage owns (from `tensors` when given)."""
    device = next(model.parameters()).device
    prefixes = {}
    for name in model.layers:
        key = prefix_key(int(name))
        start = tensors[key] if tensors is not None else init_prefix(model.args, int(name),
                                                                     n_virtual, seed)
        start = own_shard(key, start, model.tp_shard)  # the kv heads this TP rank holds
        prefixes[key] = nn.Parameter(start.detach().to(device, torch.float32).clone())
    return PrefixTuning(model, prefixes)


class AdapterTuning(Tuning):
    """Gated adaption prompts; they add to attention's output and take no positions."""
    method = "adapter"
    in_every_step = True

    def __init__(self, model, tensors: dict):
        super().__init__(0, tensors)
        self.adapter_len = 0
        # (B,) 1.0 for the rows of a batch that use this adapter, 0.0 for the others (the
        # generation engine mixes rows of several tunings); None: every row uses it.
        for name, block in model.layers.items():
            prompt_key = f"layers.{name}.adaption_prompt"
            if prompt_key in tensors:
                self.adapter_len = tensors[prompt_key].shape[0]
                # First among the attention's hooks: under tensor parallelism the adapter's
                # output covers this rank's heads only and joins the attention's own before
                # their one all-reduce (llama/parallel/tensor_parallel.py) sums both.
                block.attention.register_forward_hook(
                    self._hook(tensors[prompt_key], tensors[f"layers.{name}.adaption_gate"]),
                    prepend=True)

    def _hook(self, prompt, gate):
        def add_adapter_output(attention, inputs, output):
            if not self.active:
                return output
            added = adapter_attention(attention, inputs[0], inputs[1], prompt, gate)
            return output + self.gated(added)
        return add_adapter_output


def adapter_attention(attention, x, turns, prompt, gate):
    """Each query (rotated as in attention) attends to the prompt's keys and values alone; the
    softmax over them is gated (zero at the start, so training starts from the plain model)."""
    B, T, _ = x.shape
    H, KV, D = attention.n_heads, attention.n_kv_heads, attention.head_dim
    # Through the attention's own projection, whatever holds its weights (fused, quantized).
    q = apply_rotary(attention.project_qkv(x)[0].view(B, T, H, D), turns).transpose(1, 2)
    _, k, v = attention.project_qkv(prompt.to(x.dtype))  # (L, KV * D) each
    k, v = (t.view(-1, KV, D).transpose(0, 1).repeat_interleave(H // KV, dim=0)
            for t in (k, v))  # (H, L, D); q is (B, H, T, D)
    scores = torch.matmul(q, k.transpose(1, 2)) / math.sqrt(D)  # (B, H, T, L)
    weights = gate.to(x.dtype) * F.softmax(scores, dim=-1, dtype=torch.float32).to(x.dtype)
    out = torch.matmul(weights, v).transpose(1, 2).reshape(B, T, H * D)
    return attention.wo(out)


def adapter_layer_range(args, adapter_layers):
    """The top `adapter_layers` layers (all of them for None)."""
    count = args.n_layers if adapter_layers is None else adapter_layers
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= args.n_layers:
        raise BadInput(f"--adapter_layers={adapter_layers!r} must be an integer in 1.."
                       f"{args.n_layers} (the model's layers)")
    return range(args.n_layers - count, args.n_layers)


def init_adapter(args, layer: int, adapter_len: int, seed: int):
    """N(0, 1) prompt (LLaMA-Adapter's embedding init) and a zero gate, per global layer."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    return torch.randn(adapter_len, args.dim, generator=generator), torch.zeros(1)


def apply_adapter(model, adapter_len: int, adapter_layers=None, seed: int = 0,
                  tensors: dict = None) -> AdapterTuning:
    device = next(model.parameters()).device
    top = adapter_layer_range(model.args, adapter_layers)
    trainable = {}
    for name in model.layers:
        if int(name) not in top:
            continue
        prompt_key, gate_key = f"layers.{name}.adaption_prompt", f"layers.{name}.adaption_gate"
        if tensors is not None:
            prompt, gate = tensors[prompt_key], tensors[gate_key]
        else:
            prompt, gate = init_adapter(model.args, int(name), adapter_len, seed)
        for key, start in ((prompt_key, prompt), (gate_key, gate)):
            trainable[key] = nn.Parameter(start.detach().to(device, torch.float32).clone())
    return AdapterTuning(model, trainable)


def expected_shapes(method: str, args, n_virtual: int, adapter_layers=None,
                    lora=None) -> dict:
    """Every key the whole model's tensors of `method` have, with its shape (lora: the
    LoraSettings, whose rank and targets say it)."""
    if method == "lora":
        return expected_lora_shapes(args, lora.r, lora.targets)
    if method == "prefix":
        return {prefix_key(i): (2, n_virtual, args.n_kv_heads, args.head_dim)
                for i in range(args.n_layers)}
    if method == "adapter":
        shapes = {}
        for i in adapter_layer_range(args, adapter_layers):
            shapes[f"layers.{i}.adaption_prompt"] = (n_virtual, args.dim)
            shapes[f"layers.{i}.adaption_gate"] = (1,)
        return shapes
    return {"prompt": (n_virtual, args.dim)}


def method_named(name) -> str:
    if name not in METHODS:
        raise BadInput(f"--method {name!r} must be one of {', '.join(METHODS)}")
    return name


def apply_saved(model, method: str, tensors: dict, is_first: bool, info: dict = None) -> Tuning:
    """The method with trained tensors (the whole model's, by global key) on this stage; info:
    load_tuning's description, which a LoRA needs (its alpha is in no tensor)."""
    if method == "lora":
        return apply_lora(model, saved_settings("the lora tuning", tensors, info), tensors=tensors)
    if method == "prefix":
        n_virtual = next(iter(tensors.values())).shape[1]
        return apply_prefix(model, n_virtual, tensors=tensors)
    if method == "adapter":
        prompts = [k for k in tensors if k.endswith(".adaption_prompt")]
        return apply_adapter(model, tensors[prompts[0]].shape[0], len(prompts), tensors=tensors)
    weight = tensors["prompt"]
    prompt = SoftPrompt(weight).to(next(model.parameters()).device) if is_first else None
    return apply_prompt(prompt, weight.shape[0])


def init_ids(init: str, n_virtual: int, tokenizer, text: str, seed: int):
    """The tokens a prefix starts from: the text's, repeated to fill (--init text), or random
    vocabulary entries (--init vocab), as the prompt method's inits pick them."""
    if init == "text":
        ids = tokenizer.encode(text, bos=False, eos=False) if text else []
        if not ids:
            raise BadInput(f"--init_text {text!r} has no tokens: give a few words, or use "
                           "--init vocab or --init random")
        return (ids * math.ceil(n_virtual / len(ids)))[:n_virtual]
    low = 259 if tokenizer.n_words > 1000 else 3
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, tokenizer.n_words, (n_virtual,), generator=generator).tolist()


@torch.no_grad()
def init_prefix_from_tokens(stage, ids):
    """Every layer's prefix starts as the keys and values the plain model computes for `ids` at
    positions 0..n_virtual-1: the tuned model then starts exactly as the plain model reading
    those tokens first (P-tuning v2's point that real activations start better than noise).
    Run through the pipeline like a prefill (every stage at once), before any memory transform."""
    stage.start_generation(1, len(ids))
    try:
        with stage.tuning.off():
            h = stage.model.run_layers(stage.hidden_in(torch.tensor([ids]), with_prompt=False))
        stage.hidden_out(h)
        stage.ctx.flush_sends()
        for key, prefix in stage.tuning.trainable.items():
            cache = stage.model.layers[layer_of(key)].attention.cache
            prefix[0].copy_(cache.keys[0, :len(ids)])
            prefix[1].copy_(cache.values[0, :len(ids)])
    finally:
        stage.end_generation()

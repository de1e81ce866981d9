"""LoRA as a tuning method: each targeted projection of a stage's blocks gains a trainable
low-rank update, its output y = W x + scaling * B (A dropout(x)), with W frozen.

    tuning = apply_lora(model, lora_settings(r=8, alpha=16, targets="q,v"), seed=0)
    Stage(model, ctx, tuning=tuning)      # activations forward, their gradients back: no more

A forward hook on the module that computes the projection adds the update, so it works the same
on an nn.Linear, a QuantizedLinear (QLoRA: the packed base stays frozen and passes the input
gradient back) and a fused wqkv/w13 (the update goes to its part's rows). The model's own
modules and state dict stay what they were. As PEFT: A starts uniform in +-1/sqrt(in_features)
(nn.Linear's init), B at zero, so a fresh LoRA is the base model; scaling = alpha / r
(alpha / sqrt(r) with rsLoRA). Tensors are float32 under global keys
("layers.3.attention.wq.lora_A" (r, in), "...lora_B" (out, r)), B's rows in this project's
(Meta's interleaved) q/k order; llama/tuning/peft.py permutes them for PEFT's files.
"""
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llama.errors import BadInput
from llama.model.fused import ATTENTION_PARTS, FEED_FORWARD_PARTS
from llama.model.tensor_shards import COLUMN_PARALLEL, take_shard
from llama.tuning.base import Tuning

# The --lora_targets names, in the order a block's tensors are kept, and the Meta module each
# stands for (PEFT's q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj).
TARGETS = {"q": "attention.wq", "k": "attention.wk", "v": "attention.wv", "o": "attention.wo",
           "gate": "feed_forward.w1", "up": "feed_forward.w3", "down": "feed_forward.w2"}
TARGET_GROUPS = {"attention": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down"),
                 "all": tuple(TARGETS)}
DEFAULT_TARGETS = "q,v"  # PEFT's default for a llama
# The fused module that holds a projection once llama/model/fused.py joined it with others.
FUSED = {"attention": ATTENTION_PARTS, "feed_forward": FEED_FORWARD_PARTS}
LORA_KEY = re.compile(r"layers\.(\d+)\.(attention\.w[qkvo]|feed_forward\.w[123])\.lora_(A|B)")


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: float
    dropout: float
    targets: tuple  # short names, in TARGETS' order
    use_rslora: bool

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def describe(self) -> dict:
        """What tuning.json records (and the PEFT export's adapter_config.json reads)."""
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout,
                "targets": list(self.targets), "use_rslora": self.use_rslora}


def lora_settings(r=8, alpha=16, dropout=0.0, targets=DEFAULT_TARGETS, use_rslora=False):
    """The checked settings; a bad value is refused in one line naming its flag."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise BadInput(f"--lora_r={r!r} must be a positive integer (the rank, e.g. 8)")
    if not _number(alpha) or alpha <= 0:
        raise BadInput(f"--lora_alpha={alpha!r} must be a positive number (e.g. 16: the update "
                       "is scaled by alpha/r)")
    if not _number(dropout) or not 0 <= dropout < 1:
        raise BadInput(f"--lora_dropout={dropout!r} must be a number in [0, 1) (e.g. 0.05)")
    if not isinstance(use_rslora, bool):
        raise BadInput(f"--use_rslora={use_rslora!r} must be True or False")
    alpha = int(alpha) if float(alpha).is_integer() else float(alpha)  # 16, as PEFT writes it
    return LoraSettings(r, alpha, float(dropout), parse_targets(targets), use_rslora)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_targets(targets) -> tuple:
    """'q,v', 'attention', 'mlp', 'all' or a list of those -> the short names, in order."""
    names = targets.split(",") if isinstance(targets, str) else list(targets or ())
    chosen = set()
    for name in (str(n).strip() for n in names):
        if name not in TARGETS and name not in TARGET_GROUPS:
            raise BadInput(f"--lora_targets names {name!r}: use a comma-separated list of "
                           f"{', '.join(TARGETS)}, or attention, mlp or all (default "
                           f"{DEFAULT_TARGETS})")
        chosen.update(TARGET_GROUPS.get(name, (name,)))
    if not chosen:
        raise BadInput(f"--lora_targets {targets!r} names no projection: use e.g. "
                       f"{DEFAULT_TARGETS} or all")
    return tuple(t for t in TARGETS if t in chosen)


def linear_shape(args, path: str):
    """(out_features, in_features) of a block's projection ('attention.wq', ...)."""
    q_width, kv_width = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    return {"attention.wq": (q_width, args.dim), "attention.wk": (kv_width, args.dim),
            "attention.wv": (kv_width, args.dim), "attention.wo": (args.dim, q_width),
            "feed_forward.w1": (args.hidden_dim, args.dim),
            "feed_forward.w2": (args.dim, args.hidden_dim),
            "feed_forward.w3": (args.hidden_dim, args.dim)}[path]


def lora_shard_dim(path: str, which: str):
    """The dimension LoRA's A or B of projection path is cut along across tensor-parallel
    ranks, or None where it stays whole: B's rows go with a column-parallel projection's output
    rows (each rank updates its own heads), A's columns with a row-parallel one's input columns
    (each rank's B(A x) is then a partial sum, completed by the projection's all-reduce)."""
    column = path.split(".")[-1] in COLUMN_PARALLEL
    return 0 if column and which == "B" else 1 if not column and which == "A" else None


def lora_keys(layer: int, path: str):
    return f"layers.{layer}.{path}.lora_A", f"layers.{layer}.{path}.lora_B"


def expected_lora_shapes(args, r: int, targets) -> dict:
    """Every key the whole model's LoRA tensors have, with its shape."""
    shapes = {}
    for layer in range(args.n_layers):
        for target in targets:
            out_features, in_features = linear_shape(args, TARGETS[target])
            key_a, key_b = lora_keys(layer, TARGETS[target])
            shapes[key_a], shapes[key_b] = (r, in_features), (out_features, r)
    return shapes


def init_lora(args, layer: int, target: str, r: int, seed: int):
    """(A, B) as PEFT starts them: A uniform in +-1/sqrt(in) (kaiming_uniform with a=sqrt(5),
    nn.Linear's init), B zero. Drawn from (seed, layer, target), so the start does not depend
    on the split or on which other projections are targeted."""
    out_features, in_features = linear_shape(args, TARGETS[target])
    index = list(TARGETS).index(target)
    generator = torch.Generator().manual_seed((seed * 1_000_003 + layer) * 8 + index)
    bound = 1 / math.sqrt(in_features)
    a = (torch.rand(r, in_features, generator=generator) * 2 - 1) * bound
    return a, torch.zeros(out_features, r)


class LoraTuning(Tuning):
    """The LoRA pairs of a stage's layers; they add to projections and take no positions."""
    method = "lora"
    in_every_step = True

    def __init__(self, model, trainable: dict, settings: LoraSettings):
        super().__init__(0, trainable)
        self.settings = settings
        hooks = {}  # id(module) -> (module, LoraHook)
        for name, block in model.layers.items():
            block = getattr(block, "block", block)  # under apply_recompute's wrapper
            for target in settings.targets:
                module, part, widths = projection_host(model.args, block, TARGETS[target])
                if id(module) not in hooks:
                    hooks[id(module)] = (module, LoraHook(self, widths))
                key_a, key_b = lora_keys(int(name), TARGETS[target])
                hooks[id(module)][1].updates[part] = (trainable[key_a], trainable[key_b])
        for module, hook in hooks.values():
            module.register_forward_hook(hook)


class LoraHook:
    """The forward hook of one projection module: its output gains scaling * B (A dropout(x))
    on the rows of each targeted part (one part for a plain linear, two or three if fused)."""

    def __init__(self, tuning: LoraTuning, widths: list):
        self.tuning, self.widths = tuning, widths
        self.updates = {}  # part index -> (A, B)

    def __call__(self, module, inputs, output):
        if not self.tuning.active:
            return output
        x, settings = inputs[0], self.tuning.settings
        # Only while training: evaluation and generation run without gradients. (Full
        # recomputation runs its forward without them too, so training refuses it with dropout.)
        if settings.dropout and torch.is_grad_enabled():
            x = F.dropout(x, settings.dropout, training=True)
        pieces = list(output.split(self.widths, dim=-1))
        for part, (a, b) in self.updates.items():
            # PEFT's order of operations: B(A(x)), then the scaling.
            update = (x @ a.to(x.dtype).t()) @ b.to(x.dtype).t() * settings.scaling
            pieces[part] = pieces[part] + self.tuning.gated(update)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)


def projection_host(args, block, path: str):
    """(the module whose output holds `path`'s rows, the index of those rows among its parts,
    the parts' widths): the projection itself, or the fused wqkv/w13 that holds it."""
    owner_name, name = path.split(".")
    owner = getattr(block, owner_name)
    fused_name, parts = FUSED.get(owner_name, (None, ()))
    fused = getattr(owner, fused_name, None) if fused_name else None
    if fused is not None and name in parts:
        # the parts' rows as this module holds them (a tensor-parallel shard's: its own heads,
        # its share of the FFN); a column-parallel shard of the whole is cut evenly
        tp_size = args.n_heads // block.attention.n_heads
        widths = [linear_shape(args, f"{owner_name}.{part}")[0] // tp_size for part in parts]
        return fused, parts.index(name), widths
    return getattr(owner, name), 0, [getattr(owner, name).out_features]


def apply_lora(model, settings: LoraSettings, seed: int = 0, tensors: dict = None) -> LoraTuning:
    """LoRA pairs on the targeted projections of the layers the stage owns (from `tensors`,
    the whole model's by global key, when given)."""
    device = next(model.parameters()).device
    trainable = {}
    for name in model.layers:
        for target in settings.targets:
            key_a, key_b = lora_keys(int(name), TARGETS[target])
            if tensors is not None:
                a, b = tensors[key_a], tensors[key_b]
            else:
                a, b = init_lora(model.args, int(name), target, settings.r, seed)
            for key, start, which in ((key_a, a, "A"), (key_b, b, "B")):
                # this TP rank's part, cut as the projection is (llama/tuning/sharding.py)
                start = take_shard(start, lora_shard_dim(TARGETS[target], which), *model.tp_shard)
                trainable[key] = nn.Parameter(start.detach().to(device, torch.float32).clone())
    return LoraTuning(model, trainable, settings)


# ---- a saved LoRA: its tensors and description checked ----

def targets_and_rank(source, tensors: dict):
    """(targets, r) that a whole model's LoRA tensors have; a key of no LoRA pair is refused."""
    paths, ranks = set(), set()
    for key, tensor in tensors.items():
        match = LORA_KEY.fullmatch(key)
        if not match:
            raise BadInput(f"{source} holds {key!r}, not a tensor of the lora method it is "
                           "described as: the files were mixed up; pass a folder one run wrote")
        paths.add(match.group(2))
        if tensor.dim() == 2:
            ranks.add(tensor.shape[0] if match.group(3) == "A" else tensor.shape[1])
    if not paths:
        raise BadInput(f"{source} holds no LoRA pair: pass a folder one run of --method lora "
                       "wrote")
    if len(ranks) != 1:
        raise BadInput(f"{source} holds LoRA pairs of ranks {sorted(ranks)}, not of one: the "
                       "files were mixed up; pass a folder one run wrote")
    return tuple(t for t, path in TARGETS.items() if path in paths), ranks.pop()


def saved_settings(source, tensors: dict, info: dict) -> LoraSettings:
    """The settings of a saved LoRA: rank and targets from its tensors, the rest from its
    description (tuning.json's "lora", or a PEFT config read into the same form)."""
    targets, r = targets_and_rank(source, tensors)
    described = info.get("lora") if isinstance(info, dict) else None
    if not isinstance(described, dict):
        raise BadInput(f"{source}: the description has no 'lora' settings (r, alpha, "
                       "use_rslora), which a LoRA needs: pass the folder one run wrote")
    if described.get("r") != r:
        raise BadInput(f"{source}: the tensors are of rank {r} but the description says "
                       f"r={described.get('r')!r}: the files do not belong together")
    try:
        return lora_settings(r, described.get("alpha"), described.get("dropout", 0.0), targets,
                             bool(described.get("use_rslora", False)))
    except BadInput as error:
        raise BadInput(f"{source}: {error}") from None

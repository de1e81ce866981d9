"""The training run's settings: one typed record built from ft_main.main's arguments, checked once.

ft_main.py's signature holds every default and its help; `RunConfig(**arguments)` turns them into
this record, and `__post_init__` is the one place that refuses a bad value. Settings that depend
on the model (room for the virtual tokens) are checked by `check_fits`, once the model is known.
"""
import math
from dataclasses import dataclass
from typing import Optional, Union

from llama.training.data import END_TARGETS
from llama.errors import BadInput
from llama.tuning.lora import LoraSettings, lora_settings
from llama.tuning.methods import method_named
from llama.prepare.offload import OFFLOAD_CHOICES, RECOMPUTE_MODES
from llama.parallel.loss import LOSS_LOGITS
from llama.parallel.pipeline import SCHEDULES
from llama.prepare.stage import Preparation, check_transforms

LR_SCHEDULES = ("cosine", "linear", "constant")
# A soft prompt moves far from its start; a LoRA update is a small correction of real weights
# (PEFT's and QLoRA's recipes use 1e-4..3e-4).
DEFAULT_LR = {"lora": 2e-4}
PROMPT_LR = 3e-2


@dataclass(frozen=True)
class RunConfig:
    ckpt_dir: str
    data: str
    out: str
    tokenizer_path: Optional[str]
    # the tuning method and its prompt
    method: str
    n_virtual_tokens: int
    adapter_layers: Optional[int]
    init: str
    init_text: str
    # LoRA (--method lora)
    lora_r: int
    lora_alpha: float
    lora_dropout: float
    lora_targets: str
    use_rslora: bool
    # data
    template: str
    train_on_prompt: bool
    strict: bool
    eval_fraction: float
    max_seq_len: int
    cache_dir: Optional[str]
    eos_target: str
    # schedule and batches
    schedule: str
    global_batch_size: int
    micro_batch_size: int
    steps: Optional[int]
    epochs: int
    # optimisation
    lr: Optional[float]  # None: the method's default (DEFAULT_LR)
    lr_schedule: str
    warmup_steps: int
    weight_decay: float
    max_grad_norm: float
    seed: int
    # precision and memory
    device: Optional[str]
    dtype: Optional[str]
    recompute: bool
    recompute_mode: str
    offload: frozenset
    compile: bool
    loss_logits: str
    quantize: Optional[str]
    group_size: Optional[int]
    tp: Optional[int]  # tensor-parallel ranks per stage (None: the split's own, else 1)
    # bookkeeping
    log_every: int
    eval_every: int
    save_every: int
    resume: Union[bool, str, None]
    overwrite: bool
    base_model: Optional[str]
    trace: Optional[str]
    trace_steps: int
    timeout_s: float
    max_skipped_steps: int
    debug_overflow_steps: tuple

    def __post_init__(self):
        for name in ("n_virtual_tokens", "micro_batch_size", "global_batch_size", "log_every",
                     "max_skipped_steps", "epochs", "trace_steps"):
            self._positive_int(name)
        for name in ("warmup_steps", "eval_every", "save_every", "seed"):
            self._int_at_least(name, 0)
        if self.steps is not None:
            self._positive_int("steps")
        if self.global_batch_size % self.micro_batch_size:
            raise BadInput(f"--micro_batch_size={self.micro_batch_size} does not divide "
                           f"--global_batch_size={self.global_batch_size}")
        method_named(self.method)
        if self.adapter_layers is not None:
            self._positive_int("adapter_layers")
        self._one_of("schedule", SCHEDULES)
        self._one_of("lr_schedule", LR_SCHEDULES, "--lr_schedule {!r} must be cosine, linear or constant")
        if self.lr is None:
            object.__setattr__(self, "lr", DEFAULT_LR.get(self.method, PROMPT_LR))
        if not (_number(self.lr) and self.lr > 0):
            raise BadInput(f"--lr={self.lr!r} must be a positive number")
        for name in ("weight_decay", "max_grad_norm"):
            if not (_number(getattr(self, name)) and getattr(self, name) >= 0):
                raise BadInput(f"--{name}={getattr(self, name)!r} must be a number >= 0")
        if not (_number(self.eval_fraction) and 0 <= self.eval_fraction < 1):
            raise BadInput(f"--eval_fraction={self.eval_fraction} must be in [0, 1)")
        self._one_of("eos_target", END_TARGETS)
        if self.resume and self.overwrite:
            raise BadInput("--resume and --overwrite contradict each other: pass --resume to "
                           "continue the run in --out, or --overwrite to start it again")
        object.__setattr__(self, "offload", parse_offload(self.offload))
        self._one_of("recompute_mode", RECOMPUTE_MODES)
        self._one_of("loss_logits", LOSS_LOGITS)
        check_transforms(self.preparation())
        self._check_lora()
        steps = self.debug_overflow_steps
        object.__setattr__(self, "debug_overflow_steps",
                           (steps,) if isinstance(steps, int) else tuple(steps or ()))

    def lora(self) -> LoraSettings:
        return lora_settings(self.lora_r, self.lora_alpha, self.lora_dropout, self.lora_targets,
                             self.use_rslora)

    def _check_lora(self):
        settings = self.lora()  # refuses a bad value whatever the method: a typo is a typo
        # One spelling of the same targets ("v,q", "q,v"): resume compares them.
        object.__setattr__(self, "lora_targets", ",".join(settings.targets))
        if self.method == "lora" and settings.dropout and self.preparation().recompute == "full":
            # Full recomputation runs the forward without gradients and again in backward:
            # the dropout masks of the two would differ, and so would the gradient.
            raise BadInput(f"--lora_dropout {settings.dropout} cannot go with full recomputation "
                           "(--recompute or --offload activations/weights): use --lora_dropout "
                           "0, or --recompute_mode selective")

    def check_fits(self, model_max_seq_len: int):
        """The virtual tokens must leave room for text in the model's (or --max_seq_len's) length
        (an adapter's prompt takes no positions, but is held to the same bound; a LoRA has none)."""
        if self.method != "lora" and self.n_virtual_tokens >= model_max_seq_len - 1:
            raise BadInput(f"--n_virtual_tokens={self.n_virtual_tokens} leaves no room for text in "
                           f"max_seq_len={model_max_seq_len}: use fewer virtual tokens or a larger "
                           "--max_seq_len")

    def preparation(self, method=None) -> Preparation:
        """What this run does to its loaded stage (llama/prepare/stage.py applies it in order).
        Recomputation when asked for (selective implies it), or when activation offload or
        weight streaming need it."""
        recompute = self.recompute or self.recompute_mode == "selective" or \
            bool(self.offload & {"activations", "weights"})
        return Preparation(method=method, recompute=self.recompute_mode if recompute else None,
                           offload_activations="activations" in self.offload,
                           stream_weights="weights" in self.offload, compile=self.compile)

    def activation_mode(self) -> str:
        """How the blocks keep their activations, in llama/training/memory.py's words."""
        if self.offload & {"activations", "weights"}:
            return "offload"
        return "recompute" if self.preparation().recompute else "plain"

    def _positive_int(self, name):
        self._int_at_least(name, 1, "a positive integer")

    def _int_at_least(self, name, low: int, what: str = None):
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise BadInput(f"--{name}={value!r} must be {what or f'an integer >= {low}'}")

    def _one_of(self, name, choices, message=None):
        value = getattr(self, name)
        if value not in choices:
            raise BadInput((message or f"--{name} {{!r}} must be one of {', '.join(choices)}").format(value))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_offload(offload) -> frozenset:
    """--offload optimizer,activations (a string, a list, or nothing) as a set of known names."""
    if offload in (None, "", "none", False):
        return frozenset()
    names = offload.split(",") if isinstance(offload, str) else list(offload)
    unknown = [n for n in names if n not in OFFLOAD_CHOICES]
    if unknown:
        raise BadInput(f"--offload {unknown[0]!r} is not one of {', '.join(OFFLOAD_CHOICES)} "
                       "(comma-separated, e.g. --offload optimizer,activations)")
    return frozenset(names)

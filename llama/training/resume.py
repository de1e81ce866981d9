"""Resume: the training checkpoint (checkpoint.pt) a run writes, and how a new run continues it.

One file, written atomically by rank 0: every stage's trainable tensors and their optimizer
state by global key (gathered from the stages), the loss scaler, the data position, the RNG, the
step, the losses so far, and the settings that identify the run (a resumed run must share them,
the method among them) and the model (its params.json digest). On resume every stage takes its
own keys back.
"""
import json
from pathlib import Path

import torch

from llama.errors import BadInput
from llama.formats.files import atomic_torch_save
from llama.formats.tensor_files import safe_torch_load
from llama.training.run_folder import CHECKPOINT_FILE
from llama.tuning.sharding import shard_grid_state

# The settings a resumed run must share with the run it continues.
RUN_IDENTITY = ("method", "adapter_layers", "data", "template", "n_virtual_tokens", "global_batch_size", "micro_batch_size",
                "seed", "eval_fraction", "train_on_prompt", "max_seq_len", "steps", "epochs",
                "eos_target")
# The field of each part of the file, as save_training_state writes it.
FIELD_KINDS = {"step": int, "trainable": dict, "optimizer": dict, "scaler": dict,
               "loader": dict, "identity": str, "losses": str, "rng": torch.Tensor}


# A LoRA run's too (only a LoRA run's: a checkpoint of another method, or of an earlier
# version, has none of them).
LORA_IDENTITY = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "use_rslora")


def run_identity(cfg) -> dict:
    names = RUN_IDENTITY + (LORA_IDENTITY if cfg.method == "lora" else ())
    return {name: getattr(cfg, name) for name in names}


def checkpoint_path(cfg) -> Path:
    """Where the run writes its checkpoint: <out>/checkpoint.pt."""
    return Path(cfg.out) / CHECKPOINT_FILE


def resume_path(cfg) -> Path:
    """--resume True means <out>/checkpoint.pt; a path means that file."""
    return checkpoint_path(cfg) if cfg.resume is True else Path(cfg.resume)


def save_training_state(path, step, optimizer_states, scaler, loader, identity, digest, losses,
                        rng_states=None):
    """Everything a resumed run needs, in one file written atomically (rank 0 only).

    optimizer_states: each stage's ScaledAdamW.state_dict() ({global key: {"master", moments}}).
    rng_states: every rank's torch.get_rng_state() (default: this process's alone).
    """
    optimizer = {k: v for part in optimizer_states for k, v in part.items()}
    rng_states = list(rng_states) if rng_states else [torch.get_rng_state()]
    atomic_torch_save({"step": step, "trainable": {k: v["master"] for k, v in optimizer.items()},
                       "optimizer": optimizer, "scaler": scaler.state_dict(),
                       "loader": loader.state_dict(), "identity": json.dumps(identity),
                       "params_digest": digest, "losses": json.dumps(losses),
                       "rng": rng_states[0], "rng_by_rank": rng_states}, path)


def read_training_state(path, identity, digest):
    """The checkpoint at path, checked field by field and against this run and model."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"--resume {path}: no training checkpoint there (it is written every "
                       "--save_every steps as <out>/checkpoint.pt)")
    state = safe_torch_load(path, mmap=False)
    if not isinstance(state, dict) or "step" not in state:
        raise BadInput(f"{path} is not a training checkpoint of ft_main.py")
    if state.get("params_digest") != digest:
        raise BadInput(f"--resume {path} was trained on another model: use its --ckpt_dir")
    saved = _saved_identity(path, state)
    different = [k for k in identity if saved.get(k) != identity[k]]
    if different:
        k = different[0]
        raise BadInput(f"--resume {path} belongs to another run: it had --{k}={saved.get(k)!r}, "
                       f"this run has {identity[k]!r}; resume with the same settings")
    return state


def _saved_identity(path, state) -> dict:
    wrong = [name for name, kind in FIELD_KINDS.items() if not isinstance(state.get(name), kind)]
    wrong += ["step"] if not wrong and state["step"] < 0 else []
    saved = None
    try:
        saved = json.loads(state["identity"]) if not wrong else None
        if not wrong and not isinstance(json.loads(state["losses"]), dict):
            wrong = ["losses"]
    except ValueError:
        wrong = ["identity or losses"]
    if wrong or not isinstance(saved, dict):
        raise BadInput(f"--resume {path} is damaged ({(wrong or ['identity'])[0]!r} is missing or "
                       "not what ft_main.py writes): resume from another checkpoint or train again")
    return saved


def rng_by_rank(state, world_size: int):
    """Every rank's saved random state, when the checkpoint has one per rank of this job (older
    checkpoints, or one of another number of stages, give rank 0's alone: None)."""
    states = state.get("rng_by_rank")
    if not isinstance(states, list) or len(states) != world_size or \
            not all(isinstance(s, torch.Tensor) for s in states):
        return None
    return states


def restore(path, ctx, identity, digest, optimizer, scaler, loader):
    """Load the checkpoint into this rank's parts; (the step it ends, the losses so far).

    Rank 0 reads and checks the file; the step, scaler, data position, losses and the optimizer
    states are broadcast (each stage takes the keys of its own tensors); each rank takes its own
    random state back (rank 0 alone from a checkpoint without every rank's).
    """
    state = read_training_state(path, identity, digest) if ctx.rank == 0 else None
    shared = ctx.broadcast_object(None if state is None else {
        **{k: state[k] for k in ("step", "scaler", "loader", "losses", "optimizer")},
        "rng_by_rank": rng_by_rank(state, ctx.world_size)})
    try:
        scaler.load_state_dict(shared["scaler"])
        loader.load_state_dict(shared["loader"])
        if optimizer is not None:  # whole tensors in the file: this TP rank takes its part
            optimizer.load_state_dict(shard_grid_state(shared["optimizer"],
                                                       (ctx.tp_rank, ctx.tp_size)))
        if shared["rng_by_rank"] is not None:
            torch.set_rng_state(shared["rng_by_rank"][ctx.rank])
        elif state is not None:
            torch.set_rng_state(state["rng"])
        return shared["step"], json.loads(shared["losses"])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
        raise BadInput(f"--resume {path} is damaged ({type(error).__name__}: "
                       f"{str(error).splitlines()[0] if str(error) else ''}): resume from "
                       "another checkpoint or train again") from None

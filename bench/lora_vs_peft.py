"""LoRA trained here against PEFT's LoRA on the same batches and settings: held-out loss and
trainable floats, on stories260K (Alpaca's records and the distillation demo's stories).

    OMP_NUM_THREADS=1 /work/venv-peft/bin/python -m bench.lora_vs_peft --work ckpts/lora_vs_peft
    python -m bench.lora_vs_peft --steps 4 --seeds 0 --datasets alpaca    # a quick look

Needs transformers and peft (only this benchmark and the interop tests import them). For each
dataset, target set and seed: ft_main's own run (--method lora, one process, float32); then the
very batches it trained on and scored, rebuilt by the project's data code (checked: same
baseline held-out loss, same first-step loss), through transformers' LlamaForCausalLM (the HF
folder llama.formats.convert --to hf writes) with peft's LoRA in a plain torch AdamW loop of the
same settings (lr and its schedule, betas, weight decay, clipping, token-weighted loss over the
global batch). PEFT runs twice: from our run's initial A and B, loaded through our PEFT export
("same start": only the training loops differ), and from PEFT's own init (its kaiming draw of A
under torch.manual_seed(seed)). Every adapter's held-out loss is scored twice: by our evaluator
(PEFT's adapter read through our PEFT import) and by transformers (ours exported to PEFT).
"""
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import ft_main
from bench import common
from llama.cli import run_cli
from llama.errors import BadInput
from llama.formats import convert
from llama.formats.checkpoint import find_tokenizer, load_model
from llama.model.tokenizer import Tokenizer
from llama.parallel.distributed import DistContext
from llama.parallel.pipeline import Stage
from llama.training.batches import BatchLoader, eval_batches, split_dataset
from llama.training.data import load_dataset
from llama.training.precision import lr_at
from llama.tuning.files import load_tuning
from llama.tuning.lora import apply_lora, lora_settings
from llama.tuning.methods import apply_saved
from llama.tuning.peft import HF_TARGETS, export_peft

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"
MODEL_BIN = ASSETS / "stories260K" / "stories260K.bin"
# How each dataset is trained, as the README's Alpaca run and quickstart.sh's demo train it
# (main adds "model": the checkpoint every run reads).
DATASETS = {
    "alpaca": {"data": ASSETS / "alpaca" / "alpaca_data_1k.json", "template": "alpaca",
               "max_seq_len": 512, "eval_fraction": 0.05},
    "stories": {"data": None, "template": "none", "max_seq_len": 256, "eval_fraction": 0.15},
}
TABLE = ["dataset", "targets", "seed", "peft_start", "trainable_ours", "trainable_peft",
         "base_loss", "ours", "peft", "rel_diff", "ours_by_hf", "peft_by_hf", "train_loss_max_rel"]


@dataclass(frozen=True)
class Settings:
    """What both trainers are given (ft_main's flags of the same names)."""
    r: int
    alpha: float
    lr: float
    steps: int
    global_batch_size: int
    micro_batch_size: int
    warmup_steps: int
    lr_schedule: str
    weight_decay: float
    max_grad_norm: float


def stories_file(work: Path) -> Path:
    """The distillation demo's training data (quickstart.sh step 4), made once in `work`."""
    path = work / "max_stories.jsonl"
    if not path.is_file():
        from llama.tools import distill
        distill.teach(ckpt_dir=str(MODEL_BIN), out=str(path), n_samples=1024)
    return path


def hf_folder(model, work: Path) -> Path:
    """The model in Hugging Face's layout, written by the project's converter."""
    folder = work / f"{Path(model).stem}_hf"
    if not (folder / "config.json").is_file():
        convert.main(str(model), str(folder), to="hf", overwrite=True)
    return folder


def run_ours(dataset: dict, targets: str, seed: int, settings: Settings, out: Path) -> dict:
    """ft_main's run, as the command line runs it; tuning.json's description of it."""
    ft_main.main(ckpt_dir=str(dataset["model"]), data=str(dataset["data"]), out=str(out),
                 method="lora", lora_r=settings.r, lora_alpha=settings.alpha,
                 lora_targets=targets, template=dataset["template"],
                 max_seq_len=dataset["max_seq_len"], eval_fraction=dataset["eval_fraction"],
                 steps=settings.steps, global_batch_size=settings.global_batch_size,
                 micro_batch_size=settings.micro_batch_size, lr=settings.lr,
                 lr_schedule=settings.lr_schedule, warmup_steps=settings.warmup_steps,
                 weight_decay=settings.weight_decay, max_grad_norm=settings.max_grad_norm,
                 seed=seed, device="cpu", dtype="float32", cache_dir="none", eval_every=0,
                 log_every=max(settings.steps // 4, 1), save_every=0, overwrite=True)
    return json.loads((out / "tuning.json").read_text())


def same_batches(dataset: dict, seed: int, settings: Settings, end_target: str):
    """(training batches per step, held-out micro-batches) as ft_main's build_data makes them:
    the same records, template, loss mask, split and order."""
    tokenizer = Tokenizer(find_tokenizer(dataset["model"]))
    examples = load_dataset(dataset["data"], tokenizer, dataset["template"],
                            dataset["max_seq_len"], cache_dir="none", log=lambda line: None,
                            end_target=end_target)
    train_set, held_out = split_dataset(examples, dataset["eval_fraction"], seed)
    loader = BatchLoader(train_set, settings.global_batch_size, settings.micro_batch_size,
                         tokenizer.pad_id, seed)
    steps = [loader.next_global_batch() for _ in range(settings.steps)]
    return steps, eval_batches(held_out, settings.micro_batch_size, tokenizer.pad_id)


def our_model(dataset: dict):
    return load_model(dataset["model"], max_seq_len=dataset["max_seq_len"])


def our_held_out_loss(dataset: dict, held_out, folder=None) -> float:
    """Our evaluator's loss per target token: the plain model, or with the LoRA in `folder`
    (ours, or PEFT's read through our PEFT import)."""
    model = our_model(dataset)
    if folder is None:
        return Stage(model, DistContext()).mean_loss(held_out, with_prompt=False)
    method, tensors, info = load_tuning(folder, model.args)
    tuning = apply_saved(model, method, tensors, True, info)
    return Stage(model, DistContext(), tuning=tuning).mean_loss(held_out)


def initial_adapter(dataset: dict, targets: str, seed: int, settings: Settings, folder: Path):
    """Our run's starting A and B (apply_lora with its seed), written by our PEFT export."""
    model = our_model(dataset)
    lora = lora_settings(settings.r, settings.alpha, 0.0, targets)
    tuning = apply_lora(model, lora, seed)
    tensors = {key: p.detach() for key, p in tuning.trainable.items()}
    export_peft(folder, "lora", tensors, model.args, {"lora": lora.describe()})


def hf_model(hf_dir: Path):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)


def peft_model(hf_dir: Path, targets: str, seed: int, settings: Settings, start):
    """PEFT's LoRA on the HF model: from `start` (a PEFT folder) or from PEFT's own init."""
    import peft
    if start is not None:
        return peft.PeftModel.from_pretrained(hf_model(hf_dir), start, is_trainable=True)
    config = peft.LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=0.0,
                             target_modules=[HF_TARGETS[t] for t in
                                             lora_settings(targets=targets).targets],
                             task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    return peft.get_peft_model(hf_model(hf_dir), config)


def summed_loss(model, batch):
    """Cross-entropy summed over the batch's target tokens (the same -100 mask as ours)."""
    logits = model(input_ids=batch.tokens, attention_mask=torch.ones_like(batch.tokens)).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten(),
                           ignore_index=-100, reduction="sum")


def train_peft(model, steps: list, settings: Settings) -> list:
    """A plain loop of ft_main's settings: the loss is the token-weighted mean over the global
    batch, clip by the global norm, torch's AdamW, the lr of llama.training.precision.lr_at.
    The training loss of each step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.999),
                                  weight_decay=settings.weight_decay)
    model.train()
    losses = []
    for step, batches in enumerate(steps):
        n_targets = sum(batch.n_targets for batch in batches)
        total = 0.0
        for batch in batches:
            loss = summed_loss(model, batch) / n_targets
            loss.backward()
            total += float(loss.detach())
        if settings.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, len(steps), settings.lr, settings.warmup_steps,
                                settings.lr_schedule)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


@torch.no_grad()
def hf_held_out_loss(model, held_out) -> float:
    """transformers' forward, scored as our evaluator scores: summed over every target token."""
    model.eval()
    total = sum(float(summed_loss(model, batch)) for batch in held_out)
    return total / sum(batch.n_targets for batch in held_out)


def scored_by_hf(hf_dir: Path, folder: Path, held_out) -> float:
    """A PEFT folder (ours exported, or PEFT's own save) on the HF model, scored there."""
    import peft
    return hf_held_out_loss(peft.PeftModel.from_pretrained(hf_model(hf_dir), folder), held_out)


def trainable_floats(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def our_train_losses(out: Path) -> list:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if line.startswith("{")]


def max_relative(ours: list, theirs: list) -> float:
    return max(abs(a - b) / abs(a) for a, b in zip(ours, theirs))


def compare_one(name, dataset, hf_dir, targets, seed, settings, work,
                starts=("same", "own")) -> list:
    """Our run, then PEFT from the same start and/or from its own: their records."""
    folder = work / name / targets.replace(",", "") / f"seed{seed}"
    ours = run_ours(dataset, targets, seed, settings, folder / "ours")
    steps, held_out = same_batches(dataset, seed, settings, ours["eos_target"])
    base = our_held_out_loss(dataset, held_out)
    if not math.isclose(base, ours["losses"]["eval_loss_no_prompt"], rel_tol=1e-6):
        raise BadInput(f"the rebuilt held-out batches score {base} without a LoRA, ft_main's "
                       f"{ours['losses']['eval_loss_no_prompt']}: they are not the same batches")
    ours_loss = our_held_out_loss(dataset, held_out, folder / "ours")
    ours_n = sum(t.numel() for t in load_tuning(folder / "ours", our_model(dataset).args)[1]
                 .values())
    ours_by_hf = scored_by_hf(hf_dir, folder / "ours" / "peft", held_out)
    initial_adapter(dataset, targets, seed, settings, folder / "start")
    records = []
    for start in starts:
        model = peft_model(hf_dir, targets, seed, settings,
                           folder / "start" if start == "same" else None)
        started = time.perf_counter()
        train_losses = train_peft(model, steps, settings)
        seconds = time.perf_counter() - started
        model.save_pretrained(folder / f"peft_{start}")
        peft_loss = our_held_out_loss(dataset, held_out, folder / f"peft_{start}")
        records.append({
            "bench": "lora_vs_peft", "dataset": name, "targets": targets, "seed": seed,
            "peft_start": start, "trainable_ours": ours_n, "trainable_peft": trainable_floats(model),
            "base_loss": base, "ours": ours_loss, "peft": peft_loss,
            "rel_diff": (peft_loss - ours_loss) / ours_loss, "ours_by_hf": ours_by_hf,
            "peft_by_hf": hf_held_out_loss(model, held_out),
            "train_loss_max_rel": max_relative(our_train_losses(folder / "ours"), train_losses),
            "first_step_loss_rel": max_relative(our_train_losses(folder / "ours")[:1],
                                                train_losses[:1]),
            "peft_train_s": seconds, **asdict(settings)})
    return records


def mean_records(records: list) -> list:
    """Per (dataset, targets, PEFT start): the held-out losses averaged over the seeds."""
    groups = {}
    for record in records:
        groups.setdefault((record["dataset"], record["targets"], record["peft_start"]),
                          []).append(record)
    means = []
    for (name, targets, start), group in groups.items():
        ours = sum(r["ours"] for r in group) / len(group)
        peft = sum(r["peft"] for r in group) / len(group)
        means.append({"bench": "lora_vs_peft_mean", "dataset": name, "targets": targets,
                      "seed": "mean", "peft_start": start,
                      "trainable_ours": group[0]["trainable_ours"],
                      "trainable_peft": group[0]["trainable_peft"],
                      "base_loss": group[0]["base_loss"] if len(group) == 1 else None,
                      "ours": ours, "peft": peft, "rel_diff": (peft - ours) / ours,
                      "n_seeds": len(group)})
    return means


def main(work: str = "ckpts/lora_vs_peft", datasets: str = "alpaca,stories",
         targets: str = "q,v all", seeds: str = "0,1", r: int = 8, alpha: float = 16,
         lr: float = 1e-2, steps: int = 60, global_batch_size: int = 8, micro_batch_size: int = 4,
         warmup_steps: int = 10, lr_schedule: str = "cosine", weight_decay: float = 0.0,
         max_grad_norm: float = 1.0):
    """Held-out loss of LoRA trained here and by PEFT on the same batches; one JSON line per run.

    work: the folder for the HF export, the demo's stories and every run (not beside the assets)
    datasets: comma-separated: alpaca (alpaca_data_1k.json) and/or stories (the demo's)
    targets: the --lora_targets sets to compare, separated by spaces ("q,v all")
    seeds: comma-separated seeds (each: our A's draw, the data order and split, PEFT's init)
    r, alpha, lr, steps, global_batch_size, micro_batch_size, warmup_steps, lr_schedule,
        weight_decay, max_grad_norm: as ft_main.py's flags, given to both trainers
    """
    missing = common.hf_missing()
    if missing:
        raise BadInput(f"{missing}: run this benchmark with a Python that has them")
    names = [n.strip() for n in str(datasets).split(",")]
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        raise BadInput(f"--datasets names {unknown[0]!r}: use {', '.join(DATASETS)}")
    seed_list = [int(s) for s in str(seeds).replace(",", " ").split()]
    settings = Settings(r, alpha, lr, steps, global_batch_size, micro_batch_size, warmup_steps,
                        lr_schedule, weight_decay, max_grad_norm)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    hf_dir = hf_folder(MODEL_BIN, work)
    records = []
    for name in names:
        dataset = {**DATASETS[name], "model": MODEL_BIN}
        dataset["data"] = dataset["data"] or stories_file(work)
        for target_set in str(targets).split():
            for seed in seed_list:
                for record in compare_one(name, dataset, hf_dir, target_set, seed, settings,
                                          work):
                    record.update(common.environment(torch.device("cpu")))
                    common.emit(record)
                    records.append(record)
    means = mean_records(records)
    for record in means:
        common.emit(record)
    common.print_table(records + means, TABLE)


if __name__ == "__main__":
    run_cli(main)

"""Prompt distillation on a real model: the demo that shows what a soft prompt can hold.

    python -m llama.tools.distill teach --ckpt_dir ckpts/stories260K --out datasets/max_stories.jsonl
    python -m llama.tools.distill score --ckpt_dir ckpts/stories260K --prompt runs/demo/prompt
`teach` samples stories that start after a long hard prompt and keeps those that show its trait
(a dog named Max) as plain-text JSONL, without the hard prompt; ft_main.py then trains a short
soft prompt on them; `score` counts how many stories sampled from "Once upon a time" show the
trait with the soft prompt and without it.
"""
import json
import re
from pathlib import Path

from llama.cli import run_cli
from llama.errors import BadInput
from llama.formats.files import atomic_write_text
from llama.serving.generation import decode_continuation, generate
from llama.parallel.pipeline import Stage
from llama.tuning.prompt import SoftPrompt
from llama.tuning.files import load_soft_prompt
from llama.options import MODEL, takes
from llama.prepare.stage import run_on_stage

HARD_PROMPT = ("Max was a big brown dog. Max liked to bark. Max the dog ran and barked. "
               "Max had a red ball. Max the dog was happy. ")
STORY_START = "Once upon a time"
TRAIT = r"\bMax\b"  # the trait counted in the stories a prompt produces
# The teacher keeps only stories that bring Max in within the first sentence: a sharper target
# than "Max somewhere", which the hard prompt itself reaches only half of the time.
TEACH_TRAIT = r"^Once upon a time[^.]*\bMax\b"
INIT_TEXT = "Max was a big brown dog. Max liked to bark."  # for ft_main.py --init_text


def sample_stories(stage, tokenizer, prefix: str, n: int, max_gen_len: int, seed: int,
                   batch_size: int = 16, use_prompt: bool = True):
    """n stories continuing BOS + prefix + STORY_START, sampled at temperature 1, top-p 0.9."""
    ids = tokenizer.encode(prefix + STORY_START, bos=True, eos=False)
    stories = []
    for first in range(0, n, batch_size):
        count = min(batch_size, n - first)
        outs = generate(stage, [ids] * count, max_gen_len, temperature=1.0, top_p=0.9,
                        stop_ids=tokenizer.stop_ids, seed=seed + first,
                        use_prompt=use_prompt)
        stories += [STORY_START + decode_continuation(tokenizer, ids, out) for out in outs]
    return stories


def trait_rate(stories, trait: str = TRAIT) -> float:
    return sum(bool(re.search(trait, s)) for s in stories) / max(len(stories), 1)


@takes(MODEL, dtype="float32")
def teach(out: str, n_samples: int = 512, max_gen_len: int = 96, seed: int = 0,
          hard_prompt: str = HARD_PROMPT, trait: str = TEACH_TRAIT, **options):
    """Sample stories after a hard prompt and write those that show its trait to --out (JSONL).

    out: the JSONL file to write (plain-text records, for ft_main.py --template plain)
    n_samples: how many stories to sample
    max_gen_len: the most tokens per story
    seed: the random seed of sampling
    hard_prompt: the text put before each story, whose trait the stories should show
    trait: a regular expression a story must match to be kept
    """
    def work(ctx, model, tokenizer, _):
        stories = sample_stories(Stage(model, ctx), tokenizer, hard_prompt, n_samples,
                                 max_gen_len, seed)
        kept = [s for s in stories if re.search(trait, s)]
        if not kept:
            raise BadInput(f"none of {n_samples} stories showed the trait {trait!r}: "
                           "use a stronger --hard_prompt or more --n_samples")
        if ctx.rank == 0:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out, "".join(json.dumps({"text": s}) + "\n" for s in kept))
        ctx.log(f"kept {len(kept)} of {n_samples} stories that match {trait} "
                f"(the hard prompt's own rate: {len(kept) / n_samples:.0%}); wrote {out}")

    run_on_stage(options, work)


def trait_rates(stage, tokenizer, n_samples: int = 32, max_gen_len: int = 96, seed: int = 1000,
                trait: str = TRAIT):
    """Share of stories from BOS + "Once upon a time" that show the trait, without and with the
    stage's soft prompt: ({"without": rate, "with": rate}, {"without": stories, "with": ...})."""
    rates, stories = {}, {}
    for key, use_prompt in (("without", False), ("with", True)):
        stories[key] = sample_stories(stage, tokenizer, "", n_samples, max_gen_len, seed,
                                      use_prompt=use_prompt)
        rates[key] = trait_rate(stories[key], trait)
    return rates, stories


@takes(MODEL, dtype="float32")
def score(prompt: str, n_samples: int = 32, max_gen_len: int = 96, seed: int = 1000,
          trait: str = TRAIT, show: int = 2, **options):
    """Share of stories from BOS + "Once upon a time" that show the trait, with and without the prompt.

    prompt: the soft prompt's folder (ft_main.py's --out)
    n_samples: how many stories to sample with the prompt, and as many without
    max_gen_len: the most tokens per story
    seed: the random seed of sampling
    trait: a regular expression a story must match to count
    show: how many stories of each kind to print
    """
    labels = {"without": "without a prompt", "with": "with the soft prompt"}

    def work(ctx, model, tokenizer, _):
        soft_prompt = None
        if ctx.is_first:
            soft_prompt = SoftPrompt(load_soft_prompt(prompt, model.args)[0]).to(ctx.device)
        n_virtual = ctx.broadcast_object(soft_prompt.n_virtual_tokens if soft_prompt else None)
        stage = Stage(model, ctx, soft_prompt, n_virtual)
        rates, stories = trait_rates(stage, tokenizer, n_samples, max_gen_len, seed, trait)
        for key, label in labels.items():
            for story in stories[key][:show]:
                ctx.log(f"[{label}] {story.strip()}\n")
        for key, label in labels.items():
            ctx.log(f"{rates[key]:.0%} of {n_samples} stories {label} match {trait}")

    run_on_stage(options, work)


if __name__ == "__main__":
    run_cli({"teach": teach, "score": score})

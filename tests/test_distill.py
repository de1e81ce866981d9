"""The prompt-distillation demo end to end on the real stories260K model, in one process: the
teacher writes stories after a long hard prompt about Max the dog, a 16-token soft prompt is
trained on them without the hard prompt, and stories sampled from BOS + "Once upon a time" bring
Max in with the soft prompt and (almost) never without it.
Run: python3 -m pytest -q tests/test_distill.py
"""
import json
import re


import ft_main
from llama.tools import distill
from llama.formats.checkpoint import load_model
from llama.parallel.distributed import DistContext
from llama.parallel.pipeline import Stage
from llama.tuning.prompt import SoftPrompt
from llama.tuning.files import load_soft_prompt
from llama.model.tokenizer import Tokenizer


def test_distilled_soft_prompt_carries_the_trait(assets, tmp_path):
    model_bin = assets / "stories260K" / "stories260K.bin"
    stories = tmp_path / "max_stories.jsonl"
    distill.teach(str(model_bin), str(stories))  # 512 samples, Max in the first sentence
    records = [json.loads(line) for line in stories.read_text().splitlines()]
    assert len(records) >= 16  # at least one global batch
    assert all(re.search(distill.TEACH_TRAIT, r["text"]) for r in records)
    assert not any(distill.HARD_PROMPT.strip() in r["text"] for r in records)

    out = tmp_path / "prompt"
    ft_main.main(ckpt_dir=str(model_bin), data=str(stories), out=str(out), template="none",
                 n_virtual_tokens=16, init="text", init_text=distill.INIT_TEXT, lr=0.1, steps=200,
                 global_batch_size=16, micro_batch_size=8, max_seq_len=256, log_every=50)

    model = load_model(model_bin)
    weight, info = load_soft_prompt(out, model.args)
    assert weight.shape == (16, model.args.dim) and info["init_text"] == distill.INIT_TEXT
    stage = Stage(model, DistContext(), SoftPrompt(weight), weight.shape[0])
    tokenizer = Tokenizer(str(assets / "stories260K" / "tok512.model"))
    # 32 stories each way, as `score` samples them. The trained prompt depends on the CPU's
    # float rounding: with 100 steps 100% on the machine this was written on, 62.5% on an AMD
    # EPYC; with 200 steps (the quickstart's) 78% there. Half is far from the 0% without.
    rates, samples = distill.trait_rates(stage, tokenizer)
    assert len(samples["with"]) == len(samples["without"]) == 32
    assert all(s.startswith(distill.STORY_START) for s in samples["with"] + samples["without"])
    assert rates["with"] >= 0.5, rates
    assert rates["without"] <= 0.10, rates

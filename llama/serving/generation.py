"""generate(): new ids for a list of prompts, through the one engine (llama/serving/engine.py).

Every rank calls it with the same arguments; rank 0 decides the steps and the others follow
them, and every rank gets the result. Each prompt is a row of the engine at its own positions,
so a prompt generates in a batch what it generates alone.
"""
from llama.errors import BadInput
from llama.progress import Progress
from llama.serving.engine import STAGE_TUNING, Engine
from llama.serving.sampling import Sampling, check_sampling
from llama.serving.scheduler import Batcher, Request


def generate(stage, prompts, max_gen_len: int, temperature: float = 0.0, top_p: float = 0.9,
             stop_ids=(), seed: int = 0, use_prompt: bool = True, progress_every_s=None):
    """New token ids for each prompt (lists of ids, BOS included), stopping at any stop_ids.

    use_prompt: with the Stage's tuning (else the plain model). Prompt i samples with seed + i,
    so equal prompts still draw different texts. progress_every_s: a progress line on stderr at
    most that often (None: none). Generation stops where the positions run out (max_seq_len).
    """
    n_virtual = stage.n_virtual if use_prompt else 0
    if not prompts or any(len(p) == 0 for p in prompts):
        raise BadInput("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    if n_virtual + longest >= stage.max_seq_len:
        raise BadInput(f"a prompt of {longest} tokens (+{n_virtual} virtual) does not fit "
                       f"max_seq_len={stage.max_seq_len}: shorten it or raise --max_seq_len")
    if max_gen_len < 1:
        raise BadInput(f"--max_gen_len={max_gen_len} must be at least 1")
    check_sampling(temperature, top_p)
    engine = Engine(stage, max_rows=len(prompts), length=n_virtual + longest + max_gen_len)
    try:
        if stage.ctx.rank != 0:  # rank 0 decides the steps
            engine.follow()
            return stage.ctx.broadcast_object(None)
        tuning = STAGE_TUNING if use_prompt else None
        requests = [Request(list(p), max_gen_len, tuning, Sampling(temperature, top_p, seed + i),
                            tuple(stop_ids)) for i, p in enumerate(prompts)]
        batcher = Batcher(engine)
        for request in requests:
            batcher.submit(request)
        progress = Progress(f"generating {len(prompts)} texts", max_gen_len, "tokens",
                            progress_every_s or 0.0, enabled=progress_every_s is not None)
        while batcher.busy:
            batcher.step()
            progress.update(max(len(r.new) for r in requests))
        batcher.quit()
    finally:
        engine.close()
    return stage.ctx.broadcast_object([r.new for r in requests])


def cut_at_stop(ids, stop_ids, max_gen_len: int):
    ids = ids[:max_gen_len]
    for i, token in enumerate(ids):
        if token in stop_ids:
            return ids[:i]
    return ids


def decode_continuation(tokenizer, prompt_ids, new_ids) -> str:
    """The text new_ids add after the prompt. Decoded together with the prompt, because a
    piece's leading space only survives decoding when something comes before it."""
    return tokenizer.decode(list(prompt_ids) + list(new_ids))[len(tokenizer.decode(prompt_ids)):]

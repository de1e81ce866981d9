"""Generation through the pipeline with a KV cache: greedy, temperature and top-p sampling.

Every rank runs the same loop over positions. Prefill sends the prompts (and, with a soft
prompt, its virtual tokens) through the stages; each decode step sends one hidden vector per
sequence; the last stage samples and the chosen ids are broadcast, so every rank knows them.
"""
import math

import torch

from llama.errors import BadInput
from llama.progress import Progress


def check_sampling(temperature: float, top_p: float):
    """Refuse sampling settings that no distribution comes from (NaN slips through every
    comparison, so each test is written to fail on it)."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise BadInput(f"--temperature={temperature:g} must be a finite number >= 0 (0: greedy)")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise BadInput(f"--top_p={top_p:g} must be a number in (0, 1] (1: no cut)")


def sample_top_p(probs, top_p: float, generator):
    """Sample from the smallest set of tokens whose probability adds up to top_p."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs[before > top_p] = 0.0  # the likeliest token has before == 0: it always stays
    sorted_probs /= sorted_probs.sum(dim=-1, keepdim=True)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return torch.gather(order, -1, choice).squeeze(-1)


def next_tokens(logits, temperature: float, top_p: float, generator):
    # Below float32's smallest normal number a temperature leaves nothing but the likeliest
    # token (and float32 would round the smallest ones to 0, giving 0/0): greedy.
    if temperature < torch.finfo(torch.float32).tiny:
        return logits.argmax(dim=-1)
    # The maximum subtracted first, so every scaled logit is <= 0 and the likeliest exactly 0: a
    # tiny temperature sends the others to -inf, never to inf (inf - inf = NaN in the softmax).
    logits = logits.float()
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    probs = torch.softmax(shifted / temperature, dim=-1)
    return sample_top_p(probs, top_p, generator)


@torch.no_grad()
def generate(stage, prompts, max_gen_len: int, temperature: float = 0.0, top_p: float = 0.9,
             stop_ids=(), seed: int = 0, use_prompt: bool = True, progress_every_s=None):
    """New token ids for each prompt (lists of ids, BOS included), stopping at any stop_ids.

    progress_every_s: a progress line on stderr at most that often (None: none; pass it on one
    rank only). Work shorter than that prints nothing.

    Prompts of unequal length share one position counter: all are prefilled up to the shortest
    one, and a longer prompt's own tokens replace the samples until it runs out.
    """
    n_virtual = stage.n_virtual if use_prompt else 0
    if not prompts or any(len(p) == 0 for p in prompts):
        raise BadInput("every prompt needs at least one token")
    longest, shortest = max(len(p) for p in prompts), min(len(p) for p in prompts)
    if n_virtual + longest >= stage.max_seq_len:
        raise BadInput(f"a prompt of {longest} tokens (+{n_virtual} virtual) does not fit "
                       f"max_seq_len={stage.max_seq_len}: shorten it or raise --max_seq_len")
    if max_gen_len < 1:
        raise BadInput(f"--max_gen_len={max_gen_len} must be at least 1")
    check_sampling(temperature, top_p)
    total_len = min(stage.max_seq_len - n_virtual, longest + max_gen_len)
    batch = len(prompts)
    tokens = torch.zeros((batch, total_len), dtype=torch.long)
    is_prompt = torch.zeros((batch, total_len), dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p)
        is_prompt[i, :len(p)] = True
    stop = torch.tensor(list(stop_ids), dtype=torch.long)
    finished = torch.zeros(batch, dtype=torch.bool)
    generator = torch.Generator().manual_seed(seed)
    progress = Progress(f"generating {batch} texts", total_len - shortest, "tokens",
                        progress_every_s or 0.0, enabled=progress_every_s is not None)

    stage.start_generation(batch, n_virtual + total_len)
    try:
        previous = 0
        for current in range(shortest, total_len):
            chosen = decode_step(stage, tokens[:, previous:current], previous, n_virtual,
                                 use_prompt, temperature, top_p, generator)
            chosen = torch.where(is_prompt[:, current], tokens[:, current], chosen)
            tokens[:, current] = chosen
            finished |= ~is_prompt[:, current] & torch.isin(chosen, stop)
            previous = current
            if bool(finished.all()):
                break
            progress.update(current - shortest + 1)
    finally:
        stage.end_generation()
    return [cut_at_stop(tokens[i, len(p):previous + 1].tolist(), stop_ids, max_gen_len)
            for i, p in enumerate(prompts)]


def decode_step(stage, chunk, previous: int, n_virtual: int, use_prompt: bool, temperature,
                top_p, generator):
    """One id per row after tokens chunk (B, T), which sits at text positions previous..

    A soft prompt or prefix enters at prefill only: it takes cache positions 0..n_virtual-1, so
    later chunks start at n_virtual + previous.
    """
    start_pos = 0 if previous == 0 else n_virtual + previous
    return stage.next_ids(chunk, start_pos, with_prompt=use_prompt,
                          pick=lambda logits: next_tokens(logits, temperature, top_p, generator))


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

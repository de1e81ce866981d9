"""How a row's next id is picked from its logits: greedy, or temperature and top-p sampling with
the row's own generator (so its draws do not depend on the other rows of its batch)."""
import math
from dataclasses import dataclass

import torch

from llama.errors import BadInput


@dataclass
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0


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


def pick_ids(logits, samplings: list, generators: list):
    """One id per row of logits (B, vocab), each by its own Sampling and generator (CPU)."""
    ids = logits.argmax(dim=-1).cpu()
    for i, (sampling, generator) in enumerate(zip(samplings, generators)):
        if sampling.temperature > 0:
            ids[i] = next_tokens(logits[i:i + 1].cpu(), sampling.temperature, sampling.top_p,
                                 generator)[0]
    return ids

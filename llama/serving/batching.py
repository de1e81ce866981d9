"""Batched generation where every row may carry its own soft prompt, or none: what serving needs.

Each served prompt's vectors get ids above the vocabulary ("virtual ids"), so a row is a plain
list of ids: [its prompt's virtual ids ‖ BOS ‖ text]. The first stage embeds real ids from the
token table and virtual ids from the prompt table; the other stages see hidden states as always.
Rows of different lengths share one position counter the way generation.generate does: the
batch is prefilled up to its shortest row, then a longer row's own ids are fed one per step
until it runs out. So every row sits at its own true positions (its virtual tokens at 0..n-1,
as in training) and no padding or attention mask is needed: a row in a mixed batch computes
what it computes alone.

Rank 0 chooses every step (the ids to feed, which rows leave) and broadcasts it as a small
object; the other ranks run the same step (`follow`). Run: see serve.py and chat.py.
"""
from dataclasses import dataclass, field

import torch

from llama.serving.generation import next_tokens
from llama.parallel.pipeline import Stage


class PromptBank:
    """Every served soft prompt in one table (first stage only); a name -> its virtual ids."""

    def __init__(self, vocab_size: int, dim: int, prompts: dict):
        self.vocab_size = vocab_size
        self.ids, rows, offset = {}, [torch.zeros(0, dim)], vocab_size
        for name, weight in prompts.items():
            self.ids[name] = list(range(offset, offset + weight.shape[0]))
            offset += weight.shape[0]
            rows.append(weight.detach().float().cpu())
        self.table = torch.cat(rows)  # (all virtual tokens, dim), fp32 like SoftPrompt

    def virtual_ids(self, name) -> list:
        return [] if name is None else list(self.ids[name])


class MixedPromptStage(Stage):
    """A Stage whose first stage embeds virtual ids from a PromptBank (with_prompt is unused:
    the prompt is part of each row's ids)."""

    def __init__(self, model, ctx, bank: PromptBank = None):
        super().__init__(model, ctx)
        self.table = bank.table.to(ctx.device) if bank is not None and ctx.is_first else None

    def hidden_in(self, tokens, with_prompt: bool):
        if not self.is_first or self.table is None:
            return super().hidden_in(tokens, with_prompt=False)
        tokens = tokens.to(self.device)
        vocab_size = self.model.args.vocab_size
        virtual = tokens >= vocab_size
        h = self.model.embed(tokens.masked_fill(virtual, 0))  # (B, T, dim)
        if bool(virtual.any()):
            # The same cast as SoftPrompt.prepend, so a row equals generation with that prompt.
            h[virtual] = self.table[tokens[virtual] - vocab_size].to(h.dtype)
        return h


@dataclass
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


class Steps:
    """The generation steps that every rank runs in step; rank 0 chooses them (`do`), the others
    receive them (`follow`). Each row samples with its own generator, so its draws do not depend
    on the other rows of its batch."""

    def __init__(self, stage: Stage):
        self.stage, self.ctx = stage, stage.ctx
        self.sampling, self.generators = [], []

    # ---- rank 0 ----

    def do(self, work: dict):
        """Send one step to every rank and run it here too; a step returns the picked ids."""
        return self.run(self.ctx.broadcast_object(work))

    def start(self, sampling: list, length: int):
        self.do({"op": "start", "sampling": [vars(s) for s in sampling], "length": length})

    def step(self, chunk: list, start_pos: int, sample: list, keep=None) -> list:
        """Feed chunk (rows of equal length) at start_pos, after dropping the cache rows not in
        keep; the ids picked after it, one per row (sampled where sample[i], else greedy)."""
        return self.do({"op": "step", "chunk": chunk, "start_pos": start_pos, "sample": sample,
                        "keep": keep})

    def end(self):
        self.do({"op": "end"})

    def idle(self):
        """Tells waiting ranks that rank 0 is alive (their waits time out after --timeout_s)."""
        self.do({"op": "idle"})

    def quit(self):
        self.do({"op": "quit"})

    # ---- every rank ----

    def run(self, work: dict):
        op = work["op"]
        if op == "start":
            self.sampling = [Sampling(**s) for s in work["sampling"]]
            self.generators = [torch.Generator().manual_seed(s.seed) for s in self.sampling]
            self.stage.start_generation(len(self.sampling), work["length"])
        elif op == "step":
            if work["keep"] is not None:
                self.keep_rows(work["keep"])
            return self.pick_after(work["chunk"], work["start_pos"], work["sample"])
        elif op == "end":
            self.stage.end_generation()
        return None

    def keep_rows(self, rows: list):
        self.stage.model.keep_cache_rows(rows)
        self.sampling = [self.sampling[i] for i in rows]
        self.generators = [self.generators[i] for i in rows]

    def pick_after(self, chunk, start_pos: int, sample: list) -> list:
        def pick(logits):  # runs on the last stage only
            ids = logits.argmax(dim=-1)
            for i, wanted in enumerate(sample):
                settings = self.sampling[i]
                if wanted and settings.temperature > 0:
                    ids[i] = next_tokens(logits[i:i + 1], settings.temperature, settings.top_p,
                                         self.generators[i])[0]
            return ids

        tokens = torch.tensor(chunk, dtype=torch.long)
        return self.stage.next_ids(tokens, start_pos, with_prompt=False, pick=pick).tolist()


def follow(stage: Stage):
    """Ranks other than 0: run whatever rank 0 broadcasts until it says quit."""
    steps = Steps(stage)
    while True:
        work = stage.ctx.broadcast_object(None)
        if work["op"] == "quit":
            return
        steps.run(work)


@dataclass
class Row:
    """One sequence of a batch. on_token(row, token) returns None to go on, or a finish reason
    ("stop" for a stop string, "cancelled" for a client that left); on_finish(row) is called once."""
    ids: list  # virtual ids + BOS + text ids
    max_new: int
    sampling: Sampling
    stop_ids: tuple
    on_token: callable = None
    on_finish: callable = None
    new: list = field(default_factory=list)
    finish: str = None  # "stop" | "length" | "cancelled"

    def accept(self, token: int, room_left: bool) -> bool:
        """Take a picked id; False once the row is done."""
        if token in self.stop_ids:
            self.finish = "stop"
            return False
        self.new.append(token)
        self.finish = self.on_token(self, token) if self.on_token else None
        if self.finish is None and (len(self.new) >= self.max_new or not room_left):
            self.finish = "length"
        return self.finish is None


def run_batch(steps: Steps, rows: list, max_seq_len: int, should_stop=lambda row: False):
    """Generate for every row at once (rank 0); a row that finishes leaves the batch at the next
    step and is reported at once. should_stop(row) is asked before each step (a client gone)."""
    length = min(max_seq_len, max(len(r.ids) + r.max_new for r in rows))
    steps.start([r.sampling for r in rows], length)
    live, pos, keep = list(rows), 0, None
    chunk = [r.ids[:min(len(r.ids) for r in rows)] for r in rows]
    while live:
        end = pos + len(chunk[0])
        chosen = steps.step(chunk, pos, [end >= len(r.ids) for r in live], keep)
        kept, chunk = [], []
        for i, (row, token) in enumerate(zip(live, chosen)):
            if end < len(row.ids):  # still reading its own ids
                going, token = True, row.ids[end]
            else:
                going = row.accept(token, room_left=end + 1 < length)
            if going and should_stop(row):
                going, row.finish = False, "cancelled"
            if going:
                kept.append(i)
                chunk.append([token])
            elif row.on_finish:
                row.on_finish(row)
        keep = kept if len(kept) < len(live) else None
        live, pos = [live[i] for i in kept], end
    steps.end()  # not after a lost stage: the other ranks are gone or out of step

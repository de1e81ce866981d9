"""The one generation engine: rows that join at any step, each with its own tuning and sampling.

Every rank holds an Engine over its stage: a KV cache of up to max_rows rows and the two kinds
of work done on it. The rows that join in one step are prefilled together, right-padded, each at
its own positions (a (B,) position tensor, a per-row mask, llama/model/transformer.py) and with
its own tuning: a soft prompt's vectors before its text, a prefix's keys and values written into
its first cache positions, an adapter's or a LoRA's outputs. A decode step feeds every row its
last id at its own position. An adapter or a LoRA (a method that acts in every step) adds its
outputs times a per-row gate, 1 for its rows and 0 for the others. So each row computes what it computes alone, and rows of any tunings share a batch.

Rank 0 decides each step (llama/serving/scheduler.py) and broadcasts it as a small plan; every
rank runs it (`run`), the others in `follow`. cuda_graph: decode steps with fixed shapes are
captured and replayed as CUDA graphs (llama/model/static_decode.py); uncaptured on a CPU.
"""
import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llama.errors import BadInput
from llama.model.static_decode import StepGraphs
from llama.serving.sampling import Sampling, pick_ids

STAGE_TUNING = "stage"  # the name of the Stage's own tuning among the engine's


@dataclass
class RowState:
    """What every rank knows of a row: its tuning, sampling, position and last id."""
    tuning: str  # a name in Engine.tunings, or None for the plain model
    sampling: Sampling
    generator: torch.Generator
    pos: int = 0  # cache positions written (virtual ones included)
    last: int = 0  # the id picked last, fed at the next decode step


class Engine:
    """One rank's part of generation: the cache, the rows, prefill and decode steps."""

    def __init__(self, stage, tunings: dict = None, max_rows: int = 8, length: int = None,
                 cuda_graph: bool = None):
        self.stage, self.model, self.ctx = stage, stage.model, stage.ctx
        # The Stage's own tuning is always known: its hooks are on the model, so rows without it
        # must switch it off like any other.
        self.tunings = {STAGE_TUNING: stage.tuning, **(tunings or {})}
        self.max_rows = max_rows
        self.length = min(length or stage.max_seq_len, stage.max_seq_len)
        self.rows = []
        self.model.setup_kv_cache(max_rows, self.length)
        self.caches = [block.attention.cache for block in self.model.layers.values()]
        graphs = stage.cuda_graph if cuda_graph is None else cuda_graph
        if graphs and self.ctx.tp_size > 1 and self.ctx.device.type == "cuda":
            # a captured step would have to hold the TP all-reduces, which are not captured here
            raise BadInput(f"--cuda_graph cannot capture the all-reduces of --tp "
                           f"{self.ctx.tp_size}: leave out one of the two")
        self.graphs = StepGraphs(self.decode_compute, self.ctx.device) if graphs else None
        # A gate per tuning that acts in every step (adapter, LoRA): 1 on its rows, 0 elsewhere
        self.gates = {name: torch.zeros(max_rows, device=self.ctx.device)
                      for name, t in self.tunings.items() if t.in_every_step}

    def n_virtual(self, tuning) -> int:
        return self.tunings[tuning].n_virtual if tuning is not None else 0

    def close(self):
        self.model.clear_kv_cache()

    # ---- plans (every rank) ----

    def run(self, plan: dict) -> dict:
        """Run one step: drop the rows not kept, decode the rows there were, prefill the joining
        rows (appended) and the extended ones. The ids picked, as lists, on every rank."""
        if plan.get("keep") is not None:
            self.keep(plan["keep"])
        decoded = self.decode(len(self.rows)) if plan.get("decode") and self.rows else []
        first = len(self.rows)
        for join in plan.get("join", ()):
            sampling = Sampling(**join["sampling"])
            generator = torch.Generator().manual_seed(sampling.seed)
            self.rows.append(RowState(join["tuning"], sampling, generator))
        joins = [join["ids"] for join in plan.get("join", ())]
        prefilled = self.prefill(first, joins, fresh=True) if joins else []
        for index, ids in plan.get("extend", ()):
            prefilled += self.prefill(index, [ids], fresh=False)
        return {"decoded": decoded, "prefilled": prefilled}

    def do(self, plan: dict) -> dict:
        """Rank 0: send the plan to every rank and run it here too."""
        return self.run(self.ctx.broadcast_object(plan))

    def follow(self):
        """Ranks other than 0: run whatever rank 0 sends until it says quit."""
        while True:
            plan = self.ctx.broadcast_object(None)
            if plan["op"] == "quit":
                return
            if plan["op"] == "step":
                self.run(plan)

    def keep(self, kept: list):
        written = max((self.rows[i].pos for i in kept), default=0)  # later positions: masked
        for cache in self.caches:
            cache.keep_rows(kept, written)
        self.rows = [self.rows[i] for i in kept]

    # ---- prefill: rows that start (or go on) together, each at its own positions ----

    @torch.no_grad()
    def prefill(self, first: int, chunks: list, fresh: bool) -> list:
        """Feed chunks[i] to row first + i, at its position, all in one pass; the ids picked
        after them. fresh: the rows' first ids, where a prompt enters before them and a prefix
        fills the first positions. Rows are right-padded to the longest: a row's padding sits
        after its own positions (masked for it, overwritten by its later ids)."""
        rows = self.rows[first:first + len(chunks)]
        tunings = [self.tunings[r.tuning] if r.tuning is not None else None for r in rows]
        prepended = [t.hidden_virtual if t is not None and fresh else 0 for t in tunings]
        starts = [t.n_virtual - v if fresh and t is not None else r.pos  # after a prefix
                  for r, t, v in zip(rows, tunings, prepended)]
        lengths = [v + len(ids) for v, ids in zip(prepended, chunks)]
        width = max(lengths)
        if len(chunks) > 1 and max(starts) + width > self.length:  # padding would not fit
            return [self.prefill(first + i, [ids], fresh)[0] for i, ids in enumerate(chunks)]
        if fresh:
            self.fill_prefixes(first, tunings)
        h = self.prefill_input(chunks, tunings, prepended, width)
        positions = torch.tensor(starts, dtype=torch.long, device=self.ctx.device)
        gated = tuple(name for name in self.gates if any(r.tuning == name for r in rows))
        end = first + len(chunks)
        visible = max(starts) + width
        with self.caches_as(lambda c: c.view(c.keys[first:end, :visible],
                                             c.values[first:end, :visible])), \
                self.only(None), self.gates_on(gated, rows):
            h = self.model.run_layers(h, positions)
        for row, start, length in zip(rows, starts, lengths):
            row.pos = start + length
        out = h
        if self.stage.is_last:  # each row's last own position
            last = torch.tensor(lengths, device=h.device) - 1
            out = self.model.logits(h[torch.arange(len(rows), device=h.device), last])
        picked = self.pick_and_share(out, rows)
        for row, token in zip(rows, picked):
            row.last = token
        return picked

    def fill_prefixes(self, first: int, tunings: list):
        """Each new row's prefix (if its tuning has one) into that row's first cache positions."""
        for i, tuning in enumerate(tunings):
            if tuning is not None:
                with self.caches_as(lambda cache: cache.row(first + i)), self.only(tuning):
                    tuning.fill_cache(self.model)

    def prefill_input(self, chunks: list, tunings: list, prepended: list, width: int):
        """First stage: each row's embeddings (after its prompt's vectors), right-padded to
        width; the others receive that from the stage before."""
        if not self.stage.is_first:
            return self.receive((len(chunks), width, self.model.args.dim))
        rows = []
        for ids, tuning, virtual in zip(chunks, tunings, prepended):
            h = self.model.embed(torch.tensor([ids], dtype=torch.long, device=self.ctx.device))
            h = tuning.prepend(h) if virtual else h  # (1, virtual + len(ids), dim)
            rows.append(F.pad(h, (0, 0, 0, width - h.shape[1])))
        return torch.cat(rows)  # (rows, width, dim)

    @contextlib.contextmanager
    def caches_as(self, view):
        """The model's caches are view(cache) (a row's alone, or fewer positions) meanwhile."""
        for block, cache in zip(self.model.layers.values(), self.caches):
            block.attention.cache = view(cache)
        try:
            yield
        finally:
            for block, cache in zip(self.model.layers.values(), self.caches):
                block.attention.cache = cache

    @contextlib.contextmanager
    def only(self, tuning):
        """Every tuning off but the given one (None: the plain model)."""
        with contextlib.ExitStack() as stack:
            for other in self.tunings.values():
                if other is not tuning:
                    stack.enter_context(other.off())
            yield

    # ---- decode: every row at its own position ----

    @torch.no_grad()
    def decode(self, n: int) -> list:
        """Feed rows 0..n-1 their last ids; the ids picked after them."""
        rows = self.rows[:n]
        positions = [r.pos for r in rows]
        if self.graphs is None and len(set(positions)) == 1:
            # Every row at one position (one row always): a plain slice of the cache, with no
            # indexed write and no mask (the ids of a row alone and in a batch are compared in
            # tests/test_engine.py)
            positions = positions[0]
        else:
            positions = torch.tensor(positions, dtype=torch.long, device=self.ctx.device)
        if self.stage.is_first:
            x = torch.tensor([[r.last] for r in rows], dtype=torch.long, device=self.ctx.device)
        else:
            x = self.receive((n, 1, self.model.args.dim))
        gated = tuple(name for name in self.gates if any(r.tuning == name for r in rows))
        with self.only(None), self.gates_on(gated, rows):
            if self.graphs is not None:  # fixed shapes: attention over the whole cache
                out = self.graphs((n, gated), x, positions)
            elif not torch.is_tensor(positions):  # the cache's slice up to the position
                out = self.decode_compute(x, positions)
            else:  # attention over the positions some row has written, not the whole cache
                with self.caches_as(lambda cache: cache.narrow(max(r.pos for r in rows) + 1)):
                    out = self.decode_compute(x, positions)
        for row in rows:
            row.pos += 1
        picked = self.pick_and_share(out, rows)
        for row, token in zip(rows, picked):
            row.last = token
        return picked

    def decode_compute(self, x, positions):
        """ids (B, 1) or h (B, 1, dim) at per-row positions -> logits (B, vocab) or h."""
        h = self.model.embed(x) if self.stage.is_first else x
        h = self.model.run_layers(h, positions)
        return self.model.logits(h[:, -1]) if self.stage.is_last else h

    @contextlib.contextmanager
    def gates_on(self, names: tuple, rows: list):
        """The named tunings (adapters, LoRAs) on, each for its own rows only (a gate of 1, 0
        elsewhere)."""
        tunings = [self.tunings[name] for name in names]
        try:
            for name, tuning in zip(names, tunings):
                gate = self.gates[name]  # one buffer: a captured graph reads the same memory
                gate[:len(rows)].copy_(torch.tensor([float(r.tuning == name) for r in rows]))
                tuning.row_gate, tuning.active = gate[:len(rows)], True
            yield
        finally:
            for tuning in tunings:
                tuning.row_gate, tuning.active = None, False

    # ---- transport ----

    def receive(self, shape):
        return self.ctx.recv(shape, self.stage.dtype, self.ctx.prev_rank)

    def pick_and_share(self, out, rows: list) -> list:
        """The last stage picks one id per row from its logits (its TP rank 0: the logits are
        the same on each); every rank gets them. The others pass h on first."""
        if not self.stage.is_last:
            self.ctx.send(out, self.ctx.next_rank)
        self.ctx.flush_sends()
        chosen = torch.zeros(len(rows), dtype=torch.long)
        picker = self.ctx.rank_of(self.ctx.n_stages - 1, tp_rank=0)
        if self.ctx.rank == picker:
            chosen = pick_ids(out, [r.sampling for r in rows], [r.generator for r in rows])
        chosen = self.ctx.broadcast_tensor(chosen.to(self.ctx.device), src=picker)
        return chosen.cpu().tolist()

"""Rank 0's side of the engine: which rows leave, which join and when, and what each row is owed.

A Request is one sequence to continue: its ids, tuning, sampling and stop rule, and callbacks
for each new id and for its end. The Batcher runs steps (continuous batching): at each one the
rows that finished leave, waiting requests join while there is room (prefilled in that step,
decoding from the next), and every other row decodes one id. Run: see generation.generate and
llama/serving/service.py.
"""
import collections
from dataclasses import dataclass, field

from llama.errors import BadInput
from llama.serving.sampling import Sampling


@dataclass
class Request:
    """on_token(request, id) returns None to go on, or a finish reason ("stop" for a stop string,
    "cancelled" for a client that left); on_finish(request) is called once, at its end."""
    ids: list  # BOS + text
    max_new: int
    tuning: str = None  # a name of the engine's tunings; None: the plain model
    sampling: Sampling = field(default_factory=Sampling)
    stop_ids: tuple = ()
    on_token: callable = None
    on_finish: callable = None
    owner: object = None  # whatever the caller ties to it (the server: its Job)
    new: list = field(default_factory=list)
    finish: str = None  # "stop" | "length" | "cancelled" | "error"


class Batcher:
    """Decides every step on rank 0 and has every rank run it (Engine.do)."""

    def __init__(self, engine, should_stop=lambda request: False):
        self.engine = engine
        self.should_stop = should_stop  # asked before each step (a client gone)
        self.live = []  # the requests of the engine's rows, in its order
        self.waiting = collections.deque()

    def submit(self, request: Request):
        """Queue a request; BadInput when it can never fit the engine's cache."""
        room = self.engine.length - self.engine.n_virtual(request.tuning) - len(request.ids)
        if not request.ids or room < 1 or request.max_new < 1:
            raise BadInput(f"a prompt of {len(request.ids)} tokens (+"
                           f"{self.engine.n_virtual(request.tuning)} virtual) and max_new="
                           f"{request.max_new} do not fit {self.engine.length} positions: "
                           "shorten the prompt or raise --max_seq_len")
        self.waiting.append(request)

    @property
    def busy(self) -> bool:
        return bool(self.live or self.waiting)

    def step(self):
        """One step on every rank: leave, decode, join; then each new id goes to its request."""
        for request in self.live:
            if request.finish is None and self.should_stop(request):
                self.end(request, "cancelled")
        kept = [i for i, r in enumerate(self.live) if r.finish is None]
        staying = [self.live[i] for i in kept]
        while self.waiting and self.waiting[0].finish is not None:
            self.waiting.popleft()  # cancelled while it waited
        joining = []
        while self.waiting and len(staying) + len(joining) < self.engine.max_rows:
            joining.append(self.waiting.popleft())
        plan = {"op": "step", "keep": kept if len(kept) < len(self.live) else None,
                "decode": bool(staying),
                "join": [{"ids": r.ids, "tuning": r.tuning, "sampling": vars(r.sampling)}
                         for r in joining]}
        self.live = staying + joining  # before the step: a lost stage still finds them here
        picked = self.engine.do(plan)
        for index, (request, token) in enumerate(
                zip(self.live, picked["decoded"] + picked["prefilled"])):
            self.accept(request, token, self.engine.rows[index].pos)

    def accept(self, request: Request, token: int, position: int):
        """Take the id picked for request, which would sit at cache position `position`."""
        if token in request.stop_ids:
            return self.end(request, "stop")
        request.new.append(token)
        finish = request.on_token(request, token) if request.on_token else None
        if finish is None and (len(request.new) >= request.max_new
                               or position + 1 >= self.engine.length):
            finish = "length"
        if finish is not None:
            self.end(request, finish)

    def end(self, request: Request, finish: str):
        request.finish = finish
        if request.on_finish:
            request.on_finish(request)

    def abandon(self) -> list:
        """Forget every request (the engine's rows stay as they are: it is closing) and return
        those not finished, so their callers can be told why."""
        pending = [r for r in self.live + list(self.waiting) if r.finish is None]
        self.live, self.waiting = [], collections.deque()
        return pending

    def run(self):
        """Steps until every request submitted so far is done."""
        while self.busy:
            self.step()

    def idle(self):
        """Tells waiting ranks that rank 0 is alive (their waits time out after --timeout_s)."""
        self.engine.ctx.broadcast_object({"op": "idle"})

    def quit(self):
        """The other ranks leave Engine.follow (not after a lost stage: they are gone)."""
        self.engine.ctx.broadcast_object({"op": "quit"})

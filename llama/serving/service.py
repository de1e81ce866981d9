"""The server's side of generation: the served models, the queue, and the loop that feeds the engine.

HTTP handler threads turn bodies into Jobs (llama/serving/requests.py checks them) and queue
them; rank 0's main thread runs `serve`: continuous batching on the engine (a queued job joins
at the next step while there is a free row; a finished one leaves at once). Each job's text
comes back through its events queue: ("text", piece)..., then ("done", finish, n_new) or
("error", ApiError).
"""
import hmac
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

from llama.parallel.faults import PeerLost
from llama.serving.conversation import DEFAULT_TEMPLATE
from llama.serving.detokenize import Detokenizer, StopWatch
from llama.serving.metrics import Metrics
from llama.serving.requests import (ApiError, Limits, max_new_tokens, model_named, prompt_ids,
                                    refuse_unsupported, sampling_of, stop_strings, streaming)
from llama.serving.sampling import Sampling
from llama.serving.scheduler import Batcher, Request

SHUTDOWN_WAIT_S = 5.0  # how long a stopping server waits for handlers to write their last words


@dataclass
class Served:
    """A model name the server answers to: one of the engine's tunings (None: the base model)."""
    tuning: str = None
    n_virtual: int = 0
    template: str = None


@dataclass
class Job:
    """A validated completion request, and the channel its answer comes back through."""
    kind: str  # "completion" | "chat"
    model: str
    prompt_ids: list  # BOS + text (what usage counts as prompt_tokens)
    tuning: str
    max_tokens: int
    sampling: Sampling
    stops: list
    stream: bool
    include_usage: bool = False
    events: queue.Queue = field(default_factory=queue.Queue)
    gone: threading.Event = field(default_factory=threading.Event)  # the client left
    arrived: float = field(default_factory=time.monotonic)
    first_at: float = None  # when its first id came
    last_at: float = None
    n_new: int = 0
    finish: str = None
    id: str = ""

    def __post_init__(self):
        self.id = f"{'chatcmpl' if self.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.sent = 0  # characters of self.watch.text handed to the client
        self.cut = False  # a stop string ended the text

    def request(self, tokenizer, metrics: Metrics, on_end) -> Request:
        self.metrics, self.on_end = metrics, on_end
        self.detokenizer = Detokenizer(tokenizer, self.prompt_ids)
        self.watch = StopWatch(self.stops)
        return Request(self.prompt_ids, self.max_tokens, self.tuning, self.sampling,
                       tokenizer.stop_ids, on_token=self.on_token, on_finish=self.on_finish,
                       owner=self)

    def on_token(self, request: Request, token: int):
        now = time.monotonic()
        if self.first_at is None:
            self.first_at = now
            self.metrics.first_token(now - self.arrived)
        else:
            self.metrics.next_token(now - self.last_at)
        self.last_at = now
        if self.gone.is_set():
            return "cancelled"
        return self.take(self.detokenizer.add(token))

    def take(self, piece: str):
        """Add text; "stop" once a stop string is in it (the text ends before it)."""
        cut = self.watch.add(piece)
        if cut >= 0:
            self.cut = True
            self.send_upto(cut)
            return "stop"
        self.send_upto(self.watch.safe_end())  # what could begin a stop string waits
        return None

    def send_upto(self, end: int):
        if end > self.sent:
            self.events.put(("text", self.watch.text[self.sent:end]))
            self.sent = end

    def on_finish(self, request: Request):
        finish = request.finish
        if not self.cut and finish != "cancelled":
            finish = self.take(self.detokenizer.finish(request.new)) or finish
            if not self.cut:
                self.send_upto(len(self.watch.text))
        self.n_new, self.finish = len(request.new), finish
        self.on_end(self)
        self.events.put(("done", finish, self.n_new))

    def usage(self) -> dict:
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": self.n_new,
                "total_tokens": len(self.prompt_ids) + self.n_new}


class Service:
    """What the HTTP handlers need: the models, the limits, the queue, the state of the stages."""

    def __init__(self, tokenizer, served: dict, base_name: str, max_seq_len: int,
                 limits: Limits, api_key: str = None):
        self.tokenizer, self.served = tokenizer, {base_name: Served(), **(served or {})}
        self.base_name, self.max_seq_len, self.limits = base_name, max_seq_len, limits
        self.api_key = api_key
        self.jobs = queue.Queue()
        self.down = None  # why the stages can serve no more (a lost stage, a bug)
        self.down_code = "stage_lost"
        self.closing = False  # shutting down: no new jobs
        self.stats = {"batches": 0, "rows": 0, "largest_batch": 0, "cancelled": 0}
        self.metrics = Metrics(limits.max_batch)
        self.created = int(time.time())
        self.open_jobs, self.open_lock = 0, threading.Lock()

    def models(self) -> list:
        return list(self.served)

    def authorized(self, header: str) -> bool:
        if not self.api_key:
            return True
        given = (header or "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(given.encode(), self.api_key.encode())

    def job(self, body: dict, kind: str) -> Job:
        """A request body -> a Job, or an ApiError saying what is wrong with it."""
        refuse_unsupported(body)
        model = model_named(body, self.models())
        served = self.served[model]
        ids = prompt_ids(body, kind, self.tokenizer, served.template or DEFAULT_TEMPLATE)
        max_tokens = max_new_tokens(body, kind, len(ids), served.n_virtual, self.limits,
                                    self.max_seq_len)
        sampling = sampling_of(body)
        stream, include_usage = streaming(body)
        return Job(kind, model, ids, served.tuning, max_tokens, sampling, stop_strings(body),
                   stream, include_usage)

    def submit(self, job: Job):
        if self.down:
            what = "lost a pipeline stage" if self.down_code == "stage_lost" else "failed"
            raise ApiError(503, f"the server {what} and is stopping: {self.down}",
                           kind="server_error", code=self.down_code)
        with self.open_lock:  # closing is set under it too: no job slips in after the last drain
            if self.closing:
                raise ApiError(503, "the server is shutting down: retry on another one or later",
                               kind="server_error", code="server_shutdown")
            self.open_jobs += 1
            self.jobs.put(job)

    def job_closed(self):
        """A handler is done with its job (its answer written, or its client gone)."""
        with self.open_lock:
            self.open_jobs -= 1

    def wait_for_handlers(self, limit_s: float = SHUTDOWN_WAIT_S):
        deadline = time.monotonic() + limit_s
        while self.open_jobs > 0 and time.monotonic() < deadline:
            time.sleep(0.02)

    # ---- the generation loop (rank 0's main thread) ----

    def serve(self, engine, stopping: threading.Event, heartbeat_s: float):
        """Steps until stopping is set; then every unfinished reply ends with a 503 error. A
        lost stage answers 503 to everyone and raises."""
        batcher = Batcher(engine, should_stop=lambda request: request.owner.gone.is_set())
        try:
            while not stopping.is_set():
                self.admit(batcher, heartbeat_s)
                if batcher.busy:
                    self.step(batcher)
                else:
                    batcher.idle()
            with self.open_lock:
                self.closing = True
            self.fail(batcher, ApiError(503, "the server is shutting down: this reply was cut "
                                        "off; send the request again to another server or "
                                        "later", kind="server_error", code="server_shutdown"))
        except PeerLost as error:
            self.down = str(error)
            self.fail(batcher, ApiError(503, f"a pipeline stage was lost: {error}",
                                        kind="server_error", code="stage_lost"))
            raise
        except Exception as error:  # a bug: its replies end with a 500, not a hang, then the trace
            self.down, self.down_code = f"{type(error).__name__}: {error}", "internal_error"
            self.fail(batcher, ApiError(500, f"generation failed ({self.down}); the server is "
                                        "stopping", kind="server_error", code="internal_error"))
            raise
        return batcher

    def admit(self, batcher: Batcher, wait_s: float):
        """Queued jobs into the batcher. An idle server waits up to wait_s for one, then up to
        --max_wait_ms for more to start together; a busy one takes what is there (they join
        at the next step)."""
        if batcher.busy and not self.limits.continuous:
            return
        if not batcher.busy:
            try:
                self.add(batcher, self.jobs.get(timeout=wait_s))
            except queue.Empty:
                return
            self.stats["batches"] += 1
            deadline = time.monotonic() + self.limits.max_wait_ms / 1000
            while len(batcher.waiting) < self.limits.max_batch:
                try:
                    self.add(batcher, self.jobs.get(timeout=max(deadline - time.monotonic(), 0)))
                except queue.Empty:
                    break
        for job in drain(self.jobs):
            self.add(batcher, job)

    def add(self, batcher: Batcher, job: Job):
        if job.gone.is_set():
            return
        self.stats["rows"] += 1
        batcher.submit(job.request(self.tokenizer, self.metrics, self.ended))

    def step(self, batcher: Batcher):
        batcher.step()
        rows = sum(request.finish is None for request in batcher.live)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], rows)
        self.metrics.step(rows, len(batcher.waiting) + self.jobs.qsize())

    def ended(self, job: Job):
        if job.finish == "cancelled":
            self.stats["cancelled"] += 1

    def fail(self, batcher: Batcher, error: ApiError):
        """End every job not finished yet with error (the rows are left as they are)."""
        for job in [request.owner for request in batcher.abandon()] + drain(self.jobs):
            job.events.put(("error", error))
        self.metrics.step(0, 0)


def drain(jobs: queue.Queue) -> list:
    out = []
    while True:
        try:
            out.append(jobs.get_nowait())
        except queue.Empty:
            return out

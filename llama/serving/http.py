"""An OpenAI-compatible HTTP server (standard library only) that serves many soft prompts at once.

Rank 0 runs the HTTP front in threads and the generation loop in its main thread; requests wait
in a queue, and up to --max_batch of them (gathered for at most --max_wait_ms) run as one
pipelined batch in which every row may use a different soft prompt or none (llama/serving/batching.py).
The other ranks follow rank 0's steps. Run: see serve.py.
"""
import hmac
import ipaddress
import json
import math
import queue
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from llama.serving.batching import Row, Sampling, Steps, follow, run_batch
from llama.serving.conversation import DEFAULT_TEMPLATE, conversation_ids
from llama.errors import BadInput
from llama.parallel.faults import PeerLost

UNSUPPORTED = {  # field -> the only values accepted (anything else is refused, not ignored)
    "n": (None, 1), "best_of": (None, 1), "echo": (None, False), "logprobs": (None, False, 0),
    "top_logprobs": (None, 0), "logit_bias": (None, {}), "suffix": (None, ""),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "tools": (None, []),
}
MAX_STOP_STRINGS = 4


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 0  # 0: whatever fits max_seq_len
    max_tokens: int = 256
    max_batch: int = 8
    max_wait_ms: float = 10.0
    idle_timeout_s: float = 30.0  # a connection silent this long is closed
    max_connections: int = 64  # open at once; more are answered 503 and closed


class ApiError(Exception):
    """An OpenAI-style error: HTTP status and {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param=None, code=None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param,
                          "code": self.code}}


def parse_served_prompts(text) -> dict:
    """'alpaca=runs/alpaca,max=runs/max' (or a list of NAME=FOLDER) -> {name: folder}."""
    items = text if isinstance(text, (list, tuple)) else [t for t in (text or "").split(",")]
    named = {}
    for item in (i.strip() for i in items):
        if not item:
            continue
        name, sep, folder = item.partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise BadInput(f"--prompts item {item!r} must be NAME=FOLDER (for example "
                           "alpaca=runs/alpaca/prompt)")
        if name.strip() in named:
            raise BadInput(f"--prompts names {name.strip()!r} twice: give each prompt its own name")
        named[name.strip()] = folder.strip()
    return named


# ---- one request ----

@dataclass
class Job:
    """A validated completion request, and the channel its answer comes back through."""
    kind: str  # "completion" | "chat"
    model: str
    prompt_ids: list  # BOS + text (what usage counts as prompt_tokens)
    virtual_ids: list
    max_tokens: int
    sampling: Sampling
    stops: list
    stream: bool
    events: queue.Queue = field(default_factory=queue.Queue)
    gone: threading.Event = field(default_factory=threading.Event)  # the client left
    sent: str = ""  # the text already handed to the client
    id: str = ""

    def __post_init__(self):
        self.id = f"{'chatcmpl' if self.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"

    def row(self, tokenizer) -> Row:
        return Row(self.virtual_ids + self.prompt_ids, self.max_tokens, self.sampling,
                   tokenizer.stop_ids, on_token=lambda row, token: self.on_token(row, tokenizer),
                   on_finish=lambda row: self.on_finish(row, tokenizer))

    def text_of(self, row, tokenizer) -> str:
        whole = tokenizer.decode(self.prompt_ids + row.new)
        return whole[len(tokenizer.decode(self.prompt_ids)):]

    def on_token(self, row, tokenizer):
        if self.gone.is_set():
            return "cancelled"
        text = self.text_of(row, tokenizer)
        cut = min((text.find(s) for s in self.stops if s in text), default=-1)
        if cut >= 0:
            self.send_text(text[:cut])
            return "stop"
        # Hold back what could still become a stop string, and half a UTF-8 character.
        hold = max((len(s) - 1 for s in self.stops), default=0)
        self.send_text(text[:len(text) - hold].rstrip("\ufffd"))
        return None

    def send_text(self, text: str):
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.events.put(("text", text[len(self.sent):]))
            self.sent = text

    def on_finish(self, row, tokenizer):
        if row.finish != "stop" or not self.stops:
            text = self.text_of(row, tokenizer).rstrip("\ufffd")
            if not any(s in text for s in self.stops):
                self.send_text(text)
        self.events.put(("done", row.finish, len(row.new)))


def number(body: dict, name: str, default, low, high, integer=False):
    value = body.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    # Python compares an int of any size with a float exactly; math.isfinite(int) would first
    # convert it to a float, which overflows for 400 digits. So the finite test is for floats.
    if isinstance(value, bool) or not isinstance(value, kinds) \
            or (isinstance(value, float) and not math.isfinite(value)) or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise ApiError(400, f"{name}={shorten(json.dumps(value))} must be {what} from {low} to "
                       f"{high}", param=name, code="invalid_value")
    return value


def shorten(text: str, most: int = 40) -> str:
    """A value quoted in an error, cut so that a 5,000-digit number does not fill the reply."""
    return text if len(text) <= most else f"{text[:most]}… ({len(text)} characters)"


def encode(tokenizer, text: str, param: str) -> list:
    try:
        return tokenizer.encode(text, bos=True, eos=False)
    except BadInput as error:  # a lone surrogate ("\\ud800") is valid JSON but not text
        raise ApiError(400, f"{param}: {error}", param=param, code="invalid_value") from None


def stop_strings(body: dict) -> list:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) \
            or len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"stop must be a non-empty string or a list of at most "
                       f"{MAX_STOP_STRINGS} of them", param="stop", code="invalid_value")
    return stops


def refuse_unsupported(body: dict):
    for name, accepted in UNSUPPORTED.items():
        if name in body and body[name] not in accepted:
            raise ApiError(400, f"{name}={json.dumps(body[name])} is not supported by this "
                           f"server (only {json.dumps(accepted[-1])})", param=name,
                           code="unsupported_value")


def chat_messages(body: dict) -> list:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content}",
                       param="messages", code="invalid_value")
    out = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                content = None
            else:
                content = "".join(p["text"] for p in content)
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise ApiError(400, f"messages[{i}] must be {{\"role\": system|user|assistant, "
                           "\"content\": text}", param="messages", code="invalid_value")
        out.append((role, content))
    if out[-1][0] != "user":
        raise ApiError(400, "the last message must be the user's", param="messages",
                       code="invalid_value")
    return out


class Service:
    """What the HTTP handlers need: the models, the limits, the queue, the state of the stages."""

    def __init__(self, tokenizer, bank, templates: dict, base_name: str, max_seq_len: int,
                 limits: Limits, api_key: str = None):
        self.tokenizer, self.bank, self.templates = tokenizer, bank, templates
        self.base_name, self.max_seq_len, self.limits = base_name, max_seq_len, limits
        self.api_key = api_key
        self.jobs = queue.Queue()
        self.down = None  # why the stages can serve no more (a lost stage)
        self.stats = {"batches": 0, "rows": 0, "largest_batch": 0, "cancelled": 0}
        self.created = int(time.time())

    def models(self) -> list:
        return [self.base_name] + list(self.bank.ids if self.bank else [])

    def authorized(self, header: str) -> bool:
        if not self.api_key:
            return True
        given = (header or "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(given.encode(), self.api_key.encode())

    def job(self, body: dict, kind: str) -> Job:
        """A request body -> a Job, or an ApiError saying what is wrong with it."""
        refuse_unsupported(body)
        model = body.get("model")
        if not isinstance(model, str) or model not in self.models():
            raise ApiError(404, f"The model {json.dumps(model)} does not exist: GET /v1/models "
                           f"lists {', '.join(self.models())}", param="model",
                           code="model_not_found")
        prompt_name = None if model == self.base_name else model
        template = self.templates.get(prompt_name) or DEFAULT_TEMPLATE
        if kind == "chat":
            try:
                ids = conversation_ids(self.tokenizer, template, chat_messages(body))
            except BadInput as error:  # a lone surrogate in a message
                raise ApiError(400, f"messages: {error}", param="messages",
                               code="invalid_value") from None
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise ApiError(400, "prompt must be a string (or a list of one string)",
                               param="prompt", code="invalid_value")
            ids = encode(self.tokenizer, prompt, "prompt")
        virtual = self.bank.virtual_ids(prompt_name) if self.bank and prompt_name else []
        limit = self.limits.max_prompt_tokens or self.max_seq_len
        room = self.max_seq_len - len(virtual) - len(ids)
        if len(ids) > limit or room < 1:
            raise ApiError(400, f"the prompt is {len(ids)} tokens (+{len(virtual)} virtual); "
                           f"this server takes at most {min(limit, self.max_seq_len - len(virtual) - 1)}:"
                           " shorten it", param="messages" if kind == "chat" else "prompt",
                           code="context_length_exceeded")
        default_tokens = 16 if kind == "completion" else min(self.limits.max_tokens, room)
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
            else "max_tokens"
        max_tokens = number(body, name, default_tokens, 1, self.limits.max_tokens, integer=True)
        if max_tokens > room:
            raise ApiError(400, f"the prompt ({len(ids)} tokens, +{len(virtual)} virtual) and "
                           f"{name}={max_tokens} exceed the context of {self.max_seq_len} "
                           f"tokens: lower {name} to at most {room}", param=name,
                           code="context_length_exceeded")
        sampling = Sampling(number(body, "temperature", 1.0, 0, 2),
                            number(body, "top_p", 1.0, 0, 1),
                            number(body, "seed", 0, -(2 ** 63), 2 ** 63 - 1, integer=True))
        if sampling.top_p == 0:
            sampling.temperature = 0.0  # nothing left to sample from but the likeliest
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "stream must be true or false", param="stream",
                           code="invalid_value")
        return Job(kind, model, ids, virtual, max_tokens, sampling, stop_strings(body), stream)

    def submit(self, job: Job):
        if self.down:
            raise ApiError(503, f"the server lost a pipeline stage and is stopping: {self.down}",
                           kind="server_error", code="stage_lost")
        self.jobs.put(job)

    # ---- the generation loop (rank 0's main thread) ----

    def next_batch(self, wait_s: float) -> list:
        """Up to max_batch jobs: the first that comes within wait_s, then what arrives within
        max_wait_ms of it. Jobs whose clients already left are dropped."""
        try:
            batch = [self.jobs.get(timeout=wait_s)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.limits.max_wait_ms / 1000
        while len(batch) < self.limits.max_batch:
            try:
                batch.append(self.jobs.get(timeout=max(deadline - time.monotonic(), 0)))
            except queue.Empty:
                break
        return [job for job in batch if not job.gone.is_set()]

    def serve(self, steps: Steps, stopping: threading.Event, heartbeat_s: float):
        """Run batches until stopping is set; a lost stage answers 503 to everyone and raises."""
        in_flight = []
        try:
            while not stopping.is_set():
                in_flight = self.next_batch(heartbeat_s)
                if not in_flight:
                    steps.idle()
                    continue
                self.stats["batches"] += 1
                self.stats["rows"] += len(in_flight)
                self.stats["largest_batch"] = max(self.stats["largest_batch"], len(in_flight))
                rows = [job.row(self.tokenizer) for job in in_flight]
                owner = {id(row): job for row, job in zip(rows, in_flight)}
                run_batch(steps, rows, self.max_seq_len,
                          should_stop=lambda row: owner[id(row)].gone.is_set())
                self.stats["cancelled"] += sum(row.finish == "cancelled" for row in rows)
                in_flight = []
        except PeerLost as error:
            self.down = str(error)
            for job in in_flight + drain(self.jobs):
                job.events.put(("error", ApiError(503, f"a pipeline stage was lost: {error}",
                                                  kind="server_error", code="stage_lost")))
            raise


def drain(jobs: queue.Queue) -> list:
    out = []
    while True:
        try:
            out.append(jobs.get_nowait())
        except queue.Empty:
            return out


# ---- HTTP ----

LOCAL_NAMES = ("localhost",)
LINGER_S, LINGER_BYTES = 1.0, 1 << 20  # how long and how much a closing connection is drained


@dataclass
class Access:
    """Which browsers' requests a server answers. A page the user visits may send requests to
    127.0.0.1 too: under its own origin (refused by the Origin check), or under a DNS name of its
    own that it re-points at 127.0.0.1 (DNS rebinding: refused by the Host check, since only IP
    literals, localhost and the names given here are answered)."""
    bound_host: str = "127.0.0.1"
    allow_origins: tuple = ()  # origins (https://app.example) whose pages may call; "*": any
    allow_hosts: tuple = ()  # more names the server is reached by; "*": any

    def host_allowed(self, host) -> bool:
        if host is None or "*" in self.allow_hosts:  # browsers always send a Host
            return True
        name = host_name(host)
        if name in LOCAL_NAMES or name == self.bound_host.lower() or name in self.allow_hosts:
            return True
        try:
            ipaddress.ip_address(name)
            return True  # an IP literal: no DNS answer can re-point it
        except ValueError:
            return False

    def origin_listed(self, origin) -> bool:
        return origin is not None and ("*" in self.allow_origins or origin in self.allow_origins)

    def origin_allowed(self, origin, host) -> bool:
        return origin is None or origin == f"http://{host}" or self.origin_listed(origin)


def host_name(host: str) -> str:
    """'Example.com:8000' -> 'example.com'; '[::1]:8000' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0].rstrip(".") if host.count(":") == 1 else host.rstrip(".")


def content_length(text: str, most: int) -> int:
    """A Content-Length header -> the number of bytes, or an ApiError."""
    text = text.strip()
    if not (text.isascii() and text.isdigit()):  # "²".isdigit() is True, int("²") fails
        raise ApiError(400, f"Content-Length {shorten(repr(text))} is not a number of bytes",
                       code="invalid_content_length")
    if len(text) > 18 or int(text) > most:  # 18 digits: int() of thousands would be refused
        raise ApiError(413, f"the body is {shorten(text)} bytes; this server takes at most "
                       f"{most} (--max_body_bytes)", code="body_too_large")
    return int(text)


class Handler(BaseHTTPRequestHandler):
    """One connection's requests. make_handler binds it to a server's service, access rules and
    log (the standard library's server makes one Handler per connection from the class)."""
    service: Service = None
    access: Access = None
    log_to = None  # a function of one line, or None: no access log
    protocol_version = "HTTP/1.1"
    server_version = "llama-pp-prompt"
    timeout = None  # per read or write, in seconds: idle clients are dropped (bound below)
    # The standard library's default, HTTP/0.9, answers without a status line: requests it
    # refuses before their version is read ("POST / FTP/1.1") and bare "GET /" lines.
    default_request_version = "HTTP/1.0"

    def log_message(self, format, *args):
        if self.log_to:
            self.log_to(f"{self.address_string()} {format % args}")

    def do_GET(self):
        self.answer(self.get)

    def do_POST(self):
        self.answer(self.post)

    def do_OPTIONS(self):
        self.answer(self.preflight)

    def answer(self, route):
        self.body_read = False
        try:
            self.check_request()
            route()
        except ApiError as error:
            if self.body_unread():  # else its bytes would be read as the next request
                self.close_connection = True
            try:
                self.send_json(error.status, error.body())
            except (ConnectionError, TimeoutError):
                self.close_connection = True
        except (ConnectionError, TimeoutError):
            self.close_connection = True

    def body_unread(self) -> bool:
        announced = self.headers.get("Content-Length", "0").strip() != "0" or \
            "Transfer-Encoding" in self.headers
        return announced and not self.body_read

    def check_request(self):
        """Framing, Host and Origin, the API key, the Content-Type: in that order."""
        for name in ("Host", "Content-Length", "Authorization", "Origin"):
            if len(self.headers.get_all(name, [])) > 1:
                self.close_connection = True
                raise ApiError(400, f"the request has {name} twice", code="invalid_header")
        if "Transfer-Encoding" in self.headers:  # with Content-Length: request smuggling
            self.close_connection = True
            raise ApiError(400, "Transfer-Encoding is not supported: send the body with a "
                           "Content-Length", code="invalid_header")
        if self.command != "POST" and self.body_unread():
            self.close_connection = True  # only a POST's body is ever read
        host, origin = self.headers.get("Host"), self.headers.get("Origin")
        if not self.access.host_allowed(host):
            raise ApiError(421, f"Host {shorten(repr(host))} is not a name of this server "
                           "(a DNS name re-pointed here is refused): use its IP address or "
                           "localhost, or start it with --allow_hosts NAME",
                           code="host_not_allowed")
        if not self.access.origin_allowed(origin, host):
            raise ApiError(403, f"requests from pages of {shorten(repr(origin))} are "
                           f"refused: start the server with --allow_origins {shorten(origin)} "
                           "to let that site use it", code="origin_not_allowed")
        if self.path not in ("/health", "/v1/health") and self.command != "OPTIONS" and \
                not self.service.authorized(self.headers.get("Authorization")):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer "
                           "<key>'", code="invalid_api_key")
        media = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if self.command == "POST" and media != "application/json":
            # A form or a plain fetch() of another site can send text/plain without asking.
            raise ApiError(415, f"a POST body must come with 'Content-Type: application/"
                           f"json', not {shorten(repr(media or None))}",
                           code="unsupported_media_type")

    def preflight(self):
        """A browser asks before a cross-origin POST with JSON: yes only to listed origins."""
        if not self.access.origin_listed(self.headers.get("Origin")):
            raise ApiError(403, "cross-origin requests are refused: start the server with "
                           "--allow_origins ORIGIN to allow a site", code="origin_not_allowed")
        self.send_response(204)
        self.send_cors_headers()
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def send_cors_headers(self):
        origin = self.headers.get("Origin")
        if self.access.origin_listed(origin):
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")

    def get(self):
        if self.path in ("/health", "/v1/health"):
            status = 503 if self.service.down else 200
            self.send_json(status, {"status": "down" if self.service.down else "ok",
                                    "models": self.service.models(), **self.service.stats})
        elif self.path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [
                {"id": name, "object": "model", "created": self.service.created,
                 "owned_by": "llama-pp-prompt"} for name in self.service.models()]})
        else:
            raise ApiError(404, f"no such endpoint: GET {shorten(self.path)}",
                           code="not_found")

    def post(self):
        kinds = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}
        if self.path not in kinds:
            raise ApiError(404, f"no such endpoint: POST {shorten(self.path)}",
                           code="not_found")
        job = self.service.job(self.read_json(), kinds[self.path])
        self.service.submit(job)
        if job.stream:
            self.stream(job)
        else:
            self.whole(job)

    def read_json(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "a request body needs a Content-Length header",
                           code="length_required")
        size = content_length(length, self.service.limits.max_body_bytes)
        try:
            raw = self.rfile.read(size)
        except TimeoutError:
            raise ApiError(408, f"the body did not arrive within {self.timeout:g} s "
                           "(--idle_timeout_s)", code="request_timeout") from None
        self.body_read = True
        try:
            body = json.loads(raw.decode("utf-8"), parse_constant=refuse_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as error:
            raise ApiError(400, f"the body is not valid JSON ({shorten(str(error), 120)})",
                           code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object", code="invalid_json")
        return body

    def whole(self, job: Job):
        text, event = "", job.events.get()
        while event[0] == "text":
            text += event[1]
            event = job.events.get()
        if event[0] == "error":
            raise event[1]
        _, finish, n_new = event
        choice = {"index": 0, "finish_reason": finish}
        if job.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice.update(text=text, logprobs=None)
        self.send_json(200, {**header(job), "choices": [choice],
                             "usage": {"prompt_tokens": len(job.prompt_ids),
                                       "completion_tokens": n_new,
                                       "total_tokens": len(job.prompt_ids) + n_new}})

    def stream(self, job: Job):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.send_cors_headers()
        self.end_headers()
        self.close_connection = True
        try:
            if job.kind == "chat":
                self.event(job, {"role": "assistant", "content": ""}, None)
            while True:
                event = job.events.get()
                if event[0] == "text":
                    self.event(job, event[1], None)
                elif event[0] == "error":
                    self.sse(event[1].body())
                    return
                else:
                    self.event(job, "" if job.kind == "completion" else {}, event[1])
                    self.sse("[DONE]")
                    return
        except (ConnectionError, TimeoutError):
            job.gone.set()  # its row leaves the batch at the next step

    def event(self, job: Job, piece, finish):
        choice = {"index": 0, "finish_reason": finish}
        if job.kind == "chat":
            choice["delta"] = piece if isinstance(piece, dict) else {"content": piece}
            self.sse({**header(job, ".chunk"), "choices": [choice]})
        else:
            choice.update(text=piece, logprobs=None)
            self.sse({**header(job), "choices": [choice]})

    def sse(self, data):
        text = data if isinstance(data, str) else json.dumps(data)
        self.wfile.write(f"data: {text}\n\n".encode())
        self.wfile.flush()

    def send_json(self, status: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.send_cors_headers()
        self.end_headers()
        self.wfile.write(data)


def make_handler(service: Service, access: Access, log=None):
    """The Handler class for one server: its service, access rules, access log and idle timeout."""
    return type("BoundHandler", (Handler,), {
        "service": service, "access": access, "log_to": staticmethod(log) if log else None,
        "timeout": service.limits.idle_timeout_s})


def refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def header(job: Job, suffix: str = "") -> dict:
    kind = "chat.completion" if job.kind == "chat" else "text_completion"
    return {"id": job.id, "object": kind + suffix, "created": int(time.time()), "model": job.model}


class ConnectionCappedServer(ThreadingHTTPServer):
    """The standard library's threading server with a cap on open connections (a thread each),
    quiet about clients that hang up or go silent: a log line at most, never a traceback."""
    daemon_threads = True

    def __init__(self, address, handler, max_connections: int, log=None):
        self.max_connections, self.log = max_connections, log
        self.open_connections, self.count_lock = 0, threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        with self.count_lock:
            full = self.open_connections >= self.max_connections
            self.open_connections += not full
        if full:  # answered here, without a thread: threads are what the cap protects
            refuse_busy(request, self.max_connections)
            self.close_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.count_lock:
                self.open_connections -= 1

    def shutdown_request(self, request):
        """Close gently: stop writing, then read what the client still sends for a moment.
        Closing with its bytes unread (a refused body) would reset the connection, and a reset
        can destroy the answer still in flight to it."""
        try:
            request.shutdown(socket.SHUT_WR)
            request.settimeout(LINGER_S)
            drained, deadline = 0, time.monotonic() + LINGER_S
            while drained < LINGER_BYTES and time.monotonic() < deadline:
                chunk = request.recv(65536)
                if not chunk:
                    break
                drained += len(chunk)
        except OSError:
            pass  # gone already, or silent: either way it is closed now
        self.close_request(request)

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if not isinstance(error, (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)  # a bug: its traceback
        elif self.log:
            self.log(f"{client_address[0]} left ({type(error).__name__})")


def refuse_busy(request, max_connections: int):
    body = json.dumps(ApiError(503, f"this server has {max_connections} connections open, its "
                               "most (--max_connections): retry later", kind="server_error",
                               code="too_many_connections").body()).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
    try:
        request.settimeout(1.0)  # never let one refusal hold up the accepting thread
        request.sendall(head.encode() + body)
    except OSError:
        pass  # the client left already: nothing to tell it


class Server:
    """The HTTP front on rank 0 (threads) over a Service; bound at construction (port 0: any
    free port, read back from .port)."""

    def __init__(self, service: Service, host: str, port: int, log=None, access: Access = None):
        self.service = service
        handler = make_handler(service, access or Access(host), log)
        try:
            self.httpd = ConnectionCappedServer((host, port), handler,
                                                service.limits.max_connections, log)
        except OSError as error:
            raise BadInput(f"cannot listen on {host}:{port} ({error.strerror}): pick another "
                           "--port or --host") from None
        self.host, self.port = host, self.httpd.server_address[1]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def run(self, steps: Steps, heartbeat_s: float):
        """Serve until stop(); the caller's thread runs the batches."""
        self.thread.start()
        try:
            self.service.serve(steps, self.stopping, heartbeat_s)
        except PeerLost:
            time.sleep(0.5)  # let the handlers write their 503s before the process ends
            raise
        finally:
            self.httpd.shutdown()
            self.httpd.server_close()

    def stop(self):
        self.stopping.set()


def run_server(stage, service_factory, host: str, port: int, heartbeat_s: float, on_listen=print,
               log=None, access: Access = None):
    """Rank 0 serves until SIGINT or SIGTERM (the batch running then is finished first); the
    other ranks follow it and all return together."""
    if not stage.ctx.is_first:
        follow(stage)
        return
    server = Server(service_factory(), host, port, log, access)
    for number in (signal.SIGINT, signal.SIGTERM):  # a flag: never stop halfway through a step
        signal.signal(number, lambda *_: server.stop())
    on_listen(server)
    steps = Steps(stage)
    server.run(steps, heartbeat_s)
    steps.quit()

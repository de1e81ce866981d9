"""One HTTP connection's requests: framing and browser checks, the routes, JSON and SSE answers.

Every check that a hostile client meets is here or in llama/serving/requests.py; answers are
OpenAI's shapes. make_handler binds the class to one server's service, access rules and log.
"""
import json
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from llama.serving.access import Access
from llama.serving.metrics import access_line
from llama.serving.requests import ApiError, content_length, refuse_constant, shorten
from llama.serving.service import Job, Service

# The chat page holds no secret (the API key is typed into it), and a browser cannot send a
# header when it opens a page: it is answered without the key, like the health check.
OPEN_PATHS = ("/", "/index.html", "/health", "/v1/health")
PAGE = (Path(__file__).parent / "page.html").read_bytes()


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

    def log_request(self, code="-", size="-"):
        """Silent: answer() writes one access line per request, once it is complete."""

    def send_response(self, code, message=None):
        self.status = code
        super().send_response(code, message)

    def do_GET(self):
        self.answer(self.get)

    def do_POST(self):
        self.answer(self.post)

    def do_OPTIONS(self):
        self.answer(self.preflight)

    def answer(self, route):
        self.body_read, self.job, self.status = False, None, 0
        started = time.monotonic()
        try:
            self.route_checked(route)
        finally:
            self.account(time.monotonic() - started)

    def route_checked(self, route):
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

    def account(self, seconds: float):
        """The request in the metrics, and its access line in the log."""
        job = self.job
        prompt_tokens, new = (len(job.prompt_ids), job.n_new) if job else (0, 0)
        self.service.metrics.request_done(self.status, prompt_tokens, new)
        if self.log_to:
            ttft = job.first_at - job.arrived if job and job.first_at else None
            path = shorten(self.path.encode("unicode_escape").decode("ascii"), 80)
            self.log_to(access_line(self.command, path, self.status, job and job.model,
                                    prompt_tokens, new, ttft, seconds, job and job.finish))

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
        if self.route not in OPEN_PATHS and self.command != "OPTIONS" and \
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

    @property
    def route(self) -> str:
        """The path without its query string: the page reads ?say=… itself (a browser sends
        it to the server too), and the API has no query parameters of its own."""
        return self.path.split("?", 1)[0]

    def get(self):
        if self.route in ("/", "/index.html"):
            self.send_page()
        elif self.route in ("/health", "/v1/health"):
            status = 503 if self.service.down else 200
            self.send_json(status, {"status": "down" if self.service.down else "ok",
                                    "models": self.service.models(), **self.service.stats})
        elif self.route == "/metrics":
            self.send_text(200, self.service.metrics.text(),
                           "text/plain; version=0.0.4; charset=utf-8")
        elif self.route == "/v1/models":
            self.send_json(200, {"object": "list", "data": [
                {"id": name, "object": "model", "created": self.service.created,
                 "owned_by": "llama-pp-prompt"} for name in self.service.models()]})
        else:
            raise ApiError(404, f"no such endpoint: GET {shorten(self.path)}",
                           code="not_found")

    def post(self):
        kinds = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}
        if self.route not in kinds:
            raise ApiError(404, f"no such endpoint: POST {shorten(self.path)}",
                           code="not_found")
        job = self.service.job(self.read_json(), kinds[self.route])
        self.service.submit(job)
        self.job = job
        try:
            if job.stream:
                self.stream(job)
            else:
                self.whole(job)
        finally:
            self.service.job_closed()

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
            job.finish = "error"
            raise event[1]
        choice = {"index": 0, "finish_reason": event[1]}
        if job.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice.update(text=text, logprobs=None)
        self.send_json(200, {**header(job), "choices": [choice], "usage": job.usage()})

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
                    job.finish = "error"
                    self.sse(event[1].body())
                    return
                else:
                    self.event(job, "" if job.kind == "completion" else {}, event[1])
                    if job.include_usage:  # OpenAI's last chunk: no choices, the usage
                        self.sse({**header(job, ".chunk" if job.kind == "chat" else ""),
                                  "choices": [], "usage": job.usage()})
                    self.sse("[DONE]")
                    return
        except (ConnectionError, TimeoutError):
            job.gone.set()  # its row leaves the batch at the next step

    def event(self, job: Job, piece, finish):
        choice = {"index": 0, "finish_reason": finish}
        usage = {"usage": None} if job.include_usage else {}  # filled in the last chunk only
        if job.kind == "chat":
            choice["delta"] = piece if isinstance(piece, dict) else {"content": piece}
            self.sse({**header(job, ".chunk"), "choices": [choice], **usage})
        else:
            choice.update(text=piece, logprobs=None)
            self.sse({**header(job), "choices": [choice], **usage})

    def sse(self, data):
        text = data if isinstance(data, str) else json.dumps(data)
        self.wfile.write(f"data: {text}\n\n".encode())
        self.wfile.flush()

    def send_json(self, status: int, body: dict):
        self.send_text(status, json.dumps(body), "application/json")

    def send_page(self):
        """The chat page: it may run its own inline script and talk to this server only, and
        no other site may frame it (clickjacking)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(PAGE)))
        self.send_header("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-"
                         "inline'; style-src 'unsafe-inline'; connect-src 'self'; "
                         "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.end_headers()
        self.wfile.write(PAGE)

    def send_text(self, status: int, text: str, content_type: str):
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
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


def header(job: Job, suffix: str = "") -> dict:
    kind = "chat.completion" if job.kind == "chat" else "text_completion"
    return {"id": job.id, "object": kind + suffix, "created": int(time.time()), "model": job.model}


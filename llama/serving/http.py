"""An OpenAI-compatible HTTP server (standard library only) over the one generation engine.

Rank 0 runs the HTTP front in threads (llama/serving/handler.py) and the generation loop in its
main thread (llama/serving/service.py: continuous batching, every served tuning mixed in one
batch); the other ranks follow rank 0's steps. SIGINT or SIGTERM ends the replies in flight
with an error and stops every rank. Run: see serve.py.
"""
import json
import signal
import socket
import sys
import threading
import time
from http.server import ThreadingHTTPServer

from llama.errors import BadInput
from llama.serving.access import Access
from llama.serving.handler import make_handler
from llama.serving.requests import ApiError, Limits, parse_served_prompts
from llama.serving.service import Served, Service

# What serve.py, the tests and the benchmarks take from here: the server and what it is built of.
__all__ = ["Access", "Limits", "Served", "Server", "Service", "parse_served_prompts", "run_server"]

LINGER_S, LINGER_BYTES = 1.0, 1 << 20  # how long and how much a closing connection is drained


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

    def run(self, engine, heartbeat_s: float):
        """Serve until stop(); the caller's thread runs the engine's steps."""
        self.thread.start()
        try:
            self.service.serve(engine, self.stopping, heartbeat_s)
            self.service.wait_for_handlers()  # each in-flight reply's error is written first
        except Exception:  # a lost stage (503s) or a bug (500s): answered before the end
            self.service.wait_for_handlers(0.5)
            raise
        finally:
            self.httpd.shutdown()
            self.httpd.server_close()

    def stop(self):
        self.stopping.set()


def run_server(engine, service_factory, host: str, port: int, heartbeat_s: float,
               on_listen=print, log=None, access: Access = None):
    """Rank 0 serves until SIGINT or SIGTERM (the replies in flight then end with an error);
    the other ranks follow it and all return together."""
    if engine.ctx.rank != 0:
        engine.follow()
        return
    server = Server(service_factory(), host, port, log, access)
    for number in (signal.SIGINT, signal.SIGTERM):  # a flag: never stop halfway through a step
        signal.signal(number, lambda *_: server.stop())
    on_listen(server)
    server.run(engine, heartbeat_s)
    engine.ctx.broadcast_object({"op": "quit"})

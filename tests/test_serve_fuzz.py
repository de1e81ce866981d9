"""serve.py under a seeded storm of hostile HTTP: random JSON of every type in every field of both
endpoints, random headers, random byte bodies and request lines, bad Content-Length values, each
sent on its own raw socket. Every answer must be well-formed HTTP, the server's stderr must hold no
traceback, and a greedy request must give the same text after the storm as before it.
Run: python -m pytest -q tests/test_serve_fuzz.py
"""
import json
import random
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from launch import REPO, free_port, rank_env

N_REQUESTS = 3000
SEED = 18
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
          "top_p", "seed", "stop", "stream", "n", "best_of", "echo", "logprobs", "logit_bias",
          "suffix", "presence_penalty", "tools", "user"]
GREEDY = {"model": "base", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}


# ---- the hostile inputs ----

def random_text(rng: random.Random, most: int = 20) -> str:
    alphabet = "ab \n\"\\é€😀\x00\ud800\udfff{}[]:,"  # lone surrogates, as JSON's \ud800 makes
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, most)))


def random_value(rng: random.Random, depth: int = 0):
    makers = [
        lambda: None, lambda: True, lambda: False, lambda: rng.randint(-3, 70),
        lambda: 10 ** rng.randint(19, 400) * rng.choice([1, -1]),
        lambda: rng.choice([0.0, -0.0, 1e-40, 5e-324, 1e308, 0.5, 2.0000001, float("nan"),
                            float("inf")]),
        lambda: rng.choice(["nan", "inf", "-inf", "1e-40", "", "base", "user"]),
        lambda: random_text(rng), lambda: "x" * rng.choice([1000, 5000]),
        lambda: rng.choice([[], {}]),
        lambda: [random_value(rng, depth + 1) for _ in range(rng.randint(1, 3))],
        lambda: {random_text(rng, 5): random_value(rng, depth + 1)
                 for _ in range(rng.randint(1, 3))},
        lambda: {"role": rng.choice(["user", "system", "assistant", "x"]),
                 "content": random_value(rng, depth + 1)}]
    return makers[rng.randrange(len(makers) if depth < 3 else 10)]()


def random_body(rng: random.Random, chat: bool) -> bytes:
    body = {"model": rng.choice(["base", "base", "gpt-4"]), "max_tokens": rng.randint(1, 4)}
    if chat:
        body["messages"] = [{"role": "user", "content": random_text(rng)}]
    else:
        body["prompt"] = random_text(rng)
    for name in rng.sample(FIELDS, rng.randint(0, 4)):
        body[name] = random_value(rng)
    if rng.random() < 0.05:  # nested past any sane depth
        return b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    if rng.random() < 0.05:
        return b'{"max_tokens": ' + b"9" * 5000 + b"}"
    return json.dumps(body).encode()  # NaN and Infinity appear as JSON's non-standard literals


def random_headers(rng: random.Random, body: bytes) -> list:
    headers = [("Host", rng.choice(["127.0.0.1", "localhost:8000", "evil.example", "[::1]:1",
                                    "", "127.0.0.1:1:2", random_text(rng, 8)])),
               ("Content-Type", rng.choice(["application/json", "application/json; charset=utf-8",
                                            "text/plain", "", "APPLICATION/JSON"])),
               ("Content-Length", rng.choice([str(len(body))] * 6 + [
                   "", "-1", "1e3", "\u00b2", "0x10", " 12 ", "9" * 5000, str(len(body) + 7),
                   str(max(len(body) - 3, 0)), "18446744073709551617"]))]
    for _ in range(rng.randint(0, 3)):
        headers.append(rng.choice([
            ("Transfer-Encoding", rng.choice(["chunked", "gzip, chunked", "identity"])),
            ("Content-Length", str(len(body))), ("Origin", rng.choice(["http://evil.example", "null"])),
            ("Authorization", "Bearer " + random_text(rng, 30)), ("Expect", "100-continue"),
            ("Connection", rng.choice(["close", "keep-alive", "upgrade"])),
            (random_text(rng, 6).replace(":", "") or "X", random_text(rng, 40)),
            ("X-Long", "v" * rng.choice([100, 70000]))]))
    return headers


def random_request(rng: random.Random) -> bytes:
    choice = rng.random()
    if choice > 0.6:  # well framed: only the JSON is hostile, so many reach generation
        chat = rng.random() < 0.5
        body = random_body(rng, chat)
        return (f"POST /v1/{'chat/' if chat else ''}completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                ).encode() + body
    if choice < 0.08:  # random bytes, request line and all
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
    chat = rng.random() < 0.5
    method = rng.choice(["POST"] * 8 + ["GET", "OPTIONS", "PUT", "DELETE", "BREW", "post"])
    path = rng.choice(["/v1/chat/completions" if chat else "/v1/completions"] * 6 + [
        "/health", "/v1/models", "/", "/v1/completions?x=1", "/%00", "/" + "a" * 70000, "*"])
    version = rng.choice(["HTTP/1.1"] * 8 + ["HTTP/1.0", "HTTP/2.0", "HTTP/1.1x", "FTP/1.1"])
    body = bytes(rng.randrange(256) for _ in range(rng.randint(0, 200))) if choice < 0.15 \
        else random_body(rng, chat)
    head = [f"{method} {path} {version}"] + [f"{k}: {v}" for k, v in random_headers(rng, body)]
    return "\r\n".join(head).encode("utf-8", "surrogatepass") + b"\r\n\r\n" + body


# ---- the answers ----

def exchange(port: int, request: bytes):
    """(what came back, whether the server closed before taking the whole request)."""
    cut_short = False
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        try:
            connection.sendall(request)
            connection.shutdown(socket.SHUT_WR)  # then a keep-alive server closes after answering
        except OSError:  # it refused early (a 414) and closed: its answer may still be readable
            cut_short = True
        received = b""
        try:
            while chunk := connection.recv(65536):
                received += chunk
        except ConnectionResetError:  # it closed with our bytes unread: TCP may drop its answer
            cut_short = True
    return received, cut_short


STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5]\d\d) [^\r\n]*\r\n")
HEADER_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+: [^\r\n]*")


def parse_responses(data: bytes) -> list:
    """The status of every response in data; AssertionError at the first malformed byte."""
    statuses = []
    while data:
        match = STATUS_LINE.match(data)
        assert match, f"not an HTTP status line: {data[:120]!r}"
        # From the status line's own CRLF: a 100 Continue has no header lines at all.
        head, sep, rest = data[match.end() - 2:].partition(b"\r\n\r\n")
        assert sep, f"headers without an end: {data[:300]!r}"
        headers = {}
        for line in filter(None, head.split(b"\r\n")):
            assert HEADER_LINE.fullmatch(line), f"malformed header line {line!r}"
            name, _, value = line.partition(b": ")
            headers[name.lower()] = value
        status = int(match.group(1))
        statuses.append(status)
        if status < 200:
            data = rest
        elif b"content-length" in headers:
            length = int(headers[b"content-length"])
            assert len(rest) >= length, f"a body cut short: {data[:300]!r}"
            data = rest[length:]
        else:  # a stream: its body runs until the connection closes
            assert headers.get(b"connection") == b"close", headers
            data = b""
    return statuses


def may_go_unanswered(request: bytes) -> bool:
    """Nothing, or a blank first line, is no request at all: the server just closes."""
    return not request.split(b"\n", 1)[0].strip()


def greedy_text(port: int) -> str:
    body = json.dumps(GREEDY).encode()
    received, _ = exchange(port, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                        b"application/json\r\nContent-Length: " + str(len(body)).encode()
                        + b"\r\n\r\n" + body)
    assert parse_responses(received) == [200], received
    return json.loads(received.partition(b"\r\n\r\n")[2])["choices"][0]["text"]


# ---- the test ----

@pytest.fixture
def served(model_bin, tmp_path):
    env = {k: v for k, v in rank_env(0, 1, free_port()).items() if k != "LLAMA_API_KEY"}
    out, err = tmp_path / "out", tmp_path / "err"
    process = subprocess.Popen([sys.executable, "serve.py", "--ckpt_dir", str(model_bin), "--port",
                                "0", "--base_name", "base", "--max_tokens", "8", "--max_wait_ms",
                                "0", "--max_body_bytes", "65536"], cwd=REPO, env=env,
                               stdout=open(out, "w"), stderr=open(err, "w"))
    try:
        deadline = time.monotonic() + 90
        while "http://127.0.0.1:" not in out.read_text():
            assert process.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.1)
        yield process, int(out.read_text().split("http://127.0.0.1:")[1].split()[0]), err
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_fuzzed_http_gets_well_formed_answers_and_changes_nothing(served):
    process, port, stderr = served
    before = greedy_text(port)
    rng, seen = random.Random(SEED), {}
    for i in range(N_REQUESTS):
        request = random_request(rng)
        try:
            received, cut_short = exchange(port, request)
            statuses = parse_responses(received)
        except (AssertionError, OSError) as error:
            raise AssertionError(f"request {i} {request[:300]!r}: {error}") from None
        assert statuses or cut_short or may_go_unanswered(request), \
            f"request {i} unanswered: {request[:300]!r}"
        for status in statuses:
            seen[status] = seen.get(status, 0) + 1
    assert process.poll() is None, stderr.read_text()
    assert "Traceback" not in stderr.read_text(), stderr.read_text()[-3000:]
    assert greedy_text(port) == before
    # The storm reached generation as well as every refusal.
    assert seen.get(200, 0) > 50 and {400, 413, 415, 421}.issubset(seen), seen

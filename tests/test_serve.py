"""serve.py: every endpoint through real sockets on 127.0.0.1 with the standard library's client;
streams joined equal whole answers; concurrent requests that mix soft prompts in one batch get
exactly what each gets alone (and what generate() gives with that prompt); bad requests get
OpenAI-style errors and the server keeps serving; a client leaving mid-stream; 2 ranks end to end
and a lost stage (503, non-zero exit). Run: python -m pytest -q tests/test_serve.py
"""
import http.client
import json
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
import torch

import split_model
from launch import REPO, rank_env, free_port
from llama.serving.batching import MixedPromptStage, PromptBank, Steps
from llama.formats.checkpoint import load_model
from llama.parallel.distributed import DistContext
from llama.errors import BadInput
from llama.serving.generation import decode_continuation, generate
from llama.parallel.pipeline import Stage
from llama.tuning.prompt import SoftPrompt
from llama.tuning.files import load_soft_prompt, save_tuning
from llama.serving.http import Limits, Server, Service
from llama.model.tokenizer import Tokenizer

TEXTS = ["Once upon a time", "Tom and Lily went to the park. They saw", "The cat"]
PROMPT_LENGTHS = {"short": 3, "long": 7}


@pytest.fixture(scope="module")
def model(model_bin):
    return load_model(model_bin)


@pytest.fixture(scope="module")
def tokenizer(assets):
    return Tokenizer(str(assets / "stories260K" / "tok512.model"))


@pytest.fixture(scope="module")
def prompt_folders(model, tmp_path_factory):
    """Two soft prompts of different lengths, at the scale of real embeddings."""
    root, std = tmp_path_factory.mktemp("served_prompts"), float(model.tok_embeddings.weight.std())
    folders = {}
    for seed, (name, n_virtual) in enumerate(PROMPT_LENGTHS.items()):
        weight = torch.randn(n_virtual, model.args.dim, generator=torch.Generator().manual_seed(seed))
        save_tuning(root / name, "prompt", {"prompt": weight * std * 3}, model.args, {"template": "none"})
        folders[name] = root / name
    return folders


@pytest.fixture(scope="module")
def server(model_bin, tokenizer, prompt_folders):
    # A model of its own: the server's thread sets up and clears KV caches on it while the
    # tests run reference generations on theirs.
    model = load_model(model_bin)
    weights = {n: load_soft_prompt(f, model.args)[0] for n, f in prompt_folders.items()}
    bank = PromptBank(model.args.vocab_size, model.args.dim, weights)
    service = Service(tokenizer, bank, {n: "none" for n in weights}, "base", model.args.max_seq_len,
                      Limits(max_body_bytes=4096, max_tokens=64, max_batch=8, max_wait_ms=300))
    running = Server(service, "127.0.0.1", 0)
    thread = threading.Thread(target=running.run, args=(Steps(MixedPromptStage(model, DistContext(), bank)), 0.2),
                              daemon=True)
    thread.start()
    yield running
    running.stop()
    thread.join(timeout=10)


JSON = {"Content-Type": "application/json"}


def call(port, method, path, body=None, headers=None, raw=None):
    """(status, parsed JSON) of one request."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    connection.request(method, path, body=data, headers={**JSON, **(headers or {})})
    response = connection.getresponse()
    text = response.read()
    connection.close()
    return response.status, json.loads(text)


def stream_events(port, path, body):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("POST", path, body=json.dumps({**body, "stream": True}), headers=JSON)
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
    events = [line[len("data: "):] for line in response.read().decode().splitlines() if line]
    connection.close()
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def complete(port, model, text, max_tokens=24, **extra):
    status, answer = call(port, "POST", "/v1/completions",
                          {"model": model, "prompt": text, "max_tokens": max_tokens,
                           "temperature": 0, **extra})
    assert status == 200, answer
    return answer["choices"][0]["text"]


def wait_until(condition, limit_s=60.0) -> bool:
    """Poll condition() until it holds (True) or limit_s passes (False)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_models_and_health(server):
    status, models = call(server.port, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["base", "short", "long"]
    status, health = call(server.port, "GET", "/health")
    assert status == 200 and health["status"] == "ok"


@pytest.mark.parametrize("name", ["base", "long"])
def test_completion_equals_generation_with_that_prompt(server, model, tokenizer, prompt_folders,
                                                       name):
    ids = tokenizer.encode(TEXTS[0], bos=True, eos=False)
    soft = SoftPrompt(load_soft_prompt(prompt_folders[name], model.args)[0]) if name != "base" else None
    stage = Stage(model, DistContext(), soft, soft.n_virtual_tokens if soft else 0)
    expected = generate(stage, [ids], 24, stop_ids=tokenizer.stop_ids)[0]
    status, answer = call(server.port, "POST", "/v1/completions",
                          {"model": name, "prompt": TEXTS[0], "max_tokens": 24, "temperature": 0})
    assert status == 200
    assert answer["choices"][0]["text"] == decode_continuation(tokenizer, ids, expected)
    assert answer["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(expected),
                               "total_tokens": len(ids) + len(expected)}


def test_streams_joined_equal_the_whole_answer(server):
    body = {"model": "short", "prompt": TEXTS[1], "max_tokens": 20, "temperature": 0}
    events = stream_events(server.port, "/v1/completions", body)
    assert "".join(e["choices"][0]["text"] for e in events) == complete(server.port, "short", TEXTS[1], 20)
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    chat = {"model": "long", "messages": [{"role": "system", "content": "Be short."},
                                          {"role": "user", "content": "Tell a story"}],
            "max_tokens": 20, "temperature": 0}
    events = stream_events(server.port, "/v1/chat/completions", chat)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    joined = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    status, whole = call(server.port, "POST", "/v1/chat/completions", chat)
    assert status == 200 and whole["choices"][0]["message"]["content"] == joined


def test_concurrent_mixed_prompt_batch_rows_equal_each_alone(server):
    requests = [(model, text) for model in ("short", "base", "long") for text in TEXTS[:2]]
    alone = {r: complete(server.port, *r) for r in requests}
    before = call(server.port, "GET", "/health")[1]["batches"]
    together, barrier = {}, threading.Barrier(len(requests))

    def client(request):
        barrier.wait()
        together[request] = complete(server.port, *request)

    threads = [threading.Thread(target=client, args=(r,)) for r in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert together == alone
    health = call(server.port, "GET", "/health")[1]
    assert health["batches"] - before < len(requests)  # some of them really ran together
    assert health["largest_batch"] >= 3


def test_stop_strings_and_seeded_sampling(server):
    full = complete(server.port, "base", TEXTS[0])
    stop = full[10:13]
    assert complete(server.port, "base", TEXTS[0], stop=[stop]) == full[:full.index(stop)]
    sampled = [complete(server.port, "base", TEXTS[0], temperature=1.0, seed=s) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


BAD_REQUESTS = [
    ("not JSON", dict(raw=b'{"model": "base"'), 400, "invalid_json"),
    ("a JSON list", dict(body=["base"]), 400, "invalid_json"),
    ("NaN", dict(raw=b'{"model": "base", "prompt": "a", "temperature": NaN}'), 400, "invalid_json"),
    ("unknown model", dict(body={"model": "gpt-4", "prompt": "a"}), 404, "model_not_found"),
    ("no prompt", dict(body={"model": "base"}), 400, "invalid_value"),
    ("max_tokens 0", dict(body={"model": "base", "prompt": "a", "max_tokens": 0}), 400, "invalid_value"),
    ("max_tokens text", dict(body={"model": "base", "prompt": "a", "max_tokens": "9"}), 400, "invalid_value"),
    ("max_tokens over the limit", dict(body={"model": "base", "prompt": "a", "max_tokens": 65}), 400,
     "invalid_value"),
    ("temperature -1", dict(body={"model": "base", "prompt": "a", "temperature": -1}), 400, "invalid_value"),
    ("top_p 2", dict(body={"model": "base", "prompt": "a", "top_p": 2}), 400, "invalid_value"),
    ("five stop strings", dict(body={"model": "base", "prompt": "a", "stop": list("abcde")}), 400,
     "invalid_value"),
    ("n=2", dict(body={"model": "base", "prompt": "a", "n": 2}), 400, "unsupported_value"),
    ("prompt too long", dict(body={"model": "long", "prompt": "a b " * 300}), 400,
     "context_length_exceeded"),
    ("body too large", dict(body={"model": "base", "prompt": "a" * 5000}), 413, "body_too_large"),
    ("chat ending with the assistant", dict(path="/v1/chat/completions", body={
        "model": "base", "messages": [{"role": "assistant", "content": "hi"}]}), 400, "invalid_value"),
    ("chat with a bad role", dict(path="/v1/chat/completions", body={
        "model": "base", "messages": [{"role": "robot", "content": "hi"}]}), 400, "invalid_value"),
    ("unknown path", dict(path="/v1/embeddings", body={}), 404, "not_found"),
    ("max_tokens of 400 digits", dict(body={"model": "base", "prompt": "a", "max_tokens": 10 ** 400}),
     400, "invalid_value"),
    ("seed of 400 digits", dict(body={"model": "base", "prompt": "a", "seed": -10 ** 400}), 400,
     "invalid_value"),
    ("temperature of 400 digits", dict(body={"model": "base", "prompt": "a", "temperature": 10 ** 400}),
     400, "invalid_value"),
    ("a lone surrogate in the prompt", dict(raw=b'{"model": "base", "prompt": "a\\ud800b"}'), 400,
     "invalid_value"),
    ("a lone surrogate in a message", dict(path="/v1/chat/completions", raw=b'{"model": "base", '
     b'"messages": [{"role": "user", "content": "\\udc80"}]}'), 400, "invalid_value"),
]


@pytest.mark.parametrize("name, request_, status, code", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, name, request_, status,
                                                                     code):
    got, answer = call(server.port, "POST", request_.get("path", "/v1/completions"),
                       request_.get("body"), raw=request_.get("raw"))
    assert (got, answer["error"]["code"]) == (status, code), answer
    assert answer["error"]["message"] and answer["error"]["type"] == "invalid_request_error"
    assert complete(server.port, "base", TEXTS[2], 4)


@pytest.mark.parametrize("temperature", [1e-40, 5e-324, 1e-300])
def test_a_temperature_so_small_it_overflows_the_logits_is_greedy(server, temperature):
    greedy = complete(server.port, "base", TEXTS[0], 16)
    assert complete(server.port, "base", TEXTS[0], 16, temperature=temperature) == greedy
    assert complete(server.port, "long", TEXTS[0], 16, temperature=temperature, top_p=1e-30) == \
        complete(server.port, "long", TEXTS[0], 16)


def exchange(port, request: bytes, half_close=True) -> bytes:
    """Everything the server sends back to raw request bytes, until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(request)
        if half_close:
            connection.shutdown(socket.SHUT_WR)  # a keep-alive server then closes after answering
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    return received


def statuses(received: bytes) -> list:
    return [int(s) for s in re.findall(rb"^HTTP/1\.[01] (\d{3}) ", received, re.M)]


def post(headers: dict, body: bytes = b'{"model": "base", "prompt": "a", "max_tokens": 2}',
         path="/v1/completions") -> bytes:
    lines = [f"POST {path} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


GOOD = {"Host": "127.0.0.1", "Content-Type": "application/json"}


@pytest.mark.parametrize("headers, status", [
    ({**GOOD, "Content-Length": "\u00b2"}, 400),  # "²".isdigit() is True, int("²") fails
    ({**GOOD, "Content-Length": "9" * 5000}, 413),
    ({**GOOD, "Content-Length": "-5"}, 400),
    ({**GOOD, "Content-Length": "49", "Transfer-Encoding": "chunked"}, 400),
    ({**GOOD, "Content-Length": "49", "content-length": "50"}, 400),
    ({"Host": "127.0.0.1", "Content-Length": "49"}, 415),  # no Content-Type: a form could send it
    ({**GOOD, "Content-Type": "text/plain", "Content-Length": "49"}, 415),
    ({**GOOD, "Host": "rebound.example:8000", "Content-Length": "49"}, 421),  # DNS rebinding
    ({**GOOD, "Origin": "http://evil.example", "Content-Length": "49"}, 403),
    ({**GOOD, "Content-Length": "49"}, 200),
    ({**GOOD, "Host": "localhost:1", "Content-Type": "application/json; charset=utf-8",
      "Content-Length": "49"}, 200),
])
def test_http_framing_and_browser_checks(server, headers, status):
    received = exchange(server.port, post(headers))
    assert statuses(received) == [status], received[:300]
    assert complete(server.port, "base", TEXTS[2], 4)


def test_same_origin_and_allowed_origins_are_answered(server):
    own = f"127.0.0.1:{server.port}"
    received = exchange(server.port, post({**GOOD, "Host": own, "Origin": f"http://{own}",
                                           "Content-Length": "49"}))
    assert statuses(received) == [200]
    preflight = b"OPTIONS /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: https://app.example\r\n\r\n"
    assert statuses(exchange(server.port, preflight)) == [403]


def test_an_unread_body_is_never_answered_as_a_second_request(server):
    """A 401 or 404 before the body is read: the body (here a whole GET) must not be served."""
    smuggled = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    server.service.api_key = "s3cret"
    try:
        received = exchange(server.port, post({**GOOD, "Content-Length": str(len(smuggled))},
                                              smuggled), half_close=False)
    finally:
        server.service.api_key = None
    assert statuses(received) == [401]
    received = exchange(server.port, post({**GOOD, "Content-Length": str(len(smuggled))}, smuggled,
                                          path="/v1/nothing"), half_close=False)
    assert statuses(received) == [404]


def test_clients_that_hang_up_leave_no_traceback(server, capfd):
    for i in range(20):
        connection = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        # A reset (linger 0) right after a request that is answered with an error at once.
        connection.sendall(post({**GOOD, "Content-Length": str(10 ** 9)}, b"")[:60 + i * 4])
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.close()
    assert wait_until(lambda: server.httpd.open_connections == 0)
    assert complete(server.port, "base", TEXTS[2], 4)
    assert "Traceback" not in capfd.readouterr().err


@pytest.fixture
def small_server(tokenizer):
    """An HTTP front without generation (health and models only): 3 connections, 1 s idle."""
    service = Service(tokenizer, None, {}, "base", 64, Limits(idle_timeout_s=1.0, max_connections=3))
    running = Server(service, "127.0.0.1", 0)
    running.thread.start()
    yield running
    running.httpd.shutdown()
    running.httpd.server_close()


def test_idle_connections_time_out_and_their_number_is_capped(small_server):
    port = small_server.port
    idle = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(3)]
    assert wait_until(lambda: small_server.httpd.open_connections == 3)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as extra:
        refused = extra.recv(65536)  # answered at once, before it says anything
    assert statuses(refused) == [503] and b"too_many_connections" in refused
    for connection in idle:  # closed by the server once idle for --idle_timeout_s
        assert connection.recv(1) == b""
        connection.close()
    assert wait_until(lambda: small_server.httpd.open_connections == 0)
    assert statuses(exchange(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")) == [200]


def test_api_key_is_required_when_set(server):
    server.service.api_key = "s3cret"
    try:
        body = {"model": "base", "prompt": "a", "max_tokens": 2}
        assert call(server.port, "POST", "/v1/completions", body)[0] == 401
        assert call(server.port, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert call(server.port, "POST", "/v1/completions", body,
                    headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert call(server.port, "GET", "/health")[0] == 200  # a health check needs no key
    finally:
        server.service.api_key = None


def test_a_client_leaving_mid_stream_disturbs_no_one(server):
    expected = complete(server.port, "long", TEXTS[1], 64)
    body = json.dumps({"model": "base", "prompt": TEXTS[0], "max_tokens": 64, "stream": True,
                       "temperature": 0}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as leaving:
        leaving.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                        b"application/json\r\nContent-Length: " + str(len(body)).encode()
                        + b"\r\n\r\n" + body)
        other = {}
        thread = threading.Thread(target=lambda: other.update(
            text=complete(server.port, "long", TEXTS[1], 64)))
        thread.start()
        received = b""
        while b"data: " not in received:  # the stream has begun
            received += leaving.recv(4096)
    thread.join(timeout=60)
    assert other["text"] == expected
    # The server learns that the client left only when a write to it fails, some steps later:
    # wait for that event, not for a time.
    assert wait_until(lambda: call(server.port, "GET", "/health")[1]["cancelled"] >= 1)
    assert complete(server.port, "base", TEXTS[2], 8)


def test_openai_client(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused")
    answer = client.completions.create(model="short", prompt=TEXTS[0], max_tokens=12, temperature=0)
    assert answer.choices[0].text == complete(server.port, "short", TEXTS[0], 12)
    chunks = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks)


def wait_for_port(log_path, process, timeout_s=90):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log_path.read_text() if log_path.exists() else ""
        if "http://127.0.0.1:" in text:
            return int(text.split("http://127.0.0.1:")[1].split()[0])
        assert process.poll() is None, f"rank 0 exited {process.returncode}: {text}"
        time.sleep(0.2)
    raise AssertionError("the server did not start listening")


def test_two_rank_server_end_to_end_and_a_lost_stage(server, model_bin, prompt_folders, tmp_path):
    split_model.main(str(model_bin), 2, out_dir=str(tmp_path / "pp2"))
    argv = [sys.executable, "serve.py", "--ckpt_dir", str(tmp_path / "pp2"), "--port", "0",
            "--base_name", "base", "--prompts", f"long={prompt_folders['long']}",
            "--timeout_s", "20"]
    port = free_port()
    logs = [(open(tmp_path / f"{r}.out", "w"), open(tmp_path / f"{r}.err", "w")) for r in range(2)]
    ranks = [subprocess.Popen(argv, cwd=REPO, env=rank_env(r, 2, port), stdout=logs[r][0],
                              stderr=logs[r][1]) for r in range(2)]
    try:
        listening = wait_for_port(tmp_path / "0.out", ranks[0])
        for name in ("base", "long"):
            assert complete(listening, name, TEXTS[1]) == complete(server.port, name, TEXTS[1])
        ranks[1].send_signal(signal.SIGKILL)
        ranks[1].wait()
        status, answer = call(listening, "POST", "/v1/completions",
                              {"model": "base", "prompt": TEXTS[0], "max_tokens": 8})
        assert status == 503 and answer["error"]["code"] == "stage_lost"
        assert ranks[0].wait(timeout=60) not in (0, None)
        assert "error:" in (tmp_path / "0.err").read_text()
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_sigterm_stops_the_server_cleanly(model_bin, tmp_path):
    env = {k: v for k, v in rank_env(0, 1, free_port()).items() if k != "LLAMA_API_KEY"}
    process = subprocess.Popen([sys.executable, "serve.py", "--ckpt_dir", str(model_bin), "--port", "0"],
                               cwd=REPO, env=env,
                               stdout=open(tmp_path / "0.out", "w"), stderr=subprocess.DEVNULL)
    try:
        wait_for_port(tmp_path / "0.out", process)
        assert "no API key: anyone who can reach the port can use it" in (tmp_path / "0.out").read_text()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("flags, message", [
    ({"prompts": "a=x,a=y"}, "--prompts names 'a' twice"),
    ({"max_batch": 0}, "--max_batch=0 must be at least 1"),
    ({"api_key": ""}, "--api_key is empty: give a key, or leave it out to serve without one"),
    ({"api_key": "  "}, "--api_key is empty"),
    ({"idle_timeout_s": 0}, "--idle_timeout_s=0 must be > 0"),
    ({"max_connections": 0}, "--max_connections=0 at least 1"),
])
def test_serve_refuses_bad_settings_before_any_work(model_bin, flags, message, monkeypatch):
    import serve
    monkeypatch.setattr(serve, "run_server", never_serve)
    with pytest.raises(BadInput, match=re.escape(message)):
        serve.main(ckpt_dir=str(model_bin), **flags)


def never_serve(*_, **__):
    pytest.fail("serve.main went on to serve")  # rather than listen until the test times out


def test_serve_refuses_an_empty_api_key_in_the_environment(model_bin, monkeypatch):
    import serve
    monkeypatch.setattr(serve, "run_server", never_serve)
    monkeypatch.setenv("LLAMA_API_KEY", "")
    with pytest.raises(BadInput, match=re.escape("$LLAMA_API_KEY is set but empty")):
        serve.main(ckpt_dir=str(model_bin))


def test_a_served_prompt_with_an_unknown_template_is_refused_at_start(model, model_bin, tmp_path,
                                                                     monkeypatch):
    import serve
    monkeypatch.setattr(serve, "run_server", never_serve)
    save_tuning(tmp_path / "odd", "prompt", {"prompt": torch.zeros(2, model.args.dim)}, model.args, {"template": "vicuna"})
    with pytest.raises(BadInput, match=re.escape(f"--prompts odd={tmp_path / 'odd'}: its tuning.json "
                                                 "has an unknown template 'vicuna'")):
        serve.main(ckpt_dir=str(model_bin), prompts=f"odd={tmp_path / 'odd'}")


def test_serve_command_line_refusals(model_bin):
    done = subprocess.run([sys.executable, "serve.py", "--ckpt_dir", str(model_bin), "--prompts",
                           "runs/x"], cwd=REPO, env=rank_env(0, 1, free_port()),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["error: --prompts item 'runs/x' must be NAME=FOLDER (for "
                                        "example alpaca=runs/alpaca/prompt)"]

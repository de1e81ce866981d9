"""serve.py: every endpoint through real sockets on 127.0.0.1 with the standard library's client;
streams joined equal whole answers; concurrent requests that mix soft prompts in one batch get
exactly what each gets alone (and what generate() gives with that prompt); bad requests get
OpenAI-style errors and the server keeps serving; a client leaving mid-stream; 2 ranks end to end
and a lost stage (503, non-zero exit). Run: python -m pytest -q tests/test_serve.py
"""
import http.client
import contextlib
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
from llama.formats.checkpoint import load_model
from llama.parallel.distributed import DistContext
from llama.errors import BadInput
from llama.serving.generation import decode_continuation, generate
from llama.parallel.pipeline import Stage
from llama.tuning.files import load_tuning, save_tuning
from llama.serving.engine import Engine
from llama.serving.http import Limits, Served, Server, Service
from llama.tuning.lora import lora_keys
from llama.tuning.methods import adapter_layer_range, apply_saved, init_adapter, init_prefix
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
def method_folders(model, tmp_path_factory):
    """A prefix, an adapter (its gates opened, so that it changes the text) and a LoRA (its B
    not zero, for the same reason), as ft_main.py writes them."""
    root, args = tmp_path_factory.mktemp("served_methods"), model.args
    prefix = {f"layers.{i}.prefix": init_prefix(args, i, 3, seed=5) for i in range(args.n_layers)}
    adapter = {}
    for i in adapter_layer_range(args, 3):
        adapter[f"layers.{i}.adaption_prompt"], _ = init_adapter(args, i, 4, seed=3)
        adapter[f"layers.{i}.adaption_gate"] = torch.full((1,), 2.0)
    lora = {}
    for i in range(args.n_layers):
        for path in ("attention.wq", "attention.wv"):
            a, b = lora_keys(i, path)
            lora[a] = torch.randn(4, args.dim, generator=torch.Generator().manual_seed(i)) * 0.1
            lora[b] = torch.randn(args.dim if path.endswith("q") else args.n_kv_heads
                                  * args.head_dim, 4, generator=torch.Generator().manual_seed(i))
    save_tuning(root / "prefix", "prefix", prefix, args, {"template": "none"})
    save_tuning(root / "adapter", "adapter", adapter, args, {"template": "none"})
    save_tuning(root / "lora", "lora", lora, args, {"template": "none", "lora": {
        "r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q", "v"], "use_rslora": False}})
    return {"prefix": root / "prefix", "adapter": root / "adapter", "lora": root / "lora"}


def served_tunings(model, folders: dict):
    """({name: the tuning on model}, {name: Served}), as serve.py builds them."""
    loaded = {name: load_tuning(folder, model.args) for name, folder in folders.items()}
    tunings = {name: apply_saved(model, method, tensors, True, info)
               for name, (method, tensors, info) in loaded.items()}
    return tunings, {n: Served(n, t.n_virtual, "none") for n, t in tunings.items()}


def start_server(model, tokenizer, folders: dict, log=None, cuda_graph=False, **limits):
    tunings, served = served_tunings(model, folders)
    settings = dict(max_body_bytes=4096, max_tokens=64, max_batch=8, max_wait_ms=300)
    service = Service(tokenizer, served, "base", model.args.max_seq_len,
                      Limits(**{**settings, **limits}))
    running = Server(service, "127.0.0.1", 0, log=log)
    running.engine = Engine(Stage(model, DistContext(), cuda_graph=cuda_graph), tunings,
                            max_rows=8)
    running.error = None

    def run():
        try:
            running.run(running.engine, 0.2)
        except Exception as error:  # kept for the test that makes a step fail
            running.error = error

    running.runner = threading.Thread(target=run, daemon=True)
    running.runner.start()
    return running


@pytest.fixture(scope="module")
def server(model_bin, tokenizer, prompt_folders, method_folders):
    # A model of its own: the server's thread sets up and clears KV caches on it while the
    # tests run reference generations on theirs.
    model = load_model(model_bin)
    log_lines = []
    running = start_server(model, tokenizer, {**prompt_folders, **method_folders},
                           log=log_lines.append)
    running.log_lines = log_lines
    yield running
    running.stop()
    running.runner.join(timeout=10)


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
    assert status == 200 and [m["id"] for m in models["data"]] == ["base", "short", "long",
                                                                   "prefix", "adapter", "lora"]
    status, health = call(server.port, "GET", "/health")
    assert status == 200 and health["status"] == "ok"


@pytest.mark.parametrize("name", ["base", "long", "prefix", "adapter", "lora"])
def test_completion_equals_generation_with_that_tuning(server, model_bin, tokenizer,
                                                       prompt_folders, method_folders, name):
    ids = tokenizer.encode(TEXTS[0], bos=True, eos=False)
    model = load_model(model_bin)  # its own: a method's hooks stay on the model they are put on
    folders = {**prompt_folders, **method_folders}
    tuning = served_tunings(model, {name: folders[name]})[0][name] if name != "base" else None
    expected = generate(Stage(model, DistContext(), tuning=tuning), [ids], 24,
                        stop_ids=tokenizer.stop_ids)[0]
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


def test_concurrent_mixed_methods_batch_rows_equal_each_alone(server):
    """Soft prompts, a prefix, an adapter, a LoRA and the base model in one batch; 12 requests
    for 8 rows, so some join while others run (continuous batching)."""
    models = ("short", "base", "long", "prefix", "adapter", "lora")
    requests = [(model, text) for model in models for text in TEXTS[:2]]
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
    assert len({alone[(model, TEXTS[0])] for model in models}) == len(models)  # all differ
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
    service = Service(tokenizer, {}, "base", 64, Limits(idle_timeout_s=1.0, max_connections=3))
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
    """The official client (skipped when absent) against the standard library's view of the
    same requests: completions, chat, streams, the usage chunk, the models and an error."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused",
                           max_retries=0, timeout=60)
    assert sorted(m.id for m in client.models.list()) == sorted(server.service.models())
    answer = client.completions.create(model="short", prompt=TEXTS[0], max_tokens=12, temperature=0)
    assert answer.choices[0].text == complete(server.port, "short", TEXTS[0], 12)
    assert answer.usage.completion_tokens >= 1 and answer.choices[0].finish_reason in ("stop", "length")
    chat = {"model": "prefix", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
            "temperature": 0}
    whole = client.chat.completions.create(**chat)
    expected = call(server.port, "POST", "/v1/chat/completions", chat)[1]
    assert whole.choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert whole.usage.total_tokens == expected["usage"]["total_tokens"]
    chunks = list(client.chat.completions.create(**chat, stream=True,
                                                 stream_options={"include_usage": True}))
    *pieces, last = chunks
    assert "".join(c.choices[0].delta.content or "" for c in pieces) == \
        whole.choices[0].message.content
    assert pieces[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert last.choices == [] and last.usage.completion_tokens == whole.usage.completion_tokens
    streamed = client.completions.create(model="lora", prompt=TEXTS[1], max_tokens=10,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == complete(server.port, "lora", TEXTS[1], 10)
    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="nope", prompt="a")
    assert unknown.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(**{**chat, "max_tokens": 10 ** 6})
    assert refused.value.body["param"] == "max_tokens"


def test_the_static_decode_mode_serves_the_same_answers(server, model_bin, tokenizer,
                                                         prompt_folders, method_folders):
    """--cuda_graph (uncaptured on a CPU): the engine's fixed-shape decode steps, every method."""
    static = start_server(load_model(model_bin), tokenizer, {**prompt_folders, **method_folders},
                          cuda_graph=True)
    try:
        for name in ("base", "long", "prefix", "adapter", "lora"):
            assert complete(static.port, name, TEXTS[1]) == complete(server.port, name, TEXTS[1])
        assert static.engine.graphs.steps  # the decode steps went through it
    finally:
        static.stop()
        static.runner.join(timeout=60)


def test_stream_options_include_usage_ends_with_a_usage_chunk(server):
    body = {"model": "prefix", "prompt": TEXTS[0], "max_tokens": 12, "temperature": 0,
            "stream_options": {"include_usage": True}}
    events = stream_events(server.port, "/v1/completions", body)
    status, whole = call(server.port, "POST", "/v1/completions",
                         {k: v for k, v in body.items() if k != "stream_options"})
    assert status == 200
    *chunks, last = events
    assert last["choices"] == [] and last["usage"] == whole["usage"]
    assert all(c["usage"] is None for c in chunks)  # OpenAI's rule: null until the last
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    plain = stream_events(server.port, "/v1/completions", {**body, "stream_options": None})
    assert all("usage" not in c for c in plain)
    for options, stream in (({"include_usage": True}, False), ({"include_usage": "yes"}, True),
                            ({"other": 1}, True), ([], True)):
        status, answer = call(server.port, "POST", "/v1/completions",
                              {**body, "stream_options": options, "stream": stream})
        assert (status, answer["error"]["param"]) == (400, "stream_options"), answer


def metric(text: str, name: str) -> float:
    """The value of one sample line of a Prometheus text exposition (0 when absent)."""
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_metrics_and_one_access_line_per_request(server):
    def metrics():
        status, text = fetch(server.port, "/metrics")
        assert status == 200
        return text

    before = metrics()
    ok = call(server.port, "POST", "/v1/completions",
              {"model": "adapter", "prompt": TEXTS[1], "max_tokens": 6, "temperature": 0})[1]
    assert call(server.port, "POST", "/v1/completions", {"model": "nope", "prompt": "a"})[0] == 404
    # The metrics and the log are written once the answer is out: wait for them, not a time.
    ok_line = (f"POST /v1/completions status=200 model=adapter prompt_tokens="
               f"{ok['usage']['prompt_tokens']} completion_tokens="
               f"{ok['usage']['completion_tokens']} ttft_ms=")
    assert wait_until(lambda: any(ok_line in line for line in server.log_lines)), server.log_lines
    assert wait_until(lambda: any("POST /v1/completions status=404 model=- prompt_tokens=0"
                                  in line for line in server.log_lines))
    line = next(line for line in server.log_lines if ok_line in line)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ POST /v1/completions status=200 "
                        r"model=adapter prompt_tokens=\d+ completion_tokens=\d+ ttft_ms=[\d.]+ "
                        r"total_ms=[\d.]+ finish=(stop|length)", line), line
    assert wait_until(lambda: metric(metrics(), 'llama_requests_total{status="404"}')
                      >= metric(before, 'llama_requests_total{status="404"}') + 1)
    after = metrics()
    for name, grown in (('llama_requests_total{status="200"}', 1),
                        ("llama_completion_tokens_total", ok["usage"]["completion_tokens"]),
                        ("llama_prompt_tokens_total", ok["usage"]["prompt_tokens"]),
                        ("llama_time_to_first_token_seconds_count", 1),
                        ("llama_time_per_output_token_seconds_count",
                         ok["usage"]["completion_tokens"] - 1)):
        assert metric(after, name) >= metric(before, name) + grown, name
    for name in ("llama_queue_length", "llama_batch_rows", "llama_batch_capacity",
                 "llama_decode_steps_total", 'llama_time_to_first_token_seconds_bucket{le="+Inf"}'):
        assert re.search(rf"^{re.escape(name)} \d", after, re.M), name
    assert "# TYPE llama_time_per_output_token_seconds histogram" in after


def fetch(port, path):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", path)
    response = connection.getresponse()
    text = response.read().decode()
    connection.close()
    assert response.getheader("Content-Type").startswith("text/plain")
    return response.status, text


def test_stopping_ends_the_replies_in_flight_with_a_clear_error(model_bin, tokenizer):
    """The generation loop is held inside a step (no timing): stop() meanwhile, and every reply
    in flight (streamed or whole) and every queued one ends with a 503 server_shutdown."""
    running = start_server(load_model(model_bin), tokenizer, {}, max_wait_ms=0)
    held, release, do = threading.Event(), threading.Event(), running.engine.do

    def held_step(plan):
        out = do(plan)
        held.set()
        assert release.wait(60)
        return out

    running.engine.do = held_step
    body = {"model": "base", "prompt": TEXTS[0], "max_tokens": 64, "temperature": 0}
    answers = {}
    clients = [threading.Thread(target=lambda: answers.update(whole=call(
        running.port, "POST", "/v1/completions", body))),
        threading.Thread(target=lambda: answers.update(stream=raw_stream(running.port, body)))]
    try:
        clients[0].start()
        assert held.wait(60)
        clients[1].start()
        assert wait_until(lambda: running.service.open_jobs == 2)
        running.stop()
    finally:
        release.set()
        for client in clients:
            client.join(timeout=60)
        running.runner.join(timeout=60)
    status, whole = answers["whole"]
    assert status == 503 and whole["error"]["code"] == "server_shutdown", whole
    assert "shutting down" in whole["error"]["message"]
    assert json.loads(answers["stream"][-1])["error"]["code"] == "server_shutdown"


def test_a_failing_step_ends_the_replies_with_a_500_not_a_hang(model_bin, tokenizer):
    """A bug in a step (here an engine that raises): the request waiting on it gets a 500
    internal_error, and the error reaches the caller of run() (serve.py then ends with its
    traceback)."""
    running = start_server(load_model(model_bin), tokenizer, {}, max_wait_ms=0)

    def broken(plan):
        raise RuntimeError("a bug in a step")

    running.engine.do = broken
    body = {"model": "base", "prompt": TEXTS[0], "max_tokens": 4}
    status, answer = call(running.port, "POST", "/v1/completions", body)
    assert (status, answer["error"]["code"]) == (500, "internal_error"), answer
    assert "RuntimeError: a bug in a step" in answer["error"]["message"]
    running.runner.join(timeout=60)
    assert isinstance(running.error, RuntimeError) and not running.runner.is_alive()


def raw_stream(port, body) -> list:
    """The data lines of a streamed answer, whatever they are."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                       headers=JSON)
    lines = connection.getresponse().read().decode().splitlines()
    connection.close()
    return [line[len("data: "):] for line in lines if line]


def wait_for_port(log_path, process, timeout_s=90):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log_path.read_text() if log_path.exists() else ""
        if "http://127.0.0.1:" in text:
            return int(text.split("http://127.0.0.1:")[1].split()[0])
        assert process.poll() is None, f"rank 0 exited {process.returncode}: {text}"
        time.sleep(0.2)
    raise AssertionError("the server did not start listening")


@contextlib.contextmanager
def every_method_on_two_ranks(ckpt_dir, extra_flags, prompt_folders, method_folders, tmp_path):
    """serve.py on 2 ranks (as torchrun starts them; rank r writes r.out and r.err) serving the
    base model and each method's tuning; yields (port, ranks) once it listens, and ends the ranks
    that are still running."""
    served = f"long={prompt_folders['long']},prefix={method_folders['prefix']}," \
             f"adapter={method_folders['adapter']},lora={method_folders['lora']}"
    argv = [sys.executable, "serve.py", "--ckpt_dir", str(ckpt_dir), *extra_flags, "--port", "0",
            "--base_name", "base", "--prompts", served]
    port = free_port()
    logs = [(open(tmp_path / f"{r}.out", "w"), open(tmp_path / f"{r}.err", "w")) for r in range(2)]
    ranks = [subprocess.Popen(argv, cwd=REPO, env=rank_env(r, 2, port), stdout=logs[r][0],
                              stderr=logs[r][1]) for r in range(2)]
    try:
        yield wait_for_port(tmp_path / "0.out", ranks[0]), ranks
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
                process.wait()


def answers_as_one_process(port, server):
    for name in ("base", "long", "prefix", "adapter", "lora"):
        assert complete(port, name, TEXTS[1]) == complete(server.port, name, TEXTS[1]), name


def test_a_tp2_server_answers_every_method_as_one_process(server, model_bin, prompt_folders,
                                                         method_folders, tmp_path):
    """Tunings trained in one process, served with every layer split over 2 TP ranks (prefixes,
    adapters and LoRAs cut by heads as they load), give the one-process server's answers."""
    with every_method_on_two_ranks(model_bin, ["--tp", "2", "--timeout_s", "60"], prompt_folders,
                                   method_folders, tmp_path) as (port, ranks):
        answers_as_one_process(port, server)
        ranks[0].send_signal(signal.SIGTERM)
        assert ranks[0].wait(timeout=120) == 0, (tmp_path / "0.err").read_text()


def test_two_rank_server_end_to_end_and_a_lost_stage(server, model_bin, prompt_folders,
                                                     method_folders, tmp_path):
    """Every method through serve.py on two stages (each keeps its own layers' tensors) answers
    what the one-process server answers; then a lost stage."""
    split_model.main(str(model_bin), 2, out_dir=str(tmp_path / "pp2"))
    with every_method_on_two_ranks(tmp_path / "pp2", ["--timeout_s", "20"], prompt_folders,
                                   method_folders, tmp_path) as (port, ranks):
        answers_as_one_process(port, server)
        ranks[1].send_signal(signal.SIGKILL)
        ranks[1].wait()
        status, answer = call(port, "POST", "/v1/completions",
                              {"model": "base", "prompt": TEXTS[0], "max_tokens": 8})
        assert status == 503 and answer["error"]["code"] == "stage_lost"
        assert ranks[0].wait(timeout=60) not in (0, None)
        assert "error:" in (tmp_path / "0.err").read_text()


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

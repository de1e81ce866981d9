"""The chat page at "/": one self-contained file (no outside resource), answered without the
API key and under a strict Content-Security-Policy; its script parses (node, when installed);
under node with a stub DOM (when node is installed) it lists the models, streams a chat reply
equal to the whole answer, shows tokens and sends the API key; in headless Chromium (when
installed, driven over the DevTools protocol) a streamed reply shown in the page.
Run: python3 -m pytest -q tests/test_page.py
"""
import http.client
import json
import re
import shutil
import subprocess
from urllib.parse import quote

import pytest

from llama.formats.checkpoint import load_model
from llama.model.tokenizer import Tokenizer
from browser import chat_reply, find_browser
from test_serve import start_server


@pytest.fixture(scope="module")
def server(model_bin, assets):
    tokenizer = Tokenizer(str(assets / "stories260K" / "tok512.model"))
    running = start_server(load_model(model_bin), tokenizer, {})
    yield running
    running.stop()
    running.runner.join(timeout=10)


def get(port, path, headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", path, headers=headers or {})
    response = connection.getresponse()
    body = response.read().decode()
    connection.close()
    return response, body


def test_the_page_is_self_contained_and_served_without_the_key(server):
    server.service.api_key = "s3cret"
    try:
        response, page = get(server.port, "/")
        assert get(server.port, "/v1/models")[0].status == 401  # the API itself still needs it
    finally:
        server.service.api_key = None
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/html")
    policy = response.getheader("Content-Security-Policy")
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy
    assert not re.search(r"(src|href)\s*=|https?://|@import|url\(", page), "an outside resource"
    for needed in ("/v1/models", "/v1/chat/completions", "AbortController", "tokens/s",
                   "include_usage", "Authorization", "textContent"):
        assert needed in page, needed
    assert "innerHTML" not in page  # a reply is shown as text, never parsed as HTML


def test_the_page_script_parses(server, tmp_path):
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("node is not installed")
    page = get(server.port, "/")[1]
    script = tmp_path / "page.js"
    script.write_text(page.split("<script>")[1].split("</script>")[0])
    checked = subprocess.run([node, "--check", str(script)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


# Just enough of a browser for the page's script under node (which has fetch, streams and
# TextDecoder): elements that keep what the script sets, and fetch relative to the server.
NODE_PAGE = r"""
const [base, say, key] = process.argv.slice(2);
const elements = {};
class Element {
  constructor(id) { Object.assign(this, {id, value: "", textContent: "", className: "",
    children: [], listeners: {}, disabled: false, scrollTop: 0, scrollHeight: 0}); }
  addEventListener(type, listener) { this.listeners[type] = listener; }
  appendChild(child) { this.children.push(child); return child; }
  replaceChildren(...children) {
    this.children = children;
    if (this.id === "model" && !this.value && children.length) this.value = children[0].value;
  }
  click() { this.listeners.click(); }
}
globalThis.document = {getElementById: (id) => elements[id] || (elements[id] = new Element(id)),
                       createElement: () => new Element()};
globalThis.sessionStorage = {getItem: () => key || null, setItem: () => {}};
globalThis.location = {search: "?say=" + encodeURIComponent(say)};
globalThis.Option = class { constructor(text, value) { this.text = text; this.value = value; } };
const realFetch = fetch;
globalThis.fetch = (url, init) => realFetch(base + url, init);
document.getElementById("temperature").value = "0";
require("vm").runInThisContext(require("fs").readFileSync(process.argv[5], "utf8"));
const started = Date.now();
const timer = setInterval(() => {
  const log = document.getElementById("log").children;
  const status = document.getElementById("status").textContent;
  const done = log.length >= 2 && !document.getElementById("send").disabled;
  if (done || (status && !log.length) || Date.now() - started > 60000) {
    clearInterval(timer);
    console.log(JSON.stringify({status, model: document.getElementById("model").value,
      log: log.map((e) => [e.className, e.textContent])}));
  }
}, 50);
"""


def run_page_in_node(server, tmp_path, say: str, key: str = ""):
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("node is not installed")
    page = get(server.port, "/")[1]
    (tmp_path / "page.js").write_text(page.split("<script>")[1].split("</script>")[0])
    (tmp_path / "harness.js").write_text(NODE_PAGE)
    done = subprocess.run([node, str(tmp_path / "harness.js"), f"http://127.0.0.1:{server.port}",
                           say, key, str(tmp_path / "page.js")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_page_streams_a_chat_reply_equal_to_the_whole_answer(server, tmp_path):
    shown = run_page_in_node(server, tmp_path, "Tell me a story")
    assert shown["model"] == "base"
    assert [kind for kind, _ in shown["log"]] == ["turn user", "turn assistant"], shown
    status, whole = call_chat(server.port, "Tell me a story")
    assert status == 200
    assert shown["log"][1][1] == whole["choices"][0]["message"]["content"]
    assert re.match(rf"{whole['usage']['completion_tokens']} tokens", shown["status"]), shown


def test_the_page_sends_the_api_key_and_says_when_one_is_needed(server, tmp_path):
    server.service.api_key = "s3cret"
    try:
        refused = run_page_in_node(server, tmp_path, "Hi")
        allowed = run_page_in_node(server, tmp_path, "Hi", key="s3cret")
    finally:
        server.service.api_key = None
    assert refused["status"] == "this server needs an API key: enter it above" and not refused["log"]
    assert [kind for kind, _ in allowed["log"]] == ["turn user", "turn assistant"], allowed


def call_chat(port, text, temperature=0.0):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = {"model": "base", "messages": [{"role": "user", "content": text}],
            "temperature": temperature}
    connection.request("POST", "/v1/chat/completions", body=json.dumps(body),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    answer = json.loads(response.read())
    connection.close()
    return response.status, answer


def test_headless_browser_shows_a_streamed_reply(server):
    """A real browser (driven over the DevTools protocol, tests/browser.py) loads the page, lists
    the models and asks through ?say=; once the reply has streamed in, the DOM shows the question,
    the same text as the whole answer to that request (the page's temperature, the server's
    default seed) and its token count, and the page can be photographed."""
    if find_browser() is None:
        pytest.skip("no Chromium installed")
    question = "Once upon a time"
    state, png = chat_reply(f"http://127.0.0.1:{server.port}/?say={quote(question)}")
    status, whole = call_chat(server.port, question, temperature=0.7)  # the page's default
    assert status == 200
    assert state["models"] == ["base"]
    assert state["turns"] == [["turn user", question],
                              ["turn assistant", whole["choices"][0]["message"]["content"]]]
    assert state["status"].startswith(f"{whole['usage']['completion_tokens']} tokens"), state
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000

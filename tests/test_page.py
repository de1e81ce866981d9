"""The chat page at "/": one self-contained file (no outside resource), answered without the
API key and under a strict Content-Security-Policy; its script parses (node, when installed);
in headless Chromium (when installed) it lists the models, streams a reply and shows tokens/s.
Run: python3 -m pytest -q tests/test_page.py
"""
import html
import http.client
import re
import shutil
import subprocess

import pytest

from llama.formats.checkpoint import load_model
from llama.model.tokenizer import Tokenizer
from test_serve import start_server

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


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


def test_headless_browser_chats_through_the_page(server):
    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no Chromium installed")
    done = subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox",
                           "--virtual-time-budget=30000", "--dump-dom",
                           f"http://127.0.0.1:{server.port}/?say=Once%20upon%20a%20time"],
                          capture_output=True, text=True, timeout=120)
    dom = html.unescape(done.stdout)
    assert '<option value="base">base</option>' in dom, dom[-2000:]
    reply = re.search(r'class="turn assistant">([^<]+)<', dom)
    assert reply and reply.group(1).strip(), dom[-2000:]
    assert "tokens/s" in dom

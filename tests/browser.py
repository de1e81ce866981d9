"""Drive headless Chromium over the DevTools protocol on a pipe (--remote-debugging-pipe: commands
in on its fd 3, answers out on its fd 4, each a JSON text ended by a NUL byte); standard library
only. tests/test_page.py uses it; run alone it saves a screenshot of the chat page once a reply
has streamed in (the picture in docs/serving.md):

    python tests/browser.py "http://127.0.0.1:8000/?say=Once%20upon%20a%20time" docs/img/chat_page.png
"""
import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
# The chat page (llama/serving/page.html) has answered: a reply is shown, Send is enabled again
# and the status line counts its tokens (or names an error).
REPLY_DONE = ("(() => { const reply = document.querySelector('.turn.assistant, .error');"
              " return Boolean(reply && reply.textContent && !document.getElementById('send')"
              ".disabled && document.getElementById('status').textContent); })()")
# subprocess passes fds but cannot renumber them (and a POSIX shell need not take fds past 9):
# this small program puts the pipe's ends at the browser's 3 and 4, then becomes the browser.
AT_FDS_3_AND_4 = ("import os, sys; commands, answers = int(sys.argv[1]), int(sys.argv[2]); "
                  "os.dup2(commands, 3); os.dup2(answers, 4); os.close(commands); "
                  "os.close(answers); os.execv(sys.argv[3], sys.argv[3:])")
PAGE_STATE = ("JSON.stringify({models: [...document.querySelectorAll('#model option')]"
              ".map((o) => o.value), turns: [...document.querySelectorAll('#log > div')]"
              ".map((d) => [d.className, d.textContent]),"
              " status: document.getElementById('status').textContent})")


def find_browser():
    return next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)


class Browser:
    """One headless browser and its DevTools pipe; every wait is bounded by timeout_s."""

    def __init__(self, executable: str, width: int = 820, height: int = 520,
                 timeout_s: float = 120.0):
        self.timeout_s, self.next_id, self.buffer = timeout_s, 0, b""
        self.profile = tempfile.TemporaryDirectory(prefix="browser-profile-")
        commands_read, self.commands = high_pipe()
        self.answers, answers_write = high_pipe()
        self.process = subprocess.Popen(
            [sys.executable, "-c", AT_FDS_3_AND_4, str(commands_read), str(answers_write),
             executable, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--remote-debugging-pipe", f"--user-data-dir={self.profile.name}",
             f"--window-size={width},{height}", "about:blank"],
            pass_fds=(commands_read, answers_write), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(commands_read)
        os.close(answers_write)
        self.size = (width, height)

    def call(self, method: str, params: dict = None, session: str = None) -> dict:
        """Send one command and return its result (events that come first are skipped)."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        while True:
            answer = self.read_message()
            if answer.get("id") == self.next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]

    def read_message(self) -> dict:
        deadline = time.monotonic() + self.timeout_s
        while b"\0" not in self.buffer:
            ready, _, _ = select.select([self.answers], [], [], max(deadline - time.monotonic(), 0))
            chunk = os.read(self.answers, 1 << 20) if ready else b""
            if not chunk:
                raise TimeoutError(f"the browser did not answer within {self.timeout_s:g} s "
                                   f"(exit code {self.process.poll()})")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def open(self, url: str) -> str:
        """A new tab at url, of the browser's window size; its session id."""
        target = self.call("Target.createTarget", {"url": url})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})
        session = session["sessionId"]
        width, height = self.size
        self.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                  "deviceScaleFactor": 1, "mobile": False}, session)
        return session

    def evaluate(self, session: str, expression: str):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                           session)
        return result["result"].get("value")

    def wait_for(self, session: str, expression: str) -> bool:
        """Poll expression in the page until it is true (True) or timeout_s passes (False)."""
        deadline = time.monotonic() + self.timeout_s
        while not self.evaluate(session, expression):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def screenshot(self, session: str) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"},
                                          session)["data"])

    def close(self):
        try:
            self.call("Browser.close")
            self.process.wait(timeout=30)
        except (OSError, RuntimeError, TimeoutError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        os.close(self.commands)
        os.close(self.answers)
        self.profile.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def high_pipe() -> tuple:
    """A pipe whose two ends are numbered 10 or above, so that putting them at 3 and 4 in the
    browser can never overwrite one with the other."""
    ends = []
    for end in os.pipe():
        ends.append(fcntl.fcntl(end, fcntl.F_DUPFD_CLOEXEC, 10))
        os.close(end)
    return tuple(ends)


def chat_reply(url: str, timeout_s: float = 120.0) -> tuple:
    """Open the chat page at url (its ?say= asks the question), wait for the reply to stream in;
    (the page's models, turns and status as the DOM shows them, a PNG of it)."""
    with Browser(find_browser(), timeout_s=timeout_s) as browser:
        session = browser.open(url)
        if not browser.wait_for(session, REPLY_DONE):
            raise TimeoutError(f"no reply on the page within {timeout_s:g} s: "
                               f"{browser.evaluate(session, PAGE_STATE)}")
        return json.loads(browser.evaluate(session, PAGE_STATE)), browser.screenshot(session)


if __name__ == "__main__":
    if len(sys.argv) != 3 or find_browser() is None:
        raise SystemExit("usage: python tests/browser.py URL OUT.png (needs chromium installed)")
    state, png = chat_reply(sys.argv[1])
    with open(sys.argv[2], "wb") as out:
        out.write(png)
    print(json.dumps(state, indent=1))

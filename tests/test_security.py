"""Security: no code runs from a checkpoint, no path from a file leads out of its folder, and
downloads come only from the base URL, checked and bounded.

- every torch.load in the repository uses weights_only=True (read from the source itself);
- a pickle that would run code is refused by every loader of .pth/.pt/.bin files (Hugging Face
  pytorch_model.bin, tuning.pt, adapter_model.bin, checkpoint.pt for --resume; stage files and
  Meta shards are in test_cli_errors.py, which also proves that the payload runs when loaded
  unsafely), and a marker file proves that nothing ran;
- the paths a prompt folder's JSON files mention are never opened (split.json's names are
  checked in test_cli_errors.py);
- a redirect to another host is not followed, a server sending more than the expected size is
  cut off, and nothing is left behind (checksums: test_download.py).
Run: python3 -m pytest -q tests/test_security.py
"""
import ast
import contextlib
import functools
import http.server
import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import example_ft
import ft_main
from llama.formats import download
from llama.formats.checkpoint import load_model, sha256_of
from llama.errors import BadInput
from llama.formats.hf import interleaved_to_rotate_half, meta_to_hf_name, save_hf_safetensors
from llama.tuning.peft import export_peft
from llama.tuning.files import load_soft_prompt, save_tuning
from payload import RunsCode

pytestmark = pytest.mark.usefixtures("no_outside_settings")

REPO = Path(__file__).resolve().parents[1]


# ---- every torch.load uses weights_only=True ----

def python_files():
    return sorted(p for p in REPO.rglob("*.py")
                  if not any(part.startswith(".") for part in p.relative_to(REPO).parts))


def unsafe_loads(path):
    """(line, what) for each use of torch.load that is not a call with weights_only=True, and
    each pickle/marshal load or np.load without allow_pickle=False. A test that proves its
    payload really runs code (a function named *runs_code_when_loaded_unsafely) may load
    unsafely: that is its point."""
    tree = ast.parse(path.read_text(), str(path))
    found, allowed = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and "runs_code_when_loaded_unsafely" in node.name:
            allowed.update(id(inner) for inner in ast.walk(node))
    calls = {id(node.func): node for node in ast.walk(tree) if isinstance(node, ast.Call)}

    def keyword(call, name):
        values = [k.value for k in call.keywords if k.arg == name]
        return values[0].value if values and isinstance(values[0], ast.Constant) else None

    for node in ast.walk(tree):
        if id(node) in allowed:
            continue
        name = ast.unparse(node) if isinstance(node, (ast.Attribute, ast.Name)) else None
        call = calls.get(id(node))
        if name in ("torch.load", "torch.serialization.load"):
            if call is None or keyword(call, "weights_only") is not True:
                found.append((node.lineno, ast.unparse(call or node)[:80]))
        elif name in ("pickle.load", "pickle.loads", "marshal.load", "marshal.loads",
                      "pickle.Unpickler"):
            found.append((node.lineno, name))
        elif name in ("np.load", "numpy.load"):
            if call is None or keyword(call, "allow_pickle") is not False:
                found.append((node.lineno, ast.unparse(call or node)[:80]))
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch", "pickle", "numpy") \
                and any(alias.name in ("load", "loads") for alias in node.names):
            found.append((node.lineno, f"from {node.module} import load"))
    return sorted(found)


def test_every_torch_load_in_the_repository_uses_weights_only():
    files = python_files()
    assert any(p.name == "tensor_files.py" for p in files)
    found = {str(p.relative_to(REPO)): unsafe_loads(p) for p in files}
    assert {path: lines for path, lines in found.items() if lines} == {}
    # the check sees what it checks: the loader itself, and the repository's tests
    uses = sum(p.read_text().count("torch.load(") for p in files)
    assert uses >= 10 and "weights_only=True" in (REPO / "llama" / "formats" / "tensor_files.py").read_text()


def test_the_source_check_catches_unsafe_loads(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("import pickle, torch, numpy as np\n"
                    "a = torch.load('x')\n"
                    "b = torch.load('x', weights_only=False)\n"
                    "c = torch.load('x', weights_only=True)\n"
                    "loader = torch.load\n"
                    "d = pickle.loads(b'')\n"
                    "e = np.load('x.npz')\n"
                    "f = np.load('x.npz', allow_pickle=False)\n"
                    "from torch import load\n")
    assert [line for line, _ in unsafe_loads(path)] == [2, 3, 5, 6, 7, 9]


# ---- pickles that would run code ----

def hf_state_dict(source):
    state = {}
    for name in source.names():
        tensor = source.load(name)
        if name.endswith("attention.wq.weight"):
            tensor = interleaved_to_rotate_half(tensor, source.args.n_heads)
        elif name.endswith("attention.wk.weight"):
            tensor = interleaved_to_rotate_half(tensor, source.args.n_kv_heads)
        state[meta_to_hf_name(name)] = tensor.clone()
    return state


ZIP_FORMATS = pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])


@ZIP_FORMATS
def test_hf_pytorch_model_bin_that_runs_code_is_refused(source, tmp_path, zip_format):
    folder, marker = tmp_path / "hf", tmp_path / "marker"
    save_hf_safetensors({n: source.load(n) for n in source.names()}, source.args, folder)
    (folder / "model.safetensors").unlink()
    state = hf_state_dict(source)
    state["model.norm.weight"] = {"nested": [RunsCode(marker)]}
    torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=zip_format)
    with pytest.raises(BadInput, match=r"pytorch_model\.bin needs code to unpickle and was "
                                       r"refused \(it calls (builtins\.)?exec;"):
        load_model(folder)
    assert not marker.exists()


@pytest.fixture
def prompt_dir(source, tmp_path):
    weight = torch.randn(4, source.args.dim) * 0.02
    save_tuning(tmp_path / "prompt", "prompt", {"prompt": weight}, source.args, {"template": "plain"})
    export_peft(tmp_path / "prompt" / "peft", "prompt", {"prompt": weight}, source.args, {"init": "random"})
    return tmp_path / "prompt"


@ZIP_FORMATS
def test_tuning_pt_that_runs_code_is_refused(source, prompt_dir, tmp_path, zip_format):
    marker = tmp_path / "marker"
    torch.save(RunsCode(marker), prompt_dir / "tuning.pt",
               _use_new_zipfile_serialization=zip_format)
    # tuning.json vouches for the file, so only the unpickler stands between it and the code
    info = json.loads((prompt_dir / "tuning.json").read_text())
    info["tuning_sha256"] = sha256_of(prompt_dir / "tuning.pt")
    (prompt_dir / "tuning.json").write_text(json.dumps(info))
    with pytest.raises(BadInput, match=r"tuning\.pt needs code to unpickle and was refused"):
        load_soft_prompt(prompt_dir, source.args)
    assert not marker.exists()


@ZIP_FORMATS
def test_peft_adapter_model_bin_that_runs_code_is_refused(source, prompt_dir, tmp_path,
                                                          zip_format):
    marker = tmp_path / "marker"
    torch.save({"prompt_embeddings": RunsCode(marker)}, prompt_dir / "peft" / "adapter_model.bin",
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(BadInput, match=r"adapter_model\.bin needs code to unpickle and was "
                                       r"refused"):
        load_soft_prompt(prompt_dir / "peft", source.args)
    with pytest.raises(BadInput, match=r"adapter_model\.bin needs code to unpickle"):
        example_ft.main(ckpt_dir=str(source.path), prompt=str(prompt_dir / "peft"), max_gen_len=2)
    assert not marker.exists()


def test_training_checkpoint_that_runs_code_is_refused_by_resume(model_bin, assets, tmp_path):
    records = json.loads((assets / "alpaca" / "alpaca_data_1k.json").read_text())[:24]
    (tmp_path / "data.json").write_text(json.dumps(records))
    out, marker = tmp_path / "run", tmp_path / "marker"
    args = dict(ckpt_dir=str(model_bin), data=str(tmp_path / "data.json"), out=str(out),
                template="plain", n_virtual_tokens=4, max_seq_len=96, global_batch_size=4,
                micro_batch_size=2, steps=2, eval_fraction=0, device="cpu", dtype="float32")
    ft_main.main(**args)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    state["optimizer"] = {"state": RunsCode(marker)}
    torch.save(state, out / "checkpoint.pt")
    with pytest.raises(BadInput, match=r"checkpoint\.pt needs code to unpickle and was refused "
                                       r"\(it calls (builtins\.)?exec;"):
        ft_main.main(**args, resume=True)
    assert not marker.exists()


# ---- what a prompt folder's JSON names is never opened ----

OPENED = []  # files opened while a test records them (see `recording_opens`)
RECORDING = threading.Event()


def audit(event, args):
    if event == "open" and RECORDING.is_set() and isinstance(args[0], (str, bytes, os.PathLike)):
        OPENED.append(os.fsdecode(args[0]))


@pytest.fixture
def recording_opens():
    """A context manager: the files opened (from Python) inside it are in OPENED."""
    if audit not in getattr(sys, "_llama_audit_hooks", ()):
        sys.addaudithook(audit)  # hooks cannot be removed: this one only acts while recording
        sys._llama_audit_hooks = (audit,)
    OPENED.clear()

    @contextlib.contextmanager
    def recording():
        RECORDING.set()
        try:
            yield OPENED
        finally:
            RECORDING.clear()
    yield recording
    RECORDING.clear()


def test_paths_named_in_a_prompt_folder_are_never_opened(source, prompt_dir, tmp_path,
                                                         recording_opens):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.model"  # not a tokenizer: opened from C++, it would fail loudly
    secret.write_bytes(b"not a tokenizer")
    names = {"absolute": str(secret), "relative": "../../outside/secret.model"}
    info = json.loads((prompt_dir / "tuning.json").read_text())
    info.update(tokenizer=names["absolute"], ckpt_dir=names["relative"], data=names["absolute"])
    (prompt_dir / "tuning.json").write_text(json.dumps(info))
    peft = prompt_dir / "peft"
    config = json.loads((peft / "adapter_config.json").read_text())
    config.update(tokenizer_name_or_path=names["relative"], base_model_name_or_path=str(outside))
    (peft / "adapter_config.json").write_text(json.dumps(config))
    extra = json.loads((peft / "llama_prompt.json").read_text())
    (peft / "llama_prompt.json").write_text(json.dumps({**extra, "tokenizer": names["absolute"]}))

    with recording_opens() as files:
        for folder in (prompt_dir, peft):
            load_soft_prompt(folder, source.args)
            example_ft.main(ckpt_dir=str(source.path), prompt=str(folder), prompts=["Hi"], max_gen_len=2)
    opened = {Path(p).resolve() for p in files}
    assert (prompt_dir / "tuning.pt").resolve() in opened  # the recorder does see opens
    assert not [p for p in opened if outside.resolve() in p.parents]


# ---- downloads: only from the base URL, bounded ----

class QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class Redirects(http.server.BaseHTTPRequestHandler):
    """Sends every request on to `target` + the same path."""
    target = None

    def do_GET(self):
        self.send_response(302)
        self.send_header("Location", self.target + self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


class Oversized(http.server.BaseHTTPRequestHandler):
    """The real file followed by endless junk; `announce`: claim the true total in advance."""
    assets, announce, sent = None, False, []

    def do_GET(self):
        data = (self.assets / self.path.lstrip("/")).read_bytes()
        junk = b" " * (1 << 20)
        self.send_response(200)
        if self.announce:
            self.send_header("Content-Length", str(len(data) + 64 * len(junk)))
        self.end_headers()
        total = 0
        try:
            self.wfile.write(data)
            total = len(data)
            for _ in range(64):
                self.wfile.write(junk)
                total += len(junk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.sent.append(total)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    servers = []

    def start(handler):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server, f"http://127.0.0.1:{server.server_address[1]}"
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())


def counting_files(assets, requests):
    class Counting(QuietFiles):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()
    return functools.partial(Counting, directory=str(assets))


def test_redirect_to_another_host_is_not_followed(assets, serve, tmp_path):
    requests = []
    other, other_url = serve(counting_files(assets, requests))
    Redirects.target = f"http://localhost:{other.server_address[1]}"  # another host name
    _, mirror = serve(Redirects)
    with pytest.raises(BadInput, match=r"alpaca_data_1k\.json redirects to http://localhost:\d+/"
                                       r"alpaca/alpaca_data_1k\.json, another host: refused"):
        download.main(model="none", data="alpaca_1k", data_folder=tmp_path, mirror=mirror)
    assert requests == [] and files_under(tmp_path) == []


class MovedOnce(QuietFiles):
    """Every file has moved to /moved/<path> on the same server."""

    def do_GET(self):
        if self.path.startswith("/moved/"):
            self.path = self.path[len("/moved"):]
            return super().do_GET()
        self.send_response(301)
        self.send_header("Location", "/moved" + self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_redirect_on_the_same_host_is_followed_and_checked(assets, serve, tmp_path):
    _, mirror = serve(functools.partial(MovedOnce, directory=str(assets)))
    download.main(model="none", data="alpaca_1k", data_folder=tmp_path, mirror=mirror)
    assert sha256_of(tmp_path / "alpaca_data_1k.json") == download.DATASETS["alpaca_1k"][0].sha256


@pytest.mark.parametrize("announce", [True, False], ids=["announced", "unannounced"])
def test_server_sending_more_than_the_known_size_is_cut_off(assets, serve, tmp_path, announce):
    handler = type("Oversized", (Oversized,), {"assets": assets, "announce": announce, "sent": []})
    _, mirror = serve(handler)
    expected = download.DATASETS["alpaca_1k"][0].size
    with pytest.raises(BadInput, match=r"alpaca_data_1k\.json (announces [\d,]+ bytes|sent more "
                                       rf"than the {expected:,} bytes expected)"):
        download.main(model="none", data="alpaca_1k", data_folder=tmp_path, mirror=mirror)
    assert files_under(tmp_path) == []
    deadline = time.monotonic() + 30
    while not handler.sent and time.monotonic() < deadline:  # the server notices the hang-up
        time.sleep(0.05)
    assert handler.sent and handler.sent[0] < 32 << 20  # the client stopped reading early


def test_file_of_unknown_size_is_cut_off_at_the_cap(assets, serve, tmp_path, monkeypatch):
    """The full Alpaca file has no published size: the folder's cap bounds it instead."""
    monkeypatch.setattr(download, "DATA_CAP_BYTES", 2 << 20)
    (tmp_path / "mirror" / "alpaca").mkdir(parents=True)
    (tmp_path / "mirror" / "alpaca" / "alpaca_data.json").write_text(
        json.dumps([{"instruction": "x" * 100, "output": "y"}] * 40_000))  # about 4.6 MB
    handler = type("Oversized", (Oversized,), {"assets": tmp_path / "mirror", "sent": []})
    _, mirror = serve(handler)
    with pytest.raises(BadInput, match=r"alpaca_data\.json sent more than the 2,097,152 bytes "
                                       r"expected"):
        download.main(model="none", data="alpaca", data_folder=tmp_path / "out", mirror=mirror)
    assert not (tmp_path / "out").exists() or files_under(tmp_path / "out") == []

"""llama.formats.download against local mirrors of the real assets: an HTTP server on 127.0.0.1, a folder,
and a server that hangs up midway. Offline and fast."""
import dataclasses
import errno
import functools
import hashlib
import http.server
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from llama.formats import download
from llama.errors import BadInput
from llama.model.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("no_outside_settings")

REPO = Path(__file__).resolve().parents[1]


class QuietFileHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class HangUpHandler(http.server.BaseHTTPRequestHandler):
    """Promises the whole alpaca_1k file, sends a sliver of it, then closes the connection."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(download.DATASETS["alpaca_1k"][0].size))
        self.end_headers()
        self.wfile.write(b"[" + b" " * 4095)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


def serve(handler):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def http_mirror(assets):
    server, url = serve(functools.partial(QuietFileHandler, directory=str(assets)))
    yield url
    server.shutdown()
    server.server_close()


@pytest.fixture
def offline(monkeypatch):
    """No network: every connection and name lookup fails as on a machine without internet."""
    def unreachable(*args, **kwargs):
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(socket, "getaddrinfo", unreachable)


def sha256_of(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())


def test_http_mirror_fetches_model_tokenizer_and_data(tmp_path, http_mirror):
    download.main(model="stories260K", data="alpaca_1k", folder=tmp_path / "ckpts",
                  data_folder=tmp_path / "datasets", mirror=http_mirror)
    checkpoint = tmp_path / "ckpts" / "stories260K" / "stories260K.bin"
    assert sha256_of(checkpoint) == download.MODELS["stories260K"][0].sha256
    data = tmp_path / "datasets" / "alpaca_data_1k.json"
    assert sha256_of(data) == download.DATASETS["alpaca_1k"][0].sha256
    tokenizer = Tokenizer(str(tmp_path / "ckpts" / "stories260K" / "tok512.model"))
    assert tokenizer.n_words == 512
    assert tokenizer.encode("Once upon a time", bos=False, eos=False) == [403, 407, 261, 378]
    assert files_under(tmp_path) == ["ckpts/stories260K/stories260K.bin",
                                     "ckpts/stories260K/tok512.model",
                                     "datasets/alpaca_data_1k.json"]


def test_local_folder_mirror_and_tuple_of_names(tmp_path, assets):
    download.main(model="llama-tokenizer", data=("alpaca_1k", "alpaca_5000"),
                  folder=tmp_path / "ckpts", data_folder=tmp_path / "datasets", mirror=str(assets))
    tokenizer_sha256 = download.MODELS["llama-tokenizer"][0].sha256
    assert sha256_of(tmp_path / "ckpts" / "tokenizer.model") == tokenizer_sha256
    data_sha256 = download.DATASETS["alpaca_5000"][0].sha256
    assert sha256_of(tmp_path / "datasets" / "alpaca_5000.json") == data_sha256
    assert (tmp_path / "datasets" / "alpaca_data_1k.json").is_file()


def test_mirror_from_environment(tmp_path, http_mirror, monkeypatch):
    monkeypatch.setenv("LLAMA_MIRROR", http_mirror)
    download.main(model="none", data="alpaca_1k", data_folder=tmp_path)
    assert files_under(tmp_path) == ["alpaca_data_1k.json"]


def test_wrong_checksum_is_refused_and_leaves_nothing(tmp_path, http_mirror, monkeypatch):
    entry = download.DATASETS["alpaca_1k"][0]
    wrong = dataclasses.replace(entry, sha256="0" * 64)
    monkeypatch.setitem(download.DATASETS, "alpaca_1k", (wrong,))
    with pytest.raises(BadInput, match="sha256.*alpaca_data_1k.json|alpaca_data_1k.json.*sha256"):
        download.main(model="none", data="alpaca_1k", data_folder=tmp_path, mirror=http_mirror)
    assert files_under(tmp_path) == []


def test_file_that_is_no_tokenizer_is_refused(tmp_path, assets, monkeypatch):
    checkpoint, tokenizer = download.MODELS["stories260K"]
    wrong = dataclasses.replace(tokenizer, mirror_path="stories260K/tok512.bin")
    monkeypatch.setitem(download.MODELS, "stories260K", (checkpoint, wrong))
    with pytest.raises(BadInput, match="sentencepiece"):
        download.main(model="stories260K", data="none", folder=tmp_path / "ckpts",
                      mirror=str(assets))
    assert list(tmp_path.iterdir()) == []  # no half-filled stories260K, no empty ckpts


def test_failed_entry_keeps_what_was_there_before(tmp_path, assets, monkeypatch):
    download.main(model="stories260K", data="none", folder=tmp_path, mirror=str(assets))
    (tmp_path / "stories260K" / "tok512.model").unlink()
    (tmp_path / "stories260K" / "notes.txt").write_text("mine")
    checkpoint, tokenizer = download.MODELS["stories260K"]
    wrong = dataclasses.replace(tokenizer, mirror_path="stories260K/tok512.bin")
    monkeypatch.setitem(download.MODELS, "stories260K", (checkpoint, wrong))
    with pytest.raises(BadInput, match="sentencepiece"):
        download.main(model="stories260K", data="none", folder=tmp_path, mirror=str(assets),
                      force=True)
    assert files_under(tmp_path) == ["stories260K/notes.txt", "stories260K/stories260K.bin"]


def test_offline_without_mirror_uses_the_assets_beside_the_repository(tmp_path, assets, offline,
                                                                       monkeypatch, capsys):
    assert download.ASSETS_BESIDE_REPO == REPO.parent / "shared" / "assets"
    monkeypatch.setattr(download, "ASSETS_BESIDE_REPO", assets)
    download.main(model="stories260K", data="alpaca_1k", folder=tmp_path / "ckpts",
                  data_folder=tmp_path / "datasets")
    assert files_under(tmp_path) == ["ckpts/stories260K/stories260K.bin",
                                     "ckpts/stories260K/tok512.model",
                                     "datasets/alpaca_data_1k.json"]
    said = [line for line in capsys.readouterr().err.splitlines() if "no --mirror" in line]
    assert said == [f"no --mirror given: using the assets beside the repository, {assets} "
                    "(--mirror '' fetches from the public sources)"]


def test_offline_failure_leaves_no_empty_folder(tmp_path, offline, monkeypatch):
    monkeypatch.setattr(download, "ASSETS_BESIDE_REPO", tmp_path / "no_shared" / "assets")
    with pytest.raises(BadInput, match="huggingface.co.*Network is unreachable"):
        download.main(model="stories260K", data="none", folder=tmp_path / "ckpts")
    with pytest.raises(BadInput, match="raw.githubusercontent.com"):
        download.main(model="none", data="alpaca_1k", data_folder=tmp_path / "a" / "datasets")
    assert list(tmp_path.iterdir()) == []


def test_empty_mirror_means_the_public_sources(tmp_path, assets, offline, monkeypatch):
    monkeypatch.setattr(download, "ASSETS_BESIDE_REPO", assets)
    with pytest.raises(BadInput, match="raw.githubusercontent.com"):
        download.main(model="none", data="alpaca_1k", data_folder=tmp_path, mirror="")
    monkeypatch.setenv("LLAMA_MIRROR", "")
    with pytest.raises(BadInput, match="raw.githubusercontent.com"):
        download.main(model="none", data="alpaca_1k", data_folder=tmp_path)
    assert files_under(tmp_path) == []


@pytest.mark.skipif(not (REPO.parent / "shared" / "assets").is_dir(),
                    reason="no ../shared/assets beside the repository")
def test_cli_offline_takes_the_shared_assets_as_the_quickstart_did(tmp_path):
    """The reported command, in a process whose internet is a proxy that refuses connections."""
    env = {key: value for key, value in os.environ.items()
           if key != "LLAMA_MIRROR" and not key.lower().endswith("_proxy")}
    env |= {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    result = subprocess.run(
        [sys.executable, "-m", "llama.formats.download", "--model", "stories260K", "--data", "none",
         "--folder", "ckpts"], cwd=tmp_path, env=env | {"PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[0].startswith("no --mirror given: using the assets beside "
                                                    f"the repository, {REPO.parent}")
    assert files_under(tmp_path) == ["ckpts/stories260K/stories260K.bin",
                                     "ckpts/stories260K/tok512.model"]


def test_connection_dropped_midway_leaves_nothing(tmp_path):
    server, url = serve(HangUpHandler)
    try:
        with pytest.raises(BadInput, match="127.0.0.1"):
            download.main(model="none", data="alpaca_1k", data_folder=tmp_path, mirror=url)
    finally:
        server.shutdown()
        server.server_close()
    assert files_under(tmp_path) == []


def test_interrupt_leaves_nothing(tmp_path, assets, monkeypatch):
    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(download, "check_download", interrupt)
    with pytest.raises(BadInput, match="interrupted"):
        download.main(model="none", data="alpaca_1k", data_folder=tmp_path, mirror=str(assets))
    assert files_under(tmp_path) == []


def test_existing_good_file_is_skipped_and_kept_by_failed_force(tmp_path, assets):
    download.main(model="none", data="alpaca_1k", data_folder=tmp_path, mirror=str(assets))
    empty_mirror = tmp_path / "empty_mirror"
    empty_mirror.mkdir()
    # The empty mirror would fail any fetch, so success means nothing was fetched.
    download.main(model="none", data="alpaca_1k", data_folder=tmp_path, mirror=str(empty_mirror))
    with pytest.raises(BadInput, match="alpaca_data_1k.json"):
        download.main(model="none", data="alpaca_1k", data_folder=tmp_path,
                      mirror=str(empty_mirror), force=True)
    assert sha256_of(tmp_path / "alpaca_data_1k.json") == download.DATASETS["alpaca_1k"][0].sha256


def test_existing_corrupt_file_is_fetched_again(tmp_path, assets):
    (tmp_path / "alpaca_data_1k.json").write_text("[]")
    download.main(model="none", data="alpaca_1k", data_folder=tmp_path, mirror=str(assets))
    assert sha256_of(tmp_path / "alpaca_data_1k.json") == download.DATASETS["alpaca_1k"][0].sha256


@pytest.mark.parametrize("arguments, named", [
    (dict(model="stories15M"), "stories260K"),
    (dict(model="none", data="alpaca_2k"), "alpaca_5000"),
    (dict(mirror="ftp://example.org/assets"), "ftp"),
])
def test_bad_names_and_mirrors_are_refused(tmp_path, arguments, named):
    with pytest.raises(BadInput, match=named):
        download.main(folder=tmp_path, data_folder=tmp_path, **arguments)
    assert files_under(tmp_path) == []


def test_cli_reports_a_missing_mirror_in_one_line(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "LLAMA_MIRROR"}
    result = subprocess.run(
        [sys.executable, "-m", "llama.formats.download", "--model", "stories260K", "--data", "none",
         "--folder", str(tmp_path), "--mirror", str(tmp_path / "no_such_mirror")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "no_such_mirror" in lines[0]
    assert "Traceback" not in result.stderr

"""Shared fixtures: where the real test assets lie (../shared/assets beside the repository)."""
import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("LLAMA_TEST_ASSETS", REPO.parent / "shared" / "assets"))


def asset_files() -> dict:
    """Every file under the assets folder with its size and modification time."""
    return {str(p.relative_to(ASSETS)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in ASSETS.rglob("*")}


@pytest.fixture(scope="session")
def assets() -> Path:
    """The real assets, read where they lie. Nothing may be written beside them (the folder is
    a user's data, read-only for users): the session ends with an error if anything was."""
    if not (ASSETS / "stories260K" / "stories260K.bin").is_file():
        pytest.fail(f"test assets not found at {ASSETS}: clone ../shared beside the repository "
                    "or set LLAMA_TEST_ASSETS")
    before = asset_files()
    yield ASSETS
    changed = sorted(set(asset_files().items()) ^ set(before.items()))
    if changed:
        pytest.fail(f"the tests wrote beside the assets in {ASSETS}: {changed[0][0]} (and "
                    f"{len(changed) - 1} more): the product must never write beside a user's data")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The tests run a tiny model on small batches: a second thread gains nothing there, and on a
    busy 2-core machine OpenMP's waiting for it made those forwards about 8x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session", autouse=True)
def token_cache_in_a_temporary_folder(tmp_path_factory):
    """Runs in tests write their token caches to a folder of the session, never to the user's
    ~/.cache (subprocesses inherit the variable)."""
    previous = os.environ.get("LLAMA_TOKEN_CACHE")
    os.environ["LLAMA_TOKEN_CACHE"] = str(tmp_path_factory.mktemp("token_cache"))
    yield
    if previous is None:
        del os.environ["LLAMA_TOKEN_CACHE"]
    else:
        os.environ["LLAMA_TOKEN_CACHE"] = previous


@pytest.fixture(scope="session")
def model_bin(assets) -> Path:
    return assets / "stories260K" / "stories260K.bin"


@pytest.fixture(scope="session")
def alpaca_file(assets, tmp_path_factory):
    """alpaca_file(n): a file of our own (in a new folder each call) holding the first n real
    Alpaca records: a training run may write beside its data, never beside the assets."""
    def first_records(n: int) -> Path:
        records = json.loads((assets / "alpaca" / "alpaca_data_1k.json").read_text())[:n]
        path = tmp_path_factory.mktemp("alpaca") / f"alpaca_{n}.json"
        path.write_text(json.dumps(records))
        return path
    return first_records


@pytest.fixture(scope="session")
def source(model_bin):
    from llama.formats.checkpoint import open_source
    return open_source(model_bin)


@pytest.fixture
def no_outside_settings(monkeypatch):
    """A proxy or a mirror set in the caller's environment must not steer download tests."""
    monkeypatch.delenv("LLAMA_MIRROR", raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")

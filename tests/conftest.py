"""Shared fixtures: where the real test assets lie (../shared/assets beside the repository)."""
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("LLAMA_TEST_ASSETS", REPO.parent / "shared" / "assets"))


@pytest.fixture(scope="session")
def assets() -> Path:
    if not (ASSETS / "stories260K" / "stories260K.bin").is_file():
        pytest.fail(f"test assets not found at {ASSETS}: clone ../shared beside the repository "
                    "or set LLAMA_TEST_ASSETS")
    return ASSETS


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The tests run a tiny model on small batches: a second thread gains nothing there, and on a
    busy 2-core machine OpenMP's waiting for it made those forwards about 8x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

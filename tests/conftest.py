"""Shared fixtures: where the real test assets lie (../shared/assets beside the repository)."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("LLAMA_TEST_ASSETS", REPO.parent / "shared" / "assets"))


@pytest.fixture(scope="session")
def assets() -> Path:
    if not (ASSETS / "stories260K" / "stories260K.bin").is_file():
        pytest.fail(f"test assets not found at {ASSETS}: clone ../shared beside the repository "
                    "or set LLAMA_TEST_ASSETS")
    return ASSETS

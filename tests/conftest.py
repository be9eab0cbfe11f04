"""Shared test fixtures: the real data folder (tests that need it skip when it is absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("STEERLM_SHARED_DATA", ROOT.parent / "shared" / "data"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture
def oasst_file(shared_data) -> Path:
    return shared_data / "oasst1" / "oasst1-en-dev.jsonl"


@pytest.fixture
def hh_file(shared_data) -> Path:
    return shared_data / "hh-rlhf" / "harmless-base-dev.jsonl.gz"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from several threads, and on a shared CPU thread contention makes them crawl
    (two threads per op measured up to 20x slower). Modules opt in with `pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

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

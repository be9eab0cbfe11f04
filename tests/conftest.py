"""Shared test fixtures: the real data folder (tests that need it skip when it is absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The local copy of the data sets the presets read as $STEERLM_DATA (docs/spec.md, "Data sources"); this project's
# machines keep one beside the repository.
SHARED_DATA = Path(os.environ.get("STEERLM_DATA") or ROOT.parent / "shared" / "data")
os.environ["STEERLM_DATA"] = str(SHARED_DATA)

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


@pytest.fixture(scope="session")
def oasst_split():
    """The real OASST slice as records (default attribute schema), split by tree: (train, val), 20% of trees held
    out, seed 0. Tests take slices; they must not modify the records."""
    source = SHARED_DATA / "oasst1" / "oasst1-en-dev.jsonl"
    if not source.exists():
        pytest.skip(f"real data {source} is absent")
    from steerlm.attributes import AttributeSchema
    from steerlm.data import oasst

    return oasst.split_by_tree(oasst.load_records(source, AttributeSchema()), 0.2, seed=0)


@pytest.fixture
def private_cache(tmp_path_factory, monkeypatch):
    """Built-in tiny models go to a cache shared by the session's tests instead of the user's ~/.cache/steerlm."""
    monkeypatch.setenv("STEERLM_CACHE", str(tmp_path_factory.getbasetemp() / "steerlm-cache"))

"""Where every benchmark finds the local data copy (docs/spec.md §2 "Data sources"): `$STEERLM_DATA`, as the
Makefile, the docs' command lines and the presets name it, else the `shared/data` folder beside the repository."""

from __future__ import annotations

import json
import os
from pathlib import Path

DATA = Path(os.environ.get("STEERLM_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
#: The OASST prompt lottery of the local copy: the prompts the decoding benchmarks answer.
LOTTERY = DATA / "prompts" / "oasst_prompt_lottery_en_250.jsonl"
#: Used where the local copy is missing (a benchmark's timing does not depend on which prompts it answers).
FALLBACK = ["Tell me about the moon.", "How do I sort a list in Python?", "Write a haiku about autumn.",
            "What causes rain?", "Explain recursion to a child.", "Give me three tips for sleeping better.",
            "Why is the sky blue?", "Summarise the plot of Hamlet."]  # fmt: skip


def lottery_prompts(n: int) -> list[str]:
    """The first `n` prompts of the OASST prompt lottery, or FALLBACK's cycled where the local copy lacks it."""
    if LOTTERY.exists():
        lines = [json.loads(x) for x in LOTTERY.read_text().splitlines() if x.strip()]
        return [p for p in lines if isinstance(p, str)][:n]
    return (FALLBACK * n)[:n]

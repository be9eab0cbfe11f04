"""Which format a data source is in (SPEC §2), decided in one place for every stage that reads one: prepare,
annotate, train-rm and ppo's prompt files. Each loader knows its own rows (`oasst.detect_layout`, `hh.detect`,
`helpsteer.detect`); this module decides among them, in a fixed order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from steerlm.data import helpsteer, hh, oasst

#: The formats `detect` can answer, as `steerlm prepare --format` names them.
FORMATS = ("oasst", "oasst-trees", "hh", "helpsteer2", "records")


def detect(first: Any) -> str | None:
    """The format of a source from its first JSON value: 'oasst' (flat rows), 'oasst-trees', 'hh' (HH-RLHF
    chosen/rejected pairs), 'helpsteer2' or 'records' (conversation records); None when it is none of them."""
    layout = oasst.detect_layout(first)
    if layout:
        return layout
    if hh.detect(first):
        return "hh"
    if helpsteer.detect(first):
        return "helpsteer2"
    if isinstance(first, dict) and "conversations" in first:
        return "records"
    return None


def detect_file(source: str | Path) -> str | None:
    """`detect` of a local JSONL file's first record; a `hub:ID` source by its name (HH-RLHF, HelpSteer, else
    OASST), so that nothing is downloaded to find out."""
    source = str(source)
    if source.startswith(oasst.HUB_PREFIX):
        name = source.lower()
        return "hh" if "hh-rlhf" in name else "helpsteer2" if "helpsteer" in name else "oasst"
    return detect(oasst.first_record(source))

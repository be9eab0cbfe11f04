"""Which format a data source is in (SPEC §2), decided in one place for every stage that reads one: prepare,
annotate, train-rm and ppo's prompt files. Each loader knows its own rows (`oasst.detect_layout`, `hh.detect`,
`helpsteer.detect`); this module decides among them, in a fixed order."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from steerlm.data import helpsteer, hh, oasst
from steerlm.errors import UserError

T = TypeVar("T")

#: The environment variable naming a local copy of the public data sets (`oasst1/`, `hh-rlhf/`, `prompts/`, ...):
#: presets list `$STEERLM_DATA/...` before the hub (docs/spec.md, "Data sources").
DATA_ENV = "STEERLM_DATA"
_VARIABLE = re.compile(r"\$(\w+|\{\w+\})")

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


def local_path(source: str) -> str:
    """`source` with `~` and environment variables (`$STEERLM_DATA/oasst1/...`) expanded, so that presets and config
    files name data the way a shell would. A `hub:ID` is returned as it is. Raises UserError naming the variable
    when one is not set."""
    source = source.strip()
    if source.startswith(oasst.HUB_PREFIX):
        return source
    expanded = os.path.expandvars(os.path.expanduser(source))
    unset = _VARIABLE.search(expanded)
    if unset:
        hint = " (a folder with a local copy of the data; or use the hub)" if DATA_ENV in unset[1] else ""
        raise UserError(f"{source}: the environment variable {unset[1].strip('{}')} is not set{hint}")
    return expanded


def first_usable(candidates: Sequence[str], load: Callable[[str], T], *, what: str, field: str,
                 errors: tuple[type[Exception], ...] = (oasst.HubUnavailable,)) -> tuple[str, T]:  # fmt: skip
    """(candidate, `load(candidate)`) of the first candidate source that is usable (`local_path`: variables such as
    `$STEERLM_DATA` expanded, and returned so): a local path must exist (a
    `hub:ID` is tried as it is) and `load` must not raise one of `errors` (by default only an unreachable hub, so
    that a malformed local file stops the run instead of falling through to the next candidate). When none is, one
    UserError on `field` gives each candidate's reason: the reason alone for a single candidate, else a list under
    "no candidate {what} could be used"."""
    reasons = []
    for source in candidates:
        try:
            source = local_path(source)
        except UserError as e:
            reasons.append(e.reason)
            continue
        if not source.startswith(oasst.HUB_PREFIX) and not Path(source).exists():
            reasons.append(f"{source}: does not exist")
            continue
        try:
            return source, load(source)
        except errors as e:
            # a UserError's location is the candidate itself unless it names a file (and line) of its own
            reason = e.reason if isinstance(e, UserError) and e.file is None else str(e)
            reasons.append(f"{source}: {reason}")
    if len(reasons) == 1:
        raise UserError(reasons[0], field=field)
    raise UserError(f"no candidate {what} could be used:\n  " + "\n  ".join(reasons), field=field)

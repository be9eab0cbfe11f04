"""Where every benchmark finds the local data copy (docs/spec.md §2 "Data sources"): `$STEERLM_DATA`, as the
Makefile, the docs' command lines and the presets name it, else the `shared/data` folder beside the repository."""

from __future__ import annotations

import os
from pathlib import Path

DATA = Path(os.environ.get("STEERLM_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")

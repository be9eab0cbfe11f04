"""Turn OASST / HH-RLHF / conversation files into train/validation conversation records (SPEC §2).

    steerlm prepare --source=$STEERLM_DATA/oasst1/oasst1-en-dev.jsonl --out=runs/data
    steerlm prepare --source=hub:OpenAssistant/oasst1 --attributes=paper --levels=5 --out=runs/oasst
    steerlm prepare --source=$STEERLM_DATA/hh-rlhf/harmless-base-dev.jsonl.gz --skip_invalid --out=runs/hh
    steerlm prepare --source=hub:nvidia/HelpSteer2 --attributes=helpsteer --levels=5 --out=runs/helpsteer2

Writes into `out`: `train.jsonl` and `val.jsonl` (VALUE_TO_TEXT records, for attribute-conditioned SFT),
`train_t2v.jsonl` and `val_t2v.jsonl` (the same records as TEXT_TO_VALUE, for a generative APM), `config.yaml` and
`stats.json`; with `computed: [verbosity]` also `computed.json` (the length-bucket edges, docs/steering.md). All are
written to a temporary folder first and moved into place only when all are complete.
The split is by OASST tree (HH-RLHF: by pair; HelpSteer2: by prompt), never by conversation, since the paths of
one tree share turns.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steerlm import config as config_lib
from steerlm.attributes import (
    COMPUTED,
    OASST_LABELS,
    AttributeSchema,
    LengthBuckets,
    computed_to_dict,
    with_computed,
)
from steerlm.data import formats, helpsteer, hh, oasst
from steerlm.data.records import TEXT_TO_VALUE, Record, record_from_json, write_records
from steerlm.errors import UserError
from steerlm.io import read_jsonl, write_json

FORMATS = ("auto", "oasst", "oasst-trees", "hh", "helpsteer2", "records")
OUTPUT_FILES = ("train.jsonl", "val.jsonl", "train_t2v.jsonl", "val_t2v.jsonl", "config.yaml", "stats.json")
#: Written beside them when `computed` is set: `{"verbosity": {"unit": "words", "edges": [...]}}`.
COMPUTED_FILE = "computed.json"


@dataclass
class Config:
    source: str | list[str]
    """A local .jsonl/.jsonl.gz file or `hub:ID` (e.g. hub:OpenAssistant/oasst1), or a list of such candidates of
    which the first that exists (a file) or loads (a hub id) is used."""
    format: str = "auto"
    """auto (detected from the first record), oasst (flat Hugging Face rows), oasst-trees (nested trees dump), hh
    (HH-RLHF chosen/rejected transcripts), helpsteer2 (NVIDIA HelpSteer2 rows, 0-4 ratings; wants
    `attributes: helpsteer`, `levels: 5`) or records (NeMo conversation JSONL, re-split and re-labelled)."""
    out: str = "runs/data"
    """Output folder."""
    attributes: str | list[str] = "steerable"
    """Attributes in the labels: a named set (steerable, paper, helpsteer) or names (a list or 'quality,humor')."""
    levels: int = 10
    """L: labels are bucketed to 0..L-1 (SPEC §1; the paper uses 10, NeMo's scripts 5)."""
    val_fraction: float = 0.05
    """Fraction of trees (HH-RLHF: pairs) held out for validation."""
    seed: int = 1234
    """Seed of the train/validation split."""
    lang: str | None = "en"
    """Keep OASST messages in this language ('en' also matches 'en-GB'; 'en,de' keeps both); null keeps all."""
    skip_deleted: bool = True
    """Skip OASST messages that were deleted or failed review, with their replies."""
    skip_invalid: bool = False
    """Skip and count invalid lines or messages instead of stopping at the first with an error."""
    overwrite: bool = False
    """Replace existing output files in `out`."""
    max_trees: int = 0
    """Use only the first N trees (HH-RLHF: pairs) of the source; 0 uses all."""
    computed: list[str] = field(default_factory=list)
    """Attributes computed from the response text and added to every assistant label: `verbosity` (length bucket
    0..L-1 at the L-quantiles of the training responses' word counts; the edges go to computed.json)."""

    def __post_init__(self):
        sources = self.sources
        if not sources or any(not s.strip() for s in sources):
            raise ValueError("source must name a file or hub:ID (or a list of them)")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {self.format!r}")
        if not str(self.out).strip():
            raise ValueError("out must name a folder")
        self.schema  # noqa: B018 -- raises ValueError on bad attribute names or levels
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), not {self.val_fraction}")
        if self.max_trees < 0:
            raise ValueError(f"max_trees must be >= 0, not {self.max_trees}")
        self.computed = config_lib.split_names(self.computed)
        unknown = [n for n in self.computed if n not in COMPUTED]
        if unknown:
            raise ValueError(f"unknown computed attribute {unknown[0]!r}; known: {', '.join(COMPUTED)}")
        clash = [n for n in self.computed if n in self.schema.names]
        if clash:
            raise ValueError(f"{clash[0]} is both a labelled and a computed attribute")

    @property
    def sources(self) -> list[str]:
        return [self.source] if isinstance(self.source, str) else list(self.source)

    @property
    def schema(self) -> AttributeSchema:
        names = self.attributes if isinstance(self.attributes, str) else tuple(self.attributes)
        return AttributeSchema(names, self.levels)


# ---------------------------------------------------------------- reading sources


def _check_format(cfg: Config, first: Any, source: str) -> str:
    if first is None:
        raise UserError("holds no records", file=source, field="source")
    found = formats.detect(first)
    if cfg.format == "auto":
        if found is None:
            keys = ", ".join(first) if isinstance(first, dict) else type(first).__name__
            raise UserError(f"cannot tell the format from the first record ({keys}); set format to one of "
                            f"{', '.join(FORMATS[1:])}", file=source, field="format")  # fmt: skip
        return found
    if found is not None and found != cfg.format:
        raise UserError(f"looks like {found}, not {cfg.format}; set format: {found} (or auto)", file=source,
                        field="format")  # fmt: skip
    return cfg.format


def read_conversation_file(rows, file: str, schema: AttributeSchema, *, skip_invalid: bool,
                           stats: Counter) -> list[Record]:  # fmt: skip
    """Conversation records from `(line, object)` rows, assistant labels re-rendered for `schema`: attributes it
    lacks are dropped, those it has are checked against its levels."""
    out = []
    for line, obj in rows:
        try:
            record = record_from_json(obj, file=file, line=line)
            for i, turn in enumerate(record.conversations):
                if turn.label is not None:
                    try:
                        turn.label = schema.render(schema.parse(turn.label, ignore_unknown=True)) or None
                    except UserError as e:
                        raise UserError(e.reason, file=file, line=line, field=f"conversations[{i}].label") from None
        except UserError as e:
            if not skip_invalid:
                raise UserError(e.reason + " (--skip_invalid skips and counts such lines)", file=e.file,
                                line=e.line, field=e.field) from None  # fmt: skip
            stats["invalid"] += 1
            continue
        out.append(record)
    stats["conversations"] += len(out)
    return out


def load(cfg: Config, source: str, stats: Counter) -> tuple[list[Record], str]:
    """Records of one source and its format. A hub id that cannot be reached raises `oasst.HubUnavailable`."""
    schema = cfg.schema
    hub_rows = None
    if source.startswith(oasst.HUB_PREFIX):
        hub_rows = list(oasst.load_hub_rows(source[len(oasst.HUB_PREFIX) :]))
        fmt = _check_format(cfg, hub_rows[0][2] if hub_rows else None, source)
    else:
        fmt = _check_format(cfg, oasst.first_record(source), source)
    if fmt in ("oasst", "oasst-trees"):
        missing = [n for n in schema.names if n not in OASST_LABELS]
        if missing:
            raise UserError(f"{', '.join(missing)} are not OASST labels; OASST has {', '.join(OASST_LABELS)}",
                            field="attributes")  # fmt: skip
        if hub_rows is not None:
            messages = oasst.read_hub(source[len(oasst.HUB_PREFIX) :], rows=hub_rows, skip_invalid=cfg.skip_invalid,
                                      stats=stats)  # fmt: skip
        else:
            messages = oasst.read_messages(source, layout=fmt, skip_invalid=cfg.skip_invalid, stats=stats)
        records = oasst.conversations(messages, schema, lang=cfg.lang, skip_deleted=cfg.skip_deleted,
                                      skip_review_failed=cfg.skip_deleted, skip_invalid=cfg.skip_invalid,
                                      stats=stats)  # fmt: skip
    elif fmt == "hh":
        pairs = hh.read_pairs(source, rows=hub_rows, skip_invalid=cfg.skip_invalid, stats=stats)
        records = hh.to_records(pairs)
    elif fmt == "helpsteer2":
        if hub_rows is not None:  # every split, concatenated: the split is prepare's own, by prompt
            records = []
            for split, i, row in hub_rows:
                records += helpsteer.to_records([(i, row)], f"{source}[{split}]", schema,
                                                skip_invalid=cfg.skip_invalid, stats=stats)  # fmt: skip
        else:
            rows = helpsteer.read_rows(source, skip_invalid=cfg.skip_invalid, stats=stats)
            records = helpsteer.to_records(rows, source, schema, skip_invalid=cfg.skip_invalid, stats=stats)
    else:
        if hub_rows is not None:
            records = []
            for split, i, row in hub_rows:
                records += read_conversation_file([(i, row)], f"{source}[{split}]", schema,
                                                  skip_invalid=cfg.skip_invalid, stats=stats)  # fmt: skip
        else:
            rows = read_jsonl(source, on_error=(lambda e: stats.update(invalid=1)) if cfg.skip_invalid else None)
            records = read_conversation_file(rows, source, schema, skip_invalid=cfg.skip_invalid, stats=stats)
    return records, fmt


def load_first(cfg: Config, stats: Counter) -> tuple[list[Record], str, str]:
    """(records, source used, format) from the first candidate source that exists or loads (`formats.first_usable`;
    an unreachable hub id gives way to the next candidate, and its partial counts are not kept)."""

    def attempt(source: str) -> tuple[list[Record], str, Counter]:
        counts: Counter = Counter()
        return (*load(cfg, source, counts), counts)

    source, (records, fmt, counts) = formats.first_usable(cfg.sources, attempt, what="source", field="source")
    stats.update(counts)
    return records, source, fmt


def group_key(records: list[Record], fmt: str) -> str:
    """The record key that groups records sharing text: OASST tree, HH-RLHF pair."""
    if fmt == "hh" or (fmt == "records" and not any("tree_id" in r.extra for r in records)):
        return "pair_id"
    return "tree_id"


def group_unit(records: list[Record], key: str) -> str:
    if not any(key in r.extra for r in records):
        return "records"
    return "pairs" if key == "pair_id" else "trees"


def first_groups(records: list[Record], key: str, n: int) -> list[Record]:
    """The records of the first `n` groups in input order (records without the key count one group each)."""
    if n <= 0:
        return records
    seen: dict = {}
    out = []
    for i, r in enumerate(records):
        g = r.extra.get(key, ("record", i))
        if g not in seen:
            if len(seen) == n:
                continue
            seen[g] = None
        out.append(r)
    return out


def count_groups(records: list[Record], key: str) -> int:
    return len({r.extra.get(key, ("record", i)) for i, r in enumerate(records)})


def part_stats(records: list[Record], key: str) -> dict:
    turns = [t for r in records for t in r.assistant_turns]
    return {
        "groups": count_groups(records, key),
        "records": len(records),
        "assistant_turns": len(turns),
        "labelled_assistant_turns": sum(t.label is not None for t in turns),
    }


# ---------------------------------------------------------------- computed attributes


def add_computed(train: list[Record], val: list[Record], names: list[str], schema: AttributeSchema) -> dict:
    """Add computed attributes (`verbosity`) to every assistant label of both splits, in place; the length buckets
    are fitted on the training responses only. Returns what `computed.json` stores."""
    texts = [t.value for r in train for t in r.assistant_turns]
    computed = {name: LengthBuckets.fit(texts, schema.levels) for name in names}  # only verbosity exists so far
    label_records(train + val, computed, schema.levels)
    return computed_to_dict(computed)


def label_records(records: list[Record], computed: dict[str, LengthBuckets], levels: int) -> None:
    """Set the computed attributes in every assistant turn's label (other attributes kept), in place."""
    for r in records:
        for t in r.assistant_turns:
            t.label = with_computed(t.label, t.value, computed, levels)


# ---------------------------------------------------------------- writing outputs


def check_output(cfg: Config) -> Path:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError("exists and is not a folder", file=str(out), field="out")
    existing = [name for name in OUTPUT_FILES + (COMPUTED_FILE,) if (out / name).exists()]
    if existing and not cfg.overwrite:
        raise UserError(f"output already exists ({', '.join(existing)}); set overwrite (--overwrite) to replace it",
                        file=str(out), field="out")  # fmt: skip
    return out


def write_outputs(out: Path, parts: dict[str, list[Record]], cfg: Config, stats: dict,
                  computed: dict | None = None) -> None:  # fmt: skip
    """Write every output into a temporary folder, then move them into `out` only once all are complete, so an
    interrupted prepare never leaves a half-written or inconsistent set of files."""
    out = out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.prepare-", dir=out.parent))
    try:
        for split in ("train", "val"):
            write_records(tmp / f"{split}.jsonl", parts[split])
            write_records(tmp / f"{split}_t2v.jsonl", (r.with_type(TEXT_TO_VALUE) for r in parts[split]))
        config_lib.save(cfg, tmp)
        write_json(tmp / "stats.json", stats)
        if computed:
            write_json(tmp / COMPUTED_FILE, computed)
        _make_readable(tmp)
        if not out.exists():
            os.rename(tmp, out)  # a fresh folder appears complete in one step
            return
        for name in OUTPUT_FILES:
            os.replace(tmp / name, out / name)
        if computed:
            os.replace(tmp / COMPUTED_FILE, out / COMPUTED_FILE)
        elif (out / COMPUTED_FILE).exists():  # an earlier run's edges no longer describe these labels
            os.unlink(out / COMPUTED_FILE)
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)


def _make_readable(folder: Path) -> None:
    """mkdtemp/mkstemp create private (0700/0600) entries; give outputs the usual umask-based permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~umask)


# ---------------------------------------------------------------- the command


SKIP_WORDS = {
    "invalid": "invalid",
    "deleted": "deleted",
    "review_failed": "failed review",
    "lang": "in another language",
    "cut": "below a skipped message",
    "orphan": "unreachable (parent not in the data)",
}


def summary_lines(stats: dict) -> list[str]:
    """What `main` prints: what was read, what was dropped and why, what was written."""
    read, fmt, unit = stats["read"], stats["format"], stats["group_unit"]
    lines = [f"source: {stats['source']} ({fmt})"]
    if fmt.startswith("oasst"):
        lines.append(f"read {read.get('messages', 0):,} messages in {read.get('trees', 0):,} trees")
        skipped = [f"{read[k]:,} {w}" for k, w in SKIP_WORDS.items() if read.get(k)]
        lines.append("skipped messages: " + (", ".join(skipped) if skipped else "none"))
        lines.append(f"dropped conversations: {read.get('one_turn', 0):,} with one turn")
    elif fmt == "hh":
        lines.append(f"read {read.get('pairs', 0):,} pairs")
        dropped = [f"{read[k]:,} {w}" for k, w in (("invalid", "invalid"), ("identical", "identical")) if read.get(k)]
        lines.append("dropped pairs: " + (", ".join(dropped) if dropped else "none"))
    else:
        lines.append(f"read {read.get('conversations', 0):,} conversations")
        lines.append(f"dropped lines: {read.get('invalid', 0):,} invalid")
    if stats["beyond_max_trees"]:
        lines.append(f"left out beyond max_trees: {stats['beyond_max_trees']:,} records")
    train, val = stats["train"], stats["val"]
    total, groups = train["records"] + val["records"], train["groups"] + val["groups"]
    lines.append(
        f"conversations: {total:,} from {groups:,} {unit} -> train {train['records']:,} ({train['groups']:,} {unit}), "
        f"val {val['records']:,} ({val['groups']:,} {unit})"
    )
    turns = train["assistant_turns"] + val["assistant_turns"]
    labelled = train["labelled_assistant_turns"] + val["labelled_assistant_turns"]
    line = f"assistant turns: {turns:,} ({labelled:,} labelled)"
    if "assistant_messages" in read:
        n, n_labelled = read["assistant_messages"], read["labelled_assistant_messages"]
        line += f"; distinct assistant messages {n:,} ({n_labelled:,} labelled)"
    lines.append(line)
    return lines


def main(cfg: Config) -> dict:
    """Run the stage; returns the statistics also written to `stats.json`."""
    out = check_output(cfg)
    read = Counter()
    records, source, fmt = load_first(cfg, read)
    key = group_key(records, fmt)
    kept = first_groups(records, key, cfg.max_trees)
    train, val = oasst.split_by_tree(kept, cfg.val_fraction, cfg.seed, key=key)
    stats = {
        "source": source,
        "format": fmt,
        "group_unit": group_unit(records, key),
        "attributes": cfg.schema.to_dict(),
        "read": dict(read),
        "beyond_max_trees": len(records) - len(kept),
        "train": part_stats(train, key),
        "val": part_stats(val, key),
    }
    # computed labels are added after counting, so `labelled_assistant_turns` still counts human labels
    computed = add_computed(train, val, cfg.computed, cfg.schema) if cfg.computed and kept else {}
    if computed:
        stats["computed"] = computed
    lines = summary_lines(stats)
    if not kept:
        print("\n".join(lines), flush=True)
        raise UserError("no conversations left to write (see the counts above)", field="source")
    write_outputs(out, {"train": train, "val": val}, cfg, stats, computed)
    files = OUTPUT_FILES + ((COMPUTED_FILE,) if computed else ())
    if computed:
        lines.append(f"computed: verbosity edges (words) {computed['verbosity']['edges']}")
    print("\n".join(lines + [f"wrote {out}: {', '.join(files)}"]), flush=True)
    return stats

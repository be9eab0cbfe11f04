"""`steerlm annotate`: label every assistant turn of a conversation file with an APM, SteerLM step 2 (SPEC §5.2).

    steerlm annotate --apm runs/apm --input runs/data/train.jsonl --out runs/annotated/train.jsonl
    steerlm annotate --apm runs/apm --input $STEERLM_DATA/hh-rlhf/harmless-base-dev.jsonl.gz --out runs/hh.jsonl
    steerlm annotate ... --resume          # after an interruption: continue where it stopped

Input: any conversation records file (SPEC §2), or HH-RLHF `{chosen, rejected}` transcripts (each pair gives its
chosen and its rejected conversation, in that order). Each assistant turn's `label` becomes the attribute string
of the APM's predictions, quantile-mapped onto the training label distribution (`apm_model.QuantileMap`; `--calibrate
false` rounds them instead, which collapses most labels onto the training mean); the label it replaces (the human one, or null) is kept beside it as
`gt_label`, unless the turn already has a `gt_label` (re-annotating an annotated file keeps the human one). Output order is
input order. `--human_labels=fill` keeps the levels a human label gives and takes the APM's only for the rest (the
human-labels ablation). Conversations are scored in length-sorted batches, and a conversation prefix shared by several
records (OASST paths of one tree, HH chosen/rejected pairs) is scored once per chunk. `OUT.meta.json` says how the
labels were made (APM, calibration) and counts the labels per attribute and level.

Resumable: records are written chunk by chunk to `OUT.partial`, and `OUT.progress.json` records how many input
records and bytes are done after each chunk; `--resume` cuts the partial file back to the last recorded chunk and
continues from there, so no record is duplicated or lost. The partial file is renamed to OUT only at the end.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm

from steerlm.apm_model import APM, assistant_prefixes, load_apm
from steerlm.data import formats, hh
from steerlm.data.records import ASSISTANT, Record, record_from_json
from steerlm.errors import UserError
from steerlm.io import read_jsonl, write_json

PARTIAL, PROGRESS, META = ".partial", ".progress.json", ".meta.json"


@dataclass
class Config:
    apm: str
    """APM folder: a `steerlm train-apm` output folder or its `best/` model folder."""
    input: str
    """Conversation records (.jsonl[.gz]) or HH-RLHF chosen/rejected transcripts."""
    out: str
    """Output records file (.jsonl)."""
    format: Literal["auto", "records", "hh"] = "auto"
    """Input format: 'records' (SPEC §2), 'hh' (HH-RLHF pairs), or 'auto' (from the first line)."""
    batch_size: int = 32
    """Assistant turns scored per batch (batches are formed from length-sorted turns)."""
    chunk_size: int = 512
    """Records annotated, written and recorded as done together; a resumed run repeats at most one chunk."""
    calibrate: bool = True
    """Quantile-map predictions onto the training label distribution (the APM's stored map) instead of rounding
    them; an APM without a map (older folders, generative APMs) is rounded, and the meta file says so."""
    human_labels: Literal["replace", "fill"] = "replace"
    """'replace': every assistant turn gets the APM's levels (the paper's step 2: the APM's labels replace the
    noisier human ones); 'fill': a turn keeps the levels its human label gives for the APM's attributes and takes
    the APM's only for those it lacks (a turn without a label gets the APM's), for the human-labels ablation
    (docs/steering.md, "APM labels against human labels"). Every human label is checked before any is written."""
    keep_gt: bool = True
    """Keep the replaced (human) label as `gt_label` beside the new one (null when there was none)."""
    skip_invalid: bool = False
    """Skip and count invalid input lines (or HH pairs) instead of stopping at the first."""
    resume: bool = False
    """Continue an interrupted run (OUT.partial and OUT.progress.json must exist)."""
    overwrite: bool = False
    """Replace an existing output file (and any leftover partial output)."""

    def __post_init__(self):
        for name in ("batch_size", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)}")
        if self.resume and self.overwrite:
            raise ValueError("choose one of resume and overwrite")


# ---------------------------------------------------------------- reading the input


def read_input(path: str | Path, fmt: str, skip_invalid: bool = False) -> tuple[list[Record], int]:
    """(records, invalid lines skipped). Every record must have an assistant turn (a located UserError if not)."""
    fmt = ("hh" if formats.detect_file(path) == "hh" else "records") if fmt == "auto" else fmt
    invalid = 0

    def skip(_error: UserError) -> None:
        nonlocal invalid
        invalid += 1

    if fmt == "hh":
        from collections import Counter

        stats: Counter = Counter()
        pairs = hh.read_pairs(path, skip_invalid=skip_invalid, stats=stats)
        return hh.to_records(pairs), stats["invalid"]
    records = []
    for line, obj in read_jsonl(path, on_error=skip if skip_invalid else None):
        try:
            record = record_from_json(obj, file=str(path), line=line)
            if not record.assistant_turns:
                raise UserError("the conversation has no Assistant turn to label", file=str(path), line=line,
                                field="conversations")  # fmt: skip
        except UserError:
            if not skip_invalid:
                raise
            invalid += 1
            continue
        records.append(record)
    return records, invalid


# ---------------------------------------------------------------- labelling


def annotate_records(
    apm: APM,
    records: list[Record],
    batch_size: int,
    keep_gt: bool = True,
    calibrate: bool = False,
    human_labels: str = "replace",
) -> tuple[list[Record], int]:
    """Label every assistant turn of `records` (in place) with `apm` (rounded, or quantile-mapped with
    `calibrate`; with `human_labels='fill'` only the attributes the turn's human label lacks, `Config.human_labels`);
    returns (records, turns without a prediction: a generative APM's unparseable outputs, which get `label: null`
    rather than a guess). A human level outside the APM's levels is a UserError."""
    where, items = [], []
    for r_i, record in enumerate(records):
        for t_i, example in assistant_prefixes(record):
            where.append((r_i, t_i))
            items.append(example)
    preds = apm.predict(items, batch_size=batch_size)
    missing = 0
    for (r_i, t_i), pred in zip(where, preds, strict=True):
        turn = records[r_i].conversations[t_i]
        # gt_label is written even when null ("no human label"), so that annotating an annotated file never takes
        # an earlier APM label for a human one.
        _, human = human_label(turn)
        if keep_gt and "gt_label" not in turn.extra:
            turn.extra["gt_label"] = turn.label
        given = apm.schema.parse(human, ignore_unknown=True) if human_labels == "fill" and human else None
        turn.label = apm.label(pred, calibrated=calibrate, given=given)
        missing += turn.label is None
    return records, missing


def human_label(turn) -> tuple[str, str | None]:
    """(where, value) of a turn's human label: `gt_label` once a file has been annotated (kept even when null),
    else `label`."""
    return ("gt_label", turn.extra["gt_label"]) if "gt_label" in turn.extra else ("label", turn.label)


def check_human_labels(records: list[Record], apm: APM, path: str | Path) -> None:
    """`human_labels: fill` keeps human levels: each must be one the APM's schema can hold (a UserError naming the
    record, in input order, and the turn), checked before anything is scored or written."""
    for r_i, record in enumerate(records):
        for t_i, turn in enumerate(record.conversations):
            key, human = human_label(turn)
            if turn.role == ASSISTANT and human:
                try:
                    apm.schema.parse(human, ignore_unknown=True)
                except UserError as e:
                    raise UserError(f"record {r_i + 1}: {e.reason}", file=str(path),
                                    field=f"conversations[{t_i}].{key}") from None  # fmt: skip


def label_counts(path: str | Path, schema) -> dict[str, list[int]]:
    """Per attribute, how many assistant labels of a records file have each level 0..L-1 (the written output,
    so a resumed run counts every record once)."""
    counts = {n: [0] * schema.levels for n in schema.names}
    for line, obj in read_jsonl(path):
        for turn in record_from_json(obj, file=str(path), line=line).assistant_turns:
            for name, level in (schema.parse(turn.label, ignore_unknown=True) if turn.label else {}).items():
                counts[name][level] += 1
    return counts


# ---------------------------------------------------------------- resumable output


def _paths(out: Path) -> tuple[Path, Path]:
    return out.with_name(out.name + PARTIAL), out.with_name(out.name + PROGRESS)


def _fingerprint(cfg: Config) -> dict:
    """What a resumed run must share with the interrupted one: the same input file, APM and human-label rule."""
    st = Path(cfg.input).stat()
    return {"input": str(Path(cfg.input).resolve()), "input_size": st.st_size, "input_mtime_ns": st.st_mtime_ns,
            "apm": str(Path(cfg.apm).resolve()), "human_labels": cfg.human_labels}  # fmt: skip


def _start(cfg: Config, out: Path) -> tuple[int, int]:
    """Check the output state; returns (records already done, bytes of the partial file to keep)."""
    partial, progress = _paths(out)
    if Path(cfg.input).resolve() == out.resolve():
        raise UserError("the output would overwrite the input; choose another --out", file=str(out))
    if cfg.overwrite:
        partial.unlink(missing_ok=True)
        progress.unlink(missing_ok=True)
        return 0, 0
    if cfg.resume:
        if not progress.exists() or not partial.exists():
            if out.exists():
                return -1, 0  # finished earlier
            return 0, 0  # nothing was written yet: start from the beginning
        state = json.loads(progress.read_text(encoding="utf-8"))
        # progress files written before `human_labels` existed were 'replace' runs
        if {"human_labels": "replace", **(state.get("fingerprint") or {})} != _fingerprint(cfg):
            raise UserError("the interrupted run used another input file, APM or human_labels rule; pass --overwrite "
                            "to start over", file=str(progress))  # fmt: skip
        if partial.stat().st_size < state["bytes"]:
            raise UserError("the partial output is shorter than its progress record; pass --overwrite",
                            file=str(partial))  # fmt: skip
        return state["records"], state["bytes"]
    if out.exists():
        raise UserError("output exists; pass --overwrite to replace it", file=str(out))
    if partial.exists() or progress.exists():
        raise UserError("an interrupted run left a partial output; pass --resume to continue it or --overwrite to "
                        "start over", file=str(partial))  # fmt: skip
    return 0, 0


def main(cfg: Config) -> dict:
    start = time.time()
    out = Path(cfg.out)
    done, keep_bytes = _start(cfg, out)
    if done < 0:
        print(f"annotate: {out} is already complete (nothing to resume)")
        return {"records": 0, "resumed_from": None}
    records, invalid = read_input(cfg.input, cfg.format, cfg.skip_invalid)
    if done > len(records):
        raise UserError(f"progress says {done} records are done but the input has {len(records)}; pass --overwrite")
    apm = load_apm(cfg.apm)
    if cfg.human_labels == "fill":
        check_human_labels(records, apm, cfg.input)
    calibrated = cfg.calibrate and bool(apm.calibration)
    if cfg.calibrate and not calibrated:
        print(f"annotate: {cfg.apm} stores no calibration map (trained before it, or generative); labels are rounded")
    partial, progress = _paths(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(cfg)
    resumed_from = done
    turns = missing = 0
    loop_start = time.time()
    bar = tqdm(total=len(records), initial=done, desc="annotate", unit="rec", dynamic_ncols=True)
    with open(partial, "r+b" if done else "wb") as f:
        # Anything written after the last recorded chunk (a kill between writing and recording) is cut off.
        f.truncate(keep_bytes)
        f.seek(keep_bytes)
        while done < len(records):
            chunk = records[done : done + cfg.chunk_size]
            labelled, n_missing = annotate_records(apm, chunk, cfg.batch_size, cfg.keep_gt, calibrated,
                                                   cfg.human_labels)  # fmt: skip
            turns += sum(len(r.assistant_turns) for r in labelled)
            missing += n_missing
            f.write("".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in labelled).encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
            done += len(chunk)
            write_json(progress, {"records": done, "bytes": f.tell(), "fingerprint": fingerprint})
            bar.update(len(chunk))
    bar.close()
    os.replace(partial, out)
    progress.unlink(missing_ok=True)
    write_json(out.with_name(out.name + META), {
        "apm": str(apm.path), "levels": apm.schema.levels, "labels": "quantile-mapped" if calibrated else "rounded",
        "calibration": (apm.meta.get("calibration") or {}).get("method") if calibrated else None,
        "human_labels": cfg.human_labels,
        "label_counts": label_counts(out, apm.schema)})  # fmt: skip
    seconds, loop_seconds = time.time() - start, time.time() - loop_start
    new = len(records) - resumed_from
    # records/s counts the labelling loop only (model loading and input parsing are reported in `seconds`).
    summary = {"records": len(records), "annotated": new, "assistant_turns": turns, "unlabelled_turns": missing,
               "invalid_skipped": invalid, "seconds": round(seconds, 1), "labelling_seconds": round(loop_seconds, 1),
               "records_per_s": round(new / max(loop_seconds, 1e-9), 1), "resumed_from": resumed_from or None}  # fmt: skip
    print(f"annotate: {new} records ({turns} assistant turns) in {seconds:.0f} s, {summary['records_per_s']} rec/s"
          + (f", resumed after {resumed_from}" if resumed_from else "")
          + (f", {missing} turns without a parseable prediction" if missing else "")
          + (f", {invalid} invalid input lines skipped" if invalid else "") + f" -> {out}")  # fmt: skip
    return summary

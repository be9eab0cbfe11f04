"""`steerlm prepare` end to end: the CLI path, outputs, candidate sources, user errors and atomic writes."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import yaml

from steerlm import cli, prepare
from steerlm.config import build
from steerlm.data.records import TEXT_TO_VALUE, VALUE_TO_TEXT, data_levels, read_records
from steerlm.errors import UserError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OASST = DATA / "oasst1" / "oasst1-en-dev.jsonl"
HH = DATA / "hh-rlhf" / "harmless-base-dev.jsonl.gz"
needs_data = pytest.mark.skipif(not OASST.exists(), reason="../shared/data is absent")


def run_prepare(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.run(["prepare", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".prepare-" in p.name or p.name.endswith(".tmp")]


@needs_data
def test_cli_prepares_oasst(tmp_path, capsys):
    out = tmp_path / "data"
    code, printed, err = run_prepare(capsys, f"--source={OASST}", f"--out={out}", "--val_fraction=0.1")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(prepare.OUTPUT_FILES)
    assert "read 1,624 messages in 157 trees" in printed and "wrote" in printed
    stats = json.loads((out / "stats.json").read_text())
    assert stats["read"]["trees"] == 157 and stats["format"] == "oasst"
    train, val = read_records(out / "train.jsonl"), read_records(out / "val.jsonl")
    assert len(train) == stats["train"]["records"] and len(val) == stats["val"]["records"] > 0
    assert {r.type for r in train + val} == {VALUE_TO_TEXT}
    assert not {r.extra["tree_id"] for r in train} & {r.extra["tree_id"] for r in val}
    train_t2v = read_records(out / "train_t2v.jsonl")
    assert {r.type for r in train_t2v} == {TEXT_TO_VALUE}
    assert [r.with_type(VALUE_TO_TEXT).to_json() for r in train_t2v] == [r.to_json() for r in train]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["source"] == str(OASST) and saved["val_fraction"] == 0.1
    assert build(prepare.Config, saved).seed == 1234  # the saved config loads again
    assert not leftovers(tmp_path) and not leftovers(out)

    # existing output without overwrite: a user error, exit 2, no traceback
    code, _, err = run_prepare(capsys, f"--source={OASST}", f"--out={out}")
    assert code == 2 and "already exists" in err and "--overwrite" in err and "Traceback" not in err
    code, _, err = run_prepare(capsys, f"--source={OASST}", f"--out={out}", "--overwrite", "--max_trees=20",
                               "--levels=5")  # fmt: skip
    assert code == 0, err
    stats = json.loads((out / "stats.json").read_text())
    assert stats["train"]["groups"] + stats["val"]["groups"] == 20
    # what sft and train-apm read as L: the folder's own, not SPEC §1's default 10
    assert data_levels(out) == data_levels(out / "train.jsonl") == 5


def test_data_levels_sources(tmp_path):
    assert data_levels(tmp_path) == 0  # nothing says: the caller's default applies
    (tmp_path / "train.jsonl").write_text("")
    (tmp_path / "train.jsonl.meta.json").write_text(json.dumps({"levels": 4, "labels": "quantile-mapped"}))
    assert data_levels(tmp_path) == data_levels(tmp_path / "train.jsonl") == 4  # `steerlm annotate`'s metadata
    (tmp_path / "stats.json").write_text(json.dumps({"attributes": {"names": ["quality"], "levels": 3}}))
    assert data_levels(tmp_path) == 3  # `steerlm prepare`'s statistics come first
    (tmp_path / "stats.json").write_text("{not json")
    assert data_levels(tmp_path) == 4  # an unreadable file says nothing


def test_user_errors_exit_2_without_traceback(tmp_path, capsys):
    code, _, err = run_prepare(capsys, f"--source={tmp_path / 'nope.jsonl'}", f"--out={tmp_path / 'o'}")
    assert code == 2 and "nope.jsonl: does not exist" in err and "Traceback" not in err
    bad = tmp_path / "bad.jsonl"
    rows = [
        {"message_id": "m", "parent_id": None, "message_tree_id": "t", "role": "prompter", "text": "q"},
        {"message_id": "a", "parent_id": "m", "message_tree_id": "t", "role": "robot", "text": "x"},
    ]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = run_prepare(capsys, f"--source={bad}", f"--out={tmp_path / 'o'}")
    assert code == 2 and "bad.jsonl:2: role: unknown role 'robot'" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    code, _, err = run_prepare(capsys, f"--source={bad}", f"--out={tmp_path / 'o'}", "--format=hh")
    assert code == 2 and "looks like oasst, not hh" in err
    code, _, err = run_prepare(capsys, f"--source={bad}", f"--out={tmp_path / 'o'}", "--val_fraction=1.5")
    assert code == 2 and "val_fraction must be in [0, 1)" in err
    code, _, err = run_prepare(capsys, f"--source={bad}", f"--out={tmp_path / 'o'}", "--attributes=correctness")
    assert code == 2 and "not OASST labels" in err
    (tmp_path / "empty.jsonl").write_text("\n")
    code, _, err = run_prepare(capsys, f"--source={tmp_path / 'empty.jsonl'}", f"--out={tmp_path / 'o'}")
    assert code == 2 and "empty.jsonl: source: holds no records" in err
    (tmp_path / "other.jsonl").write_text('{"question": "?"}\n')
    code, _, err = run_prepare(capsys, f"--source={tmp_path / 'other.jsonl'}", f"--out={tmp_path / 'o'}")
    assert code == 2 and "cannot tell the format" in err and "question" in err
    code, printed, err = run_prepare(capsys, f"--source={bad}", f"--out={tmp_path / 'o'}", "--skip_invalid")
    assert code == 2 and "no conversations left" in err and "1 invalid" in printed


@needs_data
def test_candidate_sources_first_usable_wins(tmp_path, capsys, monkeypatch):
    def offline(name, *a, **kw):
        raise ConnectionError("Name or service not known")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    config = tmp_path / "prepare.yaml"
    sources = [str(tmp_path / "absent.jsonl"), "hub:OpenAssistant/oasst1", str(OASST)]
    config.write_text(yaml.safe_dump({"source": sources, "out": str(tmp_path / "out"), "max_trees": 10}))
    code, printed, err = run_prepare(capsys, f"--config={config}")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["source"] == str(OASST)
    code, _, err = run_prepare(capsys, f"--config={config}", "--source=hub:OpenAssistant/oasst1", "--overwrite")
    assert code == 2 and "local path" in err and "Traceback" not in err
    cfg = prepare.Config(source=[str(tmp_path / "absent.jsonl"), "hub:X/y"], out=str(tmp_path / "o2"))
    with pytest.raises(
        UserError, match=r"(?s)no candidate source.*absent.jsonl: does not exist.*hub:X/y: cannot load"
    ):
        prepare.main(cfg)


def test_sources_expand_steerlm_data_and_name_an_unset_variable(tmp_path, monkeypatch):
    """Presets name the local copy of the data as `$STEERLM_DATA/...` (docs/spec.md, "Data sources"): it expands as
    in a shell; unset, the candidate gives way to the next with the variable named, and alone it is a UserError."""
    from steerlm.data import formats

    (tmp_path / "oasst1").mkdir()
    (tmp_path / "oasst1" / "dev.jsonl").write_text("{}\n")
    monkeypatch.setenv("STEERLM_DATA", str(tmp_path))
    local = "$STEERLM_DATA/oasst1/dev.jsonl"
    assert formats.local_path(local) == str(tmp_path / "oasst1" / "dev.jsonl")
    assert formats.local_path("hub:$X/y") == "hub:$X/y"
    assert formats.first_usable([local, "hub:X/y"], lambda s: s, what="source", field="source")[0] == str(
        tmp_path / "oasst1" / "dev.jsonl")  # fmt: skip
    monkeypatch.delenv("STEERLM_DATA")
    with pytest.raises(UserError, match="environment variable STEERLM_DATA is not set"):
        formats.local_path(local)
    assert formats.first_usable([local, "hub:X/y"], lambda s: s, what="source", field="source")[0] == "hub:X/y"
    with pytest.raises(UserError, match=r"^source: \$STEERLM_DATA/oasst1/dev.jsonl: the environment variable"):
        formats.first_usable([local], lambda s: s, what="source", field="source")


def test_first_usable_candidate_names_every_reason(tmp_path):
    from steerlm.data import formats, oasst

    present = tmp_path / "present.jsonl"
    present.write_text("{}\n")
    tried = []

    def load(source):
        tried.append(source)
        if source.startswith("hub:"):
            raise oasst.HubUnavailable("cannot load: offline", field="source")
        if source.endswith("bad.jsonl"):
            raise UserError("malformed", file=source, line=3)
        return "loaded"

    absent = str(tmp_path / "absent.jsonl")
    assert formats.first_usable([absent, "hub:X/y", str(present)], load, what="source", field="source") == (
        str(present), "loaded")  # fmt: skip
    assert tried == ["hub:X/y", str(present)]  # a missing file is not loaded
    with pytest.raises(UserError, match=r"^source: .*absent.jsonl: does not exist$"):
        formats.first_usable([absent], load, what="source", field="source")
    with pytest.raises(UserError, match=r"(?s)no candidate source could be used:.*absent.jsonl: does not exist.*"
                                        r"hub:X/y: cannot load: offline"):  # fmt: skip
        formats.first_usable([absent, "hub:X/y"], load, what="source", field="source")
    # only the given errors give way to the next candidate: by default a malformed local file stops the run
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{}\n")
    with pytest.raises(UserError, match="bad.jsonl:3: malformed"):
        formats.first_usable([str(bad), str(present)], load, what="source", field="source")
    assert (
        formats.first_usable([str(bad), str(present)], load, what="source", field="f", errors=(UserError,))[1]
        == "loaded"
    )


@needs_data
def test_hh_and_records_formats(tmp_path, capsys):
    code, _, err = run_prepare(capsys, f"--source={HH}", f"--out={tmp_path / 'hh'}")
    assert code == 2 and ":76: chosen:" in err and "--skip_invalid" in err
    code, printed, err = run_prepare(capsys, f"--source={HH}", f"--out={tmp_path / 'hh'}", "--skip_invalid")
    assert code == 0, err
    assert "read 2,019 pairs" in printed and "4 invalid" in printed
    train, val = read_records(tmp_path / "hh" / "train.jsonl"), read_records(tmp_path / "hh" / "val.jsonl")
    assert not {r.extra["pair_id"] for r in train} & {r.extra["pair_id"] for r in val}
    assert len(train) % 2 == 0 and {r.extra["side"] for r in val} == {"chosen", "rejected"}

    oasst_out = tmp_path / "oasst"
    assert cli.run(["prepare", f"--source={OASST}", f"--out={oasst_out}", "--max_trees=15"]) == 0
    code, printed, err = run_prepare(capsys, f"--source={oasst_out / 'train.jsonl'}", f"--out={tmp_path / 'again'}",
                                     "--attributes=quality,humor")  # fmt: skip
    assert code == 0, err
    stats = json.loads((tmp_path / "again" / "stats.json").read_text())
    assert stats["format"] == "records" and stats["group_unit"] == "trees"
    labels = {t.label for r in read_records(tmp_path / "again" / "train.jsonl") for t in r.assistant_turns}
    assert labels and all(label is None or set(dict(p.split(":") for p in label.split(","))) <= {"quality", "humor"}
                          for label in labels)  # fmt: skip


@needs_data
@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_prepare_leaves_no_partial_files(tmp_path, monkeypatch, exc):
    real = prepare.write_records
    calls = []

    def failing(path, records):
        calls.append(path)
        if len(calls) == 3:  # train files written, val half-written, then the failure
            Path(path).write_text('{"partial": ')
            raise exc
        return real(path, records)

    out = tmp_path / "out"

    def attempt(*args: str) -> None:
        calls.clear()
        monkeypatch.setattr(prepare, "write_records", failing)
        argv = ["prepare", f"--source={OASST}", f"--out={out}", *args]
        if isinstance(exc, KeyboardInterrupt):
            assert cli.run(argv) == 130  # the CLI reports the interruption
        else:
            with pytest.raises(RuntimeError, match="disk full"):  # a bug, not a user error: it propagates
                cli.run(argv)
        assert len(calls) == 3
        monkeypatch.setattr(prepare, "write_records", real)

    attempt()
    assert not out.exists() and not leftovers(tmp_path)
    # with overwrite, a failed run keeps the previous outputs intact
    assert cli.run(["prepare", f"--source={OASST}", f"--out={out}", "--max_trees=5"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    attempt("--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and not leftovers(tmp_path)

"""SteerLM step 2: annotate conversation files with an APM (order kept, human labels kept, resumable)."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from steerlm import annotate, apm, apm_model, cli, pipeline
from steerlm import config as config_lib
from steerlm.attributes import AttributeSchema
from steerlm.data.records import Record, Turn, read_records, write_records
from steerlm.errors import UserError

SCHEMA = AttributeSchema()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory, oasst_split):
    """Real OASST records (train/val split by tree) and a tiny regression APM trained on 20 of them for 2 steps."""
    folder = tmp_path_factory.mktemp("annotate")
    train_r, val_r = oasst_split
    write_records(folder / "train.jsonl", train_r[:20])
    write_records(folder / "val.jsonl", val_r[:8])
    write_records(folder / "all.jsonl", train_r[:60])
    args = apm.APMTrainArgs(max_steps=2, batch_size=4, lr=1e-3)
    cfg = config_lib.build(apm.Config, {"data": str(folder), "out": str(folder / "apm"), "model": "tiny-encoder",
                                        "train": args})  # fmt: skip
    apm.main(cfg)
    return folder


def _run(work, **kw) -> dict:
    return annotate.main(config_lib.build(annotate.Config, {"apm": str(work / "apm"), **kw}))


def test_annotate_records_keeps_order_and_human_labels(work, tmp_path):
    source, out = work / "all.jsonl", tmp_path / "ann.jsonl"
    summary = _run(work, input=str(source), out=str(out), batch_size=7, chunk_size=50)
    before, after = read_records(source), read_records(out)
    assert summary["records"] == len(before) == len(after)
    assert not out.with_name("ann.jsonl.partial").exists() and not out.with_name("ann.jsonl.progress.json").exists()
    for b, a in zip(before, after, strict=True):
        assert [(t.role, t.value) for t in b.conversations] == [(t.role, t.value) for t in a.conversations]
        assert a.extra == b.extra
        for tb, ta in zip(b.conversations, a.conversations, strict=True):
            if tb.role == "User":
                assert ta.label is None and "gt_label" not in ta.extra
            else:
                assert SCHEMA.parse(ta.label)  # a full attribute string of rounded predictions
                assert "gt_label" in ta.extra and ta.extra["gt_label"] == tb.label  # the human label (or null)
    # the batched, chunked labels are what scoring each conversation on its own gives
    scorer = apm_model.load_apm(work / "apm")
    for record in after[:5]:
        for i, example in apm_model.assistant_prefixes(record):
            pred = scorer.predict([example], batch_size=1)[0]
            assert scorer.label(pred, calibrated=True) == record.conversations[i].label

    # annotating an annotated file keeps the original human label as gt_label
    again = tmp_path / "again.jsonl"
    _run(work, input=str(out), out=str(again))
    assert [t.extra.get("gt_label") for r in read_records(again) for t in r.conversations] == [
        t.extra.get("gt_label") for r in after for t in r.conversations
    ]


def test_annotate_hh_transcripts(work, shared_data, tmp_path):
    lines = gzip.open(shared_data / "hh-rlhf" / "harmless-base-dev.jsonl.gz", "rt").read().splitlines()[:5]
    source = tmp_path / "hh.jsonl"
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "hh-ann.jsonl"
    assert cli.run(["annotate", f"--apm={work / 'apm'}", f"--input={source}", f"--out={out}"]) == 0
    records = read_records(out)
    assert len(records) == 10
    assert [r.extra["side"] for r in records] == ["chosen", "rejected"] * 5
    pair = json.loads(lines[0])
    assert (
        records[0].conversations[-1].value in pair["chosen"] and records[1].conversations[-1].value in pair["rejected"]
    )
    for r in records:
        assert all(SCHEMA.parse(t.label) and t.extra["gt_label"] is None for t in r.assistant_turns)


def test_annotate_bad_inputs(work, tmp_path):
    out = tmp_path / "ann.jsonl"
    _run(work, input=str(work / "val.jsonl"), out=str(out))
    with pytest.raises(UserError, match="output exists; pass --overwrite"):
        _run(work, input=str(work / "val.jsonl"), out=str(out))
    assert _run(work, input=str(work / "val.jsonl"), out=str(out), overwrite=True)["records"] == 8
    assert cli.run(["annotate", f"--apm={work / 'apm'}", f"--input={work / 'val.jsonl'}", f"--out={out}"]) == 2

    bad = tmp_path / "bad.jsonl"
    lines = (work / "val.jsonl").read_text().splitlines()[:2] + [json.dumps(Record([Turn("User", "Hi")]).to_json())]
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:3: conversations: the conversation has no Assistant turn"):
        _run(work, input=str(bad), out=str(tmp_path / "x.jsonl"))
    assert _run(work, input=str(bad), out=str(tmp_path / "x.jsonl"), skip_invalid=True)["invalid_skipped"] == 1

    with pytest.raises(UserError, match="missing steerlm_apm.json"):
        annotate.main(annotate.Config(apm=str(tmp_path), input=str(work / "val.jsonl"), out=str(tmp_path / "y.jsonl")))
    with pytest.raises(UserError, match="overwrite the input"):
        _run(work, input=str(work / "val.jsonl"), out=str(work / "val.jsonl"), overwrite=True)


def test_annotate_resumes_after_a_kill(work, tmp_path):
    source = work / "all.jsonl"
    expected = tmp_path / "expected.jsonl"
    _run(work, input=str(source), out=str(expected), chunk_size=3)

    out = tmp_path / "ann.jsonl"
    partial, progress = tmp_path / "ann.jsonl.partial", tmp_path / "ann.jsonl.progress.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "steerlm.cli", "annotate", f"--apm={work / 'apm'}", f"--input={source}",
           f"--out={out}", "--chunk_size=3", "--batch_size=4"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300  # generous: a loaded CPU can take a minute to import torch
    done = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            done = json.loads(progress.read_text())["records"]
        except (FileNotFoundError, ValueError, KeyError):
            done = 0
        if done >= 9:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 9 <= done < len(read_records(source)), "the run was not killed midway"
    assert partial.exists() and not out.exists()
    # a kill between writing a chunk and recording it leaves extra bytes: the resumed run cuts them off
    with open(partial, "ab") as f:
        f.write(b'{"half-written": ')

    with pytest.raises(UserError, match="pass --resume"):
        _run(work, input=str(source), out=str(out), chunk_size=3)
    summary = _run(work, input=str(source), out=str(out), chunk_size=3, resume=True)
    assert summary["resumed_from"] >= 9
    assert out.read_bytes() == expected.read_bytes()
    assert not partial.exists() and not progress.exists()
    assert _run(work, input=str(source), out=str(out), resume=True)["records"] == 0  # already complete


def test_annotate_calibrates_labels_and_says_so(work, tmp_path):
    scorer = apm_model.load_apm(work / "apm")
    assert scorer.calibration  # train-apm stored a quantile map from its validation predictions
    source = work / "all.jsonl"
    calibrated, rounded = tmp_path / "cal.jsonl", tmp_path / "round.jsonl"
    _run(work, input=str(source), out=str(calibrated))
    _run(work, input=str(source), out=str(rounded), calibrate=False)
    meta = json.loads((tmp_path / "cal.jsonl.meta.json").read_text())
    assert meta["labels"] == "quantile-mapped" and "quantile" in meta["calibration"]
    assert meta["levels"] == SCHEMA.levels  # what sft reads as L (records.data_levels)
    assert json.loads((tmp_path / "round.jsonl.meta.json").read_text())["labels"] == "rounded"
    cal = [SCHEMA.parse(t.label) for r in read_records(calibrated) for t in r.assistant_turns]
    rnd = [SCHEMA.parse(t.label) for r in read_records(rounded) for t in r.assistant_turns]
    # the meta counts are the written labels
    assert meta["label_counts"]["quality"] == [sum(x["quality"] == lv for x in cal) for lv in range(SCHEMA.levels)]
    # the order of the APM's predictions is kept: a higher rounded level never gets a lower calibrated one
    qmap = scorer.calibration["quality"]
    preds = scorer.predict([e for r in read_records(source) for _, e in apm_model.assistant_prefixes(r)])
    assert [qmap(p["quality"]) for p in preds] == [x["quality"] for x in cal]
    for a, b in zip(preds, preds[1:], strict=False):
        if a["quality"] < b["quality"]:
            assert qmap(a["quality"]) <= qmap(b["quality"])
    assert [x["quality"] for x in rnd] == [scorer.round(p)["quality"] for p in preds]


def test_fill_keeps_human_levels_and_takes_the_apms_only_where_they_are_missing(work, tmp_path):
    records = read_records(work / "all.jsonl")[:12]
    human = next(t for r in records for t in r.assistant_turns if t.label)
    partial = SCHEMA.parse(human.label, ignore_unknown=True)
    human.label = SCHEMA.render({"quality": partial["quality"]})  # a turn that labels quality only
    unlabelled = next(t for r in records for t in r.assistant_turns if t is not human)
    unlabelled.label = None
    write_records(tmp_path / "in.jsonl", records)
    replaced, filled = tmp_path / "replace.jsonl", tmp_path / "fill.jsonl"
    _run(work, input=str(tmp_path / "in.jsonl"), out=str(replaced))
    _run(work, input=str(tmp_path / "in.jsonl"), out=str(filled), human_labels="fill")
    assert json.loads((tmp_path / "fill.jsonl.meta.json").read_text())["human_labels"] == "fill"
    scorer = apm_model.load_apm(work / "apm")
    for b, r, f in zip(records, read_records(replaced), read_records(filled), strict=True):
        for tb, tr, tf in zip(b.assistant_turns, r.assistant_turns, f.assistant_turns, strict=True):
            apm_levels, got = scorer.schema.parse(tr.label), scorer.schema.parse(tf.label)
            given = scorer.schema.parse(tb.label, ignore_unknown=True) if tb.label else {}
            assert got == {**apm_levels, **given} and set(got) == set(apm_levels)  # human wins, APM fills the rest
            assert tf.extra["gt_label"] == tb.label
    # the partly labelled turn: its quality is the human's, the rest the APM's
    f_turns = [t for r in read_records(filled) for t in r.assistant_turns]
    i = [t for r in records for t in r.assistant_turns].index(human)
    assert scorer.schema.parse(f_turns[i].label)["quality"] == partial["quality"]
    # a resumed run must use the same rule; a progress file from before the rule existed was a 'replace' run
    out = tmp_path / "x.jsonl"
    replace = config_lib.build(annotate.Config, {"apm": str(work / "apm"), "input": str(tmp_path / "in.jsonl"),
                                                 "out": str(out)})  # fmt: skip
    old_fingerprint = {k: v for k, v in annotate._fingerprint(replace).items() if k != "human_labels"}
    for name, text in ((".partial", ""), (".progress.json", json.dumps({"records": 0, "bytes": 0,
                                                                         "fingerprint": old_fingerprint}))):  # fmt: skip
        out.with_name(out.name + name).write_text(text)
    with pytest.raises(UserError, match="human_labels rule"):
        _run(work, input=str(tmp_path / "in.jsonl"), out=str(out), human_labels="fill", resume=True)
    assert _run(work, input=str(tmp_path / "in.jsonl"), out=str(out), resume=True)["records"] == len(records)
    # a human level the APM's schema cannot hold is refused before anything is written, naming record and turn
    bad = read_records(tmp_path / "in.jsonl")
    bad[2].assistant_turns[0].label = "quality:99"
    write_records(tmp_path / "bad.jsonl", bad)
    with pytest.raises(UserError, match="record 3") as err:
        _run(work, input=str(tmp_path / "bad.jsonl"), out=str(tmp_path / "bad_out.jsonl"), human_labels="fill")
    assert err.value.field.startswith("conversations[") and err.value.field.endswith("].label")
    assert not (tmp_path / "bad_out.jsonl").exists() and not (tmp_path / "bad_out.jsonl.partial").exists()


def test_pipeline_adds_apm_labelled_hh_rlhf_to_the_sft_data(shared_data, tmp_path):
    """The paper's "+ HH-RLHF" row as a pipeline option, on the tiny models."""
    out = tmp_path / "run"
    hh_files = [shared_data / "hh-rlhf" / "helpful-base-dev.jsonl.gz", shared_data / "hh-rlhf" / "harmless-base-dev.jsonl.gz"]  # fmt: skip
    args = ["pipeline", "--preset", "tiny", f"--out={out}", f"--prepare.source={shared_data / 'oasst1' / 'oasst1-en-dev.jsonl'}",
            "--prepare.max_trees=12", "--run_bootstrap=false", *(f"--hh_rlhf={f}" for f in hh_files),
            "--hh_rlhf_max_pairs=3"]  # fmt: skip
    assert cli.run(args) == 0
    train = read_records(out / "annotated_hh" / "train.jsonl")
    oasst_train = read_records(out / "annotated" / "train.jsonl")
    hh = [r for r in train if "pair_id" in r.extra]
    assert len(train) == len(oasst_train) + len(hh) and len(hh) == 2 * 3 * 2  # chosen + rejected, 3 pairs, 2 files
    assert all(SCHEMA.parse(t.label) and t.extra["gt_label"] is None for r in hh for t in r.assistant_turns)
    assert read_records(out / "annotated_hh" / "val.jsonl") == read_records(out / "annotated" / "val.jsonl")
    sft_cfg = yaml.safe_load((out / "sft" / "config.yaml").read_text())
    assert sft_cfg["data"] == str(out / "annotated_hh")
    assert (out / "sft" / "best" / "steerlm_model.json").exists()
    with pytest.raises(UserError, match="hh_rlhf_max_pairs"):
        config_lib.build(pipeline.Config, {"hh_rlhf_max_pairs": -1})
    # an entry may list candidates (as prepare.source): the first that exists is used, else every reason is named
    cfg = config_lib.build(pipeline.Config, {"hh_rlhf": [[str(tmp_path / "absent.jsonl.gz"), str(hh_files[0])]]})
    used, records, _ = pipeline._read_hh(cfg.hh_rlhf[0])
    assert used == str(hh_files[0]) and records
    with pytest.raises(UserError, match="absent.jsonl.gz: does not exist"):
        pipeline._read_hh([str(tmp_path / "absent.jsonl.gz")])

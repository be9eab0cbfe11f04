"""Experiment tracking (`--train.report_to`, issue #16): the rows of metrics.jsonl also reach TensorBoard (read back
with tensorboard's own event reader) and W&B (offline mode only), for SFT and PPO; metrics.jsonl stays."""

import json
import struct
from pathlib import Path

import pytest

from steerlm import cli, config, ppo, tracking
from steerlm.data.records import write_records
from steerlm.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread", "private_cache")


def metrics(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from the event file(s) in `folder`, read with tensorboard's EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def sft_data(oasst_split, tmp_path_factory):
    train, val = oasst_split
    folder = tmp_path_factory.mktemp("data")
    write_records(folder / "train.jsonl", [r for r in train if len(r.conversations) == 2][:10])
    write_records(folder / "val.jsonl", [r for r in val if len(r.conversations) == 2][:4])
    return folder


def sft_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["sft", f"--data={data}", f"--out={out}", "--model=tiny-lm", "--attributes=quality,humor",
            "--train.max_steps=4", "--train.log_every=1", "--train.eval_every=2", "--train.lr=0.01",
            "--train.batch_size=2", "--train.max_length=256", *extra]  # fmt: skip


def test_tensorboard_gets_what_metrics_jsonl_gets(sft_data, tmp_path):
    out = tmp_path / "sft"
    assert cli.run(sft_args(sft_data, out, "--train.report_to=tensorboard")) == 0
    events = list((out / "tensorboard" / "sft").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    scalars = tensorboard_scalars(out / "tensorboard" / "sft")
    rows = metrics(out)
    for key in ("loss", "lr", "tok_s", "val_loss", "flip_gap"):
        logged = [(r["step"], r[key]) for r in rows if key in r]
        assert logged, key
        assert [s for s, _ in scalars[key]] == [s for s, _ in logged], key
        assert [v for _, v in scalars[key]] == pytest.approx([v for _, v in logged], rel=1e-6), key


def test_no_tracker_by_default(sft_data, tmp_path):
    out = tmp_path / "sft"
    assert cli.run(sft_args(sft_data, out)) == 0
    assert metrics(out) and not (out / "tensorboard").exists() and not (out / "wandb").exists()


def wandb_history(run_file: Path) -> dict[int, dict]:
    """step -> logged values of an offline W&B run file: LevelDB-log framed records (32 KiB blocks, 7-byte record
    headers after a 7-byte file header) holding wandb's own protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf, history = run_file.read_bytes(), 32768, 7, b"", {}
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        buf, pos = buf + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                history[row["_step"]] = row
    return history


def test_wandb_offline_run_holds_every_metrics_row(sft_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "sft"
    assert cli.run(sft_args(sft_data, out, "--train.report_to=wandb")) == 0
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    history = wandb_history(runs[0])
    rows = metrics(out)
    assert sorted(history) == sorted({r["step"] for r in rows})
    for row in rows:
        for key, value in tracking.scalars(row).items():
            assert history[row["step"]][key] == pytest.approx(value, rel=1e-9), (row["step"], key)


def test_ppo_reward_and_kl_reach_tensorboard(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in ["Say hello.", "Tell me a joke.", "Hi", "Thanks!"]))
    values = {"policy": "tiny-lm", "prompts": [str(prompts)], "out": str(tmp_path / "ppo"), "samples": 0,
              "train": {"max_steps": 2, "lr": 3e-3, "batch_size": 4, "seed": 3, "report_to": "tensorboard"},
              "ppo": {"epochs": 1, "mini_batch_size": 4}, "sampling": {"max_new_tokens": 6, "temperature": 0.5}}  # fmt: skip
    ppo.main(config.build(ppo.Config, values), reward_fn=lambda prompts, answers: [len(a) / 10 for a in answers])
    out = tmp_path / "ppo"
    scalars = tensorboard_scalars(out / "tensorboard" / "ppo")
    rows = metrics(out)
    for key in ("reward", "kl", "entropy", "clip_frac"):
        assert [v for _, v in scalars[key]] == pytest.approx([r[key] for r in rows], rel=1e-6, abs=1e-7), key
    assert (out / "README.md").read_text().startswith("---\n")


def test_report_to_is_checked():
    assert tracking.parse("none") == [] and tracking.parse("tensorboard,wandb") == ["tensorboard", "wandb"]
    assert tracking.parse("wandb,") == ["wandb"]
    for bad in ("mlflow", "tensorboard,tensorboard", "tensorboard wandb"):
        with pytest.raises(ValueError, match="report_to must be 'none'"):
            tracking.parse(bad)
    with pytest.raises(UserError, match="report_to must be"):
        config.build(config.TrainArgs, {"report_to": "mlflow"})


def test_a_missing_tracker_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(tracking._PACKAGES, "tensorboard", "steerlm_no_such_package")
    with pytest.raises(UserError, match=r"pip install 'steerlm\[tracking\]'"):
        tracking.start("tensorboard", tmp_path, "sft")


def test_scalars_flatten_nested_rows():
    row = {"step": 3, "loss": 1.5, "best": None, "note": "x", "ok": True, "readout": {"humor": {"spearman": 0.25}}}
    assert tracking.scalars(row) == {"loss": 1.5, "readout/humor/spearman": 0.25}

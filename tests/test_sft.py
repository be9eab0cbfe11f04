"""`steerlm sft` and `steerlm merge` on the tiny random LM and real OASST records: masks, training, LoRA + merge,
resume after a kill, and a two-process data-parallel run."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA

from steerlm import cli, models, sft
from steerlm.attributes import AttributeSchema
from steerlm.data import templates
from steerlm.data.oasst import load_records, split_by_tree
from steerlm.data.records import ASSISTANT, Record, Turn, write_records
from steerlm.generator import Generator, SamplingArgs

ROOT = Path(__file__).resolve().parents[1]
OASST = SHARED_DATA / "oasst1" / "oasst1-en-dev.jsonl"
FULL = AttributeSchema()
FAST = ["--model=tiny-lm", "--train.lr=0.01", "--train.warmup_ratio=0", "--train.batch_size=2", "--train.log_every=1"]


@pytest.fixture(scope="module")
def records():
    if not OASST.exists():
        pytest.skip(f"real data {OASST} is absent")
    return load_records(OASST, AttributeSchema())


@pytest.fixture(scope="module")
def data_dir(records, tmp_path_factory):
    """~20 short real OASST conversations (split by tree) plus one whose first (masked) turn alone fills
    max_length=384, to be dropped."""
    train, val = split_by_tree(records, 0.2, seed=0)

    def size(r):
        return sum(len(t.value) for t in r.conversations)

    train = sorted(train, key=size)[:19] + [max(train, key=lambda r: len(r.conversations[0].value))]
    folder = tmp_path_factory.mktemp("oasst")
    write_records(folder / "train.jsonl", train)
    write_records(folder / "val.jsonl", sorted(val, key=size)[:6])
    return folder


def trained_text(example, tokenizer) -> list[str]:
    """Decoded runs of consecutive trainable tokens."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        if label == templates.IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    runs += [current] if current else []
    return [tokenizer.decode(r) for r in runs]


def encode(record, tokenizer, style, schema=FULL, min_quality=-1):
    """(example, conditioned record) as `steerlm sft` builds them, or (None, None) when the record is dropped."""
    conditioned = sft.condition([record], data=FULL, schema=schema, min_quality=min_quality, file="x",
                                stats=Counter())  # fmt: skip
    if not conditioned:
        return None, None
    examples, _ = sft.build_examples(conditioned, tokenizer, style, 100_000)
    return examples[0], conditioned[0]


def test_training_masks_are_spec_section_4(records):
    _, tokenizer = models.tiny_causal_lm()
    record = next(r for r in records if len(r.assistant_turns) >= 2 and all(t.label for t in r.assistant_turns))
    answers = [t for t in record.conversations[1:] if t.role == ASSISTANT]

    # NeMo style: the loss falls on each answer + "\n" and the T that follows it (SPEC §4)
    example, conditioned = encode(record, tokenizer, "nemo")
    assert trained_text(example, tokenizer) == [t.value + "\n" + templates.T for t in answers]
    full = tokenizer.decode(example["input_ids"])
    assert full == templates.render(conditioned, "nemo")
    for t in answers:  # the label line is in the context, not learned
        assert templates.L + t.label + "\n" + t.value in full

    # chat style: the answer and the end-of-turn token
    example, _ = encode(record, tokenizer, "chat")
    assert trained_text(example, tokenizer) == [t.value + tokenizer.eos_token for t in answers]
    assert templates.ATTR_MARKER + answers[0].label + "\n" in tokenizer.decode(example["input_ids"])

    # plain SFT: no attribute line at all; same trained text
    example, _ = encode(record, tokenizer, "nemo", schema=None)
    assert templates.L not in tokenizer.decode(example["input_ids"])
    assert trained_text(example, tokenizer) == [t.value + "\n" + templates.T for t in answers]

    # a subset of attributes keeps only those, in canonical order
    example, _ = encode(record, tokenizer, "nemo", schema=AttributeSchema(("humor", "quality")))
    levels = AttributeSchema().parse(answers[0].label)
    assert f"{templates.L}quality:{levels['quality']},humor:{levels['humor']}\n" in tokenizer.decode(
        example["input_ids"]
    )

    # min_quality: answers below it stay as context, unlearned; a record with none left is dropped
    qualities = [AttributeSchema().parse(t.label)["quality"] for t in answers]
    threshold = max(qualities)
    example, _ = encode(record, tokenizer, "nemo", min_quality=threshold)
    kept = [t.value + "\n" + templates.T for t, q in zip(answers, qualities, strict=True) if q >= threshold]
    assert trained_text(example, tokenizer) == kept
    assert all(t.value in tokenizer.decode(example["input_ids"]) for t in answers)
    if threshold < 9:
        assert encode(record, tokenizer, "nemo", min_quality=threshold + 1)[0] is None


def test_sft_cli_trains_and_best_loads(data_dir, tmp_path, capsys):
    out = tmp_path / "sft"
    args = ["sft", *FAST, f"--data={data_dir}", f"--out={out}", "--train.max_steps=6", "--train.max_length=384",
            "--template=nemo", "--attributes=quality,humor,toxicity"]  # fmt: skip
    assert cli.run(args) == 0
    printed = capsys.readouterr().out
    assert "train dropped: no trainable tokens after truncation: 1" in printed

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["train_examples"] == 19 and summary["num_processes"] == 1
    assert (out / "config.yaml").exists() and (out / "metrics.jsonl").exists()
    meta = json.loads((out / "best" / "steerlm_model.json").read_text())
    assert meta == {"attributes": {"names": ["quality", "toxicity", "humor"], "levels": 10}, "template": "nemo",
                    "conditioning": "attributes", "base_model": "tiny-lm", "lora": False,
                    "conditioning_loss": {"weight": 1.0, "distance_power": 1.0, "corrupt": "one", "attributes": [],
                                          "shares": {}, "reduce": "sum", "scale": 1.0, "gap_clip": 0.0}}  # fmt: skip

    base, _ = models.tiny_causal_lm()
    gen = Generator.load(str(out / "best"), device="cpu")
    trained = dict(gen.model.named_parameters())
    for name, p in base.named_parameters():
        assert not torch.equal(p, trained[name]), f"{name} did not change"
    assert gen.template == "nemo" and gen.schema.names == ("quality", "toxicity", "humor")
    prompt = gen.prompt_segments("Hi", {"humor": 2})[-1]
    assert prompt == f"Assistant\n{templates.L}quality:9,toxicity:0,humor:2\n"
    assert isinstance(gen.generate(["Hi"], {"humor": 2}, SamplingArgs(greedy=True, max_new_tokens=4))[0], str)

    # an earlier run's output is not overwritten by accident
    assert cli.run(args) == 2
    assert "--resume" in capsys.readouterr().err


def test_the_model_keeps_the_guidance_it_was_trained_for(data_dir, tmp_path, capsys):
    """`--guidance_scale` / `--guidance_reference` travel in steerlm_model.json; a run from a steerlm model (the
    bootstrap round) keeps its base's unless it sets its own; a reference naming no attribute of the model fails
    before training."""
    first, second = tmp_path / "first", tmp_path / "second"
    common = [*FAST, f"--data={data_dir}", "--train.max_steps=1", "--train.max_length=256", "--flip_gap=false",
              "--readout_examples=0", "--attributes=quality,humor"]  # fmt: skip
    assert cli.run(["sft", *common, f"--out={first}", "--guidance_scale=2", "--guidance_reference=middle"]) == 0
    assert models.read_meta(first / "best", "steerlm_model.json")["guidance"] == {"scale": 2.0, "reference": "middle"}
    assert Generator.load(str(first / "best")).guidance == (2.0, "middle")
    assert "s = 2 against `middle`" in (first / "best" / "README.md").read_text()  # the model card says so
    assert cli.run(["sft", *common[1:], f"--model={first / 'best'}", f"--out={second}", "--guidance_scale=3"]) == 0
    assert Generator.load(str(second / "best")).guidance == (3.0, "middle")
    capsys.readouterr()
    assert cli.run(["sft", *common, f"--out={tmp_path / 'bad'}", "--guidance_scale=2",
                    "--guidance_reference=funny:1"]) == 2  # fmt: skip
    assert "guidance_reference: unknown attribute 'funny'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before anything was written
    with pytest.raises(ValueError, match="meaningless with conditioning 'none'"):
        sft.Config(model="tiny-lm", data="d", out="o", conditioning="none", guidance_scale=2)


def test_lora_then_merge_gives_a_plain_transformers_folder(data_dir, tmp_path):
    out = tmp_path / "lora"
    args = ["sft", *FAST, f"--data={data_dir}", f"--out={out}", "--train.max_steps=3", "--train.max_length=384",
            "--train.lora.r=4", "--train.lr=0.05", "--conditioning=none"]  # fmt: skip
    assert cli.run(args) == 0
    best = out / "best"
    assert (best / "adapter_config.json").exists() and not (best / "model.safetensors").exists()
    assert json.loads((best / "steerlm_model.json").read_text())["lora"] is True

    merged = tmp_path / "merged"
    assert cli.run(["merge", f"--adapter={best}", f"--out={merged}"]) == 0
    meta = json.loads((merged / "steerlm_model.json").read_text())
    assert meta["lora"] is False and meta["conditioning"] == "none" and meta["attributes"] is None

    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    adapted, tokenizer = models.load_causal_lm(str(best), device="cpu")
    assert type(adapted).__name__.startswith("Peft")
    ids = torch.tensor([tokenizer("The capital of France is Paris.")["input_ids"]])
    with torch.no_grad():
        expected = adapted(input_ids=ids).logits
        base_logits = models.tiny_causal_lm()[0](input_ids=ids).logits
    torch.testing.assert_close(plain(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, base_logits, atol=1e-4)  # the adapter did change the model
    gen = Generator.load(str(merged), device="cpu")
    assert gen.schema is None and gen.conditioning == "none"
    greedy = SamplingArgs(greedy=True, max_new_tokens=8)
    assert gen.generate(["Hi", "Why?"], None, greedy) == Generator.load(str(best)).generate(
        ["Hi", "Why?"], None, greedy
    )


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_resume_after_kill_finishes_without_repeating_steps(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["sft", *FAST, f"--data={data_dir}", f"--out={out}", "--train.max_steps=12", "--train.max_length=384",
            "--train.checkpoint_every=2", "--train.eval_every=4"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "steerlm.cli", *args], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    state = out / "checkpoint" / "trainer_state.json"
    deadline = time.time() + 120
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = json.loads(state.read_text())["step"]
    assert 0 < killed_at < 12 and not (out / "summary.json").exists()

    assert cli.run([*args, "--resume"]) == 0
    assert f"resuming from step {killed_at}" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["steps"] == 12
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 13))
    evals = [r["step"] for r in rows if "val_loss" in r]
    assert evals == sorted(set(evals)) and evals[-1] == 12
    assert (out / "best" / "steerlm_model.json").exists()


def test_two_process_data_parallel_run_keeps_ranks_identical(data_dir, tmp_path):
    out = tmp_path / "ddp"
    script = tmp_path / "ddp.py"
    script.write_text(
        "import hashlib, json, os, sys\n"
        "from steerlm import config, sft\n"
        "cfg = config.build(sft.Config, json.loads(sys.argv[1]))\n"
        "summary, model = sft.run(cfg)\n"
        "h = hashlib.sha256()\n"
        "for k, v in sorted(model.state_dict().items()):\n"
        "    h.update(k.encode()); h.update(v.detach().float().cpu().numpy().tobytes())\n"
        "rank = os.environ['RANK']\n"
        "open(os.path.join(cfg.out, f'rank{rank}.json'), 'w').write(json.dumps({'sha': h.hexdigest(), **summary}))\n"
    )
    settings = {"model": "tiny-lm", "data": str(data_dir), "out": str(out), "template": "nemo",
                "train": {"max_steps": 3, "lr": 0.01, "max_length": 384, "batch_size": 2, "log_every": 1}}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           json.dumps(settings)]  # fmt: skip
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["num_processes"] == 2 and r["steps"] == 3 for r in ranks)
    assert ranks[0]["sha"] == ranks[1]["sha"]
    assert json.loads((out / "summary.json").read_text())["num_processes"] == 2
    base = Generator.load("tiny-lm", device="cpu").model
    trained = Generator.load(str(out / "best"), device="cpu").model
    assert not torch.equal(base.model.embed_tokens.weight, trained.model.embed_tokens.weight)


def test_early_turns_truncation_keeps_a_conversation_whose_window_the_first_question_fills(records, tmp_path, capsys):
    label = next(t.label for r in records for t in r.assistant_turns if t.label)
    long_first = Record([Turn("User", "tell me more " * 200), Turn("Assistant", "Here is more.", label),
                         Turn("User", "And then?"), Turn("Assistant", "Then it ends.", label)])  # fmt: skip
    folder = tmp_path / "data"
    write_records(folder / "train.jsonl", records[:5] + [long_first])
    write_records(folder / "val.jsonl", records[5:7])
    counts = {}
    for mode in ("end", "early_turns"):
        out = tmp_path / mode
        args = ["sft", *FAST, f"--data={folder}", f"--out={out}", "--train.max_steps=2", "--train.max_length=128",
                "--template=chat", "--attributes=quality", f"--truncation={mode}"]  # fmt: skip
        assert cli.run(args) == 0
        printed = capsys.readouterr().out
        counts[mode] = json.loads((out / "summary.json").read_text())["train_examples"]
        assert ("conversations cut at their earliest turns (truncation)" in printed) == (mode == "early_turns")
    # cut on the right the long question leaves nothing to learn and the record is dropped; cut at its earliest
    # turns its last exchange is trained
    assert counts["early_turns"] == counts["end"] + 1
    with pytest.raises(ValueError, match="truncation"):
        sft.Config(data=str(folder), truncation="left")

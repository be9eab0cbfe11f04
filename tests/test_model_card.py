"""Model cards (issue #16): every model folder the tiny pipeline saves gets a README.md with Hugging Face front
matter, generated from the run's meta, config and summary; LoRA adapters and their merged models; the card's own
transformers example runs as written."""

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import yaml
from test_pipeline import tiny_run  # noqa: F401  (the tiny pipeline's run: a module-scoped fixture)

from steerlm import cli, model_card
from steerlm.data import chat_template
from steerlm.data.records import write_records

pytestmark = pytest.mark.usefixtures("one_thread", "private_cache")


def card(folder: Path) -> tuple[dict, str]:
    """(front matter, body) of a folder's README.md."""
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def test_every_model_of_the_tiny_pipeline_has_a_card(tiny_run):  # noqa: F811
    run, _ = tiny_run
    folders = sorted(p.parent for p in run.rglob("steerlm_*.json") if p.parent.name == "best")
    assert [f.relative_to(run).as_posix() for f in folders] == ["apm/best", "bootstrap/sft/best", "sft/best"]
    for folder in folders:
        front, body = card(folder)
        assert front["license"] == "apache-2.0"  # the tiny models are steerlm's own
        assert "base_model" not in front  # a tiny random model has no hub id
        assert front["datasets"] == ["OpenAssistant/oasst1"]  # followed back to `steerlm prepare`'s source
        assert "steerlm" in front["tags"]
        assert "## Training" in body and "## Attributes" in body
    front, body = card(run / "apm" / "best")
    assert front["pipeline_tag"] == "text-classification" and "apm" in front["tags"]
    apm_template = run / "apm" / "best" / "chat_template.jinja"  # the encoder's own, if any: no attribute line
    assert not apm_template.exists() or not apm_template.read_text().startswith(chat_template.HEADER)
    for stage, folder in (("sft", run / "sft" / "best"), ("bootstrap", run / "bootstrap" / "sft" / "best")):
        front, body = card(folder)
        assert front["pipeline_tag"] == "text-generation" and stage in front["tags"]
        assert {"steerable", "attribute-conditioned", "template-chat"} <= set(front["tags"])
        assert "apply_chat_template(messages, attributes=" in body and '"chat_template_kwargs"' in body
        assert (folder / "chat_template.jinja").read_text().startswith(chat_template.HEADER)
    _, body = card(run / "bootstrap" / "sft" / "best")
    report = json.loads((run / "bootstrap" / "report.json").read_text())
    assert f"| bootstrap n | {report['n']} |" in body


def test_a_card_rewritten_with_the_summary_shows_the_measurements(tiny_run, tmp_path):  # noqa: F811
    run, _ = tiny_run
    folder = run / "sft" / "best"
    summary = json.loads((run / "sft" / "summary.json").read_text())
    summary["readout"] = {"humor": {"spearman": 0.125, "accuracy": 0.5}}  # as sft's read-out stores it
    model_card.write(folder, summary=summary)
    _, body = card(folder)
    assert f"| optimiser steps | {summary['steps']} " in body
    assert f"| best validation metric | {summary['best']:.4g} at step {summary['best_step']} |" in body
    assert "| readout.humor.spearman | 0.125 |" in body and "| readout.humor.accuracy | 0.5 |" in body
    assert "No `summary.json` yet" not in body


def lora_sft(data: Path, out: Path, style: str) -> None:
    assert cli.run(["sft", f"--data={data}", f"--out={out}", "--model=tiny-lm", f"--template={style}",
                    "--attributes=quality,humor", "--train.max_steps=2", "--train.lr=0.01", "--train.batch_size=2",
                    "--train.max_length=256", "--train.lora.r=4"]) == 0  # fmt: skip


def test_lora_adapter_and_merged_model_cards_and_the_example_runs(oasst_split, tmp_path):
    train, val = oasst_split
    data = tmp_path / "data"
    write_records(data / "train.jsonl", [r for r in train if len(r.conversations) == 2][:8])
    write_records(data / "val.jsonl", [r for r in val if len(r.conversations) == 2][:2])
    lora_sft(data, tmp_path / "sft", "nemo")
    front, body = card(tmp_path / "sft" / "best")
    assert front["library_name"] == "peft" and "steerlm merge" in body
    assert cli.run(["merge", f"--adapter={tmp_path / 'sft' / 'best'}", f"--out={tmp_path / 'merged'}"]) == 0
    merged = tmp_path / "merged"
    front, body = card(merged)
    assert front["library_name"] == "transformers" and "template-nemo" in front["tags"]
    assert "| merged from adapter |" in body and "| train.max_steps | 2 |" in body  # the adapter's run
    # The card's transformers example, run as written (fewer new tokens): it loads and prompts the model.
    code = re.search(r"```python\n(.*?)```", body, re.S).group(1).replace("max_new_tokens=128", "max_new_tokens=4")
    assert 'stop_strings=["<extra_id_1>"]' in code and "attributes=" in code
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {})
    assert printed.getvalue().endswith("\n")


def test_base_model_and_datasets_are_followed_back(tmp_path):
    assert model_card.hub_base("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert model_card.hub_base("tiny-lm") is None and model_card.hub_base("org/model") == "org/model"
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "steerlm_model.json").write_text(json.dumps({"base_model": "smollm2-135m-instruct"}))
    assert model_card.hub_base(str(sft)) == "HuggingFaceTB/SmolLM2-135M-Instruct"  # PPO's policy was this SFT
    data = tmp_path / "data"
    data.mkdir()
    (data / "config.yaml").write_text(yaml.safe_dump({"source": ["x/hh-rlhf/harmless-base-dev.jsonl.gz"]}))
    assert model_card.datasets_of({"data": str(data)}) == [("Anthropic/hh-rlhf", "mit")]
    text = model_card.render(sft, meta_name="steerlm_model.json", config={"model": str(sft), "data": str(data)})
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and front["license"] == "apache-2.0"
    with pytest.raises(ValueError, match="unknown stage"):
        model_card.render(sft, stage="dpo")

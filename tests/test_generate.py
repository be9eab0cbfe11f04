"""Generation: batching, stop strings, seeds, attribute defaults and errors, the `generate` and `chat` commands."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from steerlm import cli, models
from steerlm.attributes import AttributeSchema
from steerlm.data import templates
from steerlm.data.records import Record, Turn
from steerlm.errors import UserError
from steerlm.generator import Generator, SamplingArgs

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = AttributeSchema(("quality", "toxicity", "humor"))
GREEDY = SamplingArgs(greedy=True, max_new_tokens=24)
PROMPTS = ["Hi", "What is the capital of France? Please answer with a long story about it.", "Tell me a joke.",
           "x", "How do I sort a list in Python?"]  # fmt: skip


def chaotic_lm():
    """The tiny LM with large random weights: varied greedy output, unlike the near-uniform initialisation."""
    model, tokenizer = models.tiny_causal_lm()
    with torch.random.fork_rng():
        torch.manual_seed(1)
        for p in model.parameters():
            if p.ndim == 2:
                p.data.normal_(0, 0.3)
    return model, tokenizer


@pytest.fixture(scope="module")
def lm():
    return chaotic_lm()


@pytest.fixture(params=["nemo", "chat"])
def gen(request, lm):
    return Generator(*lm, schema=SCHEMA, template=request.param, conditioning="attributes")


class ScriptedLM(torch.nn.Module):
    """A stand-in model that emits a fixed token sequence (after the prompt), to test how answers end."""

    def __init__(self, script: list[int], vocab: int):
        super().__init__()
        self.script, self.vocab = script, vocab
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=True):
        if past_key_values is None:
            past_key_values = SimpleNamespace(start=attention_mask.shape[1], batch_select_indices=lambda idx: None)
        done = attention_mask.shape[1] - past_key_values.start
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab)
        logits[:, :, self.script[min(done, len(self.script) - 1)]] = 10.0
        return SimpleNamespace(logits=logits, past_key_values=past_key_values)


def scripted(text: str, template: str):
    _, tokenizer = models.tiny_causal_lm()
    script = tokenizer(text, add_special_tokens=False)["input_ids"]
    model = ScriptedLM(script, len(tokenizer))
    return Generator(model, tokenizer, schema=SCHEMA, template=template, conditioning="attributes")


def test_batched_equals_unbatched_under_greedy(gen):
    batched = gen.generate(PROMPTS, {"humor": 3}, GREEDY, batch_size=3)
    single = [gen.generate(p, {"humor": 3}, GREEDY)[0] for p in PROMPTS]
    assert batched == single
    assert len(set(batched)) == len(PROMPTS)  # the prompts (and their attributes) matter
    assert "".join(gen.stream(PROMPTS[1], {"humor": 3}, GREEDY)) == single[1]
    # rows that end early leave the batch (and its KV cache); the others go on unchanged
    stopping = SamplingArgs(greedy=True, max_new_tokens=24, stop=["e"])
    batched = gen.generate_full(PROMPTS, {"humor": 3}, stopping, batch_size=3)
    assert len({len(g.token_ids) for g in batched}) >= 3
    assert batched == [gen.generate_full(p, {"humor": 3}, stopping)[0] for p in PROMPTS]


def test_stop_strings_end_answers():
    # NeMo style ends at T and drops the newline before it (SPEC §3); chat style ends at the EOS token
    gen = scripted("Hello there\n<extra_id_1>User\nmore", "nemo")
    result = gen.generate_full(["Hi"], sampling=GREEDY)[0]
    assert result.text == "Hello there" and result.finish_reason == "stop"
    assert "".join(gen.stream("Hi", sampling=GREEDY)) == "Hello there"
    gen = scripted("Hello there<|im_end|>more", "chat")
    result = gen.generate_full(["Hi"], sampling=GREEDY)[0]
    assert result.text == "Hello there" and result.finish_reason == "stop"
    # user stop strings, and min_new_tokens ignoring stops before it
    gen = scripted("one two three four five six", "chat")
    assert gen.generate(["Hi"], sampling=SamplingArgs(greedy=True, max_new_tokens=30, stop=["three"])) == ["one two "]
    n = len(gen.tokenizer("one two", add_special_tokens=False)["input_ids"])
    min_tokens = SamplingArgs(greedy=True, max_new_tokens=30, stop=["o"], min_new_tokens=n)
    assert gen.generate(["Hi"], sampling=min_tokens) == ["one two three f"]
    # no stop: runs to max_new_tokens
    result = gen.generate_full(["Hi"], sampling=SamplingArgs(greedy=True, max_new_tokens=3))[0]
    assert result.finish_reason == "length" and len(result.token_ids) == 3
    # real model, batched: a stop string taken from its own greedy answer
    real = Generator(*chaotic_lm(), schema=SCHEMA, template="chat", conditioning="attributes")
    full = real.generate(PROMPTS, None, GREEDY)
    stop = next(
        full[1][i : i + 2] for i in range(3, 40) if full[1][i : i + 2].isascii() and full[1][i : i + 2].isalpha()
    )
    stopped = real.generate(PROMPTS, None, SamplingArgs(greedy=True, max_new_tokens=24, stop=[stop]), batch_size=5)
    assert stopped[1] == full[1][: full[1].index(stop)].removesuffix("\n")
    assert all(
        s == f[: f.index(stop)].removesuffix("\n") if stop in f else s == f for s, f in zip(stopped, full, strict=True)
    )


def test_seed_makes_sampling_reproducible(gen):
    sampling = SamplingArgs(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.2, seed=7)
    first = gen.generate(PROMPTS, None, sampling, batch_size=2)
    assert gen.generate(PROMPTS, None, sampling, batch_size=2) == first
    other = gen.generate(PROMPTS, None, SamplingArgs(max_new_tokens=16, temperature=1.0, seed=8), batch_size=2)
    assert other != first


def test_attributes_default_validate_and_go_per_prompt(lm):
    gen = Generator(*lm, schema=SCHEMA, template="nemo", conditioning="attributes")
    assert gen.prompt_segments("Hi", {"humor": 7})[-1] == f"Assistant\n{templates.L}quality:9,toxicity:0,humor:7\n"
    assert gen.attribute_string(None) == "quality:9,toxicity:0,humor:0"
    assert gen.attribute_string("toxicity:2") == "quality:9,toxicity:2,humor:0"
    with pytest.raises(UserError, match="unknown attribute 'funny'"):
        gen.generate(["Hi"], {"funny": 3}, GREEDY)
    with pytest.raises(UserError, match="out of range"):
        gen.generate(["Hi"], {"humor": 10}, GREEDY)
    with pytest.raises(UserError, match="2 attribute mappings for 1"):
        gen.generate(["Hi"], [{}, {}], GREEDY)
    per = gen.generate(["Hi", "Hi"], [{"humor": 0}, {"humor": 9}], GREEDY)
    assert per == [gen.generate("Hi", {"humor": 0}, GREEDY)[0], gen.generate("Hi", {"humor": 9}, GREEDY)[0]]
    # history: earlier answers keep their labels, re-rendered with the model's schema
    record = Record(
        [Turn("User", "Hi"), Turn("Assistant", "Hello", "quality:5,violence:3,humor:1"), Turn("User", "?")]
    )
    text = "".join(gen.prompt_segments(record, {"humor": 2}))
    assert f"{templates.L}quality:5,humor:1\nHello\n" in text and text.endswith("quality:9,toxicity:0,humor:2\n")
    # an unconditioned model ignores attributes: no label line at all
    plain = Generator(*lm, template="nemo")
    assert templates.L not in "".join(plain.prompt_segments(record, {"humor": 2}))


def _save(lm, folder: Path, meta: dict) -> str:
    models.save_model(lm[0], lm[1], folder, "steerlm_model.json", meta)
    return str(folder)


def test_generate_command(lm, tmp_path, capsys):
    meta = {"attributes": SCHEMA.to_dict(), "template": "nemo", "conditioning": "attributes", "base_model": "tiny-lm",
            "lora": False}  # fmt: skip
    model = _save(lm, tmp_path / "model", meta)
    gen = Generator.load(model, device="cpu")
    expected = gen.generate(["Hi"], {"humor": 7}, GREEDY)[0]
    assert cli.run(["generate", f"--model={model}", "--attr", "humor=7", "--greedy", "--max_new_tokens=24", "Hi"]) == 0
    assert capsys.readouterr().out == expected + "\n"

    prompts = tmp_path / "prompts.jsonl"
    record = {"conversations": [{"from": "User", "value": "Hi"}, {"from": "Assistant", "value": "ref", "label": None}]}
    rows = ["Hi", {"prompt": "Hi", "attributes": {"humor": 2}, "id": 5}, record]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "attrs.yaml").write_text("humor: 7\ntoxicity: 1\n")
    out = tmp_path / "answers.jsonl"
    args = ["generate", f"--model={model}", f"--prompts={prompts}", f"--out={out}", "--greedy", "--max_new_tokens=24",
            f"--attrs_file={tmp_path / 'attrs.yaml'}"]  # fmt: skip
    assert cli.run(args) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert got[0]["attributes"] == {"quality": 9, "toxicity": 1, "humor": 7}
    assert got[0]["answer"] == gen.generate(["Hi"], {"humor": 7, "toxicity": 1}, GREEDY)[0]
    assert got[1]["id"] == 5 and got[1]["attributes"]["humor"] == 2
    assert got[2]["conversations"][-1] == {"from": "Assistant", "value": got[0]["answer"],
                                           "label": "quality:9,toxicity:1,humor:7"}  # fmt: skip
    assert cli.run(args) == 2  # the output exists
    assert cli.run(["generate", f"--model={model}", "--attr", "humor=12", "Hi"]) == 2
    assert "humor: level 12 is out of range 0..9" in capsys.readouterr().err


def test_generate_command_guides_against_the_middle_of_what_it_names(lm, tmp_path, capsys, monkeypatch):
    meta = {"attributes": SCHEMA.to_dict(), "template": "chat", "conditioning": "attributes", "base_model": "tiny-lm",
            "lora": False}  # fmt: skip
    model = _save(lm, tmp_path / "model", meta)
    gen = Generator.load(model, device="cpu")
    guided = dict(max_new_tokens=12, greedy=True, guidance_scale=3.0)
    expected = gen.generate(["Hi"], {"humor": 7}, SamplingArgs(**guided, guidance_reference="humor:4"))[0]
    neutral = []
    real = Generator.neutral_ids
    monkeypatch.setattr(Generator, "neutral_ids", lambda self, c, s, a=None: neutral.append(a) or real(self, c, s, a))
    args = ["generate", f"--model={model}", "--attr", "humor=7", "--greedy", "--max_new_tokens=12",
            "--guidance_scale=3", "--guidance_reference=middle", "Hi"]  # fmt: skip
    assert cli.run(args) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert neutral == [{"humor": 7}]  # what the user named, not the request filled with defaults

    base = Generator.load("tiny-lm", device="cpu")  # a plain model: chat template, no attributes
    assert (base.template, base.conditioning, base.schema) == ("chat", "none", None)

    # a model saved with guidance is generated guided unless the command says otherwise
    saved = _save(lm, tmp_path / "saved", {**meta, "guidance": {"scale": 3.0, "reference": "middle"}})
    assert Generator.load(saved, device="cpu").guidance == (3.0, "middle")
    short = ["generate", f"--model={saved}", "--attr", "humor=7", "--greedy", "--max_new_tokens=12", "Hi"]
    assert cli.run(short) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert cli.run([*short, "--guidance_scale=1"]) == 0
    assert (
        capsys.readouterr().out
        == gen.generate(["Hi"], {"humor": 7}, SamplingArgs(max_new_tokens=12, greedy=True))[0] + "\n"
    )
    _save(lm, tmp_path / "bad", {**meta, "guidance": {"scale": -2}})
    assert cli.run(["generate", f"--model={tmp_path / 'bad'}", "Hi"]) == 2
    assert "bad guidance entry" in capsys.readouterr().err


def test_chat_through_piped_stdin(lm, tmp_path):
    meta = {"attributes": SCHEMA.to_dict(), "template": "chat", "conditioning": "attributes", "base_model": "tiny-lm",
            "lora": False}  # fmt: skip
    model = _save(lm, tmp_path / "model", meta)
    gen = Generator.load(model, device="cpu")
    first = gen.generate(["Hello"], {"humor": 8}, GREEDY)[0]
    history = Record(
        [Turn("User", "Hello"), Turn("Assistant", first, "quality:9,toxicity:0,humor:8"), Turn("User", "More")]
    )
    second = gen.generate([history], {"humor": 2}, GREEDY)[0]

    script = "/set humor=8\nHello\n/set humor=2\n/show\n/set funny=1\nMore\n/reset\n/show\n/quit\nnever answered\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "steerlm.cli", "chat", f"--model={model}", "--greedy",
                           "--max_new_tokens=24"], input=script.encode(), capture_output=True, env=env,
                          timeout=600)  # fmt: skip
    stdout, stderr = done.stdout.decode(), done.stderr.decode()  # bytes: answers may hold any character
    assert done.returncode == 0, stderr
    assert stdout.startswith(
        f"attributes: quality:9,toxicity:0,humor:8\n{first}\nattributes: quality:9,toxicity:0,humor:2\n"
    )
    assert "history: 1 exchange(s)" in stdout and "history: 0 exchange(s)" in stdout
    assert second + "\nconversation cleared" in stdout
    assert "never answered" not in stdout and "unknown attribute 'funny'" in stderr


def test_next_tokens_is_the_one_choice_and_keeps_top_k_ties():
    from transformers import TopKLogitsWarper

    from steerlm.batching import next_tokens

    # top-k keeps every token tied with the k-th logit (as transformers), also beyond the 256 topk candidates
    logits = torch.zeros(1, 1000)
    logits[0, :10], logits[0, 10:600] = 5.0, 3.0
    support = set(torch.nonzero(TopKLogitsWarper(20)(None, logits.clone())[0] > float("-inf")).flatten().tolist())
    s = SamplingArgs(temperature=1.0, top_k=20, top_p=1.0)
    n = 2000
    drawn = next_tokens(logits.repeat(n, 1), [s] * n, [torch.Generator().manual_seed(i) for i in range(n)])
    assert set(drawn.tolist()) <= support == set(range(600)) and int(drawn.max()) >= 256
    # a row with a generator of its own draws the same whatever its batch mates and their settings
    rows = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0)) * 3
    mates = [SamplingArgs(temperature=1.3, top_k=50, top_p=0.9), SamplingArgs(temperature=0.8, top_k=600),
             SamplingArgs(greedy=True), SamplingArgs(temperature=1.0, top_p=1.0)]  # fmt: skip
    together = next_tokens(rows, mates, [torch.Generator().manual_seed(5) for _ in mates])
    alone = [next_tokens(rows[i : i + 1], [m], [torch.Generator().manual_seed(5)]).item()
             for i, m in enumerate(mates)]  # fmt: skip
    assert together.tolist() == alone

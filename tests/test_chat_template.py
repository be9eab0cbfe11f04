"""The SteerLM prompt as the model's own Jinja chat template (issue #16): rendered by plain transformers it equals
steerlm's prompt token for token, for both styles, with and without attributes, multi-turn and with system text;
bad attribute values stop it with a readable error; a saved model carries it, and a model loaded with
transformers alone answers as `steerlm generate` does."""

import json
from pathlib import Path

import pytest
import torch
from jinja2.exceptions import TemplateError
from transformers import AutoModelForCausalLM, AutoTokenizer

from steerlm import cli, models
from steerlm.attributes import AttributeSchema
from steerlm.data import chat_template, templates
from steerlm.data.records import ASSISTANT, DEFAULT_SYSTEM, USER, Record, Turn, write_records
from steerlm.generator import Generator

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEMA = AttributeSchema(("quality", "toxicity", "humor", "creativity"))
STYLES = ("nemo", "chat")

#: (messages, the same conversation as a steerlm Record with its history labels) - history labels are the full
#: attribute strings steerlm renders for an assistant message's own `attributes`.
CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "What is the capital of France?"}],
    "own system": [
        {"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "Tell me a joke."},
    ],
    "multi-turn": [
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": " Why did the chicken cross the road?\n", "attributes": {"humor": 9}},
        {"role": "user", "content": "\nAnother one, please!  "},
        {"role": "assistant", "content": "To get to the other side.", "attributes": {"quality": 4, "humor": 2}},
        {"role": "user", "content": "Thank you very much."},
    ],
    "history without own attributes": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How do I sort a list in Python?"},
        {"role": "assistant", "content": "Use the sorted function."},
        {"role": "user", "content": [{"type": "text", "text": "And in "}, {"type": "text", "text": "place?"}]},
    ],
}
ATTRIBUTES = {
    "all given": {"quality": 4, "toxicity": 1, "humor": 8, "creativity": 2},
    "partly given": {"humor": 7},
    "none given (defaults)": {},
    "integral float": {"humor": 7.0},
}


@pytest.fixture(scope="module")
def tok():
    return models.tiny_causal_lm()[1]


def text_of(content) -> str:
    return content if isinstance(content, str) else "".join(p["text"] for p in content)


def as_record(messages, label: str | None) -> Record:
    """The conversation as `steerlm serve` turns OpenAI messages into a Record (`serving.service.Service.record`)."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    turns = []
    for m in messages:
        if m["role"] == "system":
            continue
        own = m.get("attributes")
        turn_label = SCHEMA.render(SCHEMA.with_defaults(own)) if own is not None else label
        turns.append(Turn(USER if m["role"] == "user" else ASSISTANT, text_of(m["content"]),
                          turn_label if m["role"] == "assistant" else None))  # fmt: skip
    return Record(turns, "\n\n".join(system) if system else DEFAULT_SYSTEM)


def jinja_ids(tok, template, messages, **kwargs) -> list[int]:
    return tok.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=True,
                                   return_dict=False, **kwargs)  # fmt: skip


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("setting", ATTRIBUTES)
def test_template_equals_steerlm_prompt_token_for_token(tok, style, conv, setting):
    template = chat_template.build(style, SCHEMA, tok.chat_template)
    messages, attributes = CONVERSATIONS[conv], ATTRIBUTES[setting]
    gen = Generator(models.tiny_causal_lm()[0], tok, schema=SCHEMA, template=style, conditioning="attributes")
    label = gen.attribute_string(attributes)  # unspecified attributes at the schema defaults
    want = gen.prompt_ids(as_record(messages, label), attributes)
    got = jinja_ids(tok, template, messages, attributes=attributes)
    assert got == want
    text = tok.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False,
                                   attributes=attributes)  # fmt: skip
    marker = templates.L if style == "nemo" else templates.ATTR_MARKER
    assert text.endswith(marker + label + "\n")


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("conv", CONVERSATIONS)
def test_no_attributes_is_the_unconditional_prompt(tok, style, conv):
    """Absent (or none) `attributes`: no attribute line, as `inference_segments(record, None)` (label dropout)."""
    template = chat_template.build(style, SCHEMA, tok.chat_template)
    messages = CONVERSATIONS[conv]
    segments = templates.inference_segments(as_record(messages, None), None, style, tok)
    want = templates.encode_text_segments(segments, tok)
    assert jinja_ids(tok, template, messages) == want
    assert jinja_ids(tok, template, messages, attributes=None) == want
    tail = templates.T + "Assistant\n" if style == "nemo" else "<|im_start|>assistant\n"
    assert tok.decode(want).endswith(tail)


@pytest.mark.parametrize("style", STYLES)
def test_a_model_without_attributes_ignores_them(tok, style):
    template = chat_template.build(style, None, tok.chat_template)
    gen = Generator(models.tiny_causal_lm()[0], tok, template=style, conditioning="none")
    messages = CONVERSATIONS["multi-turn"]
    plain = [{k: v for k, v in m.items() if k != "attributes"} for m in messages]
    want = gen.prompt_ids(as_record(plain, None))
    assert jinja_ids(tok, template, messages, attributes={"humor": 3}) == want
    assert jinja_ids(tok, template, plain) == want


@pytest.mark.parametrize("style", STYLES)
def test_whole_conversation_renders_the_training_text(tok, style):
    """Without a generation prompt the template renders what SFT trains on (SPEC §3), token for token."""
    template = chat_template.build(style, SCHEMA, tok.chat_template)
    messages = CONVERSATIONS["multi-turn"][:4]
    record = as_record(messages, None)
    text = tok.apply_chat_template(messages, chat_template=template, tokenize=False)
    assert text == templates.render(record, style, tok)
    ids = tok.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=False)
    assert ids == templates.encode(record, tok, style)["input_ids"]


BAD = [
    ({"funny": 3}, r'attributes: unknown attribute "funny"; known: quality, toxicity, humor, creativity'),
    ({"humor": 10}, r"attributes\.humor: level 10 is out of range 0\.\.9"),
    ({"humor": -1}, r"attributes\.humor: level -1 is out of range 0\.\.9"),
    ({"humor": "7"}, r'attributes\.humor: level must be an integer, not "7"'),
    ({"humor": 7.5}, r"attributes\.humor: level must be an integer, not 7\.5"),
    ({"humor": True}, r"attributes\.humor: level must be an integer, not true"),
    ("humor:7", r"attributes must be a mapping of attribute name to level"),
]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("bad,message", BAD)
def test_bad_attribute_values_raise_a_readable_error(tok, style, bad, message):
    template = chat_template.build(style, SCHEMA, tok.chat_template)
    with pytest.raises(TemplateError, match=message):
        jinja_ids(tok, template, CONVERSATIONS["one turn"], attributes=bad)


def test_bad_message_attributes_and_conversations_raise_readable_errors(tok):
    template = chat_template.build("nemo", SCHEMA, tok.chat_template)
    history = [dict(m) for m in CONVERSATIONS["multi-turn"]]
    history[1]["attributes"] = {"quality": 12}
    with pytest.raises(TemplateError, match=r"messages\[1\]\.attributes\.quality: level 12 is out of range"):
        jinja_ids(tok, template, history)
    with pytest.raises(TemplateError, match="must end with a user message"):
        jinja_ids(tok, template, CONVERSATIONS["multi-turn"][:2])
    with pytest.raises(TemplateError, match=r"messages\[0\]\.role: \"tool\" is not system, user or assistant"):
        jinja_ids(tok, template, [{"role": "tool", "content": "x"}, {"role": "user", "content": "y"}])


@pytest.mark.parametrize("style", STYLES)
def test_building_is_idempotent_and_keeps_the_base_template(tok, style):
    once = chat_template.build(style, SCHEMA, tok.chat_template)
    assert chat_template.base_template(once) == tok.chat_template
    assert chat_template.build(style, SCHEMA, once) == once
    assert chat_template.base_template(tok.chat_template) == tok.chat_template
    with pytest.raises(ValueError, match="base model's chat template"):
        chat_template.build("chat", SCHEMA, None)


def test_check_finds_a_template_that_differs(tok):
    assert chat_template.check(tok, "chat", SCHEMA, chat_template.build("chat", SCHEMA, tok.chat_template)) == []
    wrong = chat_template.build("nemo", SCHEMA, tok.chat_template)
    problems = chat_template.check(tok, "chat", SCHEMA, wrong)
    assert problems and "first difference at token" in problems[0]


@pytest.mark.parametrize("style", STYLES)
def test_saved_model_carries_the_template_for_autotokenizer_alone(tok, style, tmp_path):
    model = models.tiny_causal_lm()[0]
    meta = {"attributes": SCHEMA.to_dict(), "template": style, "conditioning": "attributes", "base_model": "tiny-lm",
            "lora": False}  # fmt: skip
    folder = models.save_model(model, tok, tmp_path / "m", "steerlm_model.json", meta)
    assert tok.chat_template == models.TINY_CHAT_TEMPLATE  # the caller's tokenizer is left as it was
    assert (folder / "chat_template.jinja").read_text().startswith(chat_template.HEADER)
    plain = AutoTokenizer.from_pretrained(folder)
    gen = Generator.load(str(folder))
    assert gen.tokenizer.chat_template == models.TINY_CHAT_TEMPLATE  # steerlm renders on the base template
    for conv in CONVERSATIONS.values():
        levels = {"humor": 6, "creativity": 1}
        want = gen.prompt_ids(as_record(conv, gen.attribute_string(levels)), levels)
        got = plain.apply_chat_template(conv, attributes=levels, add_generation_prompt=True, return_dict=False)
        assert got == want


@pytest.mark.parametrize("style", STYLES)
def test_transformers_alone_answers_as_steerlm_generate(style, tmp_path, oasst_split):
    """A tiny SteerLM model trained by `steerlm sft`, loaded by transformers alone and prompted through
    `apply_chat_template(..., attributes=...)`, gives the greedy answer `steerlm generate` gives."""
    train, val = oasst_split
    write_records(tmp_path / "data" / "train.jsonl", [r for r in train if len(r.conversations) == 2][:12])
    write_records(tmp_path / "data" / "val.jsonl", [r for r in val if len(r.conversations) == 2][:4])
    out = tmp_path / "sft"
    assert cli.run(["sft", f"--data={tmp_path / 'data'}", f"--out={out}", "--model=tiny-lm", f"--template={style}",
                    "--attributes=quality,humor", "--train.max_steps=3", "--train.lr=0.01", "--train.batch_size=2",
                    "--train.max_length=256"]) == 0  # fmt: skip
    folder = out / "best"
    prompt, levels = "Tell me a joke.", {"humor": 8}
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": prompt}) + "\n")
    assert cli.run(["generate", f"--model={folder}", "--attr=humor=8", "--greedy", "--max_new_tokens=12",
                    f"--prompts={tmp_path / 'prompts.jsonl'}", f"--out={tmp_path / 'answers.jsonl'}"]) == 0  # fmt: skip
    steerlm_answer = json.loads((tmp_path / "answers.jsonl").read_text())["answer"]

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    messages = [{"role": "user", "content": prompt}]
    inputs = tok.apply_chat_template(messages, attributes=levels, add_generation_prompt=True, return_tensors="pt")
    with torch.no_grad():
        out_ids = model.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=tok.all_special_ids,
                                 pad_token_id=tok.pad_token_id, stop_strings=[templates.T], tokenizer=tok)  # fmt: skip
    answer = tok.decode(out_ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    answer = answer.split(templates.T)[0].removesuffix("\n")  # NeMo: the answer ends with "\n" + <extra_id_1>
    assert answer == steerlm_answer
    assert len(out_ids[0]) > inputs["input_ids"].shape[1] + 1  # an answer of more than an end token was compared
    meta = json.loads((folder / "steerlm_model.json").read_text())
    assert meta["template"] == style
    assert Path(folder / "README.md").read_text().startswith("---\n")


#: Messages whose whitespace meets a segment edge: the same text, possibly other tokens (docs/serve.md).
WHITESPACE_EDGES = [
    [{"role": "user", "content": "Hi\n"}],
    [{"role": "user", "content": "  Hi  "}],
    [{"role": "system", "content": "Be brief.\n\n"}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!\n"},
        {"role": "user", "content": "x"},
    ],
]


@pytest.mark.slow
@pytest.mark.parametrize("style", STYLES)
def test_smollm2_tokenizer_ordinary_prompts_are_token_identical(style):
    tok = models.load_tokenizer(models.SMOLLM2)
    schema = AttributeSchema("steerable")
    template = chat_template.build(style, schema, tok.chat_template)
    assert chat_template.check(tok, style, schema, template) == []
    for messages in CONVERSATIONS.values():
        plain = [{k: v for k, v in m.items() if k != "attributes"} for m in messages]
        if any(text_of(m["content"]) != text_of(m["content"]).strip() for m in plain):
            continue  # whitespace at an edge: below
        want = chat_template.steerlm_prompt_ids(plain, {"humor": 3}, style, schema, tok)
        assert jinja_ids(tok, template, plain, attributes={"humor": 3}) == want
    for messages in WHITESPACE_EDGES:  # the text is always the same; only how whitespace runs merge may differ
        want = chat_template.steerlm_prompt_ids(messages, {"humor": 3}, style, schema, tok)
        got = jinja_ids(tok, template, messages, attributes={"humor": 3})
        assert tok.decode(got) == tok.decode(want)
        assert abs(len(got) - len(want)) <= 1

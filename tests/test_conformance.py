"""The server's OpenAI surface as a tested contract (docs/serve.md, "The OpenAI contract"; issue #15).

Every test talks to a live `steerlm serve` through the official `openai` client and checks a documented OpenAI
behaviour (or a documented deliberate difference): response shapes, what `usage` counts (each prompt once, whatever
`n`), `finish_reason` values, the order of streamed chunks with and without `stream_options.include_usage`, stop
strings that span tokens, `max_tokens` absent / at the edge of the context / past it, `seed`, and the error body of
unknown fields and wrong types (`param` spelt `messages[0].content`). The model is the tiny random LM saved as a
steerlm SFT folder with its context cut to 192 tokens, so the edge of the context is cheap to reach.
"""

from __future__ import annotations

import json

import openai
import pytest
import requests
from _serve_support import running, steerable_tiny

from steerlm.data import templates
from steerlm.data.records import Record, Turn
from steerlm.generator import Generator
from steerlm.serve import Config

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXT = 192
DEFAULT_MAX_TOKENS = 64
MODEL = "sft/best"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = steerable_tiny(tmp_path_factory.mktemp("conformance") / "sft" / "best")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": CONTEXT}))
    return folder


@pytest.fixture(scope="module")
def generator(model_dir):
    return Generator.load(str(model_dir))


@pytest.fixture(scope="module")
def server(model_dir, generator):
    cfg = Config(model=str(model_dir), default_max_tokens=DEFAULT_MAX_TOKENS, max_tokens=512, max_n=4,
                 batch_wait_ms=5)  # fmt: skip
    with running(cfg, generator) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def prompt_tokens(generator, text: str) -> int:
    """Tokens of the chat prompt the server builds for one user message (default levels)."""
    levels = generator.resolve_attributes({})
    return len(generator.prompt_ids(Record([Turn("User", text)], generator.system), levels))


def message_with_room(generator, room: int) -> str:
    """A user message whose chat prompt leaves exactly `room` tokens of the context."""
    target = CONTEXT - room
    for n in range(1, CONTEXT):
        for tail in ("", "!", " a", " a!", "!!", " a a"):
            text = " ".join(["sea"] * n) + tail
            if prompt_tokens(generator, text) == target:
                return text
    raise AssertionError(f"no message of {target} prompt tokens")


def error_of(excinfo) -> dict:
    return excinfo.value.body if isinstance(excinfo.value.body, dict) and "message" in excinfo.value.body else (
        excinfo.value.response.json()["error"])  # fmt: skip


# ---------------------------------------------------------------- shapes


def test_models_list_shape(client):
    page = client.models.list()
    assert [m.id for m in page.data] == [MODEL]
    m = page.data[0]
    assert m.object == "model" and isinstance(m.created, int) and m.owned_by == "steerlm"
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_completion_shape_and_usage(client, generator):
    text = "Tell me a joke."
    resp = client.chat.completions.create(model=MODEL, messages=user(text), max_tokens=5, temperature=0,
                                          extra_body={"min_tokens": 5})  # fmt: skip
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-") and resp.model == MODEL
    assert isinstance(resp.created, int) and len(resp.choices) == 1
    choice = resp.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant" and choice.logprobs is None
    assert choice.finish_reason == "length"  # 5 tokens forced, the budget reached
    assert resp.usage.prompt_tokens == prompt_tokens(generator, text)
    assert resp.usage.completion_tokens == 5 and resp.usage.total_tokens == resp.usage.prompt_tokens + 5


# ---------------------------------------------------------------- usage counts each prompt once (issue #15)


def test_chat_usage_counts_the_prompt_once_whatever_n(client, generator):
    text = "Tell me a joke about the sea and the sky."
    expected = prompt_tokens(generator, text)
    kwargs = dict(model=MODEL, messages=user(text), max_tokens=4, n=2, seed=1, extra_body={"min_tokens": 4})
    resp = client.chat.completions.create(**kwargs)
    assert len(resp.choices) == 2
    assert resp.usage.prompt_tokens == expected  # main: 2x
    assert resp.usage.completion_tokens == 8 and resp.usage.total_tokens == expected + 8
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[-1].usage.prompt_tokens == expected and chunks[-1].usage.completion_tokens == 8


def test_completions_usage_counts_each_prompt_once(client, generator):
    prompts = ["Hello there", "The quick brown fox jumps"]
    lengths = [len(templates.encode_text_segments([p], generator.tokenizer)) for p in prompts]
    kwargs = dict(model=MODEL, prompt=prompts, max_tokens=3, n=2, temperature=0, extra_body={"min_tokens": 3})
    resp = client.completions.create(**kwargs)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert resp.usage.prompt_tokens == sum(lengths)  # main: 2 x the sum
    assert resp.usage.completion_tokens == 12
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == sum(lengths)


# ---------------------------------------------------------------- streaming: chunk order


def test_chat_stream_chunk_order_with_n_and_include_usage(client):
    kwargs = dict(model=MODEL, messages=user("Why is the sea blue?"), max_tokens=6, temperature=0.9, seed=4, n=2)
    plain = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    *body, last = chunks
    assert last.choices == [] and last.usage is not None  # the totals come last, alone
    assert all(c.usage is None and len(c.choices) == 1 for c in body)  # one choice per chunk, usage null
    for i in range(2):
        mine = [c.choices[0] for c in body if c.choices[0].index == i]
        assert mine[0].delta.role == "assistant"  # the role first
        assert [c.finish_reason for c in mine[:-1]] == [None] * (len(mine) - 1)
        assert mine[-1].finish_reason == plain.choices[i].finish_reason  # the finish reason last
        assert "".join(c.delta.content or "" for c in mine) == plain.choices[i].message.content
    without = list(client.chat.completions.create(stream=True, **kwargs))
    assert all(c.usage is None and c.choices for c in without)  # no usage chunk unless asked for


def test_raw_stream_ends_with_done(server):
    r = requests.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "stream": True},
                      stream=True, timeout=60)  # fmt: skip
    events = [line for line in r.iter_lines(decode_unicode=True) if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


# ---------------------------------------------------------------- stop strings


def test_a_stop_string_across_tokens_cuts_the_answer_streaming_or_not(client, generator):
    kwargs = dict(model=MODEL, messages=user("Tell me a story."), temperature=0, max_tokens=40)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    pieces = [
        generator.tokenizer.decode([t]) for t in generator.tokenizer(full, add_special_tokens=False)["input_ids"]
    ]
    # a stop string made of the end of one token and the start of the next one
    i = next(i for i in range(3, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    stop = pieces[i][-1] + pieces[i + 1][:1]
    cut = full[: full.index(stop)]
    resp = client.chat.completions.create(stop=stop, **kwargs).choices[0]
    assert resp.message.content == cut and resp.finish_reason == "stop"
    streamed = list(client.chat.completions.create(stop=[stop, "\u00a7never"], stream=True, **kwargs))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut  # nothing leaked
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "stop"


# ---------------------------------------------------------------- max_tokens and the context (issue #15)


def test_without_max_tokens_the_default_shrinks_to_the_room_left(client, generator):
    room = DEFAULT_MAX_TOKENS // 2
    text = message_with_room(generator, room)
    # main: 422 "plus max_tokens (64) exceeds the model's context length", a value the client never sent
    resp = client.chat.completions.create(model=MODEL, messages=user(text), extra_body={"min_tokens": room})
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == room and resp.usage.total_tokens == CONTEXT
    # with room to spare the default itself applies
    short = client.chat.completions.create(model=MODEL, messages=user("Hi"),
                                           extra_body={"min_tokens": DEFAULT_MAX_TOKENS})  # fmt: skip
    assert short.usage.completion_tokens == DEFAULT_MAX_TOKENS


def test_an_explicit_max_tokens_at_and_past_the_edge_of_the_context(client, generator):
    room = 10
    text = message_with_room(generator, room)
    ok = client.chat.completions.create(model=MODEL, messages=user(text), max_tokens=room,
                                        extra_body={"min_tokens": room})  # fmt: skip
    assert ok.usage.total_tokens == CONTEXT and ok.choices[0].finish_reason == "length"
    ok = client.chat.completions.create(model=MODEL, messages=user(text), max_completion_tokens=room,
                                        extra_body={"min_tokens": room})  # fmt: skip
    assert ok.usage.completion_tokens == room
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(model=MODEL, messages=user(text), max_tokens=room + 1)
    err = error_of(e)
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    assert f"max_tokens ({room + 1})" in err["message"] and f"({CONTEXT})" in err["message"]


def test_a_prompt_that_fills_the_context_is_refused_without_blaming_max_tokens(client, generator):
    text = message_with_room(generator, 0)
    for extra in ({}, {"max_tokens": 1}):
        with pytest.raises(openai.UnprocessableEntityError) as e:
            client.chat.completions.create(model=MODEL, messages=user(text), **extra)
        err = error_of(e)
        assert err["code"] == "context_length_exceeded" and "leaves no room for an answer" in err["message"]
        assert "max_tokens" not in err["message"]


def test_completions_default_shrinks_too(client, generator):
    words = ["sea"]
    while len(templates.encode_text_segments([" ".join(words)], generator.tokenizer)) < CONTEXT - 7:
        words.append("sea")
    prompt = " ".join(words)
    room = CONTEXT - len(templates.encode_text_segments([prompt], generator.tokenizer))
    resp = client.completions.create(model=MODEL, prompt=prompt, extra_body={"min_tokens": room})
    assert resp.usage.completion_tokens == room and resp.choices[0].finish_reason == "length"


# ---------------------------------------------------------------- seed, n


def test_seed_makes_sampling_reproducible_and_n_choices_differ(client):
    kwargs = dict(model=MODEL, messages=user("Hi"), max_tokens=12, temperature=1.5, n=3, seed=7)
    a, b = client.chat.completions.create(**kwargs), client.chat.completions.create(**kwargs)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) == 3


# ---------------------------------------------------------------- errors: unknown fields, wrong types


BAD = [
    # (extra body, param, words in the message)
    ({"temprature": 0.5}, "temprature", "unknown field"),
    ({"temperature": "hot"}, "temperature", "valid number"),
    ({"max_tokens": "ten"}, "max_tokens", "valid integer"),
    ({"n": 0}, "n", "greater than or equal to 1"),
    ({"stop": 5}, "stop", "valid string"),
    ({"stream_options": {"include_usage": "maybe"}}, "stream_options.include_usage", "boolean"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "valid string"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "'user'"),
    ({"messages": [{"role": "user", "content": "  "}]}, "messages[0].content", "empty message"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]", "text parts"),
    (
        {"messages": [{"role": "user", "content": "hi", "attributes": {"humor": 1}}]},
        "messages[0].attributes",
        "only assistant messages",
    ),  # fmt: skip
    ({"logprobs": True}, "logprobs", "not supported"),
    ({"attributes": {"humr": 1}}, "attributes.humr", "unknown attribute"),
]


@pytest.mark.parametrize("extra,param,words", BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_bad_requests_name_the_field_openai_style(client, extra, param, words):
    body = {"messages": user("Hi"), "max_tokens": 2, **extra}
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(model=MODEL, messages=body.pop("messages"), extra_body=body)
    err = error_of(e)
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert err["message"].startswith(param + ":") and words in err["message"], err

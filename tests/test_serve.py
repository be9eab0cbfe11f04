"""`steerlm serve` driven as its users drive it: the official openai client, NeMo's /generate request shape (NVIDIA's
SteerLM tutorial), every 4xx path, the API key, a queue that fills up, a client that walks away mid-stream, and a
small concurrent load with zero 5xx. The model is the tiny random LM saved as a steerlm SFT folder; the server runs
under uvicorn in a thread on a free loopback port."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
from _serve_support import ATTRIBUTES, running, steerable_tiny, tiny_apm

from steerlm.apm_model import load_apm
from steerlm.batching import MAX_GUIDANCE_SCALE
from steerlm.data.records import DEFAULT_SYSTEM, Record, Turn
from steerlm.generator import Generator, SamplingArgs
from steerlm.serve import Config

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
# The prompt NVIDIA's SteerLM tutorial builds and sends to NeMo's server.
TUTORIAL_PROMPT = (
    "<extra_id_0>System\n" + DEFAULT_SYSTEM + "\n<extra_id_1>User\nWrite a poem about the sea.\n"
    "<extra_id_1>Assistant\n<extra_id_2>quality:4,toxicity:0,humor:0,creativity:0\n"
)
TUTORIAL_BODY = {"sentences": [TUTORIAL_PROMPT], "tokens_to_generate": 300, "temperature": 1.0, "add_BOS": False,
                 "top_k": 1, "top_p": 0.0, "greedy": True, "all_probs": False, "repetition_penalty": 1.0,
                 "min_tokens_to_generate": 2, "end_strings": ["<extra_id_1>"]}  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return steerable_tiny(tmp_path_factory.mktemp("serve") / "sft" / "best")


@pytest.fixture(scope="module")
def generator(model_dir):
    return Generator.load(str(model_dir))


@pytest.fixture(scope="module")
def apm(tmp_path_factory):
    return load_apm(tiny_apm(tmp_path_factory.mktemp("apm") / "apm"))


@pytest.fixture(scope="module")
def server(model_dir, generator, apm):
    cfg = Config(model=str(model_dir), api_key=KEY, attr=["humor=2"], max_tokens=2000, max_n=4, max_prompts=16,
                 max_prompt_tokens=600, max_body_bytes=50_000, batch_wait_ms=20)  # fmt: skip
    with running(cfg, generator, apm) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def chat(server, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=60, **kw)


def msgs(text="Tell me a joke."):
    return [{"role": "user", "content": text}]


# ---------------------------------------------------------------- info routes


def test_models_lists_the_attribute_schema_with_server_defaults(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["sft/best"]
    card = models.data[0].model_dump()
    assert card["attributes"] == {**ATTRIBUTES, "defaults": {"quality": 9, "toxicity": 0, "humor": 2, "creativity": 0}}
    assert card["template"] == "nemo" and card["apm"]["attributes"] == ATTRIBUTES
    assert requests.get(server.url + "/health", timeout=10).json()["status"] == "ok"


# ---------------------------------------------------------------- OpenAI chat completions


def test_chat_completion_with_attributes_through_the_openai_client(server, client, generator):
    resp = client.chat.completions.create(model="sft/best", messages=msgs(), max_tokens=12, temperature=0,
                                          extra_body={"attributes": {"humor": 7, "quality": 4}})  # fmt: skip
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-") and resp.model == "sft/best"
    choice = resp.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    # The server's steering levels are the request's over the server default (humor=2) over the schema's.
    assert resp.model_extra["attributes"] == {"quality": 4, "toxicity": 0, "humor": 7, "creativity": 0}
    # The answer is exactly what the shared Generator gives for the same conversation and levels.
    expected = generator.generate_full(["Tell me a joke."], {"humor": 7, "quality": 4},
                                       SamplingArgs(max_new_tokens=12, greedy=True))[0]  # fmt: skip
    assert choice.message.content == expected.text
    assert resp.usage.prompt_tokens == expected.prompt_tokens
    assert resp.usage.completion_tokens == len(expected.token_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_attributes_change_the_prompt_and_the_answer(client, generator):
    def answer(levels):
        return client.chat.completions.create(model="sft/best", messages=msgs("Hi"), max_tokens=16, temperature=0,
                                              extra_body={"attributes": levels}).choices[0].message.content  # fmt: skip

    def expected(levels):
        return generator.generate(["Hi"], levels, SamplingArgs(max_new_tokens=16, greedy=True))[0]

    assert answer({"humor": 0}) == expected({"humor": 0})
    assert answer({"humor": 9}) == expected({"humor": 9})
    assert answer({"humor": 0}) != answer({"humor": 9})
    assert answer({}) == expected({"humor": 2})  # the server default


def test_streaming_equals_the_plain_answer(client):
    kwargs = dict(model="sft/best", messages=msgs("Why is the sea blue?"), max_tokens=20, temperature=0.8, seed=11,
                  extra_body={"attributes": {"creativity": 5}})  # fmt: skip
    plain = client.chat.completions.create(**kwargs).choices[0]
    stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == plain.message.content and finishes == [plain.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_raw_sse_wire_format(server):
    r = chat(server, {"messages": msgs(), "max_tokens": 5, "stream": True}, stream=True)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line for line in r.iter_lines(decode_unicode=True) if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_n_seed_and_stop(client):
    kwargs = dict(model="sft/best", messages=msgs(), max_tokens=16, temperature=2.0, seed=5)
    a = client.chat.completions.create(n=3, **kwargs)
    b = client.chat.completions.create(n=3, **kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seeded: reproducible
    assert len({c.message.content for c in a.choices}) == 3  # the choices differ (seed + index)
    full = client.chat.completions.create(model="sft/best", messages=msgs(), max_tokens=30, temperature=0)
    text = full.choices[0].message.content
    stop = text[6:9]
    cut = client.chat.completions.create(model="sft/best", messages=msgs(), max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_multi_turn_history_and_system_prompt(client, generator):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!", "attributes": {"humor": 9}},
                {"role": "user", "content": "Tell me more."}]  # fmt: skip
    resp = client.chat.completions.create(model="sft/best", messages=messages, max_tokens=10, temperature=0)
    from steerlm.data.records import Record, Turn

    record = Record([Turn("User", "Hi"), Turn("Assistant", "Hello!", "quality:9,toxicity:0,humor:9,creativity:0"),
                     Turn("User", "Tell me more.")], "Be brief.")  # fmt: skip
    expected = generator.generate([record], {"humor": 2}, SamplingArgs(max_new_tokens=10, greedy=True))[0]
    assert resp.choices[0].message.content == expected


def test_attribute_guidance(client, generator):
    def answer(**extra):
        return client.chat.completions.create(model="sft/best", messages=msgs("Hi"), max_tokens=12, temperature=0,
                                              extra_body={"attributes": {"humor": 9}, **extra})  # fmt: skip

    guided = answer(guidance_scale=3.0).choices[0].message.content
    s = SamplingArgs(max_new_tokens=12, greedy=True, guidance_scale=3.0)
    assert guided == generator.generate(["Hi"], {"humor": 9}, s)[0]
    assert guided != answer().choices[0].message.content
    reference = answer(guidance_scale=3.0, guidance_reference="humor:0").choices[0].message.content
    s = SamplingArgs(max_new_tokens=12, greedy=True, guidance_scale=3.0, guidance_reference="humor:0")
    assert reference == generator.generate(["Hi"], {"humor": 9}, s)[0]
    middle = answer(guidance_scale=3.0, guidance_reference="middle").choices[0].message.content
    s = SamplingArgs(max_new_tokens=12, greedy=True, guidance_scale=3.0, guidance_reference="humor:4")
    assert middle == generator.generate(["Hi"], {"humor": 9}, s)[0]  # humor 9 asked: its middle is the reference


# ---------------------------------------------------------------- OpenAI completions


def test_completions_raw_and_steered(client, generator):
    raw = client.completions.create(model="sft/best", prompt=["Hello", "The sea"], max_tokens=8, temperature=0, n=2)
    assert raw.object == "text_completion" and [c.index for c in raw.choices] == [0, 1, 2, 3]
    expected = generator.complete(["Hello"], SamplingArgs(max_new_tokens=8, greedy=True))[0].text
    assert raw.choices[0].text == raw.choices[1].text == expected
    echo = client.completions.create(model="sft/best", prompt="Hello", max_tokens=8, temperature=0, echo=True)
    assert echo.choices[0].text == "Hello" + expected
    steered = client.completions.create(model="sft/best", prompt="Hello", max_tokens=8, temperature=0,
                                        extra_body={"attributes": {"humor": 9}})  # fmt: skip
    assert steered.choices[0].text == generator.generate(["Hello"], {"humor": 9},
                                                         SamplingArgs(max_new_tokens=8, greedy=True))[0]  # fmt: skip
    stream = client.completions.create(model="sft/best", prompt="Hello", max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == expected


# ---------------------------------------------------------------- NeMo /generate


def test_nemo_generate_with_the_tutorial_request(server, generator):
    r = requests.put(server.url + "/generate", json=TUTORIAL_BODY, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    sentence = out["sentences"][0]
    assert sentence.startswith(TUTORIAL_PROMPT)  # the tutorial slices the answer off with len(prompt)
    answer = sentence[len(TUTORIAL_PROMPT) :]
    expected = generator.complete([TUTORIAL_PROMPT], SamplingArgs(max_new_tokens=300, greedy=True, min_new_tokens=2,
                                                                  stop=["<extra_id_1>"]))[0]  # fmt: skip
    assert answer.removesuffix("<extra_id_1>") == expected.text
    prompt_ids = generator.tokenizer(TUTORIAL_PROMPT, add_special_tokens=False)["input_ids"]
    assert out["token_ids"][0][: len(prompt_ids)] == prompt_ids
    assert out["tokens"][0] == generator.tokenizer.convert_ids_to_tokens(out["token_ids"][0])
    assert "full_logprob" not in out  # as NeMo: only with all_probs


def test_nemo_generate_end_strings_defaults_and_unknown_fields(server, generator):
    prompts = ["Hello", "The quick brown fox"]
    full = [generator.complete([p], SamplingArgs(max_new_tokens=40, greedy=True))[0].text for p in prompts]
    end = full[0][10:12]
    body = {"sentences": prompts, "tokens_to_generate": 40, "greedy": True, "end_strings": [end],
            "compute_logprob": False, "all_probs": True, "neighbors": 2, "task_ids": None}  # fmt: skip
    r = requests.put(server.url + "/generate", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    # NeMo keeps the end string in the sentence (the tutorial strips it).
    assert out["sentences"][0] == prompts[0] + full[0][: full[0].index(end) + len(end)]
    assert out["sentences"][1].startswith(prompts[1]) and "full_logprob" in out
    # Defaults (64 tokens, temperature 1.0, top_p 0.9) and a seed: reproducible samples.
    body = {"sentences": ["Hello"], "random_seed": 3}
    a, b = (requests.put(server.url + "/generate", json=body, headers=AUTH, timeout=60).json() for _ in range(2))
    prompt_len = len(generator.tokenizer("Hello", add_special_tokens=False)["input_ids"])
    assert a["sentences"] == b["sentences"] and len(a["token_ids"][0]) - prompt_len <= 64


# ---------------------------------------------------------------- APM scoring


def test_score_with_the_apm(server, apm):
    items = [{"messages": msgs("Tell me a joke."), "response": "Why did the chicken cross the road?"},
             {"messages": msgs("Tell me a joke."), "response": "No."}]  # fmt: skip
    r = requests.post(server.url + "/v1/attributes/score", json={"items": items}, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    preds = apm.predict([("Tell me a joke.", "Why did the chicken cross the road?"), ("Tell me a joke.", "No.")])
    for entry, pred in zip(data, preds, strict=True):
        assert set(entry["scores"]) == set(ATTRIBUTES["names"])
        for name, s in entry["scores"].items():
            assert s["value"] == pytest.approx(pred[name], abs=1e-3)
            assert s["level"] == min(9, max(0, round(pred[name])))
        assert entry["label"].startswith("quality:")


def test_score_without_apm_is_a_clear_404(model_dir, generator):
    with running(Config(model=str(model_dir)), generator) as live:
        r = requests.post(live.url + "/v1/attributes/score", json={"items": []}, timeout=30)
        assert r.status_code == 404 and "--apm" in r.json()["error"]["message"]
        # Without --api_key nothing asks for one.
        assert requests.get(live.url + "/v1/models", timeout=30).status_code == 200


# ---------------------------------------------------------------- errors: every invalid request gets a 4xx JSON


BAD = [
    # (method, path, body or raw bytes, status, words in the message)
    ("POST", "/v1/chat/completions", {"messages": msgs(), "attributes": {"humr": 3}}, 422, "unknown attribute 'humr'"),
    ("POST", "/v1/chat/completions", {"messages": msgs(), "attributes": {"humor": 10}}, 422, "out of range 0..9"),
    ("POST", "/v1/chat/completions", {"messages": msgs(), "attributes": {"humor": "lots"}}, 422, "integer"),
    ("POST", "/v1/chat/completions", {"messages": msgs(), "attributes": {"humor": -1}}, 422, "out of range"),
    ("POST", "/v1/chat/completions", b"{not json", 400, "not valid JSON"),
    ("POST", "/v1/chat/completions", b"", 400, "empty"),
    ("POST", "/v1/chat/completions", [1, 2], 422, "JSON object"),
    ("POST", "/v1/chat/completions", {}, 422, "messages: required"),
    ("POST", "/v1/chat/completions", {"messages": []}, 422, "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 422, "role"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "  "}]}, 422, "empty message"),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": [*msgs(), {"role": "assistant", "content": "Hi"}]},
        422,
        "last message must be the user's",
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        422,
        "only text parts",
    ),
    ("POST", "/v1/chat/completions", {"messages": msgs(), "max_tokens": 5000}, 422, "max_tokens"),
    ("POST", "/v1/chat/completions", {"messages": msgs(), "max_tokens": 0}, 422, "max_tokens"),
    ("POST", "/v1/chat/completions", {"messages": msgs(), "n": 9}, 422, "n: 9"),
    ("POST", "/v1/chat/completions", {"messages": msgs(), "temperature": 3}, 422, "temperature"),
    ("POST", "/v1/chat/completions", {"messages": msgs(), "top_p": 0}, 422, "top_p"),
    ("POST", "/v1/chat/completions", {"messages": msgs(), "min_tokens": 50, "max_tokens": 10}, 422, "min_tokens"),
    ("POST", "/v1/chat/completions", {"messages": msgs(), "temprature": 0.5}, 422, "temprature: unknown field"),
    ("POST", "/v1/chat/completions", {"messages": msgs(), "logprobs": True}, 422, "logprobs: not supported"),
    ("POST", "/v1/chat/completions", {"messages": msgs(), "tools": [{"type": "function"}]}, 422, "tools"),
    ("POST", "/v1/chat/completions", {"messages": msgs(), "stop": [""]}, 422, "stop"),
    ("POST", "/v1/chat/completions", {"messages": msgs(), "model": "gpt-4"}, 404, "serves 'sft/best'"),
    ("POST", "/v1/chat/completions", {"messages": msgs("word " * 700)}, 422, "at most 600"),
    ("POST", "/v1/chat/completions", {"messages": msgs("x" * 60_000)}, 413, "too large"),
    ("POST", "/v1/chat/completions", {"messages": msgs(), "guidance_scale": 101}, 422, "guidance_scale"),
    ("POST", "/v1/chat/completions", {"messages": msgs(), "guidance_plausibility": 1}, 422, "guidance_plausibility"),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": msgs(), "guidance_reference_plausibility": -0.5},
        422,
        "guidance_reference_plausibility",
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": msgs(), "guidance_scale": 2, "guidance_reference": "humr:1"},
        422,
        "guidance_reference",
    ),
    ("POST", "/v1/completions", {"prompt": "Hi", "guidance_scale": 2}, 422, "guidance needs `attributes`"),
    ("POST", "/v1/completions", {"prompt": []}, 422, "prompt"),
    ("POST", "/v1/completions", {"prompt": ["a"] * 17}, 422, "1 to 16 prompts"),
    ("POST", "/v1/completions", {"prompt": "Hi", "suffix": "x"}, 422, "suffix"),
    ("POST", "/v1/chat/completions", {"messages": msgs(), "max_tokens": 1990}, 422, "context length (2048)"),
    ("PUT", "/generate", {"sentences": ["Hi"], "temperature": 0}, 422, "temperature"),
    ("PUT", "/generate", {"sentences": ["Hi"], "temperature": 101}, 422, "temperature"),
    ("PUT", "/generate", {"sentences": ["Hi"], "repetition_penalty": 0.5}, 422, "repetition_penalty"),
    ("PUT", "/generate", {"sentences": ["Hi"], "tokens_to_generate": 0}, 422, "tokens_to_generate"),
    ("PUT", "/generate", {"sentences": ["Hi"], "tokens_to_generate": 2.5}, 422, "tokens_to_generate"),
    ("PUT", "/generate", {"sentences": ["Hi"], "top_p": 1.5}, 422, "top_p"),
    ("PUT", "/generate", {"sentences": ["Hi"], "top_k": -1}, 422, "top_k"),
    ("PUT", "/generate", {"sentences": ["Hi"], "greedy": "yes"}, 422, "greedy"),
    ("PUT", "/generate", {"sentences": ["Hi"], "end_strings": "x"}, 422, "end_strings"),
    (
        "PUT",
        "/generate",
        {"sentences": ["Hi"], "min_tokens_to_generate": 99, "tokens_to_generate": 5},
        422,
        "min_tokens_to_generate",
    ),
    ("PUT", "/generate", {"sentences": []}, 422, "sentences"),
    ("PUT", "/generate", {"sentences": ["Hi"] * 17}, 422, "at most 16"),
    ("PUT", "/generate", {"tokens_to_generate": 5}, 422, "sentences: required"),
    ("PUT", "/generate", {"sentences": [""]}, 422, "empty prompt"),
    ("POST", "/generate", {"sentences": ["Hi"]}, 405, "not allowed"),
    ("GET", "/v1/chat/completions", None, 405, "not allowed"),
    ("GET", "/v1/nothing", None, 404, "no such route"),
    ("POST", "/v1/attributes/score", {"items": [{"messages": msgs(), "response": ""}]}, 422, "empty response"),
    ("POST", "/v1/attributes/score", {"items": []}, 422, "items"),
    ("POST", "/v1/attributes/score", {"items": [{"messages": msgs()}]}, 422, "response: required"),
]


@pytest.mark.parametrize("method,path,body,status,words", BAD, ids=[f"{b[0]} {b[1]} {b[4]}" for b in BAD])
def test_invalid_requests_get_a_4xx_json_error(server, method, path, body, status, words):
    kwargs = {"data": body, "headers": {**AUTH, "Content-Type": "application/json"}} if isinstance(body, bytes) else {
        "json": body, "headers": AUTH}  # fmt: skip
    r = requests.request(method, server.url + path, timeout=60, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words.lower() in error["message"].lower(), error
    assert error["type"]


def test_content_type_must_be_json(server):
    r = requests.post(server.url + "/v1/chat/completions", data=json.dumps({"messages": msgs()}),
                      headers={**AUTH, "Content-Type": "text/plain"}, timeout=30)  # fmt: skip
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]


def test_openai_client_sees_422_for_a_bad_attribute(client):
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(model="sft/best", messages=msgs(), extra_body={"attributes": {"humour": 1}})
    assert "unknown attribute 'humour'" in str(e.value)


# ---------------------------------------------------------------- the API key


@pytest.mark.parametrize("path,method", [("/v1/models", "GET"), ("/v1/chat/completions", "POST"),
                                         ("/v1/completions", "POST"), ("/generate", "PUT"),
                                         ("/v1/attributes/score", "POST"), ("/metrics", "GET")])  # fmt: skip
def test_every_api_route_needs_the_key(server, path, method):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic " + KEY}):
        r = requests.request(method, server.url + path, json={}, headers=headers, timeout=30)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"], (headers, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
    assert requests.request(method, server.url + path, json={}, headers=AUTH, timeout=30).status_code != 401


def test_the_page_and_health_need_no_key(server):
    page = requests.get(server.url + "/", timeout=30)
    assert page.status_code == 200 and 'id="api-key"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert requests.get(server.url + "/static/app.js", timeout=30).status_code == 200
    assert requests.get(server.url + "/health", timeout=30).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()


# ---------------------------------------------------------------- queue, disconnects, load, metrics


def metrics(server):
    return requests.get(server.url + "/metrics?format=json", headers=AUTH, timeout=30).json()


def test_a_full_queue_answers_429(model_dir, generator):
    cfg = Config(model=str(model_dir), max_batch_size=1, max_queue=1, max_tokens=2000, batch_wait_ms=0)
    with running(cfg, generator) as live:
        # Streamed, so that each status arrives at once; one answer runs, one waits, the others are refused.
        body = {"prompt": "Hello", "max_tokens": 1500, "min_tokens": 1500, "stream": True}

        def send(_):
            return requests.post(live.url + "/v1/completions", json=body, timeout=120, stream=True)

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(send, range(4)))
        codes = sorted(r.status_code for r in answers)
        busy = [(r.headers, r.json()) for r in answers if r.status_code == 429]
        for r in answers:
            r.close()
        assert codes == [200, 200, 429, 429], codes
        headers, body = busy[0]
        assert headers["retry-after"] == "1" and "busy" in body["error"]["message"]


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    before = metrics(server)
    body = {"prompt": "Hello", "max_tokens": 1900, "min_tokens": 1900, "stream": True}
    r = requests.post(server.url + "/v1/completions", json=body, headers=AUTH, stream=True, timeout=60)
    lines = r.iter_lines()
    assert next(line for line in lines if line).startswith(b"data: ")
    r.close()  # the client goes away
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = metrics(server)
        if now["running"] == 0 and now["answers_cancelled"] > before["answers_cancelled"]:
            break
        time.sleep(0.05)
    assert now["running"] == 0 and now["answers_cancelled"] == before["answers_cancelled"] + 1
    assert now["generated_tokens"] - before["generated_tokens"] < 1900  # generation stopped early


def test_load_is_batched_and_never_5xx(server):
    """64 mixed requests from 16 concurrent clients (bounded: max 16-24 tokens each, 120 s): no 5xx, batches > 1."""
    before = metrics(server)

    def one(i):
        kind = i % 4
        if kind == 0:
            return chat(
                server, {"messages": msgs(f"Question {i}?"), "max_tokens": 16, "attributes": {"humor": i % 10}}
            )
        if kind == 1:
            r = chat(server, {"messages": msgs(f"Story {i}"), "max_tokens": 16, "stream": True}, stream=True)
            body = r.content
            assert r.status_code != 200 or body.endswith(b"data: [DONE]\n\n")
            return r
        if kind == 2:
            return requests.put(server.url + "/generate", json={"sentences": [f"Hi {i}"], "tokens_to_generate": 24},
                                headers=AUTH, timeout=60)  # fmt: skip
        return requests.post(server.url + "/v1/completions", json={"prompt": f"Once {i}", "max_tokens": 16, "n": 2},
                             headers=AUTH, timeout=60)  # fmt: skip

    start = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(64)))
    elapsed = time.monotonic() - start
    assert all(r.status_code == 200 for r in answers), sorted({r.status_code for r in answers})
    assert elapsed < 120
    after = metrics(server)
    assert after["max_batch_size"] > 1 and after["mean_batch_size"] > 1
    served = {(e["route"], e["status"]): e["count"] for e in after["requests"]}
    assert not any(status >= 500 for _, status in served)
    assert after["completion_tokens"] > before["completion_tokens"]


def test_metrics_report_counts_tokens_queue_and_latency(server, client):
    client.chat.completions.create(model="sft/best", messages=msgs(), max_tokens=4)
    snap = metrics(server)
    for key in ("requests_total", "completion_tokens", "prompt_tokens", "queue_length", "running", "latency_s",
                "time_to_first_token_s", "mean_batch_size"):  # fmt: skip
        assert key in snap
    lat = snap["latency_s"]["/v1/chat/completions"]
    assert lat["count"] > 0 and 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
    text = requests.get(server.url + "/metrics", headers=AUTH, timeout=30).text
    assert 'steerlm_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'steerlm_request_latency_seconds{route="all",quantile="0.99"}' in text
    assert "steerlm_queue_length 0" in text


def test_cli_config_checks_limits():
    with pytest.raises(ValueError, match="max_batch_size"):
        Config(model="tiny-lm", max_batch_size=0)
    with pytest.raises(ValueError, match="default_max_tokens"):
        Config(model="tiny-lm", max_tokens=10, default_max_tokens=20)


def test_server_defaults_are_validated(model_dir, generator):
    from steerlm.errors import UserError
    from steerlm.serve import create_app

    with pytest.raises(UserError, match="unknown attribute 'funny'"):
        create_app(Config(model=str(model_dir), attr=["funny=3"]), generator=generator)
    with pytest.raises(UserError, match="guidance_reference: .*unknown attribute 'funny'"):
        create_app(Config(model=str(model_dir), guidance_scale=2, guidance_reference="funny:3"), generator=generator)
    with pytest.raises(ValueError, match="guidance_scale must be in"):
        Config(model=str(model_dir), guidance_scale=-1)
    with pytest.raises(ValueError, match="guidance_scale must be in"):
        Config(model=str(model_dir), guidance_scale=MAX_GUIDANCE_SCALE + 1)
    with pytest.raises(ValueError, match="guidance_plausibility must be in"):
        Config(model=str(model_dir), guidance_plausibility=1)
    plain = Generator.load("tiny-lm")
    with pytest.raises(UserError, match="takes no attribute guidance"):
        create_app(Config(model="tiny-lm", guidance_scale=2), generator=plain)


def test_the_models_saved_guidance_is_the_server_default(model_dir, generator, monkeypatch):
    """A model saved with guidance (`steerlm sft --guidance_scale`) is served guided by default; a flag overrides
    the scale and keeps the model's reference."""
    monkeypatch.setattr(generator, "guidance", (3.0, "middle"))
    with running(Config(model=str(model_dir)), generator) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        card = client.models.list().data[0].model_dump()
        assert card["default_guidance"] == {"scale": 3.0, "reference": "middle", "plausibility": 0.1,
                                            "reference_plausibility": 0.01}  # fmt: skip
        resp = client.chat.completions.create(model="sft/best", messages=msgs("Hi"), max_tokens=12, temperature=0,
                                              extra_body={"attributes": {"humor": 0}})  # fmt: skip
        guided = SamplingArgs(max_new_tokens=12, greedy=True, guidance_scale=3.0, guidance_reference="humor:4")
        assert resp.choices[0].message.content == generator.generate(["Hi"], {"humor": 0}, guided)[0]
    with running(Config(model=str(model_dir), guidance_scale=1), generator) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert client.models.list().data[0].model_dump()["default_guidance"]["scale"] == 1.0


def test_server_guidance_defaults_apply_to_steered_requests_only(model_dir, generator):
    """`--guidance_scale 5 --guidance_reference middle`: a chat request that sets no guidance is guided as if it
    asked for it, one that sets its own keeps it, and a raw completion prompt (no attribute line) is not guided."""
    cfg = Config(model=str(model_dir), guidance_scale=5, guidance_reference="middle")
    with running(cfg, generator) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert client.models.list().data[0].model_dump()["default_guidance"] == {
            "scale": 5.0, "reference": "middle", "plausibility": 0.1, "reference_plausibility": 0.01}  # fmt: skip

        def answer(**extra):
            resp = client.chat.completions.create(model="sft/best", messages=msgs("Hi"), max_tokens=12, temperature=0,
                                                  extra_body={"attributes": {"humor": 0}, **extra})  # fmt: skip
            return resp.choices[0].message.content

        guided = SamplingArgs(max_new_tokens=12, greedy=True, guidance_scale=5.0, guidance_reference="humor:4")
        assert answer() == generator.generate(["Hi"], {"humor": 0}, guided)[0]
        plain = generator.generate(["Hi"], {"humor": 0}, SamplingArgs(max_new_tokens=12, greedy=True))[0]
        assert plain != answer()
        assert answer(guidance_scale=1) == plain
        raw = client.completions.create(model="sft/best", prompt="Hello", max_tokens=8, temperature=0)
        assert (
            raw.choices[0].text == generator.complete(["Hello"], SamplingArgs(max_new_tokens=8, greedy=True))[0].text
        )
        steered = client.completions.create(model="sft/best", prompt="Hi", max_tokens=12, temperature=0,
                                            extra_body={"attributes": {"humor": 0}})  # fmt: skip
        assert steered.choices[0].text == generator.generate(["Hi"], {"humor": 0}, guided)[0]
        # Each field left unset takes its server default: a scale alone is still guided against the middle.
        assert answer(guidance_scale=5) == answer()
        unconditional = SamplingArgs(max_new_tokens=12, greedy=True, guidance_scale=5.0)
        assert answer(guidance_reference="") == generator.generate(["Hi"], {"humor": 0}, unconditional)[0]
        # ... and so do the plausibility constraints: a request may turn them off
        loose = SamplingArgs(max_new_tokens=12, greedy=True, guidance_scale=5.0, guidance_reference="humor:4",
                             guidance_plausibility=0, guidance_reference_plausibility=0)  # fmt: skip
        off = answer(guidance_plausibility=0, guidance_reference_plausibility=0)
        assert off == generator.generate(["Hi"], {"humor": 0}, loose)[0]


def test_concurrent_requests_share_batches_and_keep_answers(server, client):
    """The same seeded requests give the same answers whether sent alone or together."""
    prompts = [f"Tell me about {w}." for w in ("cats", "the moon", "rain", "Paris", "music", "trees")]

    def ask(p):
        return client.chat.completions.create(model="sft/best", messages=msgs(p), max_tokens=20, temperature=1.0,
                                              seed=42).choices[0].message.content  # fmt: skip

    alone = [ask(p) for p in prompts]
    barrier = threading.Barrier(len(prompts))

    def together(p):
        barrier.wait()
        return ask(p)

    with ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(together, prompts)) == alone


# ---------------------------------------------------------------- counting and defaults (issue #15)


def test_metrics_count_each_prompt_once_whatever_n(server, client, generator):
    before = metrics(server)["prompt_tokens"]
    resp = client.chat.completions.create(model="sft/best", messages=msgs("Count me once."), max_tokens=2, n=3)
    expected = len(generator.prompt_ids(Record([Turn("User", "Count me once.")], generator.system),
                                        generator.resolve_attributes({"humor": 2})))  # fmt: skip
    assert resp.usage.prompt_tokens == expected
    assert metrics(server)["prompt_tokens"] - before == expected  # main: 3x


def test_nemo_default_tokens_to_generate_shrinks_to_the_room_left(tmp_path, generator):
    folder = steerable_tiny(tmp_path / "short")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 96}))
    short = Generator.load(str(folder))
    prompt = "the sea " * 20
    n_prompt = len(short.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert 96 - 64 < n_prompt < 96  # less room than NeMo's default of 64 tokens
    with running(Config(model=str(folder)), short) as live:
        body = {"sentences": [prompt], "greedy": True, "min_tokens_to_generate": 96 - n_prompt}
        r = requests.put(live.url + "/generate", json=body, timeout=60)
        assert r.status_code == 200, r.text  # main: 422 "plus tokens_to_generate (64) exceeds ..."
        assert len(r.json()["token_ids"][0]) == 96
        r = requests.put(live.url + "/generate", json={**body, "tokens_to_generate": 64}, timeout=60)
        assert r.status_code == 422 and "tokens_to_generate (64)" in r.json()["error"]["message"]

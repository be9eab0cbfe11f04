"""batching.Engine: batched, joined and cancelled rows give the answers a lone HF `generate` gives."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from steerlm import models
from steerlm.batching import DONE, TEXT, Engine, QueueFull, Row, _safe_length
from steerlm.generator import SamplingArgs

PROMPTS = ["Hello there, how are you?", "<extra_id_1>User\nWhat is the capital of France?\n<extra_id_1>Assistant\n",
           "Tell me a joke.", "def main():\n    print(", "Why"]  # fmt: skip


@pytest.fixture(scope="module")
def lm():
    """The tiny LM with an untied random head, so that answers depend on the whole context."""
    model, tokenizer = models.tiny_causal_lm(0)
    model.config.tie_word_embeddings = False
    rng = torch.Generator().manual_seed(0)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape, generator=rng) * 2)
    return model, tokenizer


class Sink:
    def __init__(self):
        self.pieces, self.done, self.event = [], None, threading.Event()

    def __call__(self, kind, payload):
        if kind == TEXT:
            self.pieces.append(payload)
        elif kind == DONE:
            self.done = payload
            self.event.set()
        else:
            self.done = payload
            self.event.set()


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def hf_greedy(model, tokenizer, text, n):
    x = torch.tensor([ids(tokenizer, text)])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return out[0, x.shape[1] :].tolist()


def run(engine, rows, timeout=30):
    engine.submit(rows)
    for row in rows:
        assert row.sink.event.wait(timeout), "a row did not finish"
    return [row.sink.done for row in rows]


@pytest.fixture
def engine(lm):
    eng = Engine(*lm, max_batch_size=8, max_queue=16, batch_wait_s=0.05)
    eng.start()
    yield eng
    eng.stop()


def greedy(n, **kw):
    return SamplingArgs(max_new_tokens=n, min_new_tokens=n, greedy=True, **kw)


def test_batched_greedy_equals_lone_hf_generate(lm, engine):
    model, tok = lm
    rows = [Row(ids(tok, p), greedy(12 + 3 * i), Sink()) for i, p in enumerate(PROMPTS)]
    results = run(engine, rows)
    for i, (p, r) in enumerate(zip(PROMPTS, results, strict=True)):
        assert r.token_ids == hf_greedy(model, tok, p, 12 + 3 * i), p
        assert r.finish_reason == "length"
    # Rows of different lengths were padded into one batch.
    assert engine.stats.max_batch == len(PROMPTS)


def test_rows_joining_a_running_batch_get_the_same_answers(lm, engine):
    model, tok = lm
    first = Row(ids(tok, PROMPTS[0]), greedy(60), Sink())
    engine.submit([first])
    while not first.tokens:  # the batch is running
        time.sleep(0.001)
    late = [Row(ids(tok, p), greedy(10), Sink()) for p in PROMPTS[1:]]
    results = run(engine, late)
    assert first.sink.event.wait(30)
    assert first.sink.done.token_ids == hf_greedy(model, tok, PROMPTS[0], 60)
    for p, r in zip(PROMPTS[1:], results, strict=True):
        assert r.token_ids == hf_greedy(model, tok, p, 10), p
    assert engine.stats.max_batch > 1  # they did join


def test_decode_refills_the_batch_as_answers_finish(lm):
    """`Engine.decode(rows, max_batch_size)`: never more answers at once than the limit (shadows not counted), the
    next rows join as others finish (one long answer does not hold the rest back), and every answer is the one a
    lone HF `generate` gives."""
    model, tok = lm
    eng = Engine(model, tok)
    lengths = [40, 4, 4, 4, 4]
    rows = [Row(ids(tok, p), greedy(n)) for p, n in zip(PROMPTS, lengths, strict=True)]
    rows[1].guide(ids(tok, PROMPTS[0]))  # a guided answer: its shadow rides along, outside the count
    steps = sum(1 for _ in eng.decode(rows, max_batch_size=2))
    assert steps == 40  # fixed batches of 2 would take 40 + 4 + 4 steps
    assert eng.stats.max_batch == 3  # two answers and one shadow
    for p, n, r in zip(PROMPTS, lengths, rows, strict=True):
        if r.shadow is None:
            assert r.tokens == hf_greedy(model, tok, p, n), p
    assert all(r.finish_reason == "length" for r in rows)


def test_seeded_sampling_does_not_depend_on_batch_mates(lm, engine):
    _, tok = lm
    s = SamplingArgs(max_new_tokens=20, min_new_tokens=20, temperature=2.0, top_p=0.95, top_k=50, seed=7,
                     repetition_penalty=1.2)  # fmt: skip
    alone = run(engine, [Row(ids(tok, PROMPTS[1]), s, Sink())])[0]
    mates = [Row(ids(tok, p), SamplingArgs(max_new_tokens=15, seed=i), Sink()) for i, p in enumerate(PROMPTS)]
    together = run(engine, [*mates[:2], Row(ids(tok, PROMPTS[1]), s, Sink()), *mates[2:]])[2]
    assert together.token_ids == alone.token_ids
    other_seed = run(engine, [Row(ids(tok, PROMPTS[1]), SamplingArgs(**{**s.__dict__, "seed": 8}), Sink())])[0]
    assert other_seed.token_ids != alone.token_ids


def test_stream_pieces_join_to_the_answer_and_stop_strings_end_it(lm, engine):
    _, tok = lm
    full = run(engine, [Row(ids(tok, PROMPTS[2]), greedy(30), Sink())])[0]
    stop = full.text[8:11]
    cut = full.text.index(stop)
    row = Row(ids(tok, PROMPTS[2]), SamplingArgs(max_new_tokens=30, greedy=True, stop=[stop]), Sink())
    stopped = run(engine, [row])[0]
    assert stopped.text == full.text[:cut] and stopped.finish_reason == "stop"
    assert "".join(row.sink.pieces) == stopped.text
    kept = run(engine, [Row(ids(tok, PROMPTS[2]), SamplingArgs(max_new_tokens=30, greedy=True, stop=[stop]), Sink(),
                            include_stop=True)])[0]  # fmt: skip
    assert kept.text == full.text[: cut + len(stop)]


def test_cancelled_rows_leave_the_batch(lm, engine):
    _, tok = lm
    doomed = Row(ids(tok, PROMPTS[0]), greedy(1500), Sink())
    keeper = Row(ids(tok, PROMPTS[1]), greedy(40), Sink())
    engine.submit([doomed, keeper])
    while len(doomed.tokens) < 3:
        time.sleep(0.001)
    doomed.cancel()
    assert keeper.sink.event.wait(30)
    deadline = time.monotonic() + 10
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.running == 0 and not doomed.sink.event.is_set()
    assert len(doomed.tokens) < 1500 and engine.stats.rows_cancelled == 1


def test_queue_bound(lm):
    eng = Engine(*lm, max_queue=2)  # not started: nothing leaves the queue
    _, tok = lm
    eng.submit([Row([1, 2], greedy(2), Sink()) for _ in range(2)])
    with pytest.raises(QueueFull):
        eng.submit([Row([1, 2], greedy(2), Sink())])
    assert eng.queue_length == 2


def test_safe_length_holds_back_possible_stop_prefixes():
    assert _safe_length("abc<extra", ["<extra_id_1>"], False) == 3
    assert _safe_length("abc\n", ["<extra_id_1>"], True) == 3
    assert _safe_length("abc\ufffd", [], False) == 3
    assert _safe_length("abcdef", ["xyz"], False) == 6


@pytest.mark.parametrize("top_k,top_p,temperature,flat", [(0, 0.9, 0.7, False), (50, 1.0, 1.0, False),
                                                          (20, 0.5, 1.3, False), (0, 0.95, 1.0, True),
                                                          (0, 1.0, 1.0, False)])  # fmt: skip
def test_sampling_draws_only_from_the_hf_processors_support(top_k, top_p, temperature, flat):
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from steerlm.batching import sample

    gen = torch.Generator().manual_seed(0)
    # A peaked distribution over 5000 tokens, or a flat one (its nucleus is wider than the topk shortcut).
    logits = torch.randn(1, 5000, generator=gen) * (0.01 if flat else 4.0)
    ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    support = set(torch.nonzero(ref[0] > float("-inf")).flatten().tolist())
    rows = [Row([1], SamplingArgs(max_new_tokens=5, temperature=temperature, top_k=top_k, top_p=top_p, seed=s),
                None) for s in range(200)]  # fmt: skip
    drawn = sample(logits.repeat(len(rows), 1), rows, eos_ids=[]).tolist()
    assert set(drawn) <= support
    assert len(set(drawn)) > 1  # it does sample
    greedy_row = Row([1], SamplingArgs(max_new_tokens=5, greedy=True), None)
    assert sample(logits, [greedy_row], eos_ids=[]).item() == int(logits.argmax())


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_generator_and_the_server_engine_give_the_same_greedy_answers(lm, engine, scale):
    """One decoding engine: `Generator.generate_full` and rows submitted to the server's worker (built as serve builds
    them: the template's stop strings, the newline before the end dropped) give the same tokens, text and finish
    reasons, plain and with attribute guidance against the neutral prompt (a shadow row in the same batch)."""
    from dataclasses import replace

    from steerlm.attributes import AttributeSchema
    from steerlm.generator import Generator

    model, tok = lm
    gen = Generator(model, tok, schema=AttributeSchema(("quality", "humor"), 10), template="chat",
                    conditioning="attributes")  # fmt: skip
    prompts = ["Tell me a joke.", "Hi", "What is the capital of France?"]
    s = SamplingArgs(max_new_tokens=16, greedy=True, guidance_scale=scale)
    expected = gen.generate_full(prompts, {"humor": 9}, s, batch_size=2)
    if scale != 1.0:  # guidance does change the answers
        plain = gen.generate_full(prompts, {"humor": 9}, replace(s, guidance_scale=1.0), batch_size=2)
        assert [e.token_ids for e in expected] != [p.token_ids for p in plain]
    rows = []
    for p in prompts:
        row = Row(gen.prompt_ids(p, {"humor": 9}), replace(s, stop=gen.stop_strings(s)), Sink(), strip_newline=True)
        rows.append(row.guide(gen.neutral_ids(p, s)) if gen.guided(s) else row)
    rows.insert(1, Row(ids(tok, PROMPTS[3]), greedy(20), Sink()))  # an unguided stranger in the same batch
    results = run(engine, rows)
    assert results.pop(1).token_ids == hf_greedy(model, tok, PROMPTS[3], 20)
    assert [(r.token_ids, r.text, r.finish_reason) for r in results] == [
        (e.token_ids, e.text, e.finish_reason) for e in expected
    ]
    assert engine.stats.max_batch == (7 if scale != 1.0 else 4) and engine.stats.rows_started == 4


def test_guide_adds_a_shadow_row_only_for_another_prompt():
    # a neutral prompt equal to the row's own (guidance_reference 'middle' naming nothing) would change no logit
    s = SamplingArgs(max_new_tokens=4, greedy=True, guidance_scale=2.0)
    same = Row([1, 2, 3], s).guide([1, 2, 3])
    assert same.shadow is None
    other = Row([1, 2, 3], s).guide([1, 2])
    assert other.shadow is not None and other.shadow.prompt_ids == [1, 2] and other.shadow.main is other

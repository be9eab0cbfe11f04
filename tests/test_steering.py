"""Issue #8, making steering work at small scale: the computed `verbosity` attribute, attribute guidance at inference,
and the SFT levers (label dropout, sibling batches, oversampling, the flip-gap metric). docs/steering.md."""

import gzip
import json
from collections import Counter
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from steerlm import cli, conditioning, models, prepare, sft, train
from steerlm.attributes import AttributeSchema, LengthBuckets, word_count
from steerlm.batching import MAX_GUIDANCE_SCALE, guide
from steerlm.data import templates
from steerlm.data.records import Record, Turn, read_records, write_records
from steerlm.errors import UserError
from steerlm.generator import Generator, SamplingArgs
from steerlm.metrics import spearman
from steerlm.steerability import (
    AttributeResult,
    ComputedScorer,
    attribute_line_answers,
    draw_prompts,
    empty_answers,
    file_prompts,
    format_table,
    held_out_prompts,
    measure_attribute,
    measure_verbosity,
    prompt_interval,
    writes_attribute_line,
)

SCHEMA = AttributeSchema(("quality", "humor"))
GREEDY = SamplingArgs(greedy=True, max_new_tokens=12)
PROMPTS = ["Hi", "Tell me a joke.", "What is the capital of France? Please answer with a long story.", "x"]


def chaotic_lm():
    """The tiny LM with large random weights (varied greedy output), as in test_generate."""
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


def words(n: int) -> str:
    return " ".join(["word"] * n)


def synthetic_records(n_prompts: int = 12) -> list[Record]:
    """OASST-like paths: each prompt (a user message with an id) has three sibling replies of different lengths and
    quality labels; one tree per prompt."""
    out = []
    for p in range(n_prompts):
        for k in range(3):
            length = 1 + (p * 7 + k * 13) % 60
            quality = (p + 3 * k) % 10
            humor = 9 if (p, k) == (0, 0) else 0  # one rare extreme level
            out.append(Record([Turn("User", f"Question number {p}?", None, {"message_id": f"u{p}"}),
                               Turn("Assistant", words(length), f"quality:{quality},humor:{humor}",
                                    {"message_id": f"a{p}-{k}"})], extra={"tree_id": f"t{p}"}))  # fmt: skip
    return out


# ---------------------------------------------------------------- 1. verbosity


def test_verbosity_buckets_are_quantiles_monotone_and_round_trip():
    texts = [words(n) for n in range(1, 101)]
    buckets = LengthBuckets.fit(texts + texts[:10], 10)  # duplicates count once (OASST paths repeat answers)
    assert buckets.levels == 10 and buckets.unit == "words" and len(buckets.edges) == 9
    assert list(buckets.edges) == sorted(buckets.edges)
    assert buckets.edges[0] == pytest.approx(10.9) and buckets.edges[-1] == pytest.approx(90.1)
    levels = [buckets.level(t) for t in texts]
    assert levels == sorted(levels) and min(levels) == 0 and max(levels) == 9  # monotone in length, full range
    assert set(Counter(levels).values()) == {10}  # quantile buckets: equally full on the data they were fitted on
    assert word_count("  two\nwords ") == 2 and buckets.level("") == 0
    again = LengthBuckets.from_dict(json.loads(json.dumps(buckets.to_dict())))
    assert again == buckets and measure_verbosity(words(55), again) == buckets.level(words(55)) == 5
    with pytest.raises(ValueError, match="ascend"):
        LengthBuckets((5.0, 3.0))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """`steerlm prepare --computed=verbosity` on a records file, then a tiny SFT run on its output."""
    root = tmp_path_factory.mktemp("steer")
    source = root / "source.jsonl"
    write_records(source, synthetic_records())
    data = root / "data"
    assert cli.run(["prepare", f"--source={source}", f"--out={data}", "--attributes=quality,humor",
                    "--computed=verbosity", "--val_fraction=0.25"]) == 0  # fmt: skip
    out = root / "sft"
    args = ["sft", "--model=tiny-lm", f"--data={data}", f"--out={out}", "--train.max_steps=2", "--train.lr=0.01",
            "--train.batch_size=3", "--template=chat", "--label_dropout=0.2", "--oversample_max=3", "--flip_each",
            "--group_siblings"]  # fmt: skip
    assert cli.run(args) == 0
    return data, out


def test_prepare_stores_edges_and_sft_and_measurement_reuse_them(prepared):
    data, out = prepared
    stored = json.loads((data / "computed.json").read_text())
    buckets = LengthBuckets.from_dict(stored["verbosity"])
    assert json.loads((data / "stats.json").read_text())["computed"] == stored
    train_texts = [t.value for r in read_records(data / "train.jsonl") for t in r.assistant_turns]
    assert buckets == LengthBuckets.fit(train_texts, 10)  # fitted on the training answers only
    schema = AttributeSchema(("quality", "humor", "verbosity"))
    for split in ("train", "val"):
        for r in read_records(data / f"{split}.jsonl"):
            for t in r.assistant_turns:  # every answer labelled with its own bucket, beside the human labels
                levels = schema.parse(t.label)
                assert levels["verbosity"] == buckets.level(t.value) and "quality" in levels
    # the model carries the same edges; the generator exposes them; the check measures answers with them
    meta = json.loads((out / "best" / "steerlm_model.json").read_text())
    assert meta["computed"] == stored and meta["label_dropout"] == 0.2
    assert meta["attributes"]["names"] == ["quality", "humor", "verbosity"]
    gen = Generator.load(str(out / "best"), device="cpu")
    assert gen.computed == {"verbosity": buckets}
    record = Record([Turn("User", "q"), Turn("Assistant", words(33))])
    assert ComputedScorer(gen.computed).predict([record]) == [{"verbosity": float(buckets.level(words(33)))}]


def test_sft_computes_verbosity_when_the_data_lacks_it(prepared, tmp_path):
    # annotated data (APM labels) lose verbosity; `sft --computed=verbosity` sets it again from the answers' text
    data, _ = prepared
    stripped = tmp_path / "annotated"
    stripped.mkdir()
    for split in ("train", "val"):
        records = read_records(data / f"{split}.jsonl")
        for r in records:
            for t in r.assistant_turns:
                t.label = "quality:5"
        write_records(stripped / f"{split}.jsonl", records)
    summary, _ = sft.run(sft.Config(data=str(stripped), out=str(tmp_path / "sft"), model="tiny-lm", template="nemo",
                                    computed=["verbosity"], flip_gap=False,
                                    train=train.TrainArgs(max_steps=1, batch_size=4)))  # fmt: skip
    assert summary["attributes"]["names"] == ["quality", "verbosity"]
    meta = json.loads((tmp_path / "sft" / "best" / "steerlm_model.json").read_text())
    texts = [t.value for r in read_records(stripped / "train.jsonl") for t in r.assistant_turns]
    assert LengthBuckets.from_dict(meta["computed"]["verbosity"]) == LengthBuckets.fit(texts, 10)


# ---------------------------------------------------------------- 2. attribute guidance


def test_guidance_mixing_formula():
    requested = torch.tensor([[1.0, 2.0, 0.0]])
    neutral = torch.tensor([[1.0, 0.0, 0.5]])
    assert torch.equal(guide(requested, neutral, 3.0), torch.tensor([[1.0, 6.0, -1.0]]))  # l_n + s * (l_r - l_n)
    assert torch.equal(guide(requested, neutral, 0.0), neutral)
    with pytest.raises(ValueError, match="guidance_scale"):
        SamplingArgs(guidance_scale=-1)
    with pytest.raises(ValueError, match="guidance_scale"):  # the one bound of the sampler, the server and requests
        SamplingArgs(guidance_scale=MAX_GUIDANCE_SCALE + 1)
    assert SamplingArgs(guidance_scale=MAX_GUIDANCE_SCALE).guidance_scale == MAX_GUIDANCE_SCALE


def test_plausibility_constraint_keeps_tokens_plausible_under_both_conditions():
    inf = float("inf")
    # requested log-probs (up to a shift): 0, -1, -5, -3; neutral: 0, -9, -1, -1
    requested = torch.tensor([[0.0, -1.0, -5.0, -3.0]])
    neutral = torch.tensor([[0.0, -9.0, -1.0, -1.0]])
    mixed = guide(requested, neutral, 2.0)
    assert torch.equal(guide(requested, neutral, 2.0, 0.0, 0.0), mixed)  # 0 cuts nothing
    # alpha 0.1 under the request (ln 0.1 = -2.3) cuts tokens 2 and 3 ...
    assert torch.equal(guide(requested, neutral, 2.0, 0.1), torch.tensor([[0.0, 7.0, -inf, -inf]]))
    # ... and 0.001 under the reference (ln = -6.9) also cuts token 1, which the mix favoured most (+7)
    assert torch.equal(guide(requested, neutral, 2.0, 0.1, 0.001), torch.tensor([[0.0, -inf, -inf, -inf]]))
    assert torch.equal(guide(requested, neutral, 2.0, 0.0, 0.001), torch.tensor([[0.0, -inf, -9.0, -5.0]]))
    # where no token passes both, the requested condition's test alone decides
    disjoint = torch.tensor([[-9.0, -9.0, 0.0, -9.0]])  # its one plausible token is cut under the request
    assert torch.equal(guide(requested, disjoint, 2.0, 0.1, 0.5), guide(requested, disjoint, 2.0, 0.1))
    # per-row values, a row at 0 untouched
    rows = guide(requested.repeat(2, 1), neutral.repeat(2, 1), 2.0, torch.tensor([[0.1], [0.0]]))
    assert torch.equal(rows[0], guide(requested, neutral, 2.0, 0.1)[0]) and torch.equal(rows[1], mixed[0])
    for name in ("guidance_plausibility", "guidance_reference_plausibility"):
        for bad in (-0.1, 1.0):
            with pytest.raises(ValueError, match=name):
                SamplingArgs(**{name: bad})


def test_plausibility_near_one_samples_the_requested_conditions_top_token(lm):
    """With alpha just below 1 only the requested condition's most likely token survives, whatever the guidance
    scale and sampling do to the rest: guided, sampled answers are the plain greedy ones."""
    gen = Generator(*lm, schema=SCHEMA, template="chat", conditioning="attributes")
    attrs = [{"humor": 9}, {"quality": 2}, {}, {"humor": 4}]
    plain = gen.generate(PROMPTS, attrs, GREEDY, batch_size=3)
    pinned = replace(GREEDY, greedy=False, temperature=1.5, seed=3, guidance_scale=4.0, guidance_plausibility=0.999,
                     guidance_reference_plausibility=0.0)  # fmt: skip
    assert gen.generate(PROMPTS, attrs, pinned, batch_size=3) == plain
    loose = replace(pinned, guidance_plausibility=0.0)
    assert gen.generate(PROMPTS, attrs, loose, batch_size=3) != plain


def test_a_conditioned_chat_model_stops_at_an_attribute_marker(lm):
    """An answer never holds the attribute marker: a chat model that writes one has begun another turn's line."""
    chat = Generator(*lm, schema=SCHEMA, template="chat", conditioning="attributes")
    assert templates.ATTR_MARKER in chat.stop_strings(GREEDY)
    assert templates.ATTR_MARKER not in chat.stop_strings(GREEDY, raw=True)
    assert templates.ATTR_MARKER not in Generator(*lm, template="chat").stop_strings(GREEDY)
    assert chat.stop_strings(GREEDY) == templates.stop_strings("chat", lm[1]) + [templates.ATTR_MARKER]
    nemo = Generator(*lm, schema=SCHEMA, template="nemo", conditioning="attributes")
    assert nemo.stop_strings(GREEDY) == [templates.T]


def test_guidance_at_scale_one_is_plain_generation(lm):
    gen = Generator(*lm, schema=SCHEMA, template="chat", conditioning="attributes")
    attrs = [{"humor": 9}, {"quality": 2}, {}, {"humor": 4}]
    plain = gen.generate(PROMPTS, attrs, GREEDY, batch_size=3)
    assert not gen.guided(replace(GREEDY, guidance_scale=1.0))
    assert gen.generate(PROMPTS, attrs, replace(GREEDY, guidance_scale=1.0), batch_size=3) == plain
    # the two-prompt path itself, forced at s = 1 (and no plausibility constraint), picks the same tokens
    prompts = [gen.prompt_ids(p, a) for p, a in zip(PROMPTS, attrs, strict=True)]
    neutral = [gen.neutral_ids(p, GREEDY) for p in PROMPTS]
    unconstrained = replace(GREEDY, guidance_scale=1.0, guidance_plausibility=0, guidance_reference_plausibility=0)
    forced = gen.generate_ids(prompts, unconstrained, batch_size=3, neutral=neutral)
    assert [g.text for g in forced] == plain
    # s != 1 changes answers; batched equals one at a time; streaming equals generate
    guided = replace(GREEDY, guidance_scale=4.0)
    answers = gen.generate(PROMPTS, attrs, guided, batch_size=3)
    assert answers != plain
    assert answers == [gen.generate(p, a, guided)[0] for p, a in zip(PROMPTS, attrs, strict=True)]
    assert "".join(gen.stream(PROMPTS[1], attrs[1], guided)) == answers[1]


def test_neutral_prompt_is_the_unconditional_or_reference_one(lm):
    gen = Generator(*lm, schema=SCHEMA, template="nemo", conditioning="attributes")
    record = Record([Turn("User", "Hi")])
    assert gen.neutral_segments("Hi", GREEDY) == templates.inference_segments(record, None, "nemo")
    assert templates.L not in "".join(gen.neutral_segments("Hi", GREEDY))
    ref = gen.neutral_segments("Hi", replace(GREEDY, guidance_reference="humor:3"))
    assert ref[-1].endswith(f"{templates.L}quality:9,humor:3\n")
    plain = Generator(*lm, template="chat")  # an unconditioned model ignores guidance
    assert not plain.guided(replace(GREEDY, guidance_scale=3.0))


def test_middle_reference_moves_the_requested_attributes_to_the_middle_level(lm):
    gen = Generator(*lm, schema=SCHEMA, template="chat", conditioning="attributes")
    assert SCHEMA.middle_level == 4 and SCHEMA.defaults()["quality"] == 9
    # what the request names goes to the middle; the rest stays at its default, as in the request
    assert gen.reference_string("middle", {"humor": 9}) == "quality:9,humor:4"
    assert gen.reference_string("middle", "quality:0,humor:7") == "quality:4,humor:4"
    assert gen.reference_string("middle", None) == gen.attribute_string(None)  # names nothing: the request itself
    assert (
        gen.reference_string("humor:3", {"humor": 9}) == "quality:9,humor:3" and gen.reference_string("", {}) is None
    )
    with pytest.raises(UserError, match="unknown attribute 'humr'"):
        gen.reference_string("middle", {"humr": 1})
    # generation against 'middle' is generation against the explicit middle-level string, request by request
    attrs = [{"humor": 9}, {"quality": 0}]
    middle = gen.generate(PROMPTS[:2], attrs, replace(GREEDY, guidance_scale=3.0, guidance_reference="middle"))
    assert middle == [gen.generate(p, a, replace(GREEDY, guidance_scale=3.0, guidance_reference=ref))[0]
                      for p, a, ref in zip(PROMPTS[:2], attrs, ["humor:4", "quality:4"], strict=True)]  # fmt: skip
    assert "".join(gen.stream(PROMPTS[0], attrs[0], replace(GREEDY, guidance_scale=3.0,
                                                            guidance_reference="middle"))) == middle[0]  # fmt: skip


class FlagLM(torch.nn.Module):
    """Stand-in LM counting its forward calls: a row whose prompt has `long_len` real tokens (the requested
    condition, with its attribute line) scores token 6 at 1.5, otherwise at 0.5; token 5 always scores 2.0. Plain
    decoding therefore picks 5, and guidance at s = 3 picks 6 (0.5 + 3 * 1.0 = 3.5)."""

    def __init__(self, vocab: int, long_len: int):
        super().__init__()
        self.vocab, self.long_len = vocab, long_len
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls, self.rows = 0, []

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=True, **_):
        self.calls += 1
        self.rows.append(input_ids.shape[0])
        if past_key_values is None:
            flags = (attention_mask.sum(-1) == self.long_len).tolist()
            past_key_values = SimpleNamespace(flags=flags)
            past_key_values.batch_select_indices = lambda idx: setattr(
                past_key_values, "flags", [past_key_values.flags[i] for i in idx.tolist()]
            )
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab)
        logits[:, :, 5] = 2.0
        for b, flag in enumerate(past_key_values.flags):
            logits[b, :, 6] = 1.5 if flag else 0.5
        return SimpleNamespace(logits=logits, past_key_values=past_key_values)


def test_guidance_runs_both_conditions_in_one_forward_pass():
    _, tokenizer = models.tiny_causal_lm()
    probe = Generator(models.tiny_causal_lm()[0], tokenizer, schema=SCHEMA, template="nemo", conditioning="attributes")
    long_len = len(probe.prompt_ids("Hi", {"humor": 9}))
    assert len(probe.neutral_ids("Hi", GREEDY)) != long_len
    model = FlagLM(len(tokenizer), long_len)
    gen = Generator(model, tokenizer, schema=SCHEMA, template="nemo", conditioning="attributes")
    sampling = SamplingArgs(greedy=True, max_new_tokens=5)
    plain = gen.generate_full(["Hi", "Hi"], {"humor": 9}, sampling)
    assert model.calls == 5 and model.rows == [2, 2, 2, 2, 2]  # one prefill + 4 decoding steps
    assert all(g.token_ids == [5] * 5 for g in plain)
    model.calls, model.rows = 0, []
    guided = gen.generate_full(["Hi", "Hi"], {"humor": 9}, replace(sampling, guidance_scale=3.0))
    assert model.calls == 5 and model.rows == [4, 4, 4, 4, 4]  # the same number of calls, both conditions batched
    assert all(g.token_ids == [6] * 5 for g in guided)


def test_generate_command_takes_guidance_scale(lm, tmp_path, capsys):
    meta = {"attributes": SCHEMA.to_dict(), "template": "chat", "conditioning": "attributes", "base_model": "tiny-lm",
            "lora": False}  # fmt: skip
    models.save_model(lm[0], lm[1], tmp_path / "m", "steerlm_model.json", meta)
    gen = Generator.load(str(tmp_path / "m"), device="cpu")
    expected = gen.generate(["Hi"], {"humor": 7}, replace(GREEDY, guidance_scale=3.0))[0]
    args = ["generate", f"--model={tmp_path / 'm'}", "--attr", "humor=7", "--greedy", "--max_new_tokens=12",
            "--guidance_scale=3", "Hi"]  # fmt: skip
    assert cli.run(args) == 0
    assert capsys.readouterr().out == expected + "\n"


# ---------------------------------------------------------------- 3. training levers


def test_label_dropout_gives_the_unconditional_rendering_for_the_expected_fraction():
    records = [Record([Turn("User", f"q{i}"), Turn("Assistant", f"a{i}", "quality:5")]) for i in range(2000)]
    dropped, n = conditioning.drop_labels(records, 0.25, seed=3)
    assert conditioning.drop_labels(records, 0.25, seed=3)[1] == n and abs(n - 500) < 70  # seeded, ~25 %
    unconditional = 0
    for original, r in zip(records, dropped, strict=True):
        text = templates.render(r, "nemo")
        if r.conversations[1].label is None:
            unconditional += 1
            prompt = templates.inference_prompt(Record(original.conversations[:1]), None, "nemo")
            assert text == prompt + original.conversations[1].value + "\n" + templates.T  # what guidance's neutral is
        else:
            assert text == templates.render(original, "nemo")
    assert unconditional == n
    assert records[0].conversations[1].label == "quality:5"  # the input is not modified
    assert conditioning.drop_labels(records, 0.0, seed=3)[1] == 0


def test_sibling_replies_share_a_batch_and_rare_levels_are_oversampled():
    records = synthetic_records(10)
    keys = [conditioning.sibling_key(r, i) for i, r in enumerate(records)]
    assert len(set(keys)) == 10 and keys[0] == keys[1] == keys[2] == "id:u0"
    for epoch in range(3):
        for batch_size in (3, 4, 8):
            plan = train.batch_plan(len(records), batch_size, seed=1, epoch=epoch, groups=keys)
            assert sorted(i for b in plan for i in b) == list(range(len(records)))
            assert all(len(b) <= batch_size for b in plan)
            where = {i: n for n, b in enumerate(plan) for i in b}
            for k in set(keys):
                assert len({where[i] for i, g in enumerate(keys) if g == k}) == 1  # siblings in one batch
    # without message ids the prompt text groups siblings
    bare = [Record([Turn(t.role, t.value, t.label) for t in r.conversations]) for r in records]
    assert [conditioning.sibling_key(r, i) for i, r in enumerate(bare)][:3] == [
        conditioning.sibling_key(bare[0], 0)
    ] * 3
    copies = conditioning.oversample_copies(records, SCHEMA, 3)
    assert copies[0] == 3 and Counter(copies[1:]) == {1: len(records) - 1}  # only the rare humor:9 is repeated
    assert conditioning.oversample_copies(records, SCHEMA, 1) == [1] * len(records)


def test_flip_gap_is_logged_at_each_validation(prepared, capsys):
    _, out = prepared
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    assert evals and all(isinstance(r["flip_gap"], float) for r in evals)
    assert all(f"flip_gap_{n}" in evals[-1] for n in ("quality", "humor", "verbosity"))  # --flip_each
    summary = json.loads((out / "summary.json").read_text())
    assert "last_flip_gap" in summary and summary["steering"]["oversampled extra copies"] >= 1
    assert summary["steering"]["answers without attribute line (label_dropout)"] >= 1
    assert summary["steering"]["sibling groups"] >= 1


def test_steer_preset_builds_every_stage():
    from steerlm import config as config_lib
    from steerlm import pipeline

    cfg = config_lib.load(pipeline.Config, preset="steer", command="pipeline")
    assert cfg.check.attributes == ["verbosity", "quality"] and 3.0 in cfg.check.compare_guidance
    assert config_lib.build(prepare.Config, cfg.prepare).computed == ["verbosity"]
    built = config_lib.build(sft.Config, {**cfg.sft, "data": "x"})
    assert built.computed == ["verbosity"] and built.label_dropout > 0 and built.group_siblings


def test_flip_records_mirror_levels():
    record = Record([Turn("User", "q"), Turn("Assistant", "a", "quality:7,humor:0")])
    (flipped,) = conditioning.flip_records([record], SCHEMA)
    assert flipped.conversations[1].label == "quality:2,humor:9"
    (one,) = conditioning.flip_records([record], SCHEMA, ("humor",))
    assert one.conversations[1].label == "quality:7,humor:9"


def test_steerability_measures_verbosity_without_an_apm(lm):
    gen = Generator(*lm, schema=AttributeSchema(("quality", "verbosity")), template="chat", conditioning="attributes")
    gen.computed = {"verbosity": LengthBuckets((1.0, 3.0, 5.0, 8.0, 12.0, 17.0, 25.0, 40.0, 60.0))}
    prompts = [Record([Turn("User", p)]) for p in PROMPTS[:2]]
    result = measure_attribute(gen, ComputedScorer(gen.computed), prompts, "verbosity", [0, 9], GREEDY)
    assert result.attribute == "verbosity" and len(result.measured_mean) == 2
    for level, answers in result.answers.items():
        assert all(0 <= gen.computed["verbosity"].level(a) <= 9 for a in answers), level


def test_the_check_gives_spearman_an_interval_over_prompts():
    levels = [0, 1, 2, 3, 4]
    rng = np.random.default_rng(0)
    steered = np.array(levels, dtype=float) + rng.normal(0, 0.3, (24, 5))  # 24 prompts that follow the slider
    flat = rng.normal(2, 1, (24, 5))  # 24 prompts that do not
    lo, hi = prompt_interval(levels, steered)
    rho = spearman(np.tile(levels, 24).tolist(), steered.ravel().tolist())
    assert lo <= rho <= hi and lo > 0.8
    lo_flat, hi_flat = prompt_interval(levels, flat)
    assert lo_flat < 0 < hi_flat and hi_flat < lo
    # half the prompts: a wider interval, the same seed: the same interval
    assert prompt_interval(levels, steered[:6])[1] - prompt_interval(levels, steered[:6])[0] > hi - lo
    assert prompt_interval(levels, steered) == [lo, hi] and prompt_interval(levels, steered[:1]) is None
    result = AttributeResult("verbosity", levels, [0.0] * 5, rho, 1.0, 4, spearman_ci=[lo, hi])
    assert f"(95% CI over prompts {lo:+.2f}..{hi:+.2f})" in format_table([result])


def test_answers_that_write_an_attribute_line_are_counted_per_level():
    lines = ["quality:4,humor:0,verbosity:0\nquality:4,humor:0", "<attributes>quality:4,humor:1", "category:1,quantity:2",
             "  layout: 2\nwidth:800", ",verbosity:#0,verbosity:#0>>>>", ",verbosity:of_text>"]  # fmt: skip
    answers = ["No.", "Step 1: open the file.", "12:30 is when it starts.", "Here is the code: 5 lines.", "",
               "Quality: it depends.", "humorous: no"]  # fmt: skip
    assert all(writes_attribute_line(t) for t in lines)
    assert not any(writes_attribute_line(t) for t in answers)
    result = AttributeResult("verbosity", [0, 4], [0.0, 4.0], 1.0, 1.0, 1, {0: lines[:3] + answers[:1], 4: answers})
    assert attribute_line_answers(result) == [3, 0]
    assert empty_answers(result) == [0, 1] and empty_answers(replace(result, answers={0: [" \n", ""]})) == [2, 0]


def test_held_out_prompts_are_the_val_prompts_drawn_alike_from_a_folder_or_a_file(tmp_path):
    records = [Record([Turn("User", f"q{i}"), Turn("Assistant", "a"), Turn("User", f"r{i}"), Turn("Assistant", "b")])
               for i in range(5)] + [Record([Turn("User", "q0"), Turn("Assistant", "another answer")])]  # fmt: skip
    write_records(tmp_path / "val.jsonl", records)
    from_folder = held_out_prompts(tmp_path, 4, seed=7)
    assert from_folder == held_out_prompts(tmp_path / "val.jsonl", 4, seed=7)
    assert len(from_folder) == 4 and all(p.conversations[-1].role == "User" for p in from_folder)
    # each distinct prefix once (q0 is asked twice), both turns of a two-turn record: 10 prompts, all when n is larger
    assert len(held_out_prompts(tmp_path, 100, seed=7)) == 10
    (tmp_path / "bad.jsonl").write_text('{"conversations": [{"from": "User"}]}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:1: conversations\[0\].value"):
        held_out_prompts(tmp_path / "bad.jsonl", 4, seed=7)
    # any validation split name `steerlm prepare` or a user may write (records.VAL_NAMES), and a located error without
    gz = tmp_path / "gz"
    gz.mkdir()
    (gz / "validation.jsonl.gz").write_bytes(gzip.compress((tmp_path / "val.jsonl").read_bytes()))
    assert held_out_prompts(gz, 4, seed=7) == from_folder
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty.*no val.jsonl or val.jsonl.gz"):
        held_out_prompts(tmp_path / "empty", 4, seed=7)


def test_file_prompts_draws_the_first_turns_of_a_prompts_file(tmp_path):
    questions = [{"question_id": i, "category": "writing", "turns": [f"Question {i}?", "And then?"]} for i in range(6)]
    (tmp_path / "mt.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    gen = Generator.load("tiny-lm")
    prompts = file_prompts(gen, tmp_path / "mt.jsonl", 4, seed=7)
    # MT-Bench questions are answered at their first turn, drawn as the check draws held-out prompts
    assert [p.conversations for p in prompts] == [
        [Turn("User", f"Question {i}?")] for i in draw_prompts(list(range(6)), 4, seed=7)
    ]
    assert len(file_prompts(gen, tmp_path / "mt.jsonl", 100, seed=7)) == 6  # all when fewer than asked

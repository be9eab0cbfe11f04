"""SPEC §3 templates and §4 masks: exact text, exact unmasked text, for both record types and styles."""

import pytest

from steerlm import models
from steerlm.data import templates as t
from steerlm.data.records import TEXT_TO_VALUE, Record, Turn

SPEC_EXAMPLE = (
    "<extra_id_0>System\nS0\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\n"
    "<extra_id_2>quality:9,toxicity:0\nHello\n<extra_id_1>"
)


@pytest.fixture(scope="module")
def tok():
    return models.tiny_causal_lm()[1]


def two_turns():
    return Record(
        [
            Turn("User", "Hi there"),
            Turn("Assistant", "Hello, friend", "quality:9,toxicity:0"),
            Turn("User", "More?"),
            Turn("Assistant", "Sure.", "quality:3"),
        ],
        system="S0",
    )


def trained_text(record, tok, style):
    ex = t.encode(record, tok, style)
    return tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != t.IGNORE_INDEX])


def test_spec_example_is_byte_exact():
    record = Record([Turn("User", "Hi"), Turn("Assistant", "Hello", "quality:9,toxicity:0")], system="S0")
    assert t.render(record) == SPEC_EXAMPLE
    assert [s.text for s in t.segments(record) if s.trainable] == ["Hello\n", "<extra_id_1>"]


def test_nemo_value_to_text_masks_multi_turn(tok):
    # Trained: each answer + "\n" and the T that follows it; never the header, user turns, role names or labels.
    assert trained_text(two_turns(), tok, "nemo") == "Hello, friend\n<extra_id_1>Sure.\n<extra_id_1>"


def test_nemo_text_to_value_trains_only_labels(tok):
    record = two_turns().with_type(TEXT_TO_VALUE)
    text = t.render(record)
    assert "<extra_id_1>Assistant\nHello, friend\n<extra_id_2>quality:9,toxicity:0\n" in text
    assert trained_text(record, tok, "nemo") == "quality:9,toxicity:0\n<extra_id_1>quality:3\n<extra_id_1>"


def test_first_turn_and_null_labels_are_masked(tok):
    record = Record([Turn("Assistant", "Intro"), Turn("User", "Q"), Turn("Assistant", "A", None)], system="s")
    assert t.render(record).endswith("<extra_id_1>Assistant\nA\n<extra_id_1>")
    assert trained_text(record, tok, "nemo") == "A\n<extra_id_1>"


def test_chat_style_masks(tok):
    assert trained_text(two_turns(), tok, "chat") == "Hello, friend<|im_end|>Sure.<|im_end|>"
    text = t.render(two_turns(), "chat", tok)
    assert "<|im_start|>assistant\n<attributes>quality:9,toxicity:0\nHello, friend<|im_end|>" in text
    assert (
        trained_text(two_turns().with_type(TEXT_TO_VALUE), tok, "chat")
        == "quality:9,toxicity:0<|im_end|>quality:3<|im_end|>"
    )


@pytest.mark.parametrize("style", ["nemo", "chat"])
def test_inference_prompt_is_training_prefix(tok, style):
    record = two_turns()
    history = Record(record.conversations[:3], record.system)
    prompt = t.inference_prompt(history, "quality:3", style, tok)
    assert t.render(record, style, tok).startswith(prompt)
    assert t.render(record, style, tok)[len(prompt) :].startswith("Sure.")
    ids = t.encode_text_segments(t.inference_segments(history, "quality:3", style, tok), tok)
    assert t.encode(record, tok, style)["input_ids"][: len(ids)] == ids  # the same tokens the model trained on
    if style == "nemo":
        assert prompt.endswith("<extra_id_1>Assistant\n<extra_id_2>quality:3\n")
        assert t.inference_prompt(history, None).endswith("<extra_id_1>Assistant\n")


def test_value_prompt_for_generative_apm():
    record = Record([Turn("User", "Hi"), Turn("Assistant", "Hello", "quality:9")], system="S0")
    assert "".join(t.value_prompt_segments(record)) == (
        "<extra_id_0>System\nS0\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\nHello\n<extra_id_2>"
    )


def test_truncation_drops_records_without_trainable_tokens(tok):
    records = [two_turns(), Record([Turn("User", "x" * 400), Turn("Assistant", "y", "quality:1")], system="s")]
    examples, dropped = t.encode_all(records, tok, "nemo", max_length=64)
    assert len(examples) == 1 and dropped == {"no trainable tokens after truncation": 1}
    assert all(len(e["input_ids"]) <= 64 for e in examples)


def long_conversation(n_exchanges=4, words=30):
    turns = []
    for k in range(n_exchanges):
        turns += [
            Turn("User", f"question {k} " + "u " * words),
            Turn("Assistant", f"answer {k} " + "a " * words, "quality:1"),
        ]
    return Record(turns, system="S0", extra={"tree_id": "t1"})


@pytest.mark.parametrize("style", ["nemo", "chat"])
def test_drop_early_turns_keeps_the_last_answer_whole_inside_the_window(tok, style):
    record = long_conversation()
    full = len(t.encode(record, tok, style)["input_ids"])
    last_exchange = Record(record.conversations[-2:], system="S0")
    window = len(t.encode(last_exchange, tok, style)["input_ids"]) + 5
    assert full > window  # cut on the right, the last answer would be lost
    cut = t.drop_early_turns(record, tok, style, window)
    assert cut.conversations[0].role == "User" and cut.conversations[-1] is record.conversations[-1]
    assert (cut.system, cut.mask, cut.type, cut.extra) == (record.system, record.mask, record.type, record.extra)
    ex = t.encode(cut, tok, style, max_length=window)
    assert len(ex["input_ids"]) <= window
    assert trained_text(cut, tok, style).rstrip().endswith(trained_text(last_exchange, tok, style).rstrip())
    # the earliest start that fits wins: with one more exchange it would not fit
    assert len(t.encode(Record(record.conversations[-4:], system="S0"), tok, style)["input_ids"]) > window
    assert len(cut.conversations) == 2


def test_drop_early_turns_leaves_fitting_and_single_exchange_records_alone(tok):
    record = long_conversation()
    assert t.drop_early_turns(record, tok, "chat", 10_000) is record
    single = Record([Turn("User", "x " * 400), Turn("Assistant", "y", "quality:1")], system="s")
    assert t.drop_early_turns(single, tok, "chat", 32) is single  # no later User turn: cut on the right as before
    # nothing fits: the last exchange, cut on the right by `encode`, when its answer starts inside the window ...
    last = Record(record.conversations[-2:], system="S0")
    window = len(t.encode(last, tok, "chat")["input_ids"]) - 3
    cut = t.drop_early_turns(record, tok, "chat", window)
    assert [x.value for x in cut.conversations] == [x.value for x in last.conversations]
    # ... and the record as it was when not even that leaves a trained token
    assert t.drop_early_turns(record, tok, "chat", 8) is record

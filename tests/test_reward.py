"""Reward model (InstructGPT step 2, SPEC §6): comparisons from ranks and HH pairs, the pairwise loss, demonstrations,
and `steerlm train-rm` end to end on a tiny encoder."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from steerlm import cli, config, heads, reward, rm_model
from steerlm.data import hh, invariants, preferences
from steerlm.data.records import ASSISTANT, USER, Record, Turn, write_records
from steerlm.errors import UserError
from steerlm.losses import pairwise_loss

pytestmark = pytest.mark.usefixtures("one_thread", "private_cache")


def user(text, mid):
    return Turn(USER, text, None, {"message_id": mid})


def answer(text, mid, rank, quality=None):
    return Turn(
        ASSISTANT, text, f"quality:{quality}" if quality is not None else None, {"message_id": mid, "rank": rank}
    )


def tree() -> list[Record]:
    """One OASST-like tree as flattening writes it: a prompt with three ranked replies (one continued) and one
    unranked reply; every root-to-leaf path is a record, so prefixes repeat."""
    p, blue, why = user("Name a colour.", "p"), answer("Blue.", "a1", 1, quality=9), user("Why?", "u1")
    paths = [
        [p, blue, why, answer("Sky.", "b0", 0)],
        [p, blue, why, answer("Sea.", "b1", 1)],
        [p, answer("Red.", "a0", 0, quality=5)],
        [p, answer("Green.", "a2", 2, quality=3)],
        [p, answer("Colour?", "ax", None)],
    ]
    return [Record(turns, extra={"tree_id": "t"}) for turns in paths]


# ---------------------------------------------------------------- comparisons


def test_ranked_pairs_are_all_k_choose_2_best_first():
    assert preferences.ranked_pairs([2, 0, 1]) == [(1, 2), (1, 0), (2, 0)]
    for k in range(1, 7):
        pairs = preferences.ranked_pairs(list(range(k))[::-1])
        assert len(pairs) == k * (k - 1) // 2
        assert all(b != w and (k - 1 - w) < (k - 1 - b) for w, b in pairs)  # the better one has the lower rank
    assert preferences.ranked_pairs([0, 1, 1]) == [(0, 1), (0, 2)]  # equal ranks give no pair


def test_comparisons_from_sibling_ranks():
    comps = {c.prompt.conversations[-1].value: c for c in preferences.comparisons_from_records(tree())}
    first = comps["Name a colour."]
    assert first.responses == ["Red.", "Blue.", "Green."]  # best first; the unranked reply is left out
    assert first.pairs == [(0, 1), (0, 2), (1, 2)]
    assert first.group == "t" and first.source == "oasst"
    second = comps["Why?"]  # the reply to the follow-up: the prompt is the conversation so far
    assert [t.value for t in second.prompt.conversations] == ["Name a colour.", "Blue.", "Why?"]
    assert second.responses == ["Sky.", "Sea."] and second.pairs == [(0, 1)]
    assert all(t.label is None for t in second.prompt.conversations)  # labels are not part of the prompt


def test_real_oasst_and_hh_comparisons(oasst_file, hh_file):
    kind, records = preferences.read_source(oasst_file)
    comps = preferences.comparisons_from_records(records, kind)
    assert kind == "oasst" and len(comps) > 100
    for c in comps:
        assert len(c.pairs) == len(c.responses) * (len(c.responses) - 1) // 2  # OASST ranks are distinct
        assert c.prompt.conversations[-1].role == USER
    train, val = preferences.split(comps, 0.2, seed=0)
    assert {c.group for c in train}.isdisjoint({c.group for c in val}) and val  # split by tree
    pairs = hh.read_pairs(hh_file, skip_invalid=True)[:50]
    hc = preferences.comparisons_from_hh(pairs)
    assert [c.responses for c in hc] == [[p.chosen, p.rejected] for p in pairs] and all(
        c.pairs == [(0, 1)] for c in hc
    )


def test_a_prompts_pairs_stay_in_one_batch():
    rows = [{"input_ids": [[1, 2], [3], [4, 5, 6]], "pairs": [(0, 1), (0, 2), (1, 2)], "source": "oasst"},
            {"input_ids": [[7], [8]], "pairs": [(0, 1)], "source": "hh"}]  # fmt: skip
    batch = reward.collate_comparisons(rows, pad_id=0)
    assert batch["input_ids"].shape == (5, 3)  # each response encoded once
    assert batch["chosen"].tolist() == [0, 0, 1, 3] and batch["rejected"].tolist() == [1, 2, 2, 4]
    assert batch["group"].tolist() == [0, 0, 0, 1]


# ---------------------------------------------------------------- the loss


def test_pairwise_loss_by_hand():
    def nls(x):  # -log sigmoid(x)
        return math.log1p(math.exp(-x))

    r_w, r_l = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 1.0])
    assert pairwise_loss(r_w, r_l).item() == pytest.approx((nls(1) + nls(-1) + nls(0)) / 3, abs=1e-6)
    assert nls(1) == pytest.approx(0.313262, abs=1e-6) and nls(-1) == pytest.approx(1.313262, abs=1e-6)
    # per prompt first: prompt 0 has two comparisons, prompt 1 one; the prompts weigh equally
    grouped = pairwise_loss(r_w, r_l, torch.tensor([0, 0, 1])).item()
    assert (
        grouped == pytest.approx(((nls(1) + nls(-1)) / 2 + nls(0)) / 2, abs=1e-6) == pytest.approx(0.753204, abs=1e-5)
    )
    r_w.requires_grad_(True)
    pairwise_loss(r_w, r_l).backward()
    assert (r_w.grad < 0).all()  # raising the preferred reward lowers the loss


# ---------------------------------------------------------------- demonstrations


def test_demonstrations_keep_only_best_answers():
    demos, stats = preferences.demonstrations_from_records(tree(), by="rank")
    assert [[t.value for t in d.conversations] for d in demos] == [["Name a colour.", "Red."]]
    assert all(t.label is None for d in demos for t in d.conversations)
    by_quality, _ = preferences.demonstrations_from_records(tree(), by="quality")
    assert [[t.value for t in d.conversations] for d in by_quality] == [["Name a colour.", "Blue.", "Why?", "Sky."]]
    assert stats["not_best"] == 4


def test_hh_demonstrations_are_the_chosen_conversations(hh_file):
    pairs = hh.read_pairs(hh_file, skip_invalid=True)[:5]
    demos = preferences.demonstrations_from_hh(pairs)
    assert [d.conversations[-1].value for d in demos] == [p.chosen for p in pairs]


# ---------------------------------------------------------------- train-rm end to end


def synthetic(path, n, seed):
    """Ranked replies where the better one is polite: a preference a tiny encoder can learn."""
    records = []
    for i in range(n):
        q = user(f"Question {seed}-{i}: can you help me?", f"q{seed}-{i}")
        for j, (text, rank) in enumerate([("Yes, thank you, here is the answer.", 0), ("No. Go away.", 1)]):
            records.append(Record([q, answer(text, f"a{seed}-{i}-{j}", rank)], extra={"tree_id": f"t{seed}-{i}"}))
    write_records(path, records)
    return str(path)


def test_train_rm_learns_a_preference_and_loads_back(tmp_path):
    out = tmp_path / "rm"
    code = cli.run(["train-rm", synthetic(tmp_path / "train.jsonl", 24, 0), "--val-data",
                    synthetic(tmp_path / "val.jsonl", 6, 1), "--model", "tiny-encoder", "--out", str(out),
                    "--train.epochs", "4", "--train.lr", "0.003", "--train.max_length", "32",
                    "--train.batch_size", "4", "--train.log_every", "2"])  # fmt: skip
    assert code == 0
    meta = json.loads((out / "steerlm_rm.json").read_text())
    assert meta["backbone"] == "encoder" and meta["pooling"] == "cls" and meta["step_metrics"]["val_accuracy"] == 1.0
    assert meta["layout"] == heads.SEQ_CLS  # the default encoder reward model is a standard folder
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_metrics"]["val_margin"] > summary["untrained"]["val_margin"]
    assert not (out / "checkpoint").exists()
    rm = rm_model.load_rm(out)
    good, bad = rm.score(
        [("Can you help me?", "Yes, thank you, here is the answer."), ("Can you help me?", "No. Go away.")]
    )
    assert good > bad
    rec = Record([Turn(USER, "Can you help me?"), Turn(ASSISTANT, "No. Go away."), Turn(USER, "Please?")])
    assert rm.score([rec])[0] == pytest.approx(bad, abs=1e-5)  # scored at the last answer
    # an existing output needs --overwrite
    assert cli.run(["train-rm", str(tmp_path / "train.jsonl"), "--model", "tiny-encoder", "--out", str(out)]) == 2


def test_train_rm_on_real_pairs_splits_each_source(tmp_path, oasst_file, hh_file):
    cfg = reward.Config(data=[str(hh_file), str(oasst_file)], out=str(tmp_path / "rm"), model="tiny-encoder",
                        max_prompts=12, skip_invalid=True, val_fraction=0.25,
                        train=reward.RMTrainArgs(max_steps=2, max_length=48, batch_size=4))  # fmt: skip
    summary = reward.main(cfg)
    metrics = summary["best_metrics"]
    assert {"val_accuracy", "val_accuracy_hh", "val_accuracy_oasst", "val_margin", "val_pairs"} <= set(metrics)
    counts = summary["data"]
    assert counts["harmless-base-dev.jsonl.gz"]["kind"] == "hh" and counts["oasst1-en-dev.jsonl"]["kind"] == "oasst"
    assert all(c["val_pairs"] > 0 and c["train_pairs"] > 0 for c in counts.values())


def test_causal_backbone_with_lora(tmp_path):
    out = tmp_path / "rm"
    train = reward.RMTrainArgs(max_steps=2, lr=1e-3, batch_size=4, max_length=32, lora=config.LoraArgs(r=4))
    data, val = synthetic(tmp_path / "train.jsonl", 8, 0), synthetic(tmp_path / "val.jsonl", 2, 1)
    cfg = reward.Config(data=[data], val_data=[val], out=str(out), model="tiny-lm", train=train)
    reward.main(cfg)
    meta = json.loads((out / "steerlm_rm.json").read_text())
    assert meta["backbone"] == "causal" and meta["pooling"] == "last" and meta["lora"] is True
    assert (out / "adapter_config.json").exists()  # a LoRA reward model is an adapter folder plus the head
    scores = rm_model.load_rm(out).score([("Hi", "Hello."), ("Hi", "Go away.")])
    assert len(scores) == 2 and all(math.isfinite(s) for s in scores)


# ---------------------------------------------------------------- the folder: a standard transformers checkpoint

PAIRS = [("Can you help me?", "Yes, thank you, here is the answer."), ("Hi", "No."),
         ("What is the capital of France? Tell me more about it.", "The capital of France is Paris.")]  # fmt: skip


def _transformers_scores(folder, backbone: str, side: str) -> list[float]:
    """The scores of PAIRS from transformers alone: the folder's tokenizer on the reward model's text (the plain
    conversation, + EOS on a causal backbone), padded on `side`, through AutoModelForSequenceClassification."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    seq = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    tok = AutoTokenizer.from_pretrained(str(folder), padding_side=side)
    eos = tok.eos_token if backbone == "causal" else ""
    texts = [f"User: {p}\n\nAssistant: {r}{eos}" for p, r in PAIRS]
    with torch.no_grad():
        logits = seq(**tok(texts, padding=True, return_tensors="pt")).logits
    assert logits.shape == (len(PAIRS), 1) and seq.config.id2label == {0: rm_model.LABEL}
    return logits[:, 0].tolist()


def test_a_causal_reward_model_is_a_standard_sequence_classification_folder(tmp_path):
    from steerlm import models

    # a base whose tokenizer pads with EOS, as SmolLM2's does: the reward model pads with another token, else
    # transformers' last-non-pad read-out would skip the final EOS the score is read at
    lm, tok = models.tiny_causal_lm(1)
    tok.pad_token = tok.eos_token
    models.save_model(lm, tok, tmp_path / "base")
    out = tmp_path / "rm"
    data, val = synthetic(tmp_path / "train.jsonl", 8, 0), synthetic(tmp_path / "val.jsonl", 2, 1)
    reward.main(reward.Config(data=[data], val_data=[val], out=str(out), model=str(tmp_path / "base"),
                              train=reward.RMTrainArgs(max_steps=2, lr=1e-3, batch_size=4, max_length=48)))  # fmt: skip
    meta = json.loads((out / rm_model.META).read_text())
    config_json = json.loads((out / "config.json").read_text())
    assert meta["layout"] == heads.SEQ_CLS and meta["pooling"] == "last" and not (out / rm_model.HEAD).exists()
    assert config_json["architectures"] == ["LlamaForSequenceClassification"] and len(config_json["id2label"]) == 1
    rm = rm_model.load_rm(out)
    assert rm.tokenizer.pad_token == tok.unk_token and config_json["pad_token_id"] == rm.tokenizer.pad_token_id
    ours = rm.score(PAIRS)
    assert len(set(ours)) == len(PAIRS)
    for side in ("right", "left"):
        assert _transformers_scores(out, "causal", side) == pytest.approx(ours, abs=1e-5)


def test_an_encoder_read_through_its_pooler_is_a_standard_folder_and_mean_pooling_is_not(tmp_path):
    data, val = synthetic(tmp_path / "train.jsonl", 8, 0), synthetic(tmp_path / "val.jsonl", 2, 1)
    train = reward.RMTrainArgs(max_steps=2, lr=1e-3, batch_size=4, max_length=48)
    for pooling in ("cls", "mean"):
        out = tmp_path / pooling
        reward.main(reward.Config(data=[data], val_data=[val], out=str(out), model="tiny-encoder", pooling=pooling,
                                  train=train))  # fmt: skip
        meta = json.loads((out / rm_model.META).read_text())
        if pooling == "mean":  # no transformers class mean-pools: the backbone + head layout
            assert "layout" not in meta and meta["head"] == rm_model.HEAD and (out / rm_model.HEAD).exists()
            continue
        assert meta["layout"] == heads.SEQ_CLS
        assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]
        ours = rm_model.load_rm(out).score(PAIRS)
        assert _transformers_scores(out, "encoder", "right") == pytest.approx(ours, abs=1e-5)
    with pytest.raises(UserError, match="no pooler"):
        reward.main(reward.Config(data=[data], val_data=[val], out=str(tmp_path / "x"), model="tiny-lm",
                                  pooling="cls", train=train))  # fmt: skip


def test_a_folder_written_the_old_way_still_loads(tmp_path):
    """Before the standard layout: the bare backbone, `reward_head.safetensors` with a bias, no `layout`."""
    from safetensors.torch import save_file

    from steerlm import models

    backbone, tok = models.tiny_encoder(2)
    head = torch.nn.Linear(backbone.config.hidden_size, 1)
    torch.manual_seed(0)
    torch.nn.init.normal_(head.weight, std=0.5)
    torch.nn.init.constant_(head.bias, 0.75)
    meta = {"kind": "reward", "backbone": "encoder", "pooling": "mean", "max_length": 64, "base_model": "tiny-encoder",
            "lora": False, "text_format": "plain-v1", "head": rm_model.HEAD}  # fmt: skip
    models.save_model(backbone, tok, tmp_path / "old", rm_model.META, meta)
    save_file(
        {k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(tmp_path / "old" / rm_model.HEAD)
    )

    rm = rm_model.load_rm(tmp_path / "old")
    ours = rm.score(PAIRS[:1])[0]
    enc = tok(f"User: {PAIRS[0][0]}\n\nAssistant: {PAIRS[0][1]}", return_tensors="pt")
    with torch.no_grad():
        expected = float(head(backbone(**enc).last_hidden_state.mean(1))[0, 0])
    assert ours == pytest.approx(expected, abs=1e-5)
    # the items the APM scores (`heads.scored_conversation`): scored at the last answer, later turns ignored
    turns = [Turn(USER, PAIRS[0][0]), Turn(ASSISTANT, PAIRS[0][1])]
    record = Record([*turns, Turn(USER, "And then?")])
    assert rm.score([turns, record, record.to_json()]) == pytest.approx([ours] * 3, abs=1e-6)
    with pytest.raises(UserError, match="no Assistant turn"):
        rm.score([Record([Turn(USER, "Hi")])])
    with pytest.raises(TypeError, match="cannot score int"):
        rm.score([3])


def test_a_tokenizer_with_nothing_but_eos_to_pad_with_gets_a_pad_token():
    from steerlm import models

    lm, tok = models.tiny_causal_lm()
    backbone = lm.model
    tok.pad_token = tok.unk_token = tok.bos_token = tok.eos_token  # as GPT-2's: one token for all four
    heads.pad_apart_from_eos(tok, backbone)
    assert tok.pad_token == heads.PAD and tok.pad_token_id != tok.eos_token_id
    assert backbone.get_input_embeddings().num_embeddings == len(tok)  # grown when the token is new


# ---------------------------------------------------------------- tokens that no longer compare anything (issue #15)

SHARED_ENDING = " ".join(f"word{i % 7} and more text {i}." for i in range(12))  # 60 words


def yes_no_pairs(path, shared=3, ordinary=3):
    """The issue's HH-style input: answers that differ only in their first word and share a 60-word ending (a left
    truncation to 32 tokens keeps only that ending), and ordinary pairs."""
    assert len(SHARED_ENDING.split()) == 60
    rows = []
    for x in ["swim at night", "eat raw fish", "sing loudly"][:shared]:
        head = f"\n\nHuman: Is it ok to {x}?\n\nAssistant: "
        rows.append({"chosen": head + "Yes. " + SHARED_ENDING, "rejected": head + "No. " + SHARED_ENDING})
    for i in range(ordinary):
        head = f"\n\nHuman: Question {i}: can you help me?\n\nAssistant: "
        rows.append({"chosen": head + "Yes, thank you, here is the answer.", "rejected": head + "No. Go away."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_truncation_keeps_the_answers_and_cuts_the_shared_context_first(tmp_path):
    from steerlm import models

    _, tok = models.tiny_encoder()
    comps = preferences.comparisons_from_hh(hh.read_pairs(yes_no_pairs(tmp_path / "pairs.jsonl")))
    rows = reward.encode_comparisons(comps, "encoder", tok, 32)
    assert len(rows) == 6
    for row in rows[:3]:
        chosen, rejected = row["input_ids"]
        assert len(chosen) <= 32 and len(rejected) <= 32
        assert chosen != rejected  # main: left truncation kept only the shared ending, token-identical
        assert chosen[0] == tok.cls_token_id and chosen[-1] == tok.sep_token_id  # the special edges are kept
        # the answers' first words, which decide the pair, are kept; the shared question was cut first
        text_c, text_r = tok.decode(chosen, skip_special_tokens=True), tok.decode(rejected, skip_special_tokens=True)
        assert "Yes." in text_c and "No." in text_r and "Is it ok" not in text_c
    # an ordinary pair that fits is tokenized exactly as before
    text = rm_model.rm_text(comps[3].conversation(0).conversations, "encoder", tok)
    assert rows[3]["input_ids"][0] == heads.tokenize_left(tok, [text], 32)[0]


def test_pairs_identical_after_tokenization_are_dropped_and_counted(tmp_path):
    from tokenizers import normalizers

    from steerlm import models

    _, tok = models.tiny_encoder()
    tok.backend_tokenizer.normalizer = normalizers.Lowercase()  # as an uncased tokenizer (MiniLM's) reads text
    path = tmp_path / "case.jsonl"
    head = "\n\nHuman: Say yes.\n\nAssistant: "
    path.write_text(json.dumps({"chosen": head + "Yes!", "rejected": head + "yes!"}) + "\n"
                    + json.dumps({"chosen": head + "Yes!", "rejected": head + "No."}) + "\n")  # fmt: skip
    stats = Counter()
    comps = preferences.comparisons_from_hh(hh.read_pairs(path, stats=stats))
    assert stats["identical"] == 0  # as text the two answers differ
    for c in comps:
        c.origin = "case.jsonl"
    dropped = {}
    rows = reward.encode_comparisons(comps, "encoder", tok, 64, dropped)
    assert len(rows) == 1 and rows[0]["chars"] == [4, 3]
    assert dropped == {"case.jsonl": Counter({invariants.IDENTICAL: 1})}


def test_train_rm_on_the_issue_input_keeps_every_pair_distinct(tmp_path):
    data = yes_no_pairs(tmp_path / "pairs.jsonl")
    # mean pooling: every kept token moves the score, so a margin above float noise shows the two sides differ
    # (a random tiny encoder's pooler reads [CLS] alone and barely moves after one step)
    summary = reward.main(reward.Config(data=[data], val_data=[data], out=str(tmp_path / "rm"), model="tiny-encoder",
                                        pooling="mean",
                                        train=reward.RMTrainArgs(max_steps=1, max_length=32, batch_size=6)))  # fmt: skip
    counts = summary["data"]
    assert counts["train:pairs.jsonl"]["train_pairs"] == 6 and counts["val:pairs.jsonl"]["val_pairs"] == 6
    assert invariants.IDENTICAL not in counts["val:pairs.jsonl"]
    # No held-out pair is a tie any more: each has a margin that is not float noise.
    rm = rm_model.load_rm(tmp_path / "rm")
    comps = preferences.comparisons_from_hh(hh.read_pairs(data))
    rows = reward.encode_comparisons(comps, "encoder", rm.tokenizer, 32)
    scores = rm_model.score_ids(rm.model, [ids for r in rows for ids in r["input_ids"]], rm.tokenizer.pad_token_id, 16)
    assert all(abs(scores[2 * i] - scores[2 * i + 1]) > 1e-4 for i in range(6))


def test_train_rm_refuses_when_no_comparison_is_left_after_tokenization(tmp_path, capsys):
    data = yes_no_pairs(tmp_path / "pairs.jsonl")
    # max_length 2 leaves [CLS] [SEP]: every pair is the same two tokens on both sides
    code = cli.run(["train-rm", data, "--val-data", data, "--model", "tiny-encoder", "--out", str(tmp_path / "rm"),
                    "--train.max_length", "2", "--train.max_steps", "1"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "train.max_length" in err and "no training comparison left after tokenization" in err
    assert "'identical after tokenization': 6" in err


def test_answers_that_read_the_same_to_the_reward_model_tie_exactly(tmp_path):
    # Evaluation pairs judged by a reward model (steerlm evaluate): two answers whose tokens, after the scorer's
    # truncation, are the same must tie, whatever else shares their batches.
    from steerlm.evaluation.statistics import outcome

    out = tmp_path / "rm"
    reward.main(reward.Config(data=[yes_no_pairs(tmp_path / "p.jsonl")], out=str(out), model="tiny-encoder",
                              val_fraction=0.5, train=reward.RMTrainArgs(max_steps=1, max_length=24)))  # fmt: skip
    rm = rm_model.load_rm(out)
    a, b = "Yes. " + SHARED_ENDING, "No. " + SHARED_ENDING  # differ only where a 24-token window cannot see
    others = [("Hi", "x " * n) for n in range(1, 12)]
    scores = rm.score([("Is it ok?", a), *others, ("Is it ok?", b)], batch_size=3)
    assert scores[0] == scores[-1] and outcome(scores[0], scores[-1]) == 0.5

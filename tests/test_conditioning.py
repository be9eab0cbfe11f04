"""The conditioning module: corrupted attribute strings, the discriminative term (GeDi §3.1), and the model's own
attribute read-out; the read-out rises above chance with the discriminative term and beats plain NLL."""

import json
import random
from collections import Counter
from functools import partial

import pytest
import torch

from steerlm import cli, conditioning, models, sft
from steerlm.attributes import AttributeSchema
from steerlm.config import LoraArgs
from steerlm.data import collate, templates
from steerlm.data.records import Record, Turn, write_records

SCHEMA = AttributeSchema(("humor", "verbosity"), levels=4)
#: A synthetic attribute the data makes obvious: the answer's one last word names the humor level, after a long
#: shared opening that does not depend on it (as most answer tokens do not depend on the attributes in real data).
MARKS = ["apple", "river", "stone", "cloud"]
OPENING = "The quick brown fox jumps over the lazy dog, and then"


def synthetic(n: int, seed: int) -> list[Record]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        level = rng.randrange(4)
        answer = f"{OPENING} {MARKS[level]}."
        out.append(Record([Turn("User", f"Question {i}: tell me a word."),
                           Turn("Assistant", answer, f"humor:{level},verbosity:{rng.randrange(4)}")]))  # fmt: skip
    return out


def test_corruption_moves_one_attribute_to_another_level_far_more_often():
    rng = random.Random(0)
    moved, distance = Counter(), Counter()
    for _ in range(4000):
        new = conditioning.corrupt_levels({"humor": 0, "verbosity": 2}, 3, rng, power=1.0)
        changed = [k for k in new if new[k] != {"humor": 0, "verbosity": 2}[k]]
        assert len(changed) == 1
        moved[changed[0]] += 1
        if changed[0] == "humor":
            distance[new["humor"]] += 1
    assert abs(moved["humor"] - moved["verbosity"]) < 300  # the attribute is drawn uniformly
    assert distance[3] > distance[2] > distance[1] > 0  # levels far from the true one more often (|d| ** 1)
    assert abs(distance[3] / distance[1] - 3) < 0.6
    uniform = Counter(conditioning.corrupt_levels({"humor": 0}, 3, rng, power=0.0)["humor"] for _ in range(3000))
    assert set(uniform) == {1, 2, 3} and max(uniform.values()) - min(uniform.values()) < 200
    with pytest.raises(ValueError):
        conditioning.corrupt_levels({}, 3, rng)
    # 'each': every attribute moves with probability 1/2, at least one moves
    n_moved = Counter()
    for _ in range(3000):
        new = conditioning.corrupt_levels({"humor": 0, "verbosity": 2}, 3, rng, mode="each")
        n_moved[sum(new[k] != v for k, v in {"humor": 0, "verbosity": 2}.items())] += 1
    assert n_moved[0] == 0 and abs(n_moved[2] / 3000 - 1 / 4) < 0.04  # none moved: one is drawn instead


def test_corrupt_records_only_touches_trained_labelled_turns():
    r = Record([Turn("User", "q"), Turn("Assistant", "a1", "humor:1"), Turn("User", "q2"),
                Turn("Assistant", "a2", "humor:2,verbosity:0")])  # fmt: skip
    unlabelled = Record([Turn("User", "q"), Turn("Assistant", "a", None)])
    twin, none = conditioning.corrupt_records([r, unlabelled], SCHEMA, seed=1)
    assert none is None
    assert twin.conversations[1].label != "humor:1" and twin.conversations[3].label != "humor:2,verbosity:0"
    assert [t.value for t in twin.conversations] == [t.value for t in r.conversations]
    assert r.conversations[1].label == "humor:1"  # the input is not modified


def test_trained_turns_follow_the_masks_one_rule():
    """The conditioning works on exactly the turns the loss falls on (SPEC §4 via templates.is_trained)."""
    convo = [Turn("User", "q"), Turn("Assistant", "a1", "humor:1"), Turn("User", "q2"),
             Turn("Assistant", "a2", "humor:2", {templates.NO_LOSS: True}), Turn("User", "q3"),
             Turn("Assistant", "a3", "humor:3")]  # fmt: skip
    assert conditioning.trained_turns(Record(convo)) == [1, 5]
    assert conditioning.trained_turns(Record(convo, mask="Assistant")) == []  # the masked role carries no loss
    twin = conditioning.corrupt_records([Record(convo, mask="Assistant")], SCHEMA, seed=1)
    assert twin == [None]  # so it gets no corrupted twin either


def test_movable_attributes_alone_move():
    rng = random.Random(3)
    for mode in ("one", "each"):
        for _ in range(200):
            new = conditioning.corrupt_levels({"humor": 0, "verbosity": 2}, 3, rng, mode=mode, movable=["verbosity"])
            assert new["humor"] == 0 and new["verbosity"] != 2  # every pair contrasts verbosity, humor stays true
    with pytest.raises(ValueError):
        conditioning.corrupt_levels({"humor": 0}, 3, rng, movable=["verbosity"])
    # a turn whose label lacks every movable attribute gets no twin
    only_humor = Record([Turn("User", "q"), Turn("Assistant", "a", "humor:1")])
    both = Record([Turn("User", "q"), Turn("Assistant", "a", "humor:1,verbosity:3")])
    none, twin = conditioning.corrupt_records([only_humor, both], SCHEMA, seed=1, movable=["verbosity"])
    assert none is None and SCHEMA.parse(twin.conversations[1].label)["humor"] == 1
    assert SCHEMA.parse(twin.conversations[1].label)["verbosity"] != 3
    assert conditioning.ConditioningLossArgs(attributes=["verbosity,humor"]).attributes == ["verbosity", "humor"]
    with pytest.raises(ValueError, match="reduce must be one of sum, mean"):
        conditioning.ConditioningLossArgs(reduce="max")
    with pytest.raises(ValueError, match="scale must be in"):
        conditioning.ConditioningLossArgs(scale=0)


def test_shares_set_how_often_each_attribute_is_the_one_that_moves():
    rng = random.Random(5)
    shares = {"verbosity": 4, "humor": 1, "quality": 0}
    moved = Counter()
    for _ in range(3000):
        new = conditioning.corrupt_levels({"humor": 0, "quality": 1, "verbosity": 2}, 3, rng, shares=shares)
        changed = [n for n, v in new.items() if v != {"humor": 0, "quality": 1, "verbosity": 2}[n]]
        assert len(changed) == 1  # one attribute per pair, as without shares
        moved[changed[0]] += 1
    assert moved["quality"] == 0 and 0.75 < moved["verbosity"] / 3000 < 0.85  # 4 : 1 : 0
    # a label whose only attributes have share 0 gets no twin
    only_humor = Record([Turn("User", "q"), Turn("Assistant", "a", "humor:1")])
    assert conditioning.corrupt_records([only_humor], SCHEMA, seed=1, shares={"humor": 0}) == [None]
    with pytest.raises(ValueError, match="shares apply to corrupt='one'"):
        conditioning.ConditioningLossArgs(corrupt="each", shares={"verbosity": 2})
    with pytest.raises(ValueError, match="finite numbers >= 0"):
        conditioning.ConditioningLossArgs(shares={"verbosity": -1})
    with pytest.raises(ValueError, match="not in attributes"):
        conditioning.ConditioningLossArgs(attributes=["verbosity"], shares={"humor": 1})
    with pytest.raises(ValueError, match="none of attributes to move"):
        conditioning.ConditioningLossArgs(attributes=["verbosity"], shares={"verbosity": 0})


def twin_batch(tok) -> tuple[list[dict], dict]:
    """Three synthetic answers with their corrupted twins: the examples and their padded batch (6 rows)."""
    records = synthetic(3, seed=1)
    twins = conditioning.corrupt_records(records, SCHEMA, seed=0)
    examples = [conditioning.pair_example(templates.encode(r, tok, "chat"), templates.encode(t, tok, "chat"))
                for r, t in zip(records, twins, strict=True)]  # fmt: skip
    return examples, conditioning.collate_pairs(examples, tok.pad_token_id)


def test_twin_rows_never_enter_the_nll_and_the_term_is_the_softplus_of_the_gap():
    model, tok = models.tiny_causal_lm()
    examples, batch = twin_batch(tok)
    assert batch["input_ids"].shape[0] == 6 and batch["pair_of"].tolist() == [-1, -1, -1, 0, 1, 2]
    plain = conditioning.collate_pairs(
        [{k: e[k] for k in ("input_ids", "labels")} for e in examples], tok.pad_token_id
    )
    with torch.no_grad():
        nll_only, m0 = conditioning.conditioned_lm_loss(model, batch, weight=0.0)
        reference = model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"],
                          labels=plain["labels"]).loss  # fmt: skip
        both, m1 = conditioning.conditioned_lm_loss(model, batch, weight=2.0)
        nll, mask = conditioning.token_nll(model, batch)
    # the NLL is the true rows' per-token loss, exactly what plain SFT computes: the twins are not in it
    assert torch.allclose(nll_only, reference, atol=1e-5) and torch.allclose(m1["nll"], reference, atol=1e-5)
    logp = -(nll * mask).sum(1)
    expected = torch.nn.functional.softplus(logp[3:] - logp[:3]).mean()
    assert torch.allclose(both, reference + 2.0 * expected, atol=1e-5)
    # the twins score the same answer tokens as their true rows
    assert mask[:3].sum(1).tolist() == mask[3:].sum(1).tolist()
    # GeDi's length-normalised form: the gap of per-token means, sharpened by scale
    with torch.no_grad():
        normalised, m2 = conditioning.conditioned_lm_loss(model, batch, weight=2.0, reduce="mean", scale=30.0)
    per_token = logp / mask.sum(1)
    expected = torch.nn.functional.softplus(30.0 * (per_token[3:] - per_token[:3])).mean()
    assert torch.allclose(normalised, reference + 2.0 * expected, atol=1e-5)
    assert m2["disc_acc"] == m1["disc_acc"]  # the same pairs are right: normalising by equal lengths keeps the sign


def test_the_clipped_gap_caps_each_tokens_share_and_is_the_plain_term_when_nothing_reaches_the_clip():
    model, tok = models.tiny_causal_lm()
    _, batch = twin_batch(tok)
    with torch.no_grad():
        nll, mask = conditioning.token_nll(model, batch)
        for reduce in ("sum", "mean"):
            plain, _ = conditioning.conditioned_lm_loss(model, batch, weight=2.0, reduce=reduce, scale=3.0)
            wide, _ = conditioning.conditioned_lm_loss(model, batch, weight=2.0, reduce=reduce, scale=3.0,
                                                       gap_clip=1e6)  # fmt: skip
            torch.testing.assert_close(wide, plain, rtol=1e-5, atol=1e-5)  # summation order only
        clipped, metrics = conditioning.conditioned_lm_loss(model, batch, weight=2.0, reduce="mean", gap_clip=1e-3)
    # by hand: token t of pair i adds max(log p(t | corrupted) - log p(t | true), -0.001), averaged over the answer
    gaps = [nll[i][mask[i]] - nll[3 + i][mask[3 + i]] for i in range(3)]  # the twin's tokens are its true row's
    expected = torch.stack([torch.nn.functional.softplus(g.clamp(min=-1e-3).mean()) for g in gaps]).mean()
    torch.testing.assert_close(clipped, metrics["nll"] + 2.0 * expected)
    assert any(bool((g < -1e-3).any()) for g in gaps)  # the clip is reached, so it changed the term
    with pytest.raises(ValueError, match="gap_clip"):
        conditioning.ConditioningLossArgs(gap_clip=-1)


def test_align_trained_cuts_both_to_the_same_answer_tokens():
    a = [-100, -100, 5, 6, 7]
    b = [-100, -100, -100, 5, 6]
    assert conditioning.align_trained(a, b) == ([-100, -100, 5, 6, -100], b)


def train_readout(weight: float, steps: int) -> dict:
    model, tok = models.tiny_causal_lm()
    train_records = synthetic(64, seed=2)
    held_out = synthetic(16, seed=3)
    twins = conditioning.corrupt_records(train_records, SCHEMA, seed=0)
    examples = [conditioning.pair_example(templates.encode(r, tok, "chat"),
                                          templates.encode(t, tok, "chat") if weight > 0 else None)
                for r, t in zip(train_records, twins, strict=True)]  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    model.train()
    torch.manual_seed(0)
    for _ in range(steps):
        batch = conditioning.collate_pairs(rng.sample(examples, 8), tok.pad_token_id)
        loss, _ = conditioning.conditioned_lm_loss(model, batch, weight=weight)
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    items = conditioning.readout_items(held_out, SCHEMA, ["humor"])
    return conditioning.readout(model, tok, items, SCHEMA, "chat", 256, batch_size=16)["humor"]


def test_readout_rises_above_chance_with_the_discriminative_term_and_beats_plain_nll():
    with_term = train_readout(1.0, 40)
    plain = train_readout(0.0, 40)
    assert with_term["n"] == 16 and with_term["chance"] == 0.25
    # measured: accuracy 0.44 / Spearman +0.95 with the term, 0.31 / -0.29 with plain NLL after the same 40 steps
    assert with_term["accuracy"] > with_term["chance"] and with_term["spearman"] > 0.6
    assert with_term["accuracy"] > plain["accuracy"] and with_term["spearman"] > (plain["spearman"] or 0) + 0.3


def test_readout_scores_the_true_line_once_per_answer_and_matches_scoring_each_attribute_alone(monkeypatch):
    torch.manual_seed(0)
    model, tok = models.tiny_causal_lm()
    model.eval()
    items = conditioning.readout_items(synthetic(3, seed=5), SCHEMA)
    score = conditioning.answer_logps
    scored = []

    def spy(model, examples, *args, **kwargs):
        scored.append(len(examples))
        return score(model, examples, *args, **kwargs)

    monkeypatch.setattr(conditioning, "answer_logps", spy)
    result = conditioning.readout(model, tok, items, SCHEMA, "chat", 256, batch_size=1)
    assert sum(scored) == 3 * (2 * (4 - 1) + 1)  # 2 attributes x 3 other levels, + the true line once, per answer
    for name in SCHEMA.names:  # reference: every level of one attribute scored on its own
        expected = []
        for it in items:
            base = SCHEMA.parse(it.record.conversations[it.turn].label)
            rows = [templates.encode(conditioning._copy(it.record, {it.turn: SCHEMA.render({**base, name: level})}),
                                     tok, "chat") for level in range(4)]  # fmt: skip
            post = torch.softmax(torch.tensor(score(model, rows, tok.pad_token_id, 1, "cpu")), dim=0)
            expected.append(float((post * torch.arange(4)).sum()))
        assert result[name]["mean_expected"] == pytest.approx(sum(expected) / len(expected), abs=1e-5)


def test_sft_logs_the_readout_and_the_discriminative_term(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_records(data / "train.jsonl", synthetic(24, seed=4))
    write_records(data / "val.jsonl", synthetic(6, seed=5))
    (data / "stats.json").write_text(json.dumps({"attributes": {"names": ["humor"], "levels": 4}}))  # as prepare
    out = tmp_path / "sft"
    args = ["sft", "--model=tiny-lm", f"--data={data}", f"--out={out}", "--train.max_steps=4", "--train.lr=1e-3",
            "--train.batch_size=4", "--train.log_every=1", "--readout_examples=4", "--template=chat"]  # fmt: skip
    assert cli.run(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["readout"]) == {"humor", "verbosity"} and summary["readout"]["humor"]["n"] == 4
    assert summary["attributes"]["levels"] == 4  # read from the data folder's stats.json
    assert summary["steering"]["answers with a corrupted twin (conditioning_loss)"] == 24
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("disc_loss" in r for r in rows) and any("readout_humor_accuracy" in r for r in rows)
    meta = json.loads((out / "best" / "steerlm_model.json").read_text())
    assert meta["conditioning_loss"] == {
        "weight": 1.0,
        "distance_power": 1.0,
        "corrupt": "one",
        "attributes": [],
        "shares": {},
        "reduce": "sum",
        "scale": 1.0,
        "gap_clip": 0.0,
    }
    # the command: any SteerLM model and a records file
    report = tmp_path / "readout.json"
    assert cli.run(["readout", f"--model={out / 'best'}", f"--data={data}", f"--out={report}", "--examples=3"]) == 0
    assert json.loads(report.read_text())["attributes"]["humor"]["n"] == 3
    # weight 0: no twins built (today's plain NLL)
    out0 = tmp_path / "sft0"
    assert cli.run([*args[:3], f"--out={out0}", *args[4:], "--conditioning_loss.weight=0"]) == 0
    summary0 = json.loads((out0 / "summary.json").read_text())
    assert "answers with a corrupted twin (conditioning_loss)" not in summary0["steering"]
    # the twins may move only attributes of the line
    bad = cli.run([*args[:3], f"--out={tmp_path / 'bad'}", *args[4:], "--conditioning_loss.attributes=quality"])
    assert bad == 2


def test_readout_command_errors_are_located(tmp_path):
    model, tok = models.tiny_causal_lm()
    meta = {"attributes": SCHEMA.to_dict(), "template": "chat", "conditioning": "attributes", "base_model": "tiny-lm",
            "lora": False}  # fmt: skip
    models.save_model(model, tok, tmp_path / "m", sft.META, meta)
    bad = tmp_path / "bad.jsonl"
    write_records(bad, [Record([Turn("User", "q"), Turn("Assistant", "a", "humor:9")])])
    assert cli.run(["readout", f"--model={tmp_path / 'm'}", f"--data={bad}"]) == 2
    assert cli.run(["readout", f"--model={tmp_path / 'm'}", f"--data={bad}", "--attributes=quality"]) == 2


def test_loss_sums_match_token_nll():
    model, tok = models.tiny_causal_lm()
    examples = [templates.encode(r, tok, "chat") for r in synthetic(5, seed=6)]
    collate = partial(conditioning.collate_pairs, pad_id=tok.pad_token_id)
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    with torch.no_grad():
        total = conditioning.loss_sums(model, examples, collate, 2, acc)
        nll, mask = conditioning.token_nll(model, collate(examples))
    assert torch.allclose(total[0].float(), (nll * mask).sum(), rtol=1e-4) and int(total[1]) == int(mask.sum())


def _full_logits(monkeypatch):
    """Make every caller take the whole-sequence logits path, as a model without a per-row `logits_to_keep` does."""
    monkeypatch.setattr(conditioning, "supports_logits_to_keep", lambda model, per_row=False: False)


@pytest.mark.parametrize("capacity", [0, 96])
def test_token_nll_on_the_labelled_positions_equals_the_whole_sequence_logits(monkeypatch, capacity):
    model, tok = models.tiny_causal_lm()
    model.eval()
    assert collate.supports_logits_to_keep(model, per_row=True)
    records = synthetic(4, seed=3)
    twins = conditioning.corrupt_records(records, SCHEMA, seed=0)
    examples = [conditioning.pair_example(templates.encode(r, tok, "chat"), templates.encode(t, tok, "chat"))
                for r, t in zip(records, twins, strict=True)]  # fmt: skip
    batch = conditioning.collate_pairs(examples, tok.pad_token_id, capacity=capacity)

    def loss_and_grads():
        model.zero_grad()
        loss, _ = conditioning.conditioned_lm_loss(model, batch, weight=1.0, reduce="mean", scale=10.0)
        loss.backward()
        nll, mask = conditioning.token_nll(model, batch)
        return loss.detach(), nll.detach(), mask, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    kept = loss_and_grads()
    with monkeypatch.context() as m:
        _full_logits(m)
        full = loss_and_grads()
    assert torch.equal(kept[2], full[2]) and int(kept[2].sum()) > 0
    assert torch.allclose(kept[1], full[1], atol=1e-5) and bool((kept[1][~kept[2]] == 0).all())
    assert torch.allclose(kept[0], full[0], atol=1e-5)
    assert len(kept[3]) == len(full[3]) > 0
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(kept[3], full[3], strict=True))


def test_supports_logits_to_keep_sees_through_wrappers_and_refuses_models_without_per_row_slicing():
    model, _ = models.tiny_causal_lm()
    lora = models.apply_lora(model, LoraArgs(r=4, alpha=8))

    class Wrapped(torch.nn.Module):  # the shape of DistributedDataParallel: the model under `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert collate.supports_logits_to_keep(Wrapped(lora), per_row=True)

    class Old(torch.nn.Module):  # takes an int `logits_to_keep` but slices every row alike
        def forward(self, input_ids, logits_to_keep=0):
            return input_ids

    class Plain(torch.nn.Module):
        def forward(self, input_ids):
            return input_ids

    assert collate.supports_logits_to_keep(Old()) and not collate.supports_logits_to_keep(Old(), per_row=True)
    assert not collate.supports_logits_to_keep(Plain())

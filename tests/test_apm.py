"""SteerLM step 1: the attribute prediction model (train-apm), its metrics and eval-apm, on tiny random models and
real OASST records."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from steerlm import apm, apm_eval, apm_model, cli, heads, metrics, models, train
from steerlm import config as config_lib
from steerlm.attributes import AttributeSchema
from steerlm.data.records import Record, Turn, read_records, write_records
from steerlm.errors import UserError

SCHEMA = AttributeSchema()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, oasst_split):
    """~20 training and ~8 validation records from the real OASST slice, split by tree, as `prepare` writes them."""
    train_r, val_r = oasst_split
    folder = tmp_path_factory.mktemp("data")
    write_records(folder / "train.jsonl", train_r[:20])
    write_records(folder / "val.jsonl", val_r[:8])
    write_records(folder / "train_t2v.jsonl", (r.with_type("TEXT_TO_VALUE") for r in train_r[:20]))
    write_records(folder / "val_t2v.jsonl", (r.with_type("TEXT_TO_VALUE") for r in val_r[:8]))
    return folder


def _train(monkeypatch, cfg: apm.Config) -> tuple[dict, torch.nn.Module]:
    """Run train-apm, keeping the in-memory model `fit` trained (with max_steps inside one epoch, the only validation
    is at the end, so the saved best model is that final model)."""
    trained = {}
    real_fit = train.fit

    def spy(model, *args, **kwargs):
        trained["model"] = model
        return real_fit(model, *args, **kwargs)

    monkeypatch.setattr(train, "fit", spy)
    summary = apm.main(cfg)
    return summary, trained["model"]


def _cfg(data_dir, out, **kw) -> apm.Config:
    train_args = apm.APMTrainArgs(max_steps=3, batch_size=4, lr=1e-3, log_every=1, warmup_ratio=0.0)
    # the gradient fit unless a test asks for the (default) ridge head
    return config_lib.build(apm.Config, {"data": str(data_dir), "out": str(out), "train": train_args,
                                         "head_fit": "gradient", **kw})  # fmt: skip


def _assert_in_range(preds, n, schema):
    assert len(preds) == n
    for p in preds:
        assert set(p) <= set(schema.names)
        assert all(0.0 <= v <= schema.max_level for v in p.values())


def test_regression_apm_trains_saves_and_reloads(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "apm"
    summary, model = _train(monkeypatch, _cfg(data_dir, out, model="tiny-encoder"))
    best = out / apm_model.BEST
    meta = json.loads((best / apm_model.META).read_text())
    # the defaults: [CLS] context [SEP] response [SEP], the pooler, the length input, levels predicted directly
    assert meta["kind"] == "regression" and meta["backbone"] == "encoder" and meta["pooling"] == "cls"
    assert meta["input"] == "pair" and meta["length_feature"] is True and meta["scale"] == "levels"
    assert meta["max_length"] == 256 and set(meta["train_means"]) == set(meta["attributes"]["names"])
    assert (out / "metrics.jsonl").exists() and (out / "config.yaml").exists()
    assert not (out / train.CHECKPOINT).exists()  # a finished run keeps only the model
    assert summary["val_metrics"]["quality"]["n"] > 0

    # every parameter of the backbone moved, the pooler too (the 'cls' read-out uses it)
    initial, _ = models.tiny_encoder(0)
    trained_backbone = models.load_encoder(str(best))[0]
    for (name, before), after in zip(initial.named_parameters(), trained_backbone.parameters(), strict=True):
        assert not torch.equal(before, after.cpu()), name
    # a length-input APM is the backbone plus apm_head.safetensors (no transformers class takes a length input)
    head = load_file(str(best / apm_model.HEAD))
    assert head["weight"].shape[1] == initial.config.hidden_size + 1
    start_bias = torch.tensor([meta["train_means"][n] for n in meta["attributes"]["names"]])
    assert not torch.allclose(head["bias"], start_bias)

    # the folder loads back (by the run folder or by best/) and predicts exactly what the trained model predicts
    records = read_records(data_dir / "val.jsonl")
    loaded = apm_model.load_apm(out)
    in_memory = apm_model.APM(model.eval(), loaded.tokenizer, meta)
    preds = loaded.predict(records, batch_size=3)
    _assert_in_range(preds, len(records), loaded.schema)
    assert all(set(p) == set(loaded.schema.names) for p in preds)
    for a, b in zip(preds, apm_model.load_apm(best).predict(records, batch_size=5), strict=True):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a)  # other padding: float noise
    for a, b in zip(preds, in_memory.predict(records), strict=True):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a)
    # batched (padded, length-sorted) scoring equals one conversation at a time
    for record, p in zip(records[:3], preds, strict=False):
        single = loaded.predict([record], batch_size=1)[0]
        assert all(abs(single[k] - p[k]) < 1e-4 for k in p)
    labels = [loaded.label(p) for p in preds]
    assert all(SCHEMA.parse(label) for label in labels)


def test_causal_regression_apm_reads_last_token(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "apm"
    _train(monkeypatch, _cfg(data_dir, out, model="tiny-lm", attributes=["quality", "humor"]))
    loaded = apm_model.load_apm(out)
    assert loaded.backbone == "causal" and loaded.meta["pooling"] == "last"
    assert loaded.schema.names == ("quality", "humor")
    preds = loaded.predict([("Tell me a joke.", "Why did the chicken cross the road?")] * 2)
    _assert_in_range(preds, 2, loaded.schema)
    assert preds[0] == preds[1]


def test_length_feature_and_head_lr(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "apm"
    train_args = apm.APMTrainArgs(max_steps=3, batch_size=4, lr=1e-9, head_lr=1e-2, log_every=1, warmup_ratio=0.0)
    cfg = config_lib.build(apm.Config, {"data": str(data_dir), "out": str(out), "train": train_args,
                                        "model": "tiny-encoder", "length_feature": True, "head_fit": "gradient"})  # fmt: skip
    _, model = _train(monkeypatch, cfg)
    head = load_file(str(out / apm_model.BEST / apm_model.HEAD))
    hidden = models.tiny_encoder(0)[0].config.hidden_size
    assert head["weight"].shape[1] == hidden + 1  # the length input
    # the head moved at head_lr (from zero weights) while the backbone, at lr 1e-9, barely did
    assert head["weight"].abs().max() > 1e-3 and head["weight"][:, -1].abs().max() > 1e-3
    initial = dict(models.tiny_encoder(0)[0].named_parameters())
    for name, p in model.backbone.named_parameters():
        assert torch.allclose(p.detach().cpu(), initial[name], atol=1e-6), name
    loaded = apm_model.load_apm(out)
    assert loaded.meta["length_feature"] is True
    short, long = loaded.predict([("Explain tides.", "Gravity."), ("Explain tides.", "Gravity. " * 60)])
    assert len(short) == len(long) == len(loaded.schema.names)


def test_generative_apm_trains_saves_and_reloads(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "apm"
    summary, model = _train(monkeypatch, _cfg(data_dir, out, model="tiny-lm", kind="generative"))
    best = out / apm_model.BEST
    meta = json.loads((best / apm_model.META).read_text())
    assert meta["kind"] == "generative" and meta["template"] == "nemo"
    initial, _ = models.tiny_causal_lm(0)
    trained = models.load_causal_lm(str(best))[0]
    for (name, before), after in zip(initial.named_parameters(), trained.parameters(), strict=True):
        assert not torch.equal(before, after.cpu()), name

    records = read_records(data_dir / "val.jsonl")
    loaded = apm_model.load_apm(out)
    preds = loaded.predict(records, batch_size=4)
    _assert_in_range(preds, len(records), loaded.schema)
    # a random tiny LM mostly emits unparseable strings: each one is counted, and its prediction is empty
    assert loaded.parse_failures == sum(not p for p in preds)
    assert all(float(v).is_integer() for p in preds for v in p.values())
    in_memory = apm_model.APM(model.eval(), loaded.tokenizer, meta)
    assert in_memory.predict(records, batch_size=4) == preds
    assert summary["val_parse_failures"] >= 0


def test_train_apm_cli_with_builtin_tiny_model(data_dir, tmp_path, capsys):
    out = tmp_path / "apm"
    argv = ["train-apm", f"--data={data_dir}", f"--out={out}", "--model=tiny-encoder", "--train.max_steps=2",
            "--train.batch_size=4", "--attributes=quality,helpfulness", "--pooling=response", "--head_fit=gradient"]  # fmt: skip
    assert cli.run(argv) == 0
    assert "train-apm: 2 steps" in capsys.readouterr().out
    loaded = apm_model.load_apm(out)
    assert loaded.schema.names == ("quality", "helpfulness") and loaded.meta["pooling"] == "response"
    _assert_in_range(loaded.predict(read_records(data_dir / "val.jsonl")), 8, loaded.schema)
    # an existing output needs --overwrite or --resume
    assert cli.run(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.run(argv + ["--resume"]) == 0  # finished already: nothing to do
    assert "already complete" in capsys.readouterr().out
    assert cli.run(argv + ["--overwrite"]) == 0


def test_default_recipe_is_the_ridge_head_with_a_chosen_layer(data_dir, tmp_path, capsys):
    """The defaults: a ridge head (no steps); on a causal LM it reads the state two thirds up with the last, saved
    resolved in config.yaml and the metadata; an encoder reads its last state; LoRA or a generative APM train by
    gradient."""
    out = tmp_path / "lm"
    assert cli.run(["train-apm", f"--data={data_dir}", f"--out={out}", "--model=tiny-lm",
                    "--attributes=quality,humor"]) == 0  # fmt: skip
    assert "ridge head fitted" in capsys.readouterr().out
    meta = apm_model.load_apm(out).meta
    layers = [round(apm.AUTO_DEPTH * models.tiny_causal_lm(0)[0].config.num_hidden_layers), -1]
    assert meta["head_fit"] == "ridge" and meta["hidden_layers"] == layers == [1, -1]
    saved = config_lib.load(apm.Config, config=str(out / "config.yaml"))
    assert saved.hidden_layers == layers and saved.head_fit == "ridge"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["step"] == 0 and rows[0]["val_loss"] > 0  # the run's one row
    assert cli.run(["train-apm", f"--data={data_dir}", f"--out={tmp_path / 'enc'}", "--model=tiny-encoder",
                    "--attributes=quality"]) == 0  # fmt: skip
    assert apm_model.load_apm(tmp_path / "enc").meta["hidden_layers"] == []
    lora = config_lib.build(apm.Config, {"data": str(data_dir), "model": "tiny-lm", "train": {"lora": {"r": 4}}})
    assert lora.head_fit == "gradient"
    assert config_lib.build(apm.Config, {"data": str(data_dir), "kind": "generative"}).head_fit == "gradient"
    assert apm.Config(data=str(data_dir)).model == "smollm2-135m-instruct"


def test_generative_parser_is_strict():
    meta = {"kind": "generative", "attributes": {"names": ["quality", "humor"], "levels": 10}, "backbone": "causal",
            "max_length": 64}  # fmt: skip
    scorer = apm_model.APM(None, None, meta)
    assert scorer._parse("quality:7,humor:2\n<extra_id_1>") == {"quality": 7.0, "humor": 2.0}
    assert scorer._parse("humor:3<extra_id_1>") == {"humor": 3.0}
    broken = ["quality:12", "quality:x,humor:1", "quality:1,quality:2", "toxicity:1", "quality 7", "", "\n",
              "quality:7,humor:2 extra", "quality:-1"]  # fmt: skip
    for text in broken:
        assert scorer._parse(text) == {}, text
    assert scorer.parse_failures == len(broken)
    assert scorer.failed_outputs == broken


def test_masked_mse_ignores_missing_labels():
    pred = torch.tensor([[0.5, 0.9], [0.1, 0.2]])
    target = torch.tensor([[0.5, 0.0], [0.3, 0.0]])
    present = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert apm.masked_mse(pred, target, present).item() == pytest.approx(0.02)


def test_plain_text_is_truncated_from_the_left_and_the_response_is_pooled():
    _, tokenizer = models.tiny_encoder(0)
    turns = [Turn("User", "a long question " * 50), Turn("Assistant", "The answer is Paris.")]
    text = heads.plain_text(turns)
    assert text.startswith("User: a long") and text.endswith("\n\nAssistant: The answer is Paris.")
    ids, masks, types, lengths = apm_model.regression_inputs([apm_model.Example("", turns)], "encoder", tokenizer, 16)
    assert types is None and lengths is None  # plain input: no segments, the length is what the input holds
    assert len(ids[0]) == len(masks[0]) == 16
    assert tokenizer.decode(ids[0], skip_special_tokens=True).endswith("The answer is Paris.")
    response = [t for t, m in zip(ids[0], masks[0], strict=True) if m]
    assert tokenizer.decode(response).strip() == "The answer is Paris."
    assert masks[0][-1] == 0  # [SEP]
    # Folders from now on give the length input the whole response's token count, even where the input is cut.
    long = [Turn("User", "Hi"), Turn("Assistant", "word " * 40)]
    _, _, _, lengths = apm_model.regression_inputs([apm_model.Example("", long)], "encoder", tokenizer, 16,
                                                   whole_length=True)  # fmt: skip
    assert lengths == [len(tokenizer("word " * 40, add_special_tokens=False)["input_ids"])] and lengths[0] > 16


def test_opening_input_reads_the_beginning_of_a_long_response_after_its_context():
    _, tokenizer = models.tiny_causal_lm(0)
    words = " ".join(f"w{i}" for i in range(120))
    turns = [Turn("User", "first question " * 30), Turn("Assistant", words)]
    whole = len(tokenizer(words, add_special_tokens=False)["input_ids"])
    ids, masks, _, lengths = apm_model.regression_inputs([apm_model.Example("", turns)], "causal", tokenizer, 64,
                                                         "opening", response_tokens=20)  # fmt: skip
    assert lengths == [whole] and whole > 64  # the length input still counts the whole response
    response = tokenizer.decode([t for t, m in zip(ids[0], masks[0], strict=True) if m])
    first = tokenizer(words, add_special_tokens=False)["input_ids"][:20]
    assert sum(masks[0]) == 21 and response.lstrip() == tokenizer.decode(first) + tokenizer.eos_token  # 20 + EOS
    assert len(ids[0]) == 64 and "question" in tokenizer.decode(ids[0])  # the context fills the rest
    assert tokenizer.decode(ids[0]).endswith(tokenizer.eos_token)
    # 'plain' keeps the end of the same response instead
    ids, masks, _, _ = apm_model.regression_inputs([apm_model.Example("", turns)], "causal", tokenizer, 64)
    assert "w119" in tokenizer.decode(ids[0]) and "w0 " not in tokenizer.decode(ids[0])


def test_hidden_layers_average_the_chosen_hidden_states_before_pooling():
    base, _ = models.tiny_causal_lm(0)
    ids, mask = torch.tensor([[5, 6, 7, 8]]), torch.ones(1, 4, dtype=torch.long)
    states = (
        models.unwrap(base).base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    )
    last = heads.HeadModel(base, 2, "mean").features(ids, mask)
    assert torch.allclose(heads.HeadModel(base, 2, "mean", layers=[-1]).features(ids, mask), last)
    mixed = heads.HeadModel(base, 2, "mean", layers=[0, -1]).features(ids, mask)
    assert torch.allclose(mixed, ((states[0] + states[-1]) / 2).mean(1), atol=1e-6)


def test_read_examples_one_per_labelled_turn(data_dir):
    examples = apm_model.read_examples(data_dir / "train.jsonl", SCHEMA)
    records = read_records(data_dir / "train.jsonl")
    ids = {t.extra["message_id"] for r in records for t in r.assistant_turns if t.label}
    assert len(examples) == len(ids)  # shared prefixes of one tree counted once
    assert all(e.turns[-1].role == "Assistant" and e.levels for e in examples)
    assert all(t.label is None for e in examples for t in e.turns)  # labels are never part of the input


def test_bad_inputs_are_clear_errors(data_dir, tmp_path):
    with pytest.raises(UserError, match="unknown attribute 'qualty'"):
        config_lib.build(apm.Config, {"data": str(data_dir), "attributes": ["qualty"]})
    assert cli.run(["train-apm", f"--data={data_dir}", "--attributes=quality,qualty"]) == 2

    bad = tmp_path / "bad"
    bad.mkdir()
    good = (data_dir / "train.jsonl").read_text().splitlines()
    user_only = json.dumps(Record([Turn("User", "Hello?")]).to_json())
    (bad / "train.jsonl").write_text("\n".join(good[:2] + [user_only]) + "\n")
    (bad / "val.jsonl").write_text((data_dir / "val.jsonl").read_text())
    with pytest.raises(UserError, match=r"train.jsonl:3: conversations: the conversation has no Assistant turn"):
        apm.main(_cfg(bad, tmp_path / "out", model="tiny-encoder"))

    (bad / "train.jsonl").write_text(good[0].replace('"quality:', '"quality:1', 1) + "\n")
    with pytest.raises(UserError, match=r"train.jsonl:1: conversations\[1\].label: .*out of range"):
        apm.main(_cfg(bad, tmp_path / "out", model="tiny-encoder"))

    with pytest.raises(UserError, match="missing steerlm_apm.json"):
        apm_model.load_apm(bad)
    (bad / "val.jsonl").unlink()
    with pytest.raises(UserError, match="missing val.jsonl"):
        apm.main(_cfg(bad, tmp_path / "out2", model="tiny-encoder"))


def test_metrics():
    assert metrics.mae([1, 2, 3], [1, 3, 5]) == pytest.approx(1.0)
    assert metrics.exact_acc([1.4, 2.6, 3], [1, 3, 5]) == pytest.approx(2 / 3)
    assert metrics.within1([1.4, 4.6, 3], [1, 3, 5]) == pytest.approx(1 / 3)
    assert metrics.spearman([1, 2, 3, 4], [10, 20, 30, 25]) == pytest.approx(0.8)
    assert metrics.spearman([2, 2, 2], [1, 2, 3]) is None  # constant predictions (the mean baseline)
    assert metrics.mae([], []) is None
    assert metrics.summarize([1], [1]) == {"n": 1, "mae": 0.0, "exact": 1.0, "within1": 1.0, "spearman": None}


def test_eval_apm_writes_table_json_and_plot(data_dir, tmp_path, capsys):
    out = tmp_path / "apm"
    assert cli.run(["train-apm", f"--data={data_dir}", f"--out={out}", "--model=tiny-encoder", "--train.max_steps=2",
                    "--train.batch_size=4"]) == 0  # fmt: skip
    capsys.readouterr()
    assert cli.run(["eval-apm", f"--apm={out}", f"--data={data_dir}"]) == 0
    printed = capsys.readouterr().out
    assert "quality" in printed and "spearman" in printed
    report = json.loads((out / "eval" / apm_eval.REPORT).read_text())
    assert (out / "eval" / apm_eval.PLOT).stat().st_size > 1000
    quality = report["attributes"]["quality"]
    assert quality["apm"]["n"] == quality["baseline"]["n"] > 0
    means = json.loads((out / "best" / apm_model.META).read_text())["train_means"]
    assert quality["train_mean"] == means["quality"] and quality["baseline"]["spearman"] is None
    assert not math.isnan(quality["apm"]["mae"])
    assert cli.run(["eval-apm", f"--apm={out}", f"--data={data_dir / 'val.jsonl'}"]) == 2  # exists: --overwrite


# ---------------------------------------------------------------- issue #13: calibration, layouts, HelpSteer2


def test_calibration_preserves_order_and_maps_the_training_labels_onto_their_own_distribution(data_dir):
    labels = [
        e.levels["quality"] for e in apm_model.read_examples(data_dir / "train.jsonl", SCHEMA) if "quality" in e.levels
    ]
    counts = [labels.count(level) for level in range(SCHEMA.levels)]
    # the training labels themselves, as reference, map onto themselves: the calibration of a perfect APM is a no-op
    identity = apm_model.QuantileMap([float(x) for x in labels], counts)
    assert [identity(float(x)) for x in labels] == labels
    # predictions squeezed near the mean (what MSE training gives) are spread back over the label distribution
    gen = torch.Generator().manual_seed(0)
    preds = (6.0 + 0.2 * torch.randn(len(labels), generator=gen)).tolist()
    qmap = apm_model.QuantileMap(preds, counts)
    mapped = [qmap(p) for p in preds]
    assert [mapped.count(level) for level in range(SCHEMA.levels)] == pytest.approx(counts, abs=1)
    assert len(set(mapped)) > len({round(p) for p in preds})
    # monotone: a higher prediction never gets a lower level; beyond the reference, the extreme labelled levels
    order = sorted(range(len(preds)), key=lambda i: preds[i])
    assert all(mapped[a] <= mapped[b] for a, b in zip(order, order[1:], strict=False))
    labelled = [level for level, c in enumerate(counts) if c]
    assert qmap(-100.0) == labelled[0] and qmap(100.0) == labelled[-1]
    with pytest.raises(ValueError):
        apm_model.QuantileMap([], counts)


def test_regression_apm_is_a_standard_sequence_classification_folder(data_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "apm"
    _train(monkeypatch, _cfg(data_dir, out, model="tiny-encoder", pooling="cls", input="pair", length_feature=False))
    best = out / apm_model.BEST
    config = json.loads((best / "config.json").read_text())
    meta = json.loads((best / apm_model.META).read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and config["problem_type"] == "regression"
    assert [config["id2label"][str(i)] for i in range(len(config["id2label"]))] == meta["attributes"]["names"]
    assert meta["layout"] == heads.SEQ_CLS and not (best / apm_model.HEAD).exists()
    # the calibration map is stored beside, for annotate
    assert set(meta["calibration"]["attributes"]) <= set(meta["attributes"]["names"])

    # transformers alone: the tokenizer's own text-pair encoding is the APM's input, the logits are its levels
    seq = AutoModelForSequenceClassification.from_pretrained(str(best)).eval()
    tok = AutoTokenizer.from_pretrained(str(best))
    loaded = apm_model.load_apm(out)
    pairs = [("What is the capital of France?", "Paris."), ("Tell me a joke.", "Why did the chicken cross the road?")]
    ours = loaded.predict(pairs)
    # the context is plain_text of the turns before the response
    contexts = [heads.plain_text([Turn("User", p)]) for p, _ in pairs]
    enc = tok(contexts, [r for _, r in pairs], padding=True, return_token_type_ids=True, return_tensors="pt")
    ids, _, types, _ = apm_model.pair_inputs([apm_model.as_example(p) for p in pairs], loaded.tokenizer, 512, 200)
    for i in range(len(pairs)):
        real = enc["attention_mask"][i].bool()
        assert enc["input_ids"][i][real].tolist() == ids[i] and enc["token_type_ids"][i][real].tolist() == types[i]
    with torch.no_grad():
        logits = seq(**enc).logits
    for row, pred in zip(logits.tolist(), ours, strict=True):
        levels = {n: min(9.0, max(0.0, v)) for n, v in zip(meta["attributes"]["names"], row, strict=True)}
        assert all(abs(levels[n] - pred[n]) < 1e-4 for n in pred)


def test_old_layout_folder_still_loads(tmp_path):
    """A folder written before issue #13: the bare backbone, apm_head.safetensors predicting levels / (L-1), plain
    text input, mean pooling, no `scale`/`layout`/`input` in the meta."""
    from safetensors.torch import save_file

    backbone, tok = models.tiny_encoder(0)
    schema = AttributeSchema(("quality", "humor"))
    head = torch.nn.Linear(backbone.config.hidden_size, 2)
    torch.manual_seed(0)
    torch.nn.init.normal_(head.weight, std=0.5)
    torch.nn.init.constant_(head.bias, 0.5)
    meta = {"kind": "regression", "attributes": schema.to_dict(), "template": None, "backbone": "encoder",
            "pooling": "mean", "max_length": 64, "base_model": "tiny-encoder", "lora": False,
            "text_format": "plain-v1", "head": apm_model.HEAD, "train_means": {"quality": 4.5, "humor": 2.0}}  # fmt: skip
    folder = tmp_path / "old"
    models.save_model(backbone, tok, folder, apm_model.META, meta)
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(folder / apm_model.HEAD))

    loaded = apm_model.load_apm(folder)
    pair = ("Explain tides.", "The moon's gravity pulls the oceans.")
    pred = loaded.predict([pair])[0]
    enc = tok(heads.plain_text(apm_model.as_example(pair).turns), return_tensors="pt", truncation=True, max_length=64)
    with torch.no_grad():
        hidden = backbone(**enc).last_hidden_state
        expected = (head(hidden.mean(1)) * 9).clamp(0, 9)[0].tolist()
    assert [pred["quality"], pred["humor"]] == pytest.approx(expected, abs=1e-4)
    assert loaded.calibration == {} and loaded.label(pred, calibrated=True) == loaded.label(pred)


def test_apm_module_does_not_import_apm_eval():
    """apm -> apm_eval -> apm was an import circle: the agreement table lives in apm, eval-apm imports it."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(apm))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert not any("apm_eval" in name for name in imported)


def test_apm_trains_on_helpsteer2(shared_data, tmp_path, monkeypatch, capsys):
    data = tmp_path / "hs"
    assert cli.run(["prepare", f"--source={shared_data / 'helpsteer2' / 'helpsteer2-train-first100.jsonl'}",
                    "--attributes=helpsteer", "--levels=5", f"--out={data}", "--val_fraction=0.2"]) == 0  # fmt: skip
    out = tmp_path / "apm"
    _train(monkeypatch, _cfg(data, out, model="tiny-encoder", attributes=["helpsteer"]))
    loaded = apm_model.load_apm(out)
    assert loaded.schema.names == ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
    assert loaded.schema.levels == 5  # from the data folder
    preds = loaded.predict(read_records(data / "val.jsonl"))
    _assert_in_range(preds, len(read_records(data / "val.jsonl")), loaded.schema)


def test_length_input_starts_at_the_least_squares_length_fit():
    import numpy as np

    rows = [{"response_length": n, "target": [q, 5.0], "present": [1.0, float(i % 2)]}
            for i, (n, q) in enumerate([(10, 2.0), (40, 4.0), (100, 6.0), (300, 7.0), (20, 3.0), (200, 8.0)])]  # fmt: skip
    slope, intercept = apm.length_fit(rows)
    x = heads.length_input(torch.tensor([float(r["response_length"]) for r in rows])).numpy()
    expected = np.polyfit(x, [r["target"][0] for r in rows], 1)
    assert [slope[0].item(), intercept[0].item()] == pytest.approx(list(expected), rel=1e-4)
    # a constant label: no slope, the mean (only the rows that carry it count)
    assert slope[1].item() == 0.0 and intercept[1].item() == pytest.approx(5.0)


def test_ridge_solve_recovers_a_linear_head_and_leaves_the_length_input_unshrunk():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=gen) * torch.tensor([1.0, 3.0, 0.5, 2.0, 1.0, 1.0]) + 5.0
    true_w, true_b = torch.tensor([[0.5, -0.2, 1.0, 0.0, 0.3, 0.7], [0.0] * 5 + [1.5]]), torch.tensor([2.0, -1.0])
    y = x @ true_w.T + true_b
    present = torch.ones(300, 2)
    present[:50, 1] = 0.0
    y[:50, 1] = 1e6  # an absent label must not count
    weight, bias = apm.ridge_solve(x, y, present, alpha=1e-6)
    assert torch.allclose(x @ weight.T + bias, x @ true_w.T + true_b, atol=1e-3)
    # A heavy penalty shrinks every feature but the free (length) column: attribute 1 depends on it alone.
    weight, bias = apm.ridge_solve(x, y, present, alpha=1e9, free=[5])
    assert torch.allclose(weight[1], true_w[1], atol=1e-3) and abs(float(bias[1]) - true_b[1]) < 1e-2
    assert float(weight[0, :5].abs().max()) < 1e-3
    # An attribute labelled only on rows of one length: its free column is constant there, so it is penalised.
    x[:, 5] = torch.where(present[:, 1] > 0, 7.0, x[:, 5])
    weight, bias = apm.ridge_solve(x, y, present, alpha=1.0, free=[5])
    assert torch.isfinite(weight).all() and torch.isfinite(bias).all()


@pytest.mark.parametrize(("model", "input_format", "layers"), [("tiny-encoder", "auto", []),
                                                             ("tiny-lm", "opening", [1, -1])])  # fmt: skip
def test_ridge_head_apm_keeps_the_backbone_and_predicts_what_was_fitted(data_dir, tmp_path, monkeypatch, model,
                                                                         input_format, layers):  # fmt: skip
    out = tmp_path / "apm"
    monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("a ridge head needs no gradient training"))
    summary = apm.main(_cfg(data_dir, out, model=model, head_fit="ridge", attributes=["quality", "humor"],
                            input=input_format, response_tokens=48, hidden_layers=layers))  # fmt: skip
    assert summary["head_fit"] == "ridge"
    loaded = apm_model.load_apm(out)
    meta = loaded.meta
    assert meta["head_fit"] == "ridge" and meta["pooling"] == "response" and meta["ridge_alpha"] == 1e4
    assert meta["input"] == {"auto": "pair"}.get(input_format, input_format)
    assert meta["hidden_layers"] == layers and loaded.model.layers == tuple(layers)
    assert meta["precision"] in ("fp32", "bf16") and set(meta["calibration"]["attributes"]) == {"quality", "humor"}
    # The backbone is the tiny encoder unchanged; only the head was fitted.
    base, _ = models.load_encoder(model, device=torch.device("cpu"))
    trained = models.unwrap(loaded.model.backbone).state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in base.state_dict().items() if k in trained)
    examples = apm_model.read_examples(data_dir / "val.jsonl", loaded.schema)
    preds = loaded.predict(examples)
    _assert_in_range(preds, len(examples), loaded.schema)
    assert len({round(p["quality"], 4) for p in preds}) > 1  # the head reads the answers, not only a constant
    # The loaded APM predicts what was fitted: its validation MSE is the fit's.
    errors = [(p[n] - e.levels[n]) ** 2 for p, e in zip(preds, examples, strict=True) for n in e.levels]
    assert sum(errors) / len(errors) == pytest.approx(summary["best"], rel=0.02)


def test_ridge_head_settings_are_checked(data_dir, tmp_path):
    with pytest.raises(UserError, match="generative APM has none"):
        _cfg(data_dir, tmp_path, kind="generative", model="tiny-lm", head_fit="ridge")
    with pytest.raises(UserError, match="lora.r=0"):
        config_lib.build(apm.Config, {"data": str(data_dir), "head_fit": "ridge", "model": "tiny-lm",
                                      "train": {"lora": {"r": 4}}})  # fmt: skip
    with pytest.raises(UserError, match="ridge_alpha must be positive"):
        _cfg(data_dir, tmp_path, head_fit="ridge", ridge_alpha=0)
    with pytest.raises(UserError, match="'cls' pooler reads the last layer"):
        apm.main(_cfg(data_dir, tmp_path / "c", model="tiny-encoder", hidden_layers=[1, -1]))
    with pytest.raises(UserError, match="generative APM has none"):
        _cfg(data_dir, tmp_path, kind="generative", model="tiny-lm", hidden_layers=[1])
    with pytest.raises(UserError, match="outside the backbone"):
        apm.main(_cfg(data_dir, tmp_path / "l", model="tiny-lm", head_fit="ridge", hidden_layers=[99]))
    with pytest.raises(UserError, match="more than train.max_length"):
        apm.main(_cfg(data_dir, tmp_path / "o", model="tiny-lm", head_fit="ridge", input="opening",
                      response_tokens=250))  # fmt: skip

"""The evaluation suite: scripted models with known behaviour get the expected statistics, the cache resumes and
rebuilds the report without loading any model, the LLM judge is parsed strictly, and real tiny models run end to
end through the CLI."""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

from steerlm import cli, evaluate, metrics, models
from steerlm import config as config_lib
from steerlm.attributes import AttributeSchema
from steerlm.errors import UserError
from steerlm.evaluation import cache, judging, planning, statistics

SCHEMA = AttributeSchema(("quality", "toxicity", "humor", "creativity"), 10)
STAR = "★"


# ---------------------------------------------------------------- scripted stand-ins with known behaviour


def _uniform(*parts) -> float:
    """A deterministic draw in [0, 1) from its arguments."""
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:12], 16) / 16**12


class ScriptedGenerator:
    """Writes `<attr>` once per requested level of every attribute (so an answer's token counts are its levels), and
    `skill(prompt)` stars, the quality a judge sees."""

    def __init__(self, name: str, skill):
        self.name, self.skill, self.calls, self.asked, self.samplings = name, skill, 0, [], []

    def generate(self, conversations, attributes, sampling, batch_size=8):
        self.calls += 1
        self.asked += list(attributes)
        self.samplings.append(sampling)
        out = []
        for conv, levels in zip(conversations, attributes, strict=True):
            text = conv if isinstance(conv, str) else conv.conversations[-1].value
            tags = "".join(f"<{a}>" * lv for a, lv in (levels or {}).items())
            out.append(f"{STAR * self.skill(text)} {tags} answer to {text}")
        return out


class CountingAPM:
    """Measures each attribute as the number of `<attr>` tokens in the answer: the truth of the scripted models."""

    schema = SCHEMA

    def __init__(self):
        self.calls = 0

    def predict(self, records, batch_size=32):
        self.calls += 1
        return [{a: float(r.conversations[-1].value.count(f"<{a}>")) for a in SCHEMA.names} for r in records]


class StarJudge(judging.ScoreJudge):
    """Scores an answer by its stars (+1, like the APM judge's levels + 1)."""

    def __init__(self):
        super().__init__(lambda records: [1.0 + r.conversations[-1].value.count(STAR) for r in records])


# strong beats mid on 70% of prompts (and loses the rest), mid always beats weak: the population truth.
SKILLS = {
    "strong": lambda text: 2 if _uniform("strong", text) < 0.7 else 0,
    "mid": lambda text: 1,
    "weak": lambda text: 0,
}


def _model_folder(root: Path, name: str, schema: AttributeSchema | None, sub: str = "models") -> Path:
    folder = root / sub / name
    folder.mkdir(parents=True)
    meta = {"attributes": schema.to_dict() if schema else None, "template": "chat",
            "conditioning": "attributes" if schema else "none", "base_model": "tiny-lm", "lora": False}  # fmt: skip
    (folder / "steerlm_model.json").write_text(json.dumps(meta))
    return folder


def _prompt_file(root: Path, n: int) -> Path:
    path = root / "prompts.jsonl"
    path.write_text("".join(json.dumps(f"question number {i}?") + "\n" for i in range(n)))
    return path


def _scripted_setup(tmp_path: Path, n_prompts: int = 200, **overrides):
    folders = {name: _model_folder(tmp_path, name, SCHEMA) for name in SKILLS}
    for name in ("eval-apm", "judge-apm"):  # stand-in folders: the scripted loaders below never read them
        (tmp_path / name).mkdir(exist_ok=True)
    values = {
        "out": str(tmp_path / "eval"),
        "models": [{"name": n, "path": str(f)} for n, f in folders.items()],
        "prompts": [{"name": "lottery", "path": str(_prompt_file(tmp_path, n_prompts))}],
        "sampling": {"max_new_tokens": 8, "seed": 3},
        "steerability": {"apm": str(tmp_path / "eval-apm"), "num_prompts": 4},
        "quality": {"judge": {"kind": "apm", "path": str(tmp_path / "judge-apm")}, "reference": "mid",
                    "bootstrap": 400, "seed": 1},
        "ablation": {"rows": {"plain_sft": "weak", "bootstrap": "strong"}},
    }  # fmt: skip
    values.update(overrides)
    cfg = config_lib.build(evaluate.Config, values)
    gens = {n: ScriptedGenerator(n, s) for n, s in SKILLS.items()}
    apm = CountingAPM()
    loaders = evaluate.Loaders(generator=lambda spec, cfg: gens[spec.name], measurer=lambda path: apm,
                               judge=lambda args: StarJudge())  # fmt: skip
    return cfg, loaders, gens, apm


def _failing_loaders(monkeypatch) -> evaluate.Loaders:
    """Loaders, and the real loading functions underneath them, that fail when called."""
    from steerlm import apm_model, generate, rm_model

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(generate.Generator, "load", boom)
    monkeypatch.setattr(apm_model, "load_apm", boom)
    monkeypatch.setattr(rm_model, "load_rm", boom)
    monkeypatch.setattr(models, "load_causal_lm", boom)
    monkeypatch.setattr(models, "load_encoder", boom)
    return evaluate.Loaders(generator=boom, measurer=boom, judge=boom)


@pytest.fixture(scope="module")
def scripted_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("scripted")
    cfg, loaders, gens, apm = _scripted_setup(tmp_path)
    results = evaluate.main(cfg, loaders)
    return tmp_path, cfg, results, gens, apm


# ---------------------------------------------------------------- the metrics on scripted models


def test_steerability_of_a_model_that_obeys_exactly(scripted_run):
    _, _, results, _, _ = scripted_run
    steer = results["steerability"]["models"]
    assert set(steer) == {"strong", "mid", "weak"}  # every attribute-conditioned model is steered by default
    for attrs in steer.values():
        assert set(attrs) == {"quality", "toxicity", "humor", "creativity"}
        for r in attrs.values():
            assert r["requested"] == [0, 3, 6, 9]  # the paper's toxicity grid is the default for 10 levels
            assert r["measured_mean"] == [0.0, 3.0, 6.0, 9.0]
            assert r["spearman"] == pytest.approx(1.0)
            assert r["slope"] == pytest.approx(1.0)
            assert r["monotone_steps"] == 3 and r["n"] == [4, 4, 4, 4] and r["failed"] == 0


def test_generators_are_asked_only_what_the_evaluation_names(scripted_run):
    # the schema defaults fill in the rest inside the generator; guidance's 'middle' reference moves what is named
    _, _, _, gens, _ = scripted_run
    asked = gens["strong"].asked
    assert {"humor": 6} in asked and {"quality": 0} in asked
    assert all(len(a) <= 1 for a in asked)  # one steered attribute, or the model's (empty) quality-run setting


def test_win_rate_ci_elo_and_relative_scores(scripted_run):
    _, cfg, results, _, _ = scripted_run
    q = results["quality"]
    pairs = {(p["a"], p["b"]): p for p in q["pairs"]}
    assert set(pairs) == {("strong", "mid"), ("strong", "weak"), ("mid", "weak")}
    sm = pairs[("strong", "mid")]
    wins = sum(SKILLS["strong"](f"question number {i}?") == 2 for i in range(200))
    assert sm["win_rate"] == pytest.approx(wins / 200)  # a score judge: both orders agree, no ties here
    assert (sm["wins"], sm["ties"], sm["losses"]) == (2 * wins, 0, 2 * (200 - wins))
    lo, hi = sm["ci"]
    assert lo < 0.7 < hi and hi - lo < 0.2  # the interval holds the population truth, and is not vacuous
    assert sm["consistency"] == 1.0
    mw = pairs[("mid", "weak")]
    assert mw["win_rate"] == 1.0 and tuple(mw["ci"]) == (1.0, 1.0)
    elo = q["elo"]
    assert elo["strong"]["elo"] > elo["mid"]["elo"] > elo["weak"]["elo"]
    assert np.mean([e["elo"] for e in elo.values()]) == pytest.approx(1000.0)
    # % of the reference: the ratio of summed judge scores (stars + 1) on the same prompts
    strong_sum = sum(1 + SKILLS["strong"](f"question number {i}?") for i in range(200))
    assert q["relative"]["strong"]["score"] == pytest.approx(100 * strong_sum / (2 * 200))
    assert q["relative"]["weak"]["score"] == pytest.approx(50.0)
    assert q["relative"]["mid"]["score"] == 100.0
    rows = {r["key"]: r for r in results["ablation"]["rows"]}
    assert rows["plain_sft"]["relative"] == pytest.approx(50.0) and rows["plain_sft"]["win_rate"] == 0.0
    assert rows["bootstrap"]["model"] == "strong" and rows["high_quality"]["model"] is None


def test_report_files(scripted_run):
    tmp_path, _, _, _, _ = scripted_run
    out = tmp_path / "eval"
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    for attr in ("quality", "toxicity", "humor", "creativity"):
        assert (out / "plots" / f"steer_{attr}.png").read_bytes().startswith(b"\x89PNG")
        assert f"plots/steer_{attr}.png" in md
    assert page.count("data:image/png;base64,") == 5  # four attributes and the Elo plot, embedded
    assert 'src="plots/' not in page  # self-contained
    assert "not run" in md and "+ bootstrapping" in md and "104.2" in md
    assert "Perspective" in md  # the toxicity table beside the paper's numbers
    assert "**humor=9**" in md and "&lt;humor&gt;" in md and "&lt;humor&gt;" in page  # answers, escaped
    assert '"conditioning": "attributes"' in md  # each model's steerlm_model.json is included
    assert "| `strong` vs `mid` |" in md
    assert json.loads((out / "results.json").read_text())["quality"]["reference"] == "mid"
    assert (out / "config.yaml").exists()
    assert {p.name for p in (out / "cache").iterdir()} >= {"generations.jsonl", "scores.jsonl", "models.json"}


def test_from_cache_rebuilds_the_report_without_loading_models(scripted_run, monkeypatch):
    tmp_path, cfg, results, _, _ = scripted_run
    out = tmp_path / "eval"
    for name in ("report.md", "report.html", "results.json"):
        (out / name).unlink()
    again = evaluate.main(config_lib.build(evaluate.Config, {**config_lib.to_dict(cfg), "from_cache": True}),
                          _failing_loaders(monkeypatch))  # fmt: skip
    assert json.loads(json.dumps(again)) == json.loads(json.dumps(results))
    assert (out / "report.html").exists() and (out / "report.md").exists()
    # a model the cache has never seen cannot be reported from the cache
    extra = config_lib.to_dict(cfg)
    extra["models"].append({"name": "new", "path": str(tmp_path / "models" / "mid"), "attributes": {"humor": 2}})
    extra["from_cache"] = True
    with pytest.raises(UserError, match="missing from the cache.*new: 200"):
        evaluate.main(config_lib.build(evaluate.Config, extra), _failing_loaders(monkeypatch))


def test_interrupted_run_resumes_and_retrained_model_is_regenerated(tmp_path):
    cfg, loaders, gens, apm = _scripted_setup(tmp_path, n_prompts=10, batch_size=2,
                                              quality={"judge": {"kind": "apm", "path": str(tmp_path / "judge-apm")}, "bootstrap": 0})  # fmt: skip

    class Interrupt(Exception):
        pass

    real = gens["mid"].generate

    def fails_on_third_chunk(*args, **kwargs):
        if gens["mid"].calls == 2:
            raise Interrupt
        return real(*args, **kwargs)

    gens["mid"].generate = fails_on_third_chunk
    with pytest.raises(Interrupt):
        evaluate.main(cfg, loaders)
    before = len(cache.Cache(tmp_path / "eval" / "cache" / "generations.jsonl").rows)
    assert before > 0
    gens["mid"].generate = real
    for g in gens.values():
        g.calls = 0
    evaluate.main(cfg, loaders)
    total = len(cache.Cache(tmp_path / "eval" / "cache" / "generations.jsonl").rows)
    # per model and steered prompt 16 settings, of which quality=9 and toxicity/humor/creativity=0 are all the
    # defaults (one answer); the 10 quality answers are at the defaults too, 4 of them on the steered prompts
    assert total == 3 * (4 * 13 + 10 - 4)
    assert gens["strong"].calls == 0  # strong was finished before the interruption: nothing to redo
    # a torn last line (a write cut short) is dropped, and the file is repaired
    path = tmp_path / "eval" / "cache" / "generations.jsonl"
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"key": "abc", "answ')
    assert len(cache.Cache(path).rows) == total
    assert path.read_text().endswith("}\n")
    # a retrained model (its files changed) is answered again; the others come from the cache
    (tmp_path / "models" / "weak" / "steerlm_model.json").write_text(
        (tmp_path / "models" / "weak" / "steerlm_model.json").read_text() + " "
    )
    for g in gens.values():
        g.calls = 0
    evaluate.main(cfg, loaders)
    assert gens["weak"].calls > 0 and gens["strong"].calls == 0 and gens["mid"].calls == 0


def test_warns_when_the_measuring_apm_trained_the_model(tmp_path):
    run = tmp_path / "run"
    best = run / "sft" / "best"
    best.mkdir(parents=True)
    (best / "steerlm_model.json").write_text(json.dumps({"attributes": SCHEMA.to_dict(), "template": "chat"}))
    (run / "apm" / "best").mkdir(parents=True)
    (run / "apm" / "best" / "steerlm_apm.json").write_text("{}")
    (run / "annotated").mkdir()
    cfg, loaders, gens, apm = _scripted_setup(
        tmp_path, n_prompts=2, models=[{"name": "mid", "path": str(best)}], quality={"enabled": False},
        ablation={}, steerability={"apm": str(run / "apm"), "num_prompts": 1, "attributes": ["humor"],
                                   "levels": [0, 9]})  # fmt: skip
    results = evaluate.main(cfg, loaders)
    assert any("overstate" in n for n in results["notes"])
    assert results["steerability"]["models"]["mid"]["humor"]["requested"] == [0, 9]


def test_a_model_that_ignores_or_inverts_the_request(tmp_path):
    class Inverted(ScriptedGenerator):
        def generate(self, conversations, attributes, sampling, batch_size=8):
            flipped = [{a: SCHEMA.max_level - lv for a, lv in levels.items()} for levels in attributes]
            return super().generate(conversations, flipped, sampling, batch_size)

    class Ignoring(ScriptedGenerator):  # an unconditioned model: a fixed amount of humor whatever is asked
        def generate(self, conversations, attributes, sampling, batch_size=8):
            assert all(a is None for a in attributes)
            return [f"<humor><humor> {i}" for i, _ in enumerate(conversations)]

    models_ = [{"name": "inverted", "path": str(_model_folder(tmp_path, "inv", SCHEMA, "x"))},
               {"name": "control", "path": str(_model_folder(tmp_path, "ctl", None, "x"))}]  # fmt: skip
    cfg, loaders, _, _ = _scripted_setup(
        tmp_path, n_prompts=3, models=models_, quality={"enabled": False}, ablation={},
        steerability={"apm": str(tmp_path / "eval-apm"), "num_prompts": 3, "attributes": ["humor"], "models": ["inverted", "control"]})  # fmt: skip
    gens = {"inverted": Inverted("inverted", SKILLS["mid"]), "control": Ignoring("control", SKILLS["mid"])}
    loaders.generator = lambda spec, c: gens[spec.name]
    results = evaluate.main(cfg, loaders)
    inv = results["steerability"]["models"]["inverted"]["humor"]
    assert inv["spearman"] == pytest.approx(-1.0) and inv["slope"] == pytest.approx(-1.0)
    assert inv["monotone_steps"] == 0 and inv["measured_mean"] == [9.0, 6.0, 3.0, 0.0]
    ctl = results["steerability"]["models"]["control"]["humor"]
    assert (
        ctl["measured_mean"] == [2.0, 2.0, 2.0, 2.0] and ctl["spearman"] is None and ctl["slope"] == pytest.approx(0)
    )
    assert any("`control` has no attribute conditioning" in n for n in results["notes"])
    assert not any("spread by only" in n for n in results["notes"])  # the control has its own note


def test_an_apm_that_cannot_tell_answers_apart_is_reported(tmp_path):
    class ConstantAPM(CountingAPM):
        def predict(self, records, batch_size=32):
            return [{a: 4.0 for a in SCHEMA.names} for _ in records]

    cfg, loaders, _, _ = _scripted_setup(tmp_path, n_prompts=3, quality={"enabled": False}, ablation={},
                                         steerability={"apm": str(tmp_path / "eval-apm"), "num_prompts": 3,
                                                       "attributes": ["humor"], "models": ["mid"]})  # fmt: skip
    loaders.measurer = lambda path: ConstantAPM()
    results = evaluate.main(cfg, loaders)
    assert results["steerability"]["models"]["mid"]["humor"]["measured_mean"] == [4.0] * 4
    assert any("`humor` levels of `mid`'s 12 different answers spread by only 0.000" in n for n in results["notes"])
    assert "spread by only" in (tmp_path / "eval" / "report.md").read_text()


def test_computed_attribute_is_measured_without_the_apm(tmp_path, monkeypatch):
    from steerlm import attributes, steerability

    if not (hasattr(attributes, "computed_from_dict") and hasattr(steerability, "scorer_for")):
        pytest.skip("computed attributes (issue #8) are not in this tree")
    schema = AttributeSchema(("quality", "verbosity"), 5)
    folder = _model_folder(tmp_path, "verbose", schema, "v")
    meta = json.loads((folder / "steerlm_model.json").read_text())
    meta["computed"] = {"verbosity": {"unit": "words", "edges": [2, 4, 8, 16]}}
    (folder / "steerlm_model.json").write_text(json.dumps(meta))

    class Wordy(ScriptedGenerator):  # 1, 2, 4, 8, 16 words: exactly the requested length bucket
        def generate(self, conversations, attributes, sampling, batch_size=8):
            return [" ".join(["w"] * 2 ** levels["verbosity"]) for levels in attributes]

    cfg, loaders, _, _ = _scripted_setup(
        tmp_path, n_prompts=3, models=[{"name": "verbose", "path": str(folder)}], quality={"enabled": False},
        ablation={}, steerability={"apm": "", "attributes": ["verbosity"], "num_prompts": 3})  # fmt: skip
    loaders.generator = lambda spec, c: Wordy("verbose", SKILLS["mid"])
    loaders.measurer = _failing_loaders(monkeypatch).measurer
    results = evaluate.main(cfg, loaders)
    r = results["steerability"]["models"]["verbose"]["verbosity"]
    assert r["requested"] == [0, 1, 3, 4] and r["measured_mean"] == [0.0, 1.0, 3.0, 4.0]
    assert r["spearman"] == pytest.approx(1.0)
    assert any("computed from the answer's text" in n for n in results["notes"])


def test_missing_folders_fail_before_any_generation(tmp_path):
    cfg, loaders, gens, _ = _scripted_setup(tmp_path, n_prompts=2)
    values = config_lib.to_dict(cfg)
    values["models"][1]["path"] = str(tmp_path / "runs" / "never-trained" / "best")
    with pytest.raises(UserError, match="model mid: no such model folder"):
        evaluate.main(config_lib.build(evaluate.Config, values), loaders)
    values = {**config_lib.to_dict(cfg), "steerability": {**values["steerability"], "apm": str(tmp_path / "no-apm")}}
    with pytest.raises(UserError, match="steerability.apm: no such APM folder"):
        evaluate.main(config_lib.build(evaluate.Config, values), loaders)
    assert all(g.calls == 0 for g in gens.values())


def test_per_model_sampling_is_part_of_the_cache_key(tmp_path):
    folder = _model_folder(tmp_path, "m", SCHEMA)
    base = {"prompts": [{"name": "p", "path": "x.jsonl"}], "quality": {"enabled": False}}
    cfg = config_lib.build(evaluate.Config, {**base, "models": [
        {"name": "plain", "path": str(folder)},
        {"name": "hot", "path": str(folder), "sampling": {"temperature": 1.3}},
    ]})  # fmt: skip
    assert cfg.sampling_for("hot").temperature == 1.3 and cfg.sampling_for("plain").temperature == 0.7
    assert cfg.sampling_for("hot").seed == cfg.sampling.seed  # the rest comes from the global settings
    prompt = planning.Prompt("p", 0, "hi", "hi", "pid", "hi")
    info = planning.model_info(cfg.models[0])
    keys = {
        planning.generation_key(cfg, m, prompt, {"humor": 1}, planning.model_sampling(cfg, m.name, info))
        for m in cfg.models
    }
    assert len(keys) == 2
    # settings at SamplingArgs' defaults are left out of the key: a setting added later keeps cached answers valid
    assert planning.sampling_key(cfg.sampling_for("hot")) == {"max_new_tokens": 128, "temperature": 1.3, "seed": 7}
    with pytest.raises(UserError, match="model bad: sampling"):
        config_lib.build(evaluate.Config, {**base, "models": [{"name": "bad", "path": "p", "sampling": {"nope": 1}}]})


def test_a_model_samples_with_its_saved_guidance_unless_the_config_sets_one(tmp_path):
    # as in `steerlm generate` and `serve`: guidance the evaluation leaves unset is the model's own
    keys = []
    for i, (sampling, strong) in enumerate((({"max_new_tokens": 8}, (2.0, "middle")),
                                            ({"max_new_tokens": 8, "guidance_scale": 1}, (1.0, "middle")))):  # fmt: skip
        cfg, loaders, gens, _ = _scripted_setup(tmp_path / str(i), n_prompts=8, sampling=sampling,
                                                quality={"enabled": False}, ablation={"rows": {}})  # fmt: skip
        meta_file = tmp_path / str(i) / "models" / "strong" / "steerlm_model.json"
        meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()),
                                         "guidance": {"scale": 2.0, "reference": "middle"}}))  # fmt: skip
        results = evaluate.main(cfg, loaders)
        assert {(s.guidance_scale, s.guidance_reference) for s in gens["strong"].samplings} == {strong}
        assert {(s.guidance_scale, s.guidance_reference) for s in gens["mid"].samplings} == {(1.0, "")}
        assert results["models"]["strong"]["sampling"].get("guidance_scale", 1.0) == strong[0]
        notes = [n for n in results["notes"] if "attribute guidance" in n]
        assert notes == (["`strong` samples with attribute guidance s = 2 against `middle` (saved with the model; "
                          "`sampling: {guidance_scale: 1}` evaluates it unguided)."] if i == 0 else [])  # fmt: skip
        strong_spec = next(m for m in cfg.models if m.name == "strong")
        prompt = planning.Prompt("p", 0, "hi", "hi", "pid", "hi")
        sampling = planning.model_sampling(cfg, "strong", planning.model_info(strong_spec))
        keys.append(planning.generation_key(cfg, strong_spec, prompt, None, sampling))
    assert keys[0] != keys[1]  # guided and unguided answers of one model are cached apart


# ---------------------------------------------------------------- statistics


def test_bradley_terry_recovers_known_strengths():
    p = np.array([4.0, 2.0, 1.0, 0.5])
    expected = 100 * p[:, None] / (p[:, None] + p[None, :])
    np.fill_diagonal(expected, 0)
    fitted = statistics.bradley_terry(expected, prior=0.0)
    assert fitted / fitted[-1] == pytest.approx(p / p[-1], rel=1e-6)
    elo = statistics.elo_from_strengths(fitted)
    assert elo[0] - elo[1] == pytest.approx(400 * np.log10(2), rel=1e-6)
    # an unbeaten model stays finite thanks to the virtual tie
    assert np.isfinite(statistics.bradley_terry(np.array([[0.0, 5.0], [0.0, 0.0]]))).all()


def test_bootstrap_ci_covers_the_truth_at_the_nominal_rate():
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(200):
        sample = (rng.random(100) < 0.3).astype(float)
        lo, hi = metrics.bootstrap_ci(sample, np.mean, 300, 0.9, seed=trial)
        covered += lo <= 0.3 <= hi
    assert 0.82 <= covered / 200 <= 0.97
    assert metrics.bootstrap_ci(np.array([1.0]), np.mean, 100, 0.95, 0) is None
    assert metrics.bootstrap_ci(np.ones(5), np.mean, 100, 0.95, 0) == (1.0, 1.0)


def test_outcome_and_default_levels():
    assert statistics.outcome(2.0, 1.0) == 1.0 and statistics.outcome(1.0, 2.0) == 0.0
    assert statistics.outcome(1, 1) == 0.5 and statistics.outcome(1.05, 1.0, margin=0.1) == 0.5
    assert planning.default_levels(10) == [0, 3, 6, 9] and planning.default_levels(5) == [0, 1, 3, 4]


@pytest.mark.parametrize("reply, scores", [("8 7\nAssistant 1 is better.", (8.0, 7.0)), ("\n 6.5   9 \n", (6.5, 9.0)),
                                           ("10 1", (10.0, 1.0))])  # fmt: skip
def test_parse_verdict_accepts_the_asked_format(reply, scores):
    assert judging.parse_verdict(reply) == scores


@pytest.mark.parametrize("reply", ["8,7", "Scores: 8 7", "8 7 6", "11 3", "0 5", "", "Assistant 1 is better\n8 7"])
def test_parse_verdict_rejects_anything_else(reply):
    with pytest.raises(ValueError):
        judging.parse_verdict(reply)


# ---------------------------------------------------------------- the OpenAI-compatible judge


class _JudgeServer(http.server.BaseHTTPRequestHandler):
    """Rates an answer by its stars, +1 for whichever answer comes first (a position bias), and garbles its reply
    when the question contains 'garble'."""

    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, self.headers.get("Authorization"), body))
        prompt = body["messages"][-1]["content"]
        first = re.search(r"Assistant 1's Answer\]\n(.*?)\n\n\[The End", prompt, re.S).group(1)
        second = re.search(r"Assistant 2's Answer\]\n(.*?)\n\n\[The End", prompt, re.S).group(1)
        a, b = 2 + first.count(STAR) + 1, 2 + second.count(STAR)
        content = "I think both are fine" if "garble" in prompt else f"{a} {b}\nThe first one is better."
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_openai_judge_both_orders_cancel_position_bias(tmp_path, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _JudgeServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _JudgeServer.seen = []
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(x) + "\n" for x in ["q one", "q two", "q three", "please garble"]))
    try:
        cfg, _, gens, _ = _scripted_setup(
            tmp_path, models=[{"name": n, "path": str(_model_folder(tmp_path, n, None, "plain"))} for n in ("mid", "weak")],
            prompts=[{"name": "p", "path": str(prompts)}], steerability={"enabled": False}, ablation={},
            quality={"judge": {"kind": "openai", "base_url": f"http://127.0.0.1:{server.server_port}/v1",
                               "model": "judge-1", "api_key_env": "JUDGE_KEY"}, "bootstrap": 50})  # fmt: skip
        loaders = evaluate.Loaders(generator=lambda spec, c: gens[spec.name])  # the real judge loader
        results = evaluate.main(cfg, loaders)
    finally:
        server.shutdown()
    path, auth, body = _JudgeServer.seen[0]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test"
    assert body["model"] == "judge-1" and body["temperature"] == 0
    assert len(_JudgeServer.seen) == 8  # 4 prompts x 2 orders
    (pair,) = results["quality"]["pairs"]
    # mid has one star more than weak, the bias gives the first answer one point: mid wins as A, ties as B
    assert (pair["wins"], pair["ties"], pair["losses"], pair["unparsed"]) == (3, 3, 0, 2)
    assert pair["win_rate"] == pytest.approx(0.75) and pair["consistency"] == 0.0 and pair["prompts"] == 3
    assert "could not be parsed" in " ".join(results["notes"])
    rows = [json.loads(x) for x in (tmp_path / "eval" / "cache" / "verdicts.jsonl").read_text().splitlines()]
    assert sum("error" in r for r in rows) == 2 and all("raw" in r for r in rows)
    # the relative score of the LLM judge is the ratio of its 1-10 scores summed over both orders
    assert results["quality"]["relative"]["weak"]["score"] == pytest.approx(100 * (2 + 3) * 3 / ((4 + 3) * 3))


def test_openai_judge_needs_its_key(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    args = evaluate.JudgeArgs(kind="openai", base_url="http://x/v1", model="m", api_key_env="NO_SUCH_KEY")
    with pytest.raises(UserError, match="NO_SUCH_KEY"):
        judging.load_judge(args)


# ---------------------------------------------------------------- configs and presets


def test_config_errors_name_the_setting(tmp_path):
    base = {"models": [{"name": "a", "path": "tiny-lm"}], "prompts": [{"name": "p", "path": "x.jsonl"}],
            "out": str(tmp_path / "o")}  # fmt: skip
    judge = {"kind": "rm", "path": "r"}
    with pytest.raises(UserError, match="quality.pairs: unknown model 'b'"):
        config_lib.build(evaluate.Config, {**base, "quality": {"judge": judge, "pairs": [["a", "b"]]}})
    with pytest.raises(UserError, match="ablation: unknown ablation row .nope."):
        config_lib.build(evaluate.Config, {**base, "ablation": {"rows": {"nope": "a"}}})
    with pytest.raises(UserError, match="needs quality.judge.path"):
        config_lib.build(evaluate.Config, base)
    with pytest.raises(UserError, match="at least one model"):
        config_lib.build(evaluate.Config, {"prompts": base["prompts"], "quality": {"enabled": False}})
    with pytest.raises(UserError, match="x.jsonl: file does not exist"):
        evaluate.main(config_lib.build(evaluate.Config, {**base, "quality": {"judge": judge}}))


def test_help_lists_the_settings(capsys):
    # The defaults (an rm judge without a path) must construct for the help to show them.
    assert cli.run(["evaluate", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--quality.judge.kind  (Literal['rm', 'apm', 'openai'] = 'rm')" in out and "--report.max_chars" in out


@pytest.mark.parametrize("preset", ["tiny", "quickstart", "ablation"])
def test_presets_load(preset):
    cfg = config_lib.load(evaluate.Config, preset=preset, command="evaluate")
    assert cfg.steerability.apm and cfg.quality.judge.path
    assert [r for r in cfg.ablation.rows.values() if r not in {m.name for m in cfg.models}] == []


# ---------------------------------------------------------------- real tiny models through the CLI


def _tiny_apm_folder(folder: Path) -> None:
    from safetensors.torch import save_file

    from steerlm.apm_model import HEAD
    from steerlm.heads import HeadModel

    encoder, tokenizer = models.tiny_encoder(seed=3)
    head = HeadModel(encoder, len(SCHEMA.names), "mean").head
    meta = {"kind": "regression", "attributes": SCHEMA.to_dict(), "backbone": "encoder", "pooling": "mean",
            "max_length": 64, "head": HEAD}  # fmt: skip
    models.save_model(encoder, tokenizer, folder, "steerlm_apm.json", meta)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(folder / HEAD))


def _tiny_rm_folder(folder: Path) -> None:
    from safetensors.torch import save_file

    from steerlm.heads import HeadModel
    from steerlm.rm_model import HEAD

    encoder, tokenizer = models.tiny_encoder(seed=4)
    head = HeadModel(encoder, 1, "mean").head
    meta = {"backbone": "encoder", "pooling": "mean", "max_length": 64, "head": HEAD}
    models.save_model(encoder, tokenizer, folder, "steerlm_rm.json", meta)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(folder / HEAD))


def test_tiny_models_end_to_end_through_the_cli(tmp_path, monkeypatch, shared_data, capsys):
    lm, tok = models.tiny_causal_lm()
    meta = {"attributes": SCHEMA.to_dict(), "template": "chat", "conditioning": "attributes", "base_model": "tiny-lm",
            "lora": False}  # fmt: skip
    models.save_model(lm, tok, tmp_path / "steer", "steerlm_model.json", meta)
    models.save_model(lm, tok, tmp_path / "sft", "steerlm_model.json", {**meta, "attributes": None,
                                                                        "conditioning": "none"})  # fmt: skip
    _tiny_apm_folder(tmp_path / "apm")
    _tiny_rm_folder(tmp_path / "rm")
    config = {
        "out": str(tmp_path / "eval"),
        "models": [{"name": "base", "path": "tiny-lm"}, {"name": "sft", "path": str(tmp_path / "sft")},
                   {"name": "steerlm", "path": str(tmp_path / "steer")}],
        "prompts": [{"name": "mt_bench", "path": str(shared_data / "prompts" / "mt_bench_question.jsonl"), "limit": 2},
                    {"name": "oasst", "path": str(shared_data / "prompts" / "oasst_prompt_lottery_en_250.jsonl"),
                     "limit": 2}],
        "sampling": {"max_new_tokens": 4, "seed": 1},
        "steerability": {"apm": str(tmp_path / "apm"), "attributes": ["humor", "toxicity"], "levels": [0, 9],
                         "num_prompts": 1},
        "quality": {"judge": {"kind": "rm", "path": str(tmp_path / "rm")}, "reference": "base", "bootstrap": 20},
        "ablation": {"rows": {"plain_sft": "sft", "apm_labels": "steerlm"}},
    }  # fmt: skip
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.run(["evaluate", "--config", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "Elo (Bradley-Terry)" in printed and "report.html" in printed
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    steer = results["steerability"]["models"]["steerlm"]
    assert set(steer) == {"humor", "toxicity"} and steer["humor"]["n"] == [2, 2]
    assert set(results["quality"]["elo"]) == {"base", "sft", "steerlm"}
    assert results["prompt_sets"] == {"mt_bench": {"read": 2, "steerability": 1, "quality": 2},
                                      "oasst": {"read": 2, "steerability": 1, "quality": 2}}  # fmt: skip
    for p in results["quality"]["pairs"]:
        assert p["wins"] + p["ties"] + p["losses"] == 8 and p["consistency"] == 1.0
    answers = [json.loads(x) for x in (tmp_path / "eval" / "cache" / "generations.jsonl").read_text().splitlines()]
    assert {a["model"] for a in answers} == {"base", "sft", "steerlm"}
    # the report again, from the cache alone, after the models are gone
    for name in ("steer", "sft", "apm", "rm"):
        (tmp_path / name / "config.json").unlink(missing_ok=True)
    _failing_loaders(monkeypatch)
    assert cli.run(["evaluate", "--config", str(path), "--from_cache"]) == 0
    assert json.loads((tmp_path / "eval" / "results.json").read_text()) == results

"""`steerlm pipeline --preset tiny` end to end, stage skipping, and bootstrap (SPEC §5.4) on its outputs."""

import json

import pytest
from conftest import SHARED_DATA

from steerlm import bootstrap, cli, config, pipeline, serve, steerability
from steerlm.attributes import AttributeSchema
from steerlm.data.records import read_records


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    source = SHARED_DATA / "oasst1" / "oasst1-en-dev.jsonl"
    if not source.exists():
        pytest.skip("real data folder is absent")
    out = tmp_path_factory.mktemp("pipe") / "run"
    args = ["pipeline", "--preset", "tiny", f"--out={out}", f"--prepare.source={source}", "--prepare.max_trees=12"]
    assert cli.run(args) == 0
    return out, args


def test_pipeline_writes_every_stage(tiny_run, capsys):
    out, _ = tiny_run
    for stage in ("data", "apm", "annotated", "sft", "bootstrap", "check"):
        assert (out / stage / "done.json").exists(), stage
    assert (out / "sft" / "best" / "steerlm_model.json").exists()
    assert (out / "bootstrap" / "sft" / "best" / "steerlm_model.json").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"].endswith("bootstrap/sft/best")
    check = json.loads((out / "check" / "steerability.json").read_text())
    assert set(check["attributes"]) == {"verbosity", "quality", "humor"}
    assert check["attributes"]["verbosity"]["requested"] == [0, 4, 9] and len(check["words"]["verbosity"]) == 3
    assert all(len(check["attributes"][a]["measured_mean"]) == 2 for a in ("quality", "humor"))
    assert check["samples"]["lowest"]["level"] == 0 and check["samples"]["highest"]["level"] == 9
    assert set(check["readout"]) >= {"verbosity"}  # the bootstrap SFT's own read-out, from its summary
    assert (out / "check" / "steerability.png").stat().st_size > 1000


def test_rerun_skips_finished_stages_and_reruns_changed_ones(tiny_run, capsys):
    out, args = tiny_run
    capsys.readouterr()
    assert cli.run(args) == 0
    text = capsys.readouterr().out
    assert text.count("up to date, skipped") == 6
    assert cli.run(args + ["--sft.train.max_steps=3"]) == 0
    text = capsys.readouterr().out
    for stage in ("prepare", "train-apm", "annotate"):
        assert f"[{stage}] up to date" in text
    for stage in ("sft", "bootstrap", "check"):  # sft changed, and everything downstream of it
        assert f"[{stage}] running" in text


def test_check_decodes_in_batches_of_its_batch_size(tiny_run, tmp_path, monkeypatch):
    out, _ = tiny_run
    seen = []
    measure = steerability.measure_attribute

    def spy(*args, batch_size, **kwargs):
        seen.append(batch_size)
        return measure(*args, batch_size=batch_size, **kwargs)

    monkeypatch.setattr(steerability, "measure_attribute", spy)
    check = pipeline.CheckArgs(attributes=["verbosity"], levels_for={"verbosity": [0, 9]}, num_prompts=3,
                               max_new_tokens=4, batch_size=5)  # fmt: skip
    report = pipeline.run_check(str(out / "sft" / "best"), str(out / "apm" / "best"), out / "data", check, tmp_path)
    assert seen == [5]
    assert report["attributes"]["verbosity"]["requested"] == [0, 9]
    assert (tmp_path / "steerability.json").exists()
    with pytest.raises(ValueError, match="batch_size"):
        pipeline.CheckArgs(batch_size=0)


def test_check_guides_against_its_reference(tiny_run, tmp_path, monkeypatch):
    out, _ = tiny_run
    seen = []
    measure = steerability.measure_attribute

    def spy(generator, apm, prompts, attribute, levels, sampling, **kwargs):
        seen.append((sampling.guidance_scale, sampling.guidance_reference, sampling.guidance_plausibility,
                     sampling.guidance_reference_plausibility))  # fmt: skip
        return measure(generator, apm, prompts, attribute, levels, sampling, **kwargs)

    monkeypatch.setattr(steerability, "measure_attribute", spy)
    check = pipeline.CheckArgs(attributes=["verbosity"], levels_for={"verbosity": [0, 9]}, num_prompts=2,
                               max_new_tokens=4, guidance_scale=2.0, guidance_reference="middle",
                               guidance_plausibility=0.2)  # fmt: skip
    report = pipeline.run_check(str(out / "sft" / "best"), str(out / "apm" / "best"), out / "data", check, tmp_path)
    assert seen == [(2.0, "middle", 0.2, 0.01)]
    assert (report["guidance_plausibility"], report["guidance_reference_plausibility"]) == (0.2, 0.01)
    assert report["guidance_reference"] == "middle"
    assert report["table"].startswith("guidance scale 2 against 'middle', 2 held-out prompts")
    with pytest.raises(ValueError, match="guidance_reference must be"):
        pipeline.CheckArgs(guidance_reference="midle")
    assert pipeline.CheckArgs(guidance_reference="humor:2,verbosity:2").guidance_reference == "humor:2,verbosity:2"


def test_the_printed_serve_command_carries_the_checks_guidance():
    guided = pipeline.CheckArgs(guidance_scale=2.0, guidance_reference="middle")
    line = pipeline.serve_command("runs/q/sft/best", "runs/q/apm/best", guided)
    assert line == ("steerlm serve --model=runs/q/sft/best --apm=runs/q/apm/best --guidance_scale=2 "
                    "--guidance_reference=middle")  # fmt: skip
    lists, bools, multi = cli._fields_of(serve.Config)
    _, _, overrides, _ = cli.parse_args(line.split()[2:], lists, bools, multi)
    cfg = config.load(serve.Config, overrides=overrides)  # the CLI's own loader takes it
    assert (cfg.guidance_scale, cfg.guidance_reference) == (2.0, "middle")
    loose = pipeline.CheckArgs(guidance_scale=2.0, guidance_reference="middle", guidance_plausibility=0)
    assert pipeline.serve_command("m", "a", loose).endswith("--guidance_reference=middle --guidance_plausibility=0")
    with pytest.raises(ValueError, match="guidance_reference_plausibility must be in"):
        pipeline.CheckArgs(guidance_reference_plausibility=1.5)
    assert (
        pipeline.serve_command("my runs/m", "a", pipeline.CheckArgs()) == "steerlm serve '--model=my runs/m' --apm=a"
    )
    # a model saved with the check's guidance is served with it anyway: no flags; another scale keeps its reference
    assert pipeline.serve_command("m", "a", pipeline.CheckArgs(), (2.0, "middle")) == "steerlm serve --model=m --apm=a"
    assert pipeline.serve_command("m", "a", pipeline.CheckArgs(guidance_scale=3), (2.0, "middle")).endswith(
        "--guidance_scale=3 --guidance_reference=middle"
    )


def test_bootstrap_labels_come_from_the_apm(tiny_run):
    out, _ = tiny_run
    records = read_records(out / "bootstrap" / "bootstrap.jsonl")
    schema = AttributeSchema(("quality", "toxicity", "humor", "creativity", "violence", "helpfulness",
                              "not_appropriate", "hate_speech", "sexual_content", "fails_task"))  # fmt: skip
    top = max(schema.parse(t.label, ignore_unknown=True).get("quality", 0)
              for r in read_records(out / "annotated" / "train.jsonl") for t in r.assistant_turns if t.label)  # fmt: skip
    for r in records:
        last = r.conversations[-1]
        assert schema.parse(last.extra["requested"])["quality"] == top  # only max-quality combinations requested
        measured = {k: min(9, max(0, round(v))) for k, v in last.extra["measured"].items()}
        assert schema.parse(last.label) == schema.restrict(measured)  # the label is what the APM measured
    report = json.loads((out / "bootstrap" / "report.json").read_text())
    assert report["n"] == len(records) and (out / "bootstrap" / "quality.png").exists()


def test_bootstrap_generation_resumes_without_gaps_or_duplicates(tiny_run, tmp_path, monkeypatch):
    out, _ = tiny_run
    base = dict(model=str(out / "sft" / "best"), apm=str(out / "apm" / "best"), data=str(out / "annotated"),
                num_prompts=6, max_new_tokens=6, batch_size=2, finetune=False)  # fmt: skip
    reference = bootstrap.main(bootstrap.Config(out=str(tmp_path / "ref"), **base))

    from steerlm import generator

    real = generator.Generator.generate
    calls = {"n": 0}

    def dies_on_second_chunk(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(generator.Generator, "generate", dies_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        bootstrap.main(bootstrap.Config(out=str(tmp_path / "run"), **base))
    monkeypatch.setattr(generator.Generator, "generate", real)
    assert len(list((tmp_path / "run" / "generations").glob("*.jsonl"))) == 1
    resumed = bootstrap.main(bootstrap.Config(out=str(tmp_path / "run"), resume=True, **base))
    assert resumed["n"] == reference["n"]
    assert (tmp_path / "run" / "bootstrap.jsonl").read_text() == (tmp_path / "ref" / "bootstrap.jsonl").read_text()


def test_bootstrap_refuses_existing_output(tiny_run, tmp_path):
    out, _ = tiny_run
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("")
    cfg = bootstrap.Config(model=str(out / "sft" / "best"), apm=str(out / "apm" / "best"), data=str(out / "annotated"),
                           out=str(tmp_path / "x"))  # fmt: skip
    from steerlm.errors import UserError

    with pytest.raises(UserError, match="--resume"):
        bootstrap.main(cfg)

"""The benchmarks that docs/performance.md quotes run, on tiny models in seconds, so that a changed API cannot
break them unnoticed (their figures come from real models on an idle machine, never from tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT

from steerlm import config


def run_benchmark(name: str, *args: str, timeout: float = 300) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_generate_throughput_compares_steerlm_with_transformers(tmp_path):
    out = run_benchmark("generate_throughput", "--model=tiny-lm", "--prompts=2", "--batch_size=2", "--new_tokens=3",
                        "--repeats=2", "--dtypes=fp32", f"--out={tmp_path}")  # fmt: skip
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["runs"]) == {"steerlm-fp32", "transformers-fp32"}
    assert all(len(xs) == 2 and min(xs) > 0 for xs in results["runs"].values())
    assert len(results["ratios"]["steerlm / transformers, fp32"]) == 2 and "| steerlm-fp32 |" in out


def test_guidance_cost_measures_both_scales(tmp_path):
    run_benchmark("guidance_cost", "--tiny", "--prompts=2", "--tokens=3", "--repeats=1", "--threads=1",
                  f"--json={tmp_path / 'g.json'}")  # fmt: skip
    numbers = json.loads((tmp_path / "g.json").read_text())
    assert numbers and all(v > 0 for v in _floats(numbers))


def test_decode_refill_times_both_schedules(tmp_path):
    out = run_benchmark("decode_refill", "--tiny", "--prompts=2", "--lengths=2,6", "--batch_size=2", "--repeats=1",
                        f"--json={tmp_path / 'r.json'}")  # fmt: skip
    numbers = json.loads((tmp_path / "r.json").read_text())
    assert set(numbers["seconds"]) == {"fixed batches", "refill"} and numbers["settings"]["tokens"] == 16
    assert len(numbers["ratios"]) == 1 and "refill speed-up" in out


def test_train_throughput_runs_steerlm_padded_packed_and_with_every_position_logits(tmp_path):
    variants = ["steerlm-fp32-padded", "steerlm-fp32-packed", "steerlm-fp32-padded-all-logits"]
    run_benchmark("train_throughput", "--model=tiny-lm", "--records=8", "--batch_size=2", "--max_length=256",
                  "--steps=1", "--repeats=1", f"--variants={','.join(variants)}", f"--out={tmp_path}")  # fmt: skip
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert set(variants) <= set(runs)
    # the LM head on the answer positions only computes the same loss as logits at every position, and the step after
    # an update agrees to the run-to-run spread of CPU training (threaded reductions: ~5e-4 here)
    kept, every = runs["steerlm-fp32-padded"][0]["losses"], runs["steerlm-fp32-padded-all-logits"][0]["losses"]
    assert len(kept) == len(every) == 2 and abs(kept[0] - every[0]) < 1e-5 and abs(kept[1] - every[1]) < 2e-3


def test_serve_throughput_runs_both_phases(tmp_path):
    out = run_benchmark("serve_throughput", "--requests=2", "--max_tokens=2", "--concurrency=2",
                        f"--json={tmp_path / 's.json'}")  # fmt: skip
    assert "concurrent/sequential throughput" in out and (tmp_path / "s.json").exists()


def test_sft_seeds_trains_and_checks_each_seed_and_reuses_finished_ones(tmp_path):
    from steerlm.data.records import Record, Turn, write_records

    data = tmp_path / "data"
    data.mkdir()
    for name, n in (("train.jsonl", 12), ("val.jsonl", 4)):
        write_records(data / name, [Record([Turn("User", f"Question {i}?"),
                                            Turn("Assistant", "word " * (1 + 7 * (i % 4)), f"humor:{i % 4}")])
                                    for i in range(n)])  # fmt: skip
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"model: tiny-lm\ndata: {data}\ntemplate: chat\nlevels: 4\ncomputed: [verbosity]\n"
                   "flip_gap_examples: 2\nreadout_examples: 2\n"
                   "train: {max_steps: 2, batch_size: 2, max_length: 256, log_every: 1}\n")  # fmt: skip
    args = [f"--config={cfg}", "--name=quick", "--seeds=1,2", f"--out={tmp_path / 'seeds'}", "--prompts=2",
            "--max_new_tokens=3", "--batch_size=4"]  # fmt: skip
    out = run_benchmark("sft_seeds", *args)
    summary = json.loads((tmp_path / "seeds" / "quick" / "summary.json").read_text())
    assert set(summary["runs"]) == {"1", "2"} and "over seeds" in out
    for run in summary["runs"].values():
        assert len(run["words"]) == 4 and run["prompts"] == 2 and run["sft_seconds"] > 0
    assert summary["over_seeds"]["spearman"] is None or summary["over_seeds"]["spearman"]["n"] >= 1
    assert config.read_yaml(tmp_path / "seeds" / "quick" / "seed2" / "config.yaml")["train"]["seed"] == 2
    stamp = (tmp_path / "seeds" / "quick" / "seed1" / "summary.json").stat().st_mtime
    run_benchmark("sft_seeds", *args)  # a finished seed is checked again, not retrained
    assert (tmp_path / "seeds" / "quick" / "seed1" / "summary.json").stat().st_mtime == stamp


def test_fluency_scores_every_model_on_the_same_prompts(tmp_path):
    from _serve_support import steerable_tiny, tiny_apm

    from steerlm.data.records import Record, Turn, write_records

    data = tmp_path / "data"
    data.mkdir()
    write_records(data / "val.jsonl", [Record([Turn("User", f"Question {i}?"), Turn("Assistant", "An answer.")])
                                       for i in range(3)])  # fmt: skip
    model, apm = steerable_tiny(tmp_path / "sft" / "best"), tiny_apm(tmp_path / "apm")
    out = run_benchmark("fluency", f"--data={data}", f"--apm={apm}", "--model=plain=tiny-lm", f"--model=steer={model}",
                        f"--model=guided={model}", "--guided=guided=3:middle", "--reference_lm=tiny-lm", "--prompts=2",
                        "--max_new_tokens=4", f"--out={tmp_path / 'f.json'}")  # fmt: skip
    report = json.loads((tmp_path / "f.json").read_text())
    assert list(report["models"]) == ["plain", "steer", "guided"] and report["prompts"] == 2
    assert report["models"]["plain"]["asked"] is None and report["models"]["steer"]["asked"] == {"quality": 9}
    assert report["models"]["guided"]["guidance"] == [3.0, "middle"]
    assert len(report["prompt_texts"]) == 2 and report["length"]["slope"] is not None
    for row in report["models"].values():
        assert len(row["answers"]) == 2 and row["perplexity"] > 1 and row["apm_quality_ci"][0] <= row["apm_quality"]
        assert isinstance(row["length_residual"], float)
    assert "perplexity" in out and "mean residual" in out
    # A guided name that no model carries, or a model without attributes to guide, is refused.
    for guided in ("--guided=nobody=2:middle", "--guided=plain=2:middle"):
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fluency.py"), f"--data={data}",
                               f"--apm={apm}", "--model=plain=tiny-lm", guided, "--reference_lm=tiny-lm"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 2 and "--guided" in done.stderr


def test_plot_steer_checks_draws_every_line_and_refuses_a_malformed_one(tmp_path):
    def report(path, scale, measured):
        result = {"attribute": "verbosity", "requested": [0, 1, 2], "measured_mean": measured, "spearman": 0.5,
                  "spearman_ci": [0.1, 0.9]}  # fmt: skip
        path.write_text(json.dumps({"scales": {scale: {"verbosity": result}}}))
        return path

    a, b = report(tmp_path / "a.json", "2", [0.0, 1.0, 2.0]), report(tmp_path / "b.json", "1", [1.0, 1.0, 1.0])
    out = run_benchmark("plot_steer_checks", f"--line=OASST|steered={a}@2", f"--line=OASST|plain={b}@1",
                        f"--line=MT-Bench|steered={a}@2", f"--out={tmp_path / 'p.png'}")  # fmt: skip
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "wrote" in out
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for bad in (f"--line=no panel={a}@2", f"--line=OASST|steered={a}@3"):
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plot_steer_checks.py"), bad,
                               f"--out={tmp_path / 'q.png'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert done.returncode != 0 and ("PANEL|LABEL" in done.stderr or "no scale 3" in done.stderr)
    assert not (tmp_path / "q.png").exists()


def _floats(value) -> list[float]:
    """Every number in a JSON value."""
    if isinstance(value, dict):
        return [x for v in value.values() for x in _floats(v)]
    if isinstance(value, list):
        return [x for v in value for x in _floats(v)]
    return [float(value)] if isinstance(value, (int, float)) and not isinstance(value, bool) else []

"""The numbers of `steerlm evaluate`: steerability curves (requested vs measured level), pairwise win rates,
Bradley-Terry Elo, judge scores relative to a reference, and the paper's ablation rows, with percentile bootstrap
intervals over prompts (`scipy.stats.bootstrap`, seeded, so a report is reproducible).

Prompts are the unit of resampling: both orders of a comparison stay together (docs/evaluate.md, "Pairwise quality").
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from steerlm import config as config_lib
from steerlm.evaluation.cache import CACHE, VERDICTS
from steerlm.evaluation.judging import judge_id
from steerlm.evaluation.planning import Job, Prompt, schema_of
from steerlm.metrics import bootstrap_ci
from steerlm.steerability import AttributeResult, summarize_measurements

if TYPE_CHECKING:  # the settings live in the stage module, which imports this one
    from steerlm.evaluate import Config

#: The SteerLM paper's ablation (SPEC §8): row key, label, % of ChatGPT (SteerLM 43B, Vicuna-80, GPT-4 judge).
ABLATION_ROWS: tuple[tuple[str, str, float], ...] = (
    ("plain_sft", "plain SFT on all data", 79.7),
    ("attribute_labels", "+ human attribute labels", 96.2),
    ("high_quality", "+ high-quality subset", 98.1),
    ("apm_labels", "+ APM labels instead of human", 102.7),
    ("hh_rlhf", "+ HH-RLHF (and self-identification) data", 103.7),
    ("bootstrap", "+ bootstrapping", 104.2),
)


def bradley_terry(wins: np.ndarray, prior: float = 0.5, iterations: int = 10_000, tol: float = 1e-10) -> np.ndarray:
    """Bradley-Terry strengths p (P(i beats j) = p_i / (p_i + p_j)) from `wins[i, j]` = wins of i over j (a tie is
    half a win each way), by Hunter's (2004) MM iterations; geometric mean 1. `prior` adds that many virtual wins
    each way to every pair that met (one virtual tie), so an unbeaten model gets a finite strength."""
    w = np.asarray(wins, dtype=np.float64)
    met = (w + w.T) > 0
    w = w + prior * met
    games = w + w.T
    total = w.sum(1)
    p = np.ones(len(w))
    for _ in range(iterations):
        denom = (games / (p[:, None] + p[None, :])).sum(1)
        new = np.where(denom > 0, total / np.where(denom > 0, denom, 1.0), 1.0)
        new = np.where(new > 0, new, 1e-12)
        new /= np.exp(np.log(new).mean())
        done = np.max(np.abs(new - p)) < tol
        p = new
        if done:
            break
    return p


def elo_from_strengths(p: np.ndarray) -> np.ndarray:
    """Elo points of Bradley-Terry strengths: 1000 + 400·log10(p), so the mean is 1000 and a 400-point lead means
    10:1 odds of winning."""
    return 1000.0 + 400.0 * np.log10(p)


def outcome(x: float, y: float, margin: float = 0.0) -> float:
    """1 when x beats y by more than `margin`, 0 when it loses by more, 0.5 otherwise (a tie)."""
    return 1.0 if x - y > margin else 0.0 if y - x > margin else 0.5


@dataclass
class PairResult:
    a: str
    b: str
    wins: int
    """Judgements (both orders) a won."""
    ties: int
    losses: int
    prompts: int
    """Prompts with at least one parsed judgement."""
    win_rate: float | None
    """Mean over prompts of a's result (win 1, tie 0.5, loss 0; each prompt's two orders averaged)."""
    ci: tuple[float, float] | None
    consistency: float | None
    """Share of prompts whose two orders agree (pairwise judges; a score judge always agrees with itself)."""
    unparsed: int


def pair_outcomes(a: str, b: str, prompts: list[Prompt], judged: dict, pairwise: bool,
                  margin: float) -> tuple[list[tuple[int, float]], list[float], list[tuple[float, float]], dict]:  # fmt: skip
    """Per prompt and order, a's result against b; per prompt, the mean; per prompt, (score of a, score of b) summed
    over the parsed orders; counts of wins/ties/losses/unparsed and order agreement."""
    per_order, per_prompt, scores = [], [], []
    counts = {"wins": 0, "ties": 0, "losses": 0, "unparsed": 0, "agree": 0, "both": 0}
    for i, p in enumerate(prompts):
        results, sa, sb = [], 0.0, 0.0
        if pairwise:
            for first, second in ((a, b), (b, a)):
                row = judged[(first, second, p.pid)]
                if "scores" not in row:
                    counts["unparsed"] += 1
                    continue
                s_first, s_second = row["scores"]
                x, y = (s_first, s_second) if first == a else (s_second, s_first)
                results.append(outcome(x, y))
                sa, sb = sa + x, sb + y
        else:
            x, y = judged[(a, p.pid)], judged[(b, p.pid)]
            if math.isnan(x) or math.isnan(y):
                counts["unparsed"] += 2
            else:
                results = [outcome(x, y, margin)] * 2  # both orders: a score judge rates each answer alone
                sa, sb = x, y
        for r in results:
            counts["wins" if r == 1 else "losses" if r == 0 else "ties"] += 1
            per_order.append((i, r))
        if len(results) == 2:
            counts["both"] += 1
            counts["agree"] += results[0] == results[1]
        if results:
            per_prompt.append(float(np.mean(results)))
            scores.append((sa, sb))
    return per_order, per_prompt, scores, counts


def compare_pair(a: str, b: str, prompts: list[Prompt], judged: dict, cfg: Config, pairwise: bool) -> PairResult:
    q = cfg.quality
    _, per_prompt, _, c = pair_outcomes(a, b, prompts, judged, pairwise, q.judge.tie_margin)
    rate = float(np.mean(per_prompt)) if per_prompt else None
    ci = bootstrap_ci(np.array(per_prompt), np.mean, q.bootstrap, q.confidence, q.seed)
    consistency = c["agree"] / c["both"] if c["both"] else None
    return PairResult(a, b, c["wins"], c["ties"], c["losses"], len(per_prompt), rate, ci, consistency, c["unparsed"])


def elo_table(names: list[str], pairs: list[tuple[str, str]], prompts: list[Prompt], judged: dict, cfg: Config,
              pairwise: bool) -> dict[str, dict]:  # fmt: skip
    """Bradley-Terry Elo of every judged model from all judgements (both orders), with a bootstrap CI over prompts."""
    index = {n: i for i, n in enumerate(names)}
    per_prompt = np.zeros((len(prompts), len(names), len(names)))
    for a, b in pairs:
        per_order, _, _, _ = pair_outcomes(a, b, prompts, judged, pairwise, cfg.quality.judge.tie_margin)
        for i, r in per_order:
            per_prompt[i, index[a], index[b]] += r
            per_prompt[i, index[b], index[a]] += 1 - r

    def elo(rows: np.ndarray) -> np.ndarray:
        return elo_from_strengths(bradley_terry(rows.sum(0)))

    q = cfg.quality
    ci = bootstrap_ci(per_prompt, elo, q.bootstrap, q.confidence, q.seed)
    fitted = elo(per_prompt)
    return {n: {"elo": float(fitted[i]), "ci": None if ci is None else (float(ci[0][i]), float(ci[1][i]))}
            for n, i in index.items()}  # fmt: skip


def relative_score(m: str, ref: str, prompts: list[Prompt], judged: dict, cfg: Config,
                   pairwise: bool) -> dict | None:  # fmt: skip
    """m's judge score as % of ref's on the same prompts (the paper's "% of ChatGPT"), with a bootstrap CI:
    - LLM judge: 100·Σ score(m) / Σ score(ref) over both orders of their comparisons (scores 1-10, as the paper);
    - APM judge: the same ratio of the quality levels + 1 (1..L);
    - reward model (unbounded scores, a ratio means nothing): 100·mean 2σ(r(m) − r(ref)), the Bradley-Terry
      probability that m's answer is preferred, over one half; 100 means on par either way."""
    q = cfg.quality
    if m == ref:
        return {"score": 100.0, "ci": None, "prompts": len(prompts)}
    _, _, scores, _ = pair_outcomes(m, ref, prompts, judged, pairwise, q.judge.tie_margin)
    if not scores:
        return None
    rows = np.array(scores, dtype=np.float64)
    if q.judge.kind == "rm":

        def stat(r):
            return float(100.0 * np.mean(2.0 / (1.0 + np.exp(-(r[:, 0] - r[:, 1])))))

    else:

        def stat(r):
            return float(100.0 * r[:, 0].sum() / r[:, 1].sum())

    return {"score": stat(rows), "ci": bootstrap_ci(rows, stat, q.bootstrap, q.confidence, q.seed),
            "prompts": len(rows)}  # fmt: skip


def quality_results(cfg: Config, pairs: list[tuple[str, str]], jobs: list[Job], prompts: list[Prompt], judged: dict,
                    notes: list[str]) -> dict:  # fmt: skip
    """Pairwise results, Elo, relative scores, mean judge score and answer length of the compared models."""
    pairwise = cfg.quality.judge.kind == "openai"
    names = list(dict.fromkeys(n for pair in pairs for n in pair))
    pair_results = [compare_pair(a, b, prompts, judged, cfg, pairwise) for a, b in pairs]
    unparsed = sum(p.unparsed for p in pair_results)
    if unparsed:
        notes.append(f"Quality: {unparsed} judgements could not be parsed strictly and are left out (the raw replies "
                     f"are in {CACHE}/{VERDICTS}).")  # fmt: skip
    mean_score = {} if pairwise else {n: float(np.nanmean([judged[(n, p.pid)] for p in prompts])) for n in names}
    lengths = defaultdict(list)
    for j in jobs:
        lengths[j.model].append(len(j.answer))
    return {
        "judge": config_lib.to_dict(cfg.quality.judge) | {"id": judge_id(cfg.quality.judge)},
        "prompts": len(prompts),
        "reference": cfg.reference,
        "pairs": [p.__dict__ for p in pair_results],
        "elo": elo_table(names, pairs, prompts, judged, cfg, pairwise),
        "relative": {n: relative_score(n, cfg.reference, prompts, judged, cfg, pairwise) for n in names},
        "mean_score": mean_score,
        "mean_length": {n: float(np.mean(v)) for n, v in lengths.items()},
    }


def ablation_results(cfg: Config, prompts: list[Prompt], judged: dict) -> dict:
    """The paper's ablation rows (SPEC §8): each row's relative score and win rate against the ablation reference."""
    pairwise = cfg.quality.judge.kind == "openai"
    ref = cfg.ablation_reference
    rows = []
    for key, label, paper in ABLATION_ROWS:
        m = cfg.ablation.rows.get(key)
        row = {"key": key, "label": label, "paper": paper, "model": m, "relative": None, "ci": None, "win_rate": None,
               "win_ci": None}  # fmt: skip
        if m is not None:
            rel = relative_score(m, ref, prompts, judged, cfg, pairwise) or {}
            pr = compare_pair(m, ref, prompts, judged, cfg, pairwise) if m != ref else None
            row.update(relative=rel.get("score"), ci=rel.get("ci"), win_rate=pr.win_rate if pr else None,
                       win_ci=pr.ci if pr else None)  # fmt: skip
        rows.append(row)
    return {"reference": ref, "rows": rows}


#: Below this standard deviation (in levels) over a model's different answers, an APM's measurements of an attribute
#: are treated as constant: such a curve cannot show steering, and the report says so.
MIN_MEASURED_SPREAD = 0.05


@dataclass
class SteerCurve:
    model: str
    result: AttributeResult
    stderr: list[float]
    n: list[int]
    failed: int
    """Answers the APM gave no level for (e.g. a generative APM's unparsable output)."""


def steer_curves(cfg: Config, jobs: list[Job], measured: dict[tuple[str, str], tuple[float, int] | None],
                 infos: dict[str, dict], notes: list[str]) -> dict[str, list[SteerCurve]]:  # fmt: skip
    """Per model, per attribute: requested vs measured level, on the model's scale (an APM with other levels is
    rescaled: measured · (L_model − 1) / (L_apm − 1))."""
    groups: dict[tuple[str, str], list[Job]] = defaultdict(list)
    for j in jobs:
        groups[(j.model, j.attribute)].append(j)
    out: dict[str, list[SteerCurve]] = defaultdict(list)
    for (name, attr), group in groups.items():
        schema = schema_of(infos[name])
        top = schema.max_level if schema else 9
        tags, values, texts, failed = [], [], [], 0
        for j in group:
            got = measured[(j.key, attr)]
            if got is None:
                failed += 1
                continue
            tags.append(j.level)
            values.append(got[0] * top / max(1, got[1] - 1))
            texts.append(j.answer)
        if not values:
            notes.append(f"Steerability: the APM gave no `{attr}` level for `{name}`'s answers (it does not predict "
                         "it, or its outputs did not parse).")  # fmt: skip
            continue
        if failed:
            notes.append(f"Steerability: the APM gave no `{attr}` level for {failed} of `{name}`'s answers; they are "
                         "left out.")  # fmt: skip
        spread = float(np.std(values))
        if schema and len(set(texts)) > 1 and spread < MIN_MEASURED_SPREAD:  # (an unconditioned control has its note)
            notes.append(f"Steerability: the APM's `{attr}` levels of `{name}`'s {len(values)} different answers spread "
                         f"by only {spread:.3f} levels (standard deviation): whether the answers are alike or the APM "
                         "cannot tell them apart, this curve cannot show steering. Check with a stronger APM.")  # fmt: skip
        result = summarize_measurements(attr, tags, values, texts)
        stderr, n = [], []
        for lv in result.requested:
            vals = np.array([v for v, t in zip(values, tags, strict=True) if t == lv])
            n.append(len(vals))
            stderr.append(float(vals.std(ddof=1) / math.sqrt(len(vals))) if len(vals) > 1 else 0.0)
        out[name].append(SteerCurve(name, result, stderr, n, failed))
    return dict(out)

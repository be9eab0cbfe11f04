"""The judges of `steerlm evaluate`'s pairwise quality comparison, and their verdicts on the compared answers.

A score judge rates each answer alone (a reward model; an APM's level of one attribute, + 1): it has no position
bias. A pairwise judge (an OpenAI-compatible chat endpoint, the Vicuna-benchmark review prompt the SteerLM paper used
with GPT-4) rates both answers 1-10 in one prompt, so every pair is judged in both orders. Verdicts are parsed
strictly and cached like every answer (docs/evaluate.md, "Pairwise quality").
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from steerlm.data.records import Record
from steerlm.errors import UserError
from steerlm.evaluation.cache import CACHE_VERSION, Cache, fill, fresh, key_of, path_fingerprint
from steerlm.evaluation.planning import Job, Prompt, score_key, scored_record

if TYPE_CHECKING:  # the settings live in the stage module, which imports this one
    from steerlm.evaluate import Config, JudgeArgs


class ScoreJudge:
    """Scores each answer on its own (a reward model, an APM): it has no position bias, so its two orders agree."""

    pairwise = False

    def __init__(self, score: Callable[[list[Record]], list[float]]):
        self.score = score


#: The Vicuna-benchmark pairwise review prompt (FastChat `llm_judge`, the "general" reviewer) that the SteerLM paper
#: used with GPT-4: two answers rated 1-10, the two scores alone on the first line.
JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
JUDGE_PROMPT = """[Question]
{question}

[The Start of Assistant 1's Answer]
{answer_1}

[The End of Assistant 1's Answer]

[The Start of Assistant 2's Answer]
{answer_2}

[The End of Assistant 2's Answer]

[System]
We would like to request your feedback on the performance of two AI assistants in response to the user question \
displayed above.
Please rate the helpfulness, relevance, accuracy, level of details of their responses. Each assistant receives an \
overall score on a scale of 1 to 10, where a higher score indicates better overall performance.
Please first output a single line containing only two values indicating the scores for Assistant 1 and 2, \
respectively. The two scores are separated by a space. In the subsequent line, please provide a comprehensive \
explanation of your evaluation, avoiding any potential bias and ensuring that the order in which the responses \
were presented does not affect your judgment."""
JUDGE_PROMPT_VERSION = "vicuna-pair-v1"
_SCORES_LINE = re.compile(r"\s*(\d+(?:\.\d+)?)\s+(\d+(?:\.\d+)?)\s*")


def parse_verdict(text: str) -> tuple[float, float]:
    """The two 1-10 scores on the first non-empty line of a judge's reply, strictly: exactly two numbers separated by
    whitespace, each within 1..10. Anything else raises ValueError (counted as unparsed, never guessed)."""
    lines = [ln for ln in (text or "").splitlines() if ln.strip()]
    if not lines:
        raise ValueError("empty reply")
    m = _SCORES_LINE.fullmatch(lines[0])
    if not m:
        raise ValueError(f"first line is not two scores: {lines[0][:80]!r}")
    a, b = float(m.group(1)), float(m.group(2))
    if not (1 <= a <= 10 and 1 <= b <= 10):
        raise ValueError(f"scores {a} {b} are outside 1..10")
    return a, b


class OpenAIJudge:
    """An OpenAI-compatible `POST {base_url}/chat/completions` endpoint rating two answers 1-10 (temperature 0)."""

    pairwise = True

    def __init__(self, args: JudgeArgs):
        self.args = args
        self.key = ""
        if args.api_key_env:
            self.key = os.environ.get(args.api_key_env, "")
            if not self.key:
                raise UserError(f"set the environment variable {args.api_key_env} to the judge's API key (or "
                                "api_key_env: '' for an endpoint without one)", field="quality.judge.api_key_env")  # fmt: skip
        self.url = args.base_url.rstrip("/") + "/chat/completions"

    def compare(self, items: Sequence[tuple[str, str, str]]) -> list[dict]:
        """For each (question, answer 1, answer 2): {"scores": [s1, s2], "raw": reply} or {"error": ..., "raw": ...}."""
        out = []
        for question, a, b in items:
            raw = self._ask(JUDGE_PROMPT.format(question=question, answer_1=a, answer_2=b))
            try:
                out.append({"scores": list(parse_verdict(raw)), "raw": raw})
            except ValueError as e:
                out.append({"error": str(e), "raw": raw})
        return out

    def _ask(self, prompt: str) -> str:
        import requests  # only this judge needs it

        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        payload = {"model": self.args.model, "temperature": 0, "max_tokens": self.args.max_tokens,
                   "messages": [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": prompt}]}  # fmt: skip
        problem = ""
        for attempt in range(self.args.retries + 1):
            if attempt:
                time.sleep(min(30.0, 2.0**attempt))
            try:
                r = requests.post(self.url, json=payload, headers=headers, timeout=self.args.timeout)
            except requests.RequestException as e:
                problem = f"{type(e).__name__}: {e}"
                continue
            if r.status_code == 429 or r.status_code >= 500:
                problem = f"HTTP {r.status_code}: {r.text[:200]}"
                continue
            if r.status_code != 200:
                raise UserError(f"the judge endpoint answered HTTP {r.status_code}: {r.text[:300]}",
                                field="quality.judge")  # fmt: skip
            try:
                return r.json()["choices"][0]["message"]["content"] or ""
            except (ValueError, KeyError, IndexError, TypeError):
                raise UserError(f"not an OpenAI chat completion: {r.text[:300]}", field="quality.judge") from None
        raise UserError(f"the judge endpoint {self.url} failed {self.args.retries + 1} times: {problem}",
                        field="quality.judge")  # fmt: skip


def load_judge(args: JudgeArgs):
    """A score judge (`.score(records) -> list[float]`) or a pairwise judge (`.compare(items) -> list[dict]`)."""
    if args.kind == "rm":
        from steerlm.rm_model import load_rm

        rm = load_rm(args.path)
        return ScoreJudge(lambda records: rm.score(records, batch_size=args.batch_size))
    if args.kind == "apm":
        from steerlm.apm_model import load_apm

        apm = load_apm(args.path)
        if args.attribute not in apm.schema.names:
            raise UserError(f"the APM does not predict {args.attribute!r}; it has {', '.join(apm.schema.names)}",
                            field="quality.judge.attribute")  # fmt: skip
        # Levels 0..L-1 become scores 1..L (like the 1-10 of an LLM judge), so ratios of sums are defined.
        return ScoreJudge(lambda records: [p.get(args.attribute, math.nan) + 1.0
                                           for p in apm.predict(records, batch_size=args.batch_size)])  # fmt: skip
    return OpenAIJudge(args)


def judge_id(args: JudgeArgs) -> str:
    """The judge as cache keys and results.json name it: kind and folder (and attribute), or endpoint, model and
    prompt version."""
    if args.kind == "rm":
        return f"rm:{args.path}"
    if args.kind == "apm":
        return f"apm:{args.path}:{args.attribute}"
    return f"openai:{args.base_url.rstrip('/')}:{args.model}:{JUDGE_PROMPT_VERSION}"


def judge_fingerprint(args: JudgeArgs) -> str:
    """What retires a judge's cached rows: its folder's fingerprint, or an endpoint's model name."""
    if args.kind == "openai":
        return args.model
    from steerlm.apm_model import apm_folder

    return path_fingerprint(apm_folder(args.path) if args.kind == "apm" else args.path)


def judge_missing(cfg: Config, jobs: list[Job], pairs: list[tuple[str, str]], prompts: list[Prompt], cache: Cache,
                  loader: Callable) -> dict:  # fmt: skip
    """Judge scores: for a score judge, {(model, prompt id): score}; for a pairwise judge, {(first, second, prompt
    id): cached verdict row} for both orders of every pair."""
    args = cfg.quality.judge
    jid, fp = judge_id(args), ("" if cfg.from_cache else judge_fingerprint(args))
    answer = {(j.model, j.prompt.pid): j.answer for j in jobs}
    if args.kind != "openai":
        wanted = {(j.model, j.prompt.pid): score_key(jid, j.prompt, j.answer) for j in jobs}
        by_key = {score_key(jid, j.prompt, j.answer): j for j in jobs}
        missing = [k for k in dict.fromkeys(wanted.values()) if not fresh(cache.get(k), fp, cfg.from_cache)]

        def scores(judge, part: list[str]) -> list[dict]:
            values = judge.score([scored_record(by_key[k].prompt, by_key[k].answer) for k in part])
            return [{"key": k, "scorer": jid, "fp": fp, "value": float(s)} for k, s in zip(part, values, strict=True)]

        fill(cache, missing, from_cache=cfg.from_cache, what="judge scores", source=jid,
             announce=f"[judge] scoring {len(missing)} answers with {jid}", load=lambda: loader(args), rows=scores,
             step=256, desc="judge")  # fmt: skip
        return {mk: cache.get(k)["value"] for mk, k in wanted.items()}
    # A pairwise judge sees both answers at once: every pair in both orders.
    wanted, items = {}, {}
    for a, b in pairs:
        for p in prompts:
            for first, second in ((a, b), (b, a)):
                x, y = answer[(first, p.pid)], answer[(second, p.pid)]
                k = key_of({"v": CACHE_VERSION, "judge": jid, "prompt": p.json, "a": x, "b": y})
                wanted[(first, second, p.pid)] = k
                items.setdefault(k, (p.text, x, y))
    missing = [k for k in items if not fresh(cache.get(k), fp, cfg.from_cache)]

    def verdicts(judge, part: list[str]) -> list[dict]:
        return [
            {"key": k, "judge": jid, "fp": fp, **v}
            for k, v in zip(part, judge.compare([items[k] for k in part]), strict=True)
        ]

    fill(cache, missing, from_cache=cfg.from_cache, what="judge verdicts", source=jid,
         announce=f"[judge] {len(missing)} comparisons by {jid}", load=lambda: loader(args), rows=verdicts, step=8,
         desc="judge")  # fmt: skip
    return {mk: cache.get(k) for mk, k in wanted.items()}

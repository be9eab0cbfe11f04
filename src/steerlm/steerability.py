"""Does steering work? Generate at several requested levels of one attribute (others at defaults), measure the
answers with an APM, and compare requested with measured levels (SPEC §8: the paper's toxicity steering).

Used by `steerlm pipeline` (the short check at the end) and by the evaluation suite.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from steerlm import attributes
from steerlm.data import templates
from steerlm.data.preferences import read_prompts
from steerlm.data.records import ASSISTANT, Record, Turn, read_records, training_prompts, val_records_file
from steerlm.metrics import bootstrap_ci, spearman

#: Resamples of the prompts behind `AttributeResult.spearman_ci` (seeded: a check prints the same interval again).
CI_RESAMPLES = 1000


@dataclass
class AttributeResult:
    attribute: str
    requested: list[int]
    """Requested levels, one per level setting."""
    measured_mean: list[float]
    """Mean APM-measured level of the answers at each requested level."""
    spearman: float | None
    """Spearman between requested and measured level over all answers."""
    slope: float | None
    """Least-squares slope of measured on requested level (levels per level)."""
    monotone_steps: int
    """How many consecutive pairs of requested levels raise the mean measured level."""
    answers: dict[int, list[str]] = field(default_factory=dict)
    spearman_ci: list[float] | None = None
    """95 % percentile bootstrap interval of `spearman` over the prompts (each resampled prompt brings its answers
    at every level): how far another draw of as many prompts could move it. None when not computed."""

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def draw_prompts(prompts: Sequence[Record], n: int, seed: int) -> list[Record]:
    """The check's prompts: `n` of `prompts` (all when fewer) drawn with `seed`. `steerlm pipeline`'s check and the
    benchmarks draw alike, so a benchmark on the same data and seed answers the same prompts."""
    return random.Random(seed).sample(list(prompts), min(n, len(prompts)))


def file_prompts(generator, path: str | Path, n: int, seed: int) -> list[Record]:
    """The check's prompts from a prompts file that `steerlm generate` reads (MT-Bench questions, JSON strings,
    `{"prompt": ...}` objects, records: `read_prompts`) as `generator`'s records, `n` of them drawn with `seed`
    (`draw_prompts`)."""
    return draw_prompts([generator.as_record(conv) for conv, _, _ in read_prompts(path)], n, seed)


def held_out_prompts(source: str | Path, n: int, seed: int) -> list[Record]:
    """The check's held-out prompts: every prompt (`training_prompts`) of a data folder's validation split
    (`val_records_file`) or of a records file, then `n` of them drawn with `seed` (`draw_prompts`). Raises UserError,
    located, on a missing split or a bad records line."""
    return draw_prompts(training_prompts(read_records(val_records_file(source))), n, seed)


def measure_attribute(generator, apm, prompts: Sequence[Record], attribute: str, levels: Sequence[int], sampling,
                      batch_size: int = 8, fixed: dict | None = None) -> AttributeResult:  # fmt: skip
    """Answer every prompt at every requested level of `attribute` and score the answers with `apm`."""
    conversations, requests, tags = [], [], []
    for level in levels:
        for prompt in prompts:
            conversations.append(prompt)
            requests.append({**(fixed or {}), attribute: level})
            tags.append(level)
    answers = generator.generate(conversations, requests, sampling, batch_size=batch_size)
    scored = [
        Record(c.conversations + [Turn(ASSISTANT, a or " ")], c.system)
        for c, a in zip(conversations, answers, strict=True)
    ]
    measured = [p[attribute] for p in apm.predict(scored, batch_size=max(batch_size, 16))]
    by_level = {lv: [m for m, t in zip(measured, tags, strict=True) if t == lv] for lv in levels}
    means = [float(np.mean(by_level[lv])) for lv in levels]
    slope = float(np.polyfit(tags, measured, 1)[0]) if len(set(tags)) > 1 else None
    return AttributeResult(
        attribute=attribute,
        requested=list(levels),
        measured_mean=[round(m, 3) for m in means],
        spearman=spearman(tags, measured),
        spearman_ci=prompt_interval(levels, np.asarray(measured).reshape(len(levels), len(prompts)).T),
        slope=None if slope is None else round(slope, 4),
        monotone_steps=sum(b > a + 1e-6 for a, b in zip(means, means[1:], strict=False)),
        answers={lv: [a for a, t in zip(answers, tags, strict=True) if t == lv] for lv in levels},
    )


def prompt_interval(levels: Sequence[int], measured: np.ndarray) -> list[float] | None:
    """The 95 % bootstrap interval over prompts (`metrics.bootstrap_ci`, `CI_RESAMPLES`, seed 0) of the Spearman
    between requested and measured level. `measured` is (prompts, levels): row p holds prompt p's measured level at
    each of `levels`. None with fewer than 2 prompts or when resamples leave Spearman undefined."""

    def rho(rows: np.ndarray) -> float:
        value = spearman(np.tile(levels, len(rows)).tolist(), rows.ravel().tolist())
        return float("nan") if value is None else value

    ci = bootstrap_ci(measured, rho, CI_RESAMPLES, 0.95, seed=0)
    return None if ci is None else [round(ci[0], 3), round(ci[1], 3)]


def format_table(results: Sequence[AttributeResult]) -> str:
    """One line per attribute: measured mean per requested level, Spearman, slope, monotone steps."""
    lines = []
    for r in results:
        cells = "  ".join(f"{lv}->{m:.2f}" for lv, m in zip(r.requested, r.measured_mean, strict=True))
        rho = "n/a" if r.spearman is None else f"{r.spearman:+.3f}"
        if r.spearman_ci is not None:
            rho += f" (95% CI over prompts {r.spearman_ci[0]:+.2f}..{r.spearman_ci[1]:+.2f})"
        slope = "n/a" if r.slope is None else f"{r.slope:+.3f}"
        steps = f"{r.monotone_steps}/{len(r.requested) - 1}"
        lines.append(f"  {r.attribute:<12} {cells}   spearman {rho}  slope {slope}  monotone {steps}")
    return "requested -> mean measured level (APM):\n" + "\n".join(lines)


def summarize_measurements(attribute: str, requested: Sequence[int], measured: Sequence[float],
                           answers: Sequence[str] | None = None) -> AttributeResult:  # fmt: skip
    """The AttributeResult of answers already generated and measured elsewhere (e.g. read from the evaluation's
    cache): one requested and one measured level per answer, any order. The same statistics as `measure_attribute`:
    mean per requested level, Spearman over all answers, least-squares slope, rising consecutive steps."""
    if len(requested) != len(measured):
        raise ValueError(f"{len(requested)} requested levels but {len(measured)} measurements")
    levels = sorted(set(requested))
    by_level = {lv: [m for m, t in zip(measured, requested, strict=True) if t == lv] for lv in levels}
    means = [float(np.mean(by_level[lv])) for lv in levels]
    slope = float(np.polyfit(requested, measured, 1)[0]) if len(levels) > 1 else None
    texts = list(answers) if answers is not None else []
    return AttributeResult(
        attribute=attribute,
        requested=levels,
        measured_mean=[round(m, 3) for m in means],
        spearman=spearman(list(requested), list(measured)),
        slope=None if slope is None else round(slope, 4),
        monotone_steps=sum(b > a + 1e-6 for a, b in zip(means, means[1:], strict=False)),
        answers={lv: [a for a, t in zip(texts, requested, strict=True) if t == lv] for lv in levels} if texts else {},
    )


# ---------------------------------------------------------------- computed attributes: no APM needed


def measure_verbosity(text: str, buckets) -> int:
    """The verbosity level of an answer: its word count's bucket under the model's length edges
    (`attributes.LengthBuckets`, from `steerlm_model.json`), the same edges training labelled with."""
    return buckets.level(text)


class ComputedScorer:
    """Scores answers on computed attributes, APM-style: `predict(records)` -> one `{name: level}` per record,
    measured on the record's last (assistant) turn. Stands in for an APM in `measure_attribute`."""

    def __init__(self, computed: dict):
        self.computed = dict(computed)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.computed)

    def predict(self, records: Sequence[Record], batch_size: int = 0) -> list[dict[str, float]]:
        return [{n: float(b.level(r.conversations[-1].value)) for n, b in self.computed.items()} for r in records]


def scorer_for(attribute: str, apm=None, computed: dict | None = None):
    """What measures `attribute`: a computed attribute's own measure, else the APM when it knows the attribute, else
    None (the attribute cannot be measured)."""
    if computed and attribute in computed:
        return ComputedScorer({attribute: computed[attribute]})
    if apm is not None and attribute in apm.schema.names:
        return apm
    return None


# ---------------------------------------------------------------- what a user sees: words per level, a plot


def mean_words(result: AttributeResult) -> list[float]:
    """Mean word count (`attributes.word_count`, the unit of verbosity) of the answers at each requested level."""
    from steerlm.attributes import word_count

    return [round(float(np.mean([word_count(a) for a in result.answers.get(lv, [])] or [0.0])), 1)
            for lv in result.requested]  # fmt: skip


#: An answer that opens with a `name:level` pair (or the attribute marker) writes an attribute line instead of
#: answering: the failure of a model pushed to read its line harder than it learned to answer under it
#: (docs/steering.md: `category:1,quality:2,...` or its own line repeated, at the low verbosity levels).
#: Also an answer that opens with an attribute name of the catalogue and a colon, whatever follows
#: (`,verbosity:#0,verbosity:#0>>>>`, `,verbosity:of_text>` at verbosity 0 in one quickstart run).
_LINE_START = re.compile(
    rf"^\W*(?:{re.escape(templates.ATTR_MARKER)})?\s*(?:[A-Za-z_][\w-]{{0,23}}\s?:\s?\d"
    rf"|(?:{'|'.join(attributes.CATALOGUE)})\s?:)"
)


def writes_attribute_line(text: str) -> bool:
    """True when `text` starts like an attribute line (`quality:4,...`, `category:1`, `<attributes>...`,
    `,verbosity:#0`)."""
    return bool(_LINE_START.match(text))


def attribute_line_answers(result: AttributeResult) -> list[int]:
    """How many answers at each requested level write an attribute line instead of answering
    (`writes_attribute_line`)."""
    return [sum(writes_attribute_line(a) for a in result.answers.get(lv, [])) for lv in result.requested]


def empty_answers(result: AttributeResult) -> list[int]:
    """How many answers at each requested level are empty (the model ended at once; strong guidance does this at
    the lowest levels, docs/steering.md). An empty answer measures as the shortest, so a check reports the count."""
    return [sum(not a.strip() for a in result.answers.get(lv, [])) for lv in result.requested]


def plot_results(results: Sequence[AttributeResult], path, title: str = "") -> None:
    """One panel per attribute: the mean measured level at each requested level, with the diagonal a perfectly
    steered model would follow (matplotlib, Agg backend; written to `path` as PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, len(results)), figsize=(3.6 * max(1, len(results)), 3.4), squeeze=False)
    for ax, r in zip(axes[0], results, strict=False):
        ax.plot(r.requested, r.measured_mean, "o-", label="measured (mean)")
        lo, hi = min(r.requested), max(r.requested)
        ax.plot([lo, hi], [lo, hi], ":", color="gray", label="requested")
        rho = "n/a" if r.spearman is None else f"{r.spearman:+.2f}"
        if r.spearman_ci is not None:
            rho += f", 95% CI {r.spearman_ci[0]:+.2f}..{r.spearman_ci[1]:+.2f}"
        ax.set_title(f"{r.attribute} (Spearman {rho})", fontsize=9)
        ax.set_xlabel("requested level")
        ax.set_ylabel("measured level")
        ax.set_xticks(r.requested)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""Attribute schema, bucketing, and the attribute string (SPEC §1). The only place that defines them.

An attribute string is `key:int` pairs joined by `,` with no spaces, in canonical order, e.g.
`quality:9,toxicity:0,humor:4`. Levels run 0..L-1; the paper uses L = 10, NeMo's scripts L = 5.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from steerlm.errors import UserError

#: Every label an OASST1 message can carry (SPEC §1).
OASST_LABELS = (
    "spam",
    "lang_mismatch",
    "pii",
    "not_appropriate",
    "hate_speech",
    "sexual_content",
    "quality",
    "toxicity",
    "humor",
    "creativity",
    "violence",
    "helpfulness",
    "fails_task",
    "political_content",
    "moral_judgement",
)

#: The steerable set in NeMo's canonical order; attribute strings list keys in this order.
STEERABLE = (
    "quality",
    "toxicity",
    "humor",
    "creativity",
    "violence",
    "helpfulness",
    "not_appropriate",
    "hate_speech",
    "sexual_content",
    "fails_task",
    "political_content",
    "moral_judgement",
)

#: The set the SteerLM paper trains on (arXiv 2310.05344 §3).
PAPER = ("quality", "toxicity", "violence", "helpfulness", "creativity", "humor", "not_appropriate")

#: HelpSteer-style attributes, labelled on 0-4.
HELPSTEER = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")

#: Named sets a config may use instead of listing attributes.
NAMED_SETS = {"steerable": STEERABLE, "paper": PAPER, "helpsteer": HELPSTEER}

#: Attributes whose desirable value is the top level; every other attribute defaults to 0 at inference
#: (as in NVIDIA's SteerLM tutorial prompts: quality and helpfulness at max, toxicity, humor, ... at 0).
MAX_BY_DEFAULT = ("quality", "helpfulness", "correctness", "coherence")
#: The guidance reference (`SamplingArgs.guidance_reference`) that moves the request's own attributes to
#: `AttributeSchema.middle_level`.
MIDDLE = "middle"
#: Default plausibility constraints of guided decoding under the requested and the neutral condition
#: (`batching.guide`): SamplingArgs', `steerlm serve`'s and the pipeline check's (docs/steering.md).
GUIDANCE_PLAUSIBILITY, GUIDANCE_REFERENCE_PLAUSIBILITY = 0.1, 0.01


def check_plausibility(**values: float) -> None:
    """The one check of configured guidance plausibilities (`guidance_plausibility=...`,
    `guidance_reference_plausibility=...` of SamplingArgs, `steerlm serve` and the pipeline check): ValueError
    naming the first outside [0, 1). A request's schema bounds them the same way."""
    for name, alpha in values.items():
        if not 0 <= alpha < 1:
            raise ValueError(f"{name} must be in [0, 1), not {alpha}")


def check_guidance_reference(reference: str) -> None:
    """The one format check of a configured guidance reference (the pipeline check's, `steerlm sft`'s saved one):
    '', 'middle' or an attribute string such as 'humor:2,verbosity:2'; ValueError otherwise. Names and levels are
    checked against the model (`Generator.reference_string`)."""
    if reference not in ("", MIDDLE) and not re.fullmatch(r"\w+:\d+(,\w+:\d+)*", reference):
        raise ValueError(f"guidance_reference must be '', 'middle' or an attribute string, not {reference!r}")


#: Every attribute name steerlm knows, in canonical order (the OASST, paper and HelpSteer sets).
CATALOGUE = STEERABLE + tuple(n for n in HELPSTEER if n not in STEERABLE)


def canonical_order(names: Iterable[str]) -> tuple[str, ...]:
    """Sort attribute names: NeMo's canonical order first, then any others in the order given."""
    names = list(dict.fromkeys(names))
    known = sorted((n for n in names if n in CATALOGUE), key=CATALOGUE.index)
    return tuple(known) + tuple(n for n in names if n not in CATALOGUE)


def bucket(value: float, levels: int) -> int:
    """Map a 0-1 label to an integer level: `round(value * (L - 1))`, Python's half-to-even rounding (SPEC §1)."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"label value {value} is outside [0, 1]")
    return round(value * (levels - 1))


@dataclass(frozen=True)
class AttributeSchema:
    """Which attributes exist, in which order, and how many levels each has."""

    names: tuple[str, ...] = STEERABLE
    """Attribute names; stored in canonical order."""
    levels: int = 10
    """L: levels run 0..L-1."""

    def __post_init__(self):
        if isinstance(self.names, str):
            object.__setattr__(self, "names", NAMED_SETS.get(self.names) or tuple(self.names.split(",")))
        if not self.names:
            raise ValueError("an attribute schema needs at least one attribute")
        for n in self.names:
            if not n or not n.replace("_", "").isalnum() or not n.islower():
                raise ValueError(f"attribute name {n!r} must be lower-case letters, digits and '_'")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"attribute names repeat: {list(self.names)}")
        if not 2 <= self.levels <= 100:
            raise ValueError(f"levels must be between 2 and 100, not {self.levels}")
        object.__setattr__(self, "names", canonical_order(self.names))

    @property
    def max_level(self) -> int:
        return self.levels - 1

    @property
    def middle_level(self) -> int:
        """(L-1) // 2: verbosity's default and the reference level of `guidance_reference='middle'`."""
        return self.max_level // 2

    def bucket(self, value: float) -> int:
        return bucket(value, self.levels)

    def check(self, name: str, level) -> int:
        """Validate one (name, level) pair; returns the level as int."""
        if name not in self.names:
            raise UserError(f"unknown attribute {name!r}; known: {', '.join(self.names)}", field=name)
        if isinstance(level, bool) or not isinstance(level, int):
            if isinstance(level, float) and level.is_integer():
                level = int(level)
            else:
                raise UserError(f"level must be an integer, not {level!r}", field=name)
        if not 0 <= level <= self.max_level:
            raise UserError(f"level {level} is out of range 0..{self.max_level}", field=name)
        return level

    def validate(self, levels: Mapping[str, int]) -> dict[str, int]:
        """Check a mapping of attribute levels and return it in canonical order."""
        checked = {name: self.check(name, level) for name, level in levels.items()}
        return {n: checked[n] for n in self.names if n in checked}

    def render(self, levels: Mapping[str, int]) -> str:
        """The attribute string for a mapping: canonical order, no spaces. Missing attributes are omitted."""
        return ",".join(f"{k}:{v}" for k, v in self.validate(levels).items())

    def parse(self, text: str, *, ignore_unknown: bool = False) -> dict[str, int]:
        """Parse an attribute string strictly; raises UserError on unknown keys (unless `ignore_unknown`),
        duplicates, non-integers, out-of-range values and malformed pairs."""
        if text is None or not text.strip():
            return {}
        out: dict[str, int] = {}
        for part in text.strip().split(","):
            key, sep, value = part.partition(":")
            if not sep or not key:
                raise UserError(f"malformed pair {part!r} in attribute string {text!r} (expected key:int)")
            if key in out:
                raise UserError(f"duplicate attribute {key!r} in {text!r}", field=key)
            if key not in self.names:
                if ignore_unknown:
                    continue
                raise UserError(f"unknown attribute {key!r} in {text!r}; known: {', '.join(self.names)}", field=key)
            if not value.isdigit() or not value.isascii():
                raise UserError(f"level {value!r} is not a non-negative integer in {text!r}", field=key)
            out[key] = self.check(key, int(value))
        return {n: out[n] for n in self.names if n in out}

    def restrict(self, levels: Mapping[str, int]) -> dict[str, int]:
        """Keep only this schema's attributes (e.g. records labelled with all OASST labels, a model trained on fewer)."""
        return {n: levels[n] for n in self.names if n in levels}

    def defaults(self) -> dict[str, int]:
        """Inference defaults for unspecified attributes: the top level for quality/helpfulness/correctness/coherence,
        the middle for verbosity, 0 for everything else (harmful content, humor, creativity)."""
        out = {}
        for n in self.names:
            if n in MAX_BY_DEFAULT:
                out[n] = self.max_level
            elif n == "verbosity":
                out[n] = self.middle_level
            else:
                out[n] = 0
        return out

    def with_defaults(self, levels: Mapping[str, int] | None) -> dict[str, int]:
        """Requested levels over the defaults, validated, in canonical order."""
        merged = self.defaults()
        merged.update(self.validate(levels or {}))
        return {n: merged[n] for n in self.names}

    def to_dict(self) -> dict:
        return {"names": list(self.names), "levels": self.levels}

    @classmethod
    def from_dict(cls, d: Mapping) -> AttributeSchema:
        return cls(names=tuple(d["names"]), levels=int(d["levels"]))


def parse_assignment(text: str) -> tuple[str, int]:
    """Parse a command-line `name=level` (as in `--attr humor=7` or `/set humor=8`)."""
    name, sep, value = text.partition("=")
    name, value = name.strip(), value.strip()
    if not sep or not name or not value.lstrip("-").isdigit():
        raise UserError(f"expected name=level, e.g. humor=7, not {text!r}")
    return name, int(value)


# ---------------------------------------------------------------- computed attributes (docs/steering.md)

#: Attributes computed from the response text itself rather than labelled by people or an APM. They can sit beside
#: the human attributes in the attribute string and are measured without an APM (steerability check).
COMPUTED = ("verbosity",)


def word_count(text: str) -> int:
    """Length of a response in whitespace-separated words: the unit of `verbosity`. Words, not tokens, so that the
    level of a text is the same for every tokenizer (data preparation has none) and for every model measured."""
    return len(text.split())


@dataclass(frozen=True)
class LengthBuckets:
    """`verbosity`: a response's length bucket 0..L-1, cut at the L-quantiles of the training responses' word counts.

    `edges` holds the L-1 cut points (ascending); a response with n words gets level `#{edges <= n}`, so level 0 is
    shorter than the first edge and level L-1 at least as long as the last one. The edges are fitted once (`fit`) and
    stored with the data (`computed.json` of `steerlm prepare`) and the model (`steerlm_model.json`), so training,
    inference and measurement all use the same ones."""

    edges: tuple[float, ...]
    """L-1 ascending cut points in words."""
    unit: str = "words"
    """What is counted (only 'words' so far)."""

    def __post_init__(self):
        object.__setattr__(self, "edges", tuple(float(e) for e in self.edges))
        if not self.edges:
            raise ValueError("length buckets need at least one edge")
        if any(b < a for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise ValueError(f"length bucket edges must ascend: {list(self.edges)}")
        if self.unit != "words":
            raise ValueError(f"unknown length unit {self.unit!r}; known: words")

    @property
    def levels(self) -> int:
        return len(self.edges) + 1

    @classmethod
    def fit(cls, texts: Iterable[str], levels: int) -> LengthBuckets:
        """Quantile edges of the word counts of `texts` (duplicates counted once: OASST paths repeat answers)."""
        counts = sorted(word_count(t) for t in dict.fromkeys(texts))
        if not counts:
            raise ValueError("no responses to fit length buckets on")
        return cls(tuple(_quantile(counts, k / levels) for k in range(1, levels)))

    def level_of_count(self, n: int) -> int:
        from bisect import bisect_right

        return bisect_right(self.edges, n)

    def level(self, text: str) -> int:
        """The verbosity level of a response."""
        return self.level_of_count(word_count(text))

    def to_dict(self) -> dict:
        return {"unit": self.unit, "edges": list(self.edges)}

    @classmethod
    def from_dict(cls, d: Mapping) -> LengthBuckets:
        return cls(tuple(d["edges"]), d.get("unit", "words"))


def _quantile(sorted_values: list[int], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), without numpy."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return round(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo), 3)


def computed_from_dict(d: Mapping | None) -> dict[str, LengthBuckets]:
    """`{"verbosity": {...}}` (as stored in `computed.json` / `steerlm_model.json`) -> name -> measurer."""
    out = {}
    for name, spec in (d or {}).items():
        if name not in COMPUTED:
            raise ValueError(f"unknown computed attribute {name!r}; known: {', '.join(COMPUTED)}")
        out[name] = LengthBuckets.from_dict(spec)
    return out


def computed_to_dict(computed: Mapping[str, LengthBuckets]) -> dict:
    return {name: m.to_dict() for name, m in computed.items()}


def flip_levels(levels: Mapping[str, int], max_level: int) -> dict[str, int]:
    """Every level mirrored (q -> L-1-q): the 'wrong' attribute string of the flip-gap likelihood check."""
    return {k: max_level - v for k, v in levels.items()}


def with_computed(label: str | None, text: str, computed: Mapping[str, LengthBuckets], levels: int) -> str | None:
    """Attribute string `label` with the computed attributes of response `text` set (added, or replaced), in
    canonical order; the other attributes are kept as they are."""
    if not computed:
        return label
    pairs = dict(p.split(":", 1) for p in (label or "").split(",") if p)
    for name, measurer in computed.items():
        pairs[name] = str(min(levels - 1, measurer.level(text)))
    schema = AttributeSchema(tuple(pairs), levels)
    return schema.render(schema.parse(",".join(f"{k}:{v}" for k, v in pairs.items())))

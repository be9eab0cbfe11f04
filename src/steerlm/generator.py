"""The generator: a causal LM plus what steerlm needs to prompt it (attribute schema, template style,
conditioning), and the sampling settings. Shared by every module that generates (`steerlm generate`, `chat`,
bootstrap, the evaluation, the read-out, PPO and the server), so none of them imports a stage.

    from steerlm.generator import Generator, SamplingArgs
    gen = Generator.load("runs/quickstart/sft/best")
    gen.generate(["Tell me about the moon."], {"verbosity": 0}, SamplingArgs(max_new_tokens=64))

A model folder written by steerlm carries `steerlm_model.json` (attribute schema, template style, conditioning);
a plain model (a built-in name, a Hugging Face folder or hub id) is used with its chat template and no attributes.
Prompts are built with the same segments as training (`templates.inference_segments` + `encode_text_segments`,
SPEC §3), so the model sees exactly the tokens it was trained on. Unspecified attributes take the schema defaults
(`AttributeSchema.with_defaults`: quality/helpfulness at the top level, harmful ones, humor and creativity at 0).
A model trained without attributes ignores requested attributes.

Decoding is the server's engine (`batching.Engine.decode`, run on the calling thread): a batched loop with a KV cache
(left padding, finished rows leave the batch) in which every sampling setting is explicit; attribute guidance
(`SamplingArgs.guidance_scale`, docs/steering.md) runs the requested and a neutral prompt in one forward pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from steerlm import config as config_lib
from steerlm import models
from steerlm.attributes import (
    GUIDANCE_PLAUSIBILITY,
    GUIDANCE_REFERENCE_PLAUSIBILITY,
    MIDDLE,
    AttributeSchema,
    LengthBuckets,
    check_guidance_reference,
    check_plausibility,
    computed_from_dict,
    parse_assignment,
)
from steerlm.batching import TEXT, Engine, Row, check_guidance_scale
from steerlm.data import templates
from steerlm.data.records import ASSISTANT, DEFAULT_SYSTEM, USER, Record, Turn, record_from_json
from steerlm.errors import UserError

META = models.MODEL_META


@dataclass
class SamplingArgs:
    """How to pick tokens. `greedy` (or temperature 0) takes the most likely token; otherwise temperature, top-k and
    top-p shape the distribution sampled from (HF order: repetition penalty, temperature, top-k, top-p)."""

    max_new_tokens: int = 256
    """Longest answer, in tokens."""
    temperature: float = 0.7
    """Sampling temperature (0 means greedy)."""
    top_k: int = 0
    """Sample among the k most likely tokens only (0: no limit; the SteerLM paper's bootstrap uses 50)."""
    top_p: float = 0.9
    """Nucleus sampling: the smallest set of tokens whose probability reaches p (1.0: no limit)."""
    greedy: bool = False
    """Always take the most likely token (deterministic; ignores temperature, top_k, top_p and seed)."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the prompt or answer (CTRL's penalty, as in transformers)."""
    min_new_tokens: int = 0
    """End-of-sequence tokens and stop strings are ignored until this many tokens have been generated."""
    stop: list[str] = field(default_factory=list)
    """Extra strings that end an answer (the template's own end marker always does); the answer excludes them."""
    seed: int | None = None
    """Seed for sampling; the same seed, prompts and batch size give the same answers."""
    guidance_scale: float = 1.0
    """Attribute guidance s: next-token logits = l(neutral) + s * (l(requested) - l(neutral)). 1 is plain SteerLM (no
    extra compute); s > 1 amplifies what the requested attributes change, at up to twice the compute (both prompts
    run in one batched forward pass; 1.6-1.7x measured on CPU). Ignored by models trained without attributes."""
    guidance_reference: str = ""
    """The neutral condition of attribute guidance: '' is the unconditional prompt (no attribute line; learned from
    `steerlm sft --label_dropout`), an attribute string (unspecified attributes at their defaults), or 'middle': the
    request with every attribute it names at the middle level (`AttributeSchema.middle_level`), so guidance pushes
    each named attribute away from the middle and leaves the others as they are (docs/steering.md)."""
    guidance_plausibility: float = GUIDANCE_PLAUSIBILITY
    """A guided step samples only tokens whose probability under the requested condition is at least this share of
    its top token's: the adaptive plausibility constraint of contrastive decoding (Li et al. 2023, §3.2). Guidance
    alone favours tokens neither condition would write (their probability ratio is the largest). In [0, 1); 0 turns
    it off; no effect without guidance (`batching.guide`, docs/steering.md)."""
    guidance_reference_plausibility: float = GUIDANCE_REFERENCE_PLAUSIBILITY
    """The same test under the neutral condition (where no token passes both, the requested one's alone decides).
    It keeps out what the requested condition of a small model finds plausible only because it is confused (the
    quickstart model's level-0 line opens with attribute-line echoes), while leaving room for an earlier or later
    end than the reference would choose. In [0, 1); 0 turns it off (docs/steering.md)."""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, not {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], not {self.min_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, not {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, not {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive, not {self.repetition_penalty}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        self._check_guidance()
        check_plausibility(guidance_plausibility=self.guidance_plausibility,
                           guidance_reference_plausibility=self.guidance_reference_plausibility)  # fmt: skip

    def _check_guidance(self) -> None:
        check_guidance_scale(self.guidance_scale)

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


@dataclass(kw_only=True)
class CommandSampling(SamplingArgs):
    """SamplingArgs of a command that loads one model (`steerlm generate`, `chat`): guidance it leaves unset is the
    model's own (`Generator.guidance`), resolved by `sampling_from` once the model is loaded."""

    guidance_scale: float | None = None
    """Attribute guidance s (l(neutral) + s * (l(requested) - l(neutral)); 1: none). Unset: the guidance saved with
    the model (`steerlm sft --guidance_scale`, steerlm_model.json `guidance`; the quickstart's: 2), else 1."""
    guidance_reference: str | None = None
    """Guidance's neutral condition ('', an attribute string, or 'middle'; `SamplingArgs.guidance_reference`).
    Unset: the model's saved one (the quickstart's: 'middle'), else ''."""

    def _check_guidance(self) -> None:
        if self.guidance_scale is not None:
            check_guidance_scale(self.guidance_scale)


#: (scale, reference) of no attribute guidance: what a model saved without a `guidance` entry recommends.
NO_GUIDANCE: tuple[float, str] = (1.0, "")


def sampling_from(cfg, gen: Generator) -> SamplingArgs:
    """The SamplingArgs part of a config that extends it (generate.Config, chat.Config), with the guidance it leaves
    unset (None) taken from `gen.guidance`, the model's own."""
    values = {f.name: getattr(cfg, f.name) for f in fields(SamplingArgs)}
    return SamplingArgs(**{**values, **resolve_guidance(values, gen.guidance)})


def resolve_guidance(values: Mapping[str, Any], saved: tuple[float, str]) -> dict[str, Any]:
    """`guidance_scale` and `guidance_reference` of `values` (a config's or a request's), each unset one (None)
    replaced by the model's `saved` (scale, reference) (`Generator.guidance`)."""
    scale, reference = values.get("guidance_scale"), values.get("guidance_reference")
    return {"guidance_scale": saved[0] if scale is None else scale,
            "guidance_reference": saved[1] if reference is None else reference}  # fmt: skip


def saved_guidance(meta: Mapping | None, source: str = META) -> tuple[float, str]:
    """The attribute guidance a model folder recommends (its steerlm_model.json `guidance`: {"scale": s, "reference":
    r}, written by `steerlm sft --guidance_scale`), as (scale, reference); NO_GUIDANCE when it has none. UserError
    naming `source` when the entry is malformed."""
    entry = (meta or {}).get("guidance")
    if entry is None:
        return NO_GUIDANCE
    try:
        scale, reference = float(entry["scale"]), str(entry.get("reference", ""))
        check_guidance_scale(scale)
        check_guidance_reference(reference)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"bad guidance entry: {e}", file=source, field="guidance") from None
    return scale, reference


@dataclass
class Generation:
    """One answer with what a server needs to report about it."""

    text: str
    """The answer: cut at the first stop string; templated answers also lose the newline before it (SPEC §3)."""
    token_ids: list[int]
    """Generated token ids (an end-of-sequence token is not included)."""
    prompt_tokens: int
    """Length of the prompt in tokens."""
    finish_reason: str
    """'stop' (end token or stop string) or 'length' (max_new_tokens reached)."""


class Generator:
    """A causal LM plus what steerlm needs to prompt it: attribute schema, template style and conditioning."""

    def __init__(self, model, tokenizer, *, schema: AttributeSchema | None = None, template: str = "chat",
                 conditioning: str = "none", system: str = DEFAULT_SYSTEM):  # fmt: skip
        if template not in templates.STYLES:
            raise UserError(
                f"unknown template style {template!r}; expected one of {templates.STYLES}", field="template"
            )
        if conditioning not in ("attributes", "none"):
            raise UserError(f"conditioning must be 'attributes' or 'none', not {conditioning!r}", field="conditioning")
        if conditioning == "attributes" and schema is None:
            raise UserError("conditioning 'attributes' needs an attribute schema", field="attributes")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.schema = schema if conditioning == "attributes" else None
        self.template, self.conditioning, self.system = template, conditioning, system
        #: The attribute guidance (scale, reference) the model was saved with (`saved_guidance`): what commands,
        #: the server and the pipeline check use where they set none. Library calls pass SamplingArgs explicitly.
        self.guidance: tuple[float, str] = NO_GUIDANCE
        #: Computed attributes of the model (`verbosity` -> its length buckets, from `steerlm_model.json`), so the
        #: steerability check measures answers with the edges the model was trained with.
        self.computed: dict[str, LengthBuckets] = {}
        #: The decoding engine, run on the calling thread (`decode`); `end_ids`: the tokens that end an answer.
        self.engine = Engine(self.model, tokenizer)
        self.device, self.pad_id, self.end_ids = self.engine.device, self.engine.pad_id, self.engine.eos_ids

    # ------------------------------------------------------------ loading

    @classmethod
    def load(cls, path_or_name: str, *, dtype=None, device=None, template: str | None = None) -> Generator:
        """Load a steerlm model folder (reads `steerlm_model.json`; LoRA adapter folders too) or any causal LM
        `models.load_causal_lm` accepts (then: chat template, no attributes). `template` overrides the style."""
        folder = Path(str(path_or_name)).expanduser()
        meta = models.model_meta(folder)
        model, tokenizer = models.load_causal_lm(str(path_or_name), dtype=dtype, device=device)
        schema, style, conditioning = None, "chat", "none"
        if meta is not None:
            attrs = meta.get("attributes")
            try:
                schema = AttributeSchema.from_dict(attrs) if attrs else None
            except (KeyError, TypeError, ValueError) as e:
                raise UserError(f"bad attributes entry: {e}", file=str(folder / META)) from None
            style = meta.get("template", "chat")
            conditioning = meta.get("conditioning", "attributes" if schema else "none")
            try:
                computed = computed_from_dict(meta.get("computed"))
            except (KeyError, TypeError, ValueError) as e:
                raise UserError(f"bad computed entry: {e}", file=str(folder / META)) from None
        gen = cls(model, tokenizer, schema=schema, template=template or style, conditioning=conditioning)
        gen.computed = computed if meta is not None else {}
        if gen.schema is not None:
            gen.guidance = saved_guidance(meta, str(folder / META))
        return gen

    # ------------------------------------------------------------ prompts

    def resolve_attributes(self, attributes: Mapping[str, int] | str | None) -> dict[str, int] | None:
        """Requested levels over the schema defaults, validated (UserError names the attribute); None when the model
        is not attribute-conditioned. A string is parsed as an attribute string (`quality:9,humor:3`)."""
        if self.schema is None:
            return None
        if isinstance(attributes, str):
            attributes = self.schema.parse(attributes)
        if attributes is not None and not isinstance(attributes, Mapping):
            raise UserError(f"attributes must be a mapping of name to level, not {attributes!r}", field="attributes")
        return self.schema.with_defaults(attributes)

    def attribute_string(self, attributes: Mapping[str, int] | str | None) -> str | None:
        """The label line the model is conditioned on, or None for an unconditioned model."""
        levels = self.resolve_attributes(attributes)
        return None if levels is None else self.schema.render(levels)

    def as_record(self, conversation: Record | str | Mapping) -> Record:
        """A conversation to answer: a prompt string (one user turn with this generator's system text), a Record or
        its JSON. Labels of earlier assistant turns are re-rendered with the model's schema (or dropped when the
        model is unconditioned), as training saw them."""
        if isinstance(conversation, str):
            return Record([Turn(USER, conversation)], self.system)
        if isinstance(conversation, Mapping):
            conversation = record_from_json(dict(conversation))
        if not isinstance(conversation, Record):
            raise UserError(f"a conversation is a prompt string or a record, not {type(conversation).__name__}")
        turns = []
        for t in conversation.conversations:
            label = None
            if t.label and self.schema is not None and t.role == ASSISTANT:
                label = self.schema.render(self.schema.parse(t.label, ignore_unknown=True)) or None
            turns.append(Turn(t.role, t.value, label, dict(t.extra)))
        return Record(turns, conversation.system, conversation.mask, templates.VALUE_TO_TEXT, dict(conversation.extra))

    def prompt_segments(self, conversation, attributes=None) -> list[str]:
        """The prompt as text segments (SPEC §3 inference prompt)."""
        record = self.as_record(conversation)
        return templates.inference_segments(record, self.attribute_string(attributes), self.template, self.tokenizer)

    def prompt_ids(self, conversation, attributes=None) -> list[int]:
        """Token ids of the prompt, tokenized segment by segment exactly as in training."""
        return templates.encode_text_segments(self.prompt_segments(conversation, attributes), self.tokenizer)

    def guided(self, sampling: SamplingArgs | None) -> bool:
        """Whether `sampling` asks for attribute guidance that this model can do (an attribute-conditioned model and
        a scale other than 1)."""
        return sampling is not None and self.schema is not None and sampling.guidance_scale != 1.0

    def reference_string(self, reference: str, attributes: Mapping[str, int] | str | None = None) -> str | None:
        """The attribute line of guidance's neutral condition (`SamplingArgs.guidance_reference`) for a request of
        `attributes`: None for '' (the unconditional prompt), the named attributes of the request at the middle level
        for 'middle' (the request itself when it names none: guidance then changes nothing and `Row.guide` adds no
        row), else `reference` as an attribute string (unspecified attributes at their defaults). Raises UserError
        naming a bad attribute."""
        if not reference:
            return None
        if reference == MIDDLE and self.schema is not None:
            named = self.schema.parse(attributes) if isinstance(attributes, str) else dict(attributes or {})
            return self.attribute_string({name: self.schema.middle_level for name in self.schema.validate(named)})
        return self.attribute_string(reference)

    def neutral_segments(self, conversation, sampling: SamplingArgs, attributes=None) -> list[str]:
        """The neutral-condition prompt of attribute guidance for a request of `attributes`: the conversation with
        no attribute line on the answer (`inference_segments(record, None)`: what SFT's label dropout teaches), or
        with the line of `reference_string(sampling.guidance_reference, attributes)`."""
        record = self.as_record(conversation)
        reference = self.reference_string(sampling.guidance_reference, attributes)
        return templates.inference_segments(record, reference, self.template, self.tokenizer)

    def neutral_ids(self, conversation, sampling: SamplingArgs, attributes=None) -> list[int]:
        segments = self.neutral_segments(conversation, sampling, attributes)
        return templates.encode_text_segments(segments, self.tokenizer)

    def stop_strings(self, sampling: SamplingArgs, raw: bool = False) -> list[str]:
        own = [] if raw else templates.stop_strings(self.template, self.tokenizer, conditioned=self.schema is not None)
        return list(dict.fromkeys(own + list(sampling.stop)))

    def _per_conversation(self, attributes, n: int) -> list:
        if attributes is None or isinstance(attributes, (Mapping, str)):
            return [attributes] * n
        attributes = list(attributes)
        if len(attributes) != n:
            raise UserError(f"got {len(attributes)} attribute mappings for {n} conversations", field="attributes")
        return attributes

    # ------------------------------------------------------------ generation

    def generate(self, conversations: Sequence[Record | str] | Record | str, attributes=None,
                 sampling: SamplingArgs | None = None, batch_size: int = 8) -> list[str]:  # fmt: skip
        """Answers for conversations ending in a user turn (or prompt strings). `attributes` is one mapping for all
        or one per conversation; unspecified attributes take the schema defaults."""
        return [g.text for g in self.generate_full(conversations, attributes, sampling, batch_size)]

    def generate_full(self, conversations, attributes=None, sampling: SamplingArgs | None = None,
                      batch_size: int = 8) -> list[Generation]:  # fmt: skip
        """As `generate`, with token ids, prompt length and finish reason per answer."""
        if isinstance(conversations, (str, Record)):
            conversations = [conversations]
        per = self._per_conversation(attributes, len(conversations))
        prompts = [self.prompt_ids(c, a) for c, a in zip(conversations, per, strict=True)]
        neutral = None
        if self.guided(sampling):
            neutral = [self.neutral_ids(c, sampling, a) for c, a in zip(conversations, per, strict=True)]
        return self.generate_ids(prompts, sampling, batch_size, neutral=neutral)

    def complete(self, texts: Sequence[str], sampling: SamplingArgs | None = None, batch_size: int = 8,
                 add_bos: bool = False) -> list[Generation]:  # fmt: skip
        """Raw continuation of prompt texts, no template (NeMo `/generate`, OpenAI `/v1/completions`): stops only at
        special tokens and `sampling.stop`; the text is cut before the stop string and otherwise unchanged."""
        prompts = [templates.encode_text_segments([t], self.tokenizer, add_bos=add_bos) for t in texts]
        return self.generate_ids(prompts, sampling, batch_size, raw=True)

    def generate_ids(self, prompts: list[list[int]], sampling: SamplingArgs | None = None, batch_size: int = 8,
                     raw: bool = False, neutral: list[list[int]] | None = None) -> list[Generation]:  # fmt: skip
        """Generate from token-id prompts, at most `batch_size` answers at a time, longest prompts first (to pad
        little); as answers finish, the next prompts join the running batch (`Engine.decode`). Results in input order.
        With `neutral` (one neutral-condition prompt per prompt), tokens are picked by attribute guidance at
        `sampling.guidance_scale`; both prompts of an answer run in the same forward pass."""
        sampling = sampling or SamplingArgs()
        if any(not p for p in prompts) or (neutral is not None and any(not p for p in neutral)):
            raise UserError("empty prompt")
        if neutral is not None and len(neutral) != len(prompts):
            raise ValueError(f"{len(neutral)} neutral prompts for {len(prompts)} prompts")
        rows = self._rows(prompts, sampling, raw, neutral)
        order = sorted(range(len(rows)), key=lambda i: -len(prompts[i]))
        for _ in self.engine.decode([rows[i] for i in order], max_batch_size=batch_size):  # run to the end
            pass
        return [Generation(r.text, r.tokens, len(r.prompt_ids), r.finish_reason) for r in rows]

    def stream(self, conversation, attributes=None, sampling: SamplingArgs | None = None) -> Iterator[str]:
        """Text pieces of one answer as they are generated; joined, they equal `generate([conversation])[0]` for
        the same sampling. Text that may turn out to be (the start of) a stop string is held back until it is
        known not to be."""
        neutral = self.neutral_ids(conversation, sampling, attributes) if self.guided(sampling) else None
        return self.stream_ids(self.prompt_ids(conversation, attributes), sampling, neutral=neutral)

    def stream_ids(self, prompt: list[int], sampling: SamplingArgs | None = None, raw: bool = False,
                   neutral: list[int] | None = None) -> Iterator[str]:  # fmt: skip
        pieces: list[str] = []
        row = self._rows([prompt], sampling or SamplingArgs(), raw, None if neutral is None else [neutral])[0]
        row.sink = lambda kind, text: pieces.append(text) if kind == TEXT else None
        for _ in self.engine.decode([row]):
            yield from pieces
            pieces.clear()

    def _rows(self, prompts: list[list[int]], sampling: SamplingArgs, raw: bool,
              neutral: list[list[int]] | None) -> list[Row]:  # fmt: skip
        """The engine's rows for prompts: the template's stop strings (none when `raw`) added to `sampling.stop`,
        templated answers without the newline before their end (SPEC §3), guided against `neutral` when given, and
        one generator for all (they draw together, as one batch: the same seed, prompts and batch size give the same
        answers; unseeded, it is seeded from torch's global generator, so `torch.manual_seed` repeats a run)."""
        sampling = replace(sampling, stop=self.stop_strings(sampling, raw))
        rng = None
        if not sampling.is_greedy:
            seed = sampling.seed if sampling.seed is not None else int(torch.randint(2**62, ()))
            rng = torch.Generator(device=self.device).manual_seed(seed)
        rows = [Row(p, sampling, strip_newline=not raw, generator=rng) for p in prompts]
        return rows if neutral is None else [r.guide(n) for r, n in zip(rows, neutral, strict=True)]


def load_generator(cfg) -> Generator:
    """A Generator for a command's config (model, dtype, template, system)."""
    gen = Generator.load(cfg.model, dtype=cfg.dtype, template=config_lib.unless_auto(cfg.template))
    if cfg.system is not None:
        gen.system = cfg.system
    return gen


def read_attributes(attrs_file: str, assignments: Sequence[str]) -> dict[str, int]:
    """Attribute levels from a YAML/JSON mapping file, then `name=level` assignments (later wins). Names and ranges
    are checked against the model later, by the Generator."""
    levels: dict[str, Any] = {}
    if attrs_file:
        import yaml

        path = Path(attrs_file)
        if not path.is_file():
            raise UserError("attributes file does not exist", file=attrs_file)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML
        except yaml.YAMLError as e:
            raise UserError(f"malformed YAML/JSON: {getattr(e, 'problem', e)}", file=attrs_file) from None
        if not isinstance(data, dict):
            raise UserError("expected a mapping of attribute name to level, e.g. {quality: 9}", file=attrs_file)
        levels.update({str(k): v for k, v in data.items()})
    for text in assignments:
        name, level = parse_assignment(text)
        levels[name] = level
    return levels

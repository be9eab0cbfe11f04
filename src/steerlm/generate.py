"""Generation at chosen attribute values: the one generation module (CLI, chat, bootstrap, evaluation, server).

    steerlm generate --model runs/x/sft/best --attr quality=9 --attr humor=7 "Tell me about the moon."
    steerlm generate --model runs/x/sft/best --prompts prompts.jsonl --out answers.jsonl --attrs_file attrs.yaml

A model folder written by steerlm carries `steerlm_model.json` (attribute schema, template style, conditioning);
a plain model (a built-in name, a Hugging Face folder or hub id) is used with its chat template and no attributes.
Prompts are built with the same segments as training (`templates.inference_segments` + `encode_text_segments`,
SPEC §3), so the model sees exactly the tokens it was trained on. Unspecified attributes take the schema defaults
(`AttributeSchema.with_defaults`: quality/helpfulness at the top level, harmful ones, humor and creativity at 0).
A model trained without attributes ignores requested attributes.

Decoding is a small batched loop with a KV cache (left padding, finished rows leave the batch), so every sampling
setting is explicit and a logits hook can mix the logits of several prompts per answer: attribute guidance
(`SamplingArgs.guidance_scale`, docs/steering.md) runs the requested and a neutral prompt in one forward pass.
"""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from steerlm import config as config_lib
from steerlm import models
from steerlm.attributes import AttributeSchema, LengthBuckets, computed_from_dict, parse_assignment
from steerlm.data import templates
from steerlm.data.collate import pad
from steerlm.data.preferences import read_prompts
from steerlm.data.records import ASSISTANT, DEFAULT_SYSTEM, USER, Record, Turn, record_from_json
from steerlm.errors import UserError
from steerlm.io import write_jsonl

META = "steerlm_model.json"
POSITIONAL = "prompt"


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
    `steerlm sft --label_dropout`), or an attribute string (unspecified attributes at their defaults)."""

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
        if not 0 <= self.guidance_scale <= 100:
            raise ValueError(f"guidance_scale must be in [0, 100], not {self.guidance_scale}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


def sampling_from(cfg) -> SamplingArgs:
    """The SamplingArgs part of a config that extends it (generate.Config, chat.Config)."""
    return SamplingArgs(**{f.name: getattr(cfg, f.name) for f in fields(SamplingArgs)})


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


@dataclass
class _Row:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    floor: int = 0  # stop strings must end after this many characters (min_new_tokens)
    finish: str | None = None


#: Mixes the logits of the row groups of one step into the logits that pick the next token:
#: (group, batch, vocab) -> (batch, vocab). Attribute guidance (`guidance_mix`) takes group 0 as the requested and
#: group 1 as the neutral condition (`inference_segments(record, None)` or a reference attribute string).
LogitsMix = Callable[[torch.Tensor], torch.Tensor]


def guidance_mix(scale: float) -> LogitsMix:
    """Attribute guidance, classifier-free-guidance style (Ho & Salimans 2022; for LMs Sanchez et al. 2023):
    l = l(neutral) + s * (l(requested) - l(neutral)), on the raw logits of the step (a per-row constant shift of
    either side does not change the softmax, so logits and log-probabilities give the same distribution). Sampling
    settings (repetition penalty, temperature, top-k/p) are applied to the mixed logits."""

    def mix(logits: torch.Tensor) -> torch.Tensor:
        return guide(logits[0], logits[1], scale)

    return mix


def guide(requested: torch.Tensor, neutral: torch.Tensor, scale: float) -> torch.Tensor:
    """The guidance rule itself: l(neutral) + s * (l(requested) - l(neutral))."""
    return neutral + scale * (requested - neutral)


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
        #: Computed attributes of the model (`verbosity` -> its length buckets, from `steerlm_model.json`), so the
        #: steerability check measures answers with the edges the model was trained with.
        self.computed: dict[str, LengthBuckets] = {}
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # Any special token ends an answer: EOS, a chat template's turn markers, <|endoftext|>, and NeMo's
        # <extra_id_1> where it is a special token of the vocabulary.
        ends = set(tokenizer.all_special_ids)
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        ends |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        self.end_ids = sorted(i for i in ends if i is not None)
        # Computing logits for the last prompt position only saves a (batch, length, vocab) tensor.
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._keep_last = "logits_to_keep" in inspect.signature(base.forward).parameters

    # ------------------------------------------------------------ loading

    @classmethod
    def load(cls, path_or_name: str, *, dtype=None, device=None, template: str | None = None) -> Generator:
        """Load a steerlm model folder (reads `steerlm_model.json`; LoRA adapter folders too) or any causal LM
        `models.load_causal_lm` accepts (then: chat template, no attributes). `template` overrides the style."""
        folder = Path(str(path_or_name)).expanduser()
        meta = models.read_meta(folder, META) if (folder / META).is_file() else None
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

    def neutral_segments(self, conversation, sampling: SamplingArgs) -> list[str]:
        """The neutral-condition prompt of attribute guidance: the conversation with no attribute line on the answer
        (`inference_segments(record, None)`: what SFT's label dropout teaches), or with the reference attribute
        string `sampling.guidance_reference` (unspecified attributes at their defaults)."""
        record = self.as_record(conversation)
        reference = self.attribute_string(sampling.guidance_reference) if sampling.guidance_reference else None
        return templates.inference_segments(record, reference, self.template, self.tokenizer)

    def neutral_ids(self, conversation, sampling: SamplingArgs) -> list[int]:
        return templates.encode_text_segments(self.neutral_segments(conversation, sampling), self.tokenizer)

    def stop_strings(self, sampling: SamplingArgs, raw: bool = False) -> list[str]:
        own = [] if raw else templates.stop_strings(self.template, self.tokenizer)
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
        neutral = [self.neutral_ids(c, sampling) for c in conversations] if self.guided(sampling) else None
        return self.generate_ids(prompts, sampling, batch_size, neutral=neutral)

    def complete(self, texts: Sequence[str], sampling: SamplingArgs | None = None, batch_size: int = 8,
                 add_bos: bool = False) -> list[Generation]:  # fmt: skip
        """Raw continuation of prompt texts, no template (NeMo `/generate`, OpenAI `/v1/completions`): stops only at
        special tokens and `sampling.stop`; the text is cut before the stop string and otherwise unchanged."""
        prompts = [templates.encode_text_segments([t], self.tokenizer, add_bos=add_bos) for t in texts]
        return self.generate_ids(prompts, sampling, batch_size, raw=True)

    def generate_ids(self, prompts: list[list[int]], sampling: SamplingArgs | None = None, batch_size: int = 8,
                     raw: bool = False, neutral: list[list[int]] | None = None) -> list[Generation]:  # fmt: skip
        """Generate from token-id prompts in batches (longest first, to pad little); results in input order.
        With `neutral` (one neutral-condition prompt per prompt), tokens are picked by attribute guidance at
        `sampling.guidance_scale`; both prompts of an answer run in the same forward pass."""
        sampling = sampling or SamplingArgs()
        if any(not p for p in prompts) or (neutral is not None and any(not p for p in neutral)):
            raise UserError("empty prompt")
        if neutral is not None and len(neutral) != len(prompts):
            raise ValueError(f"{len(neutral)} neutral prompts for {len(prompts)} prompts")
        rng = self._rng(sampling)
        stops = self.stop_strings(sampling, raw)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        results: list[Generation | None] = [None] * len(prompts)
        for start in range(0, len(order), max(1, batch_size)):
            idx = order[start : start + batch_size]
            batch, guide = [prompts[i] for i in idx], {}
            if neutral is not None:
                batch += [neutral[i] for i in idx]
                guide = {"mix": guidance_mix(sampling.guidance_scale), "groups": 2}
            *_, rows = self._decode(batch, sampling, stops, rng, **guide)  # run to the end
            for i, row in zip(idx, rows, strict=True):
                results[i] = Generation(self._final_text(row.text, raw), row.tokens, len(prompts[i]), row.finish)
        return results  # type: ignore[return-value]

    def stream(self, conversation, attributes=None, sampling: SamplingArgs | None = None) -> Iterator[str]:
        """Text pieces of one answer as they are generated; joined, they equal `generate([conversation])[0]` for
        the same sampling. Text that may turn out to be (the start of) a stop string is held back until it is
        known not to be."""
        neutral = self.neutral_ids(conversation, sampling) if self.guided(sampling) else None
        return self.stream_ids(self.prompt_ids(conversation, attributes), sampling, neutral=neutral)

    def stream_ids(self, prompt: list[int], sampling: SamplingArgs | None = None, raw: bool = False,
                   neutral: list[int] | None = None) -> Iterator[str]:  # fmt: skip
        sampling = sampling or SamplingArgs()
        stops = self.stop_strings(sampling, raw)
        emitted = ""
        prompts, guide = [prompt], {}
        if neutral is not None:
            prompts.append(neutral)
            guide = {"mix": guidance_mix(sampling.guidance_scale), "groups": 2}
        for (row,) in self._decode(prompts, sampling, stops, self._rng(sampling), **guide):
            if row.finish is not None:
                visible = self._final_text(row.text, raw)
            else:
                visible = _safe_prefix(row.text, stops, hold_newline=not raw)
            if len(visible) > len(emitted) and visible.startswith(emitted):
                yield visible[len(emitted) :]
                emitted = visible

    def _final_text(self, text: str, raw: bool) -> str:
        return text if raw else templates.clean_answer(text, self.template, self.tokenizer)

    def _rng(self, sampling: SamplingArgs) -> torch.Generator | None:
        if sampling.seed is None or sampling.is_greedy:
            return None
        return torch.Generator(device=self.device).manual_seed(sampling.seed)

    # ------------------------------------------------------------ the decoding loop

    @torch.inference_mode()
    def _decode(self, prompts: list[list[int]], sampling: SamplingArgs, stops: list[str],
                rng: torch.Generator | None = None, *, mix: LogitsMix | None = None,
                groups: int = 1) -> Iterator[list[_Row]]:  # fmt: skip
        """Yield the rows after every generated token, until all have finished.

        `prompts` holds `groups` blocks of B prompts each; block g row b belongs to answer b. Every block is fed the
        token chosen for its answer, and `mix` turns the (groups, B, vocab) logits into the (B, vocab) logits that
        are sampled from (default: block 0's). One forward pass serves all blocks."""
        n = len(prompts) // groups
        if n * groups != len(prompts):
            raise ValueError("prompts must hold `groups` blocks of equal size")
        dev = self.device
        ids = pad(prompts, self.pad_id, side="left").to(dev)
        mask = pad([[1] * len(p) for p in prompts], 0, side="left").to(dev)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        rows = [_Row() for _ in range(n)]
        alive = list(range(n))  # answers still being generated, in cache order within each block
        extra = {"logits_to_keep": 1} if self._keep_last else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
        past = out.past_key_values
        seen = None  # tokens of each answer's prompt and text so far, for the repetition penalty
        if sampling.repetition_penalty != 1.0:
            seen = torch.zeros(n, out.logits.shape[-1], dtype=torch.bool, device=dev)
            for b, p in enumerate(prompts[:n]):
                seen[b, torch.tensor(p, device=dev)] = True
        for step in range(sampling.max_new_tokens):
            logits = out.logits[:, -1, :].float()
            logits = mix(logits.view(groups, len(alive), -1)) if mix is not None else logits[: len(alive)]
            live = len(alive)
            at = seen.nonzero(as_tuple=True) if seen is not None else None
            chosen = next_tokens(logits, [sampling] * live, [rng] * live, seen=at, lengths=[step] * live,
                                 end_ids=self.end_ids).tolist()  # fmt: skip
            for b, token in zip(alive, chosen, strict=True):
                self._advance(rows[b], token, sampling, stops)
            yield rows
            keep = [j for j, b in enumerate(alive) if rows[b].finish is None]
            if not keep:
                return
            next_ids = torch.tensor(chosen, device=dev)
            if seen is not None:
                seen[torch.arange(len(alive), device=dev), next_ids] = True
            if len(keep) < len(alive):  # finished answers leave the batch (and the KV cache)
                cache_rows = [g * len(alive) + j for g in range(groups) for j in keep]
                past.batch_select_indices(torch.tensor(cache_rows, device=dev))
                mask, positions = mask[cache_rows], positions[cache_rows]
                next_ids = next_ids[keep]
                seen = seen[keep] if seen is not None else None
                alive = [alive[j] for j in keep]
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            positions = positions[:, -1:] + 1
            feed = next_ids.repeat(groups)[:, None]
            out = self.model(input_ids=feed, attention_mask=mask, position_ids=positions, past_key_values=past,
                             use_cache=True)  # fmt: skip
            past = out.past_key_values

    def _advance(self, row: _Row, token: int, sampling: SamplingArgs, stops: list[str]) -> None:
        if token in self.end_ids and len(row.tokens) >= sampling.min_new_tokens:
            row.finish = "stop"
            return
        row.tokens.append(token)
        row.text = self.tokenizer.decode(row.tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if len(row.tokens) == sampling.min_new_tokens:
            row.floor = len(row.text)
        if len(row.tokens) >= sampling.min_new_tokens:
            hit = templates.find_stop(row.text, stops, row.floor)
            if hit is not None:
                row.text, row.finish = row.text[: hit[0]], "stop"
                return
        if len(row.tokens) >= sampling.max_new_tokens:
            row.finish = "length"


# ---------------------------------------------------------------- the next-token choice (both decoding loops)

#: Candidate tokens taken per filtered row before top-k/top-p (see `next_tokens`).
_CANDIDATES = 256


def next_tokens(logits: torch.Tensor, samplings: Sequence[SamplingArgs], generators: Sequence[torch.Generator | None],
                *, seen: tuple[torch.Tensor, torch.Tensor] | None = None, lengths: Sequence[int] | None = None,
                end_ids: Sequence[int] = ()) -> torch.Tensor:  # fmt: skip
    """The next token of every row of `logits` (rows, vocab), each row with its own settings: the one definition of
    the next-token choice, used by `Generator` (the same settings for every row) and by the server's
    `batching.Engine` (per-answer settings and generators).

    In Hugging Face's order: the repetition penalty on the tokens in `seen` ((row, token) index tensors, repeats
    allowed: the tokens of each row's prompt and answer so far); end tokens (`end_ids`) blocked while a row has
    generated (`lengths`) fewer than its `min_new_tokens`; then greedy argmax, or temperature, top-k (the tokens whose
    logit reaches the k-th largest, ties kept, as `TopKLogitsWarper`), top-p (the smallest most-likely-first prefix
    whose probability reaches p) and a draw from the row's generator (None: torch's global one). Rows that share a
    generator draw from it in one call; a row with a generator of its own draws from exactly its support, so its
    tokens do not depend on its batch mates. Returns a CPU long tensor."""
    rows, vocab = logits.shape
    if len(samplings) != rows or len(generators) != rows:
        raise ValueError(f"{rows} rows of logits, {len(samplings)} sampling settings, {len(generators)} generators")
    dev = logits.device
    penalties = [float(s.repetition_penalty) for s in samplings]
    if seen is not None and len(seen[0]):
        for value in sorted(set(penalties) - {1.0}):  # CTRL's penalty, as transformers' processor
            at = seen
            if any(x != value for x in penalties):
                match = torch.tensor([x == value for x in penalties], device=dev)[seen[0]]
                at = (seen[0][match], seen[1][match])
            scores = logits[at]
            logits = logits.index_put(at, torch.where(scores > 0, scores / value, scores * value))
    if lengths is not None and len(end_ids):
        blocked = [i for i, s in enumerate(samplings) if lengths[i] < s.min_new_tokens]
        ends = [e for e in end_ids if e < vocab]
        if blocked and ends:
            logits = logits.clone()
            logits[torch.tensor(blocked, device=dev)[:, None], torch.tensor(ends, device=dev)] = float("-inf")
    drawn = [i for i, s in enumerate(samplings) if not s.is_greedy]
    if len(drawn) == rows:
        return _draw(logits, samplings, generators).cpu()
    out = logits.argmax(-1)
    if drawn:
        out[drawn] = _draw(logits[drawn], [samplings[i] for i in drawn], [generators[i] for i in drawn])
    return out.cpu()


def _draw(logits: torch.Tensor, samplings: Sequence[SamplingArgs],
          generators: Sequence[torch.Generator | None]) -> torch.Tensor:  # fmt: skip
    """Temperature, top-k, top-p and a draw, for the rows of `next_tokens` that sample."""
    rows, vocab = logits.shape
    temperatures = torch.tensor([float(s.temperature) for s in samplings], device=logits.device)
    scaled = logits / temperatures[:, None]
    probs = scaled.softmax(-1)
    ks = [s.top_k if s.top_k < vocab else 0 for s in samplings]
    ps = [float(s.top_p) for s in samplings]
    # Sorting the whole vocabulary per row costs as much as a decode step with SmolLM2's 49k tokens; a row's top-k
    # set or nucleus almost always lies within the few hundred most likely tokens, so those are taken with topk, and
    # only the rows whose support may reach beyond them (a flat nucleus, ties at the k-th logit) are done again over
    # the whole vocabulary. The supports are the same either way.
    passes: list[tuple[torch.Tensor, torch.Tensor]] = []  # (probabilities, token ids) of the filtered rows
    where: dict[int, tuple[int, int, int]] = {}  # row -> (pass, its row there, support size)
    todo = [j for j in range(rows) if ks[j] or ps[j] < 1.0]
    width = min(vocab, max([_CANDIDATES] + [k + 1 for k in ks]))
    while todo:
        every = len(todo) == rows  # (no copies of the whole rows then)
        cand, ids, sizes, whole = _filter(scaled if every else scaled[todo], probs if every else probs[todo],
                                          [ks[j] for j in todo], [ps[j] for j in todo], width)  # fmt: skip
        passes.append((cand, ids))
        for r, j in enumerate(todo):
            if whole[r]:
                where[j] = (len(passes) - 1, r, sizes[r])
        todo = [j for r, j in enumerate(todo) if not whole[r]]
        width = vocab
    groups: dict[int, list[int]] = {}
    for j, gen in enumerate(generators):
        groups.setdefault(id(gen), []).append(j)
    order, tokens = [], []
    for members in groups.values():
        gen = generators[members[0]]
        plain = [j for j in members if j not in where]  # no top-k or top-p: the whole distribution
        if plain:
            order += plain
            tokens.append(torch.multinomial(probs[plain], 1, generator=gen).squeeze(1))
        cut = [j for j in members if j in where]
        if cut:
            size = max(where[j][2] for j in cut)
            if len({where[j][0] for j in cut}) == 1:
                cand, ids = passes[where[cut[0]][0]]
                index = [where[j][1] for j in cut]
                cand, ids = cand[index, :size], ids[index, :size]
            else:  # rows of both passes (rare): pad each support with zeros
                pad = torch.nn.utils.rnn.pad_sequence
                cand = pad([passes[a][0][r, :n] for a, r, n in (where[j] for j in cut)], batch_first=True)
                ids = pad([passes[a][1][r, :n] for a, r, n in (where[j] for j in cut)], batch_first=True)
            order += cut
            tokens.append(ids.gather(1, torch.multinomial(cand, 1, generator=gen)).squeeze(1))
    out = torch.empty(rows, dtype=torch.long, device=logits.device)
    out[order] = torch.cat(tokens)
    return out


def _filter(scaled: torch.Tensor, probs: torch.Tensor, ks: list[int], ps: list[float],
            width: int) -> tuple[torch.Tensor, torch.Tensor, list[int], list[bool]]:  # fmt: skip
    """Top-k, then top-p on the renormalised top-k probabilities, over the `width` most likely tokens of each row.
    Returns the probabilities of those tokens, most likely first and zero where filtered out; their token ids; the
    support sizes (the kept tokens are a prefix); and whether each row's support lies within the candidates (so that
    more candidates would change nothing)."""
    dev = scaled.device
    whole_vocab = width >= scaled.shape[-1]
    values, ids = scaled.sort(dim=-1, descending=True) if whole_vocab else scaled.topk(width, dim=-1)
    cand = probs.gather(1, ids)
    k = torch.tensor(ks, device=dev)[:, None]
    p = torch.tensor(ps, device=dev)[:, None]
    in_k = (values >= values.gather(1, (k - 1).clamp(min=0))) | (k == 0)
    cand = cand * in_k
    # the mass of the top-k set (the last cumulative sum: the same whatever follows the set, as zeros add nothing)
    cand = torch.where(k > 0, cand / cand.cumsum(-1)[:, -1:], cand)
    mass = cand.cumsum(-1)
    keep = in_k & ((mass - cand <= p) | (p >= 1.0))  # a token goes when the mass before it exceeds p
    cand = cand * keep
    if whole_vocab:
        whole = [True] * len(ks)
    else:  # top-k: the last candidate is not tied with the k-th; top-p alone: the candidates' mass exceeds p
        whole = torch.where(k[:, 0] > 0, ~in_k[:, -1], mass[:, -1] > p[:, 0]).tolist()
    return cand, ids, keep.sum(-1).tolist(), whole


def _safe_prefix(text: str, stops: list[str], hold_newline: bool) -> str:
    """The part of an unfinished answer that is certain to stay: without a trailing partial stop string, an
    incomplete multi-byte character, or (templated answers) a trailing newline that a stop string may drop."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    text = text[: len(text) - hold]
    text = text.rstrip("\ufffd")
    if hold_newline and text.endswith("\n"):
        text = text[:-1]
    return text


# ---------------------------------------------------------------- the `steerlm generate` command


@dataclass(kw_only=True)
class Config(SamplingArgs):
    model: str
    """Model: a steerlm output folder (e.g. runs/x/sft/best), a LoRA adapter folder, a built-in name, a Hugging Face
    folder or hub id."""
    prompt: list[str] = field(default_factory=list)
    """Prompts to answer (positional arguments)."""
    attr: list[str] = field(default_factory=list)
    """Attribute levels as name=level, repeatable (--attr quality=9 --attr humor=7); over --attrs_file."""
    attrs_file: str = ""
    """YAML or JSON file with a mapping of attribute levels (e.g. {quality: 9, toxicity: 0})."""
    prompts: str = ""
    """JSONL file of prompts: strings, {"prompt": ..., "attributes": {...}} objects, or conversation records (the
    last user turn is answered; trailing assistant turns are dropped)."""
    out: str = ""
    """With --prompts: write answers here as JSONL (default: print JSON lines)."""
    system: str | None = None
    """System text for prompt strings (default: NeMo's SteerLM system prompt)."""
    template: str = "auto"
    """Template style: 'nemo', 'chat', or 'auto' (the model's steerlm_model.json, else 'chat')."""
    batch_size: int = 8
    """Prompts generated together."""
    dtype: str = ""
    """Model dtype ('bf16', 'fp16', 'fp32'; default fp32)."""
    overwrite: bool = False
    """Replace an existing --out file."""

    def __post_init__(self):
        super().__post_init__()
        self.template = config_lib.auto_choice(self.template, "template", templates.STYLES)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {self.batch_size}")
        if not self.prompt and not self.prompts:
            raise ValueError("give a prompt (positional) or --prompts FILE.jsonl")


def load_generator(cfg) -> Generator:
    """A Generator for a command's config (model, dtype, template, system)."""
    gen = Generator.load(cfg.model, dtype=cfg.dtype or None, template=config_lib.unless_auto(cfg.template))
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


def main(cfg: Config) -> int:
    levels = read_attributes(cfg.attrs_file, cfg.attr)
    gen = load_generator(cfg)
    if gen.schema is None and (levels or cfg.guidance_scale != 1.0):
        print(f"note: {cfg.model} is not attribute-conditioned; attributes and guidance are ignored", file=sys.stderr)
    sampling = sampling_from(cfg)
    if cfg.prompts:
        if cfg.out and Path(cfg.out).exists() and not cfg.overwrite:
            raise UserError("output file exists; pass --overwrite to replace it", file=cfg.out)
        items = read_prompts(cfg.prompts) + [(p, {}, {}) for p in cfg.prompt]
    else:
        items = [(p, {}, {}) for p in cfg.prompt]
    requests = []
    for _, attrs, _ in items:
        row = gen.schema.parse(attrs) if isinstance(attrs, str) and gen.schema else attrs
        requests.append(gen.resolve_attributes({**levels, **(row if isinstance(row, dict) else {})}))
    answers = gen.generate([c for c, _, _ in items], requests, sampling, batch_size=cfg.batch_size)
    if not cfg.prompts:
        print("\n\n".join(answers))
        return 0
    rows = [_output_row(gen, conv, req, extra, answer)
            for (conv, _, extra), req, answer in zip(items, requests, answers, strict=True)]  # fmt: skip
    if cfg.out:
        write_jsonl(cfg.out, rows)
        print(f"generate: {len(rows)} answers -> {cfg.out}")
    else:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    return 0


def _output_row(gen: Generator, conv, levels, extra: dict, answer: str) -> dict:
    if isinstance(conv, Record):  # a record in, the record with its new answer out (ready for `steerlm annotate`)
        label = gen.schema.render(levels) if levels is not None and gen.schema else None
        done = Record(conv.conversations + [Turn(ASSISTANT, answer, label)], conv.system, conv.mask, conv.type,
                      dict(conv.extra))  # fmt: skip
        return {**done.to_json(), "attributes": levels, "answer": answer}
    return {**extra, "prompt": conv, "attributes": levels, "answer": answer}

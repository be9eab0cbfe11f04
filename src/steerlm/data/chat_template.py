"""The SteerLM prompt as a Jinja chat template, so engines that never call steerlm prompt a model exactly as it was
trained: `tokenizer.apply_chat_template(messages, attributes={"quality": 9}, add_generation_prompt=True)`
in transformers, vLLM's `chat_template_kwargs`, llama.cpp's server with `--jinja`.

The template is built from the model's `steerlm_model.json` (attribute schema, template style, conditioning) and,
for the `chat` style, from the base model's own chat template, and renders the same text as `templates.py` (SPEC §3):
- `nemo`: byte-exact NeMo format; the attribute line `<extra_id_2>` + attribute string + `\\n` after
  `<extra_id_1>Assistant\\n`.
- `chat`: the base template, with `templates.ATTR_MARKER` + attribute string + `\\n` at the start of each assistant
  message. Like `templates._chat_segments`, the base template is rendered with placeholders for the message texts,
  which are then put in; the generation prompt is that rendering cut where the new answer's text would start.

Template variables and message keys (beside the usual `messages`, `add_generation_prompt`):
- `attributes`: a mapping of name -> level for the answer to write; unspecified attributes take the schema defaults
  (`AttributeSchema.defaults`). Absent or none: the unconditional prompt (no attribute line; what `steerlm sft
  --label_dropout` teaches). Unknown names and levels that are not integers in 0..L-1 stop the rendering with
  `raise_exception` and a message naming the attribute.
- an assistant message may carry its own `attributes` (the levels it was written at; defaults fill the rest, as in
  `steerlm serve`); without them it takes the request's `attributes`, as every assistant turn had a line in training.
- system (and developer) messages are joined by a blank line; with none, the system text is NeMo's default
  (`records.DEFAULT_SYSTEM`), as `steerlm generate` and `steerlm serve` use.

Mirrors `templates.inference_segments` + `encode_text_segments`; `check` proves it token for token on a tokenizer.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping

from steerlm.attributes import AttributeSchema
from steerlm.data import templates
from steerlm.data.records import ASSISTANT, DEFAULT_SYSTEM, USER, Record, Turn

#: First line of every template steerlm builds (how `base_template` recognises one).
HEADER = "{#- steerlm chat template v1 (steerlm_model.json + SPEC §3; docs/serve.md) -#}\n"
_BASE_BEGIN = "{# steerlm: base chat template begins #}"
_BASE_END = "{# steerlm: base chat template ends #}"
#: Placeholder for the text of message i in the chat style (a string no real message contains).
_HOLE = "[[steerlm:message:"


def _lit(value) -> str:
    """A Jinja literal for a str / int / list / dict of those (JSON's syntax is valid Jinja for these)."""
    return json.dumps(value, ensure_ascii=True)


def _schema_part(schema: AttributeSchema | None) -> str:
    """Jinja that defines `sl_names`, `sl_defaults` and the macros that validate and render attribute levels."""
    if schema is None:
        return "{%- set sl_names = [] -%}{%- set sl_defaults = {} -%}\n"
    defaults = schema.defaults()
    top = schema.max_level
    known = ", ".join(schema.names)
    return (
        "{%- set sl_names = " + _lit(list(schema.names)) + " -%}\n"
        "{%- set sl_defaults = " + _lit(defaults) + " -%}\n"
        # sl_label(levels, where): the attribute string for `levels` over the defaults, in canonical order (SPEC §1).
        "{%- macro sl_label(levels, where) -%}\n"
        "{%- if levels is not mapping -%}{{ raise_exception(where ~ ' must be a mapping of attribute name to level, "
        'e.g. {"quality": 9}, not ' + "' ~ (levels|tojson)) }}{%- endif -%}\n"
        "{%- for k in levels -%}{%- if k not in sl_names -%}"
        "{{ raise_exception(where ~ ': unknown attribute ' ~ (k|tojson) ~ '; known: " + known + "') }}"
        "{%- endif -%}{%- endfor -%}\n"
        "{%- set ns = namespace(parts=[]) -%}\n"
        "{%- for n in sl_names -%}\n"
        "{%- set v = levels[n] if n in levels else sl_defaults[n] -%}\n"
        "{%- if v is boolean or not (v is integer or (v is float and v == v|round)) -%}"
        "{{ raise_exception(where ~ '.' ~ n ~ ': level must be an integer, not ' ~ (v|tojson)) }}{%- endif -%}\n"
        "{%- if v < 0 or v > " + str(top) + " -%}"
        "{{ raise_exception(where ~ '.' ~ n ~ ': level ' ~ v ~ ' is out of range 0.." + str(top) + "') }}"
        "{%- endif -%}\n"
        "{%- set ns.parts = ns.parts + [n ~ ':' ~ (v|int)] -%}\n"
        "{%- endfor -%}\n"
        "{{- ns.parts|join(',') -}}\n"
        "{%- endmacro -%}\n"
    )


def _conversation_part(schema: AttributeSchema | None) -> str:
    """Jinja that reads `messages` into `sl.system` (str), `sl.turns` ({role, text, label}) and `sl.label` (the
    attribute string of the answer to write, or none)."""
    conditioned = schema is not None
    request_label = (
        "{%- if attributes is defined and attributes is not none -%}"
        "{%- set sl.label = sl_label(attributes, 'attributes') -%}{%- endif -%}\n"
        if conditioned
        else ""
    )
    own_label = (
        "{%- if m.attributes is defined and m.attributes is not none -%}"
        "{%- set label = sl_label(m.attributes, 'messages[' ~ loop.index0 ~ '].attributes') -%}{%- endif -%}\n"
        if conditioned
        else ""
    )
    return (
        "{%- set sl = namespace(system=[], turns=[], label=none) -%}\n" + request_label + "{%- for m in messages -%}\n"
        "{%- set c = namespace(text='') -%}\n"
        "{%- if m.content is string -%}{%- set c.text = m.content -%}\n"
        "{%- elif m.content is defined and m.content is not none -%}\n"
        "{%- for p in m.content -%}{%- if p.type == 'text' -%}{%- set c.text = c.text ~ p.text -%}{%- else -%}"
        "{{ raise_exception('messages[' ~ loop.index0 ~ '].content: only text parts are supported') }}"
        "{%- endif -%}{%- endfor -%}\n"
        "{%- endif -%}\n"
        "{%- if m.role in ['system', 'developer'] -%}{%- set sl.system = sl.system + [c.text] -%}\n"
        "{%- elif m.role == 'user' -%}{%- set sl.turns = sl.turns + [{'role': 'User', 'text': c.text, 'label': none}] -%}\n"
        "{%- elif m.role == 'assistant' -%}\n"
        "{%- set label = sl.label -%}\n" + own_label + "{%- set sl.turns = sl.turns + [{'role': 'Assistant', 'text': "
        "c.text, 'label': label}] -%}\n"
        "{%- else -%}{{ raise_exception('messages[' ~ loop.index0 ~ '].role: ' ~ (m.role|tojson) ~ ' is not "
        "system, user or assistant') }}\n"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt and (not sl.turns or sl.turns[-1].role != 'User') -%}"
        "{{ raise_exception('the conversation to answer must end with a user message') }}{%- endif -%}\n"
        "{%- set sl_system = sl.system|join('\\n\\n') if sl.system else " + _lit(DEFAULT_SYSTEM) + " -%}\n"
    )


def _nemo_part() -> str:
    """NeMo's VALUE_TO_TEXT rendering (SPEC §3), byte for byte."""
    s, t, lab = (_lit(x) for x in (templates.S, templates.T, templates.L))
    return (
        "{{- " + s + " ~ 'System\\n' ~ sl_system ~ '\\n' -}}\n"
        "{%- for t in sl.turns -%}\n"
        "{{- " + t + " ~ t.role ~ '\\n' -}}\n"
        "{%- if t.label is not none -%}{{- " + lab + " ~ t.label ~ '\\n' -}}{%- endif -%}\n"
        "{{- t.text ~ '\\n' -}}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}\n"
        "{{- " + t + " ~ 'Assistant\\n' -}}\n"
        "{%- if sl.label is not none -%}{{- " + lab + " ~ sl.label ~ '\\n' -}}{%- endif -%}\n"
        "{%- elif sl.turns and sl.turns[-1].role != 'User' -%}{{- " + t + " -}}\n"
        "{%- endif -%}"
    )


def _chat_part(base: str) -> str:
    """The base template rendered on placeholders, then the message texts (with their attribute lines) put in; the
    generation prompt is cut where the new answer would start (as `templates._chat_segments` does)."""
    hole = _lit(_HOLE)
    marker = _lit(templates.ATTR_MARKER)
    return (
        "{%- set sl_msgs = namespace(items=[{'role': 'system', 'content': sl_system}] if sl_system else []) -%}\n"
        "{%- for t in sl.turns -%}{%- set sl_msgs.items = sl_msgs.items + [{'role': t.role|lower, 'content': "
        + hole
        + " ~ loop.index0 ~ '.'}] -%}{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{%- set sl_msgs.items = sl_msgs.items + [{'role': 'assistant', 'content': "
        + hole
        + " ~ 'answer.'}] -%}{%- endif -%}\n"
        "{%- set sl_base_messages = sl_msgs.items -%}\n"
        # The base template, verbatim, sees the placeholder messages and no generation prompt.
        "{%- set sl_text -%}{%- set messages = sl_base_messages -%}{%- set add_generation_prompt = false -%}"
        + _BASE_BEGIN
        + base
        + _BASE_END
        + "{%- endset -%}\n"
        "{%- set out = namespace(text=sl_text) -%}\n"
        "{%- for t in sl.turns -%}\n"
        "{%- set body = (" + marker + " ~ t.label ~ '\\n' if t.label is not none else '') ~ t.text -%}\n"
        "{%- set out.text = out.text|replace(" + hole + " ~ loop.index0 ~ '.', body, 1) -%}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}\n"
        "{{- out.text.split(" + hole + " ~ 'answer.')[0] -}}\n"
        "{%- if sl.label is not none -%}{{- " + marker + " ~ sl.label ~ '\\n' -}}{%- endif -%}\n"
        "{%- else -%}{{- out.text -}}{%- endif -%}"
    )


def build(style: str, schema: AttributeSchema | None, base: str | None = None) -> str:
    """The chat template of a SteerLM model: `style` 'nemo' or 'chat' (SPEC §3), attribute `schema` (None for a
    model trained without attributes: the template then takes none), `base` the base model's own chat template
    (needed for 'chat'; a steerlm template is unwrapped first, so building is idempotent). Raises ValueError for an
    unknown style or a chat style without a base template."""
    if style not in templates.STYLES:
        raise ValueError(f"unknown template style {style!r}; expected one of {templates.STYLES}")
    head = HEADER + _schema_part(schema) + _conversation_part(schema)
    base = base_template(base)
    if style == "nemo":
        # The base template rides along unrendered, so that steerlm (`base_template`) gets it back on loading.
        kept = "{%- if false -%}" + _BASE_BEGIN + base + _BASE_END + "{%- endif -%}" if base else ""
        return head + _nemo_part() + kept
    if not base:
        raise ValueError("the chat style needs the base model's chat template, and the tokenizer has none")
    return head + _chat_part(base)


def base_template(template: str | None) -> str | None:
    """The base model's chat template that a steerlm template carries; any other template as it is (None for a
    steerlm template built without one)."""
    if not isinstance(template, str) or not template.startswith(HEADER):
        return template
    if _BASE_BEGIN not in template:
        return None
    return template.split(_BASE_BEGIN, 1)[1].rsplit(_BASE_END, 1)[0]


def schema_of(meta: Mapping) -> AttributeSchema | None:
    """The attribute schema a `steerlm_model.json` conditions on (None for a model trained without attributes)."""
    attrs = meta.get("attributes")
    conditioned = meta.get("conditioning", "attributes" if attrs else "none") == "attributes"
    return AttributeSchema.from_dict(attrs) if attrs and conditioned else None


def from_meta(meta: Mapping, tokenizer) -> str:
    """The chat template for a model folder's `steerlm_model.json` contents and its tokenizer."""
    base = getattr(tokenizer, "chat_template", None)  # a dict of named templates is not one to wrap
    return build(meta.get("template", "chat"), schema_of(meta), base if isinstance(base, str) else None)


# ---------------------------------------------------------------- proof against steerlm's own prompt

#: Conversations `check` renders both ways: one turn, several turns (history with and without own attributes),
#: an own system text.
_PROBES = (
    ([{"role": "user", "content": "What is the capital of France?"}], None),
    (
        [
            {"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "Tell me a joke."},
            {"role": "assistant", "content": "Why did the chicken cross the road?"},
            {"role": "user", "content": "Another one, please."},
        ],
        "own",
    ),
)


def steerlm_prompt_ids(messages: list[Mapping], attributes: Mapping | None, style: str,
                       schema: AttributeSchema | None, tokenizer) -> list[int]:  # fmt: skip
    """steerlm's own prompt for OpenAI-style `messages` (as `steerlm serve` reads them: system messages joined, an
    assistant message at its own `attributes` or the request's): `templates.inference_segments` tokenized segment by
    segment, exactly as in training and `steerlm generate`."""
    label = schema.render(schema.with_defaults(attributes)) if schema is not None and attributes is not None else None
    system, turns = [], []
    for m in messages:
        content = m["content"] if isinstance(m["content"], str) else "".join(p["text"] for p in m["content"])
        if m["role"] in ("system", "developer"):
            system.append(content)
            continue
        own = m.get("attributes")
        turn_label = None
        if m["role"] == "assistant" and schema is not None:
            turn_label = schema.render(schema.with_defaults(own)) if own is not None else label
        turns.append(Turn(USER if m["role"] == "user" else ASSISTANT, content, turn_label))
    record = Record(turns, "\n\n".join(system) if system else DEFAULT_SYSTEM)
    segments = templates.inference_segments(record, label, style, tokenizer)
    return templates.encode_text_segments(segments, tokenizer)


def check(tokenizer, style: str, schema: AttributeSchema | None, template: str | None = None) -> list[str]:
    """Render probe conversations through `template` (default: the tokenizer's) with transformers and through
    steerlm's own prompt builder; the differences found, as readable lines (empty: token for token the same).

    The texts are always equal; the tokens can differ because steerlm tokenizes segment by segment (as training
    does, `templates.encode`) while engines tokenize the whole text. The probes are ordinary messages, so a
    difference here hits every prompt (e.g. a tokenizer that puts a prefix space before each segment). Beyond
    them, a message whose text ends in whitespace (NeMo style: a trailing newline; `"\n\n"` is one token for
    SmolLM2 at a segment's end) can tokenize differently at that spot (docs/serve.md)."""
    template = template if template is not None else tokenizer.chat_template
    problems = []
    levels = {schema.names[0]: 0} if schema is not None else None
    for messages, mode in _PROBES:
        for attributes in (levels, None):
            msgs = [dict(m) for m in messages]
            if mode == "own" and schema is not None:
                msgs[2]["attributes"] = {schema.names[-1]: schema.max_level}
            want = steerlm_prompt_ids(msgs, attributes, style, schema, tokenizer)
            got = tokenizer.apply_chat_template(msgs, chat_template=template, add_generation_prompt=True,
                                                tokenize=True, return_dict=False, attributes=attributes)  # fmt: skip
            if list(got) != want:
                at = next(
                    (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want))
                )
                problems.append(f"{len(messages)} messages, attributes {attributes}: the template gives {len(got)} "
                                f"tokens, steerlm {len(want)}; first difference at token {at}")  # fmt: skip
    return problems


def install(tokenizer, meta: Mapping) -> list[str]:
    """Set `tokenizer.chat_template` to the SteerLM template of `meta` (a `steerlm_model.json`), checked against
    steerlm's own prompt; returns the differences found (printed as a warning; empty when exact). A tokenizer
    without a chat template in a chat-style model is left as it is (returns the reason)."""
    try:
        template = from_meta(meta, tokenizer)
    except ValueError as e:
        return [str(e)]
    problems = check(tokenizer, meta.get("template", "chat"), schema_of(meta), template)
    tokenizer.chat_template = template
    for p in problems:
        print(f"steerlm: warning: the saved chat template differs from steerlm's prompt: {p}", file=sys.stderr)
    return problems

"""The engine-facing side of `steerlm serve`: `Service` turns validated requests into prompts, sampling settings
and engine rows (with every limit and 422 check on the way), and collects or streams their results."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steerlm.attributes import parse_assignment
from steerlm.batching import DONE, ERROR, Engine, Finished, QueueFull, Row
from steerlm.data import invariants, templates
from steerlm.data.records import ASSISTANT, USER, Record, Turn
from steerlm.errors import UserError
from steerlm.serving.guard import Metrics
from steerlm.serving.schemas import ApiError, CompletionRequest, Message, OpenAISampling, error_body, sse

#: A request's guidance settings (steerlm extensions): each is the request's, else the server's `--<name>` default.
GUIDANCE = ("guidance_scale", "guidance_reference", "guidance_plausibility", "guidance_reference_plausibility")

if TYPE_CHECKING:
    from steerlm.serve import Config


class Service:
    """What the routes share: the generator, the engine, the APM, limits and metrics."""

    def __init__(self, cfg: Config, generator, apm=None):
        from steerlm.generator import SamplingArgs, resolve_guidance

        self.cfg, self.gen, self.apm, self.SamplingArgs = cfg, generator, apm, SamplingArgs
        self.tokenizer = generator.tokenizer
        if cfg.system is not None:
            generator.system = cfg.system
        self.name = cfg.model_name or _model_name(cfg.model)
        self.created = int(time.time())
        self.defaults: dict[str, int] = {}
        if cfg.attr:
            if generator.schema is None:
                raise UserError(f"{cfg.model} is not attribute-conditioned; it takes no attributes", field="attr")
            levels = dict(parse_assignment(a) for a in cfg.attr)
            self.defaults = generator.schema.validate(levels)
        if cfg.guidance_scale not in (None, 1.0) or cfg.guidance_reference:
            if generator.schema is None:
                raise UserError(f"{cfg.model} is not attribute-conditioned; it takes no attribute guidance",
                                field="guidance_scale")  # fmt: skip
        #: The guidance of steered requests that set none (`GUIDANCE`): the server's flags, else the model's own.
        self.default_guidance = {name: getattr(cfg, name) for name in GUIDANCE}
        self.default_guidance.update(resolve_guidance(self.default_guidance, generator.guidance))
        if generator.schema is not None:
            try:  # a bad reference fails at start-up, not on the first request
                generator.reference_string(self.default_guidance["guidance_reference"], self.defaults)
            except UserError as e:
                raise UserError(f"guidance_reference: {e}", field="guidance_reference") from None
        config = getattr(generator.model, "config", None)
        self.context = int(getattr(config, "max_position_embeddings", 0) or 0) or None
        self.engine = Engine(generator.model, self.tokenizer, max_batch_size=cfg.max_batch_size,
                             max_queue=cfg.max_queue, batch_wait_s=cfg.batch_wait_ms / 1000)  # fmt: skip
        self.metrics = Metrics()
        self.apm_lock = asyncio.Lock()

    # ------------------------------------------------------------ description

    def schema_info(self) -> dict | None:
        schema = self.gen.schema
        if schema is None:
            return None
        return {"names": list(schema.names), "levels": schema.levels,
                "defaults": schema.with_defaults(self.defaults)}  # fmt: skip

    def model_card(self) -> dict:
        apm = None
        if self.apm is not None:
            apm = {"kind": getattr(self.apm, "kind", None), "attributes": self.apm.schema.to_dict()}
        return {
            "id": self.name, "object": "model", "created": self.created, "owned_by": "steerlm",
            "attributes": self.schema_info(), "template": self.gen.template, "conditioning": self.gen.conditioning,
            "system": self.gen.system, "context_length": self.context, "apm": apm,
            "guidance": self.gen.schema is not None,
            "default_guidance": {name.removeprefix("guidance_"): value for name, value in self.default_guidance.items()}
            if self.gen.schema is not None else None,
            "limits": {"max_tokens": self.cfg.max_tokens, "default_max_tokens": self.cfg.default_max_tokens,
                       "max_n": self.cfg.max_n, "max_prompt_tokens": self.cfg.max_prompt_tokens,
                       "max_prompts": self.cfg.max_prompts, "max_queue": self.cfg.max_queue},
        }  # fmt: skip

    def check_model(self, name: str | None) -> None:
        if name and name != self.name:
            raise ApiError(404, f"model {name!r} is not served here; this server serves {self.name!r}",
                           param="model", code="model_not_found")  # fmt: skip

    # ------------------------------------------------------------ requests -> prompts and sampling

    def levels(self, requested: dict[str, Any] | None) -> dict[str, int] | None:
        """Requested levels over the server defaults over the schema defaults; 422 names a bad attribute."""
        if self.gen.schema is None:
            if requested:
                raise ApiError(422, f"model {self.name!r} is not attribute-conditioned; it takes no attributes",
                               param="attributes")  # fmt: skip
            return None
        try:
            return self.gen.resolve_attributes({**self.defaults, **(requested or {})})
        except UserError as e:
            raise ApiError(422, f"attributes.{e.field}: {e.reason}" if e.field else e.reason,
                           param=f"attributes.{e.field}" if e.field else "attributes") from None  # fmt: skip

    def record(self, messages: list[Message], levels: dict[str, int] | None, what: str = "messages") -> Record:
        """OpenAI messages -> a Record ending in a user turn. Earlier assistant turns carry the levels they were
        generated at (their `attributes`, else this request's), as every assistant turn did in training."""
        system_parts, turns = [], []
        for i, m in enumerate(messages):
            text = _content_text(m, f"{what}[{i}]")
            if m.role in ("system", "developer"):
                system_parts.append(text)
                continue
            if not text.strip():
                raise ApiError(422, f"{what}[{i}].content: empty message", param=f"{what}[{i}].content")
            label = None
            if m.role == "assistant":
                if m.attributes and self.gen.schema is None:
                    raise ApiError(422, f"{what}[{i}].attributes: the model takes no attributes",
                                   param=f"{what}[{i}].attributes")  # fmt: skip
                own = self.levels(m.attributes) if m.attributes else levels
                label = self.gen.schema.render(own) if own is not None and self.gen.schema is not None else None
            elif m.attributes:
                raise ApiError(422, f"{what}[{i}].attributes: only assistant messages carry attributes",
                               param=f"{what}[{i}].attributes")  # fmt: skip
            turns.append(Turn(USER if m.role == "user" else ASSISTANT, text, label))
        if not turns or turns[-1].role != USER:
            raise ApiError(422, f"{what}: the last message must be the user's (the server writes the answer)",
                           param=what)  # fmt: skip
        system = "\n\n".join(system_parts) if system_parts else self.gen.system
        return Record(turns, system)

    def prompt_ids(self, record: Record, levels: dict[str, int] | None, param: str = "messages") -> list[int]:
        try:
            return self.gen.prompt_ids(record, levels)
        except UserError as e:
            raise ApiError(422, f"{param}: {e}", param=param) from None

    def raw_ids(self, text: str, add_bos: bool = False) -> list[int]:
        ids = templates.encode_text_segments([text], self.tokenizer, add_bos=add_bos)
        if not ids:
            raise ApiError(422, "empty prompt", param="prompt")
        return ids

    def max_tokens(self, requested: int | None, param: str = "max_tokens") -> int | None:
        """The client's token budget checked against the server's bound (None: the client set none)."""
        if requested is not None and requested > self.cfg.max_tokens:
            raise ApiError(422, f"{param}: {requested} is more than this server allows ({self.cfg.max_tokens})",
                           param=param)  # fmt: skip
        return requested

    def answer_budget(self, prompts: list[list[int]], requested: int | None, param: str, *,
                      default: int | None = None, tokens_param: str = "max_tokens") -> int:  # fmt: skip
        """Tokens each answer may use. A budget the client set (`requested`) must fit in the context beside the
        longest prompt (else 422, context_length_exceeded); without one, the default (`default_max_tokens`) shrinks
        to the room that is left, as vLLM does. A prompt that leaves no room for an answer is a 422 either way
        (`invariants.no_room`, the check every stage shares)."""
        longest = max(len(p) for p in prompts)
        if longest > self.cfg.max_prompt_tokens:
            raise ApiError(422, f"{param}: the prompt has {longest} tokens; this server accepts at most "
                           f"{self.cfg.max_prompt_tokens}", param=param, code="context_length_exceeded")  # fmt: skip
        if invariants.no_room(longest, self.context):
            raise ApiError(422, f"{param}: the prompt ({longest} tokens) leaves no room for an answer in the "
                           f"model's context length ({self.context})", param=param,
                           code="context_length_exceeded")  # fmt: skip
        room = invariants.room_left(longest, self.context)
        if requested is None:
            value = default if default is not None else self.cfg.default_max_tokens
            return value if room is None else min(value, room)
        if room is not None and requested > room:
            raise ApiError(422, f"{param}: the prompt ({longest} tokens) plus {tokens_param} ({requested}) exceeds "
                           f"the model's context length ({self.context})", param=param,
                           code="context_length_exceeded")  # fmt: skip
        return requested

    def check_n(self, n: int, prompts: int = 1) -> None:
        if n > self.cfg.max_n:
            raise ApiError(422, f"n: {n} is more than this server allows ({self.cfg.max_n})", param="n")
        if n * prompts > self.cfg.max_queue:
            raise ApiError(422, f"the request asks for {n * prompts} answers; the server queues at most "
                           f"{self.cfg.max_queue}", param="n")  # fmt: skip

    def sampling(self, **kwargs):
        try:
            return self.SamplingArgs(**{k: v for k, v in kwargs.items() if v is not None})
        except ValueError as e:
            raise ApiError(422, str(e)) from None

    def openai_sampling(self, req: OpenAISampling, max_tokens: int, steered: bool = True):
        """The request's sampling settings; a steered request (`steered`: answered through the template at attribute
        levels) that sets no guidance takes the server's `--guidance_scale` / `--guidance_reference`."""
        _check_unsupported(req)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 16 or any(not s or len(s) > 256 for s in stop):
            raise ApiError(422, "stop: up to 16 non-empty strings of at most 256 characters", param="stop")
        if req.min_tokens is not None and req.min_tokens > max_tokens:
            raise ApiError(422, f"min_tokens ({req.min_tokens}) exceeds the answer's token budget ({max_tokens}: "
                           "max_tokens, or the default shrunk to the room the context leaves)",
                           param="min_tokens")  # fmt: skip
        top_k = max(req.top_k, 0) if req.top_k is not None else None  # -1 (vLLM) and 0 both mean no limit
        guided = req.guidance_scale is not None and req.guidance_scale != 1.0
        if (guided or req.guidance_reference) and self.gen.schema is None:
            raise ApiError(422, f"guidance: model {self.name!r} is not attribute-conditioned", param="guidance_scale")
        if req.guidance_reference:
            try:
                self.gen.reference_string(req.guidance_reference, {**self.defaults, **(req.attributes or {})})
            except UserError as e:
                raise ApiError(422, f"guidance_reference: {e}", param="guidance_reference") from None
        return self.sampling(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=top_k,
                             min_new_tokens=req.min_tokens, repetition_penalty=req.repetition_penalty, stop=stop,
                             seed=req.seed, **self.guidance(req, steered))  # fmt: skip

    def guidance(self, req: OpenAISampling, steered: bool) -> dict[str, Any]:
        """The guidance settings of a request (`GUIDANCE`): its own, else the server defaults when it is steered (a
        raw prompt has no attribute line to guide)."""
        own = {name: getattr(req, name) for name in GUIDANCE}
        if steered and self.gen.schema is not None:
            return {name: self.default_guidance[name] if value is None else value for name, value in own.items()}
        return own

    def neutral_ids(self, record: Record, sampling, requested: dict[str, Any] | None = None) -> list[int] | None:
        """The neutral prompt of attribute guidance, when the request asks for guidance; `requested` (the request's
        `attributes`, over the server defaults) names what `guidance_reference='middle'` moves."""
        if not self.gen.guided(sampling):
            return None
        try:
            return self.gen.neutral_ids(record, sampling, {**self.defaults, **(requested or {})})
        except UserError as e:
            raise ApiError(422, f"guidance_reference: {e}", param="guidance_reference") from None

    # ------------------------------------------------------------ running rows

    def submit(self, prompts: list[list[int]], samplings: list, *, templated: bool, include_stop: bool = False,
               neutral: list[list[int] | None] | None = None, prompt_tokens: int | None = None):  # fmt: skip
        """Queue one row per (prompt, sampling), guided against its `neutral` prompt where one is given; returns
        (rows, events queue). 429 when the queue is full. `prompt_tokens`: the request's prompt tokens, each prompt
        counted once whatever its `n` (default: all rows' prompts)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink_for(index: int) -> Callable[[str, Any], None]:
            def sink(kind: str, payload: Any) -> None:
                try:
                    loop.call_soon_threadsafe(events.put_nowait, (index, kind, payload))
                except RuntimeError:  # the event loop is gone (shutdown)
                    pass

            return sink

        rows = []
        for i, (ids, s) in enumerate(zip(prompts, samplings, strict=True)):
            stops = self.gen.stop_strings(s, raw=not templated)
            row = Row(ids, dataclasses.replace(s, stop=stops), sink_for(i), include_stop=include_stop,
                      strip_newline=templated)  # fmt: skip
            rows.append(row.guide(neutral[i]) if neutral and neutral[i] else row)
        try:
            self.engine.submit(rows)
        except QueueFull as e:
            raise ApiError(429, f"server busy: {e}; retry shortly", code="queue_full",
                           headers={"Retry-After": "1"}) from None  # fmt: skip
        self.metrics.prompt_tokens += sum(len(p) for p in prompts) if prompt_tokens is None else prompt_tokens
        return rows, events

    async def collect(self, request, rows: list[Row], events: asyncio.Queue) -> list[Finished]:
        """Wait for every row's result; a client that disconnects cancels its rows."""
        results: list[Finished | None] = [None] * len(rows)
        try:
            while any(r is None for r in results):
                try:
                    index, kind, payload = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:  # (TimeoutError itself only from Python 3.11)
                    if await request.is_disconnected():
                        raise ApiError(499, "client disconnected") from None
                    continue
                if kind == DONE:
                    results[index] = payload
                elif kind == ERROR:
                    raise ApiError(500, payload)
        finally:
            for r in rows:
                if r.finish_reason is None:
                    r.cancel()
        self.metrics.completion_tokens += sum(len(r.token_ids) for r in results)
        return results  # type: ignore[return-value]

    async def stream(self, rows: list[Row], events: asyncio.Queue, chunk: Callable[[int, str, Any], dict | None],
                     tail: Callable[[list[Finished]], list[dict]]):  # fmt: skip
        """Server-sent events: `chunk(index, kind, payload)` per event, `tail(results)` at the end, then [DONE]."""
        results: list[Finished | None] = [None] * len(rows)
        try:
            while any(r is None for r in results):
                index, kind, payload = await events.get()
                if kind == ERROR:
                    yield sse(error_body(500, payload))
                    break
                if kind == DONE:
                    results[index] = payload
                    self.metrics.completion_tokens += len(payload.token_ids)
                body = chunk(index, kind, payload)
                if body is not None:
                    yield sse(body)
            else:
                for body in tail(results):  # type: ignore[arg-type]
                    yield sse(body)
            yield "data: [DONE]\n\n"
        finally:  # also on cancellation, when the client went away
            for r in rows:
                if r.finish_reason is None:
                    r.cancel()


def _content_text(m: Message, where: str) -> str:
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    texts = []
    for j, part in enumerate(m.content):
        if part.type != "text" or part.text is None:
            raise ApiError(422, f"{where}.content[{j}]: only text parts are supported, not {part.type!r}",
                           param=f"{where}.content[{j}]")  # fmt: skip
        texts.append(part.text)
    return "".join(texts)


def _check_unsupported(req: OpenAISampling) -> None:
    """OpenAI fields accepted for compatibility but only at their neutral values."""
    checks = [
        ("presence_penalty", req.presence_penalty in (None, 0)),
        ("frequency_penalty", req.frequency_penalty in (None, 0)),
        ("logprobs", not req.logprobs),
        ("top_logprobs", not req.top_logprobs),
        ("logit_bias", not req.logit_bias),
        ("response_format", req.response_format in (None, {"type": "text"})),
        ("tools", not req.tools),
        ("tool_choice", req.tool_choice in (None, "none")),
        ("functions", not req.functions),
        ("function_call", req.function_call in (None, "none")),
    ]
    for name, ok in checks:
        if not ok:
            raise ApiError(422, f"{name}: not supported by this server", param=name)
    if isinstance(req, CompletionRequest):
        if req.best_of not in (None, 1, req.n):
            raise ApiError(422, "best_of: not supported by this server (use n)", param="best_of")
        if req.suffix:
            raise ApiError(422, "suffix: not supported by this server", param="suffix")


def _model_name(model: str) -> str:
    path = Path(model)
    if path.exists():
        path = path.resolve()
        # runs/x/sft/best -> "sft/best" is more telling than "best"
        return f"{path.parent.name}/{path.name}" if path.name in ("best", "last", "final") else path.name
    return model

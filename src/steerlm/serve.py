"""`steerlm serve`: an OpenAI- and NeMo-compatible steerable model server with a web playground (SPEC §7).

    steerlm serve --model runs/x/sft/best                          # http://127.0.0.1:8000/ (playground)
    steerlm serve --model runs/x/sft/best --apm runs/x/apm --attr quality=9 --api_key "$KEY" --port 8080

Endpoints (docs/serve.md has examples):
- `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`: OpenAI-compatible, streaming by server-sent
  events; steering through the extra body field `"attributes": {"quality": 9, "humor": 6}` (unknown names and
  out-of-range levels: HTTP 422 with the reason); unspecified attributes take the server defaults (`--attr`), then
  the schema defaults.
- `PUT /generate`: NeMo's text-generation server (raw prompts such as NVIDIA's SteerLM tutorial builds; the
  response `sentences` are prompt + completion, the end string included, as NeMo returns them).
- `POST /v1/attributes/score`: the APM's per-attribute value and level of responses (with `--apm`).
- `GET /health`, `GET /metrics` (Prometheus text, or JSON with `?format=json`).
- `/`: the playground (one slider per attribute, streamed answers, side-by-side comparison with APM scores).

Requests are decoded together by `batching.Engine` (dynamic batching with a bounded queue; a full queue answers 429).
Safety: binds 127.0.0.1 unless `--host`; `--api_key` (or env STEERLM_API_KEY) makes every API route require
`Authorization: Bearer KEY`; body size, tokens, n, prompt length and queue length are bounded; API requests must be
`application/json` (so a web page elsewhere cannot post to the server with a form); a client that disconnects
stops its generation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import math
import os
import sys
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from steerlm import config as config_lib
from steerlm.attributes import parse_assignment
from steerlm.batching import DONE, ERROR, TEXT, Engine, Finished, QueueFull, Row
from steerlm.data import invariants, templates
from steerlm.data.records import ASSISTANT, USER, Record, Turn
from steerlm.errors import UserError

log = logging.getLogger("steerlm.serve")
STATIC = Path(__file__).parent / "static"


@dataclass
class Config:
    model: str
    """Model to serve: a steerlm output folder (e.g. runs/x/sft/best), a LoRA adapter folder, a built-in name
    (tiny-lm, smollm2-135m-instruct), a Hugging Face folder or hub id."""
    apm: str = ""
    """Attribute prediction model folder (from `steerlm train-apm`); enables POST /v1/attributes/score and the
    playground's scores."""
    host: str = "127.0.0.1"
    """Address to bind. The default accepts local connections only; use 0.0.0.0 to expose the server (set
    --api_key then)."""
    port: int = 8000
    """TCP port (0: any free port)."""
    api_key: str = ""
    """If set, every API route requires `Authorization: Bearer <key>` (the page and /health do not). Default: the
    STEERLM_API_KEY environment variable, which keeps the key out of the process list."""
    model_name: str = ""
    """Model id reported by /v1/models and accepted in requests (default: the model folder's name)."""
    attr: list[str] = field(default_factory=list)
    """Server default attribute levels as name=level, repeatable (--attr quality=9 --attr humor=2); requests
    override them, and attributes set nowhere take the schema defaults."""
    system: str | None = None
    """Default system prompt when a chat request has none (default: NeMo's SteerLM system prompt)."""
    template: str = "auto"
    """Template style: 'nemo', 'chat', or 'auto' (the model's steerlm_model.json, else 'chat')."""
    dtype: str = ""
    """Model dtype ('bf16', 'fp16', 'fp32'; default fp32)."""
    threads: int = 0
    """CPU threads for torch (0: torch's default, one per core). On a CPU shared with other busy processes, fewer
    threads than cores can be much faster (threads that wait for a preempted sibling waste their time slice)."""
    max_batch_size: int = 16
    """Most answers decoded together in one batch."""
    batch_wait_ms: float = 10.0
    """How long an idle worker waits for more requests to fill a batch before it starts."""
    max_queue: int = 256
    """Most answers waiting to start (a request with n choices or several prompts counts each); beyond: HTTP 429."""
    max_tokens: int = 1024
    """Upper bound on max_tokens / tokens_to_generate of a request."""
    default_max_tokens: int = 256
    """max_tokens of OpenAI requests that do not set it (NeMo's /generate defaults to 64 tokens)."""
    max_n: int = 8
    """Upper bound on n (choices per prompt)."""
    max_prompt_tokens: int = 4096
    """Longest prompt in tokens (also bounded by the model's context length minus the answer's tokens)."""
    max_prompts: int = 128
    """Most prompts per /generate or /v1/completions request, and items per scoring request (NeMo: 128)."""
    max_body_bytes: int = 1_000_000
    """Largest request body accepted (HTTP 413 beyond)."""
    playground: bool = True
    """Serve the web playground at /."""
    log_level: str = "info"
    """uvicorn log level (critical, error, warning, info, debug)."""

    def __post_init__(self):
        if not self.api_key:
            self.api_key = os.environ.get("STEERLM_API_KEY", "")
        self.template = config_lib.auto_choice(self.template, "template", templates.STYLES)
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, not {self.port}")
        for name in ("max_batch_size", "max_queue", "max_tokens", "default_max_tokens", "max_n",
                     "max_prompt_tokens", "max_prompts", "max_body_bytes"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)}")
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens ({self.max_tokens})")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, not {self.threads}")
        if self.batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, not {self.batch_wait_ms}")
        if self.log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise ValueError(f"unknown log_level {self.log_level!r}")
        for text in self.attr:
            parse_assignment(text)


# ---------------------------------------------------------------- errors


class ApiError(Exception):
    """A request the server refuses; becomes `{"error": {...}}` with an HTTP status (OpenAI's error shape)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
                422: "invalid_request_error", 429: "server_busy", 500: "server_error", 503: "server_error"}  # fmt: skip


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}  # fmt: skip


def _json_response(status: int, body: Any, headers: dict[str, str] | None = None):
    return JSONResponse(body, status_code=status, headers=headers)


def param_path(loc: tuple | list) -> str:
    """A field's location as OpenAI spells `param` (and as every message of this server names a field):
    `messages[0].content`, `stream_options.include_usage`. Pydantic's union branch tags (`str`,
    `list[ContentPart]`, ...) and the `body` root are not part of the path."""
    out = ""
    for x in loc:
        if x == "body" and not out:
            continue
        if isinstance(x, int):
            out += f"[{x}]"
            continue
        x = str(x)
        if x in _TYPE_TAGS or not x.isidentifier():
            break
        out += f".{x}" if out else x
    return out


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "json-or-python"}


def _describe_validation(errors: list[dict]) -> tuple[str, str | None]:
    """A readable message (and the first offending field, `param_path` spelling) from pydantic errors."""
    parts, first = [], None
    for e in errors[:6]:
        loc = param_path(e.get("loc", ()))
        first = first or loc or None
        kind = e.get("type", "")
        if kind == "extra_forbidden":
            msg = "unknown field (not part of this API)"
        elif kind == "missing":
            msg = "required field is missing"
        else:
            msg = e.get("msg", "invalid value")
        part = f"{loc}: {msg}" if loc else msg
        if part not in parts:  # a union's branches each report the same field
            parts.append(part)
    if len(errors) > 6:
        parts.append(f"... and {len(errors) - 6} more")
    return "; ".join(parts), first


# ---------------------------------------------------------------- request bodies


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class Message(BaseModel):
    # Clients often send back whole message objects they received (refusal, tool_calls: null, ...): ignore extras.
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    attributes: dict[str, Any] | None = None
    """steerlm extension: the levels an earlier assistant answer was generated at (default: this request's)."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _OpenAISampling(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    """Extension (as vLLM): sample among the k most likely tokens; 0 or -1 for no limit."""
    min_tokens: int | None = Field(None, ge=0)
    """Extension (as vLLM): end-of-sequence and stop strings are ignored before this many tokens."""
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    """Extension (as vLLM / transformers): > 1 discourages repeating tokens."""
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    attributes: dict[str, Any] | None = None
    """steerlm extension: attribute levels to steer the answer, e.g. {"quality": 9, "humor": 6}."""
    guidance_scale: float | None = Field(None, ge=0, le=100)
    """steerlm extension: attribute guidance scale (1: plain SteerLM; > 1 amplifies the requested attributes at about
    twice the compute; see generate.SamplingArgs)."""
    guidance_reference: str | None = None
    """steerlm extension: the neutral condition of guidance ('' : no attribute line, or an attribute string)."""
    user: str | None = None
    # Accepted for compatibility; only their neutral values are supported (checked in _check_unsupported).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None


class ChatRequest(_OpenAISampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_OpenAISampling):
    prompt: str | list[str]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class NemoRequest(BaseModel):
    """NeMo's text-generation server body (nemo/collections/nlp/modules/common/text_generation_server.py): the same
    fields, defaults and ranges. Unknown keys are ignored, as NeMo logs and ignores them."""

    model_config = ConfigDict(extra="allow")
    sentences: list[str] = Field(min_length=1)
    tokens_to_generate: int = Field(64, ge=1, strict=True)
    temperature: float = Field(1.0, gt=0, le=100)
    add_BOS: bool = Field(False, strict=True)
    greedy: bool = Field(False, strict=True)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(0.9, ge=0, le=1)
    repetition_penalty: float = Field(1.0, ge=1)
    end_strings: list[str] = Field(default_factory=lambda: ["<|endoftext|>"])
    min_tokens_to_generate: int = Field(0, ge=0, strict=True)
    random_seed: int | None = Field(None, ge=0, strict=True)
    all_probs: bool = Field(False, strict=True)
    compute_logprob: bool = Field(False, strict=True)


class ScoreItem(_Strict):
    messages: list[Message] = Field(min_length=1)
    """The conversation up to the response (ending with a user message)."""
    response: str
    """The assistant response to score."""


class ScoreRequest(_Strict):
    model: str | None = None
    items: list[ScoreItem] = Field(min_length=1)


# ---------------------------------------------------------------- metrics


class Metrics:
    """Request counts by route and status, and latencies of recent requests (per route), for GET /metrics."""

    ROUTES = ("/v1/chat/completions", "/v1/completions", "/generate", "/v1/attributes/score", "/v1/models")

    def __init__(self, window: int = 2048):
        self.started = time.time()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, deque] = defaultdict(lambda: deque(maxlen=window))
        self.completion_tokens = 0
        self.prompt_tokens = 0
        self.scored = 0

    def route(self, path: str) -> str:
        if path in self.ROUTES or path in ("/", "/health", "/metrics"):
            return path
        return "/static" if path.startswith("/static/") else "other"

    def record(self, path: str, status: int, seconds: float) -> None:
        route = self.route(path)
        self.requests[(route, status)] += 1
        if route in self.ROUTES:
            self.latency[route].append(seconds)
            self.latency["all"].append(seconds)

    def snapshot(self, engine: Engine) -> dict:
        st = engine.stats
        return {
            "uptime_s": round(time.time() - self.started, 3),
            "requests": [{"route": r, "status": s, "count": n} for (r, s), n in sorted(self.requests.items())],
            "requests_total": sum(self.requests.values()),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "generated_tokens": st.generated_tokens,
            "queue_length": engine.queue_length,
            "running": engine.running,
            "batches": st.batches,
            "decode_steps": st.decode_steps,
            "mean_batch_size": round(st.rows_in_steps / st.decode_steps, 3) if st.decode_steps else 0.0,
            "max_batch_size": st.max_batch,
            "answers_started": st.rows_started,
            "answers_finished": st.rows_finished,
            "answers_cancelled": st.rows_cancelled,
            "answers_failed": st.rows_failed,
            "responses_scored": self.scored,
            "latency_s": {route: _quantiles(values) for route, values in sorted(self.latency.items())},
            "time_to_first_token_s": _quantiles(st.ttft),
        }


def _quantiles(values) -> dict:
    data = sorted(values)
    if not data:
        return {"count": 0, "p50": None, "p90": None, "p99": None}

    def q(p: float) -> float:  # nearest rank
        return round(data[min(len(data) - 1, max(0, math.ceil(p * len(data)) - 1))], 6)

    return {"count": len(data), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99)}


def prometheus(snap: dict) -> str:
    out = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]):
        out.append(f"# HELP steerlm_{name} {help_}")
        out.append(f"# TYPE steerlm_{name} {kind}")
        out.extend(f"steerlm_{name}{labels} {value}" for labels, value in samples)

    metric("requests_total", "counter", "HTTP requests by route and status.",
           [(f'{{route="{r["route"]}",status="{r["status"]}"}}', r["count"]) for r in snap["requests"]])  # fmt: skip
    for name, help_ in (("prompt_tokens", "Prompt tokens of accepted requests."),
                        ("completion_tokens", "Tokens in answers returned."),
                        ("generated_tokens", "Tokens decoded (cancelled answers included)."),
                        ("batches", "Forward passes (prefills and decode steps)."),
                        ("answers_cancelled", "Answers stopped because their client went away."),
                        ("answers_failed", "Answers that failed with a server error.")):  # fmt: skip
        metric(name + "_total", "counter", help_, [("", snap[name])])
    metric("queue_length", "gauge", "Answers waiting to start.", [("", snap["queue_length"])])
    metric("running", "gauge", "Answers being decoded now.", [("", snap["running"])])
    metric("mean_batch_size", "gauge", "Mean answers per decode step.", [("", snap["mean_batch_size"])])
    quantiles = {"p50": "0.5", "p90": "0.9", "p99": "0.99"}
    samples = []
    for route, q in snap["latency_s"].items():
        samples += [(f'{{route="{route}",quantile="{v}"}}', q[k]) for k, v in quantiles.items() if q[k] is not None]
    metric("request_latency_seconds", "summary", "Latency of recent API requests (whole stream).", samples)
    q = snap["time_to_first_token_s"]
    samples = [(f'{{quantile="{v}"}}', q[k]) for k, v in quantiles.items() if q[k] is not None]
    metric("time_to_first_token_seconds", "summary", "Queueing plus prefill time of recent answers.", samples)
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- the guard: auth, body size, content type, metrics


class Guard:
    """Pure ASGI middleware in front of the app: API key, body size and content type checks, and metrics (it sees a
    streamed response through to its end, so latencies cover whole streams)."""

    OPEN = ("/", "/health", "/favicon.ico")

    def __init__(self, app, *, api_key: str, max_body: int, metrics: Metrics):
        self.app, self.api_key, self.max_body, self.metrics = app, api_key.encode(), max_body, metrics

    def _needs_key(self, path: str) -> bool:
        return bool(self.api_key) and path not in self.OPEN and not path.startswith("/static/")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        path, method = scope.get("path", ""), scope.get("method", "GET")
        status = {"code": 500}

        async def send_tracked(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            if self._needs_key(path) and not self._authorized(headers.get("authorization", "")):
                return await self._reject(scope, send_tracked, 401, "missing or wrong API key: send the header "
                                          "'Authorization: Bearer <key>'", {"WWW-Authenticate": "Bearer"})  # fmt: skip
            if method in ("POST", "PUT", "PATCH"):
                body = await self._read_body(scope, receive, send_tracked, headers)
                if body is None:
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, send_tracked)
        finally:
            self.metrics.record(path, status["code"], time.perf_counter() - start)

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key)

    async def _read_body(self, scope, receive, send, headers) -> bytes | None:
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            await self._reject(scope, send, 413, f"request body too large (limit {self.max_body} bytes)")
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await self._reject(scope, send, 413, f"request body too large (limit {self.max_body} bytes)")
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if body and ctype != "application/json":
            await self._reject(scope, send, 415, "Content-Type must be application/json "
                               f"(got {ctype or 'none'})")  # fmt: skip
            return None
        return body

    @staticmethod
    async def _reject(scope, send, status: int, message: str, headers: dict | None = None) -> None:
        await _json_response(status, error_body(status, message), headers)(scope, None, send)


def _replay(body: bytes, receive):
    """A receive callable that hands the already-read body to the app, then passes on later messages (disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


# ---------------------------------------------------------------- the service: turning requests into rows


class Service:
    """What the routes share: the generator, the engine, the APM, limits and metrics."""

    def __init__(self, cfg: Config, generator, apm=None):
        from steerlm.generate import SamplingArgs

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

    def openai_sampling(self, req: _OpenAISampling, max_tokens: int):
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
                self.gen.attribute_string(req.guidance_reference)
            except UserError as e:
                raise ApiError(422, f"guidance_reference: {e}", param="guidance_reference") from None
        return self.sampling(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=top_k,
                             min_new_tokens=req.min_tokens, repetition_penalty=req.repetition_penalty, stop=stop,
                             seed=req.seed, guidance_scale=req.guidance_scale,
                             guidance_reference=req.guidance_reference)  # fmt: skip

    def neutral_ids(self, record: Record, sampling) -> list[int] | None:
        """The neutral prompt of attribute guidance, when the request asks for guidance."""
        if not self.gen.guided(sampling):
            return None
        try:
            return self.gen.neutral_ids(record, sampling)
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
                    yield _sse(error_body(500, payload))
                    break
                if kind == DONE:
                    results[index] = payload
                    self.metrics.completion_tokens += len(payload.token_ids)
                body = chunk(index, kind, payload)
                if body is not None:
                    yield _sse(body)
            else:
                for body in tail(results):  # type: ignore[arg-type]
                    yield _sse(body)
            yield "data: [DONE]\n\n"
        finally:  # also on cancellation, when the client went away
            for r in rows:
                if r.finish_reason is None:
                    r.cancel()


def _sse(body: dict) -> str:
    return "data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")) + "\n\n"


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


def _check_unsupported(req: _OpenAISampling) -> None:
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


def _usage(prompts: list[list[int]], results: list[Finished]) -> dict:
    """OpenAI's `usage`: `prompt_tokens` counts each prompt once (as OpenAI and vLLM do, whatever `n`),
    `completion_tokens` every choice's tokens."""
    prompt = sum(len(p) for p in prompts)
    completion = sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _model_name(model: str) -> str:
    path = Path(model)
    if path.exists():
        path = path.resolve()
        # runs/x/sft/best -> "sft/best" is more telling than "best"
        return f"{path.parent.name}/{path.name}" if path.name in ("best", "last", "final") else path.name
    return model


def _parse(model_cls, raw: bytes):
    if not raw:
        raise ApiError(400, "the request body is empty; send a JSON object")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(422, f"the request body must be a JSON object, not {type(data).__name__}")
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        message, param = _describe_validation(e.errors())
        raise ApiError(422, message, param=param) from None


# ---------------------------------------------------------------- the app


def create_app(cfg: Config | str, *, generator=None, apm=None):
    """The ASGI app. `cfg` may be a Config or just a model name/folder; pass an already loaded `generator` (a
    `generate.Generator`) and `apm` (from `apm_model.load_apm`) to skip loading them (tests share one model)."""
    if isinstance(cfg, str):
        cfg = Config(model=cfg)
    if generator is None:
        from steerlm.generate import Generator

        generator = Generator.load(cfg.model, dtype=cfg.dtype or None, template=config_lib.unless_auto(cfg.template))
    elif config_lib.unless_auto(cfg.template):
        generator.template = cfg.template
    if apm is None and cfg.apm:
        from steerlm.apm_model import load_apm

        apm = load_apm(cfg.apm)
    svc = Service(cfg, generator, apm)

    @asynccontextmanager
    async def lifespan(_app):
        svc.engine.start()
        try:
            yield
        finally:
            svc.engine.stop()

    app = FastAPI(title="steerlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = svc

    # ------------------------------------------------------------ errors: always {"error": {...}} JSON

    @app.exception_handler(ApiError)
    async def _api_error(_request, e: ApiError):
        return _json_response(e.status, error_body(e.status, e.message, e.param, e.code), e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, e: RequestValidationError):
        message, param = _describe_validation(list(e.errors()))
        return _json_response(422, error_body(422, message, param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        if e.status_code == 404:
            message = f"no such route: {request.method} {request.url.path}"
        elif e.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(e.detail)
        return _json_response(e.status_code, error_body(e.status_code, message), getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _server_error(_request, e: Exception):
        log.exception("request failed")
        return _json_response(500, error_body(500, f"internal error: {type(e).__name__}"))

    # ------------------------------------------------------------ info routes

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": svc.name, "queue_length": svc.engine.queue_length,
                "running": svc.engine.running}  # fmt: skip

    @app.get("/metrics")
    async def metrics(request: Request):
        snap = svc.metrics.snapshot(svc.engine)
        wants_json = request.query_params.get("format") == "json" or "application/json" in request.headers.get(
            "accept", ""
        )
        if wants_json:
            return snap
        return PlainTextResponse(prometheus(snap), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [svc.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        svc.check_model(model_id)
        return svc.model_card()

    # ------------------------------------------------------------ OpenAI chat completions

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatRequest = _parse(ChatRequest, await request.body())
        svc.check_model(req.model)
        svc.check_n(req.n)
        if req.max_tokens is not None and req.max_completion_tokens is not None:
            raise ApiError(422, "give max_tokens or max_completion_tokens, not both", param="max_tokens")
        tokens_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        requested = svc.max_tokens(req.max_completion_tokens or req.max_tokens, tokens_param)
        levels = svc.levels(req.attributes)
        record = svc.record(req.messages, levels)
        ids = svc.prompt_ids(record, levels)
        max_tokens = svc.answer_budget([ids], requested, "messages", tokens_param=tokens_param)
        base = svc.openai_sampling(req, max_tokens)
        neutral = svc.neutral_ids(record, base)
        samplings = [_with_seed(base, i) for i in range(req.n)]
        rows, events = svc.submit([ids] * req.n, samplings, templated=True, neutral=[neutral] * req.n,
                                  prompt_tokens=len(ids))  # fmt: skip
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": svc.name}
        if not req.stream:
            results = await svc.collect(request, rows, events)
            choices = [{"index": i, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                        "finish_reason": r.finish_reason} for i, r in enumerate(results)]  # fmt: skip
            return {**head, "object": "chat.completion", "choices": choices, "usage": _usage([ids], results),
                    "attributes": levels}  # fmt: skip
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        # With include_usage, every chunk carries `usage: null` and one last chunk the totals (OpenAI's order).
        no_usage = {"usage": None} if include_usage else {}

        def chunk(index: int, kind: str, payload: Any) -> dict | None:
            if kind == TEXT:
                delta, finish = {"content": payload}, None
            else:
                delta, finish = {}, payload.finish_reason
            return {**head, "object": "chat.completion.chunk", **no_usage,
                    "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}  # fmt: skip

        def tail(results: list[Finished]) -> list[dict]:
            if not include_usage:
                return []
            return [{**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage([ids], results)}]

        async def events_stream():
            # Each choice's role comes first, one choice per chunk (as OpenAI sends them), with the levels the answer
            # is steered to (extension).
            for i in range(req.n):
                yield _sse({**head, "object": "chat.completion.chunk", "attributes": levels, **no_usage,
                            "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                         "finish_reason": None}]})  # fmt: skip
            async for item in svc.stream(rows, events, chunk, tail):
                yield item

        return _sse_response(events_stream(), rows)

    # ------------------------------------------------------------ OpenAI (legacy) completions

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = _parse(CompletionRequest, await request.body())
        svc.check_model(req.model)
        texts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not texts or len(texts) > cfg.max_prompts:
            raise ApiError(422, f"prompt: give 1 to {cfg.max_prompts} prompts", param="prompt")
        svc.check_n(req.n, len(texts))
        requested = svc.max_tokens(req.max_tokens)
        # A raw prompt is continued as is. With `attributes`, each prompt is a user message instead, answered
        # through the model's template at those levels (the steered completion of one-turn prompts).
        templated = req.attributes is not None
        levels = svc.levels(req.attributes) if templated else None
        records = [Record([Turn(USER, t)], generator.system) for t in texts]
        prompts = [
            svc.prompt_ids(r, levels, "prompt") if templated else svc.raw_ids(t)
            for r, t in zip(records, texts, strict=True)
        ]
        max_tokens = svc.answer_budget(prompts, requested, "prompt")
        base = svc.openai_sampling(req, max_tokens)
        if svc.gen.guided(base) and not templated:
            raise ApiError(422, "guidance_scale: guidance needs `attributes` (a raw prompt has no attribute line)",
                           param="guidance_scale")  # fmt: skip
        neutral = [svc.neutral_ids(r, base) for r in records] if templated else [None] * len(records)
        per_row = [(p, _with_seed(base, j), q) for p, q in zip(prompts, neutral, strict=True) for j in range(req.n)]
        rows, events = svc.submit([p for p, _, _ in per_row], [s for _, s, _ in per_row], templated=templated,
                                  neutral=[q for _, _, q in per_row], prompt_tokens=sum(map(len, prompts)))  # fmt: skip
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": svc.name}
        prefix = [texts[i // req.n] if req.echo else "" for i in range(len(rows))]
        if not req.stream:
            results = await svc.collect(request, rows, events)
            choices = [{"index": i, "text": prefix[i] + r.text, "logprobs": None, "finish_reason": r.finish_reason}
                       for i, r in enumerate(results)]  # fmt: skip
            body = {**head, "choices": choices, "usage": _usage(prompts, results)}
            return {**body, "attributes": levels} if templated else body
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        no_usage = {"usage": None} if include_usage else {}
        started = set()

        def chunk(index: int, kind: str, payload: Any) -> dict | None:
            text = payload if kind == TEXT else ""
            if index not in started:
                started.add(index)
                text = prefix[index] + text
            finish = payload.finish_reason if kind == DONE else None
            if not text and finish is None:
                return None
            return {**head, **no_usage,
                    "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}  # fmt: skip

        def tail(results: list[Finished]) -> list[dict]:
            if not include_usage:
                return []
            return [{**head, "choices": [], "usage": _usage(prompts, results)}]

        return _sse_response(svc.stream(rows, events, chunk, tail), rows)

    # ------------------------------------------------------------ NeMo text-generation server

    @app.put("/generate")
    async def nemo_generate(request: Request):
        req: NemoRequest = _parse(NemoRequest, await request.body())
        if len(req.sentences) > cfg.max_prompts:
            raise ApiError(422, f"sentences: at most {cfg.max_prompts} prompts per request", param="sentences")
        if any(not s for s in req.end_strings):
            raise ApiError(422, "end_strings: must not contain empty strings", param="end_strings")
        if req.min_tokens_to_generate > req.tokens_to_generate:
            raise ApiError(422, f"min_tokens_to_generate ({req.min_tokens_to_generate}) exceeds tokens_to_generate "
                           f"({req.tokens_to_generate})", param="min_tokens_to_generate")  # fmt: skip
        svc.check_n(1, len(req.sentences))
        # NeMo's default of 64 tokens, like OpenAI's default, shrinks to the room a long prompt leaves.
        given = "tokens_to_generate" in req.model_fields_set
        requested = svc.max_tokens(req.tokens_to_generate if given else None, "tokens_to_generate")
        prompts = [svc.raw_ids(s, add_bos=req.add_BOS) for s in req.sentences]
        max_tokens = svc.answer_budget(prompts, requested, "sentences", default=req.tokens_to_generate,
                                       tokens_param="tokens_to_generate")  # fmt: skip
        if req.min_tokens_to_generate > max_tokens:
            raise ApiError(422, f"min_tokens_to_generate ({req.min_tokens_to_generate}) exceeds the {max_tokens} "
                           "tokens left for an answer", param="min_tokens_to_generate")  # fmt: skip
        # NeMo: top_p 0 means no nucleus filtering (its sampler only filters when top_p > 0).
        base = svc.sampling(max_new_tokens=max_tokens, temperature=req.temperature, greedy=req.greedy,
                            top_k=req.top_k, top_p=req.top_p if req.top_p > 0 else 1.0,
                            repetition_penalty=req.repetition_penalty, min_new_tokens=req.min_tokens_to_generate,
                            stop=list(req.end_strings), seed=req.random_seed)  # fmt: skip
        samplings = [_with_seed(base, i) for i in range(len(prompts))]
        rows, events = svc.submit(prompts, samplings, templated=False, include_stop=True)
        results = await svc.collect(request, rows, events)
        tok = svc.tokenizer
        body: dict[str, Any] = {
            "sentences": [s + r.text for s, r in zip(req.sentences, results, strict=True)],
            "tokens": [tok.convert_ids_to_tokens(p + r.token_ids) for p, r in zip(prompts, results, strict=True)],
            "token_ids": [p + r.token_ids for p, r in zip(prompts, results, strict=True)],
            "logprob": None,  # not computed (compute_logprob is accepted and ignored)
        }
        if req.all_probs:
            body["full_logprob"] = None
        return body

    # ------------------------------------------------------------ APM scoring

    @app.post("/v1/attributes/score")
    async def score(request: Request):
        if svc.apm is None:
            raise ApiError(404, "no attribute prediction model is loaded; start the server with --apm FOLDER",
                           code="no_apm")  # fmt: skip
        req: ScoreRequest = _parse(ScoreRequest, await request.body())
        if len(req.items) > cfg.max_prompts:
            raise ApiError(422, f"items: at most {cfg.max_prompts} per request", param="items")
        records = []
        for i, item in enumerate(req.items):
            if not item.response.strip():
                raise ApiError(422, f"items[{i}].response: empty response", param=f"items[{i}].response")
            record = svc.record(item.messages, None, f"items[{i}].messages")
            record.conversations.append(Turn(ASSISTANT, item.response))
            records.append(record)
        async with svc.apm_lock:  # one scoring pass at a time; it runs beside the generation thread
            preds = await asyncio.to_thread(svc.apm.predict, records, 16)
        svc.metrics.scored += len(records)
        schema = svc.apm.schema
        data = []
        for i, pred in enumerate(preds):
            scores = {n: {"value": round(float(pred[n]), 4), "level": min(schema.max_level, max(0, round(pred[n])))}
                      for n in schema.names if n in pred}  # fmt: skip
            entry: dict[str, Any] = {"index": i, "scores": scores,
                                     "label": schema.render({n: s["level"] for n, s in scores.items()}) or None}  # fmt: skip
            if not scores:
                entry["error"] = "the APM's output could not be parsed"
            data.append(entry)
        return {"object": "list", "attributes": schema.to_dict(), "data": data}

    # ------------------------------------------------------------ the playground

    if cfg.playground:
        page_headers = {
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
            "base-uri 'none'; form-action 'none'",
            "X-Frame-Options": "DENY",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        }

        @app.get("/", include_in_schema=False)
        async def page():
            return FileResponse(STATIC / "index.html", headers=page_headers)

        app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    return Guard(app, api_key=cfg.api_key, max_body=cfg.max_body_bytes, metrics=svc.metrics)


def _with_seed(s, i: int):
    """Choice i of a seeded request samples with seed + i, so n choices differ but each is reproducible."""
    return dataclasses.replace(s, seed=s.seed + i) if s.seed is not None and i else s


class _EventStream(StreamingResponse):
    """Server-sent events that cancel their rows however the response ends (the client going away included)."""

    def __init__(self, iterator, rows: list[Row]):
        super().__init__(iterator, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        self.rows = rows

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            for r in self.rows:
                if r.finish_reason is None:
                    r.cancel()


def _sse_response(iterator, rows: list[Row]) -> _EventStream:
    return _EventStream(iterator, rows)


def main(cfg: Config) -> int:
    import torch
    import uvicorn

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    app = create_app(cfg)
    svc: Service = app.app.state.service
    key = "required (Bearer)" if cfg.api_key else "off"
    print(f"steerlm serve: {svc.name} (template {svc.gen.template}, attributes "
          f"{', '.join(svc.gen.schema.names) if svc.gen.schema else 'none'}) on http://{cfg.host}:{cfg.port}/ "
          f"- API key {key}, APM {'on' if svc.apm is not None else 'off'}", flush=True)  # fmt: skip
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        print(f"steerlm serve: warning: listening on {cfg.host} without --api_key: anyone who can reach this "
              "port can use the model", file=sys.stderr, flush=True)  # fmt: skip
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, server_header=False)
    return 0

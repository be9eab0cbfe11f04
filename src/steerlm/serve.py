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

The pieces live in `steerlm/serving/` (request schemas and errors, the guard and metrics, the service that turns
requests into engine rows); this module holds the settings, the routes and `main`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from steerlm import config as config_lib
from steerlm.attributes import (
    GUIDANCE_PLAUSIBILITY,
    GUIDANCE_REFERENCE_PLAUSIBILITY,
    check_plausibility,
    parse_assignment,
)
from steerlm.batching import DONE, TEXT, Finished, Row, check_guidance_scale
from steerlm.data import templates
from steerlm.data.records import ASSISTANT, USER, Record, Turn
from steerlm.serving.guard import Guard, prometheus
from steerlm.serving.schemas import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    NemoRequest,
    ScoreRequest,
    describe_validation,
    error_body,
    json_response,
    parse,
    sse,
    usage,
)
from steerlm.serving.service import Service

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
    guidance_scale: float | None = None
    """Default attribute guidance scale of steered requests (chat, and completions with `attributes`) that set no
    `guidance_scale` (1: plain SteerLM; docs/steering.md). Unset: the guidance saved with the model (`steerlm sft
    --guidance_scale`; the quickstart's model: 2), else 1. Reported by /v1/models as `default_guidance`; the
    playground's guidance slider starts there."""
    guidance_reference: str | None = None
    """Default neutral condition of guidance for requests that set no `guidance_reference`: '', an attribute string
    or 'middle' (`SamplingArgs.guidance_reference`). Unset: the model's saved one (the quickstart's: 'middle'), else
    ''."""
    guidance_plausibility: float = GUIDANCE_PLAUSIBILITY
    """Default plausibility constraint of guided requests that set none: tokens under this share of the requested
    condition's top token's probability are not sampled (`SamplingArgs.guidance_plausibility`; 0: off)."""
    guidance_reference_plausibility: float = GUIDANCE_REFERENCE_PLAUSIBILITY
    """The same under the neutral condition (`SamplingArgs.guidance_reference_plausibility`; 0: off)."""
    system: str | None = None
    """Default system prompt when a chat request has none (default: NeMo's SteerLM system prompt)."""
    template: str = "auto"
    """Template style: 'nemo', 'chat', or 'auto' (the model's steerlm_model.json, else 'chat')."""
    dtype: str = "fp32"
    """Model dtype: 'fp32', 'bf16', 'fp16' or 'auto' (the checkpoint's own)."""
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
        self.dtype = config_lib.dtype_choice(self.dtype)
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
        if self.guidance_scale is not None:
            check_guidance_scale(self.guidance_scale)
        check_plausibility(guidance_plausibility=self.guidance_plausibility,
                           guidance_reference_plausibility=self.guidance_reference_plausibility)  # fmt: skip


# ---------------------------------------------------------------- the app


def create_app(cfg: Config | str, *, generator=None, apm=None):
    """The ASGI app. `cfg` may be a Config or just a model name/folder; pass an already loaded `generator` (a
    `generate.Generator`) and `apm` (from `apm_model.load_apm`) to skip loading them (tests share one model)."""
    if isinstance(cfg, str):
        cfg = Config(model=cfg)
    if generator is None:
        from steerlm.generator import Generator

        generator = Generator.load(cfg.model, dtype=cfg.dtype, template=config_lib.unless_auto(cfg.template))
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
        return json_response(e.status, error_body(e.status, e.message, e.param, e.code), e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, e: RequestValidationError):
        message, param = describe_validation(list(e.errors()))
        return json_response(422, error_body(422, message, param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        if e.status_code == 404:
            message = f"no such route: {request.method} {request.url.path}"
        elif e.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(e.detail)
        return json_response(e.status_code, error_body(e.status_code, message), getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _server_error(_request, e: Exception):
        log.exception("request failed")
        return json_response(500, error_body(500, f"internal error: {type(e).__name__}"))

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
        req: ChatRequest = parse(ChatRequest, await request.body())
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
        neutral = svc.neutral_ids(record, base, req.attributes)
        samplings = [_with_seed(base, i) for i in range(req.n)]
        rows, events = svc.submit([ids] * req.n, samplings, templated=True, neutral=[neutral] * req.n,
                                  prompt_tokens=len(ids))  # fmt: skip
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": svc.name}
        if not req.stream:
            results = await svc.collect(request, rows, events)
            choices = [{"index": i, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                        "finish_reason": r.finish_reason} for i, r in enumerate(results)]  # fmt: skip
            return {**head, "object": "chat.completion", "choices": choices, "usage": usage([ids], results),
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
            return [{**head, "object": "chat.completion.chunk", "choices": [], "usage": usage([ids], results)}]

        async def events_stream():
            # Each choice's role comes first, one choice per chunk (as OpenAI sends them), with the levels the answer
            # is steered to (extension).
            for i in range(req.n):
                yield sse({**head, "object": "chat.completion.chunk", "attributes": levels, **no_usage,
                            "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                         "finish_reason": None}]})  # fmt: skip
            async for item in svc.stream(rows, events, chunk, tail):
                yield item

        return _sse_response(events_stream(), rows)

    # ------------------------------------------------------------ OpenAI (legacy) completions

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = parse(CompletionRequest, await request.body())
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
        base = svc.openai_sampling(req, max_tokens, steered=templated)
        if svc.gen.guided(base) and not templated:
            raise ApiError(422, "guidance_scale: guidance needs `attributes` (a raw prompt has no attribute line)",
                           param="guidance_scale")  # fmt: skip
        neutral = [svc.neutral_ids(r, base, req.attributes) for r in records] if templated else [None] * len(records)
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
            body = {**head, "choices": choices, "usage": usage(prompts, results)}
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
            return [{**head, "choices": [], "usage": usage(prompts, results)}]

        return _sse_response(svc.stream(rows, events, chunk, tail), rows)

    # ------------------------------------------------------------ NeMo text-generation server

    @app.put("/generate")
    async def nemo_generate(request: Request):
        req: NemoRequest = parse(NemoRequest, await request.body())
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
        req: ScoreRequest = parse(ScoreRequest, await request.body())
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

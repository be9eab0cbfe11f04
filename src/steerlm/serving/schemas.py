"""The wire format of `steerlm serve` (SPEC §7): the request bodies of its OpenAI and NeMo routes (pydantic models
that mirror those APIs' fields, defaults and ranges), the errors it answers with (OpenAI's `{"error": {...}}` shape)
and the small pieces of responses the routes share (server-sent events, `usage`)."""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from steerlm.batching import MAX_GUIDANCE_SCALE, Finished

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


def json_response(status: int, body: Any, headers: dict[str, str] | None = None):
    """`body` as a JSON response with HTTP `status` (an ASGI app: the routes return it, the guard calls it)."""
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


def describe_validation(errors: list[dict]) -> tuple[str, str | None]:
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


class OpenAISampling(_Strict):
    """The fields both OpenAI routes take (chat and legacy completions): model, token budget, sampling, steering."""

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
    guidance_scale: float | None = Field(None, ge=0, le=MAX_GUIDANCE_SCALE)
    """steerlm extension: attribute guidance scale (1: plain SteerLM; > 1 amplifies the requested attributes at about
    twice the compute; see generate.SamplingArgs)."""
    guidance_reference: str | None = None
    """steerlm extension: the neutral condition of guidance ('' : no attribute line, an attribute string, or 'middle':
    the requested attributes at their middle level; see generate.SamplingArgs)."""
    guidance_plausibility: float | None = Field(None, ge=0, lt=1)
    """steerlm extension: guided steps sample only tokens at least this share of the requested condition's top
    token's probability (0: off; see generator.SamplingArgs)."""
    guidance_reference_plausibility: float | None = Field(None, ge=0, lt=1)
    """steerlm extension: the same under the neutral condition (0: off; see generator.SamplingArgs)."""
    user: str | None = None
    # Accepted for compatibility; only their neutral values are supported (checked in service._check_unsupported).
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


class ChatRequest(OpenAISampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(OpenAISampling):
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


# ---------------------------------------------------------------- request parsing and response pieces


def parse(model_cls, raw: bytes):
    """A request body validated into `model_cls`; ApiError 400 (empty, not JSON) or 422 (not an object, invalid
    fields: the message names each one, `param` the first)."""
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
        message, param = describe_validation(e.errors())
        raise ApiError(422, message, param=param) from None


def sse(body: dict) -> str:
    """One server-sent event carrying `body` as compact JSON."""
    return "data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")) + "\n\n"


def usage(prompts: list[list[int]], results: list[Finished]) -> dict:
    """OpenAI's `usage`: `prompt_tokens` counts each prompt once (as OpenAI and vLLM do, whatever `n`),
    `completion_tokens` every choice's tokens."""
    prompt = sum(len(p) for p in prompts)
    completion = sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

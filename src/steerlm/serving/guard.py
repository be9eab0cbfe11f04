"""What stands in front of `steerlm serve`'s routes: `Guard` (API key, body size and content type, per-request
metrics) and `Metrics` with its Prometheus text for GET /metrics."""

from __future__ import annotations

import hmac
import math
import time
from collections import defaultdict, deque

from steerlm.batching import Engine
from steerlm.serving.schemas import error_body, json_response

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
        await json_response(status, error_body(status, message), headers)(scope, None, send)


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

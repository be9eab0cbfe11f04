"""The one decoding engine: every answer steerlm generates is decoded by `Engine`, the CLI's `generate` and `chat`,
bootstrap, evaluation and PPO rollouts (through `generator.Generator`, which runs `Engine.decode` on the calling
thread) as well as `steerlm serve` (a background thread with continuous batching).

Each answer to produce is a `Row`: prompt token ids, sampling settings (`generator.SamplingArgs`) and a `sink` that
receives its text as it is generated. Rows are prefilled left-padded in one forward pass and decoded together, one
token per row per step, with a KV cache. Between steps, rows that finished (an end token, a stop string, their token
budget) or were cancelled (the client went away) leave the batch, and their KV-cache rows are dropped, so they cost
nothing more.

`Engine.decode(rows, max_batch_size)` runs those steps for a set of rows to the end on the calling thread (Generator's
calls), refilling the batch from the rest of the set as rows finish.
`Engine.start()` runs them on a worker thread for the server: rows wait in a bounded queue; the worker takes up to
`max_batch_size` of them (waiting `batch_wait_s` for a batch to fill), and waiting rows join the running batch
between steps (their prefill is merged into the cache, left-padded to a common length), so a short request does not
wait for a long one to finish.

Every sampling setting (greedy, temperature, top-k, top-p, repetition penalty, seed, stop strings, minimum and
maximum length, attribute guidance) is applied per row, so any requests can share a batch. A row with attribute
guidance (`SamplingArgs.guidance_scale` != 1, `Row.guide`) brings a shadow row with its neutral prompt: both decode
in the same batch, the row samples from the mixed logits (`guide`) and the shadow is fed the same token. The next
token is chosen by `next_tokens` (Hugging Face's logits processors, in their order: repetition penalty, temperature,
top-k, top-p); each row samples from its own `torch.Generator` (seeded: the same answer whatever it is batched with,
up to floating-point differences of padded batches) or shares one with the rows of its call (Generator's batches).
Positions are given explicitly per row, so left padding never shifts a row's positions.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from steerlm.data import templates
from steerlm.data.collate import supports_logits_to_keep

log = logging.getLogger("steerlm.serve")

#: Kinds of events a row's sink receives: ("text", str delta), ("done", Finished), ("error", message).
TEXT, DONE, ERROR = "text", "done", "error"
#: The largest attribute guidance scale accepted anywhere (SamplingArgs, `steerlm serve`, a request): far above what
#: helps (docs/steering.md measured 1-3), a bound on a request's logits rather than a recommendation.
MAX_GUIDANCE_SCALE = 100.0


def check_guidance_scale(scale: float) -> None:
    """The one check of a configured guidance scale (SamplingArgs, `steerlm serve`): ValueError outside
    [0, MAX_GUIDANCE_SCALE]. A request's schema bounds it with the same constant."""
    if not 0 <= scale <= MAX_GUIDANCE_SCALE:
        raise ValueError(f"guidance_scale must be in [0, {MAX_GUIDANCE_SCALE:g}], not {scale}")


class QueueFull(Exception):
    """The queue cannot take the rows of a request now (the caller answers 429 and the client retries)."""


@dataclass
class Finished:
    """What a row produced when it ended."""

    text: str
    """The answer (stop strings removed, or kept for NeMo-style `include_stop` rows)."""
    token_ids: list[int]
    """Generated token ids (the end-of-sequence token excluded)."""
    finish_reason: str
    """'stop' (end of sequence or a stop string) or 'length' (token budget reached)."""


def _ignore(_kind: str, _payload: Any) -> None:
    pass


@dataclass(eq=False)
class Row:
    """One answer to generate. The sink is called from the decoding thread (the server's worker: it must be quick and
    thread-safe)."""

    prompt_ids: list[int]
    sampling: Any
    """A `generator.SamplingArgs`."""
    sink: Callable[[str, Any], None] = _ignore
    include_stop: bool = False
    """Keep the stop string that ended the answer in its text (NeMo's /generate does)."""
    strip_newline: bool = False
    """Drop one newline at the end of the answer (the newline before a chat template's end-of-turn, SPEC §3)."""
    cancelled: bool = False
    """Set (from any thread) when nobody waits for this row any more; the worker drops it at the next step."""
    shadow: Row | None = field(default=None, repr=False)
    """The neutral-prompt row of attribute guidance (decoded beside this one, never reported)."""
    main: Row | None = field(default=None, repr=False)
    """For a shadow row: the row it belongs to."""
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    finish_reason: str | None = None
    enqueued_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    generator: torch.Generator | None = None
    """What the row samples from (default: one of its own, seeded with `sampling.seed`, else at random)."""
    _checked: int = 0
    _head: str | None = None  # the text of the prompt tokens `_detokenize` decodes in front of the answer

    @property
    def active(self) -> bool:
        owner = self.main or self
        return owner.finish_reason is None and not owner.cancelled

    def cancel(self) -> None:
        self.cancelled = True

    def guide(self, neutral_ids: list[int]) -> Row:
        """Decode with attribute guidance against `neutral_ids` (at `sampling.guidance_scale`); returns self. A neutral
        prompt equal to this row's (guidance_reference 'middle' with nothing named) changes no logit, so it gets no
        shadow row."""
        if neutral_ids != self.prompt_ids:
            self.shadow = Row(neutral_ids, self.sampling, main=self)
        return self


@dataclass
class Stats:
    """Counters the server's /metrics reports (updated by the worker thread only)."""

    batches: int = 0
    """Forward passes over a batch (prefills and decode steps)."""
    decode_steps: int = 0
    rows_in_steps: int = 0
    """Sum of batch sizes over decode steps (mean batch size = rows_in_steps / decode_steps)."""
    max_batch: int = 0
    rows_started: int = 0
    rows_finished: int = 0
    rows_cancelled: int = 0
    rows_failed: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft: deque = field(default_factory=lambda: deque(maxlen=2048))
    """Seconds from enqueueing to the first generated token, for recent rows."""


class Engine:
    """Decodes rows: `decode` them on the calling thread, or `start` the worker thread and `submit` rows from any
    thread. `eos_ids`: the tokens that end an answer (default: `end_ids`)."""

    def __init__(self, model, tokenizer, *, max_batch_size: int = 16, max_queue: int = 256,
                 batch_wait_s: float = 0.01, eos_ids: Sequence[int] | None = None):  # fmt: skip
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_queue, self.batch_wait_s = max_batch_size, max_queue, batch_wait_s
        self.eos_ids = sorted(set(eos_ids)) if eos_ids is not None else end_ids(model, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = pad if pad is not None else (self.eos_ids or [0])[0]
        self.device = next(model.parameters()).device
        self.stats = Stats()
        self._waiting: deque[Row] = deque()
        self._running = 0
        self._batch: _Batch | None = None
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # logits for the last position only: no (batch, length, vocab) tensor at prefill
        self._keep_logits = supports_logits_to_keep(model)

    # ------------------------------------------------------------ public API (any thread)

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="steerlm-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        running = self._batch.rows if self._batch is not None else []
        for row in running + self._drain():
            if row.main is None and row.finish_reason is None:
                row.sink(ERROR, "the server is shutting down")

    def submit(self, rows: Sequence[Row]) -> None:
        """Queue the rows of one request together, or raise QueueFull without queueing any of them."""
        with self._cond:
            self._waiting = deque(r for r in self._waiting if not r.cancelled)
            if len(self._waiting) + len(rows) > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} answers are waiting (the limit is {self.max_queue})")
            if self._stopping:
                raise QueueFull("the server is shutting down")
            now = time.perf_counter()
            for r in rows:
                r.enqueued_at = now
            self._waiting.extend(rows)
            self._cond.notify_all()

    @property
    def queue_length(self) -> int:
        return sum(1 for r in list(self._waiting) if not r.cancelled)

    @property
    def running(self) -> int:
        return self._running

    def decode(self, rows: Sequence[Row], max_batch_size: int | None = None) -> Iterator[None]:
        """Decode `rows` (with the shadows of guided ones) to their end on the calling thread, yielding after every
        step (each row's sink has had its text of the step by then): the worker's steps without its queue, for
        `generator.Generator`. At most `max_batch_size` answers (shadows not counted; default: all) decode at once,
        taken in order; as answers finish, the next ones join the running batch between steps (their prefill
        merged into the cache, as the worker's waiting rows do), so a few long answers never leave the rest waiting
        for a new batch. Errors propagate. Not while the worker thread runs (it owns the model then)."""
        if self._thread is not None:
            raise RuntimeError("Engine.decode runs on the calling thread; this engine's worker thread is running")
        pending, limit = deque(rows), max(1, max_batch_size or len(rows))

        def take(n: int) -> list[Row]:
            taken: list[Row] = []
            for _ in range(min(n, len(pending))):
                row = pending.popleft()
                taken += [row] if row.shadow is None else [row, row.shadow]
            return taken

        batch: _Batch | None = None
        while batch is not None or pending:
            with torch.inference_mode():  # (per step: the caller's code between steps runs in its own mode)
                if batch is None:
                    batch = self._prefill(take(limit))
                elif pending and len(batch.mains) < limit and batch.mergeable:
                    batch = _merge(batch, self._prefill(take(limit - len(batch.mains))))
                batch = self._step(batch)
            yield

    # ------------------------------------------------------------ the worker

    def _drain(self) -> list[Row]:
        with self._cond:
            rows, self._waiting = list(self._waiting), deque()
        return rows

    def _take(self, limit: int, block: bool) -> list[Row]:
        """Up to `limit` waiting rows. Blocking (the batch is empty): wait for one, then up to `batch_wait_s` for
        more so that requests arriving together share the prefill."""
        with self._cond:
            if block:
                while not self._stopping and not any(r.active for r in self._waiting):
                    self._cond.wait(timeout=1.0)
                deadline = time.monotonic() + self.batch_wait_s
                while not self._stopping and len(self._waiting) < limit:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(timeout=left)
            taken: list[Row] = []
            while self._waiting and len(taken) < limit:
                row = self._waiting[0]
                need = 2 if row.shadow is not None else 1
                if taken and len(taken) + need > limit:
                    break
                self._waiting.popleft()
                if row.cancelled:
                    self.stats.rows_cancelled += 1
                    continue
                taken.append(row)
                if row.shadow is not None:
                    taken.append(row.shadow)
            return taken

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        batch: _Batch | None = None
        while not self._stopping:
            new: list[Row] = []
            try:
                if batch is None:
                    new = self._take(self.max_batch_size, block=True)
                    if not new:
                        continue
                    batch = self._prefill(new)
                elif batch.mergeable and self._waiting and len(batch.rows) < self.max_batch_size:
                    new = self._take(self.max_batch_size - len(batch.rows), block=False)
                    if new:
                        batch = _merge(batch, self._prefill(new))
                new = []
                self._batch, self._running = batch, len(batch.rows)
                batch = self._step(batch)
            except Exception as e:  # a bug or resource error: fail these requests, keep serving others
                log.exception("generation failed")
                for row in (batch.rows if batch is not None else []) + new:
                    if row.main is None:
                        self.stats.rows_failed += 1
                        row.finish_reason = "error"
                        row.sink(ERROR, f"generation failed: {type(e).__name__}: {e}")
                batch = None
            if batch is None:
                self._batch, self._running = None, 0

    def _forward(self, **kwargs):
        if self._keep_logits:
            kwargs["logits_to_keep"] = 1
        with torch.inference_mode():
            out = self.model(use_cache=True, **kwargs)
        self.stats.batches += 1
        return out.logits[:, -1, :].float(), out.past_key_values

    def _prefill(self, rows: list[Row]) -> _Batch:
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[i, width - len(r.prompt_ids) :] = 1
            if r.main is None:
                self.stats.rows_started += 1
                self.stats.prompt_tokens += len(r.prompt_ids)
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self._forward(input_ids=ids, attention_mask=mask, position_ids=positions)
        return _Batch(list(rows), cache, mask, mask.sum(-1), logits)

    def _step(self, batch: _Batch) -> _Batch | None:
        """Sample one token for every row, hand out text, drop finished rows, run the next forward pass."""
        rows, mains = batch.rows, batch.mains
        if batch.mix is None:
            next_ids = sample(batch.logits, rows, self.eos_ids)
        else:  # a guided row samples from the mix of its and its shadow's logits, and its shadow is fed its token
            m, partner, m_at, partner_at, scales, alphas, guided = batch.mix
            requested = batch.logits.index_select(0, m_at)
            mixed = guide(requested, batch.logits.index_select(0, partner_at), scales, *alphas)
            if guided is not None:  # unguided rows keep their own logits
                mixed = torch.where(guided, mixed, requested)
            chosen = sample(mixed, [rows[i] for i in mains], self.eos_ids)
            next_ids = (
                torch.empty(len(rows), dtype=torch.long).index_copy_(0, m, chosen).index_copy_(0, partner, chosen)
            )
        now, chosen = time.perf_counter(), next_ids.tolist()
        for i in mains:
            row = rows[i]
            if row.cancelled:
                continue
            if row.first_token_at is None:
                row.first_token_at = now
                self.stats.ttft.append(now - row.enqueued_at)
            self._advance(row, chosen[i])
        # One snapshot decides who leaves: a client may cancel from another thread at any moment, and a row that
        # leaves unfinished because of it is counted exactly once, here.
        active = [r.active for r in rows]
        self.stats.rows_cancelled += sum(
            1 for r, a in zip(rows, active, strict=True) if r.main is None and not a and r.finish_reason is None
        )
        keep = [i for i, a in enumerate(active) if a]
        if not keep:
            return None
        if len(keep) < len(rows):
            batch = batch.select(keep)
            next_ids = next_ids[keep]
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.rows), 1))], dim=1)
        self.stats.decode_steps += 1
        self.stats.rows_in_steps += len(batch.rows)
        self.stats.max_batch = max(self.stats.max_batch, len(batch.rows))
        batch.logits, batch.cache = self._forward(
            input_ids=next_ids[:, None].to(self.device),
            attention_mask=batch.mask,
            position_ids=batch.positions[:, None],
            past_key_values=batch.cache,
        )
        batch.positions = batch.positions + 1
        return batch

    def _advance(self, row: Row, token: int) -> None:
        """Append one token to a row, detect its end, and send the text that is certain by now."""
        s = row.sampling
        self.stats.generated_tokens += 1
        if token in self.eos_ids and len(row.tokens) >= s.min_new_tokens:
            self._finish(row, row.text, "stop")
            return
        row.tokens.append(token)
        row.text = self._detokenize(row)
        if s.stop:
            # Stop strings count once min_new_tokens tokens are out, and must end after those tokens' text.
            hit = templates.find_stop(row.text, s.stop, row._checked) if len(row.tokens) > s.min_new_tokens else None
            if hit is not None:
                at, stop = hit
                self._finish(row, row.text[: at + (len(stop) if row.include_stop else 0)], "stop")
                return
            # a later stop string must end in text not checked yet (a character still being decoded is not)
            row._checked = len(row.text.rstrip("\ufffd"))
        if len(row.tokens) >= s.max_new_tokens:
            self._finish(row, row.text, "length")
            return
        safe = _safe_length(row.text, s.stop, row.strip_newline)
        if safe > row.sent:
            row.sink(TEXT, row.text[row.sent : safe])
            row.sent = safe

    def _finish(self, row: Row, text: str, reason: str) -> None:
        if row.strip_newline and text.endswith("\n"):
            text = text[:-1]
        if len(text) > row.sent and text.startswith(row.text[: row.sent]):
            row.sink(TEXT, text[row.sent :])
        row.text, row.sent, row.finish_reason = text, len(text), reason
        self.stats.rows_finished += 1
        row.sink(DONE, Finished(text, list(row.tokens), reason))

    def _detokenize(self, row: Row) -> str:
        # Decode with a few prompt tokens in front and cut their text off: SentencePiece tokenizers drop the leading
        # space of a sequence's first token, so decoding the new tokens alone could lose it.
        context = row.prompt_ids[-4:]
        decode = self._decode_text
        if row._head is None:
            row._head = decode(context) if context else ""
        full = decode(context + row.tokens)
        return full[len(row._head) :] if full.startswith(row._head) else decode(row.tokens)

    def _decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


@dataclass
class _Batch:
    rows: list[Row]
    cache: Any
    mask: torch.Tensor
    """Attention mask over cached positions plus the next one, [B, L]; 0 on left padding."""
    positions: torch.Tensor
    """Position id of each row's next token (its count of real tokens so far)."""
    logits: torch.Tensor
    """Next-token logits of each row, [B, V], float32."""

    @property
    def mergeable(self) -> bool:
        return _plain_layers(self.cache) is not None

    @cached_property
    def mains(self) -> list[int]:
        """Positions of the rows that sample: all but the shadows of guided rows."""
        return [i for i, r in enumerate(self.rows) if r.main is None]

    @cached_property
    def mix(self) -> tuple[torch.Tensor, ...] | None:
        """None when no row is guided; else, per row of `mains`: its position and its partner's (its shadow, or
        itself when unguided), on the CPU and on the logits' device; its guidance scale, (rows, 1); its two
        plausibilities (each (rows, 1), or 0.0 when no row sets it); and whether it is guided, (rows, 1; None when
        all are). Computed once per batch (rows change only by `select` and `_merge`, which make new batches), as
        index tensors: indexing with Python lists costs as much as a tiny model's step."""
        if len(self.mains) == len(self.rows):
            return None
        where = {id(r): i for i, r in enumerate(self.rows)}
        shadows = [self.rows[i].shadow for i in self.mains]
        m = torch.tensor(self.mains)
        partner = torch.tensor([i if s is None else where[id(s)] for i, s in zip(self.mains, shadows, strict=True)])
        dev = self.logits.device
        samplings = [self.rows[i].sampling for i in self.mains]
        scales = [s.guidance_scale for s in samplings]
        alphas = tuple(
            torch.tensor(a, device=dev)[:, None] if any(a) else 0.0
            for a in (
                [s.guidance_plausibility for s in samplings],
                [s.guidance_reference_plausibility for s in samplings],
            )
        )
        guided = (
            None
            if all(s is not None for s in shadows)
            else torch.tensor([s is not None for s in shadows], device=dev)[:, None]
        )
        return m, partner, m.to(dev), partner.to(dev), torch.tensor(scales, device=dev)[:, None], alphas, guided

    def select(self, keep: list[int]) -> _Batch:
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        return _Batch([self.rows[i] for i in keep], self.cache, self.mask[index], self.positions[index],
                      self.logits[index])  # fmt: skip


def _plain_layers(cache):
    """The cache's layers when every one is a plain `DynamicLayer` (tensors [B, H, L, D]) that may be re-padded and
    concatenated; None for other caches (sliding windows, quantised, ...), which then do not accept joining rows."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # pragma: no cover - older transformers
        return None
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer or not layer.is_initialized for layer in layers):
        return None
    return layers


def _left_pad(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _merge(a: _Batch, b: _Batch) -> _Batch:
    """One batch of both: caches and masks left-padded to the longer length (padding is masked out; each row's
    keys were rotated at its own positions, so where they sit in the tensor does not matter)."""
    la, lb = _plain_layers(a.cache), _plain_layers(b.cache)
    if la is None or lb is None or len(la) != len(lb):
        raise RuntimeError("cannot merge these KV caches")
    width = max(a.mask.shape[1], b.mask.shape[1])
    for x, y in zip(la, lb, strict=True):
        x.keys = torch.cat([_left_pad(x.keys, width, 2), _left_pad(y.keys, width, 2)], dim=0)
        x.values = torch.cat([_left_pad(x.values, width, 2), _left_pad(y.values, width, 2)], dim=0)
    mask = torch.cat([_left_pad(a.mask, width, 1), _left_pad(b.mask, width, 1)], dim=0)
    return _Batch(
        a.rows + b.rows, a.cache, mask, torch.cat([a.positions, b.positions]), torch.cat([a.logits, b.logits])
    )


# ---------------------------------------------------------------- the next-token choice

#: Candidate tokens taken per filtered row before top-k/top-p (see `next_tokens`).
_CANDIDATES = 256


def next_tokens(logits: torch.Tensor, samplings: Sequence[Any], generators: Sequence[torch.Generator | None],
                *, seen: tuple[torch.Tensor, torch.Tensor] | None = None, lengths: Sequence[int] | None = None,
                end_ids: Sequence[int] = ()) -> torch.Tensor:  # fmt: skip
    """The next token of every row of `logits` (rows, vocab), each row with its own settings (`generator.SamplingArgs`)
    and generator: the one definition of the next-token choice (`Engine` calls it through `sample`).

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


def _draw(logits: torch.Tensor, samplings: Sequence[Any],
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


def guide(
    requested: torch.Tensor,
    neutral: torch.Tensor,
    scale: float | torch.Tensor,
    plausibility: float | torch.Tensor = 0.0,
    reference_plausibility: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """Attribute guidance, classifier-free-guidance style (Ho & Salimans 2022; for LMs Sanchez et al. 2023), on the raw
    logits (rows, vocab) of a step: l(neutral) + s * (l(requested) - l(neutral)). A per-row constant shift of either
    side does not change the softmax, so logits and log-probabilities give the same distribution; sampling settings
    (repetition penalty, temperature, top-k/p) are applied to the mixed logits. `scale`: a number, or (rows, 1).

    The mix favours tokens far likelier under the request than under the reference however unlikely they are under
    both, and a small model's rare tokens (an echo of the attribute line, a fragment) are where those ratios are
    largest (docs/steering.md). So a token stays only when its probability is at least `plausibility` times the top
    token's under the requested condition (the adaptive plausibility constraint of contrastive decoding, Li et al.
    2023 §3.2) and at least `reference_plausibility` times the top token's under the neutral one; where no token
    passes both, the requested condition's test alone decides. Each: a number in [0, 1) or (rows, 1); 0 keeps every
    token."""
    mixed = neutral + scale * (requested - neutral)
    if not any(torch.is_tensor(a) or a > 0 for a in (plausibility, reference_plausibility)):
        return mixed

    def implausible(logits: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
        logp = logits.float().log_softmax(-1)  # log 0 = -inf: nothing is cut
        return logp < logp.max(-1, keepdim=True).values + torch.as_tensor(alpha, device=logp.device).log()

    own = implausible(requested, plausibility)
    both = own | implausible(neutral, reference_plausibility)
    return mixed.masked_fill(torch.where(both.all(-1, keepdim=True), own, both), float("-inf"))


def sample(logits: torch.Tensor, rows: Sequence[Row], eos_ids: Sequence[int]) -> torch.Tensor:
    """One next token per row, each row with its own settings and generator (`Row.generator`): `next_tokens`, given
    each row's seen tokens (prompt and answer so far, for the repetition penalty) and answer length (end-of-sequence
    tokens cannot be chosen before `min_new_tokens`)."""
    seen = None
    penalised = [i for i, r in enumerate(rows) if r.sampling.repetition_penalty != 1.0]
    if penalised:
        which, tokens = [], []
        for i in penalised:
            ids = [t for t in set(rows[i].prompt_ids) | set(rows[i].tokens) if t < logits.shape[1]]
            which += [i] * len(ids)
            tokens += ids
        seen = (torch.tensor(which, device=logits.device), torch.tensor(tokens, device=logits.device))
    generators = [None if r.sampling.is_greedy else _generator(r, logits.device) for r in rows]
    return next_tokens(logits, [r.sampling for r in rows], generators, seen=seen,
                       lengths=[len(r.tokens) for r in rows], end_ids=eos_ids)  # fmt: skip


def _generator(row: Row, device: torch.device) -> torch.Generator:
    if row.generator is None:
        seed = row.sampling.seed
        row.generator = torch.Generator(device=device)
        row.generator.manual_seed(int(seed) if seed is not None else secrets.randbits(63))
    return row.generator


# ---------------------------------------------------------------- text helpers


def _safe_length(text: str, stops: Sequence[str], strip_newline: bool) -> int:
    """How much of `text` can be sent now: hold back an incomplete UTF-8 character, a tail that may be the start of
    a stop string, and (chat answers) a final newline that may turn out to precede the end of the turn."""
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for stop in stops:  # the longest tail that starts the stop string: scan where its first character occurs
        at = text.find(stop[0], max(0, end - len(stop) + 1), end)
        while at >= 0 and end - at > hold:
            if stop.startswith(text[at:end]):
                hold = end - at
                break
            at = text.find(stop[0], at + 1, end)
    end -= hold
    if strip_newline and end > 0 and text[end - 1] == "\n":
        end -= 1
    return end


def end_ids(model, tokenizer) -> list[int]:
    """The tokens that end an answer: every special token (EOS, a chat template's turn markers, <|endoftext|>, and
    NeMo's <extra_id_1> where it is a special token of the vocabulary) and the model's generation-config EOS ids."""
    ends = set(tokenizer.all_special_ids)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ends |= set(eos if isinstance(eos, (list, tuple)) else [eos])
    return sorted(int(i) for i in ends if i is not None)

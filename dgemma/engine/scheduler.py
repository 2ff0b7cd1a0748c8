"""Continuous batching for the server: concurrent requests denoise together in one batch.

One engine thread owns the model. Requests join and leave the batch at canvas boundaries; each keeps its own knobs
(max_new_tokens, steps, temperatures, entropy bound, stop thresholds, seed) and its own stop state, and a row whose
canvas stopped early is frozen until the slowest row of the batch stops. Events go to each request's `sink`:

    submit ─▶ queue ─▶ admit into a free cache row (reuse a cached prefix, prefill the rest)
              every canvas: denoise all busy rows together       ─▶ Draft per row and step (if asked)
                            commit each row's argmax canvas      ─▶ Committed
                            rows that ended leave                ─▶ Finished | Failed
                            the others' canvases are encoded into their cache rows

Notable choices:
- One KV cache of `max_batch` rows × `max_model_len` positions, allocated at construction. Every row has its own
  positions 0..len-1 (no left padding): the static passes mask by slot positions, `KVCache.write` places each row by
  its own positions. Busy rows are kept in rows 0..n-1 (a leaving row is swapped to the back), so the step runs on
  a prefix of the cache and a graph captured per batch bucket (1, 2, 4, ...) serves every mix of requests.
- The step is `fast.BatchStepper`: CUDA graphs on CUDA in bf16/fp16 (`fast=None`), the same code eagerly otherwise.
  A request's random draws never depend on what else is in the batch. On CPU (and fp32 on CUDA) it draws from its
  own generator seeded with its seed, only while it denoises, and produces the tokens of `generate(model, [ids],
  params, generator=Generator().manual_seed(seed))` at batch 1 whatever else is in the batch. On CUDA in bf16/fp16
  with the Triton sampler it draws from that generator exactly what that `generate` draws (canvas, Philox key,
  replacement tokens; the step passes the rows still denoising), so its tokens are `generate`'s as long as the
  logits round alike (not guaranteed: `generate` folds each commit into the next step and sizes its cache to the
  request, and other buckets run other GEMM shapes); next to other batch mates in the same bucket they are the same.
  With DGEMMA_TRITON=0 the captured torch draws come from per-row generators reseeded per canvas from (seed, canvas
  index): independent of the batch, but not `generate`'s stream.
- Prefix reuse: a finished row keeps its cache (its prompt and every canvas that was encoded). A new request takes
  the free row sharing the longest prefix with its prompt and encodes only the rest (`cached_prompt_tokens`). A
  sliding-window ring cannot be rolled back past positions it overwrote, so reuse happens only when exact
  (`KVCache.rollback_ok`): the shared prefix covers the row's whole cache, or the ring never wrapped.
- The static step attends over every slot of a row (masked), so max_model_len costs step time: at the real shape in
  bf16 on an H200, one row, 41.8 ms per step at max_model_len 1280 and 45.4 ms at 8192 (generate's step: ~43 ms).
- A new request's prompt is prefilled in its own row between canvases (the batch waits meanwhile).
- Cancelling a running request freezes its row at the next step boundary and sends Finished("cancelled"); the row
  is freed at the canvas boundary.
- An exception inside the engine fails the requests it concerns (Failed) and the thread keeps serving.
"""

from __future__ import annotations

import collections
import logging
import math
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dgemma.config import DiffusionParams
from dgemma.engine.cache import KVCache
from dgemma.engine.fast import BatchStepper, RowSpec

log = logging.getLogger(__name__)
LATENCY_WINDOW = 1024  # recent step/canvas latencies kept for metrics()


@dataclass
class Draft:
    request_id: str
    canvas: int  # 0-based canvas index of this request
    step: int  # 1-based denoising step within the canvas
    tokens: list[int]  # the row's argmax draft canvas after this step (C ids)


@dataclass
class Committed:
    request_id: str
    canvas: int
    tokens: list[int]  # new tokens of this canvas: cut after the first EOS (EOS included) and at max_new_tokens
    steps: int  # denoising steps this row ran in the canvas


@dataclass
class Finished:
    request_id: str
    token_ids: list[int]  # every generated token, up to and including the first EOS
    finish_reason: str  # "stop" (EOS) | "length" (max_new_tokens) | "cancelled"
    usage: dict  # prompt_tokens, completion_tokens, cached_prompt_tokens, canvases, steps, steps_per_canvas,
    # tokens_per_forward, queue_s, ttft_s (submit → first Committed; None if none), total_s


@dataclass
class Failed:
    request_id: str
    message: str


@dataclass(eq=False)
class _Request:
    id: str
    prompt: list[int]
    params: DiffusionParams
    sink: Callable[[object], None]
    drafts: bool
    seed: int
    generator: torch.Generator | None
    submitted: float
    admitted: float | None = None
    first_commit: float | None = None
    tokens: list[int] = field(default_factory=list)
    steps_per_canvas: list[int] = field(default_factory=list)
    cached_prompt: int = 0
    length: int = 0  # positions held in the request's cache row
    steps: int = 0  # steps run in the current canvas
    cancelled: bool = False
    ended: bool = False  # its terminal event was sent


def canvas_seed(seed: int, canvas: int) -> int:
    """Per-canvas seed of a row's generator under CUDA graphs with the torch sampler (a fixed mix of the request
    seed and the index)."""
    return (seed * 0x9E3779B97F4A7C15 + canvas * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Scheduler:
    """Continuous batching over one model (see the module docstring). Thread-safe: `submit`, `cancel` and `metrics`
    may be called from any thread; sinks are called from the engine thread and must not block."""

    def __init__(self, model, defaults: DiffusionParams, *, max_batch: int = 16, max_model_len: int | None = None,
                 fast: bool | None = None, prefix_cache: bool = True,
                 on_step: Callable[[float, int], None] | None = None,
                 on_canvas: Callable[[float, int], None] | None = None,
                 max_stability: int = 8, prefill_chunk: int = 4096, buckets: list[int] | None = None):
        """max_model_len: positions per cache row (prompt + every canvas, rounded up to whole canvases); default
        min(max_position_embeddings, 8192). fast: CUDA graphs for the step and commit passes (None = on CUDA in
        bf16/fp16; False = the same step eagerly). on_step(seconds, rows) / on_canvas(seconds, rows): observers
        called from the engine thread after each decoder step / each canvas (e.g. Prometheus histograms).
        max_stability: the largest stability_threshold a request may ask for (the stop history is preallocated)."""
        args = model.args
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 (got {max_batch})")
        self.model, self.defaults, self.max_batch = model, defaults, max_batch
        self.C, self.vocab = args.canvas_length, args.vocab_size
        self.max_model_len = max_model_len or min(args.max_position_embeddings, 8192)
        if self.max_model_len <= self.C:
            raise ValueError(f"max_model_len {self.max_model_len} must exceed the canvas length {self.C}")
        self.device = model.embed_tokens.weight.device
        self.prefix_cache, self.prefill_chunk = prefix_cache, prefill_chunk
        self.on_step, self.on_canvas = on_step, on_canvas
        self.cache = KVCache(args, max_batch, self.max_model_len, self.device, model.embed_tokens.weight.dtype,
                             scratch=self.C)
        use_graph = None if fast is None else (fast and self.device.type == "cuda")
        self.stepper = BatchStepper(model, self.cache, max_batch, max_stability=max_stability, use_graph=use_graph,
                                    buckets=buckets)
        # Rows: busy requests first (rows 0..n-1); every row remembers the tokens its cache holds (prefix reuse).
        self.slots: list[_Request | None] = [None] * max_batch
        self.row_tokens: list[list[int]] = [[] for _ in range(max_batch)]
        self.row_used = [0.0] * max_batch
        self._lock = threading.Condition()
        self._queue: collections.deque[_Request] = collections.deque()
        self._cancel: set[str] = set()
        self._ids: set[str] = set()  # queued or running
        self._stop = False
        self._thread: threading.Thread | None = None
        self._m = dict(requests_total=0, requests_finished=0, requests_failed=0, requests_cancelled=0,
                       tokens_generated=0, decoder_steps=0, canvases=0, prompt_tokens=0, cached_prompt_tokens=0,
                       step_seconds_sum=0.0, canvas_seconds_sum=0.0, step_rows_sum=0)
        self._step_lat: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)
        self._canvas_lat: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)

    # --- public API ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread (a daemon); idempotent."""
        with self._lock:
            if self._thread is None:
                self._stop = False
                self._thread = threading.Thread(target=self._run, name="dgemma-scheduler", daemon=True)
                self._thread.start()

    def shutdown(self) -> None:
        """Stop the engine thread; every queued or running request gets Failed("scheduler shut down")."""
        with self._lock:
            self._stop = True
            self._lock.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        else:  # never started: the queued requests still get their terminal event
            self._drain_queue()
        with self._lock:
            self._thread = None

    def submit(self, prompt_ids: list[int], params: DiffusionParams, sink: Callable[[object], None], *,
               drafts: bool = False, request_id: str | None = None) -> str:
        """Queue a request; returns its id. Raises ValueError for a request that cannot run (see `validate`)."""
        prompt = self.validate(prompt_ids, params)
        rid = request_id if request_id is not None else uuid.uuid4().hex
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        req = _Request(rid, prompt, params, sink, drafts, seed, gen, time.perf_counter())
        with self._lock:
            if rid in self._ids:
                raise ValueError(f"request id {rid!r} is already queued or running")
            self._ids.add(rid)
            self._queue.append(req)
            self._m["requests_total"] += 1
            self._lock.notify_all()
        return rid

    def validate(self, prompt_ids, params: DiffusionParams) -> list[int]:
        """The checks `submit` makes, as ValueErrors with the numbers and the fix; returns the prompt as a list."""
        if not isinstance(params, DiffusionParams):
            raise TypeError(f"params must be a DiffusionParams, got {type(params).__name__}")
        params.validate()
        prompt = list(prompt_ids)
        if not prompt:
            raise ValueError("empty prompt: give at least one token id")
        bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab})")
        if params.stability_threshold > self.stepper.max_stability:
            raise ValueError(f"stability_threshold {params.stability_threshold} exceeds this server's maximum "
                             f"{self.stepper.max_stability}")
        C, L = self.C, len(prompt)
        span = math.ceil(params.max_new_tokens / C) * C
        if L + span > self.max_model_len:
            fit = (self.max_model_len - L) // C * C
            fix = (f"lower max_new_tokens to {fit} or less" if fit >= 1 else
                   f"shorten the prompt to at most {self.max_model_len - C} tokens")
            raise ValueError(f"prompt ({L} tokens) + max_new_tokens {params.max_new_tokens} (rounded up to whole "
                             f"canvases of {C}: {span}) = {L + span} positions exceeds max_model_len "
                             f"{self.max_model_len}; {fix}, or raise max_model_len")
        return prompt

    def cancel(self, request_id: str) -> None:
        """Cancel a queued or running request (idempotent; unknown or ended ids are ignored). It receives
        Finished("cancelled") from the engine thread at its next step boundary."""
        with self._lock:
            if request_id in self._ids:
                self._cancel.add(request_id)
                self._lock.notify_all()

    def metrics(self) -> dict:
        """Counters (running totals since start) and gauges. Latencies: `step_seconds_sum` / `decoder_steps` and
        `canvas_seconds_sum` / `canvases` are running sums and counts (Prometheus summaries); `step_latency_s` and
        `canvas_latency_s` are the most recent LATENCY_WINDOW values (or use the on_step/on_canvas observers to feed
        histograms exactly)."""
        with self._lock:
            out = dict(self._m, queue_depth=len(self._queue), active=self._busy(), max_batch=self.max_batch,
                       max_model_len=self.max_model_len)
            out["step_latency_s"] = list(self._step_lat)
            out["canvas_latency_s"] = list(self._canvas_lat)
        return out

    # --- the engine thread --------------------------------------------------------------------------------------
    def _busy(self) -> int:
        return next((r for r, s in enumerate(self.slots) if s is None), self.max_batch)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._queue and not self._cancel and self._busy() == 0:
                    self._lock.wait()
                stop = self._stop
            if stop:
                break
            try:
                self._take_cancels()
                self._admit()
                if self._busy():
                    self._run_canvas()
            except _ShutDown:
                break
            except Exception as e:  # noqa: BLE001 - the engine must keep serving
                log.exception("scheduler: a canvas failed")
                self._fail_busy(f"engine error: {type(e).__name__}: {e}")
        self._fail_busy("scheduler shut down")
        self._drain_queue()

    def _drain_queue(self) -> None:
        with self._lock:
            queued, self._queue = list(self._queue), collections.deque()
        for req in queued:
            self._end(req, Failed(req.id, "scheduler shut down"))

    def _take_cancels(self) -> None:
        """Queued requests cancelled → Finished now; running ones → frozen now, freed at the canvas boundary."""
        with self._lock:
            ids, self._cancel = self._cancel, set()
            queued = [r for r in self._queue if r.id in ids]
            for r in queued:
                self._queue.remove(r)
        for req in queued:
            self._end(req, self._finished(req, "cancelled"))
        for row, req in enumerate(self.slots):
            if req is not None and req.id in ids and not req.ended:
                req.cancelled = True
                self.stepper.freeze(row)
                self._end(req, self._finished(req, "cancelled"))

    def _admit(self) -> None:
        while (n := self._busy()) < self.max_batch:
            with self._lock:
                if not self._queue:
                    return
                req = self._queue.popleft()
            try:
                self._place(req, n)
            except Exception as e:  # noqa: BLE001 - only this request fails
                log.exception("scheduler: prefill failed")
                self._clear_row(n)
                self._end(req, Failed(req.id, f"prefill failed: {type(e).__name__}: {e}"))
                continue
            self.slots[n] = req

    def _place(self, req: _Request, row: int) -> None:
        """Put a request into `row` (the first free one): take the free row with the longest reusable prefix (else
        the least recently used), move it to `row`, cut its cache back to the shared prefix, prefill the rest."""
        best, keep = None, 0
        for r in range(row, self.max_batch):
            k = common_prefix(self.row_tokens[r], req.prompt) if self.prefix_cache else 0
            if k and not self.cache.rollback_ok(len(self.row_tokens[r]), k):
                k = 0
            if best is None or k > keep or (k == keep and self.row_used[r] < self.row_used[best]):
                best, keep = r, k
        self._swap(row, best)
        self.cache.truncate_row(row, keep)
        self.row_tokens[row] = req.prompt[:keep]
        req.admitted, req.cached_prompt, req.length = time.perf_counter(), keep, len(req.prompt)
        view = self.cache.view(slice(row, row + 1), length=keep)
        ids = torch.tensor(req.prompt, device=self.device)[None]
        with torch.inference_mode():
            for start in range(keep, len(req.prompt), self.prefill_chunk):  # chunked: bounded activation memory
                end = min(start + self.prefill_chunk, len(req.prompt))
                self.model.encode(ids[:, start:end], torch.arange(start, end, device=self.device)[None], view)
                view.advance(end - start)
        self.row_tokens[row] = list(req.prompt)
        self.row_used[row] = time.perf_counter()
        with self._lock:
            self._m["prompt_tokens"] += len(req.prompt)
            self._m["cached_prompt_tokens"] += keep

    def _run_canvas(self) -> None:
        n = self._busy()
        busy = self.slots[:n]
        t0 = time.perf_counter()
        nb = self.stepper.start_canvas([RowSpec(q.length, q.params, q.generator, canvas_seed(q.seed, len(
            q.steps_per_canvas))) for q in busy])
        for q in busy:
            q.steps = 0
            if q.cancelled:
                self.stepper.freeze(busy.index(q))
        done = [q.cancelled for q in busy]
        while not all(done):
            ts = time.perf_counter()
            argmax, _, done_t = self.stepper.step(nb, [not d for d in done])  # the rows that still draw
            before, done = done, done_t.tolist()[:n]  # the one host sync per step (the adaptive stop)
            drafts = [r for r, q in enumerate(busy) if q.drafts and not before[r] and not q.ended]
            rows = argmax[drafts].tolist() if drafts else []
            for r, q in enumerate(busy):
                q.steps += not before[r]
            for r, tokens in zip(drafts, rows):
                self._emit(busy[r], Draft(busy[r].id, len(busy[r].steps_per_canvas), busy[r].steps, tokens))
            self._observe_step(time.perf_counter() - ts, n - sum(before))
            with self._lock:
                stop, cancels = self._stop, bool(self._cancel)
            if stop:
                raise _ShutDown
            if cancels:
                self._take_cancels()
                done = [d or q.cancelled for d, q in zip(done, busy)]
        self._commit(busy, nb, self.stepper.argmax[:n].tolist())
        self._observe_canvas(time.perf_counter() - t0, n)
        self._compact()

    def _commit(self, busy: list[_Request], nb: int, argmax: list[list[int]]) -> None:
        """Per row: cut the argmax canvas at EOS / max_new_tokens, send Committed, end rows that finished, then
        encode the continuing rows' canvases into their cache rows (one batched pass)."""
        items = []
        for r, q in enumerate(busy):
            q.steps_per_canvas.append(q.steps)
            if q.cancelled:
                self.slots[r] = None
                continue
            eos = set(q.params.eos_token_ids)
            new = argmax[r][:q.params.max_new_tokens - len(q.tokens)]
            cut = next((i for i, t in enumerate(new) if t in eos), None)
            if cut is not None:
                new = new[:cut + 1]
            q.tokens += new
            q.first_commit = q.first_commit or time.perf_counter()
            with self._lock:
                self._m["tokens_generated"] += len(new)
            self._emit(q, Committed(q.id, len(q.steps_per_canvas) - 1, new, q.steps))
            if cut is not None or len(q.tokens) >= q.params.max_new_tokens:
                self._end(q, self._finished(q, "stop" if cut is not None else "length"))
                self.slots[r] = None
            else:
                items.append((r, torch.tensor(argmax[r]), q.length))
        if items:
            self.stepper.commit(nb, items)
            for r, _, _ in items:
                busy[r].length += self.C
                self.row_tokens[r] += argmax[r]

    def _compact(self) -> None:
        """Swap busy rows into the front rows (freed rows keep their caches for prefix reuse)."""
        busy = [r for r, q in enumerate(self.slots) if q is not None]
        for i, r in enumerate(busy):
            self._swap(i, r)
        now = time.perf_counter()
        for r in range(len(busy)):
            self.row_used[r] = now

    def _swap(self, a: int, b: int) -> None:
        if a != b:
            self.cache.swap_rows(a, b)
            for xs in (self.slots, self.row_tokens, self.row_used):
                xs[a], xs[b] = xs[b], xs[a]

    def _clear_row(self, row: int) -> None:
        self.cache.truncate_row(row, 0)
        self.row_tokens[row] = []

    def _fail_busy(self, message: str) -> None:
        """Fail every running request and forget their rows (their caches may be half written)."""
        for row, req in enumerate(self.slots):
            if req is not None:
                self._end(req, Failed(req.id, message))
                self.slots[row] = None
                self._clear_row(row)

    # --- events and metrics -------------------------------------------------------------------------------------
    def _finished(self, q: _Request, reason: str) -> Finished:
        now, steps = time.perf_counter(), sum(q.steps_per_canvas)
        usage = dict(prompt_tokens=len(q.prompt), completion_tokens=len(q.tokens),
                     cached_prompt_tokens=q.cached_prompt, canvases=len(q.steps_per_canvas), steps=steps,
                     steps_per_canvas=list(q.steps_per_canvas),
                     tokens_per_forward=len(q.tokens) / steps if steps else 0.0,
                     queue_s=(q.admitted or now) - q.submitted,
                     ttft_s=q.first_commit - q.submitted if q.first_commit else None, total_s=now - q.submitted)
        return Finished(q.id, list(q.tokens), reason, usage)

    def _end(self, q: _Request, event: Finished | Failed) -> None:
        """Send the request's one terminal event."""
        if q.ended:
            return
        q.ended = True
        with self._lock:
            self._ids.discard(q.id)
            self._cancel.discard(q.id)
            if isinstance(event, Failed):
                self._m["requests_failed"] += 1
            else:  # requests_finished counts every Finished; requests_cancelled those cancelled
                self._m["requests_finished"] += 1
                self._m["requests_cancelled"] += event.finish_reason == "cancelled"
        self._emit(q, event)

    def _emit(self, q: _Request, event) -> None:
        try:
            q.sink(event)
        except Exception:  # noqa: BLE001 - a broken sink must not stop the engine
            log.exception("scheduler: sink of request %s raised", q.id)

    def _observe_step(self, seconds: float, rows: int) -> None:
        with self._lock:
            self._m["decoder_steps"] += 1
            self._m["step_seconds_sum"] += seconds
            self._m["step_rows_sum"] += rows
            self._step_lat.append(seconds)
        _call(self.on_step, seconds, rows)

    def _observe_canvas(self, seconds: float, rows: int) -> None:
        with self._lock:
            self._m["canvases"] += 1
            self._m["canvas_seconds_sum"] += seconds
            self._canvas_lat.append(seconds)
        _call(self.on_canvas, seconds, rows)


def _call(observer, *args) -> None:
    if observer is not None:
        try:
            observer(*args)
        except Exception:  # noqa: BLE001 - metrics must not fail requests
            log.exception("scheduler: observer %r raised", observer)


class _ShutDown(Exception):
    pass

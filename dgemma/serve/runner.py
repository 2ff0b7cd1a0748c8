"""One request's life on the server side: submit to the engine thread, drain its events into asyncio, make text.

What it does: `Runner.submit(job)` queues a `Job` in the `Scheduler`; its `Handle.updates()` yields `DraftUpdate`
(a denoising step's canvas, when drafts were asked for), `TextUpdate` (new reasoning/content text) and one `Done`.
A stop string cancels the request in the engine; a client that goes away cancels it too, which frees its slot.

Design choices:
- The engine calls the sink on its own thread; the sink only does `loop.call_soon_threadsafe(queue.put_nowait)`,
  so it never blocks the batch (STYLE.md rule 13: one thread owns the model, each request gets its own queue).
- Cancellation lives in one `finally`: whatever ends the consumer early (a disconnect cancelling the streaming
  task, a stop string, an error) cancels the engine request; `Scheduler.cancel` is idempotent.
- A draft's `settled` marks positions whose argmax did not change since the previous step (the CLI's live view
  uses the same rule); `limit` is how many positions of this canvas can still be committed (max_tokens).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from dgemma.config import DiffusionParams
from dgemma.engine.scheduler import Committed, Draft, Failed, Finished, Scheduler
from dgemma.serve.metrics import ServerMetrics
from dgemma.serve.protocol import APIError, field_named
from dgemma.serve.text import Delta, TextStream
from dgemma.tokenizer import Tokenizer

DISCONNECT_POLL_S = 0.5  # non-streamed requests: how often to ask whether the client is still there


@dataclass
class Job:
    route: str  # "chat" | "completions", for metrics
    prompt_ids: list[int]
    params: DiffusionParams
    stop: list[str] = field(default_factory=list)
    thinking: bool = False
    drafts: bool = False


@dataclass
class DraftUpdate:
    canvas: int
    step: int
    tokens: list[int]
    pieces: list[str]
    settled: list[bool]
    limit: int


@dataclass
class TextUpdate:
    delta: Delta


@dataclass
class Done:
    finish_reason: str  # "stop" | "length"
    usage: dict
    reasoning: str
    content: str


class Runner:
    def __init__(self, scheduler: Scheduler, tokenizer: Tokenizer, metrics: ServerMetrics, canvas_length: int):
        self.scheduler, self.tokenizer, self.metrics, self.C = scheduler, tokenizer, metrics, canvas_length
        self._pieces: dict[int, str] = {}  # token id → its text alone, for drafts

    def submit(self, job: Job) -> Handle:
        """Queue the job in the engine; a prompt the engine refuses is a 400 here, before any response starts."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(event) -> None:  # engine thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the loop is closed: the server is shutting down
                pass

        try:
            rid = self.scheduler.submit(job.prompt_ids, job.params, sink, drafts=job.drafts)
        except ValueError as e:  # e.g. stability_threshold over the engine's maximum
            raise APIError(400, str(e), field_named(str(e)) or ("messages" if job.route == "chat" else "prompt")
                           ) from e
        return Handle(self, job, rid, queue)

    def pieces(self, ids: list[int]) -> list[str]:
        missing = [i for i in set(ids) if i not in self._pieces]
        if missing:
            self._pieces.update(zip(missing, self.tokenizer.decode_token_pieces(missing)))
        return [self._pieces[i] for i in ids]


class Handle:
    """A submitted request: its updates, and `cancel` (idempotent; what every early exit calls)."""

    def __init__(self, runner: Runner, job: Job, request_id: str, queue: asyncio.Queue):
        self.runner, self.job, self.request_id, self.queue = runner, job, request_id, queue
        self.ended = False

    def cancel(self) -> None:
        if not self.ended:
            self.ended = True
            self.runner.scheduler.cancel(self.request_id)

    async def updates(self, disconnected: Callable[[], Awaitable[bool]] | None = None
                      ) -> AsyncIterator[DraftUpdate | TextUpdate | Done]:
        job, runner = self.job, self.runner
        text = TextStream(runner.tokenizer, job.stop, job.thinking)
        prev: list[int] | None = None
        committed = 0
        try:
            while True:
                event = await self._next(disconnected)
                if isinstance(event, Draft):
                    if text.stopped:
                        continue
                    settled = [a == b for a, b in zip(event.tokens, prev)] if prev else [False] * len(event.tokens)
                    prev = event.tokens
                    yield DraftUpdate(event.canvas, event.step, event.tokens, runner.pieces(event.tokens), settled,
                                      max(0, min(runner.C, job.params.max_new_tokens - committed)))
                elif isinstance(event, Committed):
                    prev = None
                    committed += len(event.tokens)
                    delta = text.add(event.tokens)
                    if text.stopped:
                        runner.scheduler.cancel(self.request_id)
                    if delta:
                        yield TextUpdate(delta)
                elif isinstance(event, Finished):
                    self.ended = True
                    delta = text.finish()
                    if delta:
                        yield TextUpdate(delta)
                    reason = "stop" if text.stopped else event.finish_reason
                    usage = _usage(event.usage)
                    runner.metrics.on_finished(job.route, reason, usage)
                    yield Done(reason, usage, text.reasoning, text.content)
                    return
                elif isinstance(event, Failed):
                    self.ended = True
                    raise APIError(500, f"generation failed: {event.message}", None, "engine_error", "server_error")
        finally:
            self.cancel()

    async def _next(self, disconnected):
        if disconnected is None:
            return await self.queue.get()
        while True:
            try:
                return await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
            except TimeoutError:
                if await disconnected():
                    raise asyncio.CancelledError("client disconnected") from None


def _usage(engine: dict) -> dict:
    """OpenAI's usage fields plus dgemma's diffusion stats."""
    usage = {"prompt_tokens": engine.get("prompt_tokens", 0), "completion_tokens": engine.get("completion_tokens", 0)}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    usage["prompt_tokens_details"] = {"cached_tokens": engine.get("cached_prompt_tokens", 0) or 0}
    for key in ("canvases", "steps", "steps_per_canvas", "tokens_per_forward", "queue_s", "ttft_s", "total_s"):
        if key in engine:
            usage[key] = engine[key]
    total = engine.get("total_s")
    if total:
        usage["tokens_per_second"] = usage["completion_tokens"] / total
    return usage


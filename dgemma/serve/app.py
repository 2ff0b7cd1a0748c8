"""The FastAPI app of `dgemma serve`: OpenAI-compatible routes, metrics, health and the playground.

What it does: `create_app(llm, scheduler, ...)` builds the app. POST /v1/chat/completions and /v1/completions
(streamed as OpenAI SSE chunks ending with `data: [DONE]`, or one JSON body), GET /v1/models, /health, /metrics
(Prometheus), /openapi.json, and the playground at / (static files shipped in the package).

Design choices:
- Handlers only parse, enqueue, drain and format (STYLE.md rule 13); the engine thread owns the model
  (`engine/scheduler.py`) and `runner.py` bridges one request to it.
- Every error, bad JSON and validation errors included, is OpenAI's `{"error": {message, type, param, code}}`;
  validation errors are 400 (not FastAPI's 422), as OpenAI answers them.
- Drafts (`stream_options.include_drafts`) travel as SSE comment lines `: dgemma-draft {json}`. The SSE spec has
  clients drop comment lines, and the official openai client does (it turns every `event:`/`data:` block into a
  chunk, named events included), so a standard client's stream parses as if they were not there.
- With --api-key, /v1/* and /metrics need `Authorization: Bearer KEY`; /health, the playground page and the schema
  stay open (they hold no data). The key is compared in constant time.
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from dgemma.api import LLM, SamplingParams
from dgemma.engine.scheduler import Scheduler
from dgemma.serve import protocol as P
from dgemma.serve.metrics import ServerMetrics
from dgemma.serve.runner import Done, DraftUpdate, Handle, Job, Runner, TextUpdate

STATIC_DIR = Path(__file__).parent / "static"


@dataclass
class ServerConfig:
    model_name: str
    max_model_len: int
    api_key: str | None = None


def create_app(llm: LLM, scheduler: Scheduler, config: ServerConfig, metrics: ServerMetrics) -> FastAPI:
    """The app; it starts the scheduler on startup and shuts it down on exit."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.shutdown()

    # no /docs or /redoc: FastAPI's pages load their scripts from a CDN, and the server must work offline
    app = FastAPI(title="dgemma", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible server for DiffusionGemma block-diffusion models.")
    app.state.config, app.state.scheduler, app.state.metrics = config, scheduler, metrics
    runner = Runner(scheduler, llm.tokenizer, metrics, llm.args.canvas_length)
    routes = _Routes(llm, config, runner)
    auth = [Depends(_auth(config.api_key))]
    app.post("/v1/chat/completions", dependencies=auth)(routes.chat)
    app.post("/v1/completions", dependencies=auth)(routes.completions)
    app.get("/v1/models", dependencies=auth)(routes.models)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": config.model_name}

    @app.get("/metrics", dependencies=auth)
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    _install_error_handlers(app, metrics)
    return app


def _auth(api_key: str | None):
    async def check(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise P.APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", None,
                             "invalid_api_key")

    return check


class _Routes:
    def __init__(self, llm: LLM, config: ServerConfig, runner: Runner):
        self.llm, self.config, self.runner = llm, config, runner

    async def chat(self, body: P.ChatCompletionRequest, request: Request):
        self._check_common(body)
        thinking = bool(body.chat_template_kwargs and body.chat_template_kwargs.enable_thinking)
        try:
            ids = self.llm.encode_prompt(P.message_dicts(body.messages), chat=True, enable_thinking=thinking)
        except (ValueError, TypeError) as e:
            raise P.APIError(400, str(e), "messages") from e
        max_tokens = body.max_completion_tokens or body.max_tokens
        job = self._job("chat", ids, body, max_tokens, thinking)
        return await self._respond(job, body, request, _ChatFormat(self.config.model_name, thinking))

    async def completions(self, body: P.CompletionRequest, request: Request):
        self._check_common(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise P.APIError(400, "a list of prompts is not supported: send one prompt per request (concurrent "
                                      "requests are batched)", "prompt")
            prompt = prompt[0]
        if not prompt:
            raise P.APIError(400, "the prompt is empty", "prompt")
        try:
            ids = self.llm.encode_prompt(prompt)
        except (ValueError, TypeError) as e:
            raise P.APIError(400, str(e), "prompt") from e
        job = self._job("completions", ids, body, body.max_tokens, False)
        return await self._respond(job, body, request, _CompletionFormat(self.config.model_name))

    async def models(self) -> dict:
        card = {"id": self.config.model_name, "object": "model", "created": int(time.time()), "owned_by": "dgemma",
                "max_model_len": self.config.max_model_len, "canvas_length": self.llm.args.canvas_length}
        return {"object": "list", "data": [card]}

    # --- helpers ----------------------------------------------------------------------------------------------
    def _check_common(self, body) -> None:
        if body.model != self.config.model_name:
            raise P.APIError(404, f"model {body.model!r} is not served here; this server serves "
                                  f"{self.config.model_name!r} (GET /v1/models)", "model", "model_not_found")
        P.check_unsupported(body)

    def _job(self, route: str, ids: list[int], body, max_tokens: int | None, thinking: bool) -> Job:
        # The engine reserves whole canvases: prompt + ceil(max_tokens / C) * C positions must fit max_model_len.
        limit, C = self.config.max_model_len, self.llm.args.canvas_length
        room = (limit - len(ids)) // C * C
        if room < 1:
            raise P.APIError(400, f"the prompt is {len(ids)} tokens; with canvases of {C} tokens this server "
                                  f"(max_model_len {limit}) takes prompts of at most {limit - C} tokens",
                             "messages" if route == "chat" else "prompt", "context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise P.APIError(400, f"max_tokens {max_tokens} does not fit: the prompt is {len(ids)} tokens and "
                                  f"max_model_len is {limit} (whole canvases of {C}), so max_tokens can be at most "
                                  f"{room}", "max_tokens", "context_length_exceeded")
        knobs = {k: getattr(body, k) for k in P.DIFFUSION_KNOBS}
        max_new = max_tokens if max_tokens is not None else min(self.llm.defaults.max_new_tokens, room)
        try:
            params = SamplingParams(max_new_tokens=max_new, seed=body.seed, **knobs).resolve(self.llm.defaults)
        except ValueError as e:  # cross-field rules, e.g. t_max > t_min against a checkpoint default
            raise P.APIError(400, str(e), P.field_named(str(e))) from e
        drafts = bool(body.stream and body.stream_options and body.stream_options.include_drafts)
        return Job(route, ids, params, P.stop_list(body.stop), thinking, drafts)

    async def _respond(self, job: Job, body, request: Request, fmt):
        handle = self.runner.submit(job)  # a prompt the engine refuses is a plain 4xx, before any response
        if not body.stream:
            done = None
            async for update in handle.updates(request.is_disconnected):
                if isinstance(update, Done):
                    done = update
            assert done is not None
            return fmt.whole(done)
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(handle, fmt, usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _sse(handle: Handle, fmt, include_usage: bool) -> AsyncIterator[str]:
    """OpenAI chunks, draft comment lines, then `data: [DONE]`; a disconnect cancels this task → handle.cancel."""
    try:
        yield _data(fmt.chunk(fmt.opening(), None, include_usage))
        async for update in handle.updates():
            if isinstance(update, DraftUpdate):
                yield ": dgemma-draft " + json.dumps(_draft_json(update), ensure_ascii=False) + "\n\n"
            elif isinstance(update, TextUpdate):
                yield _data(fmt.chunk(fmt.delta(update.delta), None, include_usage))
            elif isinstance(update, Done):
                yield _data(fmt.chunk(fmt.closing(), update.finish_reason, include_usage))
                if include_usage:
                    yield _data(fmt.usage_chunk(update.usage))
        yield "data: [DONE]\n\n"
    except P.APIError as e:  # after the headers: report it in-band, as OpenAI does
        yield _data(e.body())
        yield "data: [DONE]\n\n"
    finally:
        handle.cancel()


def _data(obj: dict) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


def _draft_json(d: DraftUpdate) -> dict:
    return {"canvas": d.canvas, "step": d.step, "tokens": d.tokens, "text": d.pieces, "settled": d.settled,
            "limit": d.limit}


class _Format:
    """The OpenAI response envelope shared by both endpoints: id, object, created, model; `choice` is the one
    choice of a streamed chunk (its delta or text), `whole` the non-streamed body."""

    id_prefix, chunk_object, whole_object = "", "", ""

    def __init__(self, model: str):
        self.model = model
        self.id, self.created = f"{self.id_prefix}-{uuid.uuid4().hex}", int(time.time())

    def envelope(self, obj: str, choices: list) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def chunk(self, piece, finish_reason: str | None, include_usage: bool) -> dict:
        out = self.envelope(self.chunk_object, [{"index": 0, **self.choice(piece), "logprobs": None,
                                                 "finish_reason": finish_reason}])
        if include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, usage: dict) -> dict:
        return self.envelope(self.chunk_object, []) | {"usage": usage}

    def whole(self, done: Done) -> dict:
        choice = {"index": 0, **self.whole_choice(done), "logprobs": None, "finish_reason": done.finish_reason}
        return self.envelope(self.whole_object, [choice]) | {"usage": done.usage}


class _ChatFormat(_Format):
    id_prefix, chunk_object, whole_object = "chatcmpl", "chat.completion.chunk", "chat.completion"

    def __init__(self, model: str, thinking: bool):
        super().__init__(model)
        self.thinking = thinking

    def opening(self) -> dict:
        return {"role": "assistant", "content": ""}

    def delta(self, delta) -> dict:
        out = {}
        if delta.reasoning:
            out["reasoning_content"] = delta.reasoning
        if delta.content:
            out["content"] = delta.content
        return out

    def closing(self) -> dict:
        return {}

    def choice(self, delta: dict) -> dict:
        return {"delta": delta}

    def whole_choice(self, done: Done) -> dict:
        message = {"role": "assistant", "content": done.content}
        if self.thinking:
            message["reasoning_content"] = done.reasoning
        return {"message": message}


class _CompletionFormat(_Format):
    id_prefix, chunk_object, whole_object = "cmpl", "text_completion", "text_completion"

    def opening(self) -> str:
        return ""

    def delta(self, delta) -> str:
        return delta.content

    def closing(self) -> str:
        return ""

    def choice(self, text: str) -> dict:
        return {"text": text}

    def whole_choice(self, done: Done) -> dict:
        return {"text": done.content}


# --- errors -------------------------------------------------------------------------------------------------------
_NESTED = {"stream_options": P.StreamOptions, "chat_template_kwargs": P.ChatTemplateKwargs}


def _install_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    def reply(err: P.APIError) -> JSONResponse:
        metrics.errors.labels(str(err.status)).inc()
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(P.APIError)
    async def api_error(request: Request, exc: P.APIError):
        return reply(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return reply(_validation_error(exc.errors(), request.url.path))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return reply(P.APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None, code))


def _validation_error(errors, path: str) -> P.APIError:
    model = P.ChatCompletionRequest if path.endswith("chat/completions") else P.CompletionRequest
    unknown = [e["loc"] for e in errors if e["type"] == "extra_forbidden"]
    top = [str(loc[1]) for loc in unknown if len(loc) == 2]
    if top:
        return P.APIError(400, P.unknown_field_message(top, model), top[0], "unknown_field")
    if unknown:
        loc = unknown[0]
        owner = _NESTED.get(str(loc[1]))
        valid = f"; valid fields: {', '.join(owner.model_fields)}" if owner and len(loc) == 3 else ""
        return P.APIError(400, f"unknown field {_param(loc)}{valid}", _param(loc), "unknown_field")
    e = errors[0]
    if e["type"] == "json_invalid":
        return P.APIError(400, f"the body is not valid JSON: {e.get('ctx', {}).get('error', e['msg'])}", None,
                          "invalid_json")
    if e["loc"] == ("body",) and e["type"] in ("missing", "model_attributes_type", "dict_type"):
        hint = " (with Content-Type: application/json)" if isinstance(e.get("input"), bytes) else ""
        return P.APIError(400, f"the body must be a JSON object{hint}", None, "invalid_body")
    param = _param(e["loc"])
    return P.APIError(400, f"{param}: {e['msg']}", param, "invalid_value")


def _param(loc) -> str:
    """('body', 'messages', 0, 'role') → 'messages[0].role'; union-member tags pydantic adds are dropped."""
    out = ""
    for part in loc[1:]:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in str(part) or str(part) in ("str", "int", "float", "bool", "list", "dict"):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


def _version() -> str:
    from dgemma import __version__

    return __version__

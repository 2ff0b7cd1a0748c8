"""Request bodies of the OpenAI-compatible routes, and the server's policy for each OpenAI field.

What it does: pydantic v2 models for POST /v1/chat/completions and /v1/completions (they are also the OpenAPI
schema), `APIError` (rendered as OpenAI's `{"error": {message, type, param, code}}`), and `check_unsupported`, which
turns a field the server cannot honour into a 400 that names it.

Design choices:
- Every model is strict (no "5" → 5) and forbids unknown fields; the app's validation handler turns the first
  pydantic error into a 400 that names the field, and lists the valid fields for an unknown one.
- OpenAI fields fall in three groups. Honoured: model, messages/prompt, max_tokens, max_completion_tokens, stop,
  seed, stream, stream_options.include_usage, chat_template_kwargs.enable_thinking, plus the diffusion knobs as
  extra body fields and dgemma's stream_options.include_drafts. Ignored because harmless (documented in
  docs/server.md): user, metadata, store, service_tier, parallel_tool_calls. Accepted only at their no-op value,
  else a 400 naming the field (`NO_OP`): n, best_of, top_p, frequency/presence_penalty, logit_bias, logprobs,
  top_logprobs, echo, suffix, tools, tool_choice, functions, function_call, response_format (type "text"),
  modalities (["text"]), audio, prediction, web_search_options, reasoning_effort.
- `temperature` is refused whatever its value: dgemma anneals a temperature schedule from t_max (first step) to
  t_min (last step), and no single number maps onto it honestly. The message points to t_min/t_max, as
  `dgemma.api.ALIASES` does for the Python API.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dgemma.api import ALIASES

DIFFUSION_KNOBS = ("max_denoising_steps", "entropy_bound", "t_min", "t_max", "stability_threshold",
                   "confidence_threshold")
MAX_STOP = 16  # stop strings per request (OpenAI allows 4; matching cost grows with their count)
MAX_STABILITY = 8  # the largest stability_threshold (the engine preallocates that much stop history per row)


class APIError(Exception):
    """An error answered in OpenAI's shape; `param` names the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False  # a last chunk with `usage` and no choices (OpenAI)
    include_drafts: bool = False  # dgemma: each denoising step's draft canvas as an SSE comment line


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    # Accepted by the schema only to answer it with a clear 400 (image input is not implemented).
    model_config = ConfigDict(extra="allow")
    type: Literal["image_url", "input_image", "image", "input_audio", "file"]


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]  # no "tool": tool calling is not supported
    content: str | list[TextPart | ImagePart] | None = None
    name: str | None = None  # ignored: the chat template has no speaker names
    reasoning_content: str | None = None  # ignored: earlier thoughts are not fed back (as Gemma's template does)
    tool_calls: list[dict[str, Any]] | None = None  # refused unless empty: no tool use
    tool_call_id: str | None = None
    refusal: str | None = None  # ignored


class DiffusionKnobs(_Strict):
    """dgemma's per-request sampler knobs, sent as extra body fields; None → the checkpoint's default."""

    max_denoising_steps: int | None = Field(None, ge=1, le=1024, description="denoising steps per canvas at most")
    entropy_bound: float | None = Field(None, gt=0, le=1e6, description="accept lowest-entropy tokens up to this sum")
    t_min: float | None = Field(None, ge=0, le=100, description="temperature at the last step")
    t_max: float | None = Field(None, gt=0, le=100, description="temperature at the first step (> t_min)")
    stability_threshold: int | None = Field(None, ge=0, le=MAX_STABILITY,
                                            description="unchanged steps to stop a canvas early")
    confidence_threshold: float | None = Field(None, gt=0, le=1e6, description="mean entropy that stops a canvas")


class _Common(DiffusionKnobs):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # accepted only at a no-op value (see NO_OP) or refused outright
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # ignored: harmless bookkeeping fields
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None


class ChatTemplateKwargs(_Strict):
    enable_thinking: bool = False


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    chat_template_kwargs: ChatTemplateKwargs | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # ignored
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    reasoning_effort: str | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None


# field → (the value(s) that do nothing, why any other value is refused)
NO_OP: dict[str, tuple[tuple, str]] = {
    "n": ((None, 1), "only n=1 is supported; send parallel requests instead (they are batched)"),
    "best_of": ((None, 1), "only best_of=1 is supported"),
    "top_p": ((None, 1, 1.0), "nucleus sampling is not supported; the entropy-bound sampler decides what to keep "
                              "(see entropy_bound)"),
    "frequency_penalty": ((None, 0, 0.0), "penalties are not supported by the block-diffusion sampler"),
    "presence_penalty": ((None, 0, 0.0), "penalties are not supported by the block-diffusion sampler"),
    "logit_bias": ((None, {}), "logit_bias is not supported"),
    "logprobs": ((None, False, 0), "logprobs are not supported"),
    "top_logprobs": ((None, 0), "logprobs are not supported"),
    "echo": ((None, False), "echo is not supported"),
    "suffix": ((None, ""), "suffix (infilling) is not supported"),
    "tools": ((None, []), "tool calling is not supported"),
    "tool_choice": ((None, "none"), "tool calling is not supported"),
    "functions": ((None, []), "function calling is not supported"),
    "function_call": ((None, "none"), "function calling is not supported"),
    "modalities": ((None, ["text"]), "only text output is supported"),
    "audio": ((None,), "audio output is not supported"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "web_search_options": ((None,), "web search is not supported"),
    "reasoning_effort": ((None,), "reasoning_effort is not supported; use chat_template_kwargs "
                                  "{\"enable_thinking\": true} to turn the thought channel on"),
}


def check_unsupported(req: ChatCompletionRequest | CompletionRequest) -> None:
    """Raise a 400 naming the first field whose value the server cannot honour."""
    if req.temperature is not None:
        raise APIError(400, f"temperature is not supported: use {ALIASES['temperature']}", "temperature",
                       "unsupported_parameter")
    for name, (no_op, why) in NO_OP.items():
        if name in type(req).model_fields and getattr(req, name) not in no_op:
            raise APIError(400, f"{name}={_short(getattr(req, name))}: {why}", name, "unsupported_parameter")
    fmt = getattr(req, "response_format", None)
    if fmt is not None and fmt.get("type") != "text":
        raise APIError(400, f"response_format type {fmt.get('type')!r} is not supported (only 'text'): no "
                            "constrained decoding", "response_format", "unsupported_parameter")
    if isinstance(req.stop, list) and len(req.stop) > MAX_STOP:
        raise APIError(400, f"stop: at most {MAX_STOP} strings", "stop")
    if req.stop == "" or (isinstance(req.stop, list) and "" in req.stop):
        raise APIError(400, "stop: an empty string would match everywhere", "stop")
    if isinstance(req, ChatCompletionRequest):
        _check_messages(req.messages)


def _check_messages(messages: list[ChatMessage]) -> None:
    for i, m in enumerate(messages):
        if m.tool_calls:
            raise APIError(400, f"messages[{i}].tool_calls: tool calling is not supported", f"messages[{i}]")
        if isinstance(m.content, list) and any(isinstance(p, ImagePart) for p in m.content):
            raise APIError(400, f"messages[{i}].content: only text parts are supported (no image, audio or file "
                                "input yet)", f"messages[{i}].content")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def message_dicts(messages: list[ChatMessage]) -> list[dict]:
    """Messages as the chat template wants them: role and one string of content."""
    out = []
    for m in messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
        out.append({"role": m.role, "content": content})
    return out


def stop_list(stop: str | list[str] | None) -> list[str]:
    return [] if stop is None else [stop] if isinstance(stop, str) else list(stop)


def field_named(message: str) -> str | None:
    """The request field an engine or SamplingParams message starts with ("t_max must be ..."), if any."""
    first = message.split(" ", 1)[0]
    if first not in (*DIFFUSION_KNOBS, "max_new_tokens", "seed"):
        return None
    return "max_tokens" if first == "max_new_tokens" else first


def unknown_field_message(names: list[str], model: type[BaseModel]) -> str:
    parts = [f"{n!r} (did you mean {ALIASES[n]}?)" if n in ALIASES else repr(n) for n in names]
    valid = ", ".join(model.model_fields)
    return f"unknown field {', '.join(parts)}; valid fields: {valid}"

"""The public Python API: `LLM` and `SamplingParams`.

    from dgemma import LLM, SamplingParams
    llm = LLM()                                   # the bundled default model, cuda if available else cpu
    outs = llm.generate(["Hello"], SamplingParams(max_new_tokens=64, seed=0))
    for event in llm.stream("Hello"): ...         # StepEvent / CanvasEvent / FinishedEvent, as the CLI sees them

`generate` and `stream` drive the same event generator (`engine/generate.py`); nothing else owns the loop.
`SamplingParams` fields left None take the checkpoint's generation_config.json values.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from dgemma.config import DiffusionParams
from dgemma.engine.generate import CanvasEvent, Event, FinishedEvent, SequenceStats, StepEvent, generate
from dgemma.loader import DEFAULT_MODEL_DIR, load
from dgemma.tokenizer import Tokenizer

__all__ = ["LLM", "SamplingParams", "RequestOutput", "UnknownParameterError", "StepEvent", "CanvasEvent",
           "FinishedEvent"]

_FIELDS = ("max_new_tokens", "max_denoising_steps", "entropy_bound", "t_min", "t_max", "stability_threshold",
           "confidence_threshold", "seed")
ALIASES = {
    "num_denoising_steps": "max_denoising_steps",
    "denoising_steps": "max_denoising_steps",
    "steps": "max_denoising_steps",
    "max_tokens": "max_new_tokens",
    "max_length": "max_new_tokens",
    "denoising_temperature": "t_min and t_max (a linear temperature schedule from t_max down to t_min)",
    "temperature": "t_min and t_max (dgemma anneals the temperature from t_max at the first step to t_min)",
    "sampler_config": "entropy_bound",
}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


class UnknownParameterError(TypeError, ValueError):
    """An unknown keyword; a TypeError like any bad keyword, and a ValueError like any bad value."""


def unknown_parameter_message(names: list[str], valid=_FIELDS) -> str:
    parts = []
    for name in names:
        hint = ALIASES.get(name)
        parts.append(f"{name!r} (did you mean {hint}?)" if hint else repr(name))
    return f"unknown sampling parameter {', '.join(parts)}; valid names: {', '.join(valid)}"


class SamplingParams:
    """Per-request sampling knobs; None means the checkpoint's default (generation_config.json)."""

    __slots__ = _FIELDS

    def __init__(self, max_new_tokens: int | None = None, max_denoising_steps: int | None = None,
                 entropy_bound: float | None = None, t_min: float | None = None, t_max: float | None = None,
                 stability_threshold: int | None = None, confidence_threshold: float | None = None,
                 seed: int | None = None, **unknown):
        if unknown:
            raise UnknownParameterError(unknown_parameter_message(sorted(unknown)))
        self.max_new_tokens, self.max_denoising_steps = max_new_tokens, max_denoising_steps
        self.entropy_bound, self.t_min, self.t_max = entropy_bound, t_min, t_max
        self.stability_threshold, self.confidence_threshold, self.seed = stability_threshold, confidence_threshold, seed

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in _FIELDS}

    def __repr__(self) -> str:
        set_ = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if v is not None)
        return f"SamplingParams({set_})"

    def __eq__(self, other) -> bool:
        return isinstance(other, SamplingParams) and self.to_dict() == other.to_dict()

    def resolve(self, defaults: DiffusionParams) -> DiffusionParams:
        """Merge over the checkpoint defaults and validate (ValueError naming the field)."""
        given = {k: v for k, v in self.to_dict().items() if v is not None}
        for k in ("entropy_bound", "t_min", "t_max", "confidence_threshold"):
            if isinstance(given.get(k), int) and not isinstance(given[k], bool):
                given[k] = float(given[k])
        return dataclasses.replace(defaults, **given).validate()


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated ids after the prompt, up to and including the first EOS, no pads
    text: str
    finish_reason: str  # "stop" | "length"
    stats: dict  # canvases, steps_per_canvas, tokens_per_forward, decoder_passes, timings (seconds)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from e
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; use 'cpu', 'cuda' or 'cuda:N'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available; use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use one of {sorted(_DTYPES)}")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or a torch.dtype")
    return _DTYPES[key]


class LLM:
    """A loaded DiffusionGemma checkpoint plus its tokenizer and sampling defaults."""

    def __init__(self, model: str | os.PathLike | None = None, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, lora: str | os.PathLike | None = None, *,
                 fast: bool | None = None):
        # fast: the static-shape CUDA-graph step (the default on CUDA) or the reference step (the default on CPU;
        # on CUDA it makes the same random draws as transformers' generate, while the fast path draws differently).
        self.fast = fast
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        t0 = time.perf_counter()
        self.model, self.defaults, self.path = load(model, self.device, self.dtype)
        self.lora = lora
        if lora is not None:  # a LoRA adapter from `dgemma train --mode lora`, merged into the weights once
            from dgemma.train.lora import load_adapter

            load_adapter(self.model, lora, merge_now=True)
        self.load_seconds = time.perf_counter() - t0
        self.is_default_model = Path(self.path).resolve() == DEFAULT_MODEL_DIR.resolve()
        self.tokenizer = Tokenizer.from_dir(self.path) if (Path(self.path) / "tokenizer.json").is_file() else None
        self.args = self.model.args

    # --- prompts ----------------------------------------------------------------------------------------------
    def encode_prompt(self, prompt, chat: bool = False, enable_thinking: bool = False) -> list[int]:
        """str (raw text, BOS prepended) | list[int] (ids as given) | chat: str or list of message dicts."""
        if isinstance(prompt, dict) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], dict)):
            chat, messages = True, list(prompt) if isinstance(prompt, list) else [prompt]
        elif isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if not prompt:
                raise ValueError("empty prompt: give at least one token id")
            bad = [t for t in prompt if not 0 <= t < self.args.vocab_size]
            if bad:
                raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.args.vocab_size})")
            return list(prompt)
        else:
            raise TypeError(f"a prompt must be a str, a list of token ids or a list of chat messages, got "
                            f"{type(prompt).__name__}")
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list) and any(isinstance(c, dict) and "image" in str(c.get("type", ""))
                                                 for c in content):
                raise ValueError("image input is not supported yet: give text content only")
        tok = self._require_tokenizer()
        ids = tok.encode_chat(messages, enable_thinking=enable_thinking) if chat else tok.encode(prompt, add_bos=True)
        if not ids:
            raise ValueError("empty prompt")
        return ids

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{self.path} has no tokenizer.json: pass prompts as lists of token ids")
        return self.tokenizer

    # --- generation -------------------------------------------------------------------------------------------
    def stream(self, prompt, params: SamplingParams | None = None, *, chat: bool = False,
               enable_thinking: bool = False, images=None) -> Iterator[Event]:
        """Events for one prompt (batch of 1): StepEvent per denoising step, CanvasEvent per block, FinishedEvent."""
        return self.stream_batch([prompt], params, chat=chat, enable_thinking=enable_thinking, images=images)

    def stream_batch(self, prompts, params: SamplingParams | None = None, *, chat: bool = False,
                     enable_thinking: bool = False, images=None, drafts: bool = True) -> Iterator[Event]:
        ids, resolved = self._prepare(prompts, params, chat, enable_thinking, images)
        return generate(self.model, ids, resolved, drafts=drafts, fast=self.fast)

    def generate(self, prompts, params: SamplingParams | None = None, *, chat: bool = False,
                 enable_thinking: bool = False, images=None) -> list[RequestOutput]:
        """Generate for a batch of prompts (list[str] or list[list[int]]; a single str is accepted too)."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings or of token-id lists")
        ids, resolved = self._prepare(prompts, params, chat, enable_thinking, images)
        final = None
        for event in generate(self.model, ids, resolved, drafts=False, fast=self.fast):
            if isinstance(event, FinishedEvent):
                final = event
        assert final is not None
        return [self._output(ids[i], o.token_ids, o.finish_reason, o.stats, final.stats)
                for i, o in enumerate(final.outputs)]

    def _prepare(self, prompts, params, chat: bool, enable_thinking: bool, images):
        """Validate the request: token-id prompts and resolved DiffusionParams (ValueError/TypeError if bad)."""
        if images is not None:
            raise ValueError("image input is not supported yet (the vision tower is not implemented)")
        if params is None:
            params = SamplingParams()
        elif isinstance(params, dict):
            params = SamplingParams(**params)
        elif not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        resolved = params.resolve(self.defaults)
        return [self.encode_prompt(p, chat, enable_thinking) for p in prompts], resolved

    def _output(self, prompt_ids, token_ids, reason, seq: SequenceStats, batch_stats) -> RequestOutput:
        text = self.tokenizer.decode(token_ids) if self.tokenizer is not None else ""
        stats = dataclasses.asdict(seq) | {
            "batch_size": batch_stats.batch, "prefill_s": batch_stats.prefill_s, "denoise_s": batch_stats.denoise_s,
            "total_s": batch_stats.total_s, "mean_steps_per_canvas": (sum(seq.steps_per_canvas) /
                                                                     max(len(seq.steps_per_canvas), 1)),
        }
        return RequestOutput(prompt_ids, token_ids, text, reason, stats)

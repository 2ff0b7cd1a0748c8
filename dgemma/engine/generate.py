"""The block-diffusion loop: one generator of events that the CLI, the server and the Python API all consume.

    for each canvas (256 new tokens):
        encode the uncached tokens (the prompt, then each committed canvas) into the KV cache
            (the static stepper runs a committed canvas's encoder pass inside the next canvas's first step)
        canvas ← uniform random ids
        for cur_step = N .. 1:                       yield StepEvent (the draft)
            logits ← decoder(canvas, self-conditioning = previous temperature-scaled logits)
            sample every position, accept the lowest-entropy ones, renoise the rest, check the adaptive stop
        commit the argmax canvas; pad after the first EOS  yield CanvasEvent
    yield FinishedEvent (outputs + stats)

Reference semantics: with the same seed, the random draws happen in the same order as transformers 5.23.0
`DiffusionGemmaGenerationMixin.generate` (`randint` for the canvas, `multinomial` per step, `randint` for
renoising, every row of the batch every time), so CPU fp32 runs reproduce it token for token.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from dgemma.config import DiffusionParams
from dgemma.engine import sampler as S
from dgemma.engine.cache import KVCache


@dataclass
class StepEvent:
    """One denoising step of the current canvas (all rows)."""

    canvas: int  # 0-based index of the canvas being denoised
    step: int  # 1-based step within this canvas
    draft: torch.Tensor  # [B, C] argmax canvas after this step (cpu)
    accepted: torch.Tensor  # [B, C] bool, positions whose sampled token was kept this step (cpu)
    done: torch.Tensor  # [B] bool, rows whose canvas has stopped denoising (cpu)


@dataclass
class CanvasEvent:
    """A committed canvas: argmax ids with pad after the first EOS (rows finished earlier are all pad)."""

    canvas: int
    tokens: torch.Tensor  # [B, C] (cpu)
    steps: int  # denoising steps run for this canvas (max over rows)
    finished: torch.Tensor  # [B] bool, rows that have ended (EOS or length)


@dataclass
class SequenceStats:
    prompt_tokens: int
    new_tokens: int
    canvases: int
    steps_per_canvas: list[int]  # decoder passes this row took in each canvas it ran
    decoder_passes: int
    tokens_per_forward: float  # new (non-pad) tokens / decoder passes


@dataclass
class GenerationStats:
    batch: int
    canvases: int
    steps_per_canvas: list[int]  # steps run per canvas (max over rows)
    prefill_s: float
    denoise_s: float  # decoder passes + sampling + commit encoder passes
    total_s: float
    new_tokens: int  # useful tokens over all rows (up to and including EOS)
    tokens_per_forward: float  # over all rows: new tokens / decoder passes of unfinished rows
    sequences: list[SequenceStats] = field(default_factory=list)

    @property
    def mean_steps_per_canvas(self) -> float:
        return sum(self.steps_per_canvas) / max(len(self.steps_per_canvas), 1)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0


@dataclass
class SequenceOutput:
    token_ids: list[int]  # after the prompt, up to and including the first EOS, never beyond max_new_tokens
    finish_reason: str  # "stop" (EOS) | "length" (max_new_tokens)
    stats: SequenceStats


@dataclass
class FinishedEvent:
    outputs: list[SequenceOutput]
    stats: GenerationStats


Event = StepEvent | CanvasEvent | FinishedEvent


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch prompts with left padding → ids [B, L], valid [B, L] (False on padding)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), L), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[i, L - len(p):] = True
    return ids.to(device), valid.to(device)


@dataclass
class _Batch:
    """Per-generation bookkeeping shared by the canvas loop and the final stats."""

    finished: torch.Tensor  # [B] bool: rows that ended (EOS or length)
    passes: torch.Tensor  # [B] decoder passes each row took while unfinished
    row_steps: list[list[int]]  # per row, steps taken in each canvas it ran
    committed: list[torch.Tensor] = field(default_factory=list)  # committed canvases [B, C] (device)
    steps_run: list[int] = field(default_factory=list)  # steps per canvas (max over rows)


def generate(model, prompts: list[list[int]], params: DiffusionParams, *, prefill_chunk: int = 4096,
             generator: torch.Generator | None = None, drafts: bool = True,
             fast: bool | None = None) -> Iterator[Event]:
    """Run block diffusion for a batch of token-id prompts; yields StepEvent/CanvasEvent, then one FinishedEvent.

    `params.seed` (if set) seeds torch's global RNG when iteration starts, which reproduces
    `torch.manual_seed(seed); model.generate(...)` in transformers. `drafts=False` skips the per-step StepEvents
    (and their device→host copies). `generator` overrides the global RNG (e.g. one per server request).
    `fast` picks the stepper: the static-shape step (a CUDA graph on GPU, engine/fast.py) or the reference step;
    None = fast on CUDA, reference on CPU. Both make the same decisions from the same logits and random draws."""
    from dgemma.engine.fast import StaticStepper

    device, C = model.embed_tokens.weight.device, model.args.canvas_length
    fast = device.type == "cuda" if fast is None else fast
    t0 = time.perf_counter()
    ids, valid = left_pad(prompts, params.pad_token_id, device)
    B, L = ids.shape
    n_canvases = math.ceil(params.max_new_tokens / C)
    cache = KVCache(model.args, B, L + n_canvases * C, device, model.embed_tokens.weight.dtype,
                    scratch=C if fast else 0)
    stepper = (StaticStepper if fast else ReferenceStepper)(model, cache, params, B, generator)
    if params.seed is not None and generator is None:
        torch.manual_seed(params.seed)  # after a CUDA graph capture, whose warm-up draws random numbers
    all_pos = torch.arange(L + n_canvases * C, device=device)
    state = _Batch(torch.zeros(B, dtype=torch.bool, device=device), torch.zeros(B, dtype=torch.long, device=device),
                   [[] for _ in range(B)])
    with torch.inference_mode():
        for start in range(0, L, prefill_chunk):  # chunked prefill: same math, bounded activation memory
            end = min(start + prefill_chunk, L)
            pos = all_pos[start:end].expand(B, -1)  # positions are column indices, padding included (as upstream)
            model.encode(ids[:, start:end], pos, cache, valid[:, start:end])
            cache.advance(end - start)
        prefill_s = time.perf_counter() - t0
        for c in range(n_canvases):
            if c > 0:  # encode the canvas committed last (pads included, as upstream) into the cache; the static
                # stepper folds this pass into the new canvas's first step (one weight stream for both passes)
                commit = stepper.fold_commit if fast else stepper.commit
                commit(state.committed[-1], all_pos[cache.length:cache.length + C].expand(B, -1))
                cache.advance(C)  # when folded, written by the next step: static passes read slot positions only
            stepper.start_canvas(all_pos[cache.length:cache.length + C][None])  # decoder positions [1, C]
            yield from _denoise_canvas(stepper, state, c, params, drafts)
            if bool(state.finished.all()):
                break
    yield _finish(prompts, state, params, prefill_s, time.perf_counter() - t0)


def _denoise_canvas(stepper, state: _Batch, c: int, params: DiffusionParams, drafts: bool) -> Iterator[Event]:
    """Denoise one canvas to the adaptive stop (or N steps), then commit it."""
    done = torch.zeros_like(state.finished)
    steps, passes_before = 0, state.passes.clone()
    for cur_step in range(params.max_denoising_steps, 0, -1):
        state.passes += ~(done | state.finished)
        argmax, accepted, done = stepper.step(cur_step)
        steps += 1
        if drafts:
            yield StepEvent(c, steps, argmax.to("cpu", copy=True), accepted.to("cpu", copy=True),
                            done.to("cpu", copy=True))
        if bool(done.all()):  # the one host sync per step: the adaptive stop
            break
    state.steps_run.append(steps)
    for b, n in enumerate((state.passes - passes_before).tolist()):
        if n:
            state.row_steps[b].append(n)
    eos = torch.tensor(params.eos_token_ids, device=argmax.device)
    tokens, state.finished = _commit(argmax, state.finished, eos, params.pad_token_id)
    if (c + 1) * argmax.shape[1] >= params.max_new_tokens:
        state.finished = torch.ones_like(state.finished)
    state.committed.append(tokens)
    yield CanvasEvent(c, tokens.to("cpu", copy=True), steps, state.finished.to("cpu", copy=True))


class ReferenceStepper:
    """The reference denoising step: transformers' ops and random draws in transformers' order."""

    def __init__(self, model, cache: KVCache, params: DiffusionParams, batch: int, generator=None):
        self.model, self.cache, self.params, self.generator = model, cache, params, generator
        self.dtype = model.embed_tokens.weight.dtype

    def commit(self, ids: torch.Tensor, pos: torch.Tensor) -> None:
        self.model.encode(ids, pos, self.cache, torch.ones_like(ids, dtype=torch.bool))

    def start_canvas(self, dpos: torch.Tensor) -> None:
        B, C, V = self.cache.batch, self.model.args.canvas_length, self.model.args.vocab_size
        self.dpos = dpos
        self.canvas = torch.randint(0, V, (B, C), device=dpos.device, generator=self.generator)
        self.argmax, self.sc = self.canvas, None
        self.done = torch.zeros(B, dtype=torch.bool, device=dpos.device)
        self.stop = S.StopState(self.params.stability_threshold, self.params.confidence_threshold)

    def step(self, cur_step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.canvas, self.argmax, self.sc, accepted, self.done = _denoise_step(
            self.model, self.canvas, self.argmax, self.sc, self.dpos, self.cache, self.done, cur_step, self.params,
            self.stop, self.generator, self.dtype)
        return self.argmax, accepted, self.done


def _denoise_step(model, canvas, argmax, sc, dpos, cache, done, cur_step, params: DiffusionParams,
                  stop: S.StopState, generator, dtype):
    """One decoder pass + entropy-bound accept/renoise, in transformers' order of ops and random draws."""
    B, C = canvas.shape
    logits = model.denoise(canvas, dpos, cache, sc)  # [B, C, V] fp32
    processed = logits / S.temperature(cur_step, params.max_denoising_steps, params.t_min, params.t_max,
                                       logits.device)
    probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
    sampled = torch.multinomial(probs.view(-1, probs.shape[-1]), 1, generator=generator).view(B, C)
    new_argmax = processed.argmax(dim=-1)
    accepted = S.accept_mask(S.entropy(processed), params.entropy_bound)
    new_canvas = torch.where(accepted, sampled, canvas)
    noise = torch.randint(0, processed.shape[-1], (B, C), device=canvas.device, generator=generator)
    new_canvas = torch.where(~accepted, noise, new_canvas)
    # Rows that already stopped keep their canvas, argmax and self-conditioning logits.
    new_argmax = torch.where(done[:, None], argmax, new_argmax)
    new_canvas = torch.where(done[:, None], canvas, new_canvas)
    if sc is not None:
        processed = torch.where(done[:, None, None], sc, processed)
    done = done | stop(new_argmax, processed)
    return new_canvas, new_argmax, processed.to(dtype), accepted, done


def _commit(argmax: torch.Tensor, finished: torch.Tensor, eos: torch.Tensor, pad_id: int):
    """Commit the argmax canvas: rows finished before become all pad; rows that hit EOS now get pad after it."""
    tokens = argmax.clone()
    tokens[finished] = pad_id
    has_eos, after = S.eos_pad_mask(tokens, eos)
    tokens[after & has_eos[:, None]] = pad_id
    return tokens, finished | has_eos


def _finish(prompts, state: _Batch, params: DiffusionParams, prefill_s: float, total_s: float) -> FinishedEvent:
    allt = torch.cat(state.committed, dim=1).tolist() if state.committed else [[] for _ in prompts]
    eos = set(params.eos_token_ids)
    outputs, seq_stats = [], []
    for b, row in enumerate(allt):
        row = row[:params.max_new_tokens]
        cut = next((i for i, t in enumerate(row) if t in eos), None)
        toks, reason = (row[:cut + 1], "stop") if cut is not None else (row, "length")
        n_pass = int(state.passes[b])
        st = SequenceStats(len(prompts[b]), len(toks), len(state.row_steps[b]), state.row_steps[b], n_pass,
                           len(toks) / n_pass if n_pass else 0.0)
        seq_stats.append(st)
        outputs.append(SequenceOutput(toks, reason, st))
    new = sum(s.new_tokens for s in seq_stats)
    all_passes = sum(s.decoder_passes for s in seq_stats)
    stats = GenerationStats(len(prompts), len(state.committed), state.steps_run, prefill_s, total_s - prefill_s,
                            total_s, new, new / all_passes if all_passes else 0.0, seq_stats)
    return FinishedEvent(outputs, stats)

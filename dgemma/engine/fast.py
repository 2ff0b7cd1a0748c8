"""Static-shape denoising step: decoder pass + sampler on preallocated buffers, captured once as a CUDA graph.

What it does: `StaticStepper` holds every per-step tensor at a fixed address (canvas, argmax canvas,
self-conditioning soft embeddings, stop history, decoder positions, the current step as a device scalar), runs
`DiffusionGemma.denoise_static` (canvas K/V go to the cache's scratch slots; masks come from slot positions on the
device) and the entropy-bound sampler with no host syncs, so the whole step replays as one CUDA graph. The cache
length lives in the cache's slot-position tensors, so the graph never needs recapturing as the prefix grows.

Notable choices:
- Sampling uses the exponential-race form of `torch.multinomial(p, 1)`: argmax(p / E), E ~ Exp(1). On the CPU this
  *is* what torch.multinomial computes, draw for draw, so on CPU the static step reproduces the reference step
  exactly. On CUDA torch.multinomial draws differently; the race samples the same distribution and is capturable.
- Self-conditioning is carried as soft embeddings [B, C, hidden] (softmax(processed logits) @ E × scale) rather
  than [B, C, V] logits; zeros on a canvas's first step are exactly "no self-conditioning".
- Sampling runs over row chunks (`sample_rows`) to bound the [rows, C, V] fp32 temporaries on GPU; on CPU one
  chunk keeps the random stream identical to the reference.
- The adaptive stop is evaluated on the device; the loop's `done.all()` is the one host sync per step.
"""

from __future__ import annotations

import os

import torch

from dgemma.config import DiffusionParams
from dgemma.engine import sampler as S
from dgemma.engine.cache import KVCache


def scores(processed: torch.Tensor, race: torch.Tensor, sc_dtype: torch.dtype):
    """Per position: the race sample argmax(p / E), the argmax, the entropy (as Categorical.entropy) and the
    self-conditioning softmax, taken (as upstream) of the scores rounded to the model dtype."""
    probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
    sc_probs = probs if sc_dtype == torch.float32 else torch.softmax(processed.to(sc_dtype), -1, dtype=torch.float32)
    return (probs / race).argmax(dim=-1), processed.argmax(dim=-1), S.entropy(processed), sc_probs


SAMPLER = {"scores": scores}


def capture_graph(fn, pool=None) -> torch.cuda.CUDAGraph:
    """Warm `fn` up twice on a side stream (allocator, cuBLAS workspaces, torch.compile), then capture it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        fn()
    return graph


def use_compiled_sampler(enabled: bool = True) -> None:
    """Opt-in (DGEMMA_COMPILE=1): fuse the passes over the [rows, C, V] fp32 scores with torch.compile."""
    SAMPLER["scores"] = torch.compile(scores, dynamic=False) if enabled else scores


class StaticStepper:
    def __init__(self, model, cache: KVCache, params: DiffusionParams, batch: int, generator=None,
                 use_graph: bool | None = None, sample_rows: int | None = None):
        args = model.args
        dev, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
        assert cache.scratch == args.canvas_length, "the static step needs a cache built with scratch=canvas_length"
        self.model, self.cache, self.params, self.generator = model, cache, params, generator
        B, C, V = batch, args.canvas_length, args.vocab_size
        self.sample_rows = sample_rows or (B if dev.type == "cpu" else max(1, min(B, 4)))
        self.canvas = torch.zeros(B, C, dtype=torch.long, device=dev)
        self.argmax = torch.zeros_like(self.canvas)
        self.accepted = torch.zeros(B, C, dtype=torch.bool, device=dev)
        self.done = torch.zeros(B, dtype=torch.bool, device=dev)
        self.soft = torch.zeros(B, C, args.hidden_size, dtype=dtype, device=dev)
        self.stop = S.StopState(params.stability_threshold, params.confidence_threshold, (B, C), dev)
        self.dpos = torch.zeros(1, C, dtype=torch.long, device=dev)
        self.cur_step = torch.zeros((), dtype=torch.int32, device=dev)
        self.enc_ids = torch.zeros(B, C, dtype=torch.long, device=dev)  # committed canvas → encoder (commit pass)
        self.enc_pos = torch.zeros(B, C, dtype=torch.long, device=dev)
        self.vocab = V
        self.graph: torch.cuda.CUDAGraph | None = None
        self.commit_graph: torch.cuda.CUDAGraph | None = None
        if os.environ.get("DGEMMA_COMPILE") == "1" and dev.type == "cuda":  # opt-in fused elementwise kernels
            from dgemma.models.diffusion_gemma import use_compiled_kernels

            use_compiled_kernels()
            use_compiled_sampler()
        if use_graph is None:  # fp32 attention takes sdpa's math path, which copies a host scalar: not capturable
            use_graph = dev.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
        if use_graph:
            self._capture()

    # --- per canvas / per step (host side: launches only, no syncs) -----------------------------------------
    def start_canvas(self, dpos: torch.Tensor) -> None:
        self.dpos.copy_(dpos)
        self.canvas.copy_(torch.randint(0, self.vocab, self.canvas.shape, device=self.canvas.device,
                                        generator=self.generator))
        self.argmax.copy_(self.canvas)
        self.soft.zero_()
        self.done.zero_()
        self.stop.reset()

    def commit(self, ids: torch.Tensor, pos: torch.Tensor) -> None:
        """Encode a committed canvas ids/pos [B, C] into the cache (static shapes; replayed graph on GPU)."""
        self.enc_ids.copy_(ids)
        self.enc_pos.copy_(pos)
        if self.commit_graph is not None:
            self.commit_graph.replay()
        else:
            with torch.inference_mode():
                self.model.encode_static(self.enc_ids, self.enc_pos, self.cache)

    def step(self, cur_step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.cur_step.fill_(cur_step)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()
        return self.argmax, self.accepted, self.done

    # --- the captured body ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def _step(self) -> None:
        p, model = self.params, self.model
        logits = model.denoise_static(self.canvas, self.dpos, self.cache, self.soft)  # [B, C, V] fp32
        temp = S.temperature(self.cur_step, p.max_denoising_steps, p.t_min, p.t_max, logits.device)
        B = logits.shape[0]
        sampled, new_argmax, accepted, soft, confident = [], [], [], [], []
        for r in range(0, B, self.sample_rows):  # all exponential draws precede the renoise draw, as upstream
            processed = logits[r:r + self.sample_rows] / temp
            race = torch.empty_like(processed).exponential_(generator=self.generator)
            sample, amax, h, probs = SAMPLER["scores"](processed, race, self.soft.dtype)
            sampled.append(sample)
            new_argmax.append(amax)
            accepted.append(S.accept_mask(h, p.entropy_bound))
            confident.append(self.stop.confident(h))
            soft.append(model.soft_from_probs(probs, self.soft.dtype))
        accepted_t = torch.cat(accepted)
        new_canvas = torch.where(accepted_t, torch.cat(sampled), self.canvas)
        noise = torch.randint(0, self.vocab, self.canvas.shape, device=self.canvas.device, generator=self.generator)
        new_canvas = torch.where(~accepted_t, noise, new_canvas)
        done = self.done[:, None]
        new_argmax_t = torch.where(done, self.argmax, torch.cat(new_argmax))
        stop = self.stop.stable(new_argmax_t) & torch.cat(confident)
        self.canvas.copy_(torch.where(done, self.canvas, new_canvas))
        self.argmax.copy_(new_argmax_t)
        self.soft.copy_(torch.where(done[..., None], self.soft, torch.cat(soft)))
        self.accepted.copy_(accepted_t)
        self.done.copy_(self.done | stop)

    def _capture(self) -> None:
        """Capture one step and one commit pass. Runs before the prefill: the warm-up commits write junk slots,
        so the cache is cleared afterwards."""
        self.enc_pos.copy_(torch.arange(self.enc_pos.shape[1], device=self.enc_pos.device).expand_as(self.enc_pos))
        self.graph = capture_graph(self._step)
        self.commit_graph = capture_graph(
            torch.inference_mode()(lambda: self.model.encode_static(self.enc_ids, self.enc_pos, self.cache)),
            pool=self.graph.pool())
        self.cache.clear()

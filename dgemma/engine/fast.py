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
- The commit pass is folded into the next canvas's first step (`fold_commit`): one forward over the committed canvas
  (encoder role: it writes its K/V into the cache) and the new canvas (decoder role), so the weights, which bound a
  batch-1 pass, are streamed once for both (`DiffusionGemma.denoise_folded_static`); a third graph, `first_graph`.

`BatchStepper` is the same step for the scheduler's continuous batch (engine/scheduler.py): rows 0..n-1 of one
cache, each row at its own positions with its own knobs (steps, temperatures, entropy bound, stop thresholds, all
device tensors so one graph per batch size serves every mix) and its own random stream. Graphs are captured once
per batch bucket (1, 2, 4, ... <= max_batch) over row views of the shared buffers; rows beyond the busy ones are
frozen (done) padding whose cache is never written (the commit pass writes only the rows it is told to).
Sampling and random streams, by path (each row's draws depend only on its own request, never on its batch mates,
its row or the bucket):
- The fused sampler (`fused_sampler`: CUDA, bf16/fp16, Triton), graph or eager: one `fused_sample` call over all
  rows (per-row temperature, Philox key `row_seed` and step counter `noise_step`) and one soft-embedding GEMM. Each
  row's generator is its request's: at the canvas start it draws the canvas and the row's Philox key, and before
  each step the row denoises (host side, between replays; not while frozen) its replacement tokens. These are the
  draws of `StaticStepper` (`generate`) at batch 1 from a generator seeded alike, call for call, so a request alone
  has `generate`'s random stream; its tokens are `generate`'s wherever the logits are bitwise equal (`generate`
  folds each commit into the next step and sizes its cache to the request; bucket sizes change the GEMM shapes).
- The torch sampler eagerly (the CPU, fp32 on CUDA, `fast=False`): one row at a time, each from its request's
  generator, a frozen row drawing nothing, so a request's draws are exactly those of `generate` at batch 1.
- The torch sampler in a CUDA graph (DGEMMA_TRITON=0): every row draws every step (the draws are captured), from a
  per-row generator registered with the graphs and reseeded at each canvas start from the request's seed and the
  canvas index: batch-independent, but not `generate`'s stream.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

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


# "scores": the torch sampler passes (torch.compile'd with DGEMMA_COMPILE); "fused_sample": the Triton sampler
# (kernels/sampler.py) that `configure_cuda_kernels` installs on CUDA, None elsewhere.
SAMPLER = {"scores": scores, "fused_sample": None}


def fused_sampler(device: torch.device, dtype: torch.dtype):
    """The Triton sampler where both steppers use it: on CUDA in bf16/fp16, once `configure_cuda_kernels` installed
    it; else None (the exponential race in torch on the generator's draws, as the reference step; fp32 on CUDA
    included). Tests patch this function to force the fused path on the CPU."""
    half = dtype in (torch.bfloat16, torch.float16)
    return SAMPLER["fused_sample"] if device.type == "cuda" and half else None


def sample_raw(fused_sample, model, raw: torch.Tensor, temp: torch.Tensor, seed: torch.Tensor, step: torch.Tensor,
               dtype: torch.dtype):
    """Both steppers' fused sampling: the Triton sampler over the raw LM-head output [B, C, V] (softcap inside; per-row
    or single temperature, Philox keys `seed`, counters `step`, advanced in place: captured, every replay draws fresh
    noise), then one soft-embedding GEMM → sample, argmax, entropy [B, C] and soft [B, C, hidden] in `dtype`."""
    B, C, V = raw.shape
    sample, amax, h, probs = fused_sample(raw.view(B * C, V), temp, seed, step, probs_dtype=dtype,
                                          softcap=model.args.final_logit_softcapping or 0.0)
    step.add_(1)
    soft = model.soft_from_probs(probs.view(B, C, V), dtype)  # probs already in the model dtype
    return sample.view(B, C), amax.view(B, C), h.view(B, C), soft


def capture_graph(fn, pool=None, generators=()) -> torch.cuda.CUDAGraph:
    """Warm `fn` up twice on a side stream (allocator, cuBLAS workspaces, torch.compile), then capture it.
    `generators`: non-default CUDA generators that `fn` draws from (registered so replays advance them)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    for gen in generators:  # CUDA-only, untested on CPU machines
        graph.register_generator_state(gen)
    with torch.cuda.graph(graph, pool=pool):
        fn()
    return graph


def use_compiled_sampler(enabled: bool = True) -> None:
    """Opt-in (DGEMMA_COMPILE=1): fuse the passes over the [rows, C, V] fp32 scores with torch.compile."""
    SAMPLER["scores"] = torch.compile(scores, dynamic=False) if enabled else scores


def configure_cuda_kernels(device: torch.device) -> None:
    """On CUDA, pick the step's kernels once per process: the Triton kernels (dgemma/kernels: canvas attention,
    fused MoE for big passes) unless DGEMMA_TRITON=0, and torch.compile'd blocks (fused norms, feed-forward block,
    attention projections, sampler passes) unless DGEMMA_COMPILE=0. Compiling costs about a minute at the real
    shape the first time (inductor caches it on disk); `dgemma run` sets DGEMMA_COMPILE=0 unless you set it."""
    if device.type != "cuda" or getattr(configure_cuda_kernels, "done", False):
        return
    from dgemma.kernels import available as kernels_available
    from dgemma.models.diffusion_gemma import use_compiled_kernels, use_triton_kernels

    triton_ = os.environ.get("DGEMMA_TRITON", "1") != "0"
    use_triton_kernels(triton_)
    if triton_ and kernels_available(device):
        from dgemma.kernels.sampler import fused_sample

        SAMPLER["fused_sample"] = fused_sample
    compile_ = os.environ.get("DGEMMA_COMPILE", "1") != "0"
    use_compiled_kernels(compile_)
    use_compiled_sampler(compile_)
    configure_cuda_kernels.done = True


def fuse_for_cuda(model, device: torch.device) -> None:
    """On CUDA, stack each layer's q/k/v and gate/up weights so each group is one GEMM (models/fusion.py) unless
    DGEMMA_FUSE=0. Every stepper calls it before capturing graphs (a graph records the weights' addresses), so every
    fast-path model is stacked whatever built it (loader, LoRA merge, random bench weights); once stacked it is a
    no-op. Not on the CPU, where the static step must reproduce the reference step bit for bit."""
    if device.type == "cuda" and os.environ.get("DGEMMA_FUSE", "1") != "0":
        from dgemma.models.fusion import fuse_projections

        fuse_projections(model)


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
        self.fold_pending = False  # enc_ids/enc_pos hold a commit that the next step runs in its forward
        self.vocab = V
        self.graph: torch.cuda.CUDAGraph | None = None
        self.commit_graph: torch.cuda.CUDAGraph | None = None
        self.first_graph: torch.cuda.CUDAGraph | None = None  # a step with the commit pass folded in
        configure_cuda_kernels(dev)
        fuse_for_cuda(model, dev)
        # On CUDA with Triton, in bf16/fp16, the sampler is one fused kernel with Philox noise keyed by a per-row seed
        # (drawn from the generator at each canvas start) and a step counter. Elsewhere, fp32 on CUDA included, the
        # exponential race in torch draws from the generator, as the reference and the scheduler's eager rows do.
        self.fused_sample = fused_sampler(dev, dtype)
        self.noise_seed = torch.zeros(B, dtype=torch.int64, device=dev)
        self.noise_step = torch.zeros(1, dtype=torch.int64, device=dev)
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
        if self.fused_sample is not None:
            self.noise_seed.copy_(torch.randint(0, 2**62, self.noise_seed.shape, device=self.noise_seed.device,
                                                generator=self.generator))
            self.noise_step.zero_()  # a canvas's draws depend on its seed and step only
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

    def fold_commit(self, ids: torch.Tensor, pos: torch.Tensor) -> None:
        """`commit`, deferred into the next `step`: that step encodes ids/pos [B, C] into the cache in the same
        forward as its decoder pass (one weight stream for both). Same cache entries, same logits as `commit` then
        `step`; the cache is complete once that step has run."""
        self.enc_ids.copy_(ids)
        self.enc_pos.copy_(pos)
        self.fold_pending = True

    def step(self, cur_step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.cur_step.fill_(cur_step)
        fold, self.fold_pending = self.fold_pending, False
        graph = self.first_graph if fold else self.graph
        if graph is not None:
            graph.replay()
        else:
            self._step(fold)
        return self.argmax, self.accepted, self.done

    # --- the captured body ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def _step(self, fold: bool = False) -> None:
        p, model = self.params, self.model
        raw = self.fused_sample is not None  # the fused sampler applies the softcap to the raw LM-head output
        if fold:  # the commit pass of enc_ids rides along (fold_commit)
            logits = model.denoise_folded_static(self.enc_ids, self.enc_pos, self.canvas, self.dpos, self.cache,
                                                 self.soft, raw)  # [B, C, V]
        else:
            logits = model.denoise_static(self.canvas, self.dpos, self.cache, self.soft, raw)  # [B, C, V]
        temp = S.temperature(self.cur_step, p.max_denoising_steps, p.t_min, p.t_max, logits.device)
        if self.fused_sample is not None:
            sampled, new_argmax, accepted, confident, soft = self._sample_fused(logits, temp)
        else:
            sampled, new_argmax, accepted, confident, soft = self._sample_torch(logits, temp)
        new_canvas = torch.where(accepted, sampled, self.canvas)
        noise = torch.randint(0, self.vocab, self.canvas.shape, device=self.canvas.device, generator=self.generator)
        new_canvas = torch.where(~accepted, noise, new_canvas)
        done = self.done[:, None]
        new_argmax = torch.where(done, self.argmax, new_argmax)
        stop = self.stop.stable(new_argmax) & confident
        self.canvas.copy_(torch.where(done, self.canvas, new_canvas))
        self.argmax.copy_(new_argmax)
        self.soft.copy_(torch.where(done[..., None], self.soft, soft))
        self.accepted.copy_(accepted)
        self.done.copy_(self.done | stop)

    def _sample_fused(self, logits: torch.Tensor, temp: torch.Tensor):
        """The Triton sampler: one read of the raw LM-head output (softcap inside); → sampled, argmax, accepted,
        confident [B, C]/[B], soft."""
        sample, amax, h, soft = sample_raw(self.fused_sample, self.model, logits, temp.reshape(1), self.noise_seed,
                                           self.noise_step, self.soft.dtype)
        return sample, amax, S.accept_mask(h, self.params.entropy_bound), self.stop.confident(h), soft

    def _sample_torch(self, logits: torch.Tensor, temp: torch.Tensor):
        """The torch sampler over row chunks; all exponential draws precede the renoise draw, as upstream."""
        parts = []
        for r in range(0, logits.shape[0], self.sample_rows):
            processed = logits[r:r + self.sample_rows] / temp
            race = torch.empty_like(processed).exponential_(generator=self.generator)
            sample, amax, h, probs = SAMPLER["scores"](processed, race, self.soft.dtype)
            parts.append((sample, amax, S.accept_mask(h, self.params.entropy_bound), self.stop.confident(h),
                          self.model.soft_from_probs(probs, self.soft.dtype)))
        return tuple(torch.cat(t) for t in zip(*parts))

    def _capture(self) -> None:
        """Capture one step, one commit pass and one folded first step (one memory pool: never replayed at once).
        Runs before the prefill: the warm-up commits write junk slots, so the cache is cleared afterwards."""
        self.enc_pos.copy_(torch.arange(self.enc_pos.shape[1], device=self.enc_pos.device).expand_as(self.enc_pos))
        self.graph = capture_graph(self._step)
        self.commit_graph = capture_graph(
            torch.inference_mode()(lambda: self.model.encode_static(self.enc_ids, self.enc_pos, self.cache)),
            pool=self.graph.pool())
        self.first_graph = capture_graph(lambda: self._step(fold=True), pool=self.graph.pool())
        self.cache.clear()


@dataclass
class RowSpec:
    """A busy row of the `BatchStepper` at a canvas start."""

    start: int  # position of the canvas's first token (= positions cached in the row)
    params: DiffusionParams  # the request's knobs
    generator: torch.Generator | None  # the request's own random stream (eager, and the fused sampler)
    canvas_seed: int  # graph mode with the torch sampler: the row's generator is reseeded with this


def default_buckets(max_batch: int) -> list[int]:
    """Batch sizes with a captured graph: powers of two below max_batch, and max_batch."""
    return sorted({b for b in (1, 2, 4, 8, 16, 32, 64) if b < max_batch} | {max_batch})


class BatchStepper:
    """The static denoising step over rows 0..n-1 of a shared cache, every row with its own positions, knobs, stop
    state and random stream (see the module docstring). The scheduler owns which request sits in which row."""

    def __init__(self, model, cache: KVCache, max_batch: int, *, max_stability: int = 8,
                 use_graph: bool | None = None, buckets: list[int] | None = None):
        args = model.args
        dev, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
        assert cache.scratch == args.canvas_length, "the static step needs a cache built with scratch=canvas_length"
        assert cache.batch >= max_batch
        self.model, self.cache, self.device = model, cache, dev
        B, C, self.vocab = max_batch, args.canvas_length, args.vocab_size
        self.canvas = torch.zeros(B, C, dtype=torch.long, device=dev)
        self.argmax = torch.zeros_like(self.canvas)
        self.accepted = torch.zeros(B, C, dtype=torch.bool, device=dev)
        self.done = torch.ones(B, dtype=torch.bool, device=dev)
        self.soft = torch.zeros(B, C, args.hidden_size, dtype=dtype, device=dev)
        self.dpos = torch.zeros(B, C, dtype=torch.long, device=dev)  # each row's canvas positions
        # Per-row knobs (device tensors: graphs read them at replay). cur counts down N..1 like cur_step.
        self.cur = torch.ones(B, dtype=torch.int32, device=dev)
        self.steps = torch.ones(B, dtype=torch.int32, device=dev)
        self.t_min = torch.full((B,), 0.5, dtype=torch.float32, device=dev)
        self.t_span = torch.full((B,), 0.5, dtype=torch.float32, device=dev)  # t_max - t_min (rounded once)
        self.bound = torch.full((B,), 0.1, dtype=torch.float32, device=dev)
        self.confidence = torch.full((B,), 0.005, dtype=torch.float32, device=dev)
        self.stability = torch.zeros(B, dtype=torch.long, device=dev)
        self.max_stability = max_stability
        self.history = torch.full((max(1, max_stability), B, C), -1, dtype=torch.long, device=dev)
        self.enc_ids = torch.zeros(B, C, dtype=torch.long, device=dev)
        self.enc_pos = torch.arange(C, device=dev).repeat(B, 1)
        self.enc_rows = torch.zeros(B, dtype=torch.bool, device=dev)  # rows whose committed canvas is written
        self.buckets = sorted(buckets) if buckets else default_buckets(max_batch)
        assert self.buckets[-1] >= max_batch
        self.views = {n: cache.view(slice(0, n)) for n in self.buckets}
        configure_cuda_kernels(dev)
        fuse_for_cuda(model, dev)
        # The fused sampler's per-row state: Philox key (drawn at the canvas start), the row's own step count (the
        # Philox offset), and the replacement tokens of the coming step (drawn on the host side before it).
        self.fused_sample = fused_sampler(dev, dtype)
        self.row_seed = torch.zeros(B, dtype=torch.int64, device=dev)
        self.noise_step = torch.zeros(B, dtype=torch.int64, device=dev)
        self.renoise = torch.zeros(B, C, dtype=torch.long, device=dev)
        if use_graph is None:  # as StaticStepper: fp32 sdpa's math path is not capturable
            use_graph = dev.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
        self.use_graph = use_graph
        self.gens: list[torch.Generator | None] = [None] * B  # the generator each row draws from this canvas
        # Only the torch sampler draws inside the graph: from per-row generators registered with it.
        captured_draws = use_graph and self.fused_sample is None
        self.row_gens = [torch.Generator(device=dev) for _ in range(B)] if captured_draws else []
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.commit_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if use_graph:
            self._capture()

    def bucket(self, n: int) -> int:
        """The smallest captured batch size that holds n rows."""
        return next(b for b in self.buckets if b >= n)

    # --- per canvas / per step (host side) -------------------------------------------------------------------
    def start_canvas(self, specs: list[RowSpec]) -> int:
        """Rows 0..len(specs)-1 start a canvas; the rest of the bucket is frozen padding. Returns the bucket."""
        n, C, dev = len(specs), self.canvas.shape[1], self.device
        nb = self.bucket(n)
        for r, spec in enumerate(specs):
            gen = spec.generator
            if self.row_gens:  # the captured draws read this row's generator
                gen = self.row_gens[r]
                gen.manual_seed(spec.canvas_seed)
            self.gens[r] = gen
            self.canvas[r].copy_(torch.randint(0, self.vocab, (1, C), device=dev, generator=gen)[0])
            if self.fused_sample is not None:  # then the Philox key, as StaticStepper.start_canvas at batch 1
                self.row_seed[r:r + 1].copy_(torch.randint(0, 2**62, (1,), device=dev, generator=gen))
        for r in range(n, nb):
            self.gens[r] = self.row_gens[r] if self.row_gens else None
        pad = specs[0].params if specs else None
        ps = [s.params for s in specs] + [pad] * (nb - n)
        rows = slice(0, nb)
        self.dpos[rows].copy_(torch.stack([torch.arange(s.start, s.start + C) for s in specs]
                                          + [torch.arange(C)] * (nb - n)))
        self.steps[rows].copy_(torch.tensor([p.max_denoising_steps for p in ps], dtype=torch.int32))
        self.cur[rows].copy_(self.steps[rows])
        self.t_min[rows].copy_(torch.tensor([p.t_min for p in ps], dtype=torch.float32))
        self.t_span[rows].copy_(torch.tensor([p.t_max - p.t_min for p in ps], dtype=torch.float32))
        self.bound[rows].copy_(torch.tensor([p.entropy_bound for p in ps], dtype=torch.float32))
        self.confidence[rows].copy_(torch.tensor([p.confidence_threshold for p in ps], dtype=torch.float32))
        self.stability[rows].copy_(torch.tensor([p.stability_threshold for p in ps], dtype=torch.long))
        self.done[rows].copy_(torch.arange(nb) >= n)
        self.canvas[n:nb].zero_()
        self.argmax[rows].copy_(self.canvas[rows])
        self.soft[rows].zero_()
        self.history[:, rows].fill_(-1)
        self.noise_step[rows].zero_()
        return nb

    def freeze(self, row: int) -> None:
        """Stop denoising one row now (a cancelled request); its canvas is left as it is."""
        self.done[row] = True

    def step(self, nb: int, live: list[bool] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One denoising step of rows 0..nb-1 → (argmax canvas [nb, C], accepted [nb, C], done [nb]) views.
        live: per row, still denoising as of the caller's last sync of `done` (rows past its end: no); None reads
        `done` here (a host sync). The fused sampler's live rows draw their replacement tokens now."""
        if self.fused_sample is not None:
            if live is None:
                live = (~self.done[:nb]).tolist()
            for r, alive in enumerate(live[:nb]):
                if alive:  # as StaticStepper's per-step randint at batch 1: one [C] draw from the row's stream
                    self.renoise[r].random_(0, self.vocab, generator=self.gens[r])
        if nb in self.graphs:
            self.graphs[nb].replay()
        else:
            self._step(nb)
        return self.argmax[:nb], self.accepted[:nb], self.done[:nb]

    def commit(self, nb: int, items: list[tuple[int, torch.Tensor, int]]) -> None:
        """Encode committed canvases into the cache: items (row, ids [C], start position); other rows of the bucket
        are computed but not written."""
        C = self.canvas.shape[1]
        ids, pos = torch.zeros(nb, C, dtype=torch.long), torch.arange(C).repeat(nb, 1)
        rows = torch.zeros(nb, dtype=torch.bool)
        for r, tokens, start in items:
            ids[r], pos[r], rows[r] = tokens, torch.arange(start, start + C), True
        self.enc_ids[:nb].copy_(ids)
        self.enc_pos[:nb].copy_(pos)
        self.enc_rows[:nb].copy_(rows)
        if nb in self.commit_graphs:
            self.commit_graphs[nb].replay()
        else:
            self._commit(nb)

    # --- the captured bodies ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def _commit(self, nb: int) -> None:
        self.model.encode_static(self.enc_ids[:nb], self.enc_pos[:nb], self.views[nb], self.enc_rows[:nb])

    @torch.inference_mode()
    def _step(self, nb: int) -> None:
        canvas, argmax, soft, done = self.canvas[:nb], self.argmax[:nb], self.soft[:nb], self.done[:nb]
        fused = self.fused_sample is not None  # it applies the softcap to the raw LM-head output itself
        logits = self.model.denoise_static(canvas, self.dpos[:nb], self.views[nb], soft, fused)  # [nb, C, V]
        temp = self.t_min[:nb] + self.t_span[:nb] * (self.cur[:nb] / self.steps[:nb])  # as S.temperature, per row
        sample = self._sample_fused if fused else self._sample_rows
        sampled, new_argmax, accepted, confident, new_soft, noise = sample(logits, temp)
        new_canvas = torch.where(accepted, sampled, noise)
        keep = done[:, None]
        new_argmax = torch.where(keep, argmax, new_argmax)
        stop = S.stable_rows(self.history[:, :nb], new_argmax, self.stability[:nb]) & confident
        last = self.cur[:nb] <= 1  # the row ran its max_denoising_steps
        canvas.copy_(torch.where(keep, canvas, new_canvas))
        argmax.copy_(new_argmax)
        soft.copy_(torch.where(keep[..., None], soft, new_soft))
        self.accepted[:nb].copy_(accepted)
        done.copy_(done | stop | last)
        self.cur[:nb].copy_(torch.clamp(self.cur[:nb] - 1, min=1))

    def _sample_fused(self, raw: torch.Tensor, temp: torch.Tensor):
        """The Triton sampler over every row in one call, then one soft-embedding GEMM. A row's race noise is keyed
        by its own seed and step count, so it does not depend on its batch mates (frozen rows draw too; their
        results are discarded). → sampled, argmax, accepted, confident, soft, replacement tokens."""
        nb = raw.shape[0]
        sample, amax, h, soft = sample_raw(self.fused_sample, self.model, raw, temp, self.row_seed[:nb],
                                           self.noise_step[:nb], self.soft.dtype)
        return (sample, amax, S.accept_mask(h, self.bound[:nb, None]), h.mean(dim=-1) < self.confidence[:nb], soft,
                self.renoise[:nb])

    def _sample_rows(self, logits: torch.Tensor, temp: torch.Tensor):
        """The torch sampler one row at a time: its own generator, bounded [1, C, V] fp32 temporaries. Eagerly a
        frozen row draws nothing (a request's stream is the one it would have alone); in a graph every row draws."""
        nb, C = logits.shape[:2]
        frozen = [False] * nb if self.use_graph else self.done[:nb].tolist()
        sampled, new_argmax, accepted, confident, new_soft, noise = [], [], [], [], [], []
        for r in range(nb):
            processed = logits[r:r + 1] / temp[r]
            race = torch.empty_like(processed)
            if frozen[r]:
                race.fill_(1.0)
            else:
                race.exponential_(generator=self.gens[r])
            sample, amax, h, probs = SAMPLER["scores"](processed, race, self.soft.dtype)
            sampled.append(sample)
            new_argmax.append(amax)
            accepted.append(S.accept_mask(h, self.bound[r]))
            confident.append(h.mean(dim=-1) < self.confidence[r])
            new_soft.append(self.model.soft_from_probs(probs, self.soft.dtype))
            noise.append(self.canvas[r:r + 1] if frozen[r] else
                         torch.randint(0, self.vocab, (1, C), device=self.device, generator=self.gens[r]))
        return tuple(torch.cat(t) for t in (sampled, new_argmax, accepted, confident, new_soft, noise))

    def _capture(self) -> None:
        """CUDA only: capture one step and one commit graph per bucket (before any request: the warm-up runs touch
        only scratch slots, and the commit rows mask is all False)."""
        self.enc_rows.zero_()
        self.done.fill_(True)
        pool = None
        for nb in self.buckets:
            gens = self.row_gens[:nb]
            for r, gen in enumerate(gens):
                self.gens[r] = gen
            self.graphs[nb] = capture_graph(lambda nb=nb: self._step(nb), pool, gens)
            pool = pool or self.graphs[nb].pool()
            self.commit_graphs[nb] = capture_graph(lambda nb=nb: self._commit(nb), pool)

"""The static-shape fast path (engine/fast.py) against the reference path, on CPU (the CUDA-graph replay itself is
covered in tests/test_gpu.py), and the scheduler's `BatchStepper` on the fused sampler's path, forced on the CPU:
each row steps as `StaticStepper` steps it alone."""

from types import SimpleNamespace

import pytest
import torch

from dgemma import LLM, SamplingParams
from dgemma.config import DiffusionParams
from dgemma.engine.cache import KVCache
from dgemma.engine.fast import BatchStepper, RowSpec, StaticStepper, scores
from dgemma.engine.generate import ReferenceStepper, generate


@pytest.mark.parametrize("name", ["a", "b", "c", "d"])
@pytest.mark.parametrize("lengths", [(5,), (40, 29)])
def test_static_decoder_logits_match_reference(tiny_ckpt, name, lengths):
    from test_parity import padded_batch

    llm = LLM(tiny_ckpt(name), device="cpu")
    model, args = llm.model, llm.args
    ids, mask = padded_batch(args.vocab_size, lengths, seed=7)
    B, L, C = *ids.shape, args.canvas_length
    ref_cache = KVCache(args, B, L + C, "cpu", torch.float32)
    fast_cache = KVCache(args, B, L + C, "cpu", torch.float32, scratch=C)
    for cache in (ref_cache, fast_cache):
        model.encode(ids, torch.arange(L).expand(B, -1), cache, mask.bool())
        cache.advance(L)
    canvas = torch.randint(0, args.vocab_size, (B, C), generator=torch.Generator().manual_seed(3))
    sc = 3 * torch.randn(B, C, args.vocab_size, generator=torch.Generator().manual_seed(4))
    dpos = torch.arange(L, L + C)[None]
    with torch.no_grad():
        for signal in (None, sc):
            ref = model.denoise(canvas, dpos, ref_cache, signal)
            soft = torch.zeros(B, C, args.hidden_size) if signal is None else model.soft_embed(signal, torch.float32)
            fast = model.denoise_static(canvas, dpos, fast_cache, soft)
            assert (ref - fast).abs().max() <= 1e-4


class TableModel(torch.nn.Module):
    """Stands in for the network: logits depend on the canvas only, identically in both paths."""

    def __init__(self, vocab=50, canvas=12, hidden=4):
        super().__init__()
        self.args = SimpleNamespace(canvas_length=canvas, vocab_size=vocab, hidden_size=hidden)
        self.embed_tokens = torch.nn.Embedding(vocab, hidden)
        g = torch.Generator().manual_seed(0)
        self.table = torch.randn(vocab, vocab, generator=g)
        self.by_position = torch.randn(canvas, vocab, generator=g) * 8  # dominant: the draft can settle

    def denoise(self, canvas, dpos, cache, sc=None):
        return 0.05 * self.table[canvas] + self.by_position[None] + 0.01 * dpos[..., None].float()

    def denoise_static(self, canvas, dpos, cache, soft, raw=False):
        assert not raw, "raw LM-head output is only asked for by the CUDA fused sampler"
        return self.denoise(canvas, dpos, cache)

    def soft_embed(self, logits, dtype):
        return torch.zeros(*logits.shape[:-1], self.args.hidden_size, dtype=dtype)

    def soft_from_probs(self, probs, dtype):
        return self.soft_embed(probs, dtype)


def step_trace(stepper, steps: int, state: str) -> list[tuple[torch.Tensor, ...]]:
    """Run `steps` denoising steps; per step, copies of (argmax, accepted, done, stepper.<state>)."""
    trace = []
    for cur in range(steps, 0, -1):
        argmax, accepted, done = stepper.step(cur)
        trace.append((argmax.clone(), accepted.clone(), done.clone(), getattr(stepper, state).clone()))
    return trace


@pytest.mark.parametrize("stability", [0, 1, 2])
def test_static_sampler_makes_identical_decisions(stability):
    """Same logits and the same random stream → the same canvas, draft, accept mask and stop at every step."""
    model = TableModel()
    B, C = 3, model.args.canvas_length
    params = SamplingParams(max_denoising_steps=12, t_min=0.1, t_max=0.9, entropy_bound=0.3,
                            confidence_threshold=0.5, stability_threshold=stability).resolve(DiffusionParams())
    cache = SimpleNamespace(batch=B, scratch=C)
    dpos = torch.arange(100, 100 + C)[None]
    runs = []
    for cls in (ReferenceStepper, StaticStepper):
        torch.manual_seed(11)
        stepper = cls(model, cache, params, B)
        stepper.start_canvas(dpos)
        runs.append(step_trace(stepper, params.max_denoising_steps, "canvas"))
    for ref, fast in zip(*runs):
        for a, b in zip(ref, fast):
            assert torch.equal(a, b)
    assert runs[0][-1][2].any()  # the adaptive stop fires in these settings, so that path is compared too


def test_race_sampling_is_torch_multinomial_on_cpu():
    probs = torch.softmax(torch.randn(64, 300) * 3, dim=-1)
    torch.manual_seed(5)
    a = torch.multinomial(probs, 1).squeeze(-1)
    torch.manual_seed(5)
    b = (probs / torch.empty_like(probs).exponential_()).argmax(-1)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_fast_generate_matches_reference_on_cpu(tiny_ckpt, name):
    """End to end. (Config "d" is left out: its self-conditioning at t_min=0.05 amplifies the 1e-5 logit rounding
    difference between the two attention layouts until a decision flips; the decisions themselves are tested above.)"""
    llm = LLM(tiny_ckpt(name), device="cpu")
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        prompts = [torch.randint(3, llm.args.vocab_size, (n,), generator=g).tolist() for n in (13, 9, 20)[: 1 + seed]]
        p = SamplingParams(seed=seed, max_new_tokens=50, max_denoising_steps=10, t_min=0.05, t_max=0.3,
                           entropy_bound=0.5, confidence_threshold=0.3).resolve(llm.defaults)
        ref = list(generate(llm.model, prompts, p, fast=False, drafts=False))[-1]
        fast = list(generate(llm.model, prompts, p, fast=True, drafts=False))[-1]
        assert [o.token_ids for o in fast.outputs] == [o.token_ids for o in ref.outputs]
        assert [o.stats.steps_per_canvas for o in fast.outputs] == [o.stats.steps_per_canvas for o in ref.outputs]


@pytest.mark.parametrize("name", ["a", "d"])
@pytest.mark.parametrize("prompt_len", [3, 40])
def test_static_commit_pass_writes_the_same_cache(tiny_ckpt, name, prompt_len):
    """encode_static (the graph-captured commit pass) writes the same K/V and slot positions as encode."""
    llm = LLM(tiny_ckpt(name), device="cpu")
    model, args, B, L = llm.model, llm.args, 2, prompt_len
    C = args.canvas_length
    ids = torch.randint(3, args.vocab_size, (B, L), generator=torch.Generator().manual_seed(1))
    canvas = torch.randint(0, args.vocab_size, (B, C), generator=torch.Generator().manual_seed(2))
    ref, fast = KVCache(args, B, L + 2 * C, "cpu", torch.float32), KVCache(args, B, L + 2 * C, "cpu", torch.float32,
                                                                           scratch=C)
    with torch.no_grad():
        for cache in (ref, fast):
            model.encode(ids, torch.arange(L).expand(B, -1), cache)
            cache.advance(L)
        h_ref = model.encode(canvas, torch.arange(L, L + C).expand(B, -1), ref)
        h_fast = model.encode_static(canvas, torch.arange(L, L + C).expand(B, -1), fast)
    for cache in (ref, fast):
        cache.advance(C)
    assert (h_ref - h_fast).abs().max() <= 1e-4
    for layer in range(args.num_hidden_layers):
        (k1, v1, p1), (k2, v2, p2) = ref.read(layer), fast.read(layer)
        assert torch.equal(p1, p2)
        assert (k1 - k2).abs().max() <= 1e-4 and (v1 - v2).abs().max() <= 1e-4


def test_static_encoder_decodes_autoregressively_like_encode(tiny_ckpt):
    """The `bench --ar` path (one token per encode_static) makes the same greedy tokens as `encode`."""
    llm = LLM(tiny_ckpt("b"), device="cpu")
    model, args, L = llm.model, llm.args, 20
    prompt = torch.randint(3, args.vocab_size, (1, L), generator=torch.Generator().manual_seed(3))
    outs = []
    for static in (False, True):
        cache = KVCache(args, 1, L + 16, "cpu", torch.float32, scratch=1)
        with torch.no_grad():
            h = model.encode(prompt, torch.arange(L)[None], cache)
            cache.advance(L)
            tokens = [int(model.lm_head(h[:, -1]).argmax())]
            for i in range(10):
                tok, pos = torch.tensor([[tokens[-1]]]), torch.tensor([[L + i]])
                h = model.encode_static(tok, pos, cache) if static else model.encode(tok, pos, cache)
                cache.advance(1)
                tokens.append(int(model.lm_head(h[:, -1]).argmax()))
        outs.append(tokens)
    assert outs[0] == outs[1]


def commit_then_step(llm, lengths, fold: bool, soft_scale: float):
    """Prefill a left-padded batch, then the commit pass of a canvas and the first decoder pass of the next one,
    either in turn (encode_static, denoise_static) or folded (denoise_folded_static) → (logits, cache)."""
    from test_parity import padded_batch

    model, args = llm.model, llm.args
    ids, mask = padded_batch(args.vocab_size, lengths, seed=7)
    B, L, C = *ids.shape, args.canvas_length
    g = torch.Generator().manual_seed(3)
    committed, canvas = (torch.randint(0, args.vocab_size, (B, C), generator=g) for _ in range(2))
    soft = soft_scale * torch.randn(B, C, args.hidden_size, generator=g)
    enc_pos, dpos = torch.arange(L, L + C).expand(B, -1), torch.arange(L + C, L + 2 * C)[None]
    cache = KVCache(args, B, L + 2 * C, "cpu", torch.float32, scratch=C)
    with torch.no_grad():
        model.encode(ids, torch.arange(L).expand(B, -1), cache, mask.bool())
        cache.advance(L)
        if fold:
            logits = model.denoise_folded_static(committed, enc_pos, canvas, dpos, cache, soft)
        else:
            model.encode_static(committed, enc_pos, cache)
            logits = model.denoise_static(canvas, dpos, cache, soft)
    return logits, cache


def assert_same_cache(a: KVCache, b: KVCache, atol: float = 1e-5) -> None:
    """Same slot positions, and K/V within atol, in every layer's cache slots (scratch excluded)."""
    for layer, cap in enumerate(a.capacity):
        assert torch.equal(a.pos[layer], b.pos[layer])
        for x, y in ((a.k[layer], b.k[layer]), (a.v[layer], b.v[layer])):
            assert (x[:, :, :cap] - y[:, :, :cap]).abs().max() <= atol


@pytest.mark.parametrize("name", ["a", "b", "c", "d"])
@pytest.mark.parametrize("lengths", [(5,), (40, 29)])
def test_folded_first_step_equals_commit_then_step(tiny_ckpt, name, lengths):
    """The commit pass folded into the next canvas's first decoder pass: the same logits and the same cache as the
    two passes in turn (sliding rings that wrap during the commit, left padding, attention biases in "d")."""
    llm = LLM(tiny_ckpt(name), device="cpu")
    for soft_scale in (0.0, 1.0):  # a canvas's first step has no self-conditioning; the fold does not rely on it
        ref, ref_cache = commit_then_step(llm, lengths, False, soft_scale)
        out, cache = commit_then_step(llm, lengths, True, soft_scale)
        assert (ref - out).abs().max() <= 1e-4
        assert torch.equal(ref.argmax(-1), out.argmax(-1))
        assert_same_cache(ref_cache, cache)


def test_folded_step_counts_the_committed_slots_in_kv_len(tiny_ckpt, monkeypatch):
    """With the canvas-attention kernel's path (here its torch reference, which reads only slots < kv_len, as the
    kernel does), the folded step's decoder half must see the committed slots that appear during the pass."""
    pytest.importorskip("triton")
    from dgemma.kernels.attention import attention_reference, cache_lengths
    from dgemma.models import diffusion_gemma as dg

    llm = LLM(tiny_ckpt("a"), device="cpu")  # head dims 16 and 32: both take the kernel's path
    sdpa, _ = commit_then_step(llm, (40, 29), False, 1.0)
    monkeypatch.setitem(dg.KERNELS, "canvas_attention", attention_reference)
    monkeypatch.setitem(dg.KERNELS, "cache_lengths", cache_lengths)
    monkeypatch.setattr(dg, "canvas_kernel_on", lambda x: True)
    ref, _ = commit_then_step(llm, (40, 29), False, 1.0)
    out, cache = commit_then_step(llm, (40, 29), True, 1.0)
    assert int(cache.kv_len.min()) == 40 + llm.args.canvas_length  # prompt + the committed canvas
    assert (ref - sdpa).abs().max() <= 1e-4 and (out - ref).abs().max() <= 1e-4


def test_static_encoder_through_the_causal_kernel(tiny_ckpt, monkeypatch):
    """`encoder_static_context` through the canvas-attention kernel's causal mode (forced on; Triton's interpreter on
    the CPU) instead of `prefix_mask` + sdpa: the commit pass (`encode_static`: its cache and hidden states) and the
    folded step (logits, cache) come out as on the sdpa path, over wrapped rings (window 8 < canvas 16) and a
    left-padded row; every kernel call gets a kv_len bound."""
    pytest.importorskip("triton")
    from dgemma.kernels.attention import cache_lengths, canvas_attention
    from dgemma.models import diffusion_gemma as dg

    llm = LLM(tiny_ckpt("a"), device="cpu")  # head dims 16 and 32: both take the kernel's path
    C = llm.args.canvas_length
    ids = torch.randint(3, llm.args.vocab_size, (2, C), generator=torch.Generator().manual_seed(9))

    def run():
        (logits, cache), (folded, folded_cache) = (commit_then_step(llm, (40, 29), fold, 1.0) for fold in (False, True))
        with torch.no_grad():  # a second commit pass, over the longer cache: its hidden states too
            h = llm.model.encode_static(ids, torch.arange(40 + C, 40 + 2 * C).expand(2, -1), cache)
        return (logits, folded, h), (cache, folded_cache)

    sdpa = run()
    calls = []

    def kernel(q, k, v, pos, kv_len, **causal):
        calls.append((kv_len is not None, causal.get("qpos") is not None))
        return canvas_attention(q, k, v, pos, kv_len, **causal)
    monkeypatch.setitem(dg.KERNELS, "canvas_attention", kernel)
    monkeypatch.setitem(dg.KERNELS, "cache_lengths", cache_lengths)
    monkeypatch.setattr(dg, "canvas_kernel_on", lambda x: True)
    fast = run()
    for a, b in zip(sdpa[0], fast[0]):
        assert (a - b).abs().max() <= 1e-4
    for a, b in zip(sdpa[1], fast[1]):
        assert_same_cache(a, b)
    layers = llm.args.num_hidden_layers
    assert all(bounded for bounded, _ in calls) and sum(causal for _, causal in calls) == 3 * layers  # 3 commits
    assert len(calls) == 5 * layers  # and 2 decoder passes


@pytest.mark.parametrize("name", ["a", "c"])
def test_static_stepper_fold_commit_makes_the_same_decisions(tiny_ckpt, name):
    """StaticStepper: `fold_commit` then a canvas's steps draw and decide as `commit` then the same steps, and leave
    the same cache."""
    llm = LLM(tiny_ckpt(name), device="cpu")
    model, args, B, L = llm.model, llm.args, 2, 21
    C = args.canvas_length
    params = DiffusionParams(max_denoising_steps=6, t_min=0.1, t_max=0.5, entropy_bound=0.5)
    g = torch.Generator().manual_seed(5)
    prompt, committed = (torch.randint(3, args.vocab_size, (B, n), generator=g) for n in (L, C))
    runs = []
    for fold in (False, True):
        cache = KVCache(args, B, L + 2 * C, "cpu", torch.float32, scratch=C)
        stepper = StaticStepper(model, cache, params, B)
        with torch.no_grad():
            model.encode(prompt, torch.arange(L).expand(B, -1), cache)
        cache.advance(L)
        (stepper.fold_commit if fold else stepper.commit)(committed, torch.arange(L, L + C).expand(B, -1))
        cache.advance(C)
        torch.manual_seed(0)
        stepper.start_canvas(torch.arange(L + C, L + 2 * C)[None])
        runs.append((step_trace(stepper, params.max_denoising_steps, "canvas"), cache))
        assert not stepper.fold_pending
    (ref, ref_cache), (out, cache) = runs
    for a, b in zip(ref, out):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    assert_same_cache(ref_cache, cache)


def test_generate_folds_every_commit_into_the_next_step(tiny_ckpt, monkeypatch):
    """The static path of `generate` runs no separate commit pass: every canvas after the first starts with one
    folded step, and the tokens (finished rows' pad canvases included) are the reference path's."""
    from dgemma.models.diffusion_gemma import DiffusionGemma

    llm = LLM(tiny_ckpt("a"), device="cpu")
    calls = {"denoise_folded_static": 0, "encode_static": 0}

    def counting(name: str):
        original = getattr(DiffusionGemma, name)

        def counted(*a, **kw):
            calls[name] += 1
            return original(*a, **kw)
        return counted
    for name in calls:
        monkeypatch.setattr(DiffusionGemma, name, counting(name))
    prompts = [[2, 5, 9, 11, 40], [2, 7, 3]]
    for seed in (0, 4):  # one row stops at an EOS in canvas 2 or 3, the other runs all 5 canvases
        p = SamplingParams(seed=seed, max_new_tokens=80, max_denoising_steps=5, t_min=0.5, t_max=1.0,
                           entropy_bound=1.0, confidence_threshold=0.3).resolve(llm.defaults)
        ref = list(generate(llm.model, prompts, p, fast=False, drafts=False))[-1]
        calls.update(dict.fromkeys(calls, 0))
        out = list(generate(llm.model, prompts, p, fast=True, drafts=False))[-1]
        assert [o.token_ids for o in out.outputs] == [o.token_ids for o in ref.outputs]
        assert sorted(o.finish_reason for o in out.outputs) == ["length", "stop"] and out.stats.canvases == 5
        assert calls == {"denoise_folded_static": out.stats.canvases - 1, "encode_static": 0}


# --- the fused sampler's path (CUDA, bf16/fp16) forced on the CPU -------------------------------------------------
def torch_fused_sample(logits, temperature=None, seed=None, offset=None, *, softcap=0.0, probs_dtype=torch.bfloat16):
    """`kernels.sampler.fused_sample`'s contract in torch, fast on the CPU (the kernel itself is tested in
    test_kernels.py): rows r*R/S.. share key seed[r] and offset[r] (or the one offset), and the Exp(1) race noise
    depends only on (key, offset, row within its group, column), as the kernel's Philox noise does."""
    R, V = logits.shape
    offsets = offset.reshape(-1).expand(seed.numel()).tolist()
    noise = torch.cat([torch.empty(R // seed.numel(), V).exponential_(generator=torch.Generator().manual_seed(
        (k * 0x9E3779B97F4A7C15 + o) % 2**63)) for k, o in zip(seed.tolist(), offsets)])
    x = logits.float()
    if softcap:
        x = torch.tanh(x / softcap) * softcap
    if temperature is not None:
        x = x / temperature.reshape(-1).repeat_interleave(R // temperature.numel())[:, None]
    sample, amax, h, probs = scores(x, noise, probs_dtype)
    return sample, amax, h, probs.to(probs_dtype)


def force_fused(monkeypatch, sampler) -> list[int]:
    """Make both steppers take the fused sampler's path with `sampler`; returns a list that counts its calls."""
    calls = []

    def counted(*a, **kw):
        calls.append(a[0].shape[0])
        return sampler(*a, **kw)
    monkeypatch.setattr("dgemma.engine.fast.fused_sampler", lambda device, dtype: counted)
    return calls


class RawTableModel(TableModel):
    """TableModel for the fused sampler: `raw` logits come before the softcap (the sampler applies it), and the
    self-conditioning feeds back. Row-wise sums instead of matmuls, so a row's result does not depend on how many
    rows a call holds."""

    def __init__(self, vocab=40, canvas=4, hidden=4):
        super().__init__(vocab, canvas, hidden)
        self.args.final_logit_softcapping = 30.0
        self.proj = torch.randn(hidden, vocab, generator=torch.Generator().manual_seed(1))
        self.soft_calls = 0

    def denoise_static(self, canvas, dpos, cache, soft, raw=False):
        x = 40 * self.table[canvas] + self.by_position[None] + (soft.float()[..., None] * self.proj).sum(-2)
        return x if raw else torch.tanh(x / 30.0) * 30.0

    def soft_from_probs(self, probs, dtype):
        self.soft_calls += 1
        return (probs.float()[..., None] * self.embed_tokens.weight.detach()).sum(-2).to(dtype)  # [B, C, hidden]


def batch_stepper(model, max_batch: int) -> BatchStepper:
    C = model.args.canvas_length
    return BatchStepper(model, SimpleNamespace(batch=max_batch, scratch=C, view=lambda rows: None), max_batch)


ROWS = [  # (seed, knobs): the rows of one batch, each with its own stream and knobs
    (11, DiffusionParams(max_denoising_steps=6, t_min=0.2, t_max=1.5, entropy_bound=1.0, stability_threshold=0)),
    (12, DiffusionParams(max_denoising_steps=9, t_min=0.5, t_max=0.9, entropy_bound=0.3, confidence_threshold=0.5)),
    (13, DiffusionParams(max_denoising_steps=5, t_min=1.0, t_max=3.0, entropy_bound=2.0, stability_threshold=2)),
]


def test_batch_stepper_fused_rows_step_as_generate_alone(monkeypatch):
    """The fused sampler (the Triton kernel, in the interpreter) over a batch: three rows with their own seeds,
    temperatures, bounds and step counts in a bucket of 4 (row 3 is frozen padding) take, step by step, exactly the
    decisions and draws of each row alone in `StaticStepper` (generate's step) from a generator seeded alike. One
    sampler call and one soft-embedding GEMM per step; a row frozen mid-canvas keeps its state and draws nothing."""
    pytest.importorskip("triton")
    from dgemma.kernels.sampler import fused_sample

    calls = force_fused(monkeypatch, fused_sample)
    model, steps, frozen_at = RawTableModel(), 4, 2
    C = model.args.canvas_length
    stepper = batch_stepper(model, 4)
    gens = [torch.Generator().manual_seed(seed) for seed, _ in ROWS]
    assert stepper.start_canvas([RowSpec(10 * r, p, g, 0) for r, ((_, p), g) in enumerate(zip(ROWS, gens))]) == 4
    batched = []
    for i in range(steps):
        if i == frozen_at:
            stepper.freeze(1)
            state = gens[1].get_state(), stepper.canvas[1].clone(), stepper.argmax[1].clone(), stepper.soft[1].clone()
        model.soft_calls = 0
        argmax, accepted, done = stepper.step(4)
        assert len(calls) == i + 1 and calls[-1] == 4 * C and model.soft_calls == 1
        batched.append((argmax.clone(), accepted.clone(), done.clone(), stepper.canvas[:4].clone()))
    assert torch.equal(gens[1].get_state(), state[0])
    assert all(torch.equal(a, b) for a, b in zip(state[1:], (stepper.canvas[1], stepper.argmax[1], stepper.soft[1])))
    assert not stepper.canvas[3].any() and not stepper.argmax[3].any() and bool(done[3])
    for r, (seed, params) in enumerate(ROWS):
        gen = torch.Generator().manual_seed(seed)
        alone = StaticStepper(model, SimpleNamespace(batch=1, scratch=C), params, 1, gen)
        alone.start_canvas(torch.arange(10 * r, 10 * r + C)[None])
        for i in range(frozen_at if r == 1 else steps):
            argmax, accepted, done = alone.step(params.max_denoising_steps - i)
            got = [t[r] for t in batched[i]]
            for a, b in zip((argmax[0], accepted[0], done[0], alone.canvas[0]), got):
                assert torch.equal(a, b), (r, i)
    assert len({tuple(b[0][r].tolist()) for b in batched for r in range(3)}) > 6  # the drafts do move


def test_batch_stepper_fused_draws_do_not_depend_on_the_row_or_the_batch(monkeypatch):
    """The same three requests in other rows, next to two more, in a bigger bucket (fused sampler, torch stand-in):
    every request's drafts, accept masks, stops and canvases are unchanged."""
    force_fused(monkeypatch, torch_fused_sample)
    model, steps = RawTableModel(), 5
    mates = [(98, DiffusionParams(t_min=0.0, t_max=0.1)), (99, DiffusionParams(max_denoising_steps=2))]
    runs = []
    for order, extra, bucket in (([0, 1, 2], [], 4), ([2, 0, 1], mates, 8)):
        rows = [ROWS[i] for i in order] + extra
        stepper = batch_stepper(model, 8)
        nb = stepper.start_canvas([RowSpec(0, p, torch.Generator().manual_seed(seed), 0) for seed, p in rows])
        assert nb == bucket
        trace = []
        for _ in range(steps):
            trace.append([t.clone() for t in (*stepper.step(nb), stepper.canvas[:nb])])
        runs.append({i: [[t[r] for t in step] for step in trace] for r, i in enumerate(order)})
    for i in range(3):
        for a, b in zip(runs[0][i], runs[1][i]):
            assert all(torch.equal(x, y) for x, y in zip(a, b)), i

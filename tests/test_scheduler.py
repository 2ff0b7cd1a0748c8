"""The continuous-batching scheduler (engine/scheduler.py) on CPU: a seeded request gives the tokens of `generate`
at batch 1 whatever shares its batch (on the torch sampler's path, and on the fused sampler's path forced with a
torch stand-in), queueing, cancellation, prefix reuse, validation, metrics, engine errors. GPU-marked tests (CUDA
graphs per batch bucket, the Triton sampler) run on an H100/H200 and are skipped here."""

import contextlib
import dataclasses
import queue

import pytest
import torch

from dgemma import LLM
from dgemma.engine.generate import generate
from dgemma.engine.scheduler import Committed, Draft, Failed, Finished, Scheduler

TIMEOUT = 120


@pytest.fixture(scope="module")
def tiny_a(tiny_ckpt):
    """Config "a": canvas 16, sliding window 8 (prompts wrap the ring), random weights (EOS is rare)."""
    return LLM(tiny_ckpt("a"), device="cpu")


@pytest.fixture(scope="module")
def bundled():
    return LLM(None, device="cpu", dtype="float32")


def knobs(defaults, **kw):
    base = dict(max_new_tokens=40, max_denoising_steps=8, t_min=0.05, t_max=0.3, entropy_bound=0.5,
                confidence_threshold=0.3)
    return dataclasses.replace(defaults, **(base | kw)).validate()


class Collector:
    """Sinks that record every event per request and wait for the terminal ones."""

    def __init__(self):
        self.q, self.events, self.ended = queue.Queue(), {}, {}

    def sink(self, event):
        self.q.put(event)

    def next(self):
        e = self.q.get(timeout=TIMEOUT)
        self.events.setdefault(e.request_id, []).append(e)
        if isinstance(e, (Finished, Failed)):
            assert e.request_id not in self.ended, "two terminal events"
            self.ended[e.request_id] = e
        return e

    def wait(self, n: int) -> dict:
        while len(self.ended) < n:
            self.next()
        return self.ended


def solo(llm, prompt, params):
    out = list(generate(llm.model, [prompt], params, generator=torch.Generator().manual_seed(params.seed),
                        drafts=False))[-1].outputs[0]
    return out.token_ids, out.stats.steps_per_canvas, out.finish_reason


def prompts_for(llm, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, llm.args.vocab_size, (n,), generator=g).tolist() for n in lengths]


@contextlib.contextmanager
def running(sched: Scheduler):
    """The engine thread for the duration of a block, shut down even when the block fails."""
    sched.start()
    try:
        yield sched
    finally:
        sched.shutdown()


def run(sched, jobs, **submit_kw) -> tuple[dict, Collector]:
    col = Collector()
    ids = [sched.submit(p, params, col.sink, **submit_kw) for p, params in jobs]
    ended = col.wait(len(jobs))
    return {i: ended[i] for i in ids}, col


def one(sched, prompt, params):
    return list(run(sched, [(prompt, params)])[0].values())[0]


@pytest.mark.parametrize("which", ["tiny_a", "bundled"])
def test_seeded_requests_in_a_mixed_batch_equal_generate_alone(which, request):
    """Four requests with different knobs denoise together; each gives exactly its batch-1 `generate` tokens and
    steps (several canvases, prompts longer than the sliding window, per-row early stops)."""
    llm = request.getfixturevalue(which)
    d = llm.defaults
    jobs = list(zip(prompts_for(llm, (13, 5, 20, 9)), [
        knobs(d, seed=1),
        knobs(d, seed=2, max_new_tokens=20, max_denoising_steps=5, t_min=0.2, t_max=0.9),
        knobs(d, seed=3, entropy_bound=0.05, stability_threshold=2, confidence_threshold=1.0),
        knobs(d, seed=4, max_new_tokens=57, stability_threshold=0, max_denoising_steps=12, t_min=0.0),
    ]))
    sched = Scheduler(llm.model, d, max_batch=4, max_model_len=128)
    with running(sched):
        ended, col = run(sched, jobs, drafts=True)
    canvases = 0
    for (prompt, params), (rid, fin) in zip(jobs, ended.items()):
        tokens, steps, reason = solo(llm, prompt, params)
        assert isinstance(fin, Finished)
        assert (fin.token_ids, fin.usage["steps_per_canvas"], fin.finish_reason) == (tokens, steps, reason)
        committed = [e for e in col.events[rid] if isinstance(e, Committed)]
        assert sum((e.tokens for e in committed), []) == tokens
        assert [e.steps for e in committed] == steps
        drafts = [(e.canvas, e.step) for e in col.events[rid] if isinstance(e, Draft)]
        assert drafts == [(c, s + 1) for c, n in enumerate(steps) for s in range(n)]
        assert all(len(e.tokens) == llm.args.canvas_length for e in col.events[rid] if isinstance(e, Draft))
        assert fin.usage["completion_tokens"] == len(tokens) and fin.usage["steps"] == sum(steps)
        canvases = max(canvases, len(steps))
    if which == "tiny_a":
        assert canvases >= 3
        assert len({tuple(e.usage["steps_per_canvas"]) for e in ended.values()}) > 1  # rows stopped apart


def test_fused_sampler_requests_equal_generate_alone(tiny_a, monkeypatch):
    """The fused sampler's path (CUDA bf16/fp16; forced here in both steppers with its torch stand-in): five
    requests, one queued until a row frees, each give exactly the tokens and steps of batch-1 `generate` on the
    static path seeded alike (the same draws: canvas, Philox key and replacement tokens from the request's
    generator, race noise keyed by the row's key and step), whatever their batch mates, rows and buckets."""
    from test_fast import force_fused, torch_fused_sample

    calls = force_fused(monkeypatch, torch_fused_sample)
    d = tiny_a.defaults
    jobs = list(zip(prompts_for(tiny_a, (13, 5, 20, 9, 7), seed=11), [
        knobs(d, seed=1),
        knobs(d, seed=2, max_new_tokens=20, max_denoising_steps=5, t_min=0.2, t_max=0.9),
        knobs(d, seed=3, entropy_bound=0.05, stability_threshold=2, confidence_threshold=1.0),
        knobs(d, seed=4, max_new_tokens=57, stability_threshold=0, max_denoising_steps=12, t_min=0.0),
        knobs(d, seed=5, max_new_tokens=30, t_min=0.5, t_max=1.5),
    ]))
    sched = Scheduler(tiny_a.model, d, max_batch=4, max_model_len=128)
    assert sched.stepper.fused_sample is not None
    with running(sched):
        ended, _ = run(sched, jobs)
    assert calls and all(rows % tiny_a.args.canvas_length == 0 for rows in calls)
    for (prompt, params), fin in zip(jobs, ended.values()):
        out = list(generate(tiny_a.model, [prompt], params, generator=torch.Generator().manual_seed(params.seed),
                            drafts=False, fast=True))[-1].outputs[0]
        assert isinstance(fin, Finished)
        assert (fin.token_ids, fin.usage["steps_per_canvas"], fin.finish_reason) == (
            out.token_ids, out.stats.steps_per_canvas, out.finish_reason)
    assert fin.usage["queue_s"] > 0 and len({tuple(f.usage["steps_per_canvas"]) for f in ended.values()}) > 1


def test_more_requests_than_rows_queue_and_all_complete(tiny_a):
    d = tiny_a.defaults
    jobs = [(p, knobs(d, seed=10 + i, max_new_tokens=16 * (1 + i % 3), max_denoising_steps=3 + i))
            for i, p in enumerate(prompts_for(tiny_a, (4, 9, 3, 11, 6), seed=1))]
    sched = Scheduler(tiny_a.model, d, max_batch=2, max_model_len=96, prefix_cache=False)
    with running(sched):
        ended, _ = run(sched, jobs)
    for (prompt, params), fin in zip(jobs, ended.values()):
        assert fin.token_ids == solo(tiny_a, prompt, params)[0]
    assert max(f.usage["queue_s"] for f in ended.values()) > 0.0
    m = sched.metrics()
    assert m["requests_total"] == m["requests_finished"] == 5 and m["queue_depth"] == 0 and m["active"] == 0


def test_cancel_frees_the_slot_for_a_queued_request(tiny_a):
    d = tiny_a.defaults
    long_job, short_job = prompts_for(tiny_a, (7, 5), seed=2)
    sched = Scheduler(tiny_a.model, d, max_batch=1, max_model_len=512)
    col = Collector()
    a = sched.submit(long_job, knobs(d, seed=5, max_new_tokens=400, max_denoising_steps=30,
                                     confidence_threshold=1e-9), col.sink, drafts=True)
    b = sched.submit(short_job, knobs(d, seed=6, max_new_tokens=16), col.sink)
    queued = sched.submit(short_job, knobs(d, seed=7), col.sink)
    sched.cancel(queued)  # cancelled while queued: Finished("cancelled") without running
    with running(sched):
        while not isinstance(first := col.next(), Draft):  # a's first draft: a holds the only row, b waits
            pass
        assert first.request_id == a and first.step == 1 and len(first.tokens) == tiny_a.args.canvas_length
        assert b not in col.events
        sched.cancel(a)
        sched.cancel(a)  # idempotent
        ended = col.wait(3)
    assert ended[queued].finish_reason == "cancelled" and ended[queued].usage["steps"] == 0
    assert ended[a].finish_reason == "cancelled" and ended[a].usage["steps"] < 30
    assert ended[b].finish_reason == "length" and ended[b].token_ids == solo(tiny_a, short_job, knobs(
        d, seed=6, max_new_tokens=16))[0]
    assert sched.metrics()["requests_cancelled"] == 2


@pytest.mark.parametrize("which", ["tiny_a", "bundled"])
def test_prefix_reuse_gives_the_same_tokens_and_counts_cached_prompt(which, request):
    """Turn 2's prompt extends turn 1's prompt and answer: with reuse it encodes only the new part, and its tokens
    equal those of a scheduler without reuse (and of `generate`)."""
    llm = request.getfixturevalue(which)
    d = llm.defaults
    C = llm.args.canvas_length
    p1 = prompts_for(llm, (12,), seed=3)[0]
    turn1 = knobs(d, seed=8, max_new_tokens=2 * C, confidence_threshold=1e-9)
    outs = []
    for reuse in (True, False):
        sched = Scheduler(llm.model, d, max_batch=2, max_model_len=6 * C, prefix_cache=reuse)
        with running(sched):
            first = one(sched, p1, turn1)
            p2 = p1 + first.token_ids + [5, 6, 7]
            second = one(sched, p2, knobs(d, seed=9))
        outs.append((first, second, p2))
    (f1, s1, p2), (f2, s2, _) = outs
    assert f1.token_ids == f2.token_ids and s1.token_ids == s2.token_ids
    assert s1.token_ids == solo(llm, p2, knobs(d, seed=9))[0]
    encoded = len(p1) + (f1.usage["canvases"] - 1) * C  # the last canvas is never encoded
    assert s1.usage["cached_prompt_tokens"] == min(encoded, len(p2)) > 0
    assert s2.usage["cached_prompt_tokens"] == 0


def test_prefix_reuse_only_when_the_ring_still_holds_the_window(tiny_a):
    """Window 8: after a 12-token prompt and an encoded canvas the ring has wrapped, so cutting the row back to a
    shorter shared prefix is not exact and the prompt is encoded from scratch; a longer shared prefix is reused."""
    d = tiny_a.defaults
    p1 = prompts_for(tiny_a, (12,), seed=4)[0]
    sched = Scheduler(tiny_a.model, d, max_batch=2, max_model_len=128)
    with running(sched):
        first = one(sched, p1, knobs(d, seed=1, max_new_tokens=32))
        back = one(sched, p1[:10] + [3], knobs(d, seed=2))
        p3 = p1 + first.token_ids + [4]
        again = one(sched, p3, knobs(d, seed=3))
    assert first.usage["canvases"] == 2
    assert back.usage["cached_prompt_tokens"] == 0  # went to the other (least recently used) row
    assert again.usage["cached_prompt_tokens"] == 12 + 16  # the prompt and the encoded first canvas
    assert again.token_ids == solo(tiny_a, p3, knobs(d, seed=3))[0]


def test_submit_validates(tiny_a):
    d = tiny_a.defaults
    sched = Scheduler(tiny_a.model, d, max_batch=1, max_model_len=64)
    with pytest.raises(ValueError, match="empty prompt"):
        sched.submit([], d, print)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sched.submit([1, tiny_a.args.vocab_size], d, print)
    with pytest.raises(ValueError, match=r"prompt \(20 tokens\) \+ max_new_tokens 50 .* 84 positions exceeds "
                                         r"max_model_len 64; lower max_new_tokens to 32 or less"):
        sched.submit(list(range(3, 23)), knobs(d, max_new_tokens=50), print)
    with pytest.raises(ValueError, match="shorten the prompt to at most 48 tokens"):
        sched.submit(list(range(3, 63)), knobs(d, max_new_tokens=1), print)
    with pytest.raises(ValueError, match="max_denoising_steps"):
        sched.submit([5], dataclasses.replace(d, max_denoising_steps=0), print)
    assert sched.metrics()["requests_total"] == 0
    col = Collector()
    rid = sched.submit([5, 6], knobs(d), col.sink)
    sched.shutdown()  # never started: the queued request still ends, once
    assert isinstance(col.next(), Failed) and col.q.empty() and rid in col.ended


def test_metrics_observers_and_engine_errors(tiny_a):
    """Counters move; observers see every step and canvas; an exception in a canvas fails the requests in it (one
    Failed each) and the engine goes on serving; a raising sink does not stop it."""
    d = tiny_a.defaults
    steps, canvases = [], []
    sched = Scheduler(tiny_a.model, d, max_batch=2, max_model_len=64,
                      on_step=lambda s, n: steps.append(n), on_canvas=lambda s, n: canvases.append(n))
    real_step, calls = sched.stepper.step, []

    def flaky(nb, live=None):
        calls.append(nb)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real_step(nb, live)

    sched.stepper.step = flaky
    p = prompts_for(tiny_a, (6, 8), seed=5)
    with running(sched):
        ended, _ = run(sched, [(p[0], knobs(d, seed=1)), (p[1], knobs(d, seed=2))])
        assert all(isinstance(e, Failed) and "boom" in e.message for e in ended.values())

        def bad_sink(event):
            raise OSError("client went away")

        sched.submit(p[0], knobs(d, seed=3, max_new_tokens=16), bad_sink)
        ended, _ = run(sched, [(p[1], knobs(d, seed=4, max_new_tokens=32))])
    fin = list(ended.values())[0]
    assert fin.token_ids == solo(tiny_a, p[1], knobs(d, seed=4, max_new_tokens=32))[0]
    m = sched.metrics()
    assert m["requests_total"] == 4 and m["requests_failed"] == 2 and m["requests_finished"] == 2
    assert m["tokens_generated"] >= 48 and m["decoder_steps"] == len(steps) == len(m["step_latency_s"]) > 0
    assert m["canvases"] == len(canvases) == len(m["canvas_latency_s"]) > 0
    assert m["step_seconds_sum"] > 0 and m["prompt_tokens"] == 6 + 8 + 6 + 8
    assert max(steps) == 2 and max(canvases) == 2


# --- CUDA (CUDA graphs per batch bucket); run on an H100/H200 (the bundled model: no transformers needed) ------------
@pytest.mark.gpu
def test_cuda_graph_scheduler_is_batch_independent_and_captures_once():
    """bf16, CUDA graphs: one step and one commit graph per bucket, captured at construction and never again; a
    seeded request gives the same tokens next to different batch mates (same bucket, so the same kernels)."""
    llm = LLM(None, device="cuda", dtype="bfloat16")
    d = llm.defaults
    sched = Scheduler(llm.model, d, max_batch=8, max_model_len=1024)
    assert sched.stepper.use_graph and sorted(sched.stepper.graphs) == sorted(sched.stepper.commit_graphs) == [
        1, 2, 4, 8]
    graphs = dict(sched.stepper.graphs)
    ps = prompts_for(llm, (13, 5, 20, 9, 30, 3, 70), seed=6)
    jobs = [(p, knobs(d, seed=20 + i, max_new_tokens=64 * (1 + i % 4), max_denoising_steps=4 + i,
                      confidence_threshold=1e-9 if i % 2 else 0.3)) for i, p in enumerate(ps)]
    with running(sched):
        first, _ = run(sched, [jobs[0], jobs[1], jobs[2]])  # bucket 4 (3 rows + a frozen padding row)
        second, _ = run(sched, [jobs[0], jobs[3], jobs[4], jobs[5]])  # bucket 4, other mates
        many, _ = run(sched, jobs)  # bucket 8
    assert list(first.values())[0].token_ids == list(second.values())[0].token_ids
    assert all(isinstance(f, Finished) and f.usage["completion_tokens"] > 0 for f in many.values())
    assert sched.stepper.graphs == graphs  # no capture per request
    m = sched.metrics()
    assert m["requests_finished"] == 14 and m["cached_prompt_tokens"] > 0  # jobs[0] came back twice


@pytest.mark.gpu
def test_cuda_eager_scheduler_matches_generate():
    """fp32 on CUDA (eager; TF32 off): each request draws from its own generator, so its tokens equal those of
    batch-1 `generate` on the static path (the same exponential-race draws) whatever shares its batch."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        llm = LLM(None, device="cuda", dtype="float32")
        d = llm.defaults
        jobs = [(p, knobs(d, seed=30 + i, max_denoising_steps=5 + i, max_new_tokens=100)) for i, p in
                enumerate(prompts_for(llm, (13, 5, 20), seed=7))]
        sched = Scheduler(llm.model, d, max_batch=4, max_model_len=512, fast=False)
        assert not sched.stepper.use_graph
        with running(sched):
            ended, _ = run(sched, jobs)
        for (prompt, params), fin in zip(jobs, ended.values()):
            out = list(generate(llm.model, [prompt], params, fast=True, drafts=False,
                                generator=torch.Generator(device="cuda").manual_seed(params.seed)))[-1]
            assert fin.token_ids == out.outputs[0].token_ids
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.gpu
def test_cuda_fused_sampler_is_batch_invariant_and_alone_equals_generate(tiny_ckpt):
    """bf16 on a small random model, CUDA graphs and the Triton sampler (one call and one soft GEMM for all rows): a
    request's tokens do not depend on its batch mates or its row within one bucket (no EOS, so every canvas runs in
    bucket 4); served alone, a one-canvas request with a cache as long as `generate`'s gets `generate`'s tokens and
    steps (the same draws over bitwise the same logits: no commit for `generate` to fold)."""
    from dgemma.engine import fast

    llm = LLM(tiny_ckpt("a"), device="cuda", dtype="bfloat16")
    d, C = llm.defaults, llm.args.canvas_length
    sched = Scheduler(llm.model, d, max_batch=4, max_model_len=8 * C, prefix_cache=False)
    assert sched.stepper.use_graph and sched.stepper.fused_sample is fast.SAMPLER["fused_sample"] is not None
    ps = prompts_for(llm, (13, 5, 20, 9, 30, 3), seed=9)
    jobs = [(p, knobs(d, seed=50 + i, max_new_tokens=3 * C, max_denoising_steps=5 + i, t_min=0.1 * i,
                      t_max=0.5 + 0.1 * i, confidence_threshold=1e-9 if i % 2 else 0.3, eos_token_ids=()))
            for i, p in enumerate(ps)]
    with running(sched):
        first, _ = run(sched, jobs[:3])  # jobs[0] in row 0, next to a frozen padding row
        second, _ = run(sched, jobs[3:] + jobs[:1])  # jobs[0] in row 3, other mates
    a, b = list(first.values())[0], list(second.values())[-1]
    assert a.usage["canvases"] == 3
    assert (a.token_ids, a.usage["steps_per_canvas"]) == (b.token_ids, b.usage["steps_per_canvas"])

    prompts = prompts_for(llm, (11, 11, 11), seed=10)
    alone = Scheduler(llm.model, d, max_batch=1, max_model_len=11 + C, prefix_cache=False)  # generate's cache
    with running(alone):
        for i, prompt in enumerate(prompts):
            params = knobs(d, seed=60 + i, max_new_tokens=C, max_denoising_steps=6 + 2 * i, t_min=0.1 * i)
            fin = one(alone, prompt, params)
            out = list(generate(llm.model, [prompt], params, fast=True, drafts=False))[-1].outputs[0]
            assert (fin.token_ids, fin.usage["steps_per_canvas"]) == (out.token_ids, out.stats.steps_per_canvas)

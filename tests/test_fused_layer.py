"""The fused decoder layer (models/fused_layer.py) against the per-op static passes, on CPU through Triton's
interpreter (fp32): commit pass, decoder pass and the folded pass, with left padding and wrapped sliding rings."""

import pytest
import torch

from dgemma import LLM

pytest.importorskip("triton")

from test_fast import assert_same_cache, commit_then_step  # noqa: E402

from dgemma.models import fused_layer  # noqa: E402
from dgemma.models.fusion import fuse_projections  # noqa: E402


@pytest.fixture
def fused():
    """enable(on) for CPU tensors; off again after the test."""
    yield lambda on: fused_layer.enable(on, cpu=True)
    fused_layer.enable(False)


def counting(monkeypatch) -> dict:
    """Counts the fused layer's kernel calls by name."""
    calls = {}
    for name, fn in list(fused_layer.FUSED.items()):
        if callable(fn):
            def wrapped(*a, _fn=fn, _name=name, **k):
                calls[_name] = calls.get(_name, 0) + 1
                return _fn(*a, **k)
            monkeypatch.setitem(fused_layer.FUSED, name, wrapped)
    return calls


def k_sum_launch(monkeypatch):
    """moe's own k-sum launch (`sum_k`) before ffn_tail, instead of the tail summing the unsummed rows itself."""
    from dgemma.kernels.moe import sum_k

    tail = fused_layer.FUSED["ffn_tail"]

    def ffn_tail(x, dense, routed, *args, moe_weights, dense_parts, **kwargs):
        moe, dense_sum = sum_k(routed, moe_weights, dense if dense_parts else None)
        return tail(x, dense_sum.view_as(x) if dense_parts else dense, moe.view_as(x), *args, **kwargs)
    monkeypatch.setitem(fused_layer.FUSED, "ffn_tail", ffn_tail)


@pytest.mark.parametrize("lengths,dense_in_moe", [((5,), True), ((40, 29), True), ((5,), False)])
def test_fused_layer_matches_the_per_op_static_passes(tiny_ckpt, fused, monkeypatch, lengths, dense_in_moe):
    """dense_in_moe: the dense MLP (width 96 = 3 experts of 32) rides in the MoE's launches, else its own GEMMs."""
    llm = LLM(tiny_ckpt("a"), device="cpu")
    fuse_projections(llm.model)
    ref = [commit_then_step(llm, lengths, fold, 1.0) for fold in (False, True)]
    fused(True)
    monkeypatch.setattr(fused_layer, "dense_in_moe", lambda layer, tokens: dense_in_moe)
    calls = counting(monkeypatch)
    out = [commit_then_step(llm, lengths, fold, 1.0) for fold in (False, True)]
    layers = llm.args.num_hidden_layers
    # encode_static, denoise_static, denoise_folded_static: one qkv_prep per layer, two in the folded pass
    assert calls["qkv_prep"] == 4 * layers and calls["ffn_tail"] == 3 * layers and calls["moe"] == 3 * layers
    for (ref_logits, ref_cache), (logits, cache) in zip(ref, out):
        assert (ref_logits - logits).abs().max() <= 1e-4
        assert torch.equal(ref_logits.argmax(-1), logits.argmax(-1))
        assert_same_cache(ref_cache, cache)
    k_sum_launch(monkeypatch)  # the tail's own sums give the bits of moe's k-sum launch
    for (logits, cache), (sum_logits, sum_cache) in zip(out, [commit_then_step(llm, lengths, fold, 1.0)
                                                              for fold in (False, True)]):
        assert torch.equal(logits, sum_logits)
        assert_same_cache(cache, sum_cache, atol=0)


def test_fused_layer_only_where_it_applies(tiny_ckpt, fused):
    x = torch.zeros(1)
    fused(True)
    models = {}
    for name, stacked, expected in (("a", False, False), ("a", True, True), ("b", True, False), ("d", True, False)):
        model = models[name] = LLM(tiny_ckpt(name), device="cpu").model  # b: head dim 24; d: attention biases
        if stacked:
            fuse_projections(model)
        with torch.no_grad():
            assert fused_layer.active(model, x) == expected, name
    with torch.enable_grad():  # training never takes it
        assert not fused_layer.active(models["a"], x)
    fused(False)
    with torch.no_grad():
        assert not fused_layer.active(models["a"], x)


@pytest.mark.gpu
def test_cuda_bf16_fused_layer_is_as_close_to_fp32_as_the_per_op_layers():
    """On CUDA in bf16 the fused layer and the per-op static layers round differently, and a random MoE amplifies
    rounding (top-k flips), so they are compared with fp32: the fused logits must be no further from the fp32
    reference's than 1.5× the per-op path's distance (test_gpu.py's rule for bf16)."""
    import copy

    from dgemma.benchmark import random_model
    from dgemma.engine.cache import KVCache
    from dgemma.engine.fast import configure_cuda_kernels

    configure_cuda_kernels(torch.device("cuda"))
    if not fused_layer.FUSED:
        pytest.skip("DGEMMA_TRITON=0 or DGEMMA_FUSED_LAYERS=0")
    model = random_model("tiny", "cuda", torch.bfloat16)
    ref = copy.deepcopy(model).float()
    args, B, L, C = model.args, 2, 300, model.args.canvas_length
    g = torch.Generator("cuda").manual_seed(0)
    ids, canvas = (torch.randint(3, args.vocab_size, (B, n), device="cuda", generator=g) for n in (L, C))
    pos = torch.arange(L, L + C, device="cuda")[None]

    def run(m, static: bool) -> torch.Tensor:
        dtype = m.embed_tokens.weight.dtype
        cache = KVCache(args, B, L + C, "cuda", dtype, scratch=C if static else 0)
        with torch.inference_mode():
            m.encode(ids, torch.arange(L, device="cuda").expand(B, -1), cache)
            cache.advance(L)
            if not static:
                return m.denoise(canvas, pos, cache).float()
            return m.denoise_static(canvas, pos, cache, torch.zeros(B, C, args.hidden_size, device="cuda",
                                                                    dtype=dtype)).float()

    r32 = run(ref, static=False)
    saved = dict(fused_layer.FUSED)
    fused_layer.FUSED.clear()
    per_op = run(model, static=True)
    fused_layer.FUSED.update(saved)
    fuse_projections(model)
    with torch.no_grad():
        assert fused_layer.active(model, canvas)
    fused = run(model, static=True)
    err = {name: float((x - r32).norm() / r32.norm()) for name, x in (("per_op", per_op), ("fused", fused))}
    assert err["fused"] <= 1.5 * err["per_op"] + 1e-3, err



def test_dense_mlp_rides_in_the_moe_only_for_small_passes(tiny_ckpt):
    """Up to DENSE_IN_MOE_MAX_TOKENS tokens the dense MLP runs as pseudo-experts (cheaper at batch 1-2); beyond, its
    own GEMMs (cuBLAS is faster once they are compute-bound); never when its width is not a multiple of an expert's."""
    a = LLM(tiny_ckpt("a"), device="cpu").model.layers[0]  # dense 96 = 3 × 32
    b = LLM(tiny_ckpt("b"), device="cpu").model.layers[0]  # dense 64, experts 24
    limit = fused_layer.DENSE_IN_MOE_MAX_TOKENS
    assert fused_layer.dense_in_moe(a, limit) and not fused_layer.dense_in_moe(a, limit + 1)
    assert not fused_layer.dense_in_moe(b, 16)

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

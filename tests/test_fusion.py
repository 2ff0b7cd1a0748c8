"""Stacked projections (models/fusion.py): the fused GEMMs give the separate GEMMs' results on every path, and
parameter names, values, saving, loading, LoRA and training are unchanged. CPU, tiny models, seconds."""

import pytest
import torch
from safetensors.torch import load_file

from dgemma import LLM
from dgemma.engine.cache import KVCache
from dgemma.engine.fast import StaticStepper, fuse_for_cuda
from dgemma.loader import load_model, save_model
from dgemma.models import diffusion_gemma as dg
from dgemma.models.fusion import fuse_projections, fused_weight
from dgemma.train import lora
from dgemma.train import objective as O

# Stacked and separate GEMMs differ only in float rounding (fp32): 1e-6 per projection, growing through the layers
# and self-conditioning to ~1e-4 on logits of magnitude ~10 (config "d", 7 layers).
ATOL_PROJ, ATOL_LOGITS = 1e-6, 3e-4


def groups(model) -> int:
    """Number of stacked groups the forward would use now."""
    return sum(fused_weight(m, key) is not None for m in model.modules() for key in getattr(m, "fused", {}))


def every_path(llm, lengths=(40, 29)) -> list[torch.Tensor]:
    """Logits of encode, denoise (with self-conditioning), denoise_static, encode_static + denoise_static and the
    folded step, on one left-padded batch."""
    from test_fast import commit_then_step
    from test_parity import padded_batch

    model, args = llm.model, llm.args
    ids, mask = padded_batch(args.vocab_size, lengths, seed=7)
    B, L, C = *ids.shape, args.canvas_length
    canvas = torch.randint(0, args.vocab_size, (B, C), generator=torch.Generator().manual_seed(1))
    sc = 3 * torch.randn(B, C, args.vocab_size, generator=torch.Generator().manual_seed(2))
    out = []
    with torch.no_grad():
        for scratch in (0, C):
            cache = KVCache(args, B, L + C, "cpu", torch.float32, scratch=scratch)
            out.append(model.lm_head(model.encode(ids, torch.arange(L).expand(B, -1), cache, mask.bool())))
            cache.advance(L)
            dpos = torch.arange(L, L + C)[None]
            out.append(model.denoise(canvas, dpos, cache, sc) if scratch == 0 else
                       model.denoise_static(canvas, dpos, cache, model.soft_embed(sc, torch.float32)))
    out += [commit_then_step(llm, lengths, fold, 1.0)[0] for fold in (False, True)]
    return out


@pytest.mark.parametrize("name", ["a", "c", "d"])
def test_projections_match_separate_gemms(tiny_ckpt, name):
    """Per layer: q/k/v (encoder and decoder biases in "d"), the dense MLP and self-conditioning, stacked vs not."""
    model = LLM(tiny_ckpt(name), device="cpu").model
    fuse_projections(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, model.args.hidden_size, generator=g)
    rope = model.rope(torch.arange(9)[None], x.dtype)
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            attn, (cos, sin) = layer.self_attn, rope[model.args.layer_types[i]]
            for encoder in (False, True):
                assert attn.fused_qkv(encoder) is not None
                for a, b in zip(attn.project(x, cos, sin, encoder), attn._project(x, cos, sin, encoder, None)):
                    assert torch.allclose(a, b, atol=ATOL_PROJ, rtol=0)
            fused_mlp = layer.mlp(x, fused_weight(layer.mlp, "gate_up"))
            assert torch.allclose(fused_mlp, layer.mlp(x), atol=ATOL_PROJ, rtol=0)
        sc = model.self_conditioning
        fused_sc = sc(x, x)
        sc.fused.clear()
        assert torch.allclose(fused_sc, sc(x, x), atol=ATOL_PROJ, rtol=0)


@pytest.mark.parametrize("name", ["a", "c", "d"])
def test_every_path_gives_the_same_logits(tiny_ckpt, name, monkeypatch):
    """encode, denoise, the static passes and the folded step: stacked logits equal separate ones, and once stacked
    no q/k/v projection runs on its own."""
    llm = LLM(tiny_ckpt(name), device="cpu")
    ref = every_path(llm)
    n = len(llm.model.layers)
    assert fuse_projections(llm.model) == (4 * n if name == "d" else 2 * n) + 1  # per layer qkv (+ both biases) and
    # gate_up, then self-conditioning
    calls = []
    linear = dg.Attention.linear
    monkeypatch.setattr(dg.Attention, "linear", lambda self, n, *a, **kw: calls.append(n) or linear(self, n, *a, **kw))
    for a, b in zip(every_path(llm), ref):
        assert torch.allclose(a, b, atol=ATOL_LOGITS, rtol=0)
        assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert set(calls) == {"o"}


def test_parameters_names_values_and_memory_unchanged(tiny_ckpt):
    model = LLM(tiny_ckpt("d"), device="cpu").model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    storage_bytes = sum(p.untyped_storage().nbytes() for p in model.parameters())
    fuse_projections(model)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert all(p is params[k] for k, p in model.named_parameters())  # the same Parameter objects (optimizers)
    attn = model.layers[0].self_attn
    stacked = attn.fused["qkv"].tensor
    for name in ("q", "k", "v"):
        w = getattr(attn, f"{name}_proj").weight
        assert w.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr()  # a view, not a copy
    unique = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    assert sum(unique.values()) == storage_bytes  # memory is not doubled


def test_fusing_twice_is_a_noop(tiny_ckpt):
    model = LLM(tiny_ckpt("a"), device="cpu").model
    assert fuse_projections(model) > 0
    stacked = {(id(m), k): g for m in model.modules() for k, g in getattr(m, "fused", {}).items()}
    assert fuse_projections(model) == 0
    assert {(id(m), k): g for m in model.modules() for k, g in getattr(m, "fused", {}).items()} == stacked


def test_save_and_load_after_fusion(tiny_ckpt, tmp_path):
    llm = LLM(tiny_ckpt("d"), device="cpu")
    save_model(llm.model, tmp_path / "plain", dtype=torch.float32)
    fuse_projections(llm.model)
    save_model(llm.model, tmp_path / "fused", dtype=torch.float32)
    plain, fused = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("plain", "fused"))
    assert set(plain) == set(fused) and all(torch.equal(plain[k], fused[k]) for k in plain)
    reloaded = load_model(tmp_path / "fused", "cpu", torch.float32)
    assert groups(reloaded) == 0  # loading does not stack; the CUDA fast path does
    fuse_projections(reloaded)
    ids = torch.randint(3, llm.args.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    outs = []
    for m in (llm.model, reloaded):
        cache = KVCache(llm.args, 1, 12, "cpu", torch.float32)
        with torch.no_grad():
            outs.append(m.lm_head(m.encode(ids, torch.arange(12)[None], cache)))
    assert torch.equal(*outs)


def _lora_logits(model, ids):
    C = model.args.canvas_length
    cache = KVCache(model.args, 1, ids.shape[1] + C, "cpu", torch.float32)
    with torch.no_grad():
        model.encode(ids, torch.arange(ids.shape[1])[None], cache)
        cache.advance(ids.shape[1])
        return model.denoise(ids[:, :C], torch.arange(ids.shape[1], ids.shape[1] + C)[None], cache)


def test_lora_on_a_fused_model(tiny_ckpt):
    """Adapters on stacked weights: the forward takes the separate GEMMs through the parametrization, merge undoes
    the stacking (the forward notices), and fusing again stacks the merged weights."""
    path = tiny_ckpt("a")
    plain, fused = LLM(path, device="cpu").model, LLM(path, device="cpu").model
    fuse_projections(fused)
    for model in (plain, fused):
        lora.apply(model, rank=4, alpha=8, seed=1)
        with torch.no_grad():
            for p in lora.adapters(model).values():
                p.lora_B.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    assert groups(fused) == 1  # only self-conditioning (not a LoRA target) is still stacked
    ids = torch.randint(3, plain.args.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    ref = _lora_logits(plain, ids)
    assert torch.allclose(_lora_logits(fused, ids), ref, atol=ATOL_LOGITS, rtol=0)
    lora.merge(fused)
    assert groups(fused) == 1  # merge rebinds the weights: the stale stacks are not used
    assert torch.allclose(_lora_logits(fused, ids), ref, atol=ATOL_LOGITS, rtol=0)
    assert fuse_projections(fused) == 2 * len(fused.layers)
    assert torch.allclose(_lora_logits(fused, ids), ref, atol=ATOL_LOGITS, rtol=0)


def test_training_a_fused_model(tiny_ckpt):
    """With gradients the forward takes the separate GEMMs (the gradients are those of an unfused model), and an
    optimizer step writes into the stacked rows, which inference then uses."""
    path = tiny_ckpt("a")
    plain, fused = (LLM(path, device="cpu").model.requires_grad_(True) for _ in range(2))
    fuse_projections(fused)
    C, V = plain.args.canvas_length, plain.args.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, V, (2, 3 * C), generator=g)
    sup = torch.ones_like(ids, dtype=torch.bool)
    d = O.Draws(block=torch.tensor([2, 1]), t=torch.tensor([0.4, 0.9]), noise=torch.randint(0, V, (2, C), generator=g),
                flip=torch.rand(2, C, generator=g), sc=torch.tensor([True, False]))
    for model in (plain, fused):
        O.loss_from_draws(model, ids, sup, d).loss.backward()
        torch.optim.SGD(model.parameters(), lr=0.5).step()
    for name in ("layers.0.self_attn.q_proj.weight", "layers.2.self_attn.k_proj.weight", "layers.1.mlp.up_proj.weight",
                 "self_conditioning.gate_proj.weight"):
        assert torch.allclose(fused.get_parameter(name).grad, plain.get_parameter(name).grad, atol=1e-5, rtol=1e-3)
    assert groups(fused) == 0  # requires_grad and grad mode on
    with torch.no_grad():
        assert groups(fused) == 7
        a, b = _lora_logits(fused, ids[:1]), _lora_logits(plain, ids[:1])
    assert torch.allclose(a, b, atol=1e-3, rtol=0)


def test_replaced_or_meta_weights(tiny_ckpt):
    model = LLM(tiny_ckpt("a"), device="cpu").model
    fuse_projections(model)
    attn = model.layers[0].self_attn
    new = torch.randn_like(attn.q_proj.weight)
    attn.q_proj._parameters["weight"] = torch.nn.Parameter(new, requires_grad=False)  # as the loader assigns
    assert attn.fused_qkv(False) is None  # the forward falls back to the separate GEMMs (and the new weight)
    assert fuse_projections(model) == 1 and torch.equal(attn.fused_qkv(False)[0][:new.shape[0]], new)
    with torch.device("meta"):
        meta = dg.DiffusionGemma(model.args)
    with pytest.raises(ValueError, match="meta device"):
        fuse_projections(meta)


def test_only_the_cuda_fast_path_fuses(tiny_ckpt, monkeypatch):
    llm = LLM(tiny_ckpt("a"), device="cpu")
    C = llm.args.canvas_length
    StaticStepper(llm.model, KVCache(llm.args, 1, 4 * C, "cpu", torch.float32, scratch=C), llm.defaults, 1)
    fuse_for_cuda(llm.model, torch.device("cpu"))
    assert groups(llm.model) == 0  # on the CPU the static step must stay bit-identical to the reference step
    monkeypatch.setenv("DGEMMA_FUSE", "0")
    fuse_for_cuda(llm.model, torch.device("cuda"))
    assert groups(llm.model) == 0
    monkeypatch.delenv("DGEMMA_FUSE")
    fuse_for_cuda(llm.model, torch.device("cuda"))  # the device only gates; the CPU model is stacked
    assert groups(llm.model) == 7


@pytest.mark.gpu
def test_cuda_bf16_fused_logits_match(monkeypatch):
    """bf16 on CUDA (compiled blocks if the process configured them): stacked vs separate GEMMs, both through the
    per-op layers (the fused layer, which needs the stacking, is compared in tests/test_fused_layer.py)."""
    from dgemma.benchmark import random_model
    from dgemma.models import fused_layer

    monkeypatch.setattr(fused_layer, "FUSED", {})
    model = random_model("tiny", "cuda", torch.bfloat16)
    args, B, L, C = model.args, 2, 300, model.args.canvas_length
    g = torch.Generator("cuda").manual_seed(0)
    ids, canvas = (torch.randint(3, args.vocab_size, (B, n), device="cuda", generator=g) for n in (L, C))
    outs = []
    for _ in range(2):
        cache = KVCache(args, B, L + C, "cuda", torch.bfloat16, scratch=C)
        with torch.inference_mode():
            model.encode(ids, torch.arange(L, device="cuda").expand(B, -1), cache)
            cache.advance(L)
            soft = torch.zeros(B, C, args.hidden_size, device="cuda", dtype=torch.bfloat16)
            outs.append(model.denoise_static(canvas, torch.arange(L, L + C, device="cuda")[None], cache, soft))
        fuse_for_cuda(model, torch.device("cuda"))
        assert groups(model) > 0
    a, b = (o.flatten().float() for o in outs)
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) >= 0.999

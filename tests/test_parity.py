"""Parity with transformers 5.23.0 `DiffusionGemmaForBlockDiffusion` on tiny random checkpoints (CPU, fp32)."""

import pytest
import torch
import torch.nn.functional as F

from dgemma import LLM, SamplingParams
from dgemma.engine.cache import KVCache

CONFIGS = ["a", "b", "c", "d"]
EOS = (1, 106, 50)


def hf_model(path):
    from transformers import DiffusionGemmaForBlockDiffusion

    return DiffusionGemmaForBlockDiffusion.from_pretrained(path).eval()


def padded_batch(vocab, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), L), generator=g)
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, L - n:] = 1
        ids[i, :L - n] = 0
    return ids, mask


def reference_logits(hf, ids, mask, canvas, sc):
    from transformers.cache_utils import DynamicCache

    C = canvas.shape[1]
    cache = DynamicCache(config=hf.config.get_text_config(decoder=True))
    out = hf(input_ids=ids, attention_mask=mask, past_key_values=cache, decoder_input_ids=canvas,
             decoder_attention_mask=F.pad(mask, (0, C), value=1), self_conditioning_logits=sc)
    enc = torch.tanh(hf.lm_head(out.encoder_last_hidden_state) / 30.0) * 30.0
    return enc, out.logits


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("lengths", [(5,), (3, 7), (40,), (40, 29, 13)])  # windows are 8, 12 and 64 tokens
@pytest.mark.parametrize("with_sc", [False, True])
def test_encoder_decoder_logits(tiny_ckpt, name, lengths, with_sc):
    path = tiny_ckpt(name)
    hf, llm = hf_model(path), LLM(path, device="cpu", dtype="float32")
    args = llm.args
    ids, mask = padded_batch(args.vocab_size, lengths, seed=len(lengths) * 7 + sum(lengths))
    B, L, C = *ids.shape, args.canvas_length
    canvas = torch.randint(0, args.vocab_size, (B, C), generator=torch.Generator().manual_seed(1))
    sc = 3 * torch.randn(B, C, args.vocab_size, generator=torch.Generator().manual_seed(2)) if with_sc else None
    with torch.no_grad():
        ref_enc, ref_dec = reference_logits(hf, ids, mask, canvas, sc)
        cache = KVCache(args, B, L + C, "cpu", torch.float32)
        hidden = llm.model.encode(ids, torch.arange(L).expand(B, -1), cache, mask.bool())
        cache.advance(L)
        enc = llm.model.lm_head(hidden)
        dec = llm.model.denoise(canvas, torch.arange(L, L + C)[None], cache, sc)
    valid = mask.bool()
    assert (enc - ref_enc)[valid].abs().max() <= 1e-4
    assert (dec - ref_dec).abs().max() <= 1e-4
    assert ref_dec.abs().max() > 1.0  # logits are not trivially zero


def reference_generate(hf, ids, mask, seed, knobs):
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    kw = dict(knobs)
    kw["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=float(kw.pop("entropy_bound")))
    torch.manual_seed(seed)
    with torch.no_grad():
        seqs = hf.generate(ids, attention_mask=mask, **kw).sequences
    outs = []
    for row in seqs[:, ids.shape[1]:].tolist():
        row = row[:knobs["max_new_tokens"]]
        cut = next((i for i, t in enumerate(row) if t in EOS), None)
        outs.append(row if cut is None else row[:cut + 1])
    return outs


GEN_CASES = [  # (config, knobs): temperature, bound and stop thresholds chosen so each path is exercised
    ("a", dict(max_new_tokens=40, max_denoising_steps=12, t_min=0.05, t_max=0.3, entropy_bound=0.5,
               confidence_threshold=0.3, stability_threshold=1)),
    ("b", dict(max_new_tokens=40, max_denoising_steps=12, t_min=0.05, t_max=0.3, entropy_bound=0.5,
               confidence_threshold=0.3, stability_threshold=2)),
    ("c", dict(max_new_tokens=45, max_denoising_steps=10, t_min=0.4, t_max=0.8, entropy_bound=0.1,
               confidence_threshold=0.005, stability_threshold=1)),
    ("c", dict(max_new_tokens=20, max_denoising_steps=6, t_min=0.01, t_max=0.05, entropy_bound=2.0,
               confidence_threshold=0.5, stability_threshold=0)),
    ("d", dict(max_new_tokens=70, max_denoising_steps=9, t_min=0.1, t_max=0.6, entropy_bound=0.3,
               confidence_threshold=0.2, stability_threshold=1)),
]


@pytest.mark.parametrize("case", range(len(GEN_CASES)))
def test_generate_token_exact(tiny_ckpt, case):
    name, knobs = GEN_CASES[case]
    path = tiny_ckpt(name)
    hf, llm = hf_model(path), LLM(path, device="cpu", dtype="float32")
    early_stop = eos_mid_canvas = False
    for seed in range(3):
        ids, mask = padded_batch(llm.args.vocab_size, [13, 9, 11][: 1 + seed], seed=100 + seed)
        expected = reference_generate(hf, ids, mask, seed, knobs)
        prompts = [ids[i][mask[i].bool()].tolist() for i in range(ids.shape[0])]
        outs = llm.generate(prompts, SamplingParams(seed=seed, **knobs))
        assert [o.token_ids for o in outs] == expected
        for o in outs:
            assert len(o.token_ids) <= knobs["max_new_tokens"]
            assert o.finish_reason == ("stop" if o.token_ids[-1] in EOS else "length")
            early_stop |= any(s < knobs["max_denoising_steps"] for s in o.stats["steps_per_canvas"])
            eos_mid_canvas |= o.finish_reason == "stop" and len(o.token_ids) % llm.args.canvas_length != 0
    if case < 2:  # these cases are built so that the adaptive stop fires and EOS lands inside a canvas
        assert early_stop and eos_mid_canvas


@pytest.mark.parametrize("name", ["a", "b", "c"])  # "d": transformers' bf16 grouped_mm rejects its 20-wide experts
def test_bf16_error_matches_reference_bf16_error(tiny_ckpt, name):
    """bf16 on CPU: dgemma's distance to the fp32 reference is no worse than transformers' own bf16 distance."""
    from transformers import DiffusionGemmaForBlockDiffusion

    path = tiny_ckpt(name)
    hf32 = hf_model(path)
    hf16 = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.bfloat16).eval()
    llm = LLM(path, device="cpu", dtype="bf16")
    args = llm.args
    ids, mask = padded_batch(args.vocab_size, (30, 17), seed=5)
    B, L, C = *ids.shape, args.canvas_length
    canvas = torch.randint(0, args.vocab_size, (B, C), generator=torch.Generator().manual_seed(1))
    sc = 3 * torch.randn(B, C, args.vocab_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, ref32 = reference_logits(hf32, ids, mask, canvas, sc)
        _, ref16 = reference_logits(hf16, ids, mask, canvas, sc.bfloat16())
        cache = KVCache(args, B, L + C, "cpu", torch.bfloat16)
        llm.model.encode(ids, torch.arange(L).expand(B, -1), cache, mask.bool())
        cache.advance(L)
        ours = llm.model.denoise(canvas, torch.arange(L, L + C)[None], cache, sc.bfloat16())
    err_ref = (ref16.float() - ref32).norm() / ref32.norm()
    err_ours = (ours.float() - ref32).norm() / ref32.norm()
    assert err_ours <= 1.5 * err_ref + 1e-3, (float(err_ours), float(err_ref))

"""Real-shape check on a GPU: random weights at the full DiffusionGemma-26B-A4B shape, shared by transformers 5.23.0
and dgemma (one copy of the ~50 GB of weights), one encoder pass over a prompt and decoder steps compared.

Usage: python scripts/gpu_realshape_check.py [--prompt-len 1500] [--out results.json]
The transformers model is built on the meta device and each unique parameter is materialised once on the GPU
(tied encoder/decoder weights stay tied), then its non-persistent buffers (RoPE inverse frequencies, embedding
scales) are recomputed. dgemma's model is built on meta too and its parameters alias the same GPU tensors.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dgemma.benchmark import agreement
from dgemma.config import ModelArgs
from dgemma.engine.cache import KVCache
from dgemma.loader import checkpoint_name, map_name
from dgemma.models.diffusion_gemma import DiffusionGemma
from dgemma.reference import refresh_buffers

TEXT = dict(vocab_size=262144, hidden_size=2816, intermediate_size=2112, moe_intermediate_size=704, num_experts=128,
            top_k_experts=8, num_hidden_layers=30, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
            num_global_key_value_heads=2, global_head_dim=512, sliding_window=1024, max_position_embeddings=262144,
            rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=30.0,
            attention_bias=False, use_bidirectional_attention="vision", bos_token_id=2, eos_token_id=[1, 106],
            pad_token_id=0, layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 5,
            rope_parameters={"full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                                "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})


def build_hf(device: str, dtype: torch.dtype, seed: int, rope_device: str = "cpu"):
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
    from transformers.models.gemma4 import Gemma4VisionConfig

    vision = Gemma4VisionConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                                head_dim=32)
    cfg = DiffusionGemmaConfig(text_config=dict(TEXT), vision_config=vision, canvas_length=256,
                               eos_token_id=[1, 106])
    with torch.device("meta"):
        model = DiffusionGemmaForBlockDiffusion(cfg)
    g = torch.Generator(device).manual_seed(seed)
    seen: dict[int, torch.nn.Parameter] = {}
    for mod_name, module in model.named_modules():
        for pname, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in seen:
                seen[id(p)] = torch.nn.Parameter(init_tensor(f"{mod_name}.{pname}", p.shape, device, dtype, g),
                                                 requires_grad=False)
            module._parameters[pname] = seen[id(p)]
        for bname, b in list(module._buffers.items()):
            if b is not None and b.is_meta:
                module._buffers[bname] = init_tensor(f"{mod_name}.{bname}", b.shape, device, dtype, g)
    refresh_buffers(model, device, rope_device)  # non-persistent buffers, as transformers' _init_weights does
    return model.eval(), len(seen)


def init_tensor(name: str, shape, device, dtype, g) -> torch.Tensor:
    """Random weights with sane activations: matrices ~ N(0, 1/fan_in); norms, scales and scalars near 1."""
    if len(shape) < 2 or name.endswith(("layer_scalar", "per_expert_scale")) or "norm" in name:
        return (1.0 + 0.1 * torch.randn(shape, device=device, generator=g)).to(dtype)
    if "position_embedding_table" in name:
        return torch.randn(shape, device=device, generator=g).to(dtype)
    fan_in = shape[-1]
    return (torch.randn(shape, device=device, generator=g, dtype=torch.float32) * fan_in**-0.5).to(dtype)


def alias_dgemma(hf, device) -> DiffusionGemma:
    """dgemma's model with every parameter/buffer pointing at the transformers model's GPU tensor."""
    args = ModelArgs.from_dict({"text_config": TEXT, "canvas_length": 256, "eos_token_id": [1, 106]})
    with torch.device("meta"):
        ours = DiffusionGemma(args)
    hf_tensors = dict(hf.named_parameters(remove_duplicate=False)) | dict(hf.named_buffers())
    for name in list(dict(ours.named_parameters()) | dict(ours.named_buffers())):
        if name.endswith(("_inv_freq", "embed_scale")):
            continue
        src = hf_tensors[checkpoint_name(name)]
        assert map_name(checkpoint_name(name)) == name
        mod_name, _, attr = name.rpartition(".")
        module = ours.get_submodule(mod_name)
        if attr in module._parameters:
            module._parameters[attr] = torch.nn.Parameter(src.data, requires_grad=False)
        else:
            module._buffers[attr] = src.data
    ours.init_buffers(torch.device(device))
    return ours.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-len", type=int, default=1500)  # longer than the 1024-token sliding window
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--rope-device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--per-layer", action="store_true", help="also compare each encoder layer's output")
    a = ap.parse_args()
    from transformers.cache_utils import DynamicCache

    device, dtype = "cuda", getattr(torch, a.dtype)
    torch.backends.cuda.matmul.allow_tf32 = False
    t0 = time.perf_counter()
    hf, n_unique = build_hf(device, dtype, a.seed, a.rope_device)
    ours = alias_dgemma(hf, device)
    build_s = time.perf_counter() - t0
    g = torch.Generator(device).manual_seed(a.seed + 1)
    L, C, V = a.prompt_len, 256, TEXT["vocab_size"]
    ids = torch.randint(3, V, (1, L), device=device, generator=g)
    canvas = torch.randint(0, V, (1, C), device=device, generator=g)
    res: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": a.dtype,
                 "prompt_len": L, "unique_params": n_unique, "hf_rope_device": a.rope_device,
                 "inv_freq_max_diff": {k: (getattr(ours, f"{k}_inv_freq").float() - getattr(
                     hf.model.decoder.rotary_emb, f"{k}_inv_freq").float()).abs().max().item()
                     for k in ("sliding_attention", "full_attention")},
                 "weights_gb": sum(p.numel() * p.element_size() for p in ours.parameters()) / 1e9,
                 "build_s": build_s}
    captured: dict[str, list] = {"hf": [], "ours": []}
    if a.per_layer:
        for layer in hf.model.encoder.language_model.layers:
            layer.register_forward_hook(lambda m, i, o: captured["hf"].append(o[0] if isinstance(o, tuple) else o))
        for layer in ours.layers:
            layer.register_forward_hook(lambda m, i, o: captured["ours"].append(o))
    with torch.inference_mode():
        cache = DynamicCache(config=hf.config.get_text_config(decoder=True))
        enc = hf.model.encoder(input_ids=ids, past_key_values=cache).last_hidden_state
        kv = KVCache(ours.args, 1, L + C, device, dtype)
        h = ours.encode(ids, torch.arange(L, device=device)[None], kv)
        kv.advance(L)
        res["encoder_last_hidden"] = agreement(h, enc)
        if a.per_layer:
            res["encoder_layers_max_abs_diff"] = [(x.float() - y.float()).abs().max().item()
                                                  for x, y in zip(captured["ours"], captured["hf"])]
            for hk in list(captured):
                captured[hk].clear()
        dpos = torch.arange(L, L + C, device=device)[None]
        ref1 = hf(past_key_values=cache, decoder_input_ids=canvas).logits
        got1 = ours.denoise(canvas, dpos, kv)
        res["decoder_step1"] = agreement(got1, ref1)
        sc = (ref1 / 0.8).to(dtype)  # second step with self-conditioning from the first step's logits
        ref2 = hf(past_key_values=cache, decoder_input_ids=canvas, self_conditioning_logits=sc).logits
        got2 = ours.denoise(canvas, dpos, kv, sc)
        res["decoder_step2_selfcond"] = agreement(got2, ref2)
        for name, fn in [("transformers_eager_ms", lambda: hf(past_key_values=cache, decoder_input_ids=canvas)),
                         ("dgemma_reference_ms", lambda: ours.denoise(canvas, dpos, kv))]:
            fn()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            res[f"decoder_step_{name}"] = (time.perf_counter() - t) / 3 * 1e3
    res["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    print(json.dumps(res, indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()

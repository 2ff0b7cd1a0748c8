"""A transformers 5.23.0 twin of a dgemma model that shares its weight tensors (no copy), for side-by-side checks and
`dgemma bench --compare transformers`. transformers is only needed when this module is used (a test dependency)."""

from __future__ import annotations

import torch

from dgemma.loader import checkpoint_name, official_config


def hf_twin(model):
    """`DiffusionGemmaForBlockDiffusion` built on the meta device whose parameters and buffers alias `model`'s.
    RoPE tables and embedding scales are recomputed on the CPU (as `from_pretrained` does) and moved over."""
    try:
        from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
    except ImportError as e:
        raise ValueError("this comparison needs transformers==5.23.0 (pip install 'dgemma[test]')") from e
    device = model.embed_tokens.weight.device
    cfg_dict = official_config(model.args)
    cfg_dict["vision_config"] = {"model_type": "gemma4_vision", "num_hidden_layers": 1, "hidden_size": 16,
                                 "intermediate_size": 32, "num_attention_heads": 2, "head_dim": 8}
    cfg = DiffusionGemmaConfig.from_dict(cfg_dict)
    with torch.device("meta"):
        hf = DiffusionGemmaForBlockDiffusion(cfg)
    ours = {checkpoint_name(k): v for k, v in (dict(model.named_parameters()) | dict(model.named_buffers())).items()}
    for mod_name, module in hf.named_modules():
        for kind in ("_parameters", "_buffers"):
            for name, t in list(getattr(module, kind).items()):
                if t is None:
                    continue
                key = f"{mod_name}.{name}"
                src = ours.get(key)
                if src is None:  # encoder copies of tied weights
                    src = ours.get(key.replace("model.encoder.language_model.", "model.decoder."))
                if src is None:
                    src = torch.zeros(t.shape, device=device, dtype=model.embed_tokens.weight.dtype)  # vision stub
                getattr(module, kind)[name] = torch.nn.Parameter(src, requires_grad=False) if kind == "_parameters" \
                    else src
    refresh_buffers(hf, device)
    return hf.eval()


def refresh_buffers(hf, device, rope_device: str = "cpu") -> None:
    """Recompute a meta-built transformers model's non-persistent buffers (RoPE tables, embedding scales) on
    `rope_device` and move them to `device`. `from_pretrained` computes RoPE tables on the CPU, like dgemma; on
    the GPU pow() differs by an ulp, which a random MoE amplifies (see README, Correctness)."""
    for module in hf.modules():
        if module.__class__.__name__.endswith("TextRotaryEmbedding"):
            for layer_type, fn in module.rope_init_fns.items():
                inv, _ = fn(module.config.per_layer_config[layer_type], rope_device, layer_type=layer_type)
                setattr(module, f"{layer_type}_inv_freq", inv.to(device))
                setattr(module, f"{layer_type}_original_inv_freq", inv.to(device))
        if module.__class__.__name__.endswith("ScaledWordEmbedding"):
            module.embed_scale = torch.tensor(module.scalar_embed_scale, device=device)

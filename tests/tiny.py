"""Tiny random DiffusionGemma checkpoints written by transformers 5.23.0 (`save_pretrained`), the real layout:
decoder-only text weights, encoder layer scalars, a small vision tower. Every weight, norm, router scale and layer
scalar is randomised (the defaults are ones, which would hide mistakes)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIGS = {
    # sliding window smaller than prompts and canvas; GQA 2:1; full layer with 1 KV head and head_dim 32
    "a": dict(vocab_size=384, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
              top_k_experts=2, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              num_global_key_value_heads=1, global_head_dim=32, sliding_window=8,
              layer_types=["sliding_attention", "sliding_attention", "full_attention"], canvas_length=16),
    # 6-layer 5:1 pattern, MHA on sliding layers, top-4 of 6 experts, canvas 8
    "b": dict(vocab_size=300, hidden_size=48, intermediate_size=64, moe_intermediate_size=24, num_experts=6,
              top_k_experts=4, num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=2, head_dim=24,
              num_global_key_value_heads=1, global_head_dim=48, sliding_window=12, layer_types=None, canvas_length=8),
    # full layer first, wider window than prompt, 4 query heads per KV head on full layers
    "c": dict(vocab_size=512, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_experts=4,
              top_k_experts=1, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
              num_global_key_value_heads=1, global_head_dim=16, sliding_window=64,
              layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
              canvas_length=16),
    # attention biases, 7 layers with the default pattern (last one forced to full), top-3 of 5 experts,
    # no num_global_key_value_heads (full layers fall back to num_key_value_heads), canvas 32, window 6
    "d": dict(vocab_size=260, hidden_size=40, intermediate_size=56, moe_intermediate_size=20, num_experts=5,
              top_k_experts=3, num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=2, head_dim=10,
              global_head_dim=20, sliding_window=6, layer_types=None, attention_bias=True, canvas_length=32),
}


def build_hf(name: str, seed: int = 0):
    """A transformers DiffusionGemmaForBlockDiffusion (fp32, eval) with randomised weights."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
    from transformers.models.gemma4 import Gemma4VisionConfig

    spec = dict(CONFIGS[name])
    canvas = spec.pop("canvas_length")
    if spec["layer_types"] is None:
        spec.pop("layer_types")
    text = dict(spec, max_position_embeddings=4096, use_bidirectional_attention="vision", eos_token_id=[1, 106])
    vision = Gemma4VisionConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                head_dim=8)
    cfg = DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=canvas, eos_token_id=[1, 106])
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith(("router.scale", "per_expert_scale")):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.1))
        emb = model.model.decoder.embed_tokens.weight
        emb.mul_(4.0)  # sharper logits so entropies span the accept bound and the stop can fire
        for pname, b in model.named_buffers():
            if pname.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model


def save_checkpoint(name: str, out: Path, seed: int = 0, generation_config: dict | None = None) -> Path:
    model = build_hf(name, seed)
    model.save_pretrained(out)
    gen = {"eos_token_id": [1, 106, 50], "pad_token_id": 0} if generation_config is None else generation_config
    (out / "generation_config.json").write_text(json.dumps(gen))
    return out

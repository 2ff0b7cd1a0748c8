"""Build the bundled default model: a tiny DiffusionGemma-architecture checkpoint with RANDOM weights.

It exists so that `make run` and `LLM()` work offline on any machine before a trained default model ships; its
text is noise. The architecture keeps every feature of the real model (5 sliding + 1 full layer, K=V full layer
with its own head_dim and KV heads, proportional RoPE, MoE + dense branch, self-conditioning, softcapping).
Usage: python scripts/build_default_model.py [OUT_DIR]   (default: dgemma/assets/default)
"""

import json
import sys
from pathlib import Path

import torch

from dgemma.config import ModelArgs
from dgemma.loader import save_model
from dgemma.models.diffusion_gemma import DiffusionGemma

ARGS = dict(vocab_size=2048, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_experts=8,
            top_k_experts=2, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            num_global_key_value_heads=1, global_head_dim=64, sliding_window=128, max_position_embeddings=8192,
            eos_token_id=[1, 106], canvas_length=64, image_token_id=4, boi_token_id=4, eoi_token_id=4)
GENERATION = {"max_denoising_steps": 48, "max_new_tokens": 256, "t_min": 0.4, "t_max": 0.8,
              "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
              "confidence_threshold": 0.005, "stability_threshold": 1, "eos_token_id": [1, 106, 50],
              "pad_token_id": 0}


def main(out: Path) -> None:
    torch.manual_seed(0)
    model = DiffusionGemma(ModelArgs(**ARGS))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
    save_model(model, out, metadata={"dgemma_note": "random weights, text is noise"})
    (out / "generation_config.json").write_text(json.dumps(GENERATION, indent=2) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parents[1] / "dgemma" / "assets" / "default")

"""Where does transformers compute its RoPE inverse frequencies? Compare a model loaded by
`from_pretrained(device_map="cuda")` and one built under `torch.device("cuda")` with CPU- and GPU-computed tables
(the full-attention table at real shape: proportional RoPE, head_dim 512, theta 1e6)."""

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_realshape_check import TEXT  # noqa: E402


def table(device: str) -> torch.Tensor:
    from dgemma.config import ModelArgs
    from dgemma.models.diffusion_gemma import rope_inv_freq

    args = ModelArgs.from_dict({"text_config": TEXT})
    with torch.device(device):
        return rope_inv_freq(args, "full_attention").cpu()


def main() -> None:
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
    from transformers.models.gemma4 import Gemma4VisionConfig

    small = dict(TEXT, vocab_size=512, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                 top_k_experts=2, num_hidden_layers=6, layer_types=TEXT["layer_types"][:6])
    vision = Gemma4VisionConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                head_dim=16)
    cfg = DiffusionGemmaConfig(text_config=small, vision_config=vision)
    cpu, gpu = table("cpu"), table("cuda")
    out = {"cpu_vs_gpu_max_diff": (cpu - gpu).abs().max().item()}
    with tempfile.TemporaryDirectory() as d:
        DiffusionGemmaForBlockDiffusion(cfg).save_pretrained(d)
        loaded = DiffusionGemmaForBlockDiffusion.from_pretrained(d, device_map="cuda", dtype=torch.bfloat16)
        inv = loaded.model.decoder.rotary_emb.full_attention_inv_freq.cpu()
        out["from_pretrained_cuda_equals_cpu"] = bool(torch.equal(inv, cpu))
        out["from_pretrained_cuda_equals_gpu"] = bool(torch.equal(inv, gpu))
    with torch.device("cuda"):
        built = DiffusionGemmaForBlockDiffusion(cfg)
    inv = built.model.decoder.rotary_emb.full_attention_inv_freq.cpu()
    out["built_under_cuda_equals_cpu"] = bool(torch.equal(inv, cpu))
    out["built_under_cuda_equals_gpu"] = bool(torch.equal(inv, gpu))
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""Build the bundled default model: a small DiffusionGemma trained from scratch with `dgemma train` on fortunes.

The recipe, step by step (each step prints the command it runs; the model card records the numbers):
1. `python scripts/fortunes_data.py build/fortunes`: chat JSONL from Debian's `fortunes` package (95% train /
   5% held out) and a 2048-id byte-level BPE tokenizer trained on the training split;
2. `build/cfg/h192.json`: the architecture (ARCH below): 5 sliding-window layers + 1 full-attention layer (K=V,
   its own head_dim and KV heads, proportional RoPE), dense MLP + 8 routed experts top-2, self-conditioning,
   canvas 64, window 64; 5.3 M parameters;
3. `dgemma train` from scratch (TRAIN_FLAGS), and the autoregressive baseline: the same command with
   `--diffusion-weight 0` (encoder AR loss only), same size, data, steps and seed;
4. `python scripts/eval_default_model.py` for the held-out metrics;
5. copy the trained model (bf16, official layout), tokenizer, chat template and generation_config.json into
   dgemma/assets/default/.

Usage: python scripts/build_default_model.py [--threads 1] [--skip-train]   (needs `apt-get install fortunes`)
On a 2-core CPU VM the diffusion run took 51 minutes wall-clock (OMP_NUM_THREADS=1, both runs side by side).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from dgemma.config import ModelArgs
from dgemma.loader import official_config

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build"
ASSETS = ROOT / "dgemma" / "assets" / "default"
ARCH = dict(vocab_size=2048, hidden_size=192, intermediate_size=384, moe_intermediate_size=96, num_experts=8,
            top_k_experts=2, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=48,
            num_global_key_value_heads=1, global_head_dim=96, sliding_window=64, max_position_embeddings=8192,
            eos_token_id=[1, 106], canvas_length=64, image_token_id=4, boi_token_id=4, eoi_token_id=4)
GENERATION = {"max_denoising_steps": 48, "max_new_tokens": 256, "t_min": 0.4, "t_max": 0.8,
              "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
              "confidence_threshold": 0.005, "stability_threshold": 1, "eos_token_id": [1, 106, 50],
              "pad_token_id": 0}
TRAIN_FLAGS = ["--mode", "scratch", "--config", "build/cfg/h192.json", "--tokenizer", "build/fortunes",
               "--steps", "1000", "--batch-size", "16", "--max-len", "128", "--lr", "2e-3", "--warmup", "100",
               "--seed", "0", "--save-every", "250"]


def sh(cmd: list[str], env: dict | None = None, background: bool = False):
    print("+", " ".join(cmd), flush=True)
    if background:
        return subprocess.Popen(cmd, cwd=ROOT, env=env)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1", help="OMP_NUM_THREADS of each training run (default 1)")
    ap.add_argument("--skip-train", action="store_true", help="reuse build/default-train and build/ar-train")
    args = ap.parse_args()
    py, dgemma = sys.executable, str(Path(sys.executable).parent / "dgemma")
    sh([py, "scripts/fortunes_data.py", "build/fortunes"])
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(ASSETS / name, BUILD / "fortunes" / name)
    (BUILD / "fortunes" / "generation_config.json").write_text(json.dumps(GENERATION, indent=2) + "\n")
    (BUILD / "cfg").mkdir(parents=True, exist_ok=True)
    (BUILD / "cfg" / "h192.json").write_text(json.dumps(official_config(ModelArgs(**ARCH)), indent=2) + "\n")
    if not args.skip_train:
        env = dict(os.environ, OMP_NUM_THREADS=args.threads)
        runs = [sh([dgemma, "train", "build/fortunes/train.jsonl", *TRAIN_FLAGS, "--out", out, *extra], env, True)
                for out, extra in (("build/default-train", []), ("build/ar-train", ["--diffusion-weight", "0"]))]
        if any(r.wait() for r in runs):
            raise SystemExit("a training run failed")
    sh([py, "scripts/eval_default_model.py", "build/default-train", "build/fortunes", "--ar", "build/ar-train",
        "--json", "build/default-eval.json"])
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "generation_config.json"):
        shutil.copy(BUILD / "default-train" / name, ASSETS / name)
    shutil.copy(BUILD / "default-train" / "loss.png", ASSETS.parents[2] / "docs" / "default_model_loss.png")
    print(f"installed into {ASSETS}; update MODEL_CARD.md with build/default-eval.json")


if __name__ == "__main__":
    main()

"""`dgemma train DATA.jsonl --out DIR`: block-diffusion training (REFERENCE.md §9) from scratch, full or LoRA.

What it does: builds a `TrainConfig` from the flags and runs `dgemma.train.trainer.train`, which shows a progress
bar (loss, tokens/s), writes checkpoints, log.jsonl and loss.png, and finally the model (official layout) or the
LoRA adapter (adapter_model.safetensors + adapter_config.json) under --out.

Design choices: the flag names are the TrainConfig field names; `--resume CKPT_DIR` continues a run exactly
(same flags required; the checkpoint holds the optimizer, data position and RNG states).
"""

from __future__ import annotations

import argparse

from dgemma.train.lora import DEFAULT_TARGETS
from dgemma.train.trainer import MODES, TrainConfig, train


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="JSONL training data: {'text'}, {'messages'} or {'prompt', 'completion'} per line")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--mode", choices=MODES, default="lora",
                   help="scratch: a new model from --config; full: fine-tune every weight (router frozen); "
                   "lora: adapters only (default)")
    p.add_argument("--model", default=None, help="base checkpoint for full/lora; default: the bundled model")
    p.add_argument("--config", default=None, help="scratch: config.json giving the architecture")
    p.add_argument("--tokenizer", default=None, help="directory with tokenizer.json; default: the model's")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch (default 8)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    p.add_argument("--warmup", type=int, default=50, help="linear warmup steps (default 50)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-len", type=int, default=256, help="tokens per example at most (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ar-weight", type=float, default=1.0, help="encoder AR loss weight (default 1.0)")
    p.add_argument("--diffusion-weight", type=float, default=1.0,
                   help="diffusion loss weight; 0 trains an autoregressive-only baseline")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="no bf16 autocast on CUDA")
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute the decoder pass in backward")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora-targets", default=",".join(DEFAULT_TARGETS),
                   help="comma-separated module suffixes; add 'experts' for the routed experts")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (default: at the end)")
    p.add_argument("--save-dtype", choices=("bfloat16", "float32", "float16"), default="bfloat16")
    p.add_argument("--device", default=None, help="cpu or cuda[:N]; default: cuda if available")
    p.add_argument("--resume", default=None, metavar="CKPT_DIR", help="continue from OUT/checkpoints/step-N")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    for name in ("steps", "batch_size", "grad_accum", "max_len", "lora_rank"):
        if getattr(args, name) < 1:
            args._parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return TrainConfig(
        data=args.data, out=args.out, mode=args.mode, model=args.model, config=args.config, tokenizer=args.tokenizer,
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        min_lr_ratio=args.min_lr_ratio, warmup=args.warmup, weight_decay=args.weight_decay, max_len=args.max_len,
        seed=args.seed, ar_weight=args.ar_weight, diffusion_weight=args.diffusion_weight, bf16=args.bf16,
        grad_checkpoint=args.grad_checkpoint, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_targets=[t.strip() for t in args.lora_targets.split(",") if t.strip()], save_every=args.save_every,
        device=args.device, save_dtype=args.save_dtype, progress=args.progress)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    t = train(cfg, resume=args.resume)
    print(f"dgemma train: {t.step} steps, {t.tokens} tokens → {t.out}")
    return 0

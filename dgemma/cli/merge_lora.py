"""`dgemma merge-lora ADAPTER --out DIR`: fold a LoRA adapter into its base model and save the result.

The base is `--model` or the adapter's recorded `base_model`; the output is an ordinary checkpoint in the official
layout (config.json, model.safetensors, tokenizer and generation files copied from the base).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from dgemma.loader import load, save_model
from dgemma.train.lora import CONFIG_FILE, load_adapter
from dgemma.train.trainer import TOKENIZER_FILES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="directory with adapter_model.safetensors and adapter_config.json")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--model", default=None, help="base checkpoint; default: the adapter's base_model")
    p.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default="bfloat16",
                   help="dtype of the saved weights (the merge itself runs in fp32)")


def run(args: argparse.Namespace) -> int:
    cfg_file = Path(args.adapter) / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{args.adapter}: no {CONFIG_FILE}; is this a LoRA adapter directory?")
    base = args.model or json.loads(cfg_file.read_text()).get("base_model")
    model, _, path = load(base, "cpu", torch.float32)
    load_adapter(model, args.adapter, merge_now=True)
    out = Path(args.out)
    save_model(model, out, dtype=getattr(torch, args.dtype), metadata={"dgemma_merged_lora": str(args.adapter)})
    for name in TOKENIZER_FILES:
        if (Path(path) / name).exists():
            shutil.copy(Path(path) / name, out / name)
    print(f"dgemma merge-lora: {args.adapter} + {path} → {out}")
    return 0

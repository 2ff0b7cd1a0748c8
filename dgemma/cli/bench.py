"""`dgemma bench`: time the denoising step, commit pass and prefill against the HBM floor and transformers.

    dgemma bench --random-weights --shape 26b-a4b --batch 1 8 --prompt-len 512 4096 --steps 16 48
    dgemma bench --model /path/to/ckpt --compare transformers

Results go to benchmarks/results/bench-<gpu>-<time>.{json,md}, one JSON object per configuration with the exact
command, git commit, GPU, torch version, precision, shape, batch, prompt length and steps next to every number.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import torch


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {text})")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint directory or hub id to benchmark")
    src.add_argument("--random-weights", action="store_true",
                     help="random weights built directly on the GPU (no checkpoint needed); see --shape")
    p.add_argument("--shape", default="26b-a4b", choices=["26b-a4b", "tiny"], help="shape for --random-weights")
    p.add_argument("--dtype", default="bf16", help="precision (default bf16)")
    p.add_argument("--device", default=None, help="default: cuda")
    p.add_argument("--batch", type=_positive, nargs="+", default=[1], help="batch sizes to sweep (default 1)")
    p.add_argument("--prompt-len", type=_positive, nargs="+", default=[512], help="prompt lengths (default 512)")
    p.add_argument("--steps", type=_positive, nargs="+", default=[16], help="fixed denoising steps (default 16)")
    p.add_argument("--reference", action="store_true", help="also time the reference (eager) step")
    p.add_argument("--compare", choices=["transformers"], default=None,
                   help="also time transformers 5.23.0's eager denoising step on the same weights")
    p.add_argument("--ar", action="store_true",
                   help="also time greedy autoregressive decoding through the causal encoder (batch 1, CUDA graph)")
    p.add_argument("--compile", action="store_true",
                   help="fuse norms and sampler passes with torch.compile (experimental; sets DGEMMA_COMPILE=1)")
    p.add_argument("--reps", type=_positive, default=10, help="timed repetitions per measurement (default 10)")
    p.add_argument("--out", default="benchmarks/results", help="directory for the JSON and markdown results")


def run(args: argparse.Namespace) -> int:
    from dgemma import benchmark as bm
    from dgemma.api import LLM, resolve_device, resolve_dtype

    if args.compile:
        os.environ["DGEMMA_COMPILE"] = "1"
    device = str(resolve_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    dtype = resolve_dtype(args.dtype, torch.device(device))
    if args.model:
        model, shape = LLM(args.model, device=device, dtype=dtype).model, args.model
    else:
        model, shape = bm.random_model(args.shape, device, dtype), args.shape
    env = bm.environment(device)
    bandwidth = bm.copy_bandwidth(device, gib=2.0 if device.startswith("cuda") else 0.25)
    floor_ms = bm.step_bytes(model) / bandwidth * 1e3
    command = "dgemma bench " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    common = env | {"precision": str(dtype).removeprefix("torch."), "shape": shape, "command": command,
                    "copy_bandwidth_gbs": bandwidth / 1e9, "floor_ms_per_step": floor_ms}
    print(f"{env['gpu']} · {common['precision']} · copy bandwidth {bandwidth / 1e9:.0f} GB/s · "
          f"floor {floor_ms:.2f} ms/step", file=sys.stderr)
    rows = []
    for steps in args.steps:
        for L in args.prompt_len:
            for B in args.batch:
                for fast in [True, False] if args.reference else [True]:
                    row = common | bm.measure(model, bm.Config(B, L, steps, fast), device, args.reps)
                    if args.compare == "transformers" and fast:
                        row["transformers_ms_per_step"] = transformers_step_ms(model, B, L, steps, device, args.reps)
                        row["transformers_path"] = "eager, DynamicCache (torch.compile path not measured yet)"
                    rows.append(row)
                    _print_row(row)
    if args.ar:
        for L in args.prompt_len:
            row = common | bm.measure_ar(model, L, device)
            rows.append(row)
            print(f"AR  L={L:<6} {row['ms_per_token']:.2f} ms/token · {row['ar_tok_s']:.0f} tok/s (batch 1)",
                  flush=True)
    stem = f"bench-{env['gpu'].replace(' ', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"
    json_path, md_path = bm.write_results(rows, Path(args.out), stem)
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0


def _print_row(r: dict) -> None:
    ref = f" · transformers {r['transformers_ms_per_step']:.2f} ms" if r.get("transformers_ms_per_step") else ""
    print(f"B={r['batch']:<3} L={r['prompt_len']:<6} S={r['steps']:<3} {r['path']:<9} "
          f"step {r['ms_per_step']:.2f} ms (floor {r['floor_ms_per_step']:.2f}) · commit {r['ms_per_commit']:.2f} ms"
          f" · ttft {r['ttft_ms']:.1f} ms · {r['tok_s_excl_prefill']:.0f} tok/s excl. prefill{ref}", flush=True)


def transformers_step_ms(model, batch: int, prompt_len: int, steps: int, device: str, reps: int) -> float:
    """transformers 5.23.0's eager denoising step (decoder forward + its sampler) on the same weights."""
    from dgemma.benchmark import time_ms
    from dgemma.reference import hf_twin

    hf = hf_twin(model)
    from transformers.cache_utils import DynamicCache
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        DiffusionGemmaGenerationConfig,
        EntropyBoundSamplerConfig,
    )

    args, C = model.args, model.args.canvas_length
    gc = DiffusionGemmaGenerationConfig(max_denoising_steps=steps, sampler_config=EntropyBoundSamplerConfig(0.1),
                                        t_min=0.4, t_max=0.8, stability_threshold=1, confidence_threshold=1e-30)
    ids = torch.randint(3, args.vocab_size, (batch, prompt_len), device=device)
    with torch.inference_mode():
        cache = DynamicCache(config=hf.config.get_text_config(decoder=True))
        hf.model.encoder(input_ids=ids, past_key_values=cache)
        canvas = torch.randint(0, args.vocab_size, (batch, C), device=device)
        state = {"sc": None}
        sampler, processors = hf._prepare_sampler(gc), hf._prepare_logits_processor(gc)
        stopping = hf._prepare_diffusion_stopping_criteria(gc)
        dpos = torch.arange(prompt_len, prompt_len + C, device=device)[None]
        done = torch.zeros(batch, dtype=torch.bool, device=device)

        def step():
            _, _, state["sc"], _ = hf._denoising_step(
                decoder_forward=hf.forward, current_canvas=canvas, argmax_canvas=canvas, input_ids=ids,
                decoder_position_ids=dpos, self_conditioning_logits=state["sc"], mask_mapping=None,
                past_key_values=cache, finished_denoising=done, cur_step=steps, sampler=sampler,
                logits_processor=processors, diffusion_stopping_criteria=stopping)
        ms = time_ms(step, device, reps=reps)
    return ms

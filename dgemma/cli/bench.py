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
    p.add_argument("--dtype", nargs="+", default=["bf16"], help="precisions to sweep (default bf16; e.g. bf16 fp16)")
    p.add_argument("--device", default=None, help="default: cuda")
    p.add_argument("--batch", type=_positive, nargs="+", default=[1], help="batch sizes to sweep (default 1)")
    p.add_argument("--prompt-len", type=_positive, nargs="+", default=[512], help="prompt lengths (default 512)")
    p.add_argument("--steps", type=_positive, nargs="+", default=[16], help="fixed denoising steps (default 16)")
    p.add_argument("--reference", action="store_true", help="also time the reference (eager) step")
    p.add_argument("--compare", choices=["transformers", "transformers-eager"], default=None,
                   help="also time transformers 5.23.0 on the same weights: `transformers` = its fastest path "
                        "(generate with a static cache + torch.compile, slow to compile at the real shape) and its "
                        "eager step; `transformers-eager` = the eager step only")
    p.add_argument("--ar", action="store_true",
                   help="also time greedy autoregressive decoding through the causal encoder (batch 1, CUDA graph)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip torch.compile of the step's blocks (sets DGEMMA_COMPILE=0; compiled is the default)")
    p.add_argument("--no-triton", dest="triton", action="store_false",
                   help="skip the Triton kernels (canvas attention, fused MoE; sets DGEMMA_TRITON=0)")
    p.add_argument("--reps", type=_positive, default=10, help="timed repetitions per measurement (default 10)")
    p.add_argument("--out", default="benchmarks/results", help="directory for the JSON and markdown results")


def run(args: argparse.Namespace) -> int:
    from dgemma import benchmark as bm
    from dgemma.api import LLM, resolve_device, resolve_dtype

    os.environ["DGEMMA_COMPILE"] = "1" if args.compile else "0"
    os.environ["DGEMMA_TRITON"] = "1" if args.triton else "0"
    device = str(resolve_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    dtypes = [resolve_dtype(d, torch.device(device)) for d in args.dtype]  # every name checked before any work
    env = bm.environment(device)
    bandwidth = bm.copy_bandwidth(device, gib=2.0 if device.startswith("cuda") else 0.25)
    command = "dgemma bench " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    rows = []
    for dtype in dtypes:
        if args.model:
            model, shape = LLM(args.model, device=device, dtype=dtype).model, args.model
        else:
            model, shape = bm.random_model(args.shape, device, dtype), args.shape
        floor_ms = bm.step_bytes(model) / bandwidth * 1e3
        flops = bm.matmul_flops(device, dtype)
        common = env | {"precision": str(dtype).removeprefix("torch."), "shape": shape, "command": command,
                        "compiled": args.compile, "triton": args.triton, "copy_bandwidth_gbs": bandwidth / 1e9,
                        "matmul_tflops": flops / 1e12, "floor_ms_per_step": floor_ms}
        print(f"{env['gpu']} · {common['precision']} · copy bandwidth {bandwidth / 1e9:.0f} GB/s · "
              f"GEMM {flops / 1e12:.0f} TFLOP/s · floor {floor_ms:.2f} ms/step", file=sys.stderr)
        rows += _sweep(model, common, device, args)
        del model  # one precision's weights at a time
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    stem = f"bench-{env['gpu'].replace(' ', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"
    json_path, md_path = bm.write_results(rows, Path(args.out), stem)
    for line in bm.summary(rows):
        print(line, file=sys.stderr)
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0


def _sweep(model, common: dict, device: str, args) -> list[dict]:
    """Every (steps, prompt length, batch) configuration of one model, then the AR run if asked."""
    from dgemma import benchmark as bm

    rows = []
    for steps in args.steps:
        for L in args.prompt_len:
            for B in args.batch:
                for fast in [True, False] if args.reference else [True]:
                    row = common | bm.measure(model, bm.Config(B, L, steps, fast), device, args.reps)
                    row["roofline_ms_per_step"] = bm.roofline_ms(bm.step_work(model, B, L),
                                                                 common["copy_bandwidth_gbs"] * 1e9,
                                                                 common["matmul_tflops"] * 1e12)
                    if args.compare and fast:
                        row |= _compare(model, B, L, steps, device, args)
                        row["speedup_vs_transformers"] = row["transformers_ms_per_step"] / row["ms_per_step"]
                    rows.append(row)
                    _print_row(row)
    if args.ar:
        for L in args.prompt_len:
            row = common | bm.measure_ar(model, L, device)
            rows.append(row)
            print(f"AR  L={L:<6} {row['ms_per_token']:.2f} ms/token · {row['ar_tok_s']:.0f} tok/s (batch 1)",
                  flush=True)
    return rows


def _compare(model, B: int, L: int, steps: int, device: str, args) -> dict:
    from dgemma import benchmark as bm

    out = {"transformers_eager_ms_per_step": bm.transformers_eager_step_ms(model, B, L, steps, device, args.reps)}
    out["transformers_ms_per_step"] = out["transformers_eager_ms_per_step"]
    out["transformers_path"] = "eager step, DynamicCache"
    if args.compare == "transformers":
        compiled = bm.transformers_generate_step_ms(model, B, L, steps, device, compile=True)
        out["transformers_compiled_ms_per_step"] = compiled["ms_per_step"]
        out["transformers_compiled_compile_s"] = compiled["compile_s"]
        if compiled["ms_per_step"] < out["transformers_ms_per_step"]:
            out["transformers_ms_per_step"] = compiled["ms_per_step"]
            out["transformers_path"] = compiled["path"]
    return out


def _print_row(r: dict) -> None:
    ref = f" · transformers {r['transformers_ms_per_step']:.2f} ms" if r.get("transformers_ms_per_step") else ""
    fold = (f" (folded into a {r['ms_first_step']:.2f} ms first step; separate pass {r['ms_commit_pass']:.2f} ms)"
            if r.get("ms_first_step") is not None else "")
    print(f"B={r['batch']:<3} L={r['prompt_len']:<6} S={r['steps']:<3} {r['path']:<9} "
          f"step {r['ms_per_step']:.2f} ms (floor {r['floor_ms_per_step']:.2f}, roofline "
          f"{r['roofline_ms_per_step']:.2f}) · commit {r['ms_per_commit']:.2f} ms"
          f"{fold} · ttft {r['ttft_ms']:.1f} ms · {r['tok_s_excl_prefill']:.0f} tok/s excl. prefill{ref}", flush=True)

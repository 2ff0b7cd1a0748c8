"""Where the time of one denoising step goes: torch.profiler over the static step, real shape, random weights, with
the kernels `configure_cuda_kernels` picks (Triton, and torch.compile unless DGEMMA_COMPILE=0). Steps run eagerly
so each kernel is attributed; the summary counts kernels per step (a CUDA graph replays the same kernels with less
launch overhead, so GPU time here is close to a replay's).

Usage: python scripts/gpu_profile_step.py [--batch 1] [--prompt-len 512] [--fold] [--out profile.txt]"""

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

from dgemma.benchmark import random_model
from dgemma.config import DiffusionParams
from dgemma.engine.cache import KVCache
from dgemma.engine.fast import StaticStepper

# kernel-name fragments → category, first match wins
CATEGORIES = [("moe (triton)", ("_gate_up_kernel", "_down_kernel", "_gate_up_tma_kernel", "_down_tma_kernel",
                                "_gather_kernel", "_align_kernel", "_sum_k_kernel")),
              ("attention (triton)", ("_canvas_attn", "_merge_kernel")),
              ("sampler (triton)", ("_sample", "sampler")),
              ("gemm (cuBLAS/cutlass)", ("nvjet", "gemm", "cutlass", "sm90_xmma", "grouped")),
              ("sdpa", ("fmha", "flash", "cudnn")),
              ("inductor fused", ("triton_",)),
              ("copies", ("copy", "Memcpy", "memcpy")),
              ("other aten", ("",))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--fold", action="store_true", help="profile the first step of a canvas, with the commit pass of "
                    "the previous canvas folded in (StaticStepper.fold_commit)")
    a = ap.parse_args()
    model = random_model("26b-a4b", "cuda", torch.bfloat16)
    args, C, B, L = model.args, model.args.canvas_length, a.batch, a.prompt_len
    cache = KVCache(args, B, L + 2 * C, "cuda", torch.bfloat16, scratch=C)
    with torch.inference_mode():
        model.encode(torch.randint(3, args.vocab_size, (B, L), device="cuda"),
                     torch.arange(L, device="cuda").expand(B, -1), cache)
    cache.advance(L)
    stepper = StaticStepper(model, cache, DiffusionParams(max_denoising_steps=16), B, use_graph=False)
    committed = torch.randint(3, args.vocab_size, (B, C), device="cuda")
    enc_pos = torch.arange(L, L + C, device="cuda").expand(B, -1)
    start = L + C if a.fold else L  # with --fold, the committed canvas sits at L..L+C-1 and the new one after it

    def step(s):
        if a.fold:  # the same slots every time: repeatable
            stepper.fold_commit(committed, enc_pos)
        stepper.step(s)

    stepper.start_canvas(torch.arange(start, start + C, device="cuda")[None])
    for s in range(3):
        step(16 - s)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for s in range(a.steps):
            step(13 - s)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    per_cat = collections.defaultdict(lambda: [0.0, 0])
    for e in kernels:
        cat = next(c for c, frags in CATEGORIES if any(f in e.name for f in frags))
        per_cat[cat][0] += e.device_time / 1e3 / a.steps
        per_cat[cat][1] += 1 / a.steps
    total = sum(v[0] for v in per_cat.values())
    kind = "folded first steps" if a.fold else "steps"
    lines = [f"batch {B}, prompt {L}, {a.steps} eager static {kind}, random 26b-a4b, bf16, torch {torch.__version__}, "
             f"{torch.cuda.get_device_name()}",
             f"per step: {total:.2f} ms of kernel time in {len(kernels) / a.steps:.0f} kernels",
             f"{'category':<24}{'ms/step':>9}{'kernels/step':>14}"]
    lines += [f"{c:<24}{ms:9.2f}{n:14.0f}" for c, (ms, n) in sorted(per_cat.items(), key=lambda kv: -kv[1][0])]
    lines.append(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70))
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()

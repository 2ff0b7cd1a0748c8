"""Where the time of one denoising step goes: torch.profiler over the static step (eager, so kernels are
attributed), real shape, random weights. Usage: python scripts/gpu_profile_step.py [--batch 1] [--prompt-len 512]"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from dgemma.benchmark import random_model
from dgemma.config import DiffusionParams
from dgemma.engine.cache import KVCache
from dgemma.engine.fast import StaticStepper


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--out", default=None)
    ap.add_argument("--blocks", action="store_true",
                    help="torch.compile the feed-forward block and the attention projections, plus DGEMMA_COMPILE=1 "
                         "(what scripts/gpu_compile_experiment.py calls the `blocks` variant)")
    a = ap.parse_args()
    if a.blocks:
        import os

        import torch.nn.functional as F

        from dgemma.models import diffusion_gemma as dg

        os.environ["DGEMMA_COMPILE"] = "1"
        torch._dynamo.config.cache_size_limit = 64
        dg.grouped_linear = lambda x, w, offs: F.grouped_mm(x.to(w.dtype), w.transpose(-2, -1), offs=offs)
        dg.Layer.feed_forward = torch.compile(dg.Layer.feed_forward, dynamic=False)
        dg.Attention.project = torch.compile(dg.Attention.project, dynamic=False)
    model = random_model("26b-a4b", "cuda", torch.bfloat16)
    args, C, B, L = model.args, model.args.canvas_length, a.batch, a.prompt_len
    cache = KVCache(args, B, L + C, "cuda", torch.bfloat16, scratch=C)
    with torch.inference_mode():
        model.encode(torch.randint(3, args.vocab_size, (B, L), device="cuda"),
                     torch.arange(L, device="cuda").expand(B, -1), cache)
    cache.advance(L)
    stepper = StaticStepper(model, cache, DiffusionParams(max_denoising_steps=16), B, use_graph=False)
    stepper.start_canvas(torch.arange(L, L + C, device="cuda")[None])
    for s in range(3):
        stepper.step(16 - s)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for s in range(3):
            stepper.step(13 - s)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=70)
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(f"batch {B}, prompt {L}, blocks={a.blocks}, 3 eager static steps, random 26b-a4b, bf16\n{table}\n")


if __name__ == "__main__":
    main()

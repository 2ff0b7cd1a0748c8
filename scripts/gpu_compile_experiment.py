"""Experiment (GPU): how much does torch.compile of whole sub-blocks (the feed-forward block: norms, dense MLP, router,
experts' elementwise glue; the attention projections: q/k/v, norms, RoPE) save on the static denoising step?
Monkeypatches the model classes for this process only, then times the step like `dgemma bench`.

    python3 scripts/gpu_compile_experiment.py --batch 1 8
"""

import argparse
import json
import os

import torch
import torch.nn.functional as F

from dgemma import benchmark as bm
from dgemma.models import diffusion_gemma as dg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--variants", nargs="+", default=["eager", "norms", "blocks"])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch._dynamo.config.cache_size_limit = 64
    model = bm.random_model("26b-a4b", "cuda", torch.bfloat16)
    floor = bm.step_bytes(model) / bm.copy_bandwidth("cuda") * 1e3
    rows = []
    orig_ff, orig_proj, orig_gl = dg.Layer.feed_forward, dg.Attention.project, dg.grouped_linear
    for variant in a.variants:
        dg.Layer.feed_forward, dg.Attention.project, dg.grouped_linear = orig_ff, orig_proj, orig_gl
        os.environ.pop("DGEMMA_COMPILE", None)
        if variant in ("norms", "blocks"):
            os.environ["DGEMMA_COMPILE"] = "1"  # fused RMSNorm + sampler passes (the existing opt-in)
        if variant == "blocks":
            dg.grouped_linear = lambda x, w, offs: F.grouped_mm(x.to(w.dtype), w.transpose(-2, -1), offs=offs)
            dg.Layer.feed_forward = torch.compile(orig_ff, dynamic=False)
            dg.Attention.project = torch.compile(orig_proj, dynamic=False)
        for B in a.batch:
            r = bm.measure(model, bm.Config(B, 512, 16), "cuda", reps=10)
            r |= {"variant": variant, "floor_ms_per_step": floor}
            rows.append(r)
            print(f"{variant:<7} B={B:<3} step {r['ms_per_step']:.2f} ms (floor {floor:.2f}) commit "
                  f"{r['ms_per_commit']:.2f} ms  {r['tok_s_excl_prefill']:.0f} tok/s", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

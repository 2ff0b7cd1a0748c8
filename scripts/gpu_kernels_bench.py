# ruff: noqa: B023  (the timed lambdas run inside their loop iteration)
"""Micro-benchmarks of the Triton kernels against the torch code they replace, at the real 26B-A4B shapes (GPU).

    python3 scripts/gpu_kernels_bench.py --out results.json

MoE: `Experts.forward` (sort + grouped_mm + gather/weight/scatter) vs `kernels.moe.moe`, N = 256 and 2048 tokens,
top-8 of 128 experts, reported with the expert-weight bandwidth. Sampler: `fast.scores` over fp32 logits (divide by
temperature, exponential draws, race, argmax, entropy, self-conditioning softmax) vs `kernels.sampler.fused_sample`
on the same fp32 logits and on raw bf16 LM-head output with the softcap inside. RMSNorm: model vs kernel.
"""

import argparse
import json

import torch

from dgemma.benchmark import copy_bandwidth, time_ms
from dgemma.config import ModelArgs
from dgemma.engine import fast
from dgemma.kernels import moe as kmoe
from dgemma.kernels import rms_norm as knorm
from dgemma.kernels import sampler as ksampler
from dgemma.models.diffusion_gemma import Experts, rms_norm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(dev).manual_seed(0)
    bw = copy_bandwidth(dev)
    rows = []

    def report(name, ms, nbytes=None, **kw):
        r = {"kernel": name, "ms": ms, **kw}
        if nbytes:
            r["gb_s"] = nbytes / ms / 1e6
            r["fraction_of_copy_bw"] = r["gb_s"] * 1e9 / bw
        rows.append(r)
        extra = f"  {r['gb_s']:.0f} GB/s ({r['fraction_of_copy_bw']:.0%} of copy)" if nbytes else ""
        print(f"{name:<40} {ms * 1e3:9.1f} us{extra}", flush=True)

    args = ModelArgs(vocab_size=262144, hidden_size=2816, intermediate_size=2112, moe_intermediate_size=704,
                     num_experts=128, top_k_experts=8)
    experts = Experts(args).to(dev, dt)
    with torch.no_grad():
        experts.gate_up_proj.normal_(generator=g).mul_(2816**-0.5)
        experts.down_proj.normal_(generator=g).mul_(704**-0.5)
    wbytes = (experts.gate_up_proj.numel() + experts.down_proj.numel()) * 2
    with torch.inference_mode():
        for N in (256, 2048):
            x = torch.randn(N, 2816, device=dev, dtype=dt, generator=g)
            probs = torch.randn(N, 128, device=dev, generator=g).softmax(-1)
            weights, idx = probs.topk(8, dim=-1)
            ref = experts(x, weights, idx)
            for atomic in (False, True):
                out = kmoe.moe(x, weights, idx, experts.gate_up_proj, experts.down_proj, atomic=atomic)
                err = (out.float() - ref.float()).abs().max().item()
                report(f"moe triton N={N} atomic={atomic}", time_ms(lambda: kmoe.moe(
                    x, weights, idx, experts.gate_up_proj, experts.down_proj, atomic=atomic), dev, reps=50),
                    wbytes, N=N, max_abs_diff=err)
            report(f"moe grouped_mm (model) N={N}", time_ms(lambda: experts(x, weights, idx), dev, reps=50), wbytes,
                   N=N)
        V = 262144
        for R in (256, 2048):
            logits = torch.randn(R, V, device=dev, generator=g) * 4
            temp = torch.tensor([0.7], device=dev)
            seed = torch.arange(max(1, R // 256), device=dev, dtype=torch.int64)
            off = torch.zeros(1, device=dev, dtype=torch.int64)

            def torch_path():
                processed = logits / temp
                race = torch.empty_like(processed).exponential_()
                return fast.scores(processed, race, dt)
            report(f"sampler torch (fast.scores) R={R}", time_ms(torch_path, dev, reps=10), R * V * 4, R=R)
            report(f"sampler fused fp32 logits R={R}", time_ms(
                lambda: ksampler.fused_sample(logits, temp, seed, off), dev, reps=20), R * V * 4, R=R)
            raw = logits.to(dt)
            report(f"sampler fused bf16 raw+softcap R={R}", time_ms(
                lambda: ksampler.fused_sample(raw, temp, seed, off, softcap=30.0), dev, reps=20), R * V * 2, R=R)
        for R in (256, 2048):
            x = torch.randn(R, 2816, device=dev, dtype=dt, generator=g)
            w = torch.randn(2816, device=dev, dtype=dt, generator=g)
            report(f"rms_norm torch R={R}", time_ms(lambda: rms_norm(x, w, 1e-6), dev, reps=100), R=R)
            report(f"rms_norm triton R={R}", time_ms(lambda: knorm.rms_norm(x, w, 1e-6), dev, reps=100), R=R)
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s; expert weights {wbytes / 1e9:.2f} GB per layer")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "copy_bandwidth_gbs": bw / 1e9, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

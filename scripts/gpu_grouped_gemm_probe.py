"""The MoE's two GEMMs alone: torch's F.grouped_mm (CUTLASS grouped GEMM on sm90) against the Triton launches of
dgemma/kernels/moe.py, at the real 26B-A4B expert shape (GPU).

    python3 scripts/gpu_grouped_gemm_probe.py [--tokens 256 2048 4096] [--out probe.json]

grouped_mm gets the rows already gathered in expert order ([pairs, H], offsets on the device), so its times are the
GEMMs alone; the Triton gate_up also gathers and applies gelu·up, the Triton down writes the rows in pair order.
The question it answers: would grouped_mm's GEMM, plus a gather and an activation kernel around it, beat the Triton
launches at batch ≥ 4? Every time is a CUDA-graph replay.
"""

import argparse
import json

import torch
import torch.nn.functional as F

from dgemma.benchmark import copy_bandwidth, graph_ms
from dgemma.kernels import moe as kmoe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 2048, 4096])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    E, H, I, K = 128, 2816, 704, 8
    g = torch.Generator(dev).manual_seed(0)
    bw = copy_bandwidth(dev)
    gu = (torch.randn(E, 2 * I, H, device=dev, dtype=dt, generator=g) * H**-0.5)
    dn = (torch.randn(E, H, I, device=dev, dtype=dt, generator=g) * I**-0.5)
    rows = []
    with torch.inference_mode():
        for N in a.tokens:
            x = torch.randn(N, H, device=dev, dtype=dt, generator=g)
            weights, idx = torch.rand(N, E, device=dev, generator=g).softmax(-1).topk(K, dim=-1)
            order = idx.flatten().argsort(stable=True)
            xs = x[order // K].contiguous()
            offs = torch.bincount(idx.flatten(), minlength=E).cumsum(0).to(torch.int32)
            h = torch.randn(N * K, I, device=dev, dtype=dt, generator=g)
            flops_gu, flops_dn = 2 * N * K * H * 2 * I, 2 * N * K * I * H
            r = {"N": N}
            r["grouped_mm_gate_up_us"] = graph_ms(lambda: F.grouped_mm(xs, gu.transpose(-2, -1), offs=offs)) * 1e3
            r["grouped_mm_down_us"] = graph_ms(lambda: F.grouped_mm(h, dn.transpose(-2, -1), offs=offs)) * 1e3
            r["gather_us"] = graph_ms(lambda: x[order // K]) * 1e3
            bm = kmoe.block_m_for(N * K, E)
            t_gu, t_dn = kmoe.CUDA_TILES[bm]
            slots, block_expert = kmoe.align(idx, E, bm)
            act = kmoe.gate_up_launch(x, gu, slots, block_expert, K, bm, t_gu)
            r["triton_gate_up_us"] = graph_ms(lambda: kmoe.gate_up_launch(x, gu, slots, block_expert, K, bm, t_gu)) * 1e3
            r["triton_down_us"] = graph_ms(
                lambda: kmoe.down_launch(act, dn, slots, block_expert, weights, N, bm, t_dn)) * 1e3
            for kind, fl, nbytes in (("gate_up", flops_gu, gu.numel() * 2), ("down", flops_dn, dn.numel() * 2)):
                for impl in ("grouped_mm", "triton"):
                    us = r[f"{impl}_{kind}_us"]
                    print(f"N={N:5d} {kind:7s} {impl:10s} {us:8.1f} us  {fl / us / 1e6:6.0f} TFLOP/s  "
                          f"{nbytes / us / 1e3:6.0f} GB/s ({nbytes / us * 1e6 / bw:.0%} of copy)", flush=True)
            print(f"N={N:5d} gather x rows {r['gather_us']:.1f} us", flush=True)
            rows.append(r)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "copy_bandwidth_gb_s": bw / 1e9, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

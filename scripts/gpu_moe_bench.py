# ruff: noqa: B023  (the timed lambdas run inside their loop iteration)
"""Tile sweep for the Triton MoE (dgemma/kernels/moe.py) at the real 26B-A4B expert shape (GPU).

    python3 scripts/gpu_moe_bench.py --out moe_tiles.json [--tokens 256 512 2048 4096] [--quick]

Per token count N (top-8 of 128 experts, uniform random routing as the random-weight bench model routes): the
model's grouped_mm path (`Experts.forward` without the Triton kernel: sort + grouped_mm + gather/scatter), then for
each M-tile height the routing tables (one-program kernel vs torch sort), every gate_up and down tile in TILES, and
the whole `moe()` with the fastest pair, checked against the grouped_mm output. Every time is a CUDA-graph replay,
as the engine runs it. Prints the winners as CUDA_TILES entries to paste into dgemma/kernels/moe.py.
"""

import argparse
import json
import time

import torch
import triton

from dgemma.benchmark import copy_bandwidth, graph_ms
from dgemma.config import ModelArgs
from dgemma.kernels import moe as kmoe
from dgemma.kernels.moe import Tile
from dgemma.models import diffusion_gemma as dg

TILES = [Tile(32, 128, 4, 4), Tile(32, 256, 4, 3), Tile(64, 64, 4, 4), Tile(64, 64, 4, 6), Tile(64, 128, 4, 3),
         Tile(64, 128, 4, 4), Tile(64, 256, 4, 3), Tile(128, 64, 4, 4), Tile(128, 64, 8, 4), Tile(128, 128, 8, 3),
         Tile(64, 128, 8, 4), Tile(128, 128, 4, 3)]
BLOCK_MS = {256: (16, 32), 512: (16, 32, 64), 1024: (32, 64), 2048: (64, 128), 4096: (64, 128)}


def try_ms(fn) -> float | None:
    try:
        return graph_ms(fn)
    except Exception as e:  # a tile that does not fit shared memory / registers: skipped, reported
        print(f"    skipped: {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
        torch.cuda.synchronize()
        return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 512, 2048, 4096])
    ap.add_argument("--quick", action="store_true", help="default tiles only: grouped_mm vs moe() per N")
    a = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    t0 = time.time()
    g = torch.Generator(dev).manual_seed(0)
    bw = copy_bandwidth(dev)
    args = ModelArgs(vocab_size=262144, hidden_size=2816, intermediate_size=2112, moe_intermediate_size=704,
                     num_experts=128, top_k_experts=8)
    experts = dg.Experts(args).to(dev, dt)
    with torch.no_grad():
        experts.gate_up_proj.normal_(generator=g).mul_(2816**-0.5)
        experts.down_proj.normal_(generator=g).mul_(704**-0.5)
    gu, dn = experts.gate_up_proj.data, experts.down_proj.data
    gu_bytes, dn_bytes = gu.numel() * 2, dn.numel() * 2
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s; expert weights {(gu_bytes + dn_bytes) / 1e9:.2f} GB per layer "
          f"→ floor {(gu_bytes + dn_bytes) / bw * 1e3:.3f} ms", flush=True)
    saved_moe, dg.KERNELS["moe"] = dg.KERNELS["moe"], None  # the grouped_mm path for the baseline
    rows, winners = [], {}
    with torch.inference_mode():
        for N in a.tokens:
            x = torch.randn(N, 2816, device=dev, dtype=dt, generator=g)
            weights, idx = torch.rand(N, 128, device=dev, generator=g).softmax(-1).topk(8, dim=-1)
            ref = experts(x, weights, idx)
            base = graph_ms(lambda: experts(x, weights, idx))
            print(f"N={N}: grouped_mm path {base * 1e3:.1f} us ({(gu_bytes + dn_bytes) / base / 1e6:.0f} GB/s)",
                  flush=True)
            row = {"N": N, "grouped_mm_us": base * 1e3, "block_m": {}}
            default = graph_ms(lambda: kmoe.moe(x, weights, idx, gu, dn))
            err = ((kmoe.moe(x, weights, idx, gu, dn).float() - ref.float()).norm() / ref.float().norm()).item()
            row["moe_default_us"], row["moe_default_rel_err"] = default * 1e3, err
            print(f"  moe() default tiles (block_m {kmoe.block_m_for(N * 8, 128)}): {default * 1e3:.1f} us, "
                  f"rel err {err:.1e}", flush=True)
            if a.quick:
                rows.append(row)
                continue
            for bm in BLOCK_MS.get(N, (kmoe.block_m_for(N * 8, 128),)):
                r = row["block_m"][bm] = {}
                r["align_kernel_us"] = graph_ms(lambda: kmoe.align(idx, 128, bm, kernel=True)) * 1e3 \
                    if N * 8 <= kmoe.ALIGN_KERNEL_MAX_PAIRS else None
                r["align_torch_us"] = graph_ms(lambda: kmoe.align(idx, 128, bm, kernel=False)) * 1e3
                slots, block_expert = kmoe.align(idx, 128, bm)
                act = kmoe.gate_up_launch(x, gu, slots, block_expert, 8, bm, kmoe.INTERPRET_TILE)
                best = {}
                for kind, nbytes in (("gate_up", gu_bytes), ("down", dn_bytes)):
                    times = {}
                    for tile in TILES:
                        if kind == "gate_up":
                            ms = try_ms(lambda: kmoe.gate_up_launch(x, gu, slots, block_expert, 8, bm, tile))
                        else:
                            ms = try_ms(lambda: kmoe.down_launch(act, dn, slots, block_expert, weights, N, bm, tile))
                        if ms is not None:
                            times[tile] = ms
                    tile, ms = min(times.items(), key=lambda kv: kv[1])
                    best[kind] = tile
                    r[kind] = {str(tuple(t)): round(v * 1e3, 1) for t, v in times.items()}
                    print(f"  bm {bm:3d} {kind:7s} best {tuple(tile)} {ms * 1e3:7.1f} us "
                          f"({nbytes / ms / 1e6:.0f} GB/s, {nbytes / ms / 1e6 / (bw / 1e9):.0%} of copy)", flush=True)
                tiles = (best["gate_up"], best["down"])
                out = kmoe.moe(x, weights, idx, gu, dn, block_m=bm, tiles=tiles)
                r["moe_us"] = graph_ms(lambda: kmoe.moe(x, weights, idx, gu, dn, block_m=bm, tiles=tiles)) * 1e3
                r["rel_err"] = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                r["tiles"] = [tuple(t) for t in tiles]
                print(f"  bm {bm:3d} moe() {r['moe_us']:.1f} us (align kernel {r['align_kernel_us']}, torch "
                      f"{r['align_torch_us']:.1f} us), rel err {r['rel_err']:.1e}", flush=True)
                if bm not in winners or r["moe_us"] < winners[bm][1]:
                    winners[bm] = (tiles, r["moe_us"], N)
            rows.append(row)
    dg.KERNELS["moe"] = saved_moe
    print("CUDA_TILES candidates (block_m: gate_up, down — from the N where that block_m was fastest):")
    for bm, (tiles, us, N) in sorted(winners.items()):
        print(f"    {bm}: ({tiles[0]}, {tiles[1]}),  # N={N}: {us:.1f} us")
    print(f"total {time.time() - t0:.0f} s")
    if a.out:
        env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "copy_bandwidth_gb_s": bw / 1e9}
        with open(a.out, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main()

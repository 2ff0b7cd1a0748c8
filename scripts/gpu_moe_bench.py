# ruff: noqa: B023  (the timed lambdas run inside their loop iteration)
"""Tile sweep for the Triton MoE (dgemma/kernels/moe.py) at the real 26B-A4B expert shape (GPU).

    python3 scripts/gpu_moe_bench.py --out moe_tiles.json [--tokens 256 512 2048 4096] [--quick]

Per token count N (top-8 of 128 experts, uniform random routing as the random-weight bench model routes): the
model's grouped_mm path (`Experts.forward` without the Triton kernel: sort + grouped_mm + gather/scatter), then for
each M-tile height the routing tables (one-program kernel vs torch sort), every gate_up and down tile in TILES, and
the whole `moe()` with the fastest pair, checked against the grouped_mm output. Every time is a CUDA-graph replay,
as the engine runs it. Prints the winners as CUDA_TILES entries to paste into dgemma/kernels/moe.py.

    python3 scripts/gpu_moe_bench.py --dense [--tokens 256 512 2048] [--out moe_dense.json]

times `moe(..., dense=...)` (the layer's dense MLP, Id 2112 = 3 × 704, as pseudo-experts in the same two launches)
against `moe()` plus the separate torch dense MLP (F.linear on the stacked gate/up weight, gelu·up, F.linear down),
and checks both outputs; then the layer's MoE + tail as the fused layer runs it, `moe(dense=)` + `ffn_tail` (the
k-sum launch between them) against `moe(dense=, summed=False)` + `ffn_tail(moe_weights=, dense_parts=True)` (the
tail sums the bf16 routed rows and fp32 dense parts itself), each launch alone too, and checks they agree bit for
bit. Without a GPU, `TRITON_INTERPRET=1 python3 scripts/gpu_moe_bench.py --dense --tokens 40`
runs it at a tiny shape in Triton's interpreter (a smoke test: the times mean nothing).
"""

import argparse
import json
import time

import torch
import triton

from dgemma.benchmark import copy_bandwidth, graph_ms, time_ms
from dgemma.config import ModelArgs
from dgemma.kernels import moe as kmoe
from dgemma.kernels.ffn_tail import ffn_tail
from dgemma.kernels.moe import Tile
from dgemma.models import diffusion_gemma as dg

TILES = [Tile(32, 128, 4, 4), Tile(32, 256, 4, 3), Tile(64, 64, 4, 4), Tile(64, 64, 4, 6), Tile(64, 128, 4, 3),
         Tile(64, 128, 4, 4), Tile(64, 256, 4, 3), Tile(128, 64, 4, 4), Tile(128, 64, 8, 4), Tile(128, 128, 8, 3),
         Tile(64, 128, 8, 4), Tile(128, 128, 4, 3), Tile(64, 128, 8, 3), Tile(32, 128, 4, 3)]
# 2048 and 4096 tokens (batch 8, 16) also at block_m 32: vLLM's tuned H200 table for 128 experts (top 8) picks
# BLOCK_M 32, BLOCK_K 128, 8 warps, 3 stages at 2048 tokens (fused_moe/configs/E=128,N=1024,device_name=NVIDIA_H200)
BLOCK_MS = {256: (16, 32), 512: (16, 32, 64), 1024: (32, 64), 2048: (32, 64, 128), 4096: (32, 64, 128)}


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
    ap.add_argument("--tokens", type=int, nargs="+", default=None, help="default 256 512 2048 4096 (--dense: to 2048)")
    ap.add_argument("--quick", action="store_true", help="default tiles only: grouped_mm vs moe() per N")
    ap.add_argument("--dense", action="store_true", help="moe(dense=...) vs moe() + the torch dense MLP per N")
    a = ap.parse_args()
    if a.dense:
        return bench_dense(a)
    a.tokens = a.tokens or [256, 512, 2048, 4096]
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


def bench_dense(a) -> None:
    """Per N: routed moe() alone, the torch dense MLP alone (`reference_dense`: the model's `gated_mlp` on the stacked
    gate/up weight), both one after the other (today), and moe(dense=...)."""
    cuda = torch.cuda.is_available()
    dev, dt = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    E, k, H, I, Id = (128, 8, 2816, 704, 2112) if cuda else (8, 2, 64, 16, 48)  # CPU: the interpreter's tiny shape
    ms = graph_ms if cuda else (lambda fn: time_ms(fn, "cpu", reps=1, warmup=1))
    tokens = a.tokens or [256, 512, 2048]
    g = torch.Generator(dev).manual_seed(0)
    gu = (torch.randn(E, 2 * I, H, device=dev, generator=g) * H**-0.5).to(dt)
    dn = (torch.randn(E, H, I, device=dev, generator=g) * I**-0.5).to(dt)
    gud = (torch.randn(2 * Id, H, device=dev, generator=g) * H**-0.5).to(dt)
    dnd = (torch.randn(H, Id, device=dev, generator=g) * Id**-0.5).to(dt)
    nbytes = sum(t.numel() * t.element_size() for t in (gu, dn, gud, dnd))
    bw = copy_bandwidth(dev) if cuda else float("nan")
    print(f"{dev}: experts {E}×{I}, top {k}, dense {Id} (J = {Id // I}), H {H}; weights {nbytes / 1e9:.3f} GB → "
          f"floor {nbytes / bw * 1e6:.1f} us at copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    rows = []
    with torch.inference_mode():
        for N in tokens:
            x, xd = (torch.randn(N, H, device=dev, generator=g).to(dt) for _ in range(2))
            weights, idx = torch.rand(N, E, device=dev, generator=g).softmax(-1).topk(k, dim=-1)
            dense = (xd, gud, dnd)
            out, out_d = kmoe.moe(x, weights, idx, gu, dn, dense=dense)
            ref, ref_d = kmoe.moe(x, weights, idx, gu, dn), kmoe.reference_dense(*dense)
            r = {"N": N, "routed_equal": bool(torch.equal(out, ref)),
                 "dense_rel_err": ((out_d.float() - ref_d.float()).norm() / ref_d.float().norm()).item(),
                 "moe_us": ms(lambda: kmoe.moe(x, weights, idx, gu, dn)) * 1e3,
                 "torch_dense_us": ms(lambda: kmoe.reference_dense(*dense)) * 1e3,
                 "separate_us": ms(lambda: (kmoe.moe(x, weights, idx, gu, dn), kmoe.reference_dense(*dense))) * 1e3,
                 "fused_us": ms(lambda: kmoe.moe(x, weights, idx, gu, dn, dense=dense)) * 1e3}
            print(f"N={N}: moe {r['moe_us']:.1f} us, torch dense {r['torch_dense_us']:.1f} us, moe + dense "
                  f"{r['separate_us']:.1f} us → fused {r['fused_us']:.1f} us ({nbytes / r['fused_us'] / 1e3:.0f} GB/s, "
                  f"saves {r['separate_us'] - r['fused_us']:.1f} us); routed output unchanged: {r['routed_equal']}, "
                  f"dense rel err vs torch {r['dense_rel_err']:.1e}", flush=True)
            rows.append(r | bench_tail(x, weights, idx, gu, dn, dense, ms, g))
    if a.out:
        env = {"device": torch.cuda.get_device_name() if cuda else "cpu (interpreter)", "torch": torch.__version__,
               "triton": triton.__version__, "copy_bandwidth_gb_s": bw / 1e9}
        with open(a.out, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1, default=str)


def bench_tail(x, weights, idx, gu, dn, dense, ms, g) -> dict:
    """One N: the fused layer's MoE + tail (`fused_layer.feed_forward`, next norm included). Before: moe(dense=) (its
    k-sum launch reads N·k + N·J fp32 rows) then ffn_tail; now: moe(dense=, summed=False) (bf16 routed rows, fp32
    dense parts) then ffn_tail summing them itself."""
    N, H = x.shape
    resid = (torch.randn(N, H, device=x.device, generator=g) * 20).to(x.dtype)
    w1, w2, w, wn = ((torch.rand(H, device=x.device, generator=g) * 2).to(x.dtype) for _ in range(4))
    scalar = torch.tensor([0.75], device=x.device, dtype=x.dtype)

    def tail(dense_in, moe_in, **unsummed):
        return ffn_tail(resid, dense_in, moe_in, w1, w2, w, scalar, 1e-6, next_weight=wn, **unsummed)

    def before():
        moe_out, dense_out = kmoe.moe(x, weights, idx, gu, dn, dense=dense)
        return tail(dense_out, moe_out)

    def now():
        routed, parts = kmoe.moe(x, weights, idx, gu, dn, dense=dense, summed=False)
        return tail(parts, routed, moe_weights=weights, dense_parts=True)

    routed, parts = kmoe.moe(x, weights, idx, gu, dn, dense=dense, summed=False)
    moe_out, dense_out = kmoe.sum_k(routed, weights, parts)
    r = {"tail_equal": all(torch.equal(a, b) for a, b in zip(now(), before(), strict=True)),
         "moe_summed_us": ms(lambda: kmoe.moe(x, weights, idx, gu, dn, dense=dense)) * 1e3,
         "moe_unsummed_us": ms(lambda: kmoe.moe(x, weights, idx, gu, dn, dense=dense, summed=False)) * 1e3,
         "sum_k_us": ms(lambda: kmoe.sum_k(routed, weights, parts)) * 1e3,
         "ffn_tail_us": ms(lambda: tail(dense_out, moe_out)) * 1e3,
         "folded_tail_us": ms(lambda: tail(parts, routed, moe_weights=weights, dense_parts=True)) * 1e3,
         "moe_tail_before_us": ms(before) * 1e3, "moe_tail_now_us": ms(now) * 1e3}
    print(f"  + tail: moe(dense=) {r['moe_summed_us']:.1f} us (k-sum {r['sum_k_us']:.1f}) + ffn_tail "
          f"{r['ffn_tail_us']:.1f} = {r['moe_tail_before_us']:.1f} us → unsummed {r['moe_unsummed_us']:.1f} + folded "
          f"tail {r['folded_tail_us']:.1f} = {r['moe_tail_now_us']:.1f} us (saves "
          f"{r['moe_tail_before_us'] - r['moe_tail_now_us']:.1f} us per layer); same bits: {r['tail_equal']}",
          flush=True)
    return r


if __name__ == "__main__":
    main()

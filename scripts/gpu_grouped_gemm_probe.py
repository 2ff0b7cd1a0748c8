# ruff: noqa: B023  (the timed lambdas run inside their loop iteration)
"""The MoE's two GEMMs alone: torch's F.grouped_mm (CUTLASS grouped GEMM on sm90) against the Triton launches of
dgemma/kernels/moe.py, at the real 26B-A4B expert shape (GPU).

    python3 scripts/gpu_grouped_gemm_probe.py [--tokens 256 2048 4096] [--out probe.json]

grouped_mm gets the rows already gathered in expert order ([pairs, H], offsets on the device), so its times are the
GEMMs alone; the Triton gate_up also gathers and applies gelu·up, the Triton down writes the rows in pair order.
The question it answers: would grouped_mm's GEMM, plus a gather and an activation kernel around it, beat the Triton
launches at batch ≥ 4? Every time is a CUDA-graph replay.

    python3 scripts/gpu_grouped_gemm_probe.py --tma [--tokens 2048 4096] [--block-m 64 128] [--budget 200]
        [--out probe_tma.json]

also sweeps the TMA-fed launches (`TmaTile`) at BLOCK_M 64 and 128 over TMA_GATE_UP / TMA_DOWN: gate_up with the
token rows gathered by pointer and pre-gathered (`gather_rows`, timed alone and added), down; each output checked
against the pointer kernel's at the same BLOCK_M (largest difference over the pairs' rows). A config that does not
compile or fit is reported skipped; none starts past --budget seconds of sweeping. `--tiny` runs everything at a
tiny shape (without a GPU: `TRITON_INTERPRET=1 python3 scripts/gpu_grouped_gemm_probe.py --tma --tiny`, a smoke
test whose times mean nothing).
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F
import triton

from dgemma.benchmark import copy_bandwidth, graph_ms, time_ms
from dgemma.kernels import moe as kmoe
from dgemma.kernels.moe import TmaTile

# (BLOCK_M, (BLOCK_N, BLOCK_K, warps, stages)): gate_up's outputs are [BLOCK_M, 2·BLOCK_N] (gate and up), so its
# 128 × 64 tile is a 128 × 128 output and 128 × 128 a 128 × 256 one.
GATE_UP_SHAPES = [(64, (64, 64, 4, 4)), (64, (128, 64, 8, 3)), (128, (64, 64, 8, 4)), (128, (128, 64, 8, 3)),
                  (32, (64, 128, 4, 3)), (32, (64, 64, 4, 4)), (32, (128, 64, 4, 3))]  # 32: batch 1 (256 tokens)
DOWN_SHAPES = [(64, (128, 64, 4, 4)), (64, (256, 64, 8, 3)), (128, (128, 64, 8, 3)), (128, (128, 64, 8, 4)),
               (128, (256, 64, 8, 3)), (32, (64, 128, 4, 3)), (32, (64, 64, 4, 4)), (32, (128, 64, 4, 4)),
               (32, (128, 128, 4, 3)), (32, (256, 64, 8, 3))]
OPTIONS = [{}, {"persistent": True}, {"persistent": True, "flatten": True}]
TMA_GATE_UP = ([(bm, TmaTile(*s, **o)) for bm, s in GATE_UP_SHAPES for o in OPTIONS]  # pre-gathered rows: 16
               + [(bm, TmaTile(*s, gathered=False, **o)) for bm, s in GATE_UP_SHAPES for o in OPTIONS[:2]])  # 8
TMA_DOWN = [(bm, TmaTile(*s, **o)) for bm, s in DOWN_SHAPES for o in OPTIONS]  # 20
TINY_DOWN = [(bm, TmaTile(32, 32, 1, 1, **o)) for bm in (16, 32) for o in OPTIONS]  # the interpreter's shape
TINY_GATE_UP = TINY_DOWN + [(bm, t._replace(gathered=False)) for bm, t in TINY_DOWN]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=None, help="default 256 2048 4096 (--tiny: 40)")
    ap.add_argument("--tma", action="store_true", help="also sweep the TMA-fed launches")
    ap.add_argument("--budget", type=float, default=200.0, help="seconds of TMA sweep after which no config starts")
    ap.add_argument("--tiny", action="store_true", help="a tiny shape (the interpreter's on CPU): a smoke test")
    ap.add_argument("--block-m", type=int, nargs="+", default=None, help="only the TMA candidates of these BLOCK_M")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev, dt = "cuda" if cuda else "cpu", torch.bfloat16
    E, H, I, K = (8, 64, 48, 2) if a.tiny else (128, 2816, 704, 8)
    tokens = a.tokens or ([40] if a.tiny else [256, 2048, 4096])
    ms = graph_ms if cuda else (lambda fn: time_ms(fn, "cpu", reps=1, warmup=0))
    g = torch.Generator(dev).manual_seed(0)
    bw = copy_bandwidth(dev) if cuda else float("nan")
    gu = (torch.randn(E, 2 * I, H, device=dev, dtype=dt, generator=g) * H**-0.5)
    dn = (torch.randn(E, H, I, device=dev, dtype=dt, generator=g) * I**-0.5)
    rows, tma_rows, deadline = [], [], None
    with torch.inference_mode():
        for N in tokens:
            x = torch.randn(N, H, device=dev, dtype=dt, generator=g)
            weights, idx = torch.rand(N, E, device=dev, generator=g).softmax(-1).topk(K, dim=-1)
            order = idx.flatten().argsort(stable=True)
            xs = x[order // K].contiguous()
            offs = torch.bincount(idx.flatten(), minlength=E).cumsum(0).to(torch.int32)
            h = torch.randn(N * K, I, device=dev, dtype=dt, generator=g)
            flops_gu, flops_dn = 2 * N * K * H * 2 * I, 2 * N * K * I * H
            r = {"N": N}
            r["grouped_mm_gate_up_us"] = ms(lambda: F.grouped_mm(xs, gu.transpose(-2, -1), offs=offs)) * 1e3
            r["grouped_mm_down_us"] = ms(lambda: F.grouped_mm(h, dn.transpose(-2, -1), offs=offs)) * 1e3
            r["gather_us"] = ms(lambda: x[order // K]) * 1e3
            bm = kmoe.block_m_for(N * K, E)
            t_gu, t_dn = kmoe.CUDA_TILES[bm] if cuda else (kmoe.INTERPRET_TILE,) * 2
            slots, block_expert = kmoe.align(idx, E, bm)
            act = kmoe.gate_up_launch(x, gu, slots, block_expert, K, bm, t_gu)
            r["triton_gate_up_us"] = ms(lambda: kmoe.gate_up_launch(x, gu, slots, block_expert, K, bm, t_gu)) * 1e3
            r["triton_down_us"] = ms(
                lambda: kmoe.down_launch(act, dn, slots, block_expert, weights, N, bm, t_dn)) * 1e3
            for kind, fl, nbytes in (("gate_up", flops_gu, gu.numel() * 2), ("down", flops_dn, dn.numel() * 2)):
                for impl in ("grouped_mm", "triton"):
                    us = r[f"{impl}_{kind}_us"]
                    print(f"N={N:5d} {kind:7s} {impl:10s} {us:8.1f} us  {fl / us / 1e6:6.0f} TFLOP/s  "
                          f"{nbytes / us / 1e3:6.0f} GB/s ({nbytes / us * 1e6 / bw:.0%} of copy)", flush=True)
            print(f"N={N:5d} gather x rows {r['gather_us']:.1f} us", flush=True)
            rows.append(r)
            if a.tma:
                deadline = deadline or time.monotonic() + a.budget
                cands = (TINY_GATE_UP, TINY_DOWN) if a.tiny else (TMA_GATE_UP, TMA_DOWN)
                if a.block_m:
                    cands = tuple([c for c in cs if c[0] in a.block_m] for cs in cands)
                tma_rows += sweep_tma(x, weights, idx, gu, dn, ms, deadline, cands)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name() if cuda else "cpu (interpreter)", "torch": torch.__version__,
                       "triton": triton.__version__, "copy_bandwidth_gb_s": bw / 1e9, "rows": rows,
                       "tma_rows": tma_rows}, f, indent=1)


def sweep_tma(x, weights, idx, gu, dn, ms, deadline: float, candidates: tuple[list, list]) -> list[dict]:
    """One N: every TMA candidate (gate_up's, then down's) at its BLOCK_M against the pointer kernel's output there."""
    N, H = x.shape
    E, K, I = gu.shape[0], idx.shape[1], dn.shape[2]
    flops = {"gate_up": 2 * N * K * H * 2 * I, "down": 2 * N * K * I * H}
    out = []
    for bm in sorted({bm for bm, _ in candidates[0] + candidates[1]}):
        slots, block_expert = kmoe.align(idx, E, bm)
        t_gu, t_dn = kmoe.CUDA_TILES[bm] if x.is_cuda else (kmoe.INTERPRET_TILE,) * 2
        valid = slots < N * K  # the pairs' rows of act (the others are padding)
        act = kmoe.gate_up_launch(x, gu, slots, block_expert, K, bm, t_gu).masked_fill_(~valid[:, None], 0)
        rows = kmoe.down_launch(act, dn, slots, block_expert, weights, N, bm, t_dn)[0]
        xs = kmoe.gather_rows(x, slots, block_expert, K, bm, E)
        gather_us = ms(lambda: kmoe.gather_rows(x, slots, block_expert, K, bm, E)) * 1e3
        print(f"N={N:5d} bm {bm:3d}: gather_rows {gather_us:.1f} us", flush=True)

        def launch(gemm: str, tile: TmaTile) -> torch.Tensor:
            if gemm == "gate_up":  # the GEMM alone: the rows gathered above
                return kmoe.gate_up_tma_launch(x, gu, slots, block_expert, K, bm, tile, xs=xs)
            return kmoe.down_tma_launch(act, dn, slots, block_expert, N * K, bm, tile)

        for gemm, want, sel, cands in (("gate_up", act[valid], valid, candidates[0]),
                                       ("down", rows, slice(None), candidates[1])):
            for tile_bm, tile in cands:
                if tile_bm == bm:
                    extra = gather_us if gemm == "gate_up" and tile.gathered else 0.0
                    out.append(time_tile(N, gemm, bm, tile, lambda: launch(gemm, tile), lambda: launch(gemm, tile)[sel]
                                         - want, ms, flops[gemm], extra, deadline))
    return out


def time_tile(N, gemm, bm, tile, run, diff, ms, flops, extra, deadline) -> dict:
    """One config: its largest difference from the pointer kernel (`diff`) and its time (+ `extra`, the gather's), or
    why not."""
    opts = ",".join(f for f in ("persistent", "flatten") if getattr(tile, f))
    a_rows = "" if gemm == "down" else " A gathered" if tile.gathered else " A pointer"
    name = f"N={N:5d} {gemm:7s} bm {bm:3d} n {tile.n:3d} k {tile.k:3d} w {tile.warps} s {tile.stages}{a_rows} {opts}"
    r = {"N": N, "gemm": gemm, "block_m": bm, **tile._asdict()}
    if time.monotonic() > deadline:
        print(f"{name:80s} skipped (budget)", flush=True)
        return r | {"skipped": "budget"}
    try:
        r["max_abs_diff"] = diff().abs().max().item()
        r["us"] = ms(run) * 1e3
    except Exception as e:  # does not compile or fit (shared memory, registers, warp specialization)
        why = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120] if str(e).strip() else ''}"
        print(f"{name:80s} skipped: {why}", flush=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return r | {"skipped": why}
    r["tflops"] = flops / r["us"] / 1e6
    total = f" (+ gather: {r['us'] + extra:7.1f} us)" if extra else ""
    print(f"{name:80s} {r['us']:8.1f} us {r['tflops']:6.0f} TFLOP/s{total}  max|Δ| {r['max_abs_diff']:.2e}",
          flush=True)
    return r | ({"with_gather_us": r["us"] + extra} if extra else {})


if __name__ == "__main__":
    main()

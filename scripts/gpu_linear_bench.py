# ruff: noqa: B023  (the timed lambdas run inside their loop iteration)
"""cuBLAS (F.linear) against the Triton split-K GEMM (dgemma/kernels/linear.py) at the decoder's dense projections.

    python3 scripts/gpu_linear_bench.py --out linear.json [--rows 256 512 2048] [--shapes qkv_sliding router]
                                        [--quick]

Per projection (26B-A4B, hidden 2816: qkv sliding/full, o_proj sliding/full, router) and row count M: F.linear,
`linear` with its default config, then a curated sweep of configs (`candidates`); every time is a CUDA-graph
replay (`benchmark.graph_ms`, as the engine runs a step), reported in µs, in GB/s of weight bytes (and as a share of
the copy bandwidth measured in the same run) and in TFLOP/s, with the largest difference from F.linear's output.
Prints the best config per shape and, where it beats cuBLAS, a `CUDA_CONFIGS` entry to paste into the kernel.
At M = 256 the qkv shapes sit near the roofline ridge (256 FLOP per weight byte against ~230 for an H200 at copy
bandwidth), so the tensor cores bound them about as much as HBM does; the narrow o_proj and router gain from
split-K.

`--quick`: default config and three candidates per shape. `--tiny` runs small shapes on CPU in Triton's
interpreter (a smoke test of the script: the times mean nothing).
"""

import argparse
import json
import os
import sys
import time

import torch

SHAPES = {"qkv_sliding": (8192, 2816), "qkv_full": (9216, 2816), "o_proj_sliding": (2816, 4096),
          "o_proj_full": (2816, 8192), "router": (128, 2816)}  # (N, K) of w [N, K]
TINY_SHAPES = {"qkv_sliding": (256, 96), "qkv_full": (288, 96), "o_proj_sliding": (96, 128),
               "o_proj_full": (96, 256), "router": (16, 96)}


def candidates(shape: str, M: int, tiny: bool) -> list:
    """The curated sweep for one shape (~10 configs: each distinct one costs a Triton compile, ~1 s)."""
    from dgemma.kernels.linear import Config as C

    if tiny:
        return [C(16, 32, 32, 1), C(16, 32, 32, 3), C(32, 64, 32, 2, fused_reduce=False)]
    if M >= 2048 and shape != "router":  # compute-bound: big tiles, no split
        return [C(128, 128, 64, 1, 8, 4), C(128, 128, 64, 1, 8, 3), C(128, 256, 64, 1, 8, 3), C(256, 128, 64, 1, 8, 3),
                C(128, 64, 64, 1, 4, 4)]
    if shape.startswith("qkv"):  # N / BLOCK_N fills the GPU: no split (or 2 with the widest tiles)
        return [C(128, 128, 64, 1, 8, 4), C(128, 128, 64, 1, 8, 3), C(128, 256, 64, 1, 8, 3), C(256, 128, 64, 1, 8, 3),
                C(128, 256, 64, 2, 8, 3), C(256, 64, 64, 1, 8, 4), C(64, 128, 64, 1, 4, 4), C(128, 64, 64, 1, 4, 4),
                C(128, 128, 128, 1, 8, 3), C(128, 64, 128, 1, 4, 3)]
    if shape.startswith("o_proj"):  # N = 2816: 22-44 n-tiles, split-K fills the SMs
        return [C(128, 128, 64, 3, 8, 4), C(128, 128, 64, 3, 8, 4, False), C(128, 128, 64, 2, 8, 4),
                C(128, 128, 64, 4, 8, 4), C(128, 128, 64, 6, 8, 4), C(128, 64, 64, 3, 4, 4), C(64, 128, 64, 3, 4, 4),
                C(256, 64, 64, 3, 8, 4), C(256, 128, 64, 6, 8, 3), C(128, 128, 128, 3, 8, 3), C(64, 64, 64, 2, 4, 5)]
    return [C(128, 128, 64, 8, 8, 4), C(64, 128, 64, 8, 4, 4), C(64, 64, 64, 8, 4, 4), C(128, 64, 64, 8, 4, 4),
            C(64, 128, 128, 8, 4, 3), C(32, 64, 64, 8, 4, 4), C(64, 64, 64, 4, 4, 4), C(64, 64, 64, 8, 4, 4, False)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--rows", type=int, nargs="+", default=None, help="M values (default 256 512 2048)")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--quick", action="store_true", help="default config and three candidates per shape")
    ap.add_argument("--tiny", action="store_true", help="small shapes on CPU in Triton's interpreter (smoke test)")
    a = ap.parse_args()
    if a.tiny:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    elif not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --tiny)")
    import triton

    from dgemma.benchmark import copy_bandwidth, graph_ms, time_ms
    from dgemma.kernels import linear as kl

    dev = "cpu" if a.tiny else "cuda"
    timed = (lambda fn: time_ms(fn, "cpu", reps=1, warmup=1)) if a.tiny else graph_ms
    rows_m = a.rows or ([16, 40] if a.tiny else [256, 512, 2048])
    shapes = TINY_SHAPES if a.tiny else SHAPES
    t0 = time.time()
    bw = copy_bandwidth(dev, gib=0.05 if a.tiny else 2.0)
    print(f"{torch.cuda.get_device_name() if not a.tiny else 'cpu (interpreter)'}: copy bandwidth "
          f"{bw / 1e9:.0f} GB/s", flush=True)
    g = torch.Generator(dev).manual_seed(0)
    results, paste = [], []
    with torch.inference_mode():
        for name in a.shapes:
            N, K = shapes[name]
            w = (torch.randn(N, K, device=dev, generator=g) * K**-0.5).bfloat16()
            nbytes = w.numel() * w.element_size()
            for M in rows_m:
                x = torch.randn(M, K, device=dev, generator=g).bfloat16()
                ref = torch.nn.functional.linear(x, w)
                tol = 2**-6 * ref.abs().max().item()  # two bf16 units at the largest output: more is a bug
                flop = 2 * M * N * K

                def row(label, us, err=None, config=None):
                    r = {"label": label, "us": us, "weight_gb_s": nbytes / us / 1e3 if us else None,
                         "of_copy": nbytes / us / 1e3 / (bw / 1e9) if us else None,
                         "tflop_s": flop / us / 1e6 if us else None, "max_abs_err": err,
                         "config": list(config) if config else None}
                    txt = "failed" if us is None else (f"{us:8.1f} us {r['weight_gb_s']:6.0f} GB/s "
                                                       f"({r['of_copy']:4.0%} of copy) {r['tflop_s']:5.0f} TFLOP/s")
                    print(f"  {label:44s} {txt}" + (f"  err {err:.2e}" if err is not None else "")
                          + ("  TOO LARGE" if err is not None and err > tol else ""), flush=True)
                    return r

                print(f"{name} M={M} N={N} K={K}: {nbytes / 1e6:.1f} MB of weights, floor "
                      f"{nbytes / bw * 1e6:.1f} us at copy bandwidth", flush=True)
                entry = {"shape": name, "M": M, "N": N, "K": K, "weight_bytes": nbytes}
                entry["cublas"] = row("F.linear (cuBLAS)", timed(lambda: torch.nn.functional.linear(x, w)) * 1e3)
                default = kl.default_config(M, N, K, kl.sm_count(x.device))
                cands = candidates(name, M, a.tiny)
                cands = ([default] + cands[:3]) if a.quick else [default] + [c for c in cands if c != default]
                tried = []
                for i, cfg in enumerate(cands):
                    label = ("default " if i == 0 else "") + "(" + ", ".join(str(int(v)) for v in cfg) + ")"
                    try:
                        err = (kl.linear(x, w, config=cfg).float() - ref.float()).abs().max().item()
                        us = timed(lambda: kl.linear(x, w, config=cfg)) * 1e3
                    except Exception as e:  # a tile that does not fit shared memory / registers: skipped, reported
                        print(f"  {label:44s} skipped: {type(e).__name__}: {str(e).splitlines()[0][:90]}")
                        if not a.tiny:
                            torch.cuda.synchronize()
                        us, err = None, None
                    tried.append(row(label, us, err, cfg))
                entry["default"], entry["candidates"] = tried[0], tried[1:]
                ok = [r for r in tried if r["us"] is not None]
                best = entry["best"] = min(ok, key=lambda r: r["us"]) if ok else None
                if best:
                    gain = entry["cublas"]["us"] - best["us"]
                    print(f"  best {best['label']}: {best['us']:.1f} us vs cuBLAS {entry['cublas']['us']:.1f} us "
                          f"({gain:+.1f} us saved)", flush=True)
                    if gain > 0:
                        paste.append(f"    ({M}, {N}, {K}): Config{tuple(best['config'])},  # {name}: "
                                     f"{best['us']:.1f} us vs cuBLAS {entry['cublas']['us']:.1f} us")
                results.append(entry)
    print("CUDA_CONFIGS entries (shapes where a config beats cuBLAS):")
    print("\n".join(paste) if paste else "    none")
    print(f"total {time.time() - t0:.0f} s")
    if a.out:
        env = {"device": torch.cuda.get_device_name() if not a.tiny else "cpu (interpreter)",
               "torch": torch.__version__, "triton": triton.__version__, "copy_bandwidth_gb_s": bw / 1e9,
               "sms": kl.sm_count(torch.device(dev))}
        with open(a.out, "w") as f:
            json.dump({"env": env, "results": results, "paste": paste}, f, indent=1)


if __name__ == "__main__":
    main()

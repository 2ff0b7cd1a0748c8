"""The fused sampler's two passes (dgemma/kernels/sampler.py) at the real shape, as the engine runs them: raw bf16
LM-head output [R, V = 262144], softcap 30 inside the kernel, bf16 self-conditioning probs, an int64 Philox seed per
canvas of 256 rows and one int64 step counter (`StaticStepper._sample_fused`), a temperature per canvas (as
`BatchStepper` passes them). R = 256 (batch 1) and 2048 (batch 8).

Per variant (launch shape and math) it prints and records the stats pass, the finish pass (each launched on its own
from `sampler.sample_launches`) and the whole `fused_sample` call in µs per CUDA-graph replay, the bytes-per-second
floor of each pass at the copy bandwidth measured in the same run, and the agreement with `reference_sample` (torch,
the engine's ops) on the first canvas (256 rows): argmax, race sample (all rows and rows whose two best race keys are
more than 1e-4 apart), entropy, probs. `fast_math=False` is the previous math (fmath's tanh and log1p, divisions,
precise logs) in the same kernels; `--baseline FILE` also times another copy of sampler.py as a whole call (e.g.
`git show <commit>:dgemma/kernels/sampler.py > sampler_old.py`, an untracked file in the tree).

    python3 scripts/gpu_sampler_bench.py [--out sampler.json] [--rows 256 2048] [--quick] [--budget 100]
        [--baseline sampler_old.py] [--iters 20]
    python3 scripts/gpu_sampler_bench.py --tiny      # CPU smoke run under TRITON_INTERPRET=1 (R = 8, V = 8192;
                                                     # "fast": the fast formulas with the interpreter's exact lg2/rcp)

--quick   the default and fast_math=False only (no launch variants)
--budget  starts no launch variant after this many seconds (each new shape or warps value compiles a kernel)
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if "--tiny" in sys.argv:  # before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this working tree's dgemma, not an installed one

import torch  # noqa: E402
import triton  # noqa: E402

from dgemma.benchmark import copy_bandwidth, graph_ms, time_ms  # noqa: E402
from dgemma.kernels import sampler  # noqa: E402

CANVAS, SOFTCAP = 256, 30.0
# (name, fused_sample keywords); "split" as a factor of the default. The first two run even with --quick.
VARIANTS = [
    ("default", {}),
    ("accurate", dict(fast_math=False)),
    ("stats-w4", dict(warps=(4, sampler.WARPS[1]))),
    ("stats-w16", dict(warps=(16, sampler.WARPS[1]))),
    ("finish-w4", dict(warps=(sampler.WARPS[0], 4))),
    ("split/2", dict(split=0.5)),
    ("split*2", dict(split=2)),
    ("split*4", dict(split=4)),
]


def inputs(R: int, V: int, canvas: int, device: str, seed: int = 0):
    """Raw bf16 head output [R, V]; per canvas of `canvas` rows a temperature in [0.5, 1] and an int64 Philox seed;
    the step counter [1]."""
    g = torch.Generator(device).manual_seed(seed)
    raw = (torch.randn(R, V, device=device, generator=g) * 4).bfloat16()
    B = max(1, R // canvas)
    temp = torch.linspace(0.5, 1.0, B, device=device)
    seeds = torch.randint(0, 2**62, (B,), device=device, generator=g)
    step = torch.tensor([7], dtype=torch.int64, device=device)
    return raw, temp, seeds, step


def race_margin(scores: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per row, the gap between the two best race keys x - log E (fp64)."""
    top2 = (scores.double() - noise.double().log()).topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


def agreement(out, raw, temp, seeds, step, noise_fn, canvas: int) -> dict:
    """`fused_sample`'s outputs against `reference_sample` on the first canvas (its rows, temperature and seed)."""
    raw, t = raw[:canvas], temp[:1]
    noise = noise_fn(seeds[:1], step, canvas, raw.shape[1])
    ref = sampler.reference_sample(raw, t, noise, softcap=SOFTCAP)
    clear = race_margin((torch.tanh(raw.float() / SOFTCAP) * SOFTCAP) / t, noise) > 1e-4
    sample, amax, h, probs = (o[:canvas] for o in out)
    rel = (probs.float() - ref[3].float()).abs() / ref[3].float().clamp_min(1e-37)
    return dict(argmax_equal=(amax == ref[1]).float().mean().item(),
                sample_equal=(sample == ref[0]).float().mean().item(),
                sample_equal_clear_rows=(sample == ref[0])[clear].float().mean().item(),
                clear_rows=clear.float().mean().item(),
                entropy_max_abs_diff=(h - ref[2]).abs().max().item(),
                probs_max_rel_diff=rel.max().item(),
                probs_frac_over_1ulp=(rel > 2**-7).float().mean().item())  # a score that rounds to another bf16


def timed(fn, iters: int, cuda: bool) -> float:
    """µs per call: CUDA-graph replays on GPU, plain calls in the interpreter."""
    return 1e3 * (graph_ms(fn, iters) if cuda else time_ms(fn, "cpu", reps=1, warmup=0))


def run_variant(name: str, kw: dict, raw, temp, seeds, step, iters: int, canvas: int) -> dict | None:
    """One launch variant: compile, agreement on the first canvas, then each pass and the whole call timed."""
    cuda = raw.is_cuda
    default = sampler.default_split(*raw.shape, raw.device)
    kw = dict(kw, split=max(1, int(kw.get("split", 1) * default)))  # "split": a factor of the default
    if name.startswith("split") and kw["split"] == default:
        return None
    args = (raw, temp, seeds, step)
    t0 = time.monotonic()
    launches = sampler.sample_launches(*args, softcap=SOFTCAP, **kw)
    kernels = launches.stats(), launches.finish()  # compiles both
    if cuda:
        torch.cuda.synchronize()
    row = dict(variant=name, **kw, compile_s=time.monotonic() - t0)
    for pass_, k in zip(("stats", "finish"), kernels):  # registers per thread: they set the CTAs per SM
        row[f"{pass_}_regs"], row[f"{pass_}_spills"] = getattr(k, "n_regs", None), getattr(k, "n_spills", None)
    fast = kw.get("fast_math")
    row["agreement"] = agreement(launches.out, raw, temp, seeds, step,
                                 lambda s, o, r, v: sampler.philox_exponentials(s, o, r, v, fast_math=fast), canvas)
    row["stats_us"] = timed(launches.stats, iters, cuda)
    row["finish_us"] = timed(launches.finish, iters, cuda)
    row["total_us"] = timed(lambda: sampler.fused_sample(*args, softcap=SOFTCAP, **kw), iters, cuda)
    return row


def run_baseline(path: str, raw, temp, seeds, step, iters: int, canvas: int) -> dict:
    """Another sampler.py (its fused_sample and philox_exponentials) as a whole call."""
    spec = importlib.util.spec_from_file_location("sampler_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = (raw, temp, seeds, step)
    t0 = time.monotonic()
    out = mod.fused_sample(*args, softcap=SOFTCAP)
    if raw.is_cuda:
        torch.cuda.synchronize()
    row = dict(variant=f"baseline:{Path(path).name}", compile_s=time.monotonic() - t0)
    row["agreement"] = agreement(out, raw, temp, seeds, step, mod.philox_exponentials, canvas)
    row["total_us"] = timed(lambda: mod.fused_sample(*args, softcap=SOFTCAP), iters, raw.is_cuda)
    return row


def line(r: dict, floor: dict) -> str:
    a = r["agreement"]
    t = "  ".join(f"{k[:-3]} {r[k]:8.1f}" for k in ("stats_us", "finish_us", "total_us") if k in r)
    f = f" (floor {floor['stats_us']:.0f}/{floor['finish_us']:.0f})" if floor else ""
    regs = f" regs {r['stats_regs']}/{r['finish_regs']}" if r.get("stats_regs") else ""
    return (f"  {r['variant']:<24s} {t}{f}{regs}  compile {r['compile_s']:.1f}s | argmax {a['argmax_equal']:.4f} "
            f"sample {a['sample_equal']:.4f} (clear {a['sample_equal_clear_rows']:.4f}) "
            f"H {a['entropy_max_abs_diff']:.1e} probs>1ulp {a['probs_frac_over_1ulp']:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--rows", type=int, nargs="+", default=[256, 2048])
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="the default and fast_math=False only")
    ap.add_argument("--budget", type=float, default=100, help="start no launch variant after this many seconds")
    ap.add_argument("--baseline", default=None, help="another sampler.py to time as a whole call")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run under TRITON_INTERPRET=1")
    a = ap.parse_args()
    start = time.monotonic()
    if a.tiny:  # two canvases of 4 rows, whole tiles (no masks), two splits
        device, rows, V, canvas = "cpu", [8], 8192, 4
    elif not torch.cuda.is_available():
        sys.exit("needs CUDA (or --tiny)")
    else:
        device, rows, V, canvas = "cuda", a.rows, a.vocab, CANVAS
    result = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
                  torch=torch.__version__, triton=triton.__version__, vocab=V, softcap=SOFTCAP,
                  default_warps=sampler.WARPS, programs_per_sm=sampler.PROGRAMS_PER_SM,
                  commit=subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                        cwd=Path(__file__).resolve().parent).stdout.strip(), shapes=[])
    bw = copy_bandwidth(device) if device == "cuda" else None
    result["copy_gbps"] = bw / 1e9 if bw else None
    print(f"{result['device']}  torch {torch.__version__}  triton {triton.__version__}  "
          f"copy {f'{bw / 1e9:.0f} GB/s' if bw else 'n/a'}")
    for R in rows:
        raw, temp, seeds, step = inputs(R, V, canvas, device)
        split = sampler.default_split(R, V, raw.device)
        floor = dict(stats_us=2 * R * V / bw * 1e6, finish_us=4 * R * V / bw * 1e6) if bw else {}
        print(f"R={R} V={V}: default split {split}, warps {sampler.WARPS}")
        shape = dict(rows=R, default_split=split, floor=floor, variants=[])
        variants = [("fast", dict(fast_math=True))] + VARIANTS[1:] if a.tiny else VARIANTS  # the fast formulas too
        for i, (name, kw) in enumerate(variants):
            if i >= 2 and (a.quick or time.monotonic() - start > a.budget):
                break
            r = run_variant(name, kw, raw, temp, seeds, step, a.iters, canvas)
            if r is not None:
                shape["variants"].append(r)
                print(line(r, floor), flush=True)
        if a.baseline:
            r = run_baseline(a.baseline, raw, temp, seeds, step, a.iters, canvas)
            shape["variants"].append(r)
            print(line(r, {}), flush=True)
        d, acc = shape["variants"][:2]
        print(f"  accurate / {d['variant']}: stats x{acc['stats_us'] / d['stats_us']:.2f}, "
              f"finish x{acc['finish_us'] / d['finish_us']:.2f}, total x{acc['total_us'] / d['total_us']:.2f}")
        result["shapes"].append(shape)
        del raw
    result["wall_s"] = time.monotonic() - start
    print(f"done in {result['wall_s']:.0f} s")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

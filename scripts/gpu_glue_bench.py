# ruff: noqa: B023  (the timed lambdas run inside their loop iteration)
"""Launch sweeps for the layer's glue kernels (ffn_tail, qkv_prep, attn_residual) at the 26B-A4B shape (GPU).

    python3 scripts/gpu_glue_bench.py --out glue.json [--tokens 256 2048] [--baseline-dir DIR] [--expect OLD.json]

Each kernel is called as models/fused_layer.py calls it: `attn_residual` on o_proj's output; `ffn_tail` on the
unsummed MoE (bf16 routed rows [N, 8, D] and their fp32 router weights) with the dense MLP's fp32 parts [N, 3, D] up
to `DENSE_IN_MOE_MAX_TOKENS` tokens and its bf16 output beyond, and the next layer's norm; `qkv_prep` on the stacked
q/k/v GEMM's output, K/V written into a cache's scratch slots, for sliding layers (head dim 256, 16 q and 8 kv heads,
a v part) and full ones (head dim 512, 16 q and 2 kv heads, K=V). B = tokens / 256 canvases of 256.

For every (kernel, tokens) it times the default launch (the module's `CUDA_LAUNCH`) and each candidate in
CANDIDATES, in CUDA-graph replay (`graph_ms`; each graph cycles through enough input copies to leave L2 cold), and
prints µs and GB/s (bytes each call must move: inputs read once, outputs written once) and whether the candidate's
outputs are bit for bit the default's (`torch.equal`). A candidate that moves a row's sum to another layout
(rms_norm.py) shows as "DIFFERS". The fastest identical candidate per token count is printed as a `CUDA_LAUNCH`
table to paste into the kernel's module. `--baseline-dir DIR` also times and checks older copies of ffn_tail.py,
qkv_prep.py and layer_norms.py found in DIR (e.g. `git show REV:dgemma/kernels/ffn_tail.py > DIR/ffn_tail.py`);
`--expect OLD.json` checks the default outputs against another run's digests (same GPU kind and seeds).
`--warm-l2` keeps one input copy, in L2 from call to call, as a batch-1 step finds inputs the kernel before wrote.

    TRITON_INTERPRET=1 python3 scripts/gpu_glue_bench.py --tiny

runs the same sweep at the tiny shape on CPU in Triton's interpreter: a smoke test, its times mean nothing.
"""

import argparse
import hashlib
import importlib.util
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

from dgemma.benchmark import SHAPES, copy_bandwidth, graph_ms, time_ms
from dgemma.kernels import ffn_tail as ktail
from dgemma.kernels import layer_norms as knorms
from dgemma.kernels import qkv_prep as kprep
from dgemma.kernels.rms_norm import Launch, block_shape, pick_launch
from dgemma.models.fused_layer import DENSE_IN_MOE_MAX_TOKENS

TailLaunch = ktail.TailLaunch
# Candidates at the real shape, per kernel (qkv_prep per head dim). At BLOCK_D 4096 (ffn_tail, attn_residual) only
# the 8-warp ones keep the row sums' layout; the others are here to show it (and what they would gain).
CANDIDATES = {
    "attn_residual": [Launch(2, 8), Launch(4, 8), Launch(1, 4), Launch(1, 16), Launch(2, 16)],
    "ffn_tail": [TailLaunch(1, 8, 2), TailLaunch(1, 8, 4), TailLaunch(1, 8, 8), TailLaunch(2, 8, 0),
                 TailLaunch(2, 8, 2), TailLaunch(2, 8, 4), TailLaunch(4, 8, 0), TailLaunch(1, 4, 0),
                 TailLaunch(1, 16, 0), TailLaunch(1, 16, 4)],
    "qkv_prep256": [Launch(8, 4), Launch(32, 8), Launch(16, 8), Launch(16, 2), Launch(8, 2), Launch(4, 2),
                    Launch(4, 1), Launch(2, 1), Launch(32, 4), Launch(64, 8), Launch(4, 4)],
    "qkv_prep512": [Launch(4, 4), Launch(16, 4), Launch(16, 8), Launch(8, 8), Launch(8, 2), Launch(4, 2),
                    Launch(2, 2), Launch(2, 1), Launch(1, 1), Launch(2, 4)],
}
L2_COLD_BYTES = 128 << 20  # input copies per graph: at least this much read per cycle (H100/H200 L2: 50-60 MB)


@dataclass
class Case:
    """One kernel at one token count: its inputs (`sets` copies), how to call it, the bytes a call must move."""
    kernel: str  # CANDIDATES key
    tokens: int
    sets: list
    call: object  # (module, inputs, launch | None) -> tuple of outputs
    nbytes: int


def nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def vec(D: int, dev: str, g: torch.Generator, dt: torch.dtype) -> torch.Tensor:
    return (1.0 + 0.1 * torch.randn(D, device=dev, generator=g)).to(dt)


def copies(make, per_set: int, cold: bool) -> list:
    """Input copies (seeds 0, 1, ..): enough that a graph cycling through them reads L2_COLD_BYTES, if `cold`."""
    n = max(1, min(8, math.ceil(L2_COLD_BYTES / per_set))) if cold else 1
    return [make(i) for i in range(n)]


def attn_residual_case(shape: dict, tokens: int, T: int, dev: str, cold: bool) -> Case:
    D, dt = shape["hidden_size"], torch.bfloat16

    def make(seed):
        g = torch.Generator(dev).manual_seed(seed)
        o, x = (torch.randn(tokens // T, T, D, device=dev, generator=g).to(dt) for _ in range(2))
        return (o, x, *(vec(D, dev, g, dt) for _ in range(4)), D**-0.5, 1e-6)

    def call(mod, a, launch):
        return mod.attn_residual(*a) if launch is None else mod.attn_residual(*a, launch=launch)

    one = make(0)
    return Case("attn_residual", tokens, copies(make, nbytes(*one[:2]), cold), call, nbytes(*one[:2]) * 3)


def ffn_tail_case(shape: dict, tokens: int, T: int, dev: str, cold: bool) -> Case:
    D, k, dt = shape["hidden_size"], shape["top_k_experts"], torch.bfloat16
    J = shape["intermediate_size"] // shape["moe_intermediate_size"]
    parts = tokens <= DENSE_IN_MOE_MAX_TOKENS and shape["intermediate_size"] % shape["moe_intermediate_size"] == 0

    def make(seed):
        g = torch.Generator(dev).manual_seed(seed)
        x = torch.randn(tokens // T, T, D, device=dev, generator=g).to(dt)
        dense = (torch.randn(tokens, J, D, device=dev, generator=g) if parts
                 else torch.randn(tokens // T, T, D, device=dev, generator=g).to(dt))
        routed = torch.randn(tokens, k, D, device=dev, generator=g).to(dt)
        weights = torch.randn(tokens, k, device=dev, generator=g).softmax(-1)
        w = [vec(D, dev, g, dt) for _ in range(4)]
        scalar = torch.tensor([0.8], device=dev).to(dt)
        return (x, dense, routed, *w[:3], scalar, 1e-6), dict(moe_weights=weights, dense_parts=parts,
                                                              next_weight=w[3])

    def call(mod, a, launch):
        args, kw = a
        return mod.ffn_tail(*args, **kw) if launch is None else mod.ffn_tail(*args, **kw, launch=launch)

    (x, dense, routed, *_), kw = make(0)
    read = nbytes(x, dense, routed, kw["moe_weights"])
    return Case("ffn_tail", tokens, copies(make, read, cold), call, read + 2 * nbytes(x))


def qkv_prep_case(shape: dict, tokens: int, T: int, dev: str, cold: bool, full: bool) -> Case:
    H, dt = shape["num_attention_heads"], torch.bfloat16
    D = shape["global_head_dim"] if full else shape["head_dim"]
    Hkv = shape["num_global_key_value_heads"] if full else shape["num_key_value_heads"]
    B, cap = tokens // T, 4 * T  # K/V into the scratch slots after `cap` cached ones, as decoder_context writes them

    def make(seed):
        g = torch.Generator(dev).manual_seed(seed)
        qkv = torch.randn(B, T, (H + (1 if full else 2) * Hkv) * D, device=dev, generator=g).to(dt)
        angle = torch.rand(B, T, D, device=dev, generator=g) * 6.3
        ck, cv = (torch.zeros(B, Hkv, cap + T, D, device=dev, dtype=dt) for _ in range(2))
        return (qkv, angle.cos().to(dt), angle.sin().to(dt), vec(D, dev, g, dt), vec(D, dev, g, dt), 1e-6, H, Hkv), \
            dict(k_out=ck[:, :, cap:], v_out=cv[:, :, cap:])

    def call(mod, a, launch):
        args, kw = a
        return mod.qkv_prep(*args, **kw) if launch is None else mod.qkv_prep(*args, **kw, launch=launch)

    (qkv, cos, sin, *_), _ = make(0)
    read = nbytes(qkv, cos, sin)
    q_kv = B * T * (H + 2 * Hkv) * D * 2
    return Case(f"qkv_prep{D}", tokens, copies(make, read, cold), call, read + q_kv)


def default_launch(case: Case, shape: dict, dev: str):
    """The launch the kernel picks by itself (for the report): its CUDA_LAUNCH entry or block_shape's."""
    cuda = dev == "cuda"
    if case.kernel.startswith("qkv_prep"):
        D = int(case.kernel[len("qkv_prep"):])
        r, _, w = block_shape(D)
        return pick_launch("qkv_prep", kprep.CUDA_LAUNCH, D, case.tokens, Launch(r, w), cuda)
    r, bd, w = block_shape(shape["hidden_size"])
    if case.kernel == "ffn_tail":
        return pick_launch("ffn_tail", ktail.CUDA_LAUNCH, bd, case.tokens, TailLaunch(r, w), cuda)
    return pick_launch("attn_residual", knorms.CUDA_LAUNCH, bd, case.tokens, Launch(r, w), cuda)


def tiny_candidates(default) -> list:
    """At the tiny shape: half and twice the rows, half the warps (and one unroll for ffn_tail)."""
    out = [default._replace(rows=max(1, default.rows // 2)), default._replace(rows=default.rows * 2),
           default._replace(warps=max(1, default.warps // 2))]
    return out + ([default._replace(unroll=2)] if isinstance(default, TailLaunch) else [])


def digest(outs) -> str:
    h = hashlib.sha1()
    for t in outs:
        h.update(t.contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def timed_us(case: Case, mod, launch, dev: str) -> float:
    """µs per call: one graph cycles through the input copies (repeated to >= 24 calls), replayed 20 times."""
    reps = math.ceil(24 / len(case.sets)) if dev == "cuda" else 1

    def fn():
        for _ in range(reps):
            for a in case.sets:
                case.call(mod, a, launch)
    calls = reps * len(case.sets)
    if dev != "cuda":
        return time_ms(fn, dev, reps=1, warmup=0) * 1e3 / calls
    return min(graph_ms(fn, iters=20) for _ in range(2)) * 1e3 / calls


def load_baselines(directory: str | None) -> dict:
    """{kernel module name: module} from older copies of the kernel files in `directory`."""
    mods = {}
    for name in ("ffn_tail", "qkv_prep", "layer_norms"):
        path = Path(directory or "", f"{name}.py")
        if directory and path.exists():
            spec = importlib.util.spec_from_file_location(f"baseline_{name}", path)
            mods[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mods[name])
    return mods


def sweep(case: Case, shape: dict, dev: str, bw: float, baselines: dict, expect: dict, rows: list,
          tiny: bool) -> None:
    mod = {"ffn_tail": ktail, "attn_residual": knorms}.get(case.kernel, kprep)
    base_mod = baselines.get(mod.__name__.rsplit(".", 1)[-1])
    default = default_launch(case, shape, dev)
    want = [t.clone() for t in case.call(mod, case.sets[0], None)]
    key = f"{case.kernel}/{case.tokens}"
    runs = [("default", mod, None, default)]
    if base_mod is not None:
        runs.append(("baseline", base_mod, None, None))
    cands = tiny_candidates(default) if tiny else CANDIDATES[case.kernel]
    runs += [("candidate", mod, c, c) for c in cands if c != default]
    for label, m, launch, shown in runs:
        try:
            outs = case.call(m, case.sets[0], launch)  # compared before the next call reuses qkv_prep's k/v slots
            same = all(torch.equal(a, b) for a, b in zip(outs, want, strict=True))
            us = timed_us(case, m, launch, dev)
        except Exception as e:  # e.g. out of registers or shared memory: reported, the sweep goes on
            print(f"{key:<20} {label:<9} {shown!s:<45} failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
            continue
        gbs = case.nbytes / us / 1e3
        row = dict(kernel=case.kernel, tokens=case.tokens, label=label, launch=None if shown is None else list(shown),
                   us=us, gb_s=gbs, bytes=case.nbytes, identical=same)
        if label == "default":
            row["digest"] = digest(want)
            if key in expect:
                row["matches_expected"] = expect[key] == row["digest"]
        rows.append(row)
        note = "" if "matches_expected" not in row else ("  digest as expected" if row["matches_expected"]
                                                         else "  DIGEST DIFFERS from --expect")
        print(f"{key:<20} {label:<9} {shown!s:<45} {us:8.1f} us {gbs:7.0f} GB/s ({gbs * 1e9 / bw:4.0%})  "
              f"{'same bits' if same else 'DIFFERS'}{note}", flush=True)


def best_tables(rows: list, hidden: int) -> None:
    """The fastest bit-identical launch per (kernel, tokens) as the module's CUDA_LAUNCH entry, keyed by min rows
    (the smallest token count measured keyed 0): a table to paste, once the gaps between token counts are checked."""
    print("\nfastest identical launches, as CUDA_LAUNCH entries:")
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        entries, times = [], []
        for i, tokens in enumerate(sorted({r["tokens"] for r in rows if r["kernel"] == kernel})):
            ok = [r for r in rows if r["kernel"] == kernel and r["tokens"] == tokens and r["identical"]
                  and r["launch"] is not None]
            best = min(ok, key=lambda r: r["us"])
            kind = "TailLaunch" if kernel == "ffn_tail" else "Launch"
            entries.append(f"{0 if i == 0 else tokens}: {kind}({', '.join(map(str, best['launch']))})")
            default = next(r for r in ok if r["label"] == "default")
            times.append(f"{tokens}: {best['us']:.1f} us, default {default['us']:.1f}")
        if kernel.startswith("qkv_prep"):
            where = f"qkv_prep.py CUDA_LAUNCH[{kernel[len('qkv_prep'):]}]"
        else:
            module = "ffn_tail.py" if kernel == "ffn_tail" else "layer_norms.py"
            where = f"{module} CUDA_LAUNCH[{block_shape(hidden)[1]}]"
        print(f"  {where} = {{{', '.join(entries)}}}  # {'; '.join(times)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--tokens", type=int, nargs="+", default=None, help="default 256 2048 (--tiny: 12 40)")
    ap.add_argument("--kernels", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    ap.add_argument("--tiny", action="store_true", help="tiny shape, CPU under TRITON_INTERPRET=1 (smoke test)")
    ap.add_argument("--baseline-dir", default=None, help="older ffn_tail.py / qkv_prep.py / layer_norms.py")
    ap.add_argument("--expect", default=None, help="a previous --out: compare the default outputs' digests")
    ap.add_argument("--warm-l2", action="store_true", help="one input copy: inputs stay in L2 between calls, as the "
                    "engine's batch-1 step finds them (just written by the kernel before)")
    args = ap.parse_args()
    start = time.perf_counter()
    dev = "cpu" if args.tiny else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --tiny under TRITON_INTERPRET=1)")
    shape = SHAPES["tiny" if args.tiny else "26b-a4b"]
    T = 4 if args.tiny else shape["canvas_length"]
    tokens = args.tokens or ([12, 40] if args.tiny else [256, 2048])
    bw = copy_bandwidth(dev, 0.01 if args.tiny else 2.0)
    baselines = load_baselines(args.baseline_dir)
    expect = {}
    if args.expect:
        old = json.loads(Path(args.expect).read_text())["rows"]
        expect = {f"{r['kernel']}/{r['tokens']}": r["digest"] for r in old if "digest" in r}
    print(f"{torch.cuda.get_device_name() if dev == 'cuda' else 'cpu (interpreter)'}, copy bandwidth "
          f"{bw / 1e9:.0f} GB/s, triton {triton.__version__}")
    rows, cold = [], dev == "cuda" and not args.warm_l2
    with torch.inference_mode():
        for n in tokens:
            for kernel in args.kernels:  # qkv_prep256/512: sliding/full layers (the tiny shape's head dims: 32, 64)
                setup = (shape, n, T, dev, cold)
                if kernel.startswith("qkv_prep"):
                    case = qkv_prep_case(*setup, full=kernel.endswith("512"))
                else:
                    case = (ffn_tail_case if kernel == "ffn_tail" else attn_residual_case)(*setup)
                sweep(case, shape, dev, bw, baselines, expect, rows, args.tiny)
                del case
                if dev == "cuda":
                    torch.cuda.empty_cache()
    best_tables(rows, shape["hidden_size"])
    print(f"{time.perf_counter() - start:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                                              "copy_bandwidth_gbs": bw / 1e9, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

"""Canvas-over-cache attention, one layer at a time: the Triton kernel (dgemma/kernels/attention.py) against the
model's current path (`attention_reference`: query heads stacked per KV head, sdpa with a boolean mask over the whole
buffer, the mask rebuilt per layer as `KVCache.decoder_mask` does). bf16, real shapes: canvas T = 256, 16 query heads;
sliding layers D 256, 8 KV heads, a ring of 1023 slots; full layers D 512, 2 KV heads, `--capacity` slots of which
the prompt fills the first `prompt` (the engine allocates the capacity once, so sdpa reads all of it). Each call is
timed as a CUDA-graph replay (as the engine runs it). The per-step lines scale the layer times by the model's layer
counts (25 sliding + 5 full).

    python3 scripts/gpu_attention_bench.py [--out attn.json] [--capacity 32768] [--prompts 512 4096 32768]
        [--batches 1 8] [--quick] [--sweep] [--sweep-full [--budget 110]]

--quick       only the per-step lines of the default tiles (no sdpa timings, no per-layer table)
--sweep       tile shapes of the sliding layers (D 256) at the longest prompt, best five per batch
--sweep-full  the curated D = 512 variants in FULL_VARIANTS (and three sliding ones) at B=1 prompt 32768, B=1 prompt
              512 and B=8 prompt 4096, each checked against sdpa; one line per variant, then the winner as the
              CUDA_TILES line to paste into dgemma/kernels/attention.py. Starts no variant past --budget seconds
              (each costs two compiles, split and unsplit, of a few seconds each).
"""

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this working tree's dgemma, not an installed one

import torch  # noqa: E402
import triton  # noqa: E402

from dgemma.benchmark import graph_ms  # noqa: E402
from dgemma.config import ModelArgs  # noqa: E402
from dgemma.kernels import attention as attn  # noqa: E402
from dgemma.kernels.attention import Config, Tile, attention_reference, cache_lengths, canvas_attention  # noqa: E402
from dgemma.kernels.attention_two_pass import TwoPass, two_pass_config, two_pass_default  # noqa: E402

T, H, SCRATCH = 256, 16, 256
KINDS = {"sliding": (256, 8), "full": (512, 2)}  # kind → (head dim, KV heads)
SWEEP = dict(block_m=(64, 128), block_n=(32, 64), warps=(4, 8), stages=(1, 2, 3))  # --sweep, sliding layers

# --sweep-full: (name, tile, splits) in the order they are tried. splits: "auto" = default_config's rule (fill one
# wave of one program per SM), "x2" = twice that, "legacy" = the rule before v_parts (two programs per SM, rounded
# up: 5 splits at batch 1). Why each, in dgemma/kernels/attention.py above CUDA_TILES.
FULL_VARIANTS = [
    ("current", Tile(64, 32, 8, 2), "legacy"),  # the tile and split rule before this sweep
    ("parts2-lazy", Tile(128, 32, 8, 2, v_parts=2, prefetch=True, lazy_rescale=True), "auto"),  # CUDA_TILES[512]
    ("parts2", Tile(128, 32, 8, 2, v_parts=2, prefetch=True), "auto"),
    ("current-auto", Tile(64, 32, 8, 2), "auto"),  # the old tile, one wave of splits
    ("whole-prefetch-lazy", Tile(64, 32, 8, 2, prefetch=True, lazy_rescale=True), "auto"),
    ("parts2-lazy-x2", Tile(128, 32, 8, 2, v_parts=2, prefetch=True, lazy_rescale=True), "x2"),  # two waves
    ("parts2-lazy-w4-n16s2",  # 112 KB of shared memory: two programs per SM
     Tile(64, 16, 4, 2, v_parts=2, prefetch=True, lazy_rescale=True, per_sm=2), "auto"),
    ("parts2-lazy-n16s3", Tile(128, 16, 8, 3, v_parts=2, prefetch=True, lazy_rescale=True), "auto"),
    ("parts2-lazy-w4-n32s3", Tile(64, 32, 4, 3, v_parts=2, prefetch=True, lazy_rescale=True), "auto"),
]
SLIDING_VARIANTS = [
    ("current", attn.CUDA_TILES[256], "auto"),
    ("prefetch-lazy", Tile(128, 64, 8, 2, prefetch=True, lazy_rescale=True), "auto"),
    # session 4: at batch 1 a sliding layer (<= 1279 keys) takes ~30 µs, ~25% of tensor peak: halve the fp32
    # accumulator (v_parts 2) or the rows per program (block_m 64), so more programs share the work.
    ("parts2", Tile(128, 64, 8, 2, v_parts=2, prefetch=True), "auto"),
    ("parts2-n32", Tile(128, 32, 8, 2, v_parts=2, prefetch=True), "auto"),
    ("parts2-lazy", Tile(128, 64, 8, 2, v_parts=2, prefetch=True, lazy_rescale=True), "auto"),
    ("m64-w4", Tile(64, 64, 4, 2, prefetch=True), "auto"),
    ("m64-w4-2/SM", Tile(64, 64, 4, 2, prefetch=True, per_sm=2), "auto"),
    ("m64-w8-s3", Tile(64, 64, 8, 3, prefetch=True), "auto"),
    ("m64-parts2-2/SM", Tile(64, 64, 4, 2, v_parts=2, prefetch=True, per_sm=2), "auto"),
    ("prefetch-x2", Tile(128, 64, 8, 2, prefetch=True), "x2"),
]
FULL_SHAPES = [(1, 32768), (1, 512), (8, 4096)]  # (batch, prompt); the first picks the winner
SLIDING_SHAPES = [(1, 32768), (1, 512), (8, 4096)]
N_FULL = sum(t == "full_attention" for t in ModelArgs().layer_types)  # 5 of 30
N_SLIDING = len(ModelArgs().layer_types) - N_FULL
MAX_REL_ERR = 2**-5  # max |kernel - sdpa| / max |sdpa|: bf16 rounding is ~2^-9; a masking bug is O(1)


def layer_inputs(kind: str, B: int, prompt: int, capacity: int, seed: int = 0):
    """q [B, H, T, D] (a transpose of [B, T, H, D], as the model makes it), k, v [B, Hkv, C + 256, D], pos [B, C]."""
    D, n_kv = KINDS[kind]
    cap = min(1023, capacity) if kind == "sliding" else capacity
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, T, H, D, device="cuda", generator=g, dtype=torch.bfloat16).transpose(1, 2) * D**-0.25
    k = torch.randn(B, n_kv, cap + SCRATCH, D, device="cuda", generator=g, dtype=torch.bfloat16) * D**-0.25
    v = torch.randn(B, n_kv, cap + SCRATCH, D, device="cuda", generator=g, dtype=torch.bfloat16)
    p = torch.arange(max(0, prompt - cap), prompt, device="cuda")
    pos = torch.full((B, cap), -1, dtype=torch.long, device="cuda")
    pos[:, p % cap] = p  # a full layer's prefix (slot = position) or a sliding ring (slot = position % C)
    return q, k, v, pos


def useful_tflops(q: torch.Tensor, pos: torch.Tensor, ms: float) -> float:
    """4·T·D FLOPs per (query head, attended key): QKᵀ and P·V over the valid slots only."""
    B, H_, T_, D = q.shape
    keys = int((pos >= 0).sum()) + B * SCRATCH
    return 4 * H_ * T_ * D * keys / (ms * 1e-3) / 1e12


def engine_config(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor) -> Config | TwoPass:
    """The config `canvas_attention` launched without one (after its first call: the first tile that compiled; the
    two-pass kernels' for the head dims of attention_two_pass.CUDA_TWO_PASS)."""
    B, H_, T_, D = q.shape
    if (tp := two_pass_default(q)) is not None:
        return two_pass_config(q, k.shape[1], pos.shape[1], SCRATCH, tp)
    small = attn.small_grid(B, H_, k.shape[1], T_, D, torch.cuda.get_device_properties(q.device).multi_processor_count)
    tiles = attn.tile_candidates(D, small)
    tile = tiles[attn._TILE_FITS.get((q.device.index, D, q.dtype, small), 0)]
    return attn.default_config(q, k.shape[1], pos.shape[1], SCRATCH, tile)


def measure(kind: str, B: int, prompt: int, capacity: int, iters: int, sdpa: bool = True) -> dict:
    """One layer at the default tiles, as the engine calls it (with the launcher's fallback)."""
    q, k, v, pos = layer_inputs(kind, B, prompt, capacity)
    kv_len = cache_lengths(pos)  # once per step in the engine, shared by all layers
    out = canvas_attention(q, k, v, pos, kv_len)
    cfg = engine_config(q, k, pos)
    row = dict(kind=kind, head_dim=q.shape[3], kv_heads=k.shape[1], batch=B, prompt=prompt, slots=pos.shape[1],
               config=cfg._asdict())
    row["kernel_ms"] = graph_ms(lambda: canvas_attention(q, k, v, pos, kv_len), iters)
    row["kernel_tflops"] = useful_tflops(q, pos, row["kernel_ms"])
    if sdpa:
        ref = attention_reference(q, k, v, pos)
        row["max_abs_err_vs_sdpa"] = (out.float() - ref.float()).abs().max().item()
        row["sdpa_ms"] = graph_ms(lambda: attention_reference(q, k, v, pos), iters)
        row["speedup"] = row["sdpa_ms"] / row["kernel_ms"]
    return row


def sweep(kind: str, B: int, prompt: int, capacity: int, iters: int) -> list[dict]:
    """--sweep: every tile shape of SWEEP at 1, the default and twice the default splits (sliding layers)."""
    q, k, v, pos = layer_inputs(kind, B, prompt, capacity)
    kv_len = cache_lengths(pos)
    ref = attention_reference(q, k, v, pos).float()
    splits = attn.default_config(q, k.shape[1], pos.shape[1], SCRATCH).splits
    rows = []
    for bm, bn, w, st, sp in itertools.product(*SWEEP.values(), sorted({1, splits, 2 * splits})):
        cfg = Config(bm, bn, w, st, sp)
        try:
            err = (canvas_attention(q, k, v, pos, kv_len, cfg).float() - ref).abs().max().item()
            ms = graph_ms(lambda: canvas_attention(q, k, v, pos, kv_len, cfg), iters)  # noqa: B023 (runs here)
            rows.append(dict(kind=kind, batch=B, prompt=prompt, config=cfg._asdict(), kernel_ms=ms,
                             kernel_tflops=useful_tflops(q, pos, ms), max_abs_err_vs_sdpa=err))
        except Exception as e:  # out of shared memory / registers for this tile: record and go on
            rows.append(dict(kind=kind, batch=B, prompt=prompt, config=cfg._asdict(), error=repr(e)[:200]))
            torch.cuda.synchronize()
    return rows


def variant_config(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, tile: Tile, rule: str) -> Config:
    cfg = attn.default_config(q, k.shape[1], pos.shape[1], SCRATCH, tile)
    if rule == "x2":
        return cfg._replace(splits=min(2 * cfg.splits, 16))
    if rule == "legacy":
        B, H_, T_, _ = q.shape
        programs = triton.cdiv((H_ // k.shape[1]) * T_, tile.block_m) * tile.v_parts * B * k.shape[1]
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
        blocks = triton.cdiv(pos.shape[1], tile.block_n) + triton.cdiv(SCRATCH, tile.block_n)
        return cfg._replace(splits=max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(blocks, 8), 16)))
    return cfg


def sweep_variants(kind: str, variants: list, shapes: list, capacity: int, iters: int, deadline: float) -> list[dict]:
    """--sweep-full: each (name, tile, splits rule) at each (batch, prompt), against sdpa computed once per shape."""
    cases = []
    for B, prompt in shapes:
        q, k, v, pos = layer_inputs(kind, B, prompt, capacity)
        ref = attention_reference(q, k, v, pos).float()
        cases.append((B, prompt, (q, k, v, pos), cache_lengths(pos), ref, ref.abs().max().item()))
    rows = []
    for name, tile, rule in variants:
        if time.monotonic() > deadline:
            rows.append(dict(kind=kind, name=name, tile=tile._asdict(), skipped="time budget"))
            print(f"  {name:22} skipped: past --budget", flush=True)
            continue
        row = dict(kind=kind, name=name, tile=tile._asdict(), splits_rule=rule, shapes=[])
        t0 = time.monotonic()
        for B, prompt, (q, k, v, pos), kv_len, ref, ref_max in cases:
            cfg = variant_config(q, k, pos, tile, rule)
            res = dict(batch=B, prompt=prompt, config=cfg._asdict())
            try:
                out = canvas_attention(q, k, v, pos, kv_len, cfg)
                err = (out.float() - ref).abs().max().item()
                ms = graph_ms(lambda: canvas_attention(q, k, v, pos, kv_len, cfg), iters)  # noqa: B023 (runs here)
                res.update(kernel_ms=ms, kernel_tflops=useful_tflops(q, pos, ms), max_abs_err=err,
                           rel_err=err / ref_max, ok=bool(out.isfinite().all()) and err <= MAX_REL_ERR * ref_max)
            except Exception as e:  # out of shared memory or registers: record and go on
                res["error"] = repr(e)[:300]
            row["shapes"].append(res)
        row["seconds"] = time.monotonic() - t0
        rows.append(row)
        print_variant(row)
    return rows


def print_variant(row: dict) -> None:
    t = Tile(**row["tile"])
    desc = (f"{t.block_m}x{t.block_n} w{t.warps} s{t.stages} parts {t.v_parts}"
            f"{' prefetch' if t.prefetch else ''}{' lazy' if t.lazy_rescale else ''}"
            f"{f' {t.per_sm}/SM' if t.per_sm > 1 else ''}")
    cells = []
    for r in row["shapes"]:
        if "error" in r:
            cells.append(f"{'FAILED':>22}")
        else:
            cells.append(f"{r['kernel_ms']:7.3f} ms {r['kernel_tflops']:4.0f} TF/s sp{r['config']['splits']:<2}"
                         f"{'' if r['ok'] else ' WRONG'}")
    errs = [r["rel_err"] for r in row["shapes"] if "rel_err" in r]
    err = f"{max(errs):.1e}" if errs else "-"
    first = row["shapes"][0]
    layers = (N_FULL if row["kind"] == "full" else N_SLIDING) * first["kernel_ms"] if "kernel_ms" in first else 0
    print(f"  {row['name']:22} {desc:40} {' | '.join(cells)} | rel err {err} | {layers:5.2f} ms/step "
          f"| {row['seconds']:4.1f} s", flush=True)
    for r in row["shapes"]:
        if "error" in r:
            print(f"      B={r['batch']} prompt {r['prompt']}: {r['error']}", flush=True)


def report_winner(kind: str, rows: list[dict], shapes: list) -> None:
    """The variant fastest at shapes[0] among those right at every shape, and the fastest per shape."""
    good = [r for r in rows if "shapes" in r and all(s.get("ok") for s in r["shapes"])]
    if not good:
        print(f"  {kind}: no variant ran correctly at every shape")
        return
    for i, (B, prompt) in enumerate(shapes):
        best = min(good, key=lambda r: r["shapes"][i]["kernel_ms"])
        print(f"  fastest at B={B} prompt {prompt}: {best['name']} ({best['shapes'][i]['kernel_ms']:.3f} ms)")
    win = min(good, key=lambda r: r["shapes"][0]["kernel_ms"])
    t = Tile(**win["tile"])
    variant = "".join(f", {k}={getattr(t, k)!r}" for k in Tile._fields[4:] if getattr(t, k) != Tile._field_defaults[k])
    note = "" if win["splits_rule"] == "auto" else f"  (splits rule {win['splits_rule']}: not default_config's)"
    print(f"  winner ({kind}, B={shapes[0][0]} prompt {shapes[0][1]}): {win['name']}  →  CUDA_TILES[{KINDS[kind][0]}] "
          f"= Tile({t.block_m}, {t.block_n}, {t.warps}, {t.stages}{variant}){note}")


def per_step(rows: list[dict], batches: list[int], prompts: list[int], with_sdpa: bool) -> list[dict]:
    n_full, n_sliding = N_FULL, N_SLIDING
    steps = []
    for B in batches:
        for p in prompts:
            per = {r["kind"]: r for r in rows if r["batch"] == B and r["prompt"] == p}
            s = dict(batch=B, prompt=p, kernel_ms_per_step=n_sliding * per["sliding"]["kernel_ms"]
                     + n_full * per["full"]["kernel_ms"], full_ms_per_step=n_full * per["full"]["kernel_ms"])
            if with_sdpa:
                s["sdpa_ms_per_step"] = n_sliding * per["sliding"]["sdpa_ms"] + n_full * per["full"]["sdpa_ms"]
            steps.append(s)
            base = next((x for x in steps if x["batch"] == B and x["prompt"] == min(prompts)), s)
            print(f"per step ({n_sliding} sliding + {n_full} full layers), B={B}, prompt {p}: kernel "
                  f"{s['kernel_ms_per_step']:.2f} ms (full layers {s['full_ms_per_step']:.2f} ms, "
                  f"+{s['kernel_ms_per_step'] - base['kernel_ms_per_step']:.2f} ms over prompt {min(prompts)})"
                  + (f", sdpa {s['sdpa_ms_per_step']:.2f} ms" if with_sdpa else ""), flush=True)
    return steps


def print_rows(rows: list[dict]) -> None:
    print(f"{'kind':8} {'D':>4} {'B':>2} {'prompt':>6} {'sdpa ms':>8} {'kernel ms':>9} {'x':>5} {'TFLOP/s':>7} "
          f"{'max err':>8}  config")
    for r in rows:
        c = r["config"]
        print(f"{r['kind']:8} {r['head_dim']:>4} {r['batch']:>2} {r['prompt']:>6} {r['sdpa_ms']:>8.3f} "
              f"{r['kernel_ms']:>9.3f} {r['speedup']:>5.1f} {r['kernel_tflops']:>7.0f} {r['max_abs_err_vs_sdpa']:>8.1e}"
              f"  {c['block_m']}x{c['block_n']} w{c['warps']} s{c['stages']} splits {c['splits']} parts "
              f"{c['v_parts']}{' prefetch' if c['prefetch'] else ''}{' lazy' if c['lazy_rescale'] else ''}")


def run_sweep_full(capacity: int, iters: int, deadline: float, sliding_only: bool = False) -> list[dict]:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"sweep-full ({sms} SMs): full layers (D 512) at (B, prompt) {FULL_SHAPES}: per shape ms, useful TFLOP/s, "
          f"splits; the largest rel err; ms per step of the {N_FULL} layers at the first shape; seconds spent "
          f"(compiles included)", flush=True)
    full = []
    if not sliding_only:
        full = sweep_variants("full", FULL_VARIANTS, FULL_SHAPES, capacity, iters, deadline)
        report_winner("full", full, FULL_SHAPES)
    print(f"sweep-full: sliding layers (D 256) at {SLIDING_SHAPES}", flush=True)
    sliding = sweep_variants("sliding", SLIDING_VARIANTS, SLIDING_SHAPES, capacity, iters, deadline)
    report_winner("sliding", sliding, SLIDING_SHAPES)
    return full + sliding


def run_table(a: argparse.Namespace, capacity: int) -> dict:
    """The default tiles at every kind × batch × prompt (--quick: kernel only, per-step lines only); --sweep."""
    rows = [measure(kind, B, p, capacity, a.iters, sdpa=not a.quick)
            for kind in KINDS for B in a.batches for p in a.prompts]
    if not a.quick:
        print_rows(rows)
    result = dict(rows=rows, per_step=per_step(rows, a.batches, a.prompts, with_sdpa=not a.quick))
    if a.sweep:
        result["sweep"] = []
        for B in a.batches:
            res = sweep("sliding", B, max(a.prompts), capacity, a.iters)
            result["sweep"] += res
            ran = [r for r in res if "error" not in r]
            ok = sorted((r for r in ran if r["max_abs_err_vs_sdpa"] < 0.05), key=lambda r: r["kernel_ms"])
            print(f"sweep sliding B={B} prompt {max(a.prompts)}: {len(res)} configs, {len(res) - len(ran)} did not "
                  f"compile or launch, {len(ran) - len(ok)} gave wrong results (max err >= 0.05); fastest:")
            for r in ok[:5]:
                print(f"  {r['kernel_ms']:8.3f} ms  {r['kernel_tflops']:4.0f} TFLOP/s  {r['config']}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--capacity", type=int, default=32768, help="full layers' cache slots (the engine's max_len)")
    ap.add_argument("--prompts", type=int, nargs="+", default=[512, 4096, 32768])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="per-step lines of the default tiles only")
    ap.add_argument("--sweep", action="store_true", help="tile shapes of the sliding layers")
    ap.add_argument("--sweep-full", action="store_true", help="the curated D = 512 variants (FULL_VARIANTS)")
    ap.add_argument("--sliding-only", action="store_true", help="--sweep-full: the sliding layers' variants only")
    ap.add_argument("--budget", type=float, default=110, help="--sweep-full starts no variant after this many seconds")
    a = ap.parse_args()
    start = time.monotonic()
    capacity = max(a.capacity, *a.prompts, *(p for _, p in FULL_SHAPES))
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"capacity {capacity}  bf16  T={T}  H={H}", flush=True)
    result = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  command=" ".join(sys.argv), capacity=capacity,
                  commit=subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip())
    try:
        if a.sweep_full:
            result["sweep_full"] = run_sweep_full(capacity, min(a.iters, 20), start + a.budget, a.sliding_only)
            print(f"sweep-full: {time.monotonic() - start:.0f} s", flush=True)
        if a.quick or a.sweep or not a.sweep_full:  # the default tiles (also after --sweep-full, with --quick)
            result.update(run_table(a, capacity))
    finally:  # whatever ran, also after an error
        if a.out:
            with open(a.out, "w") as f:
                json.dump(result, f, indent=1)
            print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

"""Canvas-over-cache attention, one layer at a time: the Triton kernel (dgemma/kernels/attention.py) against the
model's current path (`attention_reference`: query heads stacked per KV head, sdpa with a boolean mask over the whole
buffer, the mask rebuilt per layer as `KVCache.decoder_mask` does). bf16, real shapes: canvas T = 256, 16 query heads;
sliding layers D 256, 8 KV heads, a ring of 1023 slots; full layers D 512, 2 KV heads, `--capacity` slots of which
the prompt fills the first `prompt` (the engine allocates the capacity once, so sdpa reads all of it). Each call is
timed as a CUDA-graph replay (as the engine runs it). The per-step column scales the layer times by the model's
layer counts (25 sliding + 5 full).

Usage: python scripts/gpu_attention_bench.py [--out attn.json] [--capacity 32768] [--prompts 512 4096 32768]
       [--batches 1 8] [--sweep]   (--sweep also times alternative tile shapes at the longest prompt and prints the
       best per shape: copy the winner into CUDA_TILES in dgemma/kernels/attention.py)
"""

import argparse
import itertools
import json
import subprocess
import sys

import torch
import triton

from dgemma.config import ModelArgs
from dgemma.kernels.attention import Config, attention_reference, cache_lengths, canvas_attention, default_config

T, H, SCRATCH = 256, 16, 256
KINDS = {"sliding": (256, 8), "full": (512, 2)}  # kind → (head dim, KV heads)
SWEEP = {256: dict(block_m=(64, 128), block_n=(32, 64), warps=(4, 8), stages=(1, 2, 3)),
         512: dict(block_m=(32, 64, 128), block_n=(16, 32, 64), warps=(4, 8), stages=(1, 2))}


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


def graph_ms(fn, iters: int) -> float:
    """Milliseconds per call of fn() replayed from a CUDA graph."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def useful_tflops(q: torch.Tensor, pos: torch.Tensor, ms: float) -> float:
    """4·T·D FLOPs per (query head, attended key): QKᵀ and P·V over the valid slots only."""
    B, H_, T_, D = q.shape
    keys = int((pos >= 0).sum()) + B * SCRATCH
    return 4 * H_ * T_ * D * keys / (ms * 1e-3) / 1e12


def measure(kind: str, B: int, prompt: int, capacity: int, iters: int, config: Config | None = None) -> dict:
    q, k, v, pos = layer_inputs(kind, B, prompt, capacity)
    kv_len = cache_lengths(pos)  # once per step in the engine, shared by all layers
    cfg = config or default_config(q, k.shape[1], pos.shape[1], SCRATCH)
    ref = attention_reference(q, k, v, pos)
    out = canvas_attention(q, k, v, pos, kv_len, cfg)
    err = (out.float() - ref.float()).abs().max().item()
    sdpa_ms = graph_ms(lambda: attention_reference(q, k, v, pos), iters) if config is None else float("nan")
    kernel_ms = graph_ms(lambda: canvas_attention(q, k, v, pos, kv_len, cfg), iters)
    return dict(kind=kind, head_dim=q.shape[3], kv_heads=k.shape[1], batch=B, prompt=prompt, slots=pos.shape[1],
                sdpa_ms=sdpa_ms, kernel_ms=kernel_ms, speedup=sdpa_ms / kernel_ms,
                kernel_tflops=useful_tflops(q, pos, kernel_ms), max_abs_err_vs_sdpa=err, config=cfg._asdict())


def sweep(kind: str, B: int, prompt: int, capacity: int, iters: int) -> list[dict]:
    D = KINDS[kind][0]
    base = layer_inputs(kind, B, prompt, capacity)
    splits = default_config(base[0], base[1].shape[1], base[3].shape[1], SCRATCH).splits
    rows = []
    space = SWEEP[D]
    for bm, bn, w, st, sp in itertools.product(*space.values(), sorted({1, splits, 2 * splits})):
        cfg = Config(bm, bn, w, st, sp)
        try:
            rows.append(measure(kind, B, prompt, capacity, iters, cfg))
        except Exception as e:  # out of shared memory / registers for this tile: record and go on
            rows.append(dict(kind=kind, batch=B, prompt=prompt, config=cfg._asdict(), error=repr(e)[:200]))
            torch.cuda.synchronize()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--capacity", type=int, default=32768, help="full layers' cache slots (the engine's max_len)")
    ap.add_argument("--prompts", type=int, nargs="+", default=[512, 4096, 32768])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--sweep", action="store_true")
    a = ap.parse_args()
    capacity = max(a.capacity, *a.prompts)
    rows = [measure(kind, B, p, capacity, a.iters) for kind in KINDS for B in a.batches for p in a.prompts]

    n_full = sum(t == "full_attention" for t in ModelArgs().layer_types)
    n_sliding = len(ModelArgs().layer_types) - n_full
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"capacity {capacity}  bf16  T={T}  H={H}")
    print(f"{'kind':8} {'D':>4} {'B':>2} {'prompt':>6} {'sdpa ms':>8} {'kernel ms':>9} {'x':>5} {'TFLOP/s':>7} "
          f"{'max err':>8}  config")
    for r in rows:
        c = r["config"]
        print(f"{r['kind']:8} {r['head_dim']:>4} {r['batch']:>2} {r['prompt']:>6} {r['sdpa_ms']:>8.3f} "
              f"{r['kernel_ms']:>9.3f} {r['speedup']:>5.1f} {r['kernel_tflops']:>7.0f} {r['max_abs_err_vs_sdpa']:>8.1e}"
              f"  {c['block_m']}x{c['block_n']} w{c['warps']} s{c['stages']} splits {c['splits']}")
    steps = []
    for B, p in itertools.product(a.batches, a.prompts):
        per = {r["kind"]: r for r in rows if r["batch"] == B and r["prompt"] == p}
        sdpa = n_sliding * per["sliding"]["sdpa_ms"] + n_full * per["full"]["sdpa_ms"]
        kern = n_sliding * per["sliding"]["kernel_ms"] + n_full * per["full"]["kernel_ms"]
        steps.append(dict(batch=B, prompt=p, sdpa_ms_per_step=sdpa, kernel_ms_per_step=kern))
        print(f"per step ({n_sliding} sliding + {n_full} full layers), B={B}, prompt {p}: sdpa {sdpa:.2f} ms, "
              f"kernel {kern:.2f} ms")

    swept = []
    if a.sweep:
        for kind, B in itertools.product(KINDS, a.batches):
            res = sweep(kind, B, max(a.prompts), capacity, a.iters)
            swept += res
            ran = [r for r in res if "error" not in r]
            ok = sorted((r for r in ran if r["max_abs_err_vs_sdpa"] < 0.05), key=lambda r: r["kernel_ms"])
            print(f"sweep {kind} B={B} prompt {max(a.prompts)}: {len(res)} configs, {len(res) - len(ran)} did not "
                  f"compile or launch, {len(ran) - len(ok)} gave wrong results (max err >= 0.05); fastest:")
            for r in ok[:5]:
                print(f"  {r['kernel_ms']:8.3f} ms  {r['kernel_tflops']:4.0f} TFLOP/s  {r['config']}")

    if a.out:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        with open(a.out, "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           commit=commit, command=" ".join(sys.argv), capacity=capacity, rows=rows, per_step=steps,
                           sweep=swept), f, indent=1)


if __name__ == "__main__":
    main()

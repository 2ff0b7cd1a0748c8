"""Canvas attention through the two-pass kernels (dgemma/kernels/attention_two_pass.py) against the fused kernel
(attention.py's default tiles), one layer at the real shapes (16 query heads, canvas 256; full layers D 512 with 2
KV heads, sliding layers D 256 with 8 over a ring of 1023 slots), CUDA-graph replays.

    python3 scripts/gpu_two_pass_probe.py [--out probe.json] [--budget 200]

For each shape of SHAPES: the fused kernel; then each TwoPass variant of VARIANTS[head dim], each checked against sdpa
(max error relative to sdpa's largest output) and timed whole and per pass. Prints one line per variant and the
fastest per shape.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_attention_bench's layer inputs

import torch  # noqa: E402
from gpu_attention_bench import KINDS, SCRATCH, H, T, layer_inputs  # noqa: E402

from dgemma.benchmark import graph_ms  # noqa: E402
from dgemma.kernels import attention as attn  # noqa: E402
from dgemma.kernels import attention_two_pass as two  # noqa: E402
from dgemma.kernels.attention import attention_reference, cache_lengths, canvas_attention  # noqa: E402
from dgemma.kernels.attention_two_pass import TwoPass  # noqa: E402

# (kind, batch, prompt, capacity): full layers (D 512, slot = position) and sliding layers (D 256, a ring of 1023
# slots, wrapped past 1023 positions), as gpu_attention_bench.layer_inputs builds them
SHAPES = [("full", 1, 32768, 32768), ("full", 1, 4096, 4352), ("full", 1, 512, 768), ("full", 1, 512, 32768),
          ("full", 8, 4096, 4352), ("full", 2, 32768, 33024), ("full", 8, 512, 768), ("full", 16, 512, 768),
          ("sliding", 1, 512, 1023), ("sliding", 1, 4096, 1023), ("sliding", 8, 512, 1023),
          ("sliding", 8, 4096, 1023)]
BASE = TwoPass(block_n=256)  # CUDA_TWO_PASS[512] after the first probe (session 6)
VARIANTS = {512: [("default", BASE),
                  ("n128", BASE._replace(block_n=128)),
                  ("n128-w4", BASE._replace(block_n=128, s_warps=4)),
                  ("s-stages4", BASE._replace(s_stages=4)),
                  ("s-d128-s2", BASE._replace(block_d=128, s_stages=2)),
                  ("s-w4", BASE._replace(s_warps=4)),
                  ("m64-w4", BASE._replace(block_m=64, s_warps=4, v_warps=4)),
                  ("v-parts4", BASE._replace(v_parts=4)),
                  ("v-stages4", BASE._replace(v_stages=4))],
            256: [("n128-parts1", TwoPass(block_n=128, v_parts=1)),
                  ("n256-parts1", TwoPass(block_n=256, v_parts=1)),
                  ("n128-parts2", TwoPass(block_n=128, v_parts=2)),
                  ("n256-parts2", TwoPass(block_n=256, v_parts=2)),
                  ("n128-w4-parts2", TwoPass(block_n=128, s_warps=4, v_parts=2)),
                  ("m64-n128-w4-parts1", TwoPass(block_m=64, block_n=128, s_warps=4, v_parts=1, v_warps=4))]}


def fused_config(q: torch.Tensor, n_kv: int, cap: int) -> attn.Config:
    """What canvas_attention launches without the two-pass path (the first tile candidate)."""
    B, H_, T_, D = q.shape
    small = attn.small_grid(B, H_, n_kv, T_, D, torch.cuda.get_device_properties(q.device).multi_processor_count)
    return attn.default_config(q, n_kv, cap, SCRATCH, attn.tile_candidates(D, small)[0])


def tflops(D: int, B: int, keys: int, ms: float) -> float:
    return 4 * H * T * D * B * (keys + SCRATCH) / (ms * 1e-3) / 1e12


def probe_shape(kind: str, B: int, prompt: int, capacity: int, iters: int, deadline: float) -> dict:
    D, n_kv = KINDS[kind]
    q, k, v, pos = layer_inputs(kind, B, prompt, capacity)
    cap = pos.shape[1]
    kv_len = cache_lengths(pos)
    keys = min(prompt, cap)
    ref = attention_reference(q, k, v, pos).float()
    ref_max = ref.abs().max().item()
    fc = fused_config(q, n_kv, cap)
    fused = graph_ms(lambda: canvas_attention(q, k, v, pos, kv_len, fc), iters)
    err = (canvas_attention(q, k, v, pos, kv_len, fc).float() - ref).abs().max().item() / ref_max
    print(f"D={D} B={B} prompt {prompt} slots {cap}: fused {fused:.3f} ms ({tflops(D, B, keys, fused):.0f} TF/s) "
          f"rel err {err:.1e}", flush=True)
    shape = dict(head_dim=D, batch=B, prompt=prompt, slots=cap, fused_ms=fused, fused_config=fc._asdict(),
                 fused_rel_err=err, variants=[])
    for name, base in VARIANTS[D]:
        if time.monotonic() > deadline:
            print(f"  {name:14} skipped (budget)")
            continue
        cfg = two.two_pass_config(q, n_kv, cap, SCRATCH, base)
        row = dict(name=name, config=cfg._asdict())
        try:
            out = canvas_attention(q, k, v, pos, kv_len, cfg)
            row["rel_err"] = (out.float() - ref).abs().max().item() / ref_max
            row["ms"] = graph_ms(lambda: canvas_attention(q, k, v, pos, kv_len, cfg), iters)  # noqa: B023
            scores = two.scores_launch(q, k, pos, kv_len, cfg)
            row["scores_ms"] = graph_ms(lambda: two.scores_launch(q, k, pos, kv_len, cfg), iters)  # noqa: B023
            o2 = torch.empty_like(out)
            row["values_ms"] = graph_ms(lambda: two.values_launch(scores, q, v, pos, kv_len, o2, cfg),  # noqa: B023
                                        iters)
            print(f"  {name:14} {row['ms']:.3f} ms ({tflops(D, B, keys, row['ms']):.0f} TF/s; scores "
                  f"{row['scores_ms']:.3f}, values {row['values_ms']:.3f}) splits {cfg.splits} "
                  f"rel err {row['rel_err']:.1e}  x{fused / row['ms']:.2f} vs fused", flush=True)
        except Exception as e:  # out of resources for this tile: record and go on
            row["error"] = repr(e)[:300]
            print(f"  {name:14} FAILED {row['error'][:150]}", flush=True)
            torch.cuda.synchronize()
        shape["variants"].append(row)
    ok = [r for r in shape["variants"] if "ms" in r and r["rel_err"] < 2**-5]
    if ok:
        best = min(ok, key=lambda r: r["ms"])
        print(f"  fastest: {best['name']} {best['ms']:.3f} ms vs fused {fused:.3f}", flush=True)
    return shape


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--budget", type=float, default=200)
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    deadline = time.monotonic() + a.budget
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  bf16  H {H}  T {T}")
    rows = []
    for shape in SHAPES:
        rows.append(probe_shape(*shape, a.iters, deadline))
        torch.cuda.empty_cache()
    if a.out:
        Path(a.out).write_text(json.dumps(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                                               shapes=rows), indent=1))


if __name__ == "__main__":
    main()

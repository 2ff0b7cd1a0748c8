"""The MoE router's tail in one kernel: softmax over the experts, top-k, renormalise, per-expert scale.

`route(scores [N, E], per_expert_scale [E], k)` computes, per token, exactly `Router.forward` after its projection:
    probs = softmax(scores) in fp32;  w, idx = topk(probs, k);  w = w / Σ w;  w = w * per_expert_scale[idx]
and returns (w [N, k] fp32, idx [N, k] int64), the k experts in descending probability. Equal probabilities (common
with bf16 scores) come lowest index first; torch.topk orders such ties its own way (CPU and CUDA differ), which
changes only the order in which a token's k expert outputs are summed.

Notable choices:
- One program holds ROWS whole rows (E <= a few hundred), so the softmax and the k selections never leave registers;
  top-k is k rounds of (max, lowest index reaching it, mask it out): k is 8 and E 128 at the real shape.
- It replaces torch.topk's two kernels (a radix select and a sort, ~13 µs a layer at batch 1 on an H200) and the
  fused elementwise work around them with one launch.
- The sums run in another order than torch's, so weights may differ from the reference in the last fp32 bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dgemma.kernels.fmath import pdl, pdl_start


@triton.jit
def _route_kernel(s_ptr, scale_ptr, w_ptr, idx_ptr, N, stride_s, E: tl.constexpr, E_PAD: tl.constexpr,
                  K: tl.constexpr, K_PAD: tl.constexpr, ROWS: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, E_PAD)
    kcols = tl.arange(0, K_PAD)
    live = rows < N
    x = tl.load(s_ptr + rows.to(tl.int64)[:, None] * stride_s + cols[None, :],
                mask=live[:, None] & (cols < E)[None, :], other=float("-inf")).to(tl.float32)
    x = tl.where(live[:, None], x, 0.0)  # rows past N: finite junk, never stored
    e = tl.exp(x - tl.max(x, 1)[:, None])
    p = e / tl.sum(e, 1)[:, None]  # padding columns: exp(-inf) = 0
    p = tl.where((cols < E)[None, :], p, -1.0)  # never selected (probabilities are >= 0)
    vals = tl.zeros([ROWS, K_PAD], dtype=tl.float32)
    ids = tl.zeros([ROWS, K_PAD], dtype=tl.int32)
    for j in tl.static_range(K):
        v = tl.max(p, 1)
        i = tl.min(tl.where(p == v[:, None], cols[None, :], E_PAD), 1)
        vals = tl.where(kcols[None, :] == j, v[:, None], vals)
        ids = tl.where(kcols[None, :] == j, i[:, None], ids)
        p = tl.where(cols[None, :] == i[:, None], -1.0, p)
    w = vals / tl.sum(vals, 1)[:, None]
    kmask = live[:, None] & (kcols < K)[None, :]
    w = w * tl.load(scale_ptr + ids, mask=kmask, other=0.0).to(tl.float32)
    out = rows.to(tl.int64)[:, None] * K + kcols[None, :]
    tl.store(w_ptr + out, w, mask=kmask)
    tl.store(idx_ptr + out, ids.to(tl.int64), mask=kmask)


def route(scores: torch.Tensor, per_expert_scale: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Router weights [N, k] fp32 and expert indices [N, k] int64 from the router's projection `scores` [N, E]."""
    if scores.dim() != 2 or scores.stride(1) != 1 or per_expert_scale.shape != (scores.shape[1],):
        raise ValueError(f"route: scores must be [N, E] with unit stride and per_expert_scale [E]; got "
                         f"{tuple(scores.shape)} and {tuple(per_expert_scale.shape)}")
    N, E = scores.shape
    if not 0 < k <= E:
        raise ValueError(f"route: k = {k} must lie in 1..{E}")
    w = torch.empty(N, k, dtype=torch.float32, device=scores.device)
    idx = torch.empty(N, k, dtype=torch.int64, device=scores.device)
    rows = 4 if scores.is_cuda else 2
    _route_kernel[(triton.cdiv(N, rows),)](scores, per_expert_scale, w, idx, N, scores.stride(0), E=E,
                                           E_PAD=triton.next_power_of_2(E), K=k, K_PAD=triton.next_power_of_2(k),
                                           ROWS=rows, num_warps=4 if scores.is_cuda else 1,
                                           **pdl(scores.device))
    return w, idx


def reference_route(scores: torch.Tensor, per_expert_scale: torch.Tensor, k: int):
    """`Router.forward` after the projection, in torch."""
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    w, idx = torch.topk(probs, k=k, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    return w * per_expert_scale[idx], idx

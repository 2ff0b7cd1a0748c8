"""The end of a Gemma 4 layer in one pass: the feed-forward norms, the residual add and the layer scalar.

    out = (x + N(N1(dense) + N2(moe))) * layer_scalar
with N1 = post_feedforward_layernorm_1, N2 = post_feedforward_layernorm_2, N = post_feedforward_layernorm
(models/diffusion_gemma.py `Layer.feed_forward` and `Layer.forward`). Eager, this is 3 norms of five kernels each
plus three elementwise ops over [tokens, hidden]; here it reads x, dense and moe once and writes out once. Every
intermediate is rounded to the model dtype where the model rounds it (each norm's output, the sum, the residual
add, the product), so results match the eager layer up to the last bit of each norm's scale (see rms_norm.py).
`layer_scalar` is read on the device ([1] tensor): no host sync, CUDA-graph safe.

Options, all in the same launch:
- `next_weight`: also return `rms_norm(out, next_weight)`, the next layer's input_layernorm (or the final norm),
  saving that norm's re-read of `out`.
- `scalar2`, `split`: the folded pass (`Layer.forward_folded`), rows [..., T, D] where position t >= split along T
  takes `scalar2` instead of `layer_scalar`: its `torch.cat` of the two scaled halves without the copy.
- `moe_weights`, `dense_parts`: moe and dense as `moe(..., summed=False)` leaves them (the k routed rows per token
  and the router weights; the dense MLP's J fp32 parts), summed here by moe.py's own `sum_rows` and rounded once,
  so the result is bit for bit that of `moe(...)` then `ffn_tail(...)` without moe's k-sum launch (nor its two
  [tokens, hidden] outputs, written there and read back here).

Launch (`CUDA_LAUNCH`, by row count; `launch=` to force one): rows per program, warps, and `unroll`, how many of the
k routed rows (and J dense parts) are loaded at once (`sum_rows`' UNROLL: more registers, the same adds in the same
order). x is loaded first, so its load overlaps the sums and norms it is not needed for.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from dgemma.kernels.fmath import MODES, pdl, pdl_start, round_to
from dgemma.kernels.layer_norms import check_vectors
from dgemma.kernels.moe import sum_rows
from dgemma.kernels.rms_norm import as_rows, block_shape, normed_rows, pick_launch


class TailLaunch(NamedTuple):
    """ffn_tail's launch: rows per program (BLOCK_R), warps, and how many of the k routed rows (and of the J dense
    parts) are loaded together in the sums (0 or 1: one row at a time)."""
    rows: int
    warps: int
    unroll: int = 0


# Launch per (BLOCK_D, min rows) on CUDA; elsewhere, and for other widths, `block_shape`'s. Only BLOCK_R and unroll
# may change at BLOCK_D 4096: the row sums' layout (8 warps along the row) must stay (rms_norm.py).
# Measured on an H200 (benchmarks/results/session5/glue_1061586/glue.log, bits equal to the default's): 256 tokens
# 10.8 µs (default 11.1), 2,048 tokens 50.4 µs (default 65.0).
CUDA_LAUNCH: dict[int, dict[int, TailLaunch]] = {4096: {0: TailLaunch(2, 8, 2), 2048: TailLaunch(1, 8, 4)}}


@triton.jit
def _ffn_tail_kernel(x_ptr, d_ptr, m_ptr, rw_ptr, w1_ptr, w2_ptr, w_ptr, s_ptr, s2_ptr, wn_ptr, out_ptr, next_ptr,
                     R, D, T, split, eps, stride_x, stride_d, stride_m, stride_rw, stride_o,
                     MODE: tl.constexpr, TOP_K: tl.constexpr, DENSE_J: tl.constexpr, GPU: tl.constexpr,
                     HAS_SPLIT: tl.constexpr, HAS_NEXT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                     UNROLL_K: tl.constexpr, UNROLL_J: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < R)[:, None] & (cols < D)[None, :]
    r2, c2 = rows[:, None], cols[None, :]
    cmask = cols < D
    # x first: its load is in flight while the sums and three norms below run (issued after them, it waited alone)
    x = tl.load(x_ptr + r2 * stride_x + c2, mask=mask, other=0.0)
    if DENSE_J > 0:  # the J fp32 parts, summed and rounded once (moe.py's k-sum launch)
        dense = round_to(sum_rows(d_ptr, d_ptr, rows, cols, R, D, stride_d, 0, DENSE_J, False, GPU, UNROLL_J), MODE)
    else:
        dense = tl.load(d_ptr + r2 * stride_d + c2, mask=mask, other=0.0).to(tl.float32)
    if TOP_K > 0:  # Σ_j w_j · y_j over the k routed rows, rounded once
        moe = round_to(sum_rows(m_ptr, rw_ptr, rows, cols, R, D, stride_m, stride_rw, TOP_K, True, GPU, UNROLL_K), MODE)
    else:
        moe = tl.load(m_ptr + r2 * stride_m + c2, mask=mask, other=0.0).to(tl.float32)
    w1 = tl.load(w1_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    w2 = tl.load(w2_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    h = round_to(round_to(normed_rows(dense, w1, D, eps, True), MODE)
                 + round_to(normed_rows(moe, w2, D, eps, True), MODE), MODE)  # dense + moe
    x = round_to(x.to(tl.float32) + round_to(normed_rows(h, w, D, eps, True), MODE), MODE)
    s = tl.zeros([BLOCK_R], tl.float32) + tl.load(s_ptr).to(tl.float32)  # one scalar per row
    if HAS_SPLIT:  # rows are [..., T, D] flattened: position rows % T
        s = tl.where(rows % T >= split, tl.load(s2_ptr).to(tl.float32), s)
    out = round_to(x * s[:, None], MODE)
    tl.store(out_ptr + r2 * stride_o + c2, out.to(out_ptr.dtype.element_ty), mask=mask)
    if HAS_NEXT:
        wn = tl.load(wn_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        h_next = round_to(normed_rows(out, wn, D, eps, True), MODE)
        tl.store(next_ptr + r2 * stride_o + c2, h_next.to(next_ptr.dtype.element_ty), mask=mask)


def ffn_tail(x: torch.Tensor, dense: torch.Tensor, moe: torch.Tensor, w_dense: torch.Tensor, w_moe: torch.Tensor,
             w_out: torch.Tensor, layer_scalar: torch.Tensor, eps: float, *, moe_weights: torch.Tensor | None = None,
             dense_parts: bool = False, next_weight: torch.Tensor | None = None, scalar2: torch.Tensor | None = None,
             split: int | None = None, launch: TailLaunch | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(x + N(N1(dense) + N2(moe))) * layer_scalar. x, dense, moe: [..., D] in one dtype; w_*: [D];
    layer_scalar: a 1-element tensor. With `next_weight` [D]: (out, rms_norm(out, next_weight, eps)). With
    `scalar2` (1-element tensor) and `split` (int in [0, T]): rows at position t >= split along x.shape[-2] = T
    use scalar2 instead of layer_scalar. Unsummed, as `moe(..., summed=False)` returns them (R = x's rows): with
    `moe_weights` [R, k] (fp32), moe is the routed rows [R, k, D] in x's dtype and stands for Σ_j w_j · moe[:, j];
    with `dense_parts`, dense is [R, J, D] fp32 and stands for Σ_j dense[:, j]; each sum rounded once. `launch`
    (a TailLaunch): force rows per program, warps and unroll (benchmarks, tests) instead of `CUDA_LAUNCH`'s."""
    D = x.shape[-1]
    if x.dtype not in MODES or moe.dtype != x.dtype or dense.dtype != (torch.float32 if dense_parts else x.dtype):
        raise ValueError("ffn_tail: x, dense and moe must share one of fp32, bf16, fp16 (dense_parts: fp32)")
    if (not dense_parts and dense.shape != x.shape) or (moe_weights is None and moe.shape != x.shape):
        raise ValueError(f"ffn_tail: x {tuple(x.shape)}, dense {tuple(dense.shape)} and moe {tuple(moe.shape)} "
                         "differ in shape")
    check_vectors("ffn_tail", D, w_dense=w_dense, w_moe=w_moe, w_out=w_out,
                  **({} if next_weight is None else {"next_weight": next_weight}))
    if layer_scalar.numel() != 1:
        raise ValueError("ffn_tail: layer_scalar must have one element")
    T = check_split(x, scalar2, split)
    xr = as_rows(x, D)
    R = xr.shape[0]
    dr = unsummed_rows("dense", dense, R, D) if dense_parts else as_rows(dense, D)
    mr = unsummed_rows("moe", moe, R, D) if moe_weights is not None else as_rows(moe, D)
    if moe_weights is not None and moe_weights.shape != (R, mr.shape[1]):
        raise ValueError(f"ffn_tail: moe_weights must be [{R}, {mr.shape[1]}], got {tuple(moe_weights.shape)}")
    rw = moe_weights.float().contiguous() if moe_weights is not None else mr
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h_next = torch.empty_like(out) if next_weight is not None else None
    result = out if h_next is None else (out, h_next)
    o = out.view(-1, D)
    if R == 0:
        return result
    block_r, block_d, warps = block_shape(D)
    launch = pick_launch("ffn_tail", CUDA_LAUNCH, block_d, R, TailLaunch(block_r, warps), x.is_cuda, launch)
    launch = TailLaunch(*launch)  # a plain (rows, warps) Launch passed in: no unroll
    block_r, warps = launch.rows, launch.warps
    k, j = mr.shape[1] if moe_weights is not None else 0, dr.shape[1] if dense_parts else 0
    _ffn_tail_kernel[(triton.cdiv(R, block_r),)](
        xr, dr, mr, rw, w_dense, w_moe, w_out, layer_scalar, layer_scalar if scalar2 is None else scalar2,
        w_out if next_weight is None else next_weight, o, o if h_next is None else h_next.view(-1, D),
        R, D, T, 0 if split is None else split, eps, xr.stride(0), dr.stride(0), mr.stride(0), rw.stride(0),
        o.stride(0), MODE=MODES[x.dtype], TOP_K=k, DENSE_J=j, GPU=x.is_cuda, HAS_SPLIT=split is not None,
        HAS_NEXT=next_weight is not None, BLOCK_R=block_r, BLOCK_D=block_d, UNROLL_K=unroll_for(k, launch.unroll),
        UNROLL_J=unroll_for(j, launch.unroll), num_warps=warps, **pdl(x.device))
    return result


def unroll_for(count: int, unroll: int) -> int:
    """The largest divisor of count up to `unroll` (at least 1), so the unrolled sum covers count exactly."""
    return max([1] + [u for u in range(1, min(unroll, count) + 1) if count % u == 0])


def unsummed_rows(name: str, t: torch.Tensor, R: int, D: int) -> torch.Tensor:
    """An unsummed input [R, n, D] with each row's n·D values contiguous, as `sum_rows` reads them."""
    if t.dim() != 3 or t.shape[0] != R or t.shape[2] != D:
        raise ValueError(f"ffn_tail: unsummed {name} must be [{R}, n, {D}], got {tuple(t.shape)}")
    return t if t.stride(2) == 1 and t.stride(1) == D else t.contiguous()


def check_split(x: torch.Tensor, scalar2: torch.Tensor | None, split: int | None) -> int:
    """T (x.shape[-2], or 1 without a split) after checking that scalar2 and split come together and fit."""
    if (scalar2 is None) != (split is None):
        raise ValueError("ffn_tail: scalar2 and split go together")
    if split is None:
        return 1
    if scalar2.numel() != 1:
        raise ValueError("ffn_tail: scalar2 must have one element")
    if x.dim() < 2:
        raise ValueError(f"ffn_tail: a split needs rows [..., T, D], got {tuple(x.shape)}")
    T = x.shape[-2]
    if not isinstance(split, int) or not 0 <= split <= T:
        raise ValueError(f"ffn_tail: split must be an int in [0, {T}], got {split!r}")
    return T


def reference_ffn_tail(x, dense, moe, w_dense, w_moe, w_out, layer_scalar, eps, *, moe_weights=None,
                       dense_parts=False, next_weight=None, scalar2=None, split=None):
    """The eager layer's math, op for op (`Layer.forward`; with a split, `Layer.forward_folded`'s cat; unsummed
    inputs summed as `Experts.forward` sums its weighted rows)."""
    from dgemma.models.diffusion_gemma import rms_norm

    if moe_weights is not None:
        moe = (moe.float() * moe_weights[..., None]).sum(dim=1).to(x.dtype).view_as(x)
    if dense_parts:
        dense = dense.sum(dim=1).to(x.dtype).view_as(x)
    h = rms_norm(dense, w_dense, eps) + rms_norm(moe, w_moe, eps)
    x = x + rms_norm(h, w_out, eps)
    if split is None:
        out = x * layer_scalar
    else:
        out = torch.cat([x[..., :split, :] * layer_scalar, x[..., split:, :] * scalar2], dim=-2)
    return out if next_weight is None else (out, rms_norm(out, next_weight, eps))

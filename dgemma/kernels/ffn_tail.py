"""The end of a Gemma 4 layer in one pass: the feed-forward norms, the residual add and the layer scalar.

    out = (x + N(N1(dense) + N2(moe))) * layer_scalar
with N1 = post_feedforward_layernorm_1, N2 = post_feedforward_layernorm_2, N = post_feedforward_layernorm
(models/diffusion_gemma.py `Layer.feed_forward` and `Layer.forward`). Eager, this is 3 norms of five kernels each
plus three elementwise ops over [tokens, hidden]; here it reads x, dense and moe once and writes out once. Every
intermediate is rounded to the model dtype where the model rounds it (each norm's output, the sum, the residual
add, the product), so results match the eager layer up to the last bit of each norm's scale (see rms_norm.py).
`layer_scalar` is read on the device ([1] tensor): no host sync, CUDA-graph safe.

Options, both in the same launch:
- `next_weight`: also return `rms_norm(out, next_weight)`, the next layer's input_layernorm (or the final norm),
  saving that norm's re-read of `out`.
- `scalar2`, `split`: the folded pass (`Layer.forward_folded`), rows [..., T, D] where position t >= split along T
  takes `scalar2` instead of `layer_scalar`: its `torch.cat` of the two scaled halves without the copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dgemma.kernels.fmath import MODES, round_to
from dgemma.kernels.layer_norms import check_vectors
from dgemma.kernels.rms_norm import as_rows, block_shape, normed_rows


@triton.jit
def _ffn_tail_kernel(x_ptr, d_ptr, m_ptr, w1_ptr, w2_ptr, w_ptr, s_ptr, s2_ptr, wn_ptr, out_ptr, next_ptr,
                     R, D, T, split, eps, stride_x, stride_d, stride_m, stride_o,
                     MODE: tl.constexpr, HAS_SPLIT: tl.constexpr, HAS_NEXT: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < R)[:, None] & (cols < D)[None, :]
    r2, c2 = rows[:, None], cols[None, :]
    cmask = cols < D
    dense = tl.load(d_ptr + r2 * stride_d + c2, mask=mask, other=0.0).to(tl.float32)
    moe = tl.load(m_ptr + r2 * stride_m + c2, mask=mask, other=0.0).to(tl.float32)
    w1 = tl.load(w1_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    w2 = tl.load(w2_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    h = round_to(round_to(normed_rows(dense, w1, D, eps, True), MODE)
                 + round_to(normed_rows(moe, w2, D, eps, True), MODE), MODE)  # dense + moe
    x = tl.load(x_ptr + r2 * stride_x + c2, mask=mask, other=0.0).to(tl.float32)
    x = round_to(x + round_to(normed_rows(h, w, D, eps, True), MODE), MODE)
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
             w_out: torch.Tensor, layer_scalar: torch.Tensor, eps: float, *, next_weight: torch.Tensor | None = None,
             scalar2: torch.Tensor | None = None, split: int | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(x + N(N1(dense) + N2(moe))) * layer_scalar. x, dense, moe: [..., D] in one dtype; w_*: [D];
    layer_scalar: a 1-element tensor. With `next_weight` [D]: (out, rms_norm(out, next_weight, eps)). With
    `scalar2` (1-element tensor) and `split` (int in [0, T]): rows at position t >= split along x.shape[-2] = T
    use scalar2 instead of layer_scalar."""
    D = x.shape[-1]
    if x.dtype not in MODES or dense.dtype != x.dtype or moe.dtype != x.dtype:
        raise ValueError("ffn_tail: x, dense and moe must share one of fp32, bf16, fp16")
    if dense.shape != x.shape or moe.shape != x.shape:
        raise ValueError(f"ffn_tail: x {tuple(x.shape)}, dense {tuple(dense.shape)} and moe {tuple(moe.shape)} "
                         "differ in shape")
    check_vectors("ffn_tail", D, w_dense=w_dense, w_moe=w_moe, w_out=w_out,
                  **({} if next_weight is None else {"next_weight": next_weight}))
    if layer_scalar.numel() != 1:
        raise ValueError("ffn_tail: layer_scalar must have one element")
    T = check_split(x, scalar2, split)
    xr, dr, mr = as_rows(x, D), as_rows(dense, D), as_rows(moe, D)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h_next = torch.empty_like(out) if next_weight is not None else None
    result = out if h_next is None else (out, h_next)
    o = out.view(-1, D)
    R = xr.shape[0]
    if R == 0:
        return result
    block_r, block_d, warps = block_shape(D)
    _ffn_tail_kernel[(triton.cdiv(R, block_r),)](
        xr, dr, mr, w_dense, w_moe, w_out, layer_scalar, layer_scalar if scalar2 is None else scalar2,
        w_out if next_weight is None else next_weight, o, o if h_next is None else h_next.view(-1, D),
        R, D, T, 0 if split is None else split, eps, xr.stride(0), dr.stride(0), mr.stride(0), o.stride(0),
        MODE=MODES[x.dtype], HAS_SPLIT=split is not None, HAS_NEXT=next_weight is not None,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)
    return result


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


def reference_ffn_tail(x, dense, moe, w_dense, w_moe, w_out, layer_scalar, eps, *, next_weight=None, scalar2=None,
                       split=None):
    """The eager layer's math, op for op (`Layer.forward`; with a split, `Layer.forward_folded`'s cat)."""
    from dgemma.models.diffusion_gemma import rms_norm

    h = rms_norm(dense, w_dense, eps) + rms_norm(moe, w_moe, eps)
    x = x + rms_norm(h, w_out, eps)
    if split is None:
        out = x * layer_scalar
    else:
        out = torch.cat([x[..., :split, :] * layer_scalar, x[..., split:, :] * scalar2], dim=-2)
    return out if next_weight is None else (out, rms_norm(out, next_weight, eps))

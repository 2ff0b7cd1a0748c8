"""The end of a Gemma 4 layer in one pass: the feed-forward norms, the residual add and the layer scalar.

    out = (x + N(N1(dense) + N2(moe))) * layer_scalar
with N1 = post_feedforward_layernorm_1, N2 = post_feedforward_layernorm_2, N = post_feedforward_layernorm
(models/diffusion_gemma.py `Layer.feed_forward` and `Layer.forward`). Eager, this is 3 norms of five kernels each
plus three elementwise ops over [tokens, hidden]; here it reads x, dense and moe once and writes out once. Every
intermediate is rounded to the model dtype where the model rounds it (each norm's output, the sum, the residual
add, the product), so results match the eager layer up to the last bit of each norm's scale (see rms_norm.py).
`layer_scalar` is read on the device ([1] tensor): no host sync, CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dgemma.kernels.fmath import MODES, round_to
from dgemma.kernels.rms_norm import as_rows, block_shape, normed_rows


@triton.jit
def _ffn_tail_kernel(x_ptr, d_ptr, m_ptr, w1_ptr, w2_ptr, w_ptr, s_ptr, out_ptr, R, D, eps,
                     stride_x, stride_d, stride_m, stride_o,
                     MODE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
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
    out = round_to(x * tl.load(s_ptr).to(tl.float32), MODE)
    tl.store(out_ptr + r2 * stride_o + c2, out.to(out_ptr.dtype.element_ty), mask=mask)


def ffn_tail(x: torch.Tensor, dense: torch.Tensor, moe: torch.Tensor, w_dense: torch.Tensor, w_moe: torch.Tensor,
             w_out: torch.Tensor, layer_scalar: torch.Tensor, eps: float) -> torch.Tensor:
    """(x + N(N1(dense) + N2(moe))) * layer_scalar. x, dense, moe: [..., D] in one dtype; w_*: [D];
    layer_scalar: a 1-element tensor."""
    D = x.shape[-1]
    if x.dtype not in MODES or dense.dtype != x.dtype or moe.dtype != x.dtype:
        raise ValueError("ffn_tail: x, dense and moe must share one of fp32, bf16, fp16")
    if dense.shape != x.shape or moe.shape != x.shape or any(w.shape != (D,) for w in (w_dense, w_moe, w_out)):
        raise ValueError("ffn_tail: shapes do not match")
    if layer_scalar.numel() != 1:
        raise ValueError("ffn_tail: layer_scalar must have one element")
    xr, dr, mr = as_rows(x, D), as_rows(dense, D), as_rows(moe, D)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o = out.view(-1, D)
    R = xr.shape[0]
    if R == 0:
        return out
    block_r, block_d, warps = block_shape(D)
    _ffn_tail_kernel[(triton.cdiv(R, block_r),)](
        xr, dr, mr, w_dense, w_moe, w_out, layer_scalar, o, R, D, eps,
        xr.stride(0), dr.stride(0), mr.stride(0), o.stride(0),
        MODE=MODES[x.dtype], BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)
    return out


def reference_ffn_tail(x, dense, moe, w_dense, w_moe, w_out, layer_scalar, eps) -> torch.Tensor:
    """The eager layer's math, op for op."""
    from dgemma.models.diffusion_gemma import rms_norm

    h = rms_norm(dense, w_dense, eps) + rms_norm(moe, w_moe, eps)
    return (x + rms_norm(h, w_out, eps)) * layer_scalar

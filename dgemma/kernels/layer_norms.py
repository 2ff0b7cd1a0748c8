"""The glue between a Gemma 4 layer's attention and its feed-forward in one pass: `attn_residual`.

After o_proj's output `o`, `Layer.forward` / `Layer._feed_forward` (models/diffusion_gemma.py) compute
    x_new    = x + post_attention_layernorm(o)
    h_dense  = pre_feedforward_layernorm(x_new)            (the dense MLP's input)
    h_moe    = pre_feedforward_layernorm_2(x_new)          (the experts' input)
    h_router = router.norm(x_new) * router.scale * root    (the router reads the residual; root = hidden^-0.5)
Eager, that is four norms of five kernels each plus four elementwise ops; here one launch reads o and x once and
writes the four tensors. Every value is rounded to the model dtype where torch rounds it: each norm's output, the
residual add, and both router products (`root` is a Python float, which torch multiplies in fp32 as here). The
three norms of x_new share one fp32 scale, as the eager norms compute the same one three times. Results match the
eager ops up to the last bit of each norm's scale (1/sqrt against pow(·, -0.5): see rms_norm.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dgemma.kernels.fmath import MODES, pdl, pdl_start, round_to
from dgemma.kernels.rms_norm import Launch, as_rows, block_shape, normed_rows, pick_launch

# Launch per (BLOCK_D, min rows) on CUDA; elsewhere, and for other widths, `block_shape`'s. Only the rows per program
# may change at BLOCK_D 4096: the row sums' layout (8 warps along the row) must stay (rms_norm.py).
# (H200, benchmarks/results/session5/glue_1061586/glue.log, same bits: 23.6 instead of 24.8 µs at 2,048 tokens.)
CUDA_LAUNCH: dict[int, dict[int, Launch]] = {4096: {0: Launch(1, 8), 2048: Launch(2, 8)}}


@triton.jit
def _attn_residual_kernel(o_ptr, x_ptr, wa_ptr, wd_ptr, wm_ptr, sc_ptr, xo_ptr, hd_ptr, hm_ptr, hr_ptr,
                          R, D, eps, root, stride_o, stride_x, stride_out,
                          MODE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < R)[:, None] & (cols < D)[None, :]
    r2, c2 = rows[:, None], cols[None, :]
    cmask = cols < D
    o = tl.load(o_ptr + r2 * stride_o + c2, mask=mask, other=0.0).to(tl.float32)
    w_attn = tl.load(wa_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + r2 * stride_x + c2, mask=mask, other=0.0).to(tl.float32)
    x = round_to(x + round_to(normed_rows(o, w_attn, D, eps, True), MODE), MODE)
    n = normed_rows(x, w_attn, D, eps, False)  # x_new * its fp32 scale, shared by the three norms below
    w_dense = tl.load(wd_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    w_moe = tl.load(wm_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    scale = tl.load(sc_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    h_router = round_to(round_to(round_to(n, MODE) * scale[None, :], MODE) * root, MODE)
    out = r2 * stride_out + c2
    tl.store(xo_ptr + out, x.to(xo_ptr.dtype.element_ty), mask=mask)
    tl.store(hd_ptr + out, round_to(n * w_dense[None, :], MODE).to(hd_ptr.dtype.element_ty), mask=mask)
    tl.store(hm_ptr + out, round_to(n * w_moe[None, :], MODE).to(hm_ptr.dtype.element_ty), mask=mask)
    tl.store(hr_ptr + out, h_router.to(hr_ptr.dtype.element_ty), mask=mask)


def check_vectors(name: str, D: int, **vectors: torch.Tensor) -> None:
    """Per-channel weights must be [D] with unit stride (the kernels index them by column)."""
    for arg, w in vectors.items():
        if w.shape != (D,) or w.stride(0) != 1:
            raise ValueError(f"{name}: {arg} must be a contiguous [{D}] tensor, got {tuple(w.shape)} "
                             f"with strides {w.stride()}")


def attn_residual(o: torch.Tensor, x: torch.Tensor, w_post_attn: torch.Tensor, w_pre_ff: torch.Tensor,
                  w_pre_ff2: torch.Tensor, router_scale: torch.Tensor, router_root: float, eps: float, *,
                  launch: Launch | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_new, h_dense, h_moe, h_router), each of x's shape and dtype. o, x: [..., D] in one of fp32, bf16, fp16
    (rows may be strided, last-dim stride 1); w_*: [D]; router_scale: [D] in x's dtype (as loaded). `launch`:
    force the rows per program and warps (benchmarks, tests) instead of `CUDA_LAUNCH`'s."""
    D = x.shape[-1]
    if x.dtype not in MODES or o.dtype != x.dtype:
        raise ValueError(f"attn_residual: o ({o.dtype}) and x ({x.dtype}) must share one of fp32, bf16, fp16")
    if o.shape != x.shape:
        raise ValueError(f"attn_residual: o {tuple(o.shape)} and x {tuple(x.shape)} differ in shape")
    check_vectors("attn_residual", D, w_post_attn=w_post_attn, w_pre_ff=w_pre_ff, w_pre_ff2=w_pre_ff2,
                  router_scale=router_scale)
    if router_scale.dtype != x.dtype:  # the model multiplies in x's dtype; another dtype would promote
        raise ValueError(f"attn_residual: router_scale is {router_scale.dtype}, x is {x.dtype}")
    orows, xr = as_rows(o, D), as_rows(x, D)
    outs = tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for _ in range(4))
    R = xr.shape[0]
    if R == 0:
        return outs
    x_new, h_dense, h_moe, h_router = (t.view(-1, D) for t in outs)
    block_r, block_d, warps = block_shape(D)
    block_r, warps = pick_launch("attn_residual", CUDA_LAUNCH, block_d, R, Launch(block_r, warps), x.is_cuda, launch)
    _attn_residual_kernel[(triton.cdiv(R, block_r),)](
        orows, xr, w_post_attn, w_pre_ff, w_pre_ff2, router_scale, x_new, h_dense, h_moe, h_router,
        R, D, eps, float(router_root), orows.stride(0), xr.stride(0), x_new.stride(0),
        MODE=MODES[x.dtype], BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps, **pdl(x.device))
    return outs


def reference_attn_residual(o, x, w_post_attn, w_pre_ff, w_pre_ff2, router_scale, router_root, eps):
    """The eager layer's math, op for op (`Layer.forward`, `Layer._feed_forward`, `Router.forward`)."""
    from dgemma.models.diffusion_gemma import rms_norm

    x = x + rms_norm(o, w_post_attn, eps)
    h_router = rms_norm(x, None, eps) * router_scale * router_root
    return x, rms_norm(x, w_pre_ff, eps), rms_norm(x, w_pre_ff2, eps), h_router

"""Fused Gemma RMSNorm: one read and one write per row instead of the five passes of the eager form.

`rms_norm(x, weight, eps, residual=None)` computes, per row of the last dim,
    y = x * (mean(x²) + eps)^-0.5 * weight      (fp32, no `1 + w`: Gemma 4)
rounded to x's dtype, then optionally `residual + y` rounded again: exactly the model's
`residual + RMSNorm(x)` (post-attention norm + residual add), including both roundings. The weight may be None
(v_norm, the router's and self-conditioning's weightless norms).

Rows of short dims (q/k norms: 256 or 512) are packed BLOCK_R to a program. `(...)^-0.5` is 1 / sqrt with IEEE
rounding (the reference uses pow); the two can differ in the last fp32 bit, so bf16 outputs may differ by one
unit in the last place, rarely.

Launch shapes (`Launch`, `launch_for`): the row kernels in layer_norms.py, ffn_tail.py and qkv_prep.py take their
rows per program and warps from a per-module table keyed by row count (`CUDA_LAUNCH`), so a measured shape can be
pinned per token count without touching the math. The row sum in `normed_rows` is a `tl.sum` whose fp32 order
follows the tile's layout along the row (elements per thread, lanes, then warps; products fused into fmas), so a
table entry may only change what leaves that layout alone: more or fewer rows per program at the same warps, or
warps that land on the row dimension. scripts/gpu_glue_bench.py checks each candidate's bits against the default.
"""

from __future__ import annotations

from typing import NamedTuple, TypeVar

import torch
import triton
import triton.language as tl

from dgemma.kernels.fmath import MODES, pdl, pdl_start, round_to


@triton.jit
def normed_rows(x, w, D, eps, HAS_WEIGHT: tl.constexpr):
    """x [BLOCK_R, BLOCK_D] fp32 (zeros past D), w [BLOCK_D] fp32 → RMS-normed rows, fp32, not rounded."""
    ms = tl.sum(x * x, 1) / D
    y = x * tl.math.div_rn(1.0, tl.sqrt_rn(ms + eps))[:, None]
    if HAS_WEIGHT:
        y = y * w[None, :]
    return y


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, res_ptr, out_ptr, R, D, eps, stride_x, stride_r, stride_o,
                     HAS_WEIGHT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, MODE: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < R)[:, None] & (cols < D)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32) if HAS_WEIGHT else cols
    y = round_to(normed_rows(x, w, D, eps, HAS_WEIGHT), MODE)  # RMSNorm returns x's dtype
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = round_to(res + y, MODE)
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def block_shape(D: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps) for rows of length D: ~4K elements per program."""
    block_d = triton.next_power_of_2(D)
    return max(1, 4096 // block_d), block_d, 8 if block_d >= 2048 else 4


class Launch(NamedTuple):
    """One row kernel's launch: rows per program (BLOCK_R) and warps."""
    rows: int
    warps: int


L = TypeVar("L", bound=tuple)


def launch_for(table: dict[int, dict[int, L]], width: int, R: int, default: L) -> L:
    """The launch for R rows of `width` (the kernel's row block: BLOCK_D, or the head dim) from `table`
    {width: {min rows: Launch}}: the entry with the largest min rows <= R; `default` where the width has none."""
    by_rows = table.get(width)
    if not by_rows or R < min(by_rows):
        return default
    return by_rows[max(k for k in by_rows if k <= R)]


def pick_launch(name: str, table: dict[int, dict[int, L]], width: int, R: int, default: L, cuda: bool,
                launch: L | None = None) -> L:
    """The launch a row kernel runs over R rows: `launch` if the caller forces one (benchmarks, tests; checked), else
    on CUDA `table`'s entry (`launch_for`), else `default` (`block_shape`'s)."""
    if launch is None:
        launch = launch_for(table, width, R, default) if cuda else default
    checked_launch(name, launch)
    return launch


def checked_launch(name: str, launch: tuple) -> Launch:
    """(rows, warps) of a launch passed by a caller (benchmarks, tests): powers of two, at most 32 warps."""
    rows, warps = launch[:2]
    if rows < 1 or rows & (rows - 1) or warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"{name}: launch rows must be a power of two and warps one of 1..32, got {launch}")
    return Launch(rows, warps)


def as_rows(t: torch.Tensor, D: int) -> torch.Tensor:
    rows = t.reshape(-1, D)
    return rows if rows.stride(1) == 1 else rows.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """[residual +] RMSNorm(x) * weight over the last dim, in x's dtype (fp32, bf16 or fp16), rounded as the
    model rounds. weight: [D] or None; residual: x's shape and dtype or None."""
    if x.dtype not in MODES:
        raise ValueError(f"rms_norm: unsupported dtype {x.dtype}")
    D = x.shape[-1]
    if weight is not None and weight.shape != (D,):
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match the last dim {D}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError("rms_norm: residual must have x's shape and dtype")
    xr = as_rows(x, D)
    res = as_rows(residual, D) if residual is not None else xr
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o = out.view(-1, D)
    R = xr.shape[0]
    if R == 0:
        return out
    block_r, block_d, warps = block_shape(D)
    _rms_norm_kernel[(triton.cdiv(R, block_r),)](
        xr, weight if weight is not None else xr, res, o, R, D, eps, xr.stride(0), res.stride(0), o.stride(0),
        HAS_WEIGHT=weight is not None, HAS_RESIDUAL=residual is not None, MODE=MODES[x.dtype],
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps, **pdl(x.device))
    return out


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                       residual: torch.Tensor | None = None) -> torch.Tensor:
    """The model's math: `residual + RMSNorm(x)` (models/diffusion_gemma.py `rms_norm`)."""
    from dgemma.models.diffusion_gemma import rms_norm as model_rms_norm

    y = model_rms_norm(x, weight, eps)
    return y if residual is None else residual + y

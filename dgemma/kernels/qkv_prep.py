"""Everything between the stacked q/k/v GEMM and attention, in one launch.

`qkv_prep(qkv, cos, sin, q_weight, k_weight, eps, n_heads, n_kv)` takes the stacked projection's output
`qkv` [B, T, (H + Hkv [+ Hkv]) * D] and computes, as `Attention._project` (models/diffusion_gemma.py) does after its
GEMM,
    q = rope(q_norm(q_raw))     k = rope(k_norm(k_raw))     v = v_norm(v_raw)   (v_norm has no weight)
with v_raw = k_raw on full layers (K=V: no v part, V is k_proj's output before k_norm and RoPE). Eager, that is
three RMSNorms of five kernels each, two RoPEs of six, and the copies that lay q/k/v out head-major; here each
head's row is read once and written once, straight into its destination: q into [B, T, H, D] (returned as the
[B, H, T, D] transpose `canvas_attention` takes), k and v into `k_out` / `v_out` when given (e.g. the KV cache's
slots `cache.k[layer][:, :, cap:cap + T]`), else into fresh [B, Hkv, T, D] tensors.

Notable choices:
- Grid (row blocks of B·T, head slots): slots 0..H-1 are q heads, then Hkv k heads, then Hkv v heads, so one
  launch covers all three; a program holds BLOCK_R rows of one head (`CUDA_LAUNCH` by head dim and row count,
  `launch=` to force one; rms_norm.py's ~4K elements by default).
- A head's row is held as its two halves, so rotate_half(x) = (-x2, x1) costs no data movement and any even D
  works (the tiny test models have D = 10, 24, ...). The norm is `normed_rows`'s math (rms_norm.py) summed over the
  two halves: IEEE 1/sqrt of the fp32 mean square, which may differ from the model's pow(·, -0.5) in the last fp32
  bit, so a bf16 output is, rarely, one unit in the last place off.
- Every other rounding is the eager ops': the norm's output to the model dtype, then x·cos, rot·sin and their sum
  each rounded (`round_to`, exact on GPU and in the interpreter alike).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dgemma.kernels.fmath import MODES, pdl, pdl_start, round_to
from dgemma.kernels.rms_norm import Launch, block_shape, pick_launch

# Launch per (head dim D, min rows B·T) on CUDA; elsewhere, and for other head dims, `block_shape`'s. A row's half
# (D/2 = 128 or 256) fills whole lanes of one warp, so rows per program and warps only move rows between registers,
# lanes and warps, never a row's sum (rms_norm.py), as long as a thread keeps 8 contiguous columns:
# rows · D/2 >= 8 · 32 · warps.
CUDA_LAUNCH: dict[int, dict[int, Launch]] = {256: {0: Launch(16, 4)}, 512: {0: Launch(8, 4)}}


@triton.jit
def _normed_halves(x1, x2, w1, w2, D, eps, HAS_WEIGHT: tl.constexpr, MODE: tl.constexpr):
    """RMSNorm of rows held as halves x1, x2 [BLOCK_R, BLOCK_H] fp32 (zeros past D/2), rounded to MODE."""
    ms = (tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / D
    scale = tl.math.div_rn(1.0, tl.sqrt_rn(ms + eps))[:, None]  # as normed_rows
    y1, y2 = x1 * scale, x2 * scale
    if HAS_WEIGHT:
        y1, y2 = y1 * w1[None, :], y2 * w2[None, :]
    return round_to(y1, MODE), round_to(y2, MODE)


@triton.jit
def _qkv_prep_kernel(x_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, q_ptr, k_ptr, v_ptr, R, T, H, HKV, V_COL, eps,
                     sxb, sxt, scb, sct, ssb, sst, sqb, sqt, sqh, skb, skh, skt, svb, svh, svt,
                     D: tl.constexpr, MODE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
                     PDL: tl.constexpr = False):
    pdl_start(PDL)
    HALF: tl.constexpr = D // 2
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    slot = tl.program_id(1)  # H q heads, Hkv k heads, Hkv v heads
    b, t = rows // T, rows % T
    cols = tl.arange(0, BLOCK_H)
    mask = (rows < R)[:, None] & (cols < HALF)[None, :]
    cmask = cols < HALF
    # q and k heads lie in stacking order; v head j at V_COL + j·D (V_COL = H·D on K=V layers: k_proj's heads)
    col = tl.where(slot < H + HKV, slot * D, V_COL + (slot - H - HKV) * D)
    src = x_ptr + (b * sxb + t * sxt)[:, None] + col + cols[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    if slot < H + HKV:  # q or k: weighted RMSNorm, then RoPE
        if slot < H:
            w1 = tl.load(qw_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            w2 = tl.load(qw_ptr + HALF + cols, mask=cmask, other=0.0).to(tl.float32)
            dst = q_ptr + b * sqb + t * sqt + slot * sqh
        else:
            w1 = tl.load(kw_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            w2 = tl.load(kw_ptr + HALF + cols, mask=cmask, other=0.0).to(tl.float32)
            dst = k_ptr + b * skb + (slot - H) * skh + t * skt
        y1, y2 = _normed_halves(x1, x2, w1, w2, D, eps, True, MODE)
        c = cos_ptr + (b * scb + t * sct)[:, None] + cols[None, :]
        s = sin_ptr + (b * ssb + t * sst)[:, None] + cols[None, :]
        c1 = tl.load(c, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(c + HALF, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(s, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(s + HALF, mask=mask, other=0.0).to(tl.float32)
        # x·cos + rotate_half(x)·sin with rotate_half(x) = (-x2, x1); each product and the sum rounded, as eager
        o1 = round_to(round_to(y1 * c1, MODE) - round_to(y2 * s1, MODE), MODE)
        o2 = round_to(round_to(y2 * c2, MODE) + round_to(y1 * s2, MODE), MODE)
    else:  # v: weightless RMSNorm, no RoPE
        o1, o2 = _normed_halves(x1, x2, x1, x2, D, eps, False, MODE)
        dst = v_ptr + b * svb + (slot - H - HKV) * svh + t * svt
    dst = dst[:, None] + cols[None, :]
    tl.store(dst, o1.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, o2.to(q_ptr.dtype.element_ty), mask=mask)


def _head_dim(qkv, cos, sin, q_weight, k_weight, n_heads: int, n_kv: int) -> tuple[int, bool]:
    """Check the inputs; return (D, whether qkv has a v part)."""
    if qkv.dtype not in MODES or cos.dtype != qkv.dtype or sin.dtype != qkv.dtype:
        raise ValueError(f"qkv_prep: qkv, cos and sin must share one of fp32, bf16, fp16; got {qkv.dtype}, "
                         f"{cos.dtype}, {sin.dtype}")
    if q_weight.dim() != 1 or q_weight.shape[0] % 2:
        raise ValueError(f"qkv_prep: q_weight must be [D] with D even; got {tuple(q_weight.shape)}")
    D = q_weight.shape[0]
    if k_weight.shape != (D,):
        raise ValueError(f"qkv_prep: k_weight {tuple(k_weight.shape)} does not match q_weight [{D}]")
    if qkv.dim() != 3 or qkv.stride(-1) != 1:
        raise ValueError(f"qkv_prep: qkv must be [B, T, W] with unit last stride; got {tuple(qkv.shape)}")
    B, T, W = qkv.shape
    if n_heads < 1 or n_kv < 1 or W not in ((n_heads + n_kv) * D, (n_heads + 2 * n_kv) * D):
        raise ValueError(f"qkv_prep: last dim {W} is neither (H + Hkv) * D nor (H + 2 Hkv) * D for H = {n_heads}, "
                         f"Hkv = {n_kv}, D = {D}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, B) or t.shape[1:] != (T, D) or t.stride(-1) != 1:
            raise ValueError(f"qkv_prep: {name} must be [1 or {B}, {T}, {D}] with unit last stride; "
                             f"got {tuple(t.shape)}")
    return D, W == (n_heads + 2 * n_kv) * D


def _destination(out: torch.Tensor | None, name: str, qkv: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=qkv.dtype, device=qkv.device)
    if out.shape != shape or out.dtype != qkv.dtype or out.device != qkv.device or out.stride(-1) != 1:
        raise ValueError(f"qkv_prep: {name} must be {list(shape)} {qkv.dtype} on {qkv.device} with unit last "
                         f"stride; got {tuple(out.shape)} {out.dtype} on {out.device}")
    return out


def _batch_stride(t: torch.Tensor) -> int:
    return t.stride(0) if t.shape[0] > 1 else 0  # cos/sin [1, T, D]: every batch row reads row 0


def qkv_prep(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_weight: torch.Tensor,
             k_weight: torch.Tensor, eps: float, n_heads: int, n_kv: int, *, k_out: torch.Tensor | None = None,
             v_out: torch.Tensor | None = None,
             launch: Launch | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, H, T, D] (a view of [B, T, H, D]), k and v [B, Hkv, T, D] from the stacked projection `qkv`
    [B, T, (H + Hkv [+ Hkv]) * D] (no v part: K=V), normed and rotated as `Attention._project`. cos, sin:
    [1 or B, T, D] in qkv's dtype; k_out, v_out: where to write k and v (any strides, unit last stride).
    `launch`: force the rows per program and warps (benchmarks, tests) instead of `CUDA_LAUNCH`'s."""
    D, has_v = _head_dim(qkv, cos, sin, q_weight, k_weight, n_heads, n_kv)
    B, T, _ = qkv.shape
    q = torch.empty(B, T, n_heads, D, dtype=qkv.dtype, device=qkv.device)
    k = _destination(k_out, "k_out", qkv, (B, n_kv, T, D))
    v = _destination(v_out, "v_out", qkv, (B, n_kv, T, D))
    if B * T == 0:
        return q.transpose(1, 2), k, v
    block_r, block_d, warps = block_shape(D)
    block_r, warps = pick_launch("qkv_prep", CUDA_LAUNCH, D, B * T, Launch(block_r, warps), qkv.is_cuda, launch)
    _qkv_prep_kernel[(triton.cdiv(B * T, block_r), n_heads + 2 * n_kv)](
        qkv, cos, sin, q_weight, k_weight, q, k, v, B * T, T, n_heads, n_kv,
        (n_heads + n_kv if has_v else n_heads) * D, eps,
        qkv.stride(0), qkv.stride(1), _batch_stride(cos), cos.stride(1), _batch_stride(sin), sin.stride(1),
        *q.stride()[:3], k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        D=D, MODE=MODES[qkv.dtype], BLOCK_R=block_r, BLOCK_H=block_d // 2, num_warps=warps, **pdl(qkv.device))
    return q.transpose(1, 2), k, v


def reference_qkv_prep(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_weight: torch.Tensor,
                       k_weight: torch.Tensor, eps: float, n_heads: int, n_kv: int, *,
                       k_out: torch.Tensor | None = None,
                       v_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's math op for op (`Attention._project` after the GEMM), copied into k_out / v_out if given."""
    from dgemma.models.diffusion_gemma import apply_rope, rms_norm

    D, has_v = _head_dim(qkv, cos, sin, q_weight, k_weight, n_heads, n_kv)
    parts = qkv.split([n_heads * D] + [n_kv * D] * (2 if has_v else 1), dim=-1)
    q_raw, k_raw = parts[0].unflatten(-1, (n_heads, D)), parts[1].unflatten(-1, (n_kv, D))  # [B, T, H|Hkv, D]
    v_raw = parts[2].unflatten(-1, (n_kv, D)) if has_v else k_raw  # K=V on full layers
    q = apply_rope(rms_norm(q_raw, q_weight, eps), cos, sin).transpose(1, 2)  # [B, H, T, D]
    k = apply_rope(rms_norm(k_raw, k_weight, eps), cos, sin).transpose(1, 2)  # [B, Hkv, T, D]
    v = rms_norm(v_raw, None, eps).transpose(1, 2)
    if k_out is not None:
        k = k_out.copy_(k)
    if v_out is not None:
        v = v_out.copy_(v)
    return q, k, v

"""Canvas-over-cache attention in two passes, for the full layers (D = 512).

`canvas_attention` (attention.py) sends the decoder's and the commit pass's attention here on CUDA for the head dims
in CUDA_TWO_PASS (or when given a `TwoPass` config); the result is the same softmax(q · Kᵀ over the visible slots) ·
V, with attention.py's masks (`block_slots`, `key_mask`), splits, output layout (`store_rows`) and merge kernel.

Why two passes at D = 512: a flash-attention program keeps its fp32 accumulator (rows × D) in registers, and 128 rows
× 512 columns do not fit, so the fused kernel splits V's columns between two programs that each recompute the whole
QKᵀ: 1.5 × the useful FLOPs, and Q (128 KB) in shared memory leaves room for 32-key blocks only (~190 useful TFLOP/s
on an H200 at 32K keys). Here the scores are computed once:

1. `_scores_kernel`, one program per (row block, key block, KV head): S = Q Kᵀ as a plain GEMM over D in BLOCK_D
   chunks (no Q resident in shared memory, so key blocks of 128), masked like the fused kernel, then per row its
   block maximum m, P = 2^(S·log2 e - m) and l = Σ P (fp32, before rounding). P is stored in fp16 (fp32 for fp32
   inputs), m and l in fp32.
2. `_values_kernel`, one program per (row block, column part, KV head, split), as the fused kernel's grid: the
   split's maximum M = max m over its blocks, then for every key step P · 2^(m - M) is rounded to the input dtype
   and multiplied into the accumulator of D / v_parts columns; L = Σ l · 2^(m - M). Only P is recomputed per
   column part (a load), not QKᵀ.

Rounding: the fused kernel rounds each probability once to bf16, relative to a running maximum. Here it is rounded
to fp16 relative to its block's maximum, then scaled by 2^(m - M) <= 1 and rounded to bf16: the fp16 step keeps 3
more bits than bf16, so the two roundings differ from one only near bf16 ties (≤ 1 bf16 ulp, in a few % of the
probabilities); values below fp16's range (2^-24 of their block's maximum) become 0, which moves the sum by less
than 2^-24 of its largest term.

The P buffer holds every probability of the call: B · Hkv · rows · keys · 2 bytes (270 MB at batch 1 with 32K
slots), allocated per call like the split partials (inside a CUDA graph, from the graph's pool, shared by the
layers); a batch whose P would pass WORKSPACE_BYTES (1 GiB) runs in chunks of rows (`batch_rows`). Under
TRITON_INTERPRET=1 the loops with device-side bounds are `while` loops and dots are upcast (attention.py's `_mma`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from dgemma.kernels.attention import (
    _mma,
    _splits_at,
    block_slots,
    key_mask,
    merge_splits,
    query_bounds,
    split_buffers,
    split_count,
    split_range,
    store_rows,
)
from dgemma.kernels.fmath import INTERPRET, pdl, pdl_start, precision


class TwoPass(NamedTuple):
    """Both kernels' launch parameters (canvas_attention's `config=` for the two-pass path)."""
    block_m: int = 128  # stacked query rows per program, both kernels
    block_n: int = 128  # keys per scores program: the granularity of the stored block maxima
    block_d: int = 64  # head-dim chunk of the scores GEMM's loop
    s_warps: int = 8
    s_stages: int = 3
    v_parts: int = 2  # values programs per row block, each D / v_parts output columns
    block_k: int = 64  # keys per step of the values loop (divides block_n)
    v_warps: int = 8
    v_stages: int = 3
    splits: int = 1  # most values programs sharing a row block's keys (merged by log-sum-exp, as the fused kernel)
    blocks_per_split: int = 2  # valid key blocks (of block_n) that justify one more split


# CUDA defaults per head dim (decoder and causal mode, every buffer length). Measured on an H200
# (scripts/gpu_two_pass_probe.py, benchmarks/results/session6/two_pass_c81010d/), one full layer (D 512) at batch 1:
# 0.631 ms against the fused kernel's 1.337 at 32K slots (439 vs 207 useful TFLOP/s; scores 0.355 ms, values
# 0.275), 0.109 vs 0.207 at 4K, 0.037 vs 0.047 at a 512 prompt (768 slots), 0.045 vs 0.049 with 32K slots holding
# a 512 prompt; batch 8 at 4K 0.674 vs 1.372. Key blocks of 256 beat 128 (0.355 vs 0.477 ms of scores at 32K).
CUDA_TWO_PASS: dict[int, TwoPass] = {512: TwoPass(block_n=256)}
INTERPRET_TWO_PASS = TwoPass(16, 16, 16, 1, 1, 2, 8, 1, 1)
# The most bytes of P (and block statistics) one pair of launches may hold: larger batches run in chunks of rows.
WORKSPACE_BYTES = 1 << 30


@triton.jit
def _scores_kernel(q_ptr, k_ptr, pos_ptr, qpos_ptr, len_ptr, p_ptr, m_ptr, l_ptr, H, T, REP, CAP, SCRATCH, RP, WINDOW,
                   sqb, sqh, sqt, skb, skh, skn, spb, sqpb,
                   D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   CAUSAL: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL)
    # grid: (row blocks of one KV head's REP·T stacked rows, key blocks of the whole buffer, B · Hkv). Key blocks past
    # this row's kv_len exit at once (the grid is fixed by shapes, for graphs). CAUSAL: attention.py's causal mode
    # (query t at position qpos[b, t] sees positions p <= it, and > it - WINDOW given a window), as a mask here.
    i = tl.program_id(1)
    bg = tl.program_id(2)
    b = (bg // (H // REP)).to(tl.int64)
    g = (bg % (H // REP)).to(tl.int64)
    n = tl.maximum(tl.minimum(tl.load(len_ptr + b).to(tl.int32), CAP), 0)
    nb_c = tl.cdiv(n, BLOCK_N)
    if i >= nb_c + tl.cdiv(SCRATCH, BLOCK_N):
        return
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < REP * T
    h = g * REP + rows // T
    t = rows % T
    slots, inside, in_cache = block_slots(i, nb_c, n, CAP, CAP + SCRATCH, BLOCK_N, 0, BLOCK_N)
    qpos_row = qpos_ptr + b * sqpb
    q_lo, q_hi = query_bounds(qpos_row, t, row_ok, WINDOW, BLOCK_M, CAUSAL)
    _, ok = key_mask(slots, inside, in_cache, CAP, pos_ptr + b * spb, qpos_row, q_lo, q_hi, CAUSAL)
    q_rows = q_ptr + b * sqb + h * sqh + t * sqt
    k_rows = k_ptr + b * skb + g * skh + slots.to(tl.int64) * skn
    s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        qc = tl.load(q_rows[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)
        # Loaded below kv_len, empty or not (pos masks the scores): empty cache slots must hold finite values.
        kc = tl.load(k_rows[:, None] + d[None, :], mask=inside[:, None], other=0.0)
        s += _mma(qc, tl.trans(kc), PREC, INTERPRET)
    s = tl.where(ok, s * 1.4426950408889634, float("-inf"))  # base 2; the scale is 1
    m = tl.max(s, 1)
    p = tl.exp2(s - tl.where(m == float("-inf"), 0.0, m)[:, None])  # 0 where masked, also in all-masked rows
    at = (bg * tl.num_programs(1) + i).to(tl.int64) * RP + rows  # [B·Hkv, blocks, RP] index of the rows
    tl.store(p_ptr + at[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :], p.to(p_ptr.dtype.element_ty))
    tl.store(m_ptr + at, m)
    tl.store(l_ptr + at, tl.sum(p, 1))


@triton.jit
def _values_kernel(p_ptr, m_ptr, l_ptr, v_ptr, len_ptr, out_ptr, part_ptr, lse_ptr, H, T, REP, CAP, SCRATCH, RP, NB,
                   SPLITS, BPS, svb, svh, svn, sob, soh, sot,
                   D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL)
    # grid: (row blocks × D // DV column parts, B · Hkv, SPLITS), as attention.py's _canvas_attn_kernel, whose
    # output layout (and merge) this shares.
    bg = tl.program_id(1)
    b = (bg // (H // REP)).to(tl.int64)
    g = (bg % (H // REP)).to(tl.int64)
    split = tl.program_id(2)
    part = tl.program_id(0) % (D // DV)
    rows = tl.program_id(0) // (D // DV) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < REP * T
    h = g * REP + rows // T
    t = rows % T
    vcols = part * DV + tl.arange(0, DV)
    n = tl.maximum(tl.minimum(tl.load(len_ptr + b).to(tl.int32), CAP), 0)
    nb_c, total, active = _splits_at(n, CAP, SCRATCH, BLOCK_N, SPLITS, BPS)
    lo, hi = split_range(split, active, total)

    ml = bg.to(tl.int64) * NB * RP + rows  # m, l of block i at ml + i · RP
    mx = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    if INTERPRET:
        i = lo
        while i < hi:
            mx = tl.maximum(mx, tl.load(m_ptr + ml + i * RP))
            i += 1
    else:
        for i in range(lo, hi):
            mx = tl.maximum(mx, tl.load(m_ptr + ml + i * RP))
    base = tl.where(mx == float("-inf"), 0.0, mx)

    SUB: tl.constexpr = BLOCK_N // BLOCK_K
    p_rows = p_ptr + ml[:, None] * BLOCK_N + tl.arange(0, BLOCK_K)[None, :]  # block i, step j at + (i·RP·BN + j·BK)
    v_base = v_ptr + b * svb + g * svh
    acc = tl.zeros([BLOCK_M, DV], dtype=tl.float32)
    den = tl.zeros([BLOCK_M], dtype=tl.float32)
    if INTERPRET:
        kk = lo * SUB
        while kk < hi * SUB:
            acc, den = _values_step(kk, acc, den, p_rows, m_ptr, l_ptr, ml, base, v_base, vcols, svn, nb_c, n, CAP,
                                    SCRATCH, RP, BLOCK_N, BLOCK_K, SUB, PREC)
            kk += 1
    else:
        for kk in range(lo * SUB, hi * SUB):
            acc, den = _values_step(kk, acc, den, p_rows, m_ptr, l_ptr, ml, base, v_base, vcols, svn, nb_c, n, CAP,
                                    SCRATCH, RP, BLOCK_N, BLOCK_K, SUB, PREC)

    o = acc / tl.where(den == 0.0, 1.0, den)[:, None]  # den = 0 only for rows with no valid key in the split
    store_rows(o, mx + tl.log2(den), out_ptr, part_ptr, lse_ptr, b, h, t, row_ok, vcols, part, split, active, H, T,
               REP, sob, soh, sot, D, SPLIT)


@triton.jit
def _values_step(kk, acc, den, p_rows, m_ptr, l_ptr, ml, base, v_base, vcols, svn, nb_c, n, CAP, SCRATCH, RP,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB: tl.constexpr, PREC: tl.constexpr):
    """Key step kk = block i · SUB + j: acc += round(P_ij · 2^(m_i - base)) @ V_ij; den += l_i · 2^(m_i - base) once
    per block."""
    i = kk // SUB
    j = kk % SUB
    f = tl.exp2(tl.load(m_ptr + ml + i * RP) - base)  # 0 for rows with nothing valid in block i (m = -inf)
    den += tl.where(j == 0, tl.load(l_ptr + ml + i * RP) * f, 0.0)
    p = tl.load(p_rows + (i.to(tl.int64) * RP * BLOCK_N + j * BLOCK_K))
    slots, inside, _ = block_slots(i, nb_c, n, CAP, CAP + SCRATCH, BLOCK_N, j * BLOCK_K, BLOCK_K)
    v = tl.load(v_base + slots[:, None] * svn + vcols[None, :], mask=inside[:, None], other=0.0)  # [BLOCK_K, DV]
    p = (p.to(tl.float32) * f[:, None]).to(v.dtype)
    return acc + _mma(p, v, PREC, INTERPRET), den


# --- launcher ---------------------------------------------------------------------------------------------------
def two_pass_default(q: torch.Tensor) -> TwoPass | None:
    """The CUDA default for q's head dim (None: the fused kernel)."""
    return CUDA_TWO_PASS.get(q.shape[3]) if q.device.type == "cuda" else None


def two_pass_config(q: torch.Tensor, n_kv: int, cap: int, scratch: int, cfg: TwoPass | None = None) -> TwoPass:
    """`cfg` (default: the CUDA entry for q's head dim, the interpreter's tiles on CPU) with its splits filling one
    wave of values programs (one per SM) where the key blocks allow, as `default_config` does for the fused kernel."""
    B, H, T, D = q.shape
    if cfg is None:
        cfg = CUDA_TWO_PASS[D] if q.device.type == "cuda" else INTERPRET_TWO_PASS
    if q.device.type != "cuda":
        return cfg
    programs = triton.cdiv((H // n_kv) * T, cfg.block_m) * cfg.v_parts * B * n_kv
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    blocks = triton.cdiv(cap, cfg.block_n) + triton.cdiv(scratch, cfg.block_n)
    return cfg._replace(splits=split_count(programs, sms, min(triton.cdiv(blocks, cfg.blocks_per_split), 16)))


def two_pass_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, kv_len: torch.Tensor,
                    out: torch.Tensor, cfg: TwoPass, qpos: torch.Tensor | None = None, window: int | None = None
                    ) -> None:
    """Both passes (and the merge when split) into out [B, H, T, D]; arguments checked by canvas_attention, whose
    causal mode qpos / window is."""
    D = q.shape[3]
    if D % cfg.v_parts or cfg.block_n % cfg.block_k or D % cfg.block_d:
        raise ValueError(f"canvas_attention: two-pass config {cfg} needs v_parts and block_d dividing the head dim "
                         f"{D} and block_k dividing block_n")
    B, rows = q.shape[0], batch_rows(q, k, pos, cfg)
    for b in range(0, B, rows):  # one batch chunk at a time keeps P within WORKSPACE_BYTES
        r = slice(b, b + rows)
        values_launch(scores_launch(q[r], k[r], pos[r], kv_len[r], cfg, None if qpos is None else qpos[r], window),
                      q[r], v[r], pos[r], kv_len[r], out[r], cfg)


def batch_rows(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, cfg: TwoPass) -> int:
    """Batch rows per pair of launches: all of them unless P and the block statistics of the whole batch would
    exceed WORKSPACE_BYTES (batch 16 with 32K slots: 4.4 GB), then as many as fit (at least one)."""
    B, H, T, _ = q.shape
    n_kv, cap = k.shape[1], pos.shape[1]
    rows_p = triton.cdiv((H // n_kv) * T, cfg.block_m) * cfg.block_m
    blocks = triton.cdiv(cap, cfg.block_n) + triton.cdiv(k.shape[2] - cap, cfg.block_n)
    p_size = 4 if q.dtype == torch.float32 else 2
    per_row = n_kv * blocks * rows_p * (cfg.block_n * p_size + 8)  # P, then the fp32 maxima and sums
    return max(1, min(B, WORKSPACE_BYTES // per_row))


def scores_launch(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, kv_len: torch.Tensor, cfg: TwoPass,
                  qpos: torch.Tensor | None = None, window: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first pass: (P [B·Hkv, blocks, rows, block_n], block maxima and sums [B·Hkv, blocks, rows] fp32), rows
    padded to whole row blocks; blocks past kv_len are left unwritten."""
    B, H, T, D = q.shape
    n_kv, cap = k.shape[1], pos.shape[1]
    scratch = k.shape[2] - cap
    rep = H // n_kv
    row_blocks = triton.cdiv(rep * T, cfg.block_m)
    nb = triton.cdiv(cap, cfg.block_n) + triton.cdiv(scratch, cfg.block_n)
    probs = torch.empty(B * n_kv, nb, row_blocks * cfg.block_m, cfg.block_n, device=q.device,
                        dtype=torch.float32 if q.dtype == torch.float32 else torch.float16)
    maxes = torch.empty(probs.shape[:3], dtype=torch.float32, device=q.device)
    sums = torch.empty_like(maxes)
    qp = pos if qpos is None else qpos  # not read unless CAUSAL
    _scores_kernel[(row_blocks, nb, B * n_kv)](
        q, k, pos, qp, kv_len, probs, maxes, sums, H, T, rep, cap, scratch, probs.shape[2], window or 0,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), pos.stride(0), qp.stride(0),
        D=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, CAUSAL=qpos is not None,
        PREC=precision(q.dtype), num_warps=cfg.s_warps, num_stages=cfg.s_stages,
        **pdl(q.device))
    return probs, maxes, sums


def values_launch(scores: tuple[torch.Tensor, torch.Tensor, torch.Tensor], q: torch.Tensor, v: torch.Tensor,
                  pos: torch.Tensor, kv_len: torch.Tensor, out: torch.Tensor, cfg: TwoPass) -> None:
    """The second pass (and the merge when split) from `scores_launch`'s output into out [B, H, T, D]."""
    probs, maxes, sums = scores
    B, H, T, D = q.shape
    n_kv, cap = v.shape[1], pos.shape[1]
    scratch = v.shape[2] - cap
    part, lse = split_buffers(cfg.splits, out)
    _values_kernel[(triton.cdiv((H // n_kv) * T, cfg.block_m) * cfg.v_parts, B * n_kv, cfg.splits)](
        probs, maxes, sums, v, kv_len, out, part, lse, H, T, H // n_kv, cap, scratch, probs.shape[2],
        probs.shape[1], cfg.splits, cfg.blocks_per_split, v.stride(0), v.stride(1), v.stride(2), out.stride(0),
        out.stride(1), out.stride(2), D=D, DV=D // cfg.v_parts, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, SPLIT=cfg.splits > 1, PREC=precision(q.dtype), num_warps=cfg.v_warps,
        num_stages=cfg.v_stages,
        **pdl(q.device))
    merge_splits(part, lse, kv_len, out, cap, scratch, cfg.block_n, cfg.splits, cfg.blocks_per_split)

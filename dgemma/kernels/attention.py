"""Flash attention of the canvas over one KV-cache layer: the static-shape decoder's attention, CUDA-graph safe.

`canvas_attention(q, k, v, pos, kv_len)` computes, for every canvas query row (scale 1: Gemma 4 norms q and k),
    softmax(q · Kᵀ over the valid slots) · V
where k, v are a cache layer's buffers [B, Hkv, C + scratch, D] (engine/cache.py): cache slot j < C is valid when
pos[b, j] >= 0 and j < kv_len[b]; the scratch slots after the capacity hold the canvas's own K/V and are always
valid. That is `attention_reference`, the masked sdpa of `Attention.forward_decoder_static`.

Notable choices:
- Only key blocks below kv_len are read. kv_len is a device tensor, clamped to C in the kernel, so one value serves
  every layer (`cache_lengths`: a sliding ring holds slots 0..len-1 until it wraps, then all of them) and a
  captured CUDA graph follows a growing cache without recapture or host sync. pos still masks slot by slot (left
  padding, rolled-back rows, a ring's holes), so kv_len only has to be an upper bound.
- GQA natively: the rep = H / Hkv query heads of a KV head are stacked into rep·T rows (as the model does) and a
  program takes BLOCK_M of them, so each K/V block it loads serves all its rows; K/V are never repeated.
- Split-KV (flash-decoding): when B · Hkv · row-blocks programs do not fill the GPU (batch 1, long prompt), up to
  `splits` programs share a row block's keys and a second kernel merges their partial outputs by log-sum-exp.
  The grid is fixed by shapes (graphs); how many splits actually work is decided on the device from kv_len
  (one per `blocks_per_split` key blocks), so a short prompt runs unsplit and writes its output directly.
- fp32 scores and accumulator, online softmax in base 2, probabilities rounded to the input dtype for the P·V
  product (as flash attention does), output rounded once. fp32 inputs use IEEE dots (no TF32).
- Under TRITON_INTERPRET=1 the key loop is a `while` (the interpreter cannot take a runtime `range` bound with
  numpy >= 2.4); on GPU it is a `for`, which Triton software-pipelines. Both run the same `_attend_block`.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


class Config(NamedTuple):
    """Launch parameters. splits: most programs per row block (1 = never split); blocks_per_split: key blocks
    (valid ones, counted on the device) that justify one more split."""
    block_m: int
    block_n: int
    warps: int
    stages: int
    splits: int = 1
    blocks_per_split: int = 8


# Tile shapes per head dim on CUDA (untuned guesses, H100/H200: the bench's --sweep measures the alternatives).
# Registers: the fp32 accumulator is BLOCK_M × D (D = 512: 128 KB, so 8 warps); shared memory: K and V tiles of
# BLOCK_N × D bf16 per pipeline stage.
CUDA_TILES = {16: (128, 64, 4, 3), 32: (128, 64, 4, 3), 64: (128, 64, 4, 3), 128: (128, 64, 8, 3), 256: (128, 64, 8, 3),
              512: (64, 32, 8, 2)}
INTERPRET_TILES = (16, 16, 1, 1)
# A split must carry ~8 key blocks of work to pay for writing and merging its fp32 partial output.
BLOCKS_PER_SPLIT = 8
_TILE_FITS: dict[tuple[int | None, int, torch.dtype], int] = {}  # (device, D, dtype) → tile_candidates index


# --- device code ------------------------------------------------------------------------------------------------
@triton.jit
def _mma(a, b, PREC: tl.constexpr, INTERPRET: tl.constexpr):
    """a @ b accumulated in fp32. The interpreter's tl.dot misreads bf16 operands (triton 3.6): there the same values
    are multiplied in fp32."""
    if INTERPRET:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        c = tl.dot(a, b, input_precision=PREC)
    return c


@triton.jit
def _attend_block(q, acc, m_i, l_i, i, k_base, v_base, pos_row, skn, svn, n, nb_c, CAP, END, cols,
                  BLOCK_N: tl.constexpr, PREC: tl.constexpr, INTERPRET: tl.constexpr):
    """One key block i of the virtual key list [cache blocks 0..nb_c-1 | scratch blocks] into the online softmax.
    Returns the updated (acc [BLOCK_M, D], m_i, l_i [BLOCK_M]); m_i, l_i are in base 2."""
    in_cache = i < nb_c
    start = tl.where(in_cache, i * BLOCK_N, CAP + (i - nb_c) * BLOCK_N)
    slots = start + tl.arange(0, BLOCK_N)
    ok = slots < tl.where(in_cache, n, END)
    slot_pos = tl.load(pos_row + slots, mask=ok & in_cache, other=0)  # scratch slots read as position 0: valid
    ok = ok & (slot_pos >= 0)
    k = tl.load(k_base + slots[:, None] * skn + cols[None, :], mask=ok[:, None], other=0.0)  # [BLOCK_N, D]
    s = _mma(q, tl.trans(k), PREC, INTERPRET) * 1.4426950408889634  # log2(e): exp2 below; the scale is 1
    s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing valid yet: keep exp2 at 0, not NaN
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    v = tl.load(v_base + slots[:, None] * svn + cols[None, :], mask=ok[:, None], other=0.0)  # [BLOCK_N, D]
    acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, PREC, INTERPRET)
    return acc, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _splits_at(n, CAP, SCRATCH, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, BPS):
    """(cache blocks, all blocks, working splits) of a row holding n valid-bounded cache slots."""
    nb_c = tl.cdiv(n, BLOCK_N)
    total = nb_c + tl.cdiv(SCRATCH, BLOCK_N)
    return nb_c, total, tl.maximum(tl.minimum(tl.cdiv(total, BPS), SPLITS), 1)


@triton.jit
def _canvas_attn_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, len_ptr, out_ptr, part_ptr, lse_ptr,
                        H, T, REP, CAP, SCRATCH, BPS,
                        sqb, sqh, sqt, skb, skh, skn, svb, svh, svn, spb, sob, soh, sot,
                        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
                        PREC: tl.constexpr, INTERPRET: tl.constexpr):
    # grid: (row blocks of the REP·T rows of one KV head, B · Hkv, SPLITS)
    bg = tl.program_id(1)
    b = (bg // (H // REP)).to(tl.int64)
    g = (bg % (H // REP)).to(tl.int64)
    split = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # stacked row = (head within the group) · T + t
    row_ok = rows < REP * T
    h = g * REP + rows // T
    t = rows % T
    cols = tl.arange(0, D)
    q = tl.load(q_ptr + (b * sqb + h * sqh + t * sqt)[:, None] + cols[None, :], mask=row_ok[:, None], other=0.0)

    n = tl.maximum(tl.minimum(tl.load(len_ptr + b).to(tl.int32), CAP), 0)
    nb_c, total, active = _splits_at(n, CAP, SCRATCH, BLOCK_N, SPLITS, BPS)
    lo = tl.where(split < active, split * total // active, 0)
    hi = tl.where(split < active, (split + 1) * total // active, 0)

    k_base = k_ptr + b * skb + g * skh
    v_base = v_ptr + b * svb + g * svh
    pos_row = pos_ptr + b * spb
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if INTERPRET:
        i = lo
        while i < hi:
            acc, m_i, l_i = _attend_block(q, acc, m_i, l_i, i, k_base, v_base, pos_row, skn, svn, n, nb_c, CAP,
                                          CAP + SCRATCH, cols, BLOCK_N, PREC, INTERPRET)
            i += 1
    else:
        for i in range(lo, hi):
            acc, m_i, l_i = _attend_block(q, acc, m_i, l_i, i, k_base, v_base, pos_row, skn, svn, n, nb_c, CAP,
                                          CAP + SCRATCH, cols, BLOCK_N, PREC, INTERPRET)

    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # l_i = 0 only for rows with no valid key at all
    out_ptrs = out_ptr + (b * sob + h * soh + t * sot)[:, None] + cols[None, :]
    if SPLITS == 1:
        tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    elif (active == 1) & (split == 0):  # the row is unsplit at this length: no merge needed
        tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    elif split < active:
        flat = ((split * (tl.num_programs(1) // (H // REP)) + b) * H + h) * T + t  # [SPLITS, B, H, T] row index
        tl.store(part_ptr + flat[:, None] * D + cols[None, :], o, mask=row_ok[:, None])
        tl.store(lse_ptr + flat, m_i + tl.log2(l_i), mask=row_ok)  # -inf where l_i = 0: weight 0 in the merge


@triton.jit
def _merge_kernel(part_ptr, lse_ptr, len_ptr, out_ptr, R, H, T, CAP, SCRATCH, BPS, sob, soh, sot,
                  D: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, BLOCK_R: tl.constexpr):
    """out = Σ_s 2^(lse_s - max) · o_s / Σ_s 2^(lse_s - max) over the working splits of rows whose row block split."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # rows of [B, H, T]
    b = r // (H * T)
    h = (r // T) % H
    t = r % T
    n = tl.maximum(tl.minimum(tl.load(len_ptr + b, mask=r < R, other=0).to(tl.int32), CAP), 0)
    _, _, active = _splits_at(n, CAP, SCRATCH, BLOCK_N, SPLITS, BPS)
    live = (r < R) & (active > 1)  # unsplit rows were written by the attention kernel itself
    mx = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        mx = tl.maximum(mx, tl.load(lse_ptr + s * R + r, mask=live & (s < active), other=float("-inf")))
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    cols = tl.arange(0, D)
    acc = tl.zeros([BLOCK_R, D], dtype=tl.float32)
    den = tl.zeros([BLOCK_R], dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        use = live & (s < active)
        w = tl.exp2(tl.load(lse_ptr + s * R + r, mask=use, other=float("-inf")) - mx)
        o = tl.load(part_ptr + (s * R + r)[:, None] * D + cols[None, :], mask=use[:, None], other=0.0)
        acc += w[:, None] * o
        den += w
    out = acc / tl.where(den == 0.0, 1.0, den)[:, None]
    off = b * sob + h * soh + t * sot
    tl.store(out_ptr + off[:, None] + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=live[:, None])


# --- launcher ---------------------------------------------------------------------------------------------------
def cache_lengths(pos: torch.Tensor) -> torch.Tensor:
    """kv_len [B] int32 from any layer's slot positions [B, C]: max position + 1 (0 for an empty row). On a full
    layer slot = position; a ring holds its newest position, so this bounds the occupied slots of every layer.
    One small reduction: compute it once per step, not per layer."""
    if pos.shape[1] == 0:
        return torch.zeros(pos.shape[0], dtype=torch.int32, device=pos.device)
    return (pos.amax(dim=1) + 1).to(torch.int32)


def tile_candidates(D: int) -> list[tuple[int, int, int, int]]:
    """CUDA_TILES[D], then with fewer pipeline stages, then narrower key blocks: the launcher keeps the first that
    fits the GPU (Triton raises OutOfResources at the first launch when shared memory runs out)."""
    block_m, block_n, warps, stages = CUDA_TILES[D]
    return ([(block_m, block_n, warps, s) for s in range(stages, 0, -1)]
            + [(block_m, n, warps, 1) for n in (block_n // 2, block_n // 4) if n >= 16])


def default_config(q: torch.Tensor, n_kv: int, cap: int, scratch: int,
                   tiles: tuple[int, int, int, int] | None = None) -> Config:
    """`tiles` (default: the first candidate for the head dim) and, on CUDA, enough splits to give every SM two
    programs (batch 1), at most one per BLOCKS_PER_SPLIT key blocks of the whole buffer. Fixed by shapes (graphs)."""
    B, H, T, D = q.shape
    if q.device.type != "cuda":
        return Config(*INTERPRET_TILES)
    block_m, block_n, warps, stages = tiles or tile_candidates(D)[0]
    programs = triton.cdiv((H // n_kv) * T, block_m) * B * n_kv
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    max_blocks = triton.cdiv(cap, block_n) + triton.cdiv(scratch, block_n)
    splits = max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(max_blocks, BLOCKS_PER_SPLIT), 16))
    return Config(block_m, block_n, warps, stages, splits, BLOCKS_PER_SPLIT)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, kv_len: torch.Tensor | None):
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"canvas_attention: q must be [B, H, T, D], k and v one [B, Hkv, S, D] shape; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, T, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or H % k.shape[1] != 0:
        raise ValueError(f"canvas_attention: k/v {tuple(k.shape)} do not fit q {tuple(q.shape)} (batch, head dim, "
                         "and H a multiple of Hkv)")
    if q.dtype != k.dtype or q.dtype != v.dtype or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"canvas_attention: q, k, v must share one of fp32/bf16/fp16; got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if D not in CUDA_TILES:
        raise ValueError(f"canvas_attention: head dim must be a power of 2 in 16..512, got {D}")
    if k.stride(3) != 1 or v.stride(3) != 1:
        raise ValueError("canvas_attention: k and v need unit stride along the head dim")
    if pos.dim() != 2 or pos.shape[0] != B or pos.shape[1] > k.shape[2] or pos.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"canvas_attention: pos must be int [B, C] with C <= {k.shape[2]}; got {pos.dtype} "
                         f"{tuple(pos.shape)}")
    if kv_len is not None and (kv_len.shape != (B,) or kv_len.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"canvas_attention: kv_len must be int [B]; got {kv_len.dtype} {tuple(kv_len.shape)}")
    devices = {t.device for t in (q, k, v, pos) + ((kv_len,) if kv_len is not None else ())}
    if len(devices) != 1:
        raise ValueError(f"canvas_attention: tensors on several devices {sorted(map(str, devices))}")


def canvas_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                     kv_len: torch.Tensor | None = None, config: Config | None = None) -> torch.Tensor:
    """Attention of q [B, H, T, D] over a cache layer's k, v [B, Hkv, C + scratch, D] with slot positions pos [B, C]
    (-1 = empty) and kv_len [B] (device; slots >= kv_len are not read; None: `cache_lengths(pos)`). The scratch
    slots are always attended. Returns [B, H, T, D] in q's dtype, a view of a [B, T, H, D] buffer, so the caller's
    `.transpose(1, 2).reshape(B, T, H * D)` before o_proj is free. No host sync; safe to capture in a CUDA graph
    (make the first call, which compiles and picks the tiles, before capturing). `config` forces the launch
    parameters (tests, the bench's sweep); by default they come from `default_config` with the first tile shape
    that fits the GPU."""
    _check(q, k, v, pos, kv_len)
    B, H, T, D = q.shape
    n_kv, S = k.shape[1], k.shape[2]
    cap = pos.shape[1]
    scratch = S - cap
    q = q if q.stride(3) == 1 else q.contiguous()
    pos = pos if pos.stride(1) == 1 else pos.contiguous()
    kv_len = cache_lengths(pos) if kv_len is None else kv_len
    out = torch.empty(B, T, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)  # [B, H, T, D] view
    if out.numel() == 0:
        return out
    if config is not None or q.device.type != "cuda":
        _launch(q, k, v, pos, kv_len, out, config or default_config(q, n_kv, cap, scratch))
        return out
    key, tiles = (q.device.index, D, q.dtype), tile_candidates(D)
    for i in range(_TILE_FITS.get(key, 0), len(tiles)):
        try:
            _launch(q, k, v, pos, kv_len, out, default_config(q, n_kv, cap, scratch, tiles[i]))
        except triton.runtime.errors.OutOfResources:
            if i == len(tiles) - 1:
                raise
            continue
        _TILE_FITS[key] = i
        return out


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, kv_len: torch.Tensor,
            out: torch.Tensor, cfg: Config) -> None:
    B, H, T, D = q.shape
    n_kv, cap = k.shape[1], pos.shape[1]
    scratch = k.shape[2] - cap
    R = B * H * T
    part = torch.empty(cfg.splits, R, D, dtype=torch.float32, device=q.device) if cfg.splits > 1 else out
    lse = torch.empty(cfg.splits, R, dtype=torch.float32, device=q.device) if cfg.splits > 1 else out
    rep = H // n_kv
    grid = (triton.cdiv(rep * T, cfg.block_m), B * n_kv, cfg.splits)
    _canvas_attn_kernel[grid](
        q, k, v, pos, kv_len, out, part, lse, H, T, rep, cap, scratch, cfg.blocks_per_split,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), pos.stride(0), out.stride(0), out.stride(1), out.stride(2),
        D=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SPLITS=cfg.splits,
        PREC="ieee" if q.dtype == torch.float32 else None, INTERPRET=os.environ.get("TRITON_INTERPRET") == "1",
        num_warps=cfg.warps, num_stages=cfg.stages)
    if cfg.splits > 1:
        block_r = max(1, 4096 // D)
        _merge_kernel[(triton.cdiv(R, block_r),)](
            part, lse, kv_len, out, R, H, T, cap, scratch, cfg.blocks_per_split,
            out.stride(0), out.stride(1), out.stride(2),
            D=D, BLOCK_N=cfg.block_n, SPLITS=cfg.splits, BLOCK_R=block_r, num_warps=4)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                        kv_len: torch.Tensor | None = None) -> torch.Tensor:
    """The model's math (`Attention.forward_decoder_static` with `KVCache.decoder_mask`): query heads stacked per
    KV head, sdpa with a boolean mask over the whole buffer, scale 1. kv_len, if given, also masks slots >= it."""
    B, H, T, D = q.shape
    n_kv, S = k.shape[1], k.shape[2]
    cap = pos.shape[1]
    valid = pos >= 0
    if kv_len is not None:
        valid = valid & (torch.arange(cap, device=pos.device) < kv_len[:, None])
    mask = torch.cat([valid, torch.ones(B, S - cap, dtype=torch.bool, device=pos.device)], dim=1)[:, None, None, :]
    out = F.scaled_dot_product_attention(q.reshape(B, n_kv, (H // n_kv) * T, D), k, v, attn_mask=mask, scale=1.0)
    return out.reshape(B, H, T, D)

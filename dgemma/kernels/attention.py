"""Flash attention of the canvas over one KV-cache layer: the static-shape decoder's attention, CUDA-graph safe.

`canvas_attention(q, k, v, pos, kv_len)` computes, for every canvas query row (scale 1: Gemma 4 norms q and k),
    softmax(q · Kᵀ over the valid slots) · V
where k, v are a cache layer's buffers [B, Hkv, C + scratch, D] (engine/cache.py): cache slot j < C is valid when
pos[b, j] >= 0 and j < kv_len[b]; the scratch slots after the capacity hold the canvas's own K/V and are always
valid. That is `attention_reference`, the masked sdpa of `Attention.forward_decoder_static`.
The causal mode (`qpos=`, `window=`) is the encoder's attention of a committed canvas (`encoder_static_context`,
its `prefix_mask`): the T scratch slots hold the committed tokens' own K/V at positions qpos [B, T], and query t
sees a valid slot (cache or scratch) at position p iff p <= qpos[b, t] and, on sliding layers, p > qpos[b, t] - window.

Notable choices:
- Only key blocks below kv_len are read. kv_len is a device tensor, clamped to C in the kernel, so one value serves
  every layer (`cache_lengths`: a sliding ring holds slots 0..len-1 until it wraps, then all of them) and a
  captured CUDA graph follows a growing cache without recapture or host sync. pos still masks slot by slot (left
  padding, rolled-back rows, a ring's holes), so kv_len only has to be an upper bound. With `prefetch` pos masks
  the scores only and empty slots below kv_len are loaded with weight 0, so they must hold finite values (the cache
  is zero-initialised and only ever stores K/V); without it their loads are masked too.
- GQA natively: the rep = H / Hkv query heads of a KV head are stacked into rep·T rows (as the model does) and a
  program takes BLOCK_M of them, so each K/V block it loads serves all its rows; K/V are never repeated.
- Split-KV (flash-decoding): when B · Hkv · row-blocks programs do not fill the GPU (batch 1, long prompt), up to
  `splits` programs share a row block's keys and a second kernel merges their partial outputs by log-sum-exp.
  The grid is fixed by shapes (graphs); how many splits actually work is decided on the device from kv_len
  (one per `blocks_per_split` key blocks), so a short prompt runs unsplit and writes its output directly. The
  split count fills whole waves of `Tile.per_sm` programs per SM (`split_count`).
- Column parts (`v_parts`, the D = 512 full layers): v_parts programs share a row block, each computing the whole
  QKᵀ but P·V for D / v_parts output columns only, so the fp32 accumulator fits twice the rows (why: CUDA_TILES).
- fp32 scores and accumulator, online softmax in base 2, probabilities rounded to the input dtype for the P·V
  product (as flash attention does), output rounded once. fp32 inputs use IEEE dots (no TF32). `lazy_rescale`
  (FlashAttention-4's conditional rescaling) keeps a row's stale max until some row of the tile outgrows it by
  2^8: the same quotient, with probabilities up to 2^8 whose bf16 rounding is as relative as below 1.
- Causal mode: the mask is computed per score from the positions (no [B, T, C + T] mask in memory); since qpos
  increases along T, the scratch blocks after a row block's last query are skipped. The split count stays the one
  of the whole key list (the merge kernel recomputes it from kv_len alone); the splits share the blocks left.
- Under TRITON_INTERPRET=1 the key loop is a `while` (the interpreter cannot take a runtime `range` bound with
  numpy >= 2.4); on GPU it is a `for`, which Triton software-pipelines. Both run the same `_attend_block`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from dgemma.kernels.fmath import pdl, pdl_start, precision

if TYPE_CHECKING:
    from dgemma.kernels.attention_two_pass import TwoPass


class Tile(NamedTuple):
    """A head dim's tile shape and kernel variant on CUDA (one CUDA_TILES entry)."""
    block_m: int  # stacked query rows per program
    block_n: int  # keys per block
    warps: int
    stages: int  # software-pipeline depth of the K/V loads
    v_parts: int = 1  # programs per row block, each computing the full QKᵀ but P·V for D / v_parts output columns
    prefetch: bool = False  # K/V loads masked by kv_len only (pos masks the scores): no pos load blocks the loop
    lazy_rescale: bool = False  # rescale the accumulator only when a running max grew by more than 2^8
    per_sm: int = 1  # programs resident per SM (shared memory, registers), for the split count


class Config(NamedTuple):
    """Launch parameters: a Tile's fields plus splits (most programs sharing a row block's keys; 1 = never split)
    and blocks_per_split (valid key blocks, counted on the device, that justify one more split)."""
    block_m: int
    block_n: int
    warps: int
    stages: int
    splits: int = 1
    blocks_per_split: int = 8
    v_parts: int = 1
    prefetch: bool = False
    lazy_rescale: bool = False

    @classmethod
    def of(cls, tile: Tile, splits: int = 1, blocks_per_split: int = 8) -> Config:
        return cls(*tile[:4], splits, blocks_per_split, tile.v_parts, tile.prefetch, tile.lazy_rescale)


# Tiles per head dim on CUDA (H100/H200): scripts/gpu_attention_bench.py --sweep (D 256) and --sweep-full (D 512)
# measure the alternatives. Q (BLOCK_M × D) stays in shared memory next to `stages` K/V blocks; the fp32 accumulator
# (BLOCK_M × D / v_parts) lives in registers.
# D = 512, the full layers (read off the sm_90a code Triton 3.6 generates). Triton puts all warps of a flash-
# attention QKᵀ along M (64 rows per 4-warp warpgroup) but sizes its wgmma N as if they split N. A 64 × 512
# accumulator needs 8 warps (128 fp32 registers a thread), so at BLOCK_M 64 both warpgroups compute the same scores,
# in N = 16 halves that each re-read Q from shared memory; BLOCK_M 128 over the whole D would need 256 registers a
# thread. v_parts = 2 halves the accumulator instead: BLOCK_M 128 in 8 warps, each warpgroup its own 64 rows, one
# m64n32 wgmma per k-step. The QKᵀ is still computed twice (once per column part), but Q is read from shared memory
# half as often per score and each K/V byte fetched from L2 serves 128 rows, not 64. Q (128 KB) and 2 stages of K
# and half-V blocks (48 KB each) fill 224 of the 227 KB of shared memory: BLOCK_N 32. prefetch removes the pos load
# that blocked every key block; lazy_rescale skips the 128 × 256 multiply of acc (a sixth of the loop's
# instructions) on most blocks. Measured (H200, --sweep-full, benchmarks/results/session3/attn_sweep_full_h200.txt):
# 1.46 ms per full layer at B=1 / 32K keys (190 TFLOP/s) vs 2.30 ms for the Tile(64, 32, 8, 2) it replaces; twice the
# splits would give 1.38 ms there but 0.070 vs 0.050 ms at a 512 prompt, so the default split rule stays. D = 256:
# prefetch was the sweep's winner (0.034 vs 0.037 ms per sliding layer at B=1, 0.146 vs 0.154 at B=8 / 4096).
CUDA_TILES = {16: Tile(128, 64, 4, 3), 32: Tile(128, 64, 4, 3), 64: Tile(128, 64, 4, 3), 128: Tile(128, 64, 8, 3),
              256: Tile(128, 64, 8, 2, prefetch=True),
              512: Tile(128, 32, 8, 2, v_parts=2, prefetch=True, lazy_rescale=True)}
# Batch 1 on a sliding layer fills a quarter of the GPU with 128-row programs (8 KV heads × 4 row blocks): 64-row
# programs in 4 warps do the same work in twice as many programs, 0.025 vs 0.030 ms at a 512 prompt and equal at 32K,
# but 0.236 vs 0.143 ms at batch 8 (benchmarks/results/session4/micro_23fd678/attn_sliding.log). They are used when
# CUDA_TILES[D]'s programs (before splits) would fill at most half the SMs (`small_grid`).
CUDA_SMALL_GRID_TILES = {256: Tile(64, 64, 4, 2, prefetch=True)}
INTERPRET_SHAPE = dict(block_m=16, block_n=16, warps=1, stages=1)  # CPU tests, with CUDA_TILES[D]'s kernel variant
# A split must carry ~8 key blocks of work to pay for writing and merging its fp32 partial output.
BLOCKS_PER_SPLIT = 8
_TILE_FITS: dict[tuple, int] = {}  # (device, D, dtype, small grid) → tile_candidates index


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
def _rescale(acc, l_i, m_i, m_new):
    """Move the running sums from base m_i to m_new (>= m_i) per row."""
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing valid yet: keep exp2 at 0, not NaN
    alpha = tl.exp2(m_i - m_safe)
    return acc * alpha[:, None], l_i * alpha, m_new


@triton.jit
def block_slots(i, nb_c, n, CAP, END, BLOCK_N: tl.constexpr, OFFSET, WIDTH: tl.constexpr):
    """Slots OFFSET .. OFFSET + WIDTH of virtual key block i ([cache blocks 0..nb_c-1 | scratch blocks from CAP]),
    whether each is below its region's end (the cache's kv_len n, the scratch's END), and whether block i is cache."""
    in_cache = i < nb_c
    slots = tl.where(in_cache, i * BLOCK_N, CAP + (i - nb_c) * BLOCK_N) + OFFSET + tl.arange(0, WIDTH)
    return slots, slots < tl.where(in_cache, n, END), in_cache


@triton.jit
def key_mask(slots, inside, in_cache, CAP, pos_row, qpos_row, q_lo, q_hi, CAUSAL: tl.constexpr):
    """(valid [keys]: slot below its end and occupied, ok [rows, keys]: valid and visible to the row). CAUSAL: a row
    sees the positions in (q_lo, q_hi], scratch slot s holding position qpos_row[s]; else every valid key."""
    if CAUSAL:  # key positions: the cache slot's, or the query position whose K/V a scratch slot holds (int32 compares)
        slot_pos = tl.where(in_cache, tl.load(pos_row + slots, mask=inside & in_cache, other=-1).to(tl.int32),
                            tl.load(qpos_row + (slots - CAP), mask=inside & (slots >= CAP), other=-1).to(tl.int32))
        valid = inside & (slot_pos >= 0)
        ok = valid[None, :] & (slot_pos[None, :] > q_lo[:, None]) & (slot_pos[None, :] <= q_hi[:, None])
    else:
        slot_pos = tl.load(pos_row + slots, mask=inside & in_cache, other=0)  # scratch slots read as 0: valid
        valid = inside & (slot_pos >= 0)
        ok = valid[None, :]
    return valid, ok


@triton.jit
def query_bounds(qpos_row, t, row_ok, WINDOW, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """(q_lo, q_hi) [BLOCK_M] of `key_mask`'s causal mode: row t sees positions up to its own, qpos_row[t], and on
    sliding layers only the WINDOW ending there (WINDOW 0: none); zeros (unused) otherwise."""
    if CAUSAL:
        q_hi = tl.load(qpos_row + t, mask=row_ok, other=0).to(tl.int32)
        q_lo = tl.where(WINDOW > 0, tl.maximum(q_hi - WINDOW, -1), -1)
    else:
        q_hi = tl.zeros([BLOCK_M], dtype=tl.int32)
        q_lo = q_hi
    return q_lo, q_hi


@triton.jit
def split_range(split, active, total):
    """Key blocks [lo, hi) of split `split` when `active` splits share `total` blocks (empty for idle splits)."""
    lo = tl.where(split < active, split * total // active, 0)
    hi = tl.where(split < active, (split + 1) * total // active, 0)
    return lo, hi


@triton.jit
def store_rows(o, lse, out_ptr, part_ptr, lse_ptr, b, h, t, row_ok, vcols, part, split, active, H, T, REP,
               sob, soh, sot, D: tl.constexpr, SPLIT: tl.constexpr):
    """A program's normalised output o [rows, vcols] and its rows' log-sum-exp (base 2; -inf for rows with no valid
    key, weight 0 in the merge): into out directly where the row is unsplit at this length, else as split `split`'s
    partial for `_merge_kernel` (idle splits write nothing). Every column part has the same lse: part 0 writes it."""
    out_ptrs = out_ptr + (b * sob + h * soh + t * sot)[:, None] + vcols[None, :]
    if not SPLIT:
        tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    elif (active == 1) & (split == 0):  # the row is unsplit at this length: no merge needed
        tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    elif split < active:
        flat = ((split * (tl.num_programs(1) // (H // REP)) + b) * H + h) * T + t  # [SPLITS, B, H, T] row index
        tl.store(part_ptr + flat[:, None] * D + vcols[None, :], o, mask=row_ok[:, None])
        tl.store(lse_ptr + flat, lse, mask=row_ok & (part == 0))


@triton.jit
def _attend_block(q, acc, m_i, l_i, i, k_base, v_base, pos_row, qpos_row, q_lo, q_hi, skn, svn, n, nb_c, CAP, END,
                  cols, vcols, BLOCK_N: tl.constexpr, PREFETCH: tl.constexpr, LAZY_RESCALE: tl.constexpr,
                  CAUSAL: tl.constexpr, PREC: tl.constexpr, INTERPRET: tl.constexpr):
    """One key block i of the virtual key list [cache blocks 0..nb_c-1 | scratch blocks] into the online softmax.
    Scores use all D columns of q and K; the values only the program's output columns vcols. CAUSAL: a row sees the
    keys at positions in (q_lo, q_hi] [BLOCK_M], scratch slot s holding position qpos_row[s]. Returns the updated
    (acc [BLOCK_M, len(vcols)], m_i, l_i [BLOCK_M]); m_i, l_i are in base 2."""
    slots, inside, in_cache = block_slots(i, nb_c, n, CAP, END, BLOCK_N, 0, BLOCK_N)
    valid, ok = key_mask(slots, inside, in_cache, CAP, pos_row, qpos_row, q_lo, q_hi, CAUSAL)
    # PREFETCH: the K/V masks depend on kv_len only, not on the pos load, so Triton pipelines the K/V loads with no
    # blocking load of pos in the loop; empty slots below kv_len are then read (and weighted 0), so must be finite.
    kv_ok = inside if PREFETCH else valid
    k = tl.load(k_base + slots[:, None] * skn + cols[None, :], mask=kv_ok[:, None], other=0.0)  # [BLOCK_N, D]
    s = _mma(q, tl.trans(k), PREC, INTERPRET) * 1.4426950408889634  # log2(e): exp2 below; the scale is 1
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if LAZY_RESCALE:  # FA4's conditional rescaling: a row keeps its stale max until a row of the tile outgrows its
        # own by more than 2^8 (p <= 256 meanwhile: same sums, same relative rounding of P), which saves the
        # BLOCK_M × DV multiply of acc on most blocks.
        if tl.max(tl.where(m_new > m_i, m_new - m_i, 0.0), 0) > 8.0:
            acc, l_i, m_i = _rescale(acc, l_i, m_i, m_new)
    else:
        acc, l_i, m_i = _rescale(acc, l_i, m_i, m_new)
    p = tl.exp2(s - tl.where(m_i == float("-inf"), 0.0, m_i)[:, None])
    v = tl.load(v_base + slots[:, None] * svn + vcols[None, :], mask=kv_ok[:, None], other=0.0)  # [BLOCK_N, DV]
    acc += _mma(p.to(v.dtype), v, PREC, INTERPRET)
    return acc, m_i, l_i + tl.sum(p, 1)


@triton.jit
def _splits_at(n, CAP, SCRATCH, BLOCK_N: tl.constexpr, SPLITS, BPS):
    """(cache blocks, all blocks, working splits) of a row holding n valid-bounded cache slots."""
    nb_c = tl.cdiv(n, BLOCK_N)
    total = nb_c + tl.cdiv(SCRATCH, BLOCK_N)
    return nb_c, total, tl.maximum(tl.minimum(tl.cdiv(total, BPS), SPLITS), 1)


@triton.jit
def _canvas_attn_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, qpos_ptr, len_ptr, out_ptr, part_ptr, lse_ptr,
                        H, T, REP, CAP, SCRATCH, SPLITS, BPS, WINDOW,
                        sqb, sqh, sqt, skb, skh, skn, svb, svh, svn, spb, sqpb, sob, soh, sot,
                        D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        SPLIT: tl.constexpr, PREFETCH: tl.constexpr, LAZY_RESCALE: tl.constexpr, CAUSAL: tl.constexpr,
                        PREC: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL)
    # grid: (row blocks of the REP·T rows of one KV head × D // DV column parts, B · Hkv, SPLITS). SPLITS is a
    # runtime value, so one compile serves every split count; SPLIT (SPLITS > 1) compiles the partial outputs in.
    # CAUSAL compiles the encoder's visibility in (qpos, WINDOW; WINDOW 0 = none).
    bg = tl.program_id(1)
    b = (bg // (H // REP)).to(tl.int64)
    g = (bg % (H // REP)).to(tl.int64)
    split = tl.program_id(2)
    part = tl.program_id(0) % (D // DV)  # which DV output columns this program accumulates
    rows = tl.program_id(0) // (D // DV) * BLOCK_M + tl.arange(0, BLOCK_M)  # stacked row = head in group · T + t
    row_ok = rows < REP * T
    h = g * REP + rows // T
    t = rows % T
    cols = tl.arange(0, D)
    vcols = part * DV + tl.arange(0, DV)
    q = tl.load(q_ptr + (b * sqb + h * sqh + t * sqt)[:, None] + cols[None, :], mask=row_ok[:, None], other=0.0)

    n = tl.maximum(tl.minimum(tl.load(len_ptr + b).to(tl.int32), CAP), 0)
    nb_c, total, active = _splits_at(n, CAP, SCRATCH, BLOCK_N, SPLITS, BPS)
    qpos_row = qpos_ptr + b * sqpb
    q_lo, q_hi = query_bounds(qpos_row, t, row_ok, WINDOW, BLOCK_M, CAUSAL)
    if CAUSAL:  # qpos increases along T, so the scratch slots after the block's last row are invisible to all its
        # rows. The split count stays the one of all blocks (the merge kernel recomputes it); the splits share the rest.
        total = nb_c + tl.cdiv(tl.max(tl.where(row_ok, t, 0), 0) + 1, BLOCK_N)
    lo, hi = split_range(split, active, total)

    k_base = k_ptr + b * skb + g * skh
    v_base = v_ptr + b * svb + g * svh
    pos_row = pos_ptr + b * spb
    acc = tl.zeros([BLOCK_M, DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if INTERPRET:
        i = lo
        while i < hi:
            acc, m_i, l_i = _attend_block(q, acc, m_i, l_i, i, k_base, v_base, pos_row, qpos_row, q_lo, q_hi, skn,
                                          svn, n, nb_c, CAP, CAP + SCRATCH, cols, vcols, BLOCK_N, PREFETCH,
                                          LAZY_RESCALE, CAUSAL, PREC, INTERPRET)
            i += 1
    else:
        for i in range(lo, hi):
            acc, m_i, l_i = _attend_block(q, acc, m_i, l_i, i, k_base, v_base, pos_row, qpos_row, q_lo, q_hi, skn,
                                          svn, n, nb_c, CAP, CAP + SCRATCH, cols, vcols, BLOCK_N, PREFETCH,
                                          LAZY_RESCALE, CAUSAL, PREC, INTERPRET)

    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # l_i = 0 only for rows with no valid key at all
    store_rows(o, m_i + tl.log2(l_i), out_ptr, part_ptr, lse_ptr, b, h, t, row_ok, vcols, part, split, active, H, T,
               REP, sob, soh, sot, D, SPLIT)


@triton.jit
def _merge_kernel(part_ptr, lse_ptr, len_ptr, out_ptr, R, H, T, CAP, SCRATCH, BPS, sob, soh, sot,
                  D: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, BLOCK_R: tl.constexpr,
                  PDL: tl.constexpr = False):
    """out = Σ_s 2^(lse_s - max) · o_s / Σ_s 2^(lse_s - max) over the working splits of rows whose row block split."""
    pdl_start(PDL)
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


def small_grid(B: int, H: int, n_kv: int, T: int, D: int, sms: int) -> bool:
    """Whether CUDA_TILES[D]'s unsplit programs fill at most half of `sms` and D has a small-grid tile."""
    tile = CUDA_TILES[D]
    programs = B * n_kv * triton.cdiv((H // n_kv) * T, tile.block_m) * tile.v_parts
    return D in CUDA_SMALL_GRID_TILES and 2 * programs <= sms


def tile_candidates(D: int, small: bool = False) -> list[Tile]:
    """CUDA_TILES[D] (CUDA_SMALL_GRID_TILES[D] if `small`), then with fewer pipeline stages, then narrower key blocks,
    then half the rows (fp32 at D 512): the launcher keeps the first that fits the GPU (Triton raises OutOfResources
    at the first launch when shared memory runs out)."""
    tile = CUDA_SMALL_GRID_TILES[D] if small else CUDA_TILES[D]
    return ([tile._replace(stages=s) for s in range(tile.stages, 0, -1)]
            + [tile._replace(block_n=n, stages=1) for n in (tile.block_n // 2, tile.block_n // 4) if n >= 16]
            + [tile._replace(block_m=tile.block_m // 2, block_n=16, stages=1)])


def split_count(programs: int, slots: int, max_splits: int) -> int:
    """Splits per row block for `programs` unsplit programs on `slots` resident programs (SMs × Tile.per_sm): the
    fewest that fill 90% of the slots of the waves they need, else the best up to max_splits. Batch 1 at D = 512,
    one program per SM: 64 programs → 2 splits, one wave of 128 on 132 SMs."""
    def filled(s: int) -> float:
        return programs * s / (triton.cdiv(programs * s, slots) * slots)
    candidates = range(1, max(1, max_splits) + 1)
    return next((s for s in candidates if filled(s) >= 0.9), max(candidates, key=filled))


def default_config(q: torch.Tensor, n_kv: int, cap: int, scratch: int, tile: Tile | None = None) -> Config:
    """`tile` (default: the first candidate for the head dim) and, on CUDA, enough splits to fill the GPU (batch 1),
    at most one per BLOCKS_PER_SPLIT key blocks of the whole buffer. Fixed by shapes (graphs)."""
    B, H, T, D = q.shape
    if q.device.type != "cuda":
        return Config.of(CUDA_TILES[D]._replace(**INTERPRET_SHAPE))
    tile = tile or tile_candidates(D)[0]
    programs = triton.cdiv((H // n_kv) * T, tile.block_m) * tile.v_parts * B * n_kv
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    max_blocks = triton.cdiv(cap, tile.block_n) + triton.cdiv(scratch, tile.block_n)
    splits = split_count(programs, sms * tile.per_sm, min(triton.cdiv(max_blocks, BLOCKS_PER_SPLIT), 16))
    return Config.of(tile, splits, BLOCKS_PER_SPLIT)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, kv_len: torch.Tensor | None,
           qpos: torch.Tensor | None, window: int | None):
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
    if qpos is not None and (qpos.shape != (B, T) or qpos.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"canvas_attention: qpos must be int [B, T] = {(B, T)}; got {qpos.dtype} {tuple(qpos.shape)}")
    if qpos is not None and k.shape[2] - pos.shape[1] != T:
        raise ValueError(f"canvas_attention: causal mode needs T = {T} scratch slots (the queries' own K/V); got "
                         f"{k.shape[2] - pos.shape[1]}")
    if window is not None and (qpos is None or window < 1):
        raise ValueError(f"canvas_attention: a window ({window}) needs qpos and must be >= 1")
    devices = {t.device for t in (q, k, v, pos) + tuple(t for t in (kv_len, qpos) if t is not None)}
    if len(devices) != 1:
        raise ValueError(f"canvas_attention: tensors on several devices {sorted(map(str, devices))}")


def canvas_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                     kv_len: torch.Tensor | None = None, config: Config | TwoPass | None = None, *,
                     qpos: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor:
    """Attention of q [B, H, T, D] over a cache layer's k, v [B, Hkv, C + scratch, D] with slot positions pos [B, C]
    (-1 = empty) and kv_len [B] (device; slots >= kv_len are not read; None: `cache_lengths(pos)`). The scratch
    slots are always attended, unless qpos [B, T] (the causal mode, the encoder's `prefix_mask`) gives the queries'
    positions: then scratch = T, slot s holds the K/V of position qpos[b, s], qpos must increase along T, and query
    t sees the keys (cache or scratch) at positions p with 0 <= p <= qpos[b, t] and, given a `window`,
    p > qpos[b, t] - window. Returns [B, H, T, D] in q's dtype, a view of a [B, T, H, D] buffer, so the caller's
    `.transpose(1, 2).reshape(B, T, H * D)` before o_proj is free. No host sync; safe to capture in a CUDA graph
    (make the first call, which compiles and picks the tiles, before capturing). `config` forces the launch
    parameters (tests, the bench's sweep); by default they come from `default_config` with the first tile shape
    that fits the GPU. A `TwoPass` config, or on CUDA a head dim in attention_two_pass.CUDA_TWO_PASS (D 512: the
    full layers), runs the two-pass kernels (scores, then values) instead."""
    _check(q, k, v, pos, kv_len, qpos, window)
    B, H, T, D = q.shape
    n_kv, S = k.shape[1], k.shape[2]
    cap = pos.shape[1]
    scratch = S - cap
    q = q if q.stride(3) == 1 else q.contiguous()
    pos = pos if pos.stride(1) == 1 else pos.contiguous()
    qpos = qpos if qpos is None or qpos.stride(1) == 1 else qpos.contiguous()
    kv_len = cache_lengths(pos) if kv_len is None else kv_len
    causal = (qpos, window)
    out = torch.empty(B, T, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)  # [B, H, T, D] view
    if out.numel() == 0:
        return out
    from dgemma.kernels import attention_two_pass as two  # it imports this module

    if isinstance(config, two.TwoPass):
        two.two_pass_launch(q, k, v, pos, kv_len, out, config, *causal)
        return out
    if config is None and (tp := two.two_pass_default(q)) is not None:
        try:
            two.two_pass_launch(q, k, v, pos, kv_len, out, two.two_pass_config(q, n_kv, cap, scratch, tp), *causal)
            return out
        except triton.runtime.errors.OutOfResources:  # this GPU cannot fit the tiles: the fused kernel from now on
            two.CUDA_TWO_PASS.pop(D, None)
    if config is not None or q.device.type != "cuda":
        _launch(q, k, v, pos, kv_len, out, config or default_config(q, n_kv, cap, scratch), *causal)
        return out
    small = small_grid(B, H, n_kv, T, D, torch.cuda.get_device_properties(q.device).multi_processor_count)
    key, tiles = (q.device.index, D, q.dtype, small), tile_candidates(D, small)
    for i in range(_TILE_FITS.get(key, 0), len(tiles)):
        try:
            _launch(q, k, v, pos, kv_len, out, default_config(q, n_kv, cap, scratch, tiles[i]), *causal)
        except triton.runtime.errors.OutOfResources:
            if i == len(tiles) - 1:
                raise
            continue
        _TILE_FITS[key] = i
        return out


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, kv_len: torch.Tensor,
            out: torch.Tensor, cfg: Config, qpos: torch.Tensor | None = None, window: int | None = None) -> None:
    B, H, T, D = q.shape
    n_kv, cap = k.shape[1], pos.shape[1]
    scratch = k.shape[2] - cap
    part, lse = split_buffers(cfg.splits, out)
    rep = H // n_kv
    if D % cfg.v_parts:
        raise ValueError(f"canvas_attention: v_parts {cfg.v_parts} does not divide head dim {D}")
    grid = (triton.cdiv(rep * T, cfg.block_m) * cfg.v_parts, B * n_kv, cfg.splits)
    qp = pos if qpos is None else qpos  # not read unless CAUSAL
    _canvas_attn_kernel[grid](
        q, k, v, pos, qp, kv_len, out, part, lse, H, T, rep, cap, scratch, cfg.splits, cfg.blocks_per_split,
        window or 0, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), pos.stride(0), qp.stride(0), out.stride(0), out.stride(1),
        out.stride(2), D=D, DV=D // cfg.v_parts, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SPLIT=cfg.splits > 1,
        PREFETCH=cfg.prefetch, LAZY_RESCALE=cfg.lazy_rescale, CAUSAL=qpos is not None,
        PREC=precision(q.dtype), INTERPRET=os.environ.get("TRITON_INTERPRET") == "1", num_warps=cfg.warps,
        num_stages=cfg.stages,
        **pdl(q.device))
    merge_splits(part, lse, kv_len, out, cap, scratch, cfg.block_n, cfg.splits, cfg.blocks_per_split)


def split_buffers(splits: int, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial outputs [splits, B·H·T, D] fp32, their log-sum-exps [splits, B·H·T]) for `splits` > 1 (else out
    twice: not written)."""
    B, H, T, D = out.shape
    if splits == 1:
        return out, out
    return (torch.empty(splits, B * H * T, D, dtype=torch.float32, device=out.device),
            torch.empty(splits, B * H * T, dtype=torch.float32, device=out.device))


def merge_splits(part: torch.Tensor, lse: torch.Tensor, kv_len: torch.Tensor, out: torch.Tensor, cap: int,
                 scratch: int, block_n: int, splits: int, blocks_per_split: int) -> None:
    """The rows of out [B, H, T, D] whose keys were split (at their kv_len, over block_n-key blocks): the merge of
    their partial outputs by log-sum-exp. Nothing when splits == 1."""
    if splits == 1:
        return
    B, H, T, D = out.shape
    R, block_r = B * H * T, max(1, 4096 // D)
    _merge_kernel[(triton.cdiv(R, block_r),)](
        part, lse, kv_len, out, R, H, T, cap, scratch, blocks_per_split, out.stride(0), out.stride(1), out.stride(2),
        D=D, BLOCK_N=block_n, SPLITS=splits, BLOCK_R=block_r, num_warps=4, **pdl(out.device))


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                        kv_len: torch.Tensor | None = None, *, qpos: torch.Tensor | None = None,
                        window: int | None = None) -> torch.Tensor:
    """The model's math (`Attention.forward_decoder_static` with `KVCache.decoder_mask`; with qpos the causal mask of
    `Attention.prefix_mask`, as `encoder_static_context`): query heads stacked per KV head, sdpa with a boolean mask
    over the whole buffer, scale 1. kv_len, if given, also masks slots >= it."""
    B, H, T, D = q.shape
    n_kv, S = k.shape[1], k.shape[2]
    cap = pos.shape[1]
    valid = pos >= 0
    if kv_len is not None:
        valid = valid & (torch.arange(cap, device=pos.device) < kv_len[:, None])
    if qpos is None:
        mask = torch.cat([valid, torch.ones(B, S - cap, dtype=torch.bool, device=pos.device)], dim=1)[:, None, None]
    else:  # [B, 1, rep·T, S]: the row of stacked query (head j, t) is t's
        kp, qp = torch.cat([torch.where(valid, pos, -1), qpos], dim=1)[:, None, :], qpos[:, :, None]
        mask = (kp >= 0) & (kp <= qp) & ((kp > qp - window) if window else True)
        mask = mask.repeat(1, H // n_kv, 1)[:, None]
    out = F.scaled_dot_product_attention(q.reshape(B, n_kv, (H // n_kv) * T, D), k, v, attn_mask=mask, scale=1.0)
    return out.reshape(B, H, T, D)

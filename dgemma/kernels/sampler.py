"""Fused sampler: temperature, race sample, argmax, entropy and the self-conditioning softmax, two passes over V.

What it computes per row r of logits [R, V] (x = the row, optionally softcapped first, then divided by its
temperature: exactly `fast.scores` on `logits / temp`):
    sample   argmax(softmax(x) / E) with E ~ Exp(1) i.i.d. (the exponential race, = torch.multinomial(p, 1))
    argmax   argmax(x), the first index on ties (as torch.argmax)
    entropy  Categorical(logits=x).entropy()
    probs    softmax(x rounded to probs_dtype) in fp32, written once in probs_dtype (what `soft_from_probs` feeds
             the embedding matmul; upstream takes the self-conditioning softmax of the scores in the model dtype)

Notable choices:
- Pass 1 (grid rows × splits) streams a chunk of the row once with an online softmax in base 2 (as flash attention:
  d = x log2(e) - m log2(e)): running max m, Z = Σ 2^d, SD = Σ 2^d d (so H = ln Z - SD ln(2) / Z), the bf16 sum Zb,
  the race winner and the first tile holding the max, and writes 6 floats + 2 ints per (row, split). The sums and
  winners are kept per lane and reduced once at the end of the chunk; only the max is shared by the lanes (one
  reduction per tile of 4 blocks). The argmax is not tracked per element: the chunk's first tile reaching m is
  scored again at the end and its first column equal to m taken. Pass 2 combines the splits of its row (a few
  values), writes sample/argmax/entropy once per row, and writes probs over its chunk. Splitting V keeps ~4 programs
  per SM at batch 1 (256 rows) without a third launch.
- The race is compared in log space, key = x log2(e) - log2 E = log2(e) (x + G) with G = -ln(-ln(1 - W)) a Gumbel
  draw: a positive multiple of log(p / E) + const, so the same winner as argmax(p / E) (the Gumbel-max trick, same
  distribution), and a function of the column's score and draw only: the winner does not depend on the split or
  the running max. Rounding can only flip exact near-ties between the two forms.
- Noise is Philox4x32-10 (`tl.philox`): key = seed[r // G] (G = R / len(seed)), counter = (column quad, r % G,
  offset lo, offset hi), offset = offset[r // G] or the single offset. It is read from a device tensor, so a CUDA
  graph advances it without recapture (bump it in place, or pass the rows' own step counters). One Philox call
  gives 4 words, used by 4 sub-blocks of NOISE_Q columns, so the noise of (row, column) does not depend on the
  split or block sizes. E = -log1p(-W) with W uniform from all 32 bits (resolution 2^-32 near 0, where the race
  winners are).
- The pass is bound by instruction issue, not by its 2 bytes per score, so `fast_math` (the default when compiled)
  trims the stats pass from ~200 to ~58 SASS instructions per score (sm_90):
    softcap   cap tanh(x / cap) / T = c - 2c / (2^(x 2 log2(e) / cap) + 1), c = cap / T: one ex2 and one rcp (MUFU)
              instead of expm1's exp, log and three divisions; absolute error ~c 2^-22 (a few ulps of a score)
    noise     E = W + W^2 Q(W) below W = 1/4 (Q a quartic fit), -ln(2) lg2(1 - W) above: E within 6e-7 relative
              of log1p's (lg2.approx alone is only absolute-accurate, too coarse where E ~ W is small)
    race key  lg2.approx of E: absolute error 2^-22, below the float rounding of the key
    probs     one reciprocal of Zb per program instead of a division per score
  The interpreter has no libdevice: with fast_math it runs the same formulas with exact lg2/rcp (tests cover them),
  so GPU results differ from the interpreter's in the last bits, as do fast_math=False's (the formulas above
  replaced by fmath's accurate tanh and log1p, divisions and precise logs; that path is the CPU default).
- The stats pass loads one lane per thread per block (no vector loads): Triton then keeps the Philox counters and
  the scores in one layout; with vector loads it moves the noise through shared memory (8 barriers per tile).
- Rounding to bf16 goes through `fmath.round_to` (on the bits), so the interpreter matches the GPU.
- `noise=` takes explicit exponentials [R, V] instead of Philox (tests; the drop-in for `fast.scores`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from dgemma.kernels.fmath import MODES, log1p, log2, rcp, round_to, tanh

NOISE_Q = 1024  # columns per sub-block; a tile is 4 sub-blocks sharing one Philox call. Fixed: it defines the noise.
TILE = 4 * NOISE_Q
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
WARPS = (8, 8)  # num_warps of (stats, finish) on CUDA: the stats pass then holds 4 lanes per thread per block, its
#                 5 state vectors and a tile's 8 score/noise vectors in ~75 registers (3 CTAs, 24 warps per SM)
PROGRAMS_PER_SM = 4  # the default split aims at this many programs per SM at batch 1
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Fast E = -log1p(-W) below W = 1/4: W + W^2 Q(W), Q a degree-4 fit of (-log1p(-W) - W) / W^2 (max relative error
# 1.1e-7 in fp32 over [0, 1/4)); above, -ln2 * lg2(1 - W), whose 2^-22 absolute error is <= 6e-7 of E >= 0.29.
E_TAU = tl.constexpr(0.25)
E_Q0, E_Q1 = tl.constexpr(0.5000072717666626), tl.constexpr(0.33293071389198303)
E_Q2, E_Q3 = tl.constexpr(0.25711020827293396), tl.constexpr(0.14670336246490479)
E_Q4 = tl.constexpr(0.3357095718383789)


# --- device helpers ---------------------------------------------------------------------------------------------
@triton.jit
def _scores(row_ptr, cols, n, temp, cap, SOFTCAP: tl.constexpr, HAS_TEMP: tl.constexpr, EVEN: tl.constexpr,
            FAST: tl.constexpr):
    """The processed scores row_ptr[cols] (fp32, -inf where cols >= n): softcap(x) / temperature."""
    if EVEN:
        x = tl.load(row_ptr + cols).to(tl.float32)
    else:
        x = tl.load(row_ptr + cols, mask=cols < n, other=0.0).to(tl.float32)
    if SOFTCAP and FAST:
        # cap * tanh(x / cap) / temp = c - 2c / (exp(2x / cap) + 1), c = cap / temp: one exp2 and one rcp (MUFU).
        # Absolute error ~ c * 2^-22 (a few ulps of a score near c / 2); x = +-inf gives +-c exactly.
        c = cap / temp if HAS_TEMP else cap
        x = c - (2.0 * c) * rcp(tl.exp2(x * (2.0 * LOG2E / cap)) + 1.0, FAST)
    else:
        if SOFTCAP:
            x = tanh(x / cap) * cap  # lm_head: tanh(logits / cap) * cap
        if HAS_TEMP:
            x = x / temp  # a division, as `logits / temp`: the bf16-rounded scores then match torch's
    if not EVEN:
        x = tl.where(cols < n, x, float("-inf"))
    return x


@triton.jit
def _block_scores(x_row, b, lanes, V, temp, cap, SOFTCAP: tl.constexpr, HAS_TEMP: tl.constexpr,
                  EVEN: tl.constexpr, FAST: tl.constexpr, Q: tl.constexpr):
    """The scores of block b of a row (columns b * Q + lanes), addressed from the block's base so that a thread's
    columns are immediate offsets of one address."""
    return _scores(x_row + b * Q, lanes, V - b * Q, temp, cap, SOFTCAP, HAS_TEMP, EVEN, FAST)


@triton.jit
def _exponential(word, FAST: tl.constexpr):
    """Exp(1) from a uint32 Philox word: W = (word + 1/2) / 2^32 in (0, 1), E = -log1p(-W), always in (0, 17)."""
    w = tl.minimum(word.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10, 0.99999994)
    if FAST:  # lg2.approx is absolute-accurate only: a series where -log(1 - W) is small (E ~ W, the race winners)
        q = E_Q0 + w * (E_Q1 + w * (E_Q2 + w * (E_Q3 + w * E_Q4)))
        e = tl.where(w < E_TAU, w + (w * w) * q, -LN2 * log2(1.0 - w, FAST))
    else:
        e = -log1p(-w)
    return e


@triton.jit
def _tile_noise(key, lane_in_row, sub_row, off_lo, off_hi, FAST: tl.constexpr):
    """Four blocks of Exp(1) for the tile whose quad counters are `lane_in_row` ([NOISE_Q] uint32)."""
    c1 = tl.zeros_like(lane_in_row) + sub_row
    c2 = tl.zeros_like(lane_in_row) + off_lo
    c3 = tl.zeros_like(lane_in_row) + off_hi
    r0, r1, r2, r3 = tl.philox(key, lane_in_row, c1, c2, c3)
    return _exponential(r0, FAST), _exponential(r1, FAST), _exponential(r2, FAST), _exponential(r3, FAST)


@triton.jit
def _fold(z, sd, zb, best, best_b, x, log2_e, b, m2, mb2, ROUND: tl.constexpr, FINITE: tl.constexpr):
    """Add one block of scores x (race noise log2 E, block number b) to the per-lane state, in base 2 relative to
    m2 = m * log2(e): Z += 2^d, SD += 2^d * d with d = x log2(e) - m2, Zb += 2^(round(x) log2(e) - mb2)."""
    d = x * LOG2E - m2
    if not FINITE:
        d = tl.maximum(d, -255.0)  # x = -inf: 2^d = 0 and 0 * d = 0 (Categorical clamps logp)
    p = tl.exp2(d)
    z += p
    sd += p * d
    if ROUND != 0:  # Zb is relative to round(m): 2^(xb - mb) then matches softmax(x.to(bf16)) term by term
        zb += tl.exp2(round_to(x, ROUND) * LOG2E - mb2)
    key = x * LOG2E - log2_e  # the race key log2(p / E) + const: a function of (x, E) alone, so the winner does not
    take = key > best  # depend on the split; strict: a lane meets its columns in order, so it keeps the first of a tie
    best = tl.where(take, key, best)
    best_b = tl.where(take, b, best_b)
    return z, sd, zb, best, best_b


@triton.jit
def _update(st, x0, x1, x2, x3, l0, l1, l2, l3, b, ROUND: tl.constexpr, FINITE: tl.constexpr):
    """Fold one tile (4 blocks of scores x with race noise log2 E = l, block numbers b..b+3) into the running state of
    a chunk. The state is per lane (vectors over a block's lanes) except the max m and the first block of the tile
    where m was reached, which the lanes share: one reduction per tile; the sums and winners are reduced across lanes
    once, in `_reduce_lanes`."""
    m, z, sd, zb, best, best_b, top_b = st
    x_max = tl.max(tl.maximum(tl.maximum(x0, x1), tl.maximum(x2, x3)), 0)
    top_b = tl.where(x_max > m, b, top_b)  # strict: the first tile holding the max
    m_new = tl.maximum(m, x_max)
    ref_old = tl.where(m == float("-inf"), 0.0, m)  # nothing finite yet: keep exp2() away from nan
    ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    m2, m2_old = ref * LOG2E, ref_old * LOG2E  # the sums are relative to 2^m2: rescale to the new one
    alpha = tl.exp2(m2_old - m2)
    sd = alpha * (sd + (m2_old - m2) * z)
    z = alpha * z
    mb2 = m2
    if ROUND != 0:
        mb2 = round_to(ref, ROUND) * LOG2E
        zb = zb * tl.exp2(round_to(ref_old, ROUND) * LOG2E - mb2)
    z, sd, zb, best, best_b = _fold(z, sd, zb, best, best_b, x0, l0, b, m2, mb2, ROUND, FINITE)
    z, sd, zb, best, best_b = _fold(z, sd, zb, best, best_b, x1, l1, b + 1, m2, mb2, ROUND, FINITE)
    z, sd, zb, best, best_b = _fold(z, sd, zb, best, best_b, x2, l2, b + 2, m2, mb2, ROUND, FINITE)
    z, sd, zb, best, best_b = _fold(z, sd, zb, best, best_b, x3, l3, b + 3, m2, mb2, ROUND, FINITE)
    return m_new, z, sd, zb, best, best_b, top_b


@triton.jit
def _first_max(x_row, b, lanes, m, V, temp, cap, SOFTCAP: tl.constexpr, HAS_TEMP: tl.constexpr,
               EVEN: tl.constexpr, FAST: tl.constexpr, Q: tl.constexpr):
    """The first column of the tile of blocks b..b+3 whose score equals m: the argmax, found once per chunk rather
    than tracked per element (the same `_scores`, so the same floats the max was taken over)."""
    last = tl.minimum((b + 4) * Q, V) - 1  # a column still, if none equals m (a row of NaNs)
    first = tl.zeros_like(lanes) + last
    for j in tl.static_range(0, 4):
        x = _block_scores(x_row, b + j, lanes, V, temp, cap, SOFTCAP, HAS_TEMP, EVEN, FAST, Q)
        first = tl.minimum(first, tl.where(x == m, (b + j) * Q + lanes, first))
    return tl.min(first, 0)


@triton.jit
def _reduce_lanes(st, lanes, Q: tl.constexpr):
    """The per-lane state of a chunk → (m, Z, SD, Zb, race best, its column (block b, lane j: b * Q + j; ties → the
    first column), the first block of the tile holding the max)."""
    m, z, sd, zb, best, best_b, top_b = st
    b = tl.max(best, 0)
    bi = tl.min(tl.where(best == b, best_b * Q + lanes, 2147483647), 0)
    return m, tl.sum(z, 0), tl.sum(sd, 0), tl.sum(zb, 0), b, bi, top_b


# --- kernels ----------------------------------------------------------------------------------------------------
@triton.jit
def _stats_kernel(x_ptr, stride_x, temp_ptr, temp_stride, temp_group, cap, seed_ptr, offset_ptr, off_stride, group,
                  noise_ptr, stride_n,
                  wf_ptr, wi_ptr, V, chunk, n_split,
                  SOFTCAP: tl.constexpr, HAS_TEMP: tl.constexpr, HAS_NOISE: tl.constexpr, ROUND: tl.constexpr,
                  EVEN: tl.constexpr, FAST: tl.constexpr, Q: tl.constexpr, N_TILES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    x_row = x_ptr + row * stride_x
    temp = tl.load(temp_ptr + (row // temp_group) * temp_stride) if HAS_TEMP else 1.0
    if not HAS_NOISE:
        key = tl.load(seed_ptr + row // group)
        off = tl.load(offset_ptr + (row // group) * off_stride).to(tl.int64).to(tl.uint64)
        off_lo, off_hi = (off & 0xFFFFFFFF).to(tl.uint32), (off >> 32).to(tl.uint32)
        sub_row = (row % group).to(tl.uint32)
    lanes = tl.max_contiguous(tl.arange(0, Q), 1)  # no vector loads: one layout for the scores and the noise
    ninf = tl.full([Q], float("-inf"), tl.float32)
    zero = tl.zeros([Q], tl.float32)
    b0 = split * (chunk // Q)  # the chunk's first block
    st = (tl.full([], float("-inf"), tl.float32), zero, zero, zero, ninf, tl.zeros([Q], tl.int32) + b0, b0)
    for i in range(0, N_TILES):  # tiles past V are masked (only in the last split, and only when not EVEN)
        b = b0 + 4 * i  # the tile's first block: columns b * Q ... (b + 4) * Q - 1
        if HAS_NOISE:
            n_row = noise_ptr + row * stride_n + b * Q
            e0 = tl.load(n_row + lanes, mask=lanes < V - b * Q, other=1.0)
            e1 = tl.load(n_row + Q + lanes, mask=lanes < V - (b + 1) * Q, other=1.0)
            e2 = tl.load(n_row + 2 * Q + lanes, mask=lanes < V - (b + 2) * Q, other=1.0)
            e3 = tl.load(n_row + 3 * Q + lanes, mask=lanes < V - (b + 3) * Q, other=1.0)
        else:
            e0, e1, e2, e3 = _tile_noise(key, (b * (Q // 4) + lanes).to(tl.uint32), sub_row, off_lo, off_hi, FAST)
        st = _update(st, _block_scores(x_row, b, lanes, V, temp, cap, SOFTCAP, HAS_TEMP, EVEN, FAST, Q),
                     _block_scores(x_row, b + 1, lanes, V, temp, cap, SOFTCAP, HAS_TEMP, EVEN, FAST, Q),
                     _block_scores(x_row, b + 2, lanes, V, temp, cap, SOFTCAP, HAS_TEMP, EVEN, FAST, Q),
                     _block_scores(x_row, b + 3, lanes, V, temp, cap, SOFTCAP, HAS_TEMP, EVEN, FAST, Q),
                     log2(e0, FAST), log2(e1, FAST), log2(e2, FAST), log2(e3, FAST), b, ROUND,
                     SOFTCAP and EVEN)  # then every score is finite: no -inf guard
    m, z, sd, zb, best, best_i, top_b = _reduce_lanes(st, lanes, Q)
    top_i = _first_max(x_row, top_b, lanes, m, V, temp, cap, SOFTCAP, HAS_TEMP, EVEN, FAST, Q)
    wf = wf_ptr + (row * n_split + split) * 6
    tl.store(wf + 0, m)
    tl.store(wf + 1, z)
    tl.store(wf + 2, sd)
    tl.store(wf + 3, zb)
    tl.store(wf + 4, best)
    tl.store(wf + 5, m)
    wi = wi_ptr + (row * n_split + split) * 2
    tl.store(wi + 0, best_i.to(tl.int32))
    tl.store(wi + 1, top_i.to(tl.int32))


@triton.jit
def _finish_kernel(x_ptr, stride_x, temp_ptr, temp_stride, temp_group, cap, wf_ptr, wi_ptr, sample_ptr, argmax_ptr,
                   entropy_ptr, probs_ptr, stride_p, V, chunk, n_split,
                   SOFTCAP: tl.constexpr, HAS_TEMP: tl.constexpr, ROUND: tl.constexpr, SPLIT_P2: tl.constexpr,
                   EVEN: tl.constexpr, FAST: tl.constexpr, BLOCK: tl.constexpr, N_TILES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    # Combine the splits of this row (every program of the row does it; it is a handful of values), in base 2 as
    # the stats pass summed them: split k's sums are relative to 2^(m_k log2(e)).
    sp = tl.arange(0, SPLIT_P2)
    ok = sp < n_split
    wf = wf_ptr + (row * n_split + sp) * 6
    ninf = float("-inf")
    m_s = tl.load(wf + 0, mask=ok, other=ninf)
    z_s = tl.load(wf + 1, mask=ok, other=0.0)
    sd_s = tl.load(wf + 2, mask=ok, other=0.0)
    zb_s = tl.load(wf + 3, mask=ok, other=0.0)
    m = tl.max(m_s, 0)
    m2, m2_s = m * LOG2E, m_s * LOG2E
    alpha = tl.where(z_s > 0, tl.exp2(m2_s - m2), 0.0)
    z = tl.sum(alpha * z_s, 0)
    sd = tl.sum(tl.where(z_s > 0, alpha * (sd_s + (m2_s - m2) * z_s), 0.0), 0)
    if ROUND != 0:
        mb2 = round_to(m, ROUND) * LOG2E
        zb = tl.sum(tl.where(zb_s > 0, zb_s * tl.exp2(round_to(m_s, ROUND) * LOG2E - mb2), 0.0), 0)
    else:
        mb2, zb = m2, z
    if split == 0:
        best_s = tl.load(wf + 4, mask=ok, other=ninf)
        top_s = tl.load(wf + 5, mask=ok, other=ninf)
        wi = wi_ptr + (row * n_split + sp) * 2
        _, b = tl.max(best_s, 0, return_indices=True, return_indices_tie_break_left=True)
        _, a = tl.max(top_s, 0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(sample_ptr + row, tl.sum(tl.where(sp == b, tl.load(wi, mask=ok, other=0), 0), 0).to(tl.int64))
        tl.store(argmax_ptr + row, tl.sum(tl.where(sp == a, tl.load(wi + 1, mask=ok, other=0), 0), 0).to(tl.int64))
        tl.store(entropy_ptr + row, (tl.log2(z) - sd / z) * LN2)  # H = ln Z - SD ln(2) / Z
    # Self-conditioning probabilities over this program's chunk, written once.
    temp = tl.load(temp_ptr + (row // temp_group) * temp_stride) if HAS_TEMP else 1.0
    inv_zb = 1.0 / zb
    x_row = x_ptr + row * stride_x
    p_row = probs_ptr + row * stride_p
    start = split * chunk
    for i in range(0, N_TILES):
        cols = start + i * BLOCK + tl.arange(0, BLOCK)
        x = round_to(_scores(x_row, cols, V, temp, cap, SOFTCAP, HAS_TEMP, EVEN, FAST), ROUND)
        p = tl.exp2(x * LOG2E - mb2)
        if FAST:
            p = p * inv_zb
        else:
            p = p / zb
        p = round_to(p, ROUND)  # exact in the output dtype (the interpreter's cast truncates); free: MUFU-bound
        if EVEN:
            tl.store(p_row + cols, p.to(probs_ptr.dtype.element_ty))
        else:
            tl.store(p_row + cols, p.to(probs_ptr.dtype.element_ty), mask=cols < V)


@triton.jit
def _noise_kernel(seed_ptr, offset_ptr, off_stride, group, out_ptr, V, FAST: tl.constexpr, Q: tl.constexpr):
    """Writes the Exp(1) draws the fused sampler uses for (row, columns of one tile): for tests and references."""
    row = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * 4 * Q
    key = tl.load(seed_ptr + row // group)
    off = tl.load(offset_ptr + (row // group) * off_stride).to(tl.int64).to(tl.uint64)
    lanes = tl.arange(0, Q)
    e0, e1, e2, e3 = _tile_noise(key, (t // 4 + lanes).to(tl.uint32), (row % group).to(tl.uint32),
                                 (off & 0xFFFFFFFF).to(tl.uint32), (off >> 32).to(tl.uint32), FAST)
    out = out_ptr + row * V + t + lanes
    tl.store(out, e0, mask=t + lanes < V)
    tl.store(out + Q, e1, mask=t + Q + lanes < V)
    tl.store(out + 2 * Q, e2, mask=t + 2 * Q + lanes < V)
    tl.store(out + 3 * Q, e3, mask=t + 3 * Q + lanes < V)


# --- launchers --------------------------------------------------------------------------------------------------
def fused_sample(logits: torch.Tensor, temperature: torch.Tensor | None = None, seed: torch.Tensor | None = None,
                 offset: torch.Tensor | None = None, *, noise: torch.Tensor | None = None, softcap: float = 0.0,
                 probs_dtype: torch.dtype = torch.bfloat16, split: int | None = None,
                 warps: tuple[int, int] | None = None, fast_math: bool | None = None):
    """Race sample, argmax, entropy and self-conditioning probs of logits [R, V] in two passes over V.

    logits: fp32, bf16 or fp16 [R, V], unit stride along V. The scores are x = softcap(logits) / temperature.
    temperature: fp32 device tensor with T elements, T dividing R (1, one per canvas row, or R); None: 1. Rows
        r*R/T .. (r+1)*R/T - 1 use temperature[r]. Divided, not multiplied, like `logits / temp`.
    seed: int64 device tensor [S], S dividing R: rows r*R/S .. (r+1)*R/S - 1 share key seed[r] (one seed per batch
        row with R = B*C gives noise that does not depend on where the request sits in the batch).
    offset: int64 or int32 device tensor, 1 element or one per seed: the Philox counter (the step). Advance it in
        place between steps (or pass a per-row step counter, so a row's draws depend only on its own steps).
    noise: explicit Exp(1) draws, fp32 [R, V] (instead of seed/offset).
    softcap: apply cap * tanh(x / cap) first (pass the raw bf16 LM-head output and the model's
        final_logit_softcapping to skip materialising fp32 logits).
    probs_dtype: the self-conditioning dtype (the model dtype): the scores are rounded to it before the softmax,
        and the probabilities are written in it.
    split: programs per row (None: `default_split`).
    warps: num_warps of the (stats, finish) kernels (None: WARPS).
    fast_math: the exp2/rcp softcap, the series/lg2 noise and MUFU lg2/rcp (module docstring; None: on when
        compiled, off under TRITON_INTERPRET, which runs the fast formulas with exact lg2/rcp when asked).
    Returns sample [R] int64, argmax [R] int64, entropy [R] fp32, probs [R, V] probs_dtype.
    """
    launches = sample_launches(logits, temperature, seed, offset, noise=noise, softcap=softcap,
                               probs_dtype=probs_dtype, split=split, warps=warps, fast_math=fast_math)
    launches.stats()
    launches.finish()
    return launches.out


class Launches(NamedTuple):
    """`fused_sample`'s two kernel launches bound to their arguments, and the outputs they write (the bench times
    the passes apart; a pass can be replayed on its own, the finish pass reading the last stats pass's partials)."""
    stats: Callable[[], object]
    finish: Callable[[], object]
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def sample_launches(logits: torch.Tensor, temperature: torch.Tensor | None, seed: torch.Tensor | None,
                    offset: torch.Tensor | None, *, noise: torch.Tensor | None = None, softcap: float = 0.0,
                    probs_dtype: torch.dtype = torch.bfloat16, split: int | None = None,
                    warps: tuple[int, int] | None = None, fast_math: bool | None = None) -> Launches:
    """Checks `fused_sample`'s arguments (same meaning), allocates its outputs and binds its two launches."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be [R, V] with unit stride along V, got {tuple(logits.shape)}")
    if logits.dtype not in MODES or probs_dtype not in MODES:
        raise ValueError(f"unsupported dtypes: logits {logits.dtype}, probs {probs_dtype}")
    R, V = logits.shape
    dev = logits.device
    assert R * V < 2**62 and V < 2**31
    seed, offset, noise_args = _noise_args(logits, seed, offset, noise)
    temp_args = _temp_args(R, temperature, seed)
    split = split or default_split(R, V, dev)
    chunk = triton.cdiv(triton.cdiv(V, split), TILE) * TILE  # a whole number of tiles: noise stays put
    n_split = triton.cdiv(V, chunk)
    stats_warps, finish_warps = warps or WARPS
    wf = torch.empty(R, n_split, 6, dtype=torch.float32, device=dev)
    wi = torch.empty(R, n_split, 2, dtype=torch.int32, device=dev)
    out = (torch.empty(R, dtype=torch.int64, device=dev), torch.empty(R, dtype=torch.int64, device=dev),
           torch.empty(R, dtype=torch.float32, device=dev), torch.empty(R, V, dtype=probs_dtype, device=dev))
    if R == 0:
        return Launches(lambda: None, lambda: None, out)
    # Loop trip counts are constexpr: the interpreter cannot loop over a runtime bound with numpy >= 2.4, and on GPU
    # they are fixed per (V, split) anyway. EVEN: every tile of every split is whole, no masks.
    flags = dict(SOFTCAP=bool(softcap), HAS_TEMP=temperature is not None, ROUND=MODES[probs_dtype],
                 EVEN=V % chunk == 0, FAST=_fast_math(fast_math), N_TILES=chunk // TILE)
    x_args = (logits, logits.stride(0), *temp_args, float(softcap) or 1.0)
    stats = functools.partial(_stats_kernel[(R, n_split)], *x_args, *noise_args, wf, wi, V, chunk, n_split,
                              HAS_NOISE=noise is not None, Q=NOISE_Q, num_warps=stats_warps, **flags)
    finish = functools.partial(_finish_kernel[(R, n_split)], *x_args, wf, wi, *out, out[3].stride(0), V, chunk,
                               n_split, SPLIT_P2=triton.next_power_of_2(n_split), BLOCK=TILE,
                               num_warps=finish_warps, **flags)
    return Launches(stats, finish, out)


def default_split(R: int, V: int, device: torch.device) -> int:
    """Programs per row: on CUDA the power of two giving ~PROGRAMS_PER_SM programs per SM for R rows; 1 elsewhere."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.next_power_of_2(triton.cdiv(PROGRAMS_PER_SM * sms, max(R, 1))), triton.cdiv(V, TILE)))


def _noise_args(logits: torch.Tensor, seed: torch.Tensor | None, offset: torch.Tensor | None,
                noise: torch.Tensor | None):
    """→ seed, offset, and the stats kernel's (seed, offset, offset stride, group, noise, noise stride)."""
    R = logits.shape[0]
    if noise is None:
        if seed is None or offset is None:
            raise ValueError("pass seed and offset (device tensors), or explicit noise")
        if seed.dtype != torch.int64 or R % seed.numel() or offset.numel() not in (1, seed.numel()):
            raise ValueError("seed must be int64 with a length dividing R; offset 1 element or one per seed")
        if offset.dtype not in (torch.int64, torch.int32):
            raise ValueError("offset must be int64 or int32")
        group, noise_arg, noise_stride = R // seed.numel(), logits, 0  # noise_arg unused (HAS_NOISE=False)
    else:
        if noise.shape != logits.shape or noise.dtype != torch.float32 or noise.stride(1) != 1:
            raise ValueError("noise must be fp32 [R, V] with unit stride along V")
        seed = offset = torch.zeros(1, dtype=torch.int64, device=logits.device)
        group, noise_arg, noise_stride = 1, noise, noise.stride(0)
    off_stride = offset.reshape(-1).stride(0) if offset.numel() > 1 else 0
    return seed, offset, (seed, offset, off_stride, group, noise_arg, noise_stride)


def _temp_args(R: int, temperature: torch.Tensor | None, dummy: torch.Tensor):
    """→ the kernels' (temperature, its stride, rows per temperature); `dummy` stands in for None (unread)."""
    if temperature is None:
        return dummy, 0, 1
    if temperature.dtype != torch.float32 or temperature.numel() == 0 or R % temperature.numel():
        raise ValueError("temperature must be an fp32 tensor whose length divides R")
    temperature = temperature.reshape(-1)
    return temperature, temperature.stride(0), R // temperature.numel()


def philox_exponentials(seed: torch.Tensor, offset: torch.Tensor, rows: int, vocab: int, *,
                        fast_math: bool | None = None) -> torch.Tensor:
    """The Exp(1) draws [rows, vocab] that `fused_sample(..., seed, offset, fast_math=...)` uses (tests, references)."""
    out = torch.empty(rows, vocab, dtype=torch.float32, device=seed.device)
    off_stride = offset.reshape(-1).stride(0) if offset.numel() > 1 else 0
    _noise_kernel[(rows, triton.cdiv(vocab, TILE))](seed, offset, off_stride, rows // seed.numel(), out, vocab,
                                                     FAST=_fast_math(fast_math), Q=NOISE_Q)
    return out


def _fast_math(fast_math: bool | None) -> bool:
    return not INTERPRET if fast_math is None else fast_math


def fused_scores(processed: torch.Tensor, race: torch.Tensor, sc_dtype: torch.dtype):
    """Drop-in for `engine.fast.scores` (same arguments, same results up to float rounding): processed scores
    [..., V] fp32 and explicit race draws [..., V]. Returns sample, argmax, entropy [...] and probs [..., V] in
    sc_dtype (the caller's `soft_from_probs` casts them to the model dtype anyway)."""
    V = processed.shape[-1]
    lead = processed.shape[:-1]
    out = fused_sample(processed.reshape(-1, V), noise=race.reshape(-1, V).float(), probs_dtype=sc_dtype)
    return tuple(t.view(*lead, *t.shape[1:]) for t in out)


# --- reference --------------------------------------------------------------------------------------------------
def reference_sample(logits: torch.Tensor, temperature: torch.Tensor | None, noise: torch.Tensor, *,
                     softcap: float = 0.0, probs_dtype: torch.dtype = torch.bfloat16):
    """Pure torch, the engine's math op for op: lm_head's softcap, `logits / temp`, `fast.scores`, and the cast
    of the probabilities in `soft_from_probs`."""
    x = logits.float()
    if softcap:
        x = torch.tanh(x / softcap) * softcap
    if temperature is not None:
        x = x / temperature.reshape(-1).repeat_interleave(x.shape[0] // temperature.numel())[:, None]
    probs = torch.softmax(x, dim=-1, dtype=torch.float32)
    entropy = torch.distributions.Categorical(logits=x).entropy()
    sc = torch.softmax(x.to(probs_dtype), dim=-1, dtype=torch.float32).to(probs_dtype)
    return (probs / noise).argmax(dim=-1), x.argmax(dim=-1), entropy, sc


"""A dense projection y = x @ Wᵀ for the batch-1 shapes (M = 256..512 rows), with split-K and a deterministic reduce.

`linear(x [..., K], w [N, K], config=None) -> y [..., N]` in x's dtype: F.linear without bias (fp32 accumulation,
one rounding to the output dtype). At batch 1 the decoder's projections see M = 256 rows (512 in the folded pass)
against weights of 8-46 MB; square tiles leave most SMs idle on the narrow ones (o_proj: N = 2816 → 44 tiles of
128 × 128 on 132 SMs), so cuBLAS streams them well below copy bandwidth.

Notable choices:
- The grid is tiles × SPLIT_K programs; program p takes M-tile p % m_tiles, so the M-tiles that share a weight tile
  run side by side and every weight byte comes from HBM once (the others hit L2). With one M-tile the weight loads
  are marked evict_first: W is read once, x (≤ 4.6 MB) and the partials should stay in L2.
- Split-K fills the GPU when N / BLOCK_N does not: each program sums its own K-range in fp32. The reduce is
  deterministic: the partials go to an fp32 [S, M, N] buffer and are added in split order 0..S-1, from 0, and
  rounded once, either by the tile's last program to finish (FUSED_REDUCE: an arrival counter per tile, released
  after a CTA barrier and acquired by the last arrival, the pattern of CUTLASS's `Semaphore`; one launch) or by a
  second small kernel. Both give the same bits whichever program arrives last.
- The tile counters live in one cached int32 buffer per device, zero at rest: the last program of a tile resets
  its counter, so no memset per call. Launches that overlap on two streams would share it: this module assumes one
  stream (the engine's step graphs). The buffer is made on the first split-K call, which must not be under CUDA
  graph capture (`capture_graph` warms up first, so it never is).
- Row and column indices past M / N are wrapped (`% M`), so the tile loads need no mask; K is masked only when the
  split length or K is ragged (`MASK_K`). The loop's trip count is a constexpr: the interpreter (numpy 2.4) cannot
  take a runtime `range` bound.
- fp32 inputs use IEEE products (`input_precision="ieee"`), as torch does by default (no TF32). Under
  TRITON_INTERPRET=1 tiles are upcast to fp32 before tl.dot (the interpreter multiplies bf16 as raw uint16).
- Tiles come from `CUDA_CONFIGS` (measured, exact (M, N, K)) or else `default_config`'s wave/roofline estimate;
  `scripts/gpu_linear_bench.py` sweeps candidates and prints entries for `CUDA_CONFIGS`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from dgemma.kernels.fmath import MODES, round_to


@triton.jit(do_not_specialize=["M"])  # no recompile per row count
def _linear_kernel(x_ptr, w_ptr, y_ptr, part_ptr, count_ptr, M, N, K, stride_x, stride_w,
                   SPLIT: tl.constexpr, K_SPLIT: tl.constexpr, MASK_K: tl.constexpr, FUSED_REDUCE: tl.constexpr,
                   EVICT_W: tl.constexpr, MODE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    m_tiles = tl.cdiv(M, BLOCK_M)
    tiles = m_tiles * tl.cdiv(N, BLOCK_N)
    tile = pid % tiles  # = n-tile · m_tiles + m-tile: the M-tiles of one weight tile are neighbours
    s = pid // tiles
    rm = (tile % m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (tile // m_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = s * K_SPLIT + tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + (rm % M).to(tl.int64)[:, None] * stride_x + rk[None, :]  # wrapped rows: loads need no mask
    b_ptrs = w_ptr + (rn % N).to(tl.int64)[:, None] * stride_w + rk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(K_SPLIT // BLOCK_K):
        if MASK_K:
            live = (rk + i * BLOCK_K < K)[None, :]
            a = tl.load(a_ptrs, mask=live, other=0.0)
            b = tl.load(b_ptrs, mask=live, other=0.0, eviction_policy=EVICT_W)
        else:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs, eviction_policy=EVICT_W)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    out = rm.to(tl.int64)[:, None] * N + rn[None, :]  # y and each partial are [M, N], row stride N
    if SPLIT == 1:
        tl.store(y_ptr + out, round_to(acc, MODE).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(part_ptr + s.to(tl.int64) * M * N + out, acc, mask=mask)
        if FUSED_REDUCE:
            tl.debug_barrier()  # every thread's partial is issued before the counter's release
            arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT - 1:  # the last of the tile's programs: sum in split order, whoever it is
                total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for j in tl.static_range(SPLIT):
                    if j == s:
                        total += acc
                    else:  # .cg: from L2, never a stale L1 line
                        total += tl.load(part_ptr + j * M.to(tl.int64) * N + out, mask=mask, other=0.0,
                                         cache_modifier=".cg")
                tl.store(y_ptr + out, round_to(total, MODE).to(y_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(count_ptr + tile, 0)  # zero at rest: ready for the next launch


@triton.jit
def _reduce_kernel(part_ptr, y_ptr, MN, SPLIT: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr):
    """y = Σ_s part[s] in split order from 0, rounded once (the same sums as the fused reduce)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in tl.static_range(SPLIT):
        total += tl.load(part_ptr + j * MN + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, round_to(total, MODE).to(y_ptr.dtype.element_ty), mask=mask)


class Config(NamedTuple):
    """One launch: tile sizes, K splits (1: no partials), warps, pipeline stages, and for split_k > 1 whether the
    tile's last program reduces (one launch) or a second kernel does."""
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    warps: int = 4
    stages: int = 3
    fused_reduce: bool = True


# Measured winners by exact (M, N, K), from scripts/gpu_linear_bench.py; shapes not listed use `default_config`.
CUDA_CONFIGS: dict[tuple[int, int, int], Config] = {}
MAX_SPLIT = 16
SM_MACS_PER_US = 2.2e6  # bf16 tensor-core MACs per µs per SM actually reached (~60% of an H100/H200's peak)
BYTES_PER_US = 4.0e6  # HBM bytes per µs (H200 copy bandwidth ~4.2e6, H100 ~3.0e6)
REDUCE_US = 1.0  # what a split-K reduce adds beyond its bytes (counters, the last program's extra loads)


def split_len(K: int, split: int, block_k: int) -> tuple[int, int]:
    """(K_SPLIT, splits): each split's K-range, a whole number of BLOCK_K, and how many splits that makes."""
    k_split = triton.cdiv(triton.cdiv(K, split), block_k) * block_k
    return k_split, triton.cdiv(K, k_split)


def estimate_us(M: int, N: int, K: int, bm: int, bn: int, bk: int, split: int, sms: int, elt: int = 2) -> float:
    """Roofline time of one launch: whole waves of per-program MMA work (padding included; two programs share an SM
    when the tile is at most 128 × 64) or the weight bytes, whichever is longer, plus the split-K partials' traffic
    (written and read back after the main loop, so not overlapped)."""
    k_split, split = split_len(K, split, bk)
    per_sm = 2 if bm * bn <= 128 * 64 else 1
    programs = triton.cdiv(M, bm) * triton.cdiv(N, bn) * split
    compute = triton.cdiv(programs, sms * per_sm) * per_sm * bm * bn * k_split / SM_MACS_PER_US
    stream = (N * K + M * N) * elt / BYTES_PER_US
    reduce = 2 * split * M * N * 4 / BYTES_PER_US + REDUCE_US if split > 1 else 0.0
    return max(compute, stream) + reduce


def default_config(M: int, N: int, K: int, sms: int = 132, elt: int = 2) -> Config:
    """The measured tile for (M, N, K) if there is one, else the lowest `estimate_us` over BLOCK_N in 64/128 and
    1..MAX_SPLIT splits (ties: fewer splits), BLOCK_M = 128 (smaller for fewer rows), BLOCK_K = 64."""
    if (M, N, K) in CUDA_CONFIGS:
        return CUDA_CONFIGS[(M, N, K)]
    bm, bk = min(128, max(16, triton.next_power_of_2(M))), 64
    best = None
    for bn in (128, 64):
        bn = min(bn, max(16, triton.next_power_of_2(N)))
        for split in range(1, MAX_SPLIT + 1):
            if split > 1 and split_len(K, split, bk)[1] != split:
                continue  # no smaller K-range than split - 1 gave
            t = estimate_us(M, N, K, bm, bn, bk, split, sms, elt)
            if best is None or t < best[0] - 1e-9:
                best = (t, bn, split)
    _, bn, split = best
    stage_bytes = (bm + bn) * bk * elt
    return Config(bm, bn, bk, split, 8 if bm * bn >= 128 * 128 else 4, max(2, min(4, 160 * 1024 // stage_bytes)))


@functools.cache
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


_COUNTERS: dict[torch.device, torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []  # smaller counter buffers that captured graphs may still point at: kept alive


def tile_counters(device: torch.device, n: int) -> torch.Tensor:
    """The split-K arrival counters for `device` (zero at rest), at least n of them."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise ValueError("linear: split-K needs its tile counters before CUDA graph capture; call linear once "
                             "outside the capture at this shape")
        if buf is not None:
            _OUTGROWN.append(buf)
        buf = _COUNTERS[device] = torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device)
    return buf


def check_config(c: Config) -> None:
    for name in ("block_m", "block_n", "block_k"):
        v = getattr(c, name)
        if v < 16 or v & (v - 1):
            raise ValueError(f"linear: {name} = {v} must be a power of two >= 16")
    if not 1 <= c.split_k <= 64 or c.warps not in (1, 2, 4, 8, 16) or c.stages < 1:
        raise ValueError(f"linear: bad config {c} (split_k in 1..64, warps a power of two up to 16, stages >= 1)")


def linear(x: torch.Tensor, w: torch.Tensor, *, config: Config | None = None) -> torch.Tensor:
    """x [..., K] @ w [N, K]ᵀ → [..., N] in x's dtype (fp32, bf16 or fp16): F.linear(x, w) without bias, fp32
    accumulation, one rounding. x needs a unit last stride and rows that flatten to one stride; w contiguous. No
    host sync, memory allocated by shape only: capturable in a CUDA graph (after one eager call for split-K)."""
    if w.dim() != 2 or not w.is_contiguous():
        raise ValueError(f"linear: w must be a contiguous [N, K] matrix; got shape {tuple(w.shape)}, strides "
                         f"{w.stride()}")
    N, K = w.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"linear: x {tuple(x.shape)} does not end in K = {K}")
    if x.dtype not in MODES or w.dtype != x.dtype:
        raise ValueError(f"linear: x and w must share one of fp32, bf16, fp16; got {x.dtype} and {w.dtype}")
    if x.device != w.device:
        raise ValueError(f"linear: x is on {x.device}, w on {w.device}")
    if K > 1 and x.stride(-1) != 1:
        raise ValueError("linear: x needs unit stride along its last dim")
    try:
        rows = x.view(-1, K) if x.dim() != 2 else x
    except RuntimeError:
        raise ValueError(f"linear: x's rows (strides {x.stride()}) do not flatten to one stride") from None
    M = rows.shape[0]
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0 or K == 0:
        return y.zero_()
    cfg = config or default_config(M, N, K, sm_count(x.device), x.element_size())
    check_config(cfg)
    cuda = x.device.type == "cuda"
    k_split, split = split_len(K, cfg.split_k, cfg.block_k)
    m_tiles = triton.cdiv(M, cfg.block_m)
    tiles = m_tiles * triton.cdiv(N, cfg.block_n)
    part = torch.empty(split, M, N, dtype=torch.float32, device=x.device) if split > 1 else y
    fused = split > 1 and cfg.fused_reduce
    counters = tile_counters(x.device, tiles) if fused else y
    _linear_kernel[(tiles * split,)](
        rows, w, y, part, counters, M, N, K, rows.stride(0), w.stride(0), SPLIT=split, K_SPLIT=k_split,
        MASK_K=K % k_split != 0, FUSED_REDUCE=fused, EVICT_W="evict_first" if m_tiles == 1 else "",
        MODE=MODES[x.dtype], UPCAST=not cuda, PRECISION="ieee" if x.dtype == torch.float32 else None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.warps,
        num_stages=cfg.stages)
    if split > 1 and not fused:
        block = 1024
        _reduce_kernel[(triton.cdiv(M * N, block),)](part, y, M * N, SPLIT=split, MODE=MODES[x.dtype], BLOCK=block,
                                                      num_warps=4 if cuda else 1)
    return y


def reference_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What `linear` must match: torch's F.linear without bias."""
    return F.linear(x, w)

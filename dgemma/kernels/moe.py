"""Routed experts as two grouped GEMMs with the gather, the gated activation and the weighted scatter fused in.

    gate_up:  act[p] = gelu_tanh(x[t] @ Wgu[e, :I].T) * (x[t] @ Wgu[e, I:].T)   per pair p = (token t, expert e)
    down:     out[t] = Σ_p w[p] * (act[p] @ Wd[e].T)                            over the token's k pairs, in fp32

Same math and roundings as models/diffusion_gemma.py `Experts.forward` (grouped_mm outputs, gelu and the product
rounded to the model dtype; y * w and the sum over k in fp32, cast once).

Notable choices:
- Routing stays on the device (`align`): pairs are sorted by expert and each expert's run is padded to a multiple
  of BLOCK_M, so every M-tile belongs to one expert (the layout of vLLM's `moe_align_block_size`). The grid is the
  static upper bound cdiv(pairs, BLOCK_M) + experts; tiles past the end exit at once. No host sync: capturable.
- The first GEMM gathers its token rows by index (no [pairs, hidden] copy); gate and up tiles share the A tile.
- The second GEMM writes its rows in pair order in the model dtype (exact: the grouped GEMM's output is rounded to
  it anyway); the k-sum launch (`sum_rows`) multiplies each by its fp32 router weight and adds the k products in
  the reference's order (deterministic), half the bytes of fp32 weighted rows. `summed=False` leaves that sum to
  `ffn_tail(..., moe_weights=)`, one launch less. `atomic=True` adds w · y into [N, H] fp32 with atomics instead
  (summation order not deterministic).
- The layer's dense MLP (intermediate Id = J·I; 2112 = 3 × 704 in 26B-A4B) can ride along (`dense=`): J
  pseudo-experts of width I that every token visits with weight 1, as J·cdiv(N, BLOCK_M) extra programs at the end
  of both grids (static in the shapes, no routing tables). Each program picks its weights by branch (routed: the
  expert tensors, dense: the separate [2·Id, H] / [H, Id] tensors, never copied together); the J fp32 parts (their
  own buffer) are summed and cast once by the k-sum launch, as one GEMM's fp32 accumulation would be. Saves the
  dense MLP's three launches (two GEMMs well below bandwidth at batch 1, the gelu·up kernel).
- Routing tables come from one launch (`_align_kernel`, one program per expert, a histogram and a stable counting
  sort) instead of torch's radix sort and a dozen small kernels.
- BLOCK_M follows the tokens per expert (`block_m_for`); BLOCK_N, BLOCK_K, warps and stages are pinned per BLOCK_M
  (`CUDA_TILES`, from a measured sweep) rather than autotuned, so no process pays for tuning at start-up.
- From TMA_MIN_PAIRS pairs up (batch 4: 1,024 tokens × top 8) the routed GEMMs run moe_tma.py's TMA-fed kernels
  (same math; `moe(tma=)` or TmaTiles in `tiles=` choose explicitly). With dense=, atomic=True or weights TMA
  cannot read (`tma_ok`) the pointer kernels run.
- Under TRITON_INTERPRET=1 the tiles are upcast to fp32 before tl.dot: the interpreter multiplies bf16 tiles as
  raw uint16. On GPU the dot takes bf16 and accumulates in fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from dgemma.kernels.fmath import MODES, gelu_tanh, pdl, pdl_start, precision, round_to
from dgemma.kernels.moe_tma import TmaTile, down_tma_launch, gate_up_tma_launch, gather_rows, tma_ok  # noqa: F401


@triton.jit(do_not_specialize=["N", "n_routed"])  # no recompile per token count
def _gate_up_kernel(x_ptr, w_ptr, xd_ptr, wd_ptr, slots_ptr, block_expert_ptr, act_ptr, P, E, N, n_routed,
                    stride_x, stride_we, stride_wn, stride_xd, stride_wdn, stride_a,
                    I: tl.constexpr, ID: tl.constexpr, H: tl.constexpr, TOP_K: tl.constexpr, MODE: tl.constexpr,
                    UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL)
    b = tl.program_id(0)
    e = tl.load(block_expert_ptr + b, mask=b < n_routed, other=0)
    if e >= E:  # past the last expert's tiles
        return
    rows = b * BLOCK_M + tl.arange(0, BLOCK_M)  # this tile's act rows, routed or dense
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    # Both branches yield 2-D pointer blocks: a 1-D [BLOCK_M] one lost its alignment across the branch (sm_90 PTX:
    # the A tile was loaded an element at a time instead of by 16-byte cp.async).
    if b < n_routed:  # expert e's tile: token rows gathered by pair
        pair = tl.load(slots_ptr + rows)
        valid = pair < P
        a_rows = x_ptr + tl.where(valid, pair // TOP_K, 0).to(tl.int64)[:, None] * stride_x
        w_gate = w_ptr + e.to(tl.int64) * stride_we + n[:, None] * stride_wn
        w_up = w_gate + I * stride_wn
    else:  # dense pseudo-expert j (gate rows j·I.., up rows ID + j·I..) over token tile m, all tokens in order
        m_tiles = (N + BLOCK_M - 1) // BLOCK_M
        j, tok = (b - n_routed) // m_tiles, ((b - n_routed) % m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = tok < N
        a_rows = xd_ptr + tl.where(valid, tok, 0).to(tl.int64)[:, None] * stride_xd
        w_gate = wd_ptr + (j * I + n[:, None]).to(tl.int64) * stride_wdn
        w_up = w_gate + ID * stride_wdn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_rows + k[None, :], mask=valid[:, None] & (k < H)[None, :], other=0.0)
        wmask = (n < I)[:, None] & (k < H)[None, :]
        bg = tl.load(w_gate + k[None, :], mask=wmask, other=0.0)
        bu = tl.load(w_up + k[None, :], mask=wmask, other=0.0)
        if UPCAST:
            a, bg, bu = a.to(tl.float32), bg.to(tl.float32), bu.to(tl.float32)
        acc_g = tl.dot(a, tl.trans(bg), acc_g, input_precision=PREC)
        acc_u = tl.dot(a, tl.trans(bu), acc_u, input_precision=PREC)
    gate, up = round_to(acc_g, MODE), round_to(acc_u, MODE)  # the grouped GEMM's output dtype
    h = round_to(round_to(gelu_tanh(gate), MODE) * up, MODE)
    out = act_ptr + rows.to(tl.int64)[:, None] * stride_a + n[None, :]
    tl.store(out, h.to(act_ptr.dtype.element_ty), mask=valid[:, None] & (n < I)[None, :])


@triton.jit(do_not_specialize=["N", "n_routed"])
def _down_kernel(act_ptr, w_ptr, wd_ptr, slots_ptr, block_expert_ptr, rw_ptr, out_ptr, dense_ptr, P, E, N, n_routed,
                 stride_a, stride_we, stride_wn, stride_wdn, stride_o, stride_do,
                 I: tl.constexpr, H: tl.constexpr, TOP_K: tl.constexpr, DENSE_J: tl.constexpr, MODE: tl.constexpr,
                 ATOMIC: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL)
    b = tl.program_id(0)
    e = tl.load(block_expert_ptr + b, mask=b < n_routed, other=0)
    if e >= E:
        return
    rows = b * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    if b < n_routed:
        pair = tl.load(slots_ptr + rows)
        valid = pair < P
        w_down = w_ptr + e.to(tl.int64) * stride_we + n[:, None] * stride_wn
        out_row = pair // TOP_K if ATOMIC else pair
    else:  # dense pseudo-expert j: down columns j·I.., weight 1, into the dense buffer (see `down_launch`)
        m_tiles = (N + BLOCK_M - 1) // BLOCK_M
        j, tok = (b - n_routed) // m_tiles, ((b - n_routed) % m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = tok < N
        w_down = wd_ptr + n[:, None].to(tl.int64) * stride_wdn + j * I
        pair = tok  # unused (no router weight)
        out_row = tok if ATOMIC else tok * DENSE_J + j
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(act_ptr + rows.to(tl.int64)[:, None] * stride_a + k[None, :],
                    mask=valid[:, None] & (k < I)[None, :], other=0.0)
        bw = tl.load(w_down + k[None, :], mask=(n < H)[:, None] & (k < I)[None, :], other=0.0)
        if UPCAST:
            a, bw = a.to(tl.float32), bw.to(tl.float32)
        acc = tl.dot(a, tl.trans(bw), acc, input_precision=PREC)
    mask = valid[:, None] & (n < H)[None, :]
    out_row = out_row.to(tl.int64)[:, None]
    if b < n_routed:
        y = round_to(acc, MODE)  # the grouped GEMM's output dtype
        if ATOMIC:  # bf16 y × fp32 w → fp32, summed over the token's k pairs by the atomics
            y = y * tl.load(rw_ptr + pair, mask=valid, other=0.0)[:, None]
            tl.atomic_add(out_ptr + out_row * stride_o + n[None, :], y, mask=mask)
        else:  # exact in the model dtype; weighted and summed over k later (`sum_rows`)
            tl.store(out_ptr + out_row * stride_o + n[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
    else:  # dense: the fp32 part, rounded once after the J parts are added
        if ATOMIC:
            tl.atomic_add(dense_ptr + out_row * stride_do + n[None, :], acc, mask=mask)
        else:
            tl.store(dense_ptr + out_row * stride_do + n[None, :], acc, mask=mask)


@triton.jit
def _align_kernel(idx_ptr, slots_ptr, block_expert_ptr, E: tl.constexpr, P: tl.constexpr, N_BLOCKS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BINS: tl.constexpr, CHUNK: tl.constexpr, MAX_TILES: tl.constexpr,
                  TAIL_CHUNK: tl.constexpr, PDL: tl.constexpr = False):
    """`align_reference`'s tables, one program per expert e: a histogram of all pairs gives every expert's padded
    run, so e knows where its run starts; e's pairs take its rows in pair order (a stable counting sort: the same
    slots as the reference's stable sort), the rest of its last tile is padding (pair P), its tiles map to e, and
    the last program marks the unused tiles past the end (expert E, all rows padding)."""
    pdl_start(PDL)
    e = tl.program_id(0)
    bins = tl.arange(0, BINS)
    counts = tl.zeros([BINS], dtype=tl.int32)
    for p0 in range(0, P, CHUNK):
        p = p0 + tl.arange(0, CHUNK)
        counts += tl.histogram(tl.load(idx_ptr + p, mask=p < P, other=BINS - 1).to(tl.int32), BINS)
    counts = tl.where(bins < E, counts, 0)  # drop the padding bin
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pad_end = tl.cumsum(padded, axis=0)
    start = tl.sum(tl.where(bins == e, pad_end - padded, 0), axis=0)
    count = tl.sum(tl.where(bins == e, counts, 0), axis=0)
    seen = count * 0
    for p0 in range(0, P, CHUNK):
        p = p0 + tl.arange(0, CHUNK)
        hit = (tl.load(idx_ptr + p, mask=p < P, other=BINS - 1).to(tl.int32) == e).to(tl.int32)
        rank = seen + tl.cumsum(hit, axis=0) - hit
        tl.store(slots_ptr + start + rank, p, mask=hit == 1)
        seen += tl.sum(hit, axis=0)
    pad_rows = tl.arange(0, BLOCK_M) + count
    tl.store(slots_ptr + start + pad_rows, tl.full([BLOCK_M], P, tl.int32), mask=pad_rows < (count + BLOCK_M - 1)
             // BLOCK_M * BLOCK_M)
    tiles = tl.arange(0, MAX_TILES)
    tl.store(block_expert_ptr + start // BLOCK_M + tiles, tl.full([MAX_TILES], e, tl.int32),
             mask=tiles * BLOCK_M < count)
    if e == E - 1:
        used = tl.sum(padded, axis=0) // BLOCK_M
        for t0 in range(0, N_BLOCKS, TAIL_CHUNK):
            t = t0 + tl.arange(0, TAIL_CHUNK)
            tail = (t >= used) & (t < N_BLOCKS)
            tl.store(block_expert_ptr + t, tl.full([TAIL_CHUNK], E, tl.int32), mask=tail)
            rows = t[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
            tl.store(slots_ptr + rows, tl.full([TAIL_CHUNK, BLOCK_M], P, tl.int32), mask=tail[:, None])


@triton.jit
def mul_rn(a, b, GPU: tl.constexpr):
    """a · b (fp32), rounded before anything is added to it, as torch's `y * w` before the k-sum. On GPU one PTX
    `mul.rn.f32`: Triton contracts a product and a following add into one fma by default (one rounding fewer), and
    libdevice's `mul_rn` flushes denormals (Triton builds it with FTZ). The interpreter's numpy product is rounded
    anyway (and it runs no PTX)."""
    if GPU:
        p = tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32, is_pure=True,
                                      pack=1)
    else:
        p = a * b
    return p


@triton.jit
def sum_rows(y_ptr, w_ptr, rows, cols, R, H, stride_y, stride_w, COUNT: tl.constexpr, WEIGHTED: tl.constexpr,
             GPU: tl.constexpr, UNROLL: tl.constexpr):
    """Σ_j [w[r, j] ·] y[r, j, :] in fp32 for j = 0 .. COUNT-1 in order, over rows r [BLOCK_R] < R and cols
    [BLOCK_D] < H of y [R, COUNT, H] (rows stride_y apart, unit stride within), w [R, COUNT] fp32 (rows stride_w
    apart) → [BLOCK_R, BLOCK_D] fp32, not rounded. Routed: each product y · w rounded, then added in pair order, as
    `.view(N, k, H).sum(1)` over the weighted rows; dense: the J fp32 parts, as one GEMM's accumulation would be.
    UNROLL (divides COUNT) rows are loaded together: one at a time, each add waits out its load (ffn_tail at 2,048
    tokens: 65 → 50 µs with 4 on an H200). The adds are the same either way."""
    rmask = rows < R
    mask = rmask[:, None] & (cols < H)[None, :]
    acc = tl.zeros([rows.shape[0], cols.shape[0]], dtype=tl.float32)
    for j0 in range(0, COUNT, UNROLL):
        for u in tl.static_range(UNROLL):
            y = tl.load(y_ptr + rows[:, None] * stride_y + (j0 + u) * H + cols[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            if WEIGHTED:
                y = mul_rn(y, tl.load(w_ptr + rows * stride_w + j0 + u, mask=rmask, other=0.0)[:, None], GPU)
            acc += y
    return acc


@triton.jit(do_not_specialize=["N"])
def _sum_k_kernel(y_ptr, rw_ptr, parts_ptr, out_ptr, dense_ptr, N, H: tl.constexpr, TOP_K: tl.constexpr,
                  DENSE_J: tl.constexpr, MODE: tl.constexpr, GPU: tl.constexpr, BLOCK: tl.constexpr,
                  PDL: tl.constexpr = False):
    """One token t (a [1, BLOCK] block): out[t] = Σ_j w[t, j] · y[t·k + j] (`sum_rows`), cast once to out's dtype;
    with DENSE_J > 0 also dense[t] = Σ_j parts[t·J + j], cast once."""
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64) + tl.arange(0, 1)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    out, mask = t[:, None] * H + cols[None, :], (cols < H)[None, :]
    moe = sum_rows(y_ptr, rw_ptr, t, cols, N, H, TOP_K * H, TOP_K, TOP_K, True, GPU, 1)
    tl.store(out_ptr + out, round_to(moe, MODE).to(out_ptr.dtype.element_ty), mask=mask)
    if DENSE_J > 0:
        dense = sum_rows(parts_ptr, parts_ptr, t, cols, N, H, DENSE_J * H, 0, DENSE_J, False, GPU, 1)
        tl.store(dense_ptr + out, round_to(dense, MODE).to(dense_ptr.dtype.element_ty), mask=mask)


class Tile(NamedTuple):
    """One GEMM's launch: BLOCK_N, BLOCK_K, warps, pipeline stages."""
    n: int
    k: int
    warps: int
    stages: int


# CUDA tiles per BLOCK_M: (gate_up, down), the fastest of scripts/gpu_moe_bench.py's sweep on an H200 at the real
# 26B-A4B expert shape (H 2816, I 704, 128 experts, top 8; benchmarks/results/session3/moe_tiles_h200_f464fe1.txt).
# At 256 tokens (batch 1) they stream the expert weights at 98% (gate_up) and 89% (down) of copy bandwidth.
CUDA_TILES = {16: (Tile(64, 128, 4, 3), Tile(64, 64, 4, 4)),
              32: (Tile(64, 128, 4, 3), Tile(64, 128, 4, 3)),
              64: (Tile(64, 64, 4, 4), Tile(128, 64, 4, 4)),
              128: (Tile(128, 64, 8, 4), Tile(128, 64, 8, 4))}
INTERPRET_TILE = Tile(32, 32, 1, 1)


# The TMA-fed kernels (moe_tma.py) from this many pairs up: batch 4 (1,024 tokens × top 8; None: never). On an H200
# a whole moe() took 679 instead of 777 µs at 2,048 tokens and 1,207 instead of 1,330 at 4,096; the GEMMs alone at
# 1,024 tokens 295 + 153 instead of 306 + 178 µs, at 512 267 + 134 instead of 274 + 144 (benchmarks/results/session5/
# probe_704d284), but up to 512 tokens the dense MLP rides in the pointer kernels (fused_layer.dense_in_moe), which
# is worth more. Tiles per BLOCK_M: the fastest of `scripts/gpu_grouped_gemm_probe.py --tma` on an H200 at 2048 and
# 4096 tokens (GEMMs alone, µs at 2048 / 4096; the pointer kernels at BLOCK_M 64: gate_up 445 / 727, down 287 / 483):
# BLOCK_M 64 gate_up 421 / 717, down 217 / 364; BLOCK_M 128 gate_up 474 / 715, down 194 / 302.
TMA_MIN_PAIRS: int | None = 1024 * 8
CUDA_TMA_TILES = {64: (TmaTile(64, 64, 4, 4, gathered=False), TmaTile(128, 64, 4, 4)),
                  128: (TmaTile(128, 64, 8, 3, gathered=False), TmaTile(256, 64, 8, 3, persistent=True, flatten=True))}
INTERPRET_TMA_TILE = TmaTile(32, 32, 1, 1)
ALIGN_KERNEL_MAX_PAIRS = 1 << 16  # routing tables from the kernel up to here (batch 32), from torch's sort beyond


def block_m_for(pairs: int, num_experts: int) -> int:
    """M-tile height from the mean rows per expert: 32 up to a mean of 24 (batch 1: 256 tokens × 8 / 128 experts =
    16), else 64 (measured faster than 16 and 128 at 256 to 4096 tokens on an H200)."""
    return 32 if pairs / num_experts <= 24 else 64


def n_blocks_for(pairs: int, num_experts: int, block_m: int) -> int:
    """Static upper bound on Σ_e ceil(count_e / block_m): the grid of every kernel here."""
    return triton.cdiv(pairs, block_m) + min(num_experts, pairs)


def align_reference(idx: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Device-side routing tables for idx [N, k] (no host sync).
    Returns slots [n_blocks * block_m] (pair id = token * k + j per padded row, P = N*k marks padding) and
    block_expert [n_blocks] (the expert of each M-tile; num_experts past the last tile)."""
    flat = idx.reshape(-1)
    P, E = flat.numel(), num_experts
    expert, perm = torch.sort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int64, device=idx.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    start = torch.cumsum(counts, 0) - counts
    pos = (pad_end - padded)[expert] + torch.arange(P, device=idx.device) - start[expert]
    n_blocks = n_blocks_for(P, E, block_m)
    slots = torch.full((n_blocks * block_m,), P, dtype=torch.int32, device=idx.device)
    slots[pos] = perm.to(torch.int32)
    tile_start = torch.arange(n_blocks, device=idx.device) * block_m
    block_expert = torch.searchsorted(pad_end, tile_start, right=True).to(torch.int32)
    return slots, block_expert


def align(idx: torch.Tensor, num_experts: int, block_m: int, kernel: bool | None = None):
    """`align_reference`'s tables; up to ALIGN_KERNEL_MAX_PAIRS pairs from one Triton launch (instead of a radix
    sort and ~10 small kernels), beyond that (or with kernel=False) from torch."""
    P, E = idx.numel(), num_experts
    if kernel is None:
        kernel = P <= ALIGN_KERNEL_MAX_PAIRS
    if not kernel:
        return align_reference(idx, E, block_m)
    n_blocks = n_blocks_for(P, E, block_m)
    slots = torch.empty(n_blocks * block_m, dtype=torch.int32, device=idx.device)
    block_expert = torch.empty(n_blocks, dtype=torch.int32, device=idx.device)
    bins = triton.next_power_of_2(E + 1)  # one spare bin for the masked lanes
    _align_kernel[(E,)](idx.reshape(-1), slots, block_expert, E=E, P=P, N_BLOCKS=n_blocks, BLOCK_M=block_m, BINS=bins,
                        CHUNK=min(4096, triton.next_power_of_2(P)),
                        MAX_TILES=triton.next_power_of_2(triton.cdiv(idx.shape[0], block_m)),
                        TAIL_CHUNK=max(1, 2048 // block_m), num_warps=4 if idx.is_cuda else 1,
                        **pdl(idx.device))
    return slots, block_expert


def moe(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
        atomic: bool = False, block_m: int | None = None, tiles: tuple[Tile, Tile] | None = None, *,
        dense: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, summed: bool = True,
        tma: bool | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Routed experts: x [N, H] (model dtype), router weights [N, k] fp32 and indices [N, k], gate_up [E, 2I, H]
    (gate rows first), down [E, H, I] → [N, H] in x's dtype. Drop-in for `Experts.forward(x, weights, idx)`.
    `dense` = (x_dense [N, H], gate_up_d [2·Id, H] (gate rows, then up), down_d [H, Id]) with Id a multiple of I
    adds the layer's dense MLP as Id / I pseudo-experts in the same two launches and returns (moe, dense).
    `summed=False` skips the k-sum launch and returns what it would read: the routed rows [N, k, H] (x's dtype,
    unweighted) and, with `dense`, the dense parts [N, J, H] fp32, for `ffn_tail(..., moe_weights=weights,
    dense_parts=True)` to sum (`sum_rows`). `block_m` and `tiles` (gate_up, down) override the defaults (the tile
    benchmark uses them). `tma` picks the TMA-fed kernels' default tiles (None: from TMA_MIN_PAIRS pairs up), as do
    TmaTiles in `tiles`; with `dense`, atomic=True or views TMA cannot read (`tma_ok`) the pointer kernels run."""
    N, H = x.shape
    E, two_i, _ = gate_up.shape
    I, k = two_i // 2, idx.shape[1]
    if gate_up.shape != (E, 2 * I, H) or down.shape != (E, H, I) or weights.shape != idx.shape:
        raise ValueError("moe: shapes do not match")
    if x.dtype not in MODES or gate_up.dtype != x.dtype or down.dtype != x.dtype:
        raise ValueError("moe: x and the expert weights must share one of fp32, bf16, fp16")
    if x.stride(1) != 1 or gate_up.stride(2) != 1 or down.stride(2) != 1:
        raise ValueError("moe: x and the expert weights need unit stride along their last dim")
    if dense is not None:
        check_dense(x, dense, I)
    if atomic and not summed:
        raise ValueError("moe: atomic=True sums in the down kernel; it has no unsummed rows")
    P = N * k
    bm = block_m or block_m_for(P, E)
    cuda = x.device.type == "cuda"
    if tma is None:
        tma = TMA_MIN_PAIRS is not None and P >= TMA_MIN_PAIRS
    t_gu, t_down = tiles or default_tiles(bm, cuda, tma)
    uses_tma = isinstance(t_gu, TmaTile) or isinstance(t_down, TmaTile)
    if uses_tma and (dense is not None or atomic or not tma_ok(gate_up, down)):  # TMA: routed rows, aligned views
        pointer = default_tiles(bm, cuda, False)
        t_gu, t_down = (t if isinstance(t, Tile) else p for t, p in zip((t_gu, t_down), pointer))
    slots, block_expert = align(idx, E, bm)
    xd, gate_up_d, down_d = dense if dense is not None else (None, None, None)
    act = gate_up_launch(x, gate_up, slots, block_expert, k, bm, t_gu, dense=None if xd is None else (xd, gate_up_d))
    rows, parts = down_launch(act, down, slots, block_expert, weights, N, bm, t_down, atomic, dense_down=down_d)
    if atomic:  # already summed, in fp32
        rows, parts = rows.to(x.dtype), None if parts is None else parts.to(x.dtype)
    else:
        rows, parts = rows.view(N, k, H), None if parts is None else parts.view(N, down_d.shape[1] // I, H)
        if summed:
            rows, parts = sum_k(rows, weights, parts)
    return rows if dense is None else (rows, parts)


def default_tiles(bm: int, cuda: bool, tma: bool) -> tuple[Tile | TmaTile, Tile | TmaTile]:
    """(gate_up, down) launches: with tma CUDA_TMA_TILES[bm] (CUDA_TILES[bm] where it has none), else CUDA_TILES[bm];
    the interpreter's small tiles on CPU."""
    if not cuda:
        return (INTERPRET_TMA_TILE,) * 2 if tma else (INTERPRET_TILE,) * 2
    return CUDA_TMA_TILES.get(bm, CUDA_TILES[bm]) if tma else CUDA_TILES[bm]


def check_dense(x: torch.Tensor, dense, I: int):
    """`moe`'s dense argument: x_dense like x, gate_up_d [2·Id, H] and down_d [H, Id] in x's dtype, Id = J·I."""
    xd, gu, dn = dense
    N, H = x.shape
    Id = dn.shape[-1]
    if xd.shape != (N, H) or gu.shape != (2 * Id, H) or dn.shape != (H, Id) or Id == 0 or Id % I:
        raise ValueError(f"moe: dense needs x_dense [{N}, {H}], gate_up_d [2·Id, {H}], down_d [{H}, Id], Id % {I} == 0")
    if any(t.dtype != x.dtype for t in dense) or any(t.stride(-1) != 1 for t in dense):
        raise ValueError("moe: the dense tensors need x's dtype and unit stride along their last dim")


def dense_tiles(N: int, bm: int, dense_j: int) -> int:
    """Programs for the dense pseudo-experts after the routed tiles: J × cdiv(N, bm) (a static function of shapes)."""
    return dense_j * triton.cdiv(N, bm)


def gate_up_launch(x, gate_up, slots, block_expert, k: int, bm: int, tile: Tile | TmaTile, dense=None
                   ) -> torch.Tensor:
    """act [(n_blocks + dense tiles)·bm, I] (x's dtype) = gelu(x_t Wg_eᵀ) · (x_t Wu_eᵀ) for every routed pair, in
    slot order, then (dense = (x_dense, gate_up_d)) every token × dense pseudo-expert, tile by tile. A TmaTile runs
    `gate_up_tma_launch` (routed rows only)."""
    if isinstance(tile, TmaTile):
        if dense is not None:
            raise ValueError("gate_up_launch: the TMA kernel has no dense tiles")
        return gate_up_tma_launch(x, gate_up, slots, block_expert, k, bm, tile)
    N, H = x.shape
    E, two_i, _ = gate_up.shape
    I, n_blocks = two_i // 2, block_expert.numel()
    xd, gud = dense if dense is not None else (x, gate_up[0])  # no dense tiles: any valid pointers
    Id = gud.shape[0] // 2
    grid_m = n_blocks + (dense_tiles(N, bm, Id // I) if dense is not None else 0)
    act = torch.empty(grid_m * bm, I, dtype=x.dtype, device=x.device)
    _gate_up_kernel[(grid_m, triton.cdiv(I, tile.n))](
        x, gate_up, xd, gud, slots, block_expert, act, N * k, E, N, n_blocks, x.stride(0), gate_up.stride(0),
        gate_up.stride(1), xd.stride(0), gud.stride(0), act.stride(0), I=I, ID=Id, H=H, TOP_K=k,
        MODE=MODES[x.dtype], UPCAST=x.device.type != "cuda", PREC=precision(x.dtype), BLOCK_M=bm, BLOCK_N=tile.n,
        BLOCK_K=tile.k, num_warps=tile.warps, num_stages=tile.stages, **pdl(x.device))
    return act


def down_launch(act, down, slots, block_expert, weights, N: int, bm: int, tile: Tile | TmaTile,
                atomic: bool = False, dense_down=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(routed, dense parts) from act_p Wd_eᵀ. Routed: the rows in pair order [N·k, H], rounded to act's dtype and
    unweighted, or (atomic) w_p · row summed per token into [N, H] fp32. With dense_down [H, Id], the J = Id / I
    dense parts unrounded in fp32: rows t·J + j of [N·J, H] (or, atomic, summed into [N, H]); else None. A TmaTile
    runs `down_tma_launch` (rows only)."""
    E, H, I = down.shape
    k, n_blocks = weights.shape[1], block_expert.numel()
    if isinstance(tile, TmaTile):
        if atomic or dense_down is not None:
            raise ValueError("down_launch: the TMA kernel has no atomic mode and no dense tiles")
        return down_tma_launch(act, down, slots, block_expert, N * k, bm, tile), None
    J = dense_down.shape[1] // I if dense_down is not None else 0
    new = torch.zeros if atomic else torch.empty
    out = new(N if atomic else N * k, H, dtype=torch.float32 if atomic else act.dtype, device=act.device)
    parts = new(N if atomic else N * J, H, dtype=torch.float32, device=act.device) if J else None
    wd = dense_down if dense_down is not None else down[0]
    grid_m = n_blocks + dense_tiles(N, bm, J)
    _down_kernel[(grid_m, triton.cdiv(H, tile.n))](
        act, down, wd, slots, block_expert, weights.reshape(-1).float(), out, out if parts is None else parts,
        N * k, E, N, n_blocks, act.stride(0), down.stride(0), down.stride(1), wd.stride(0), out.stride(0),
        H if parts is None else parts.stride(0), I=I, H=H, TOP_K=k, DENSE_J=J, MODE=MODES[act.dtype],
        ATOMIC=atomic, UPCAST=act.device.type != "cuda", PREC=precision(act.dtype), BLOCK_M=bm, BLOCK_N=tile.n,
        BLOCK_K=tile.k, num_warps=tile.warps, num_stages=tile.stages, **pdl(act.device))
    return out, parts


def sum_k(rows: torch.Tensor, weights: torch.Tensor, parts: torch.Tensor | None
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`moe(..., summed=False)`'s output → (moe [N, H], dense [N, H] or None) in rows' dtype: each token's k routed
    rows [N, k, H] times their router weights [N, k] (fp32) summed in order, and its J fp32 parts [N, J, H] summed."""
    N, k, H = rows.shape
    assert rows.is_contiguous() and (parts is None or parts.is_contiguous())
    res = torch.empty(N, H, dtype=rows.dtype, device=rows.device)
    dense = torch.empty_like(res) if parts is not None else None
    block = min(1024, triton.next_power_of_2(H))
    _sum_k_kernel[(N, triton.cdiv(H, block))](
        rows, weights.float().contiguous(), rows if parts is None else parts, res, res if dense is None else dense,
        N, H=H, TOP_K=k, DENSE_J=0 if parts is None else parts.shape[1], MODE=MODES[rows.dtype], GPU=rows.is_cuda,
        BLOCK=block, num_warps=4 if rows.is_cuda else 1, **pdl(rows.device))
    return res, dense


def reference_moe(x, weights, idx, gate_up, down) -> torch.Tensor:
    """The model's `Experts.forward` math, one expert at a time (no grouped_mm needed)."""
    import torch.nn.functional as F

    N, k = idx.shape
    y = torch.zeros(N * k, x.shape[1], dtype=torch.float32, device=x.device)
    flat = idx.reshape(-1)
    for e in range(gate_up.shape[0]):
        pairs = (flat == e).nonzero().flatten()
        if pairs.numel():
            gate, up = F.linear(x[pairs // k], gate_up[e]).chunk(2, dim=-1)
            h = F.linear(F.gelu(gate, approximate="tanh") * up, down[e])
            y[pairs] = h * weights.reshape(-1)[pairs, None]
    return y.view(N, k, -1).sum(dim=1).to(x.dtype)


def reference_dense(x, gate_up, down) -> torch.Tensor:
    """The model's `gated_mlp` with the stacked weight: x [N, H], gate_up [2·Id, H] (gate rows first), down [H, Id]."""
    import torch.nn.functional as F

    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.gelu(gate, approximate="tanh") * up, down)

"""The routed experts' two GEMMs fed by TMA (tensor descriptors), for big passes (batch >= 4 by default).

Same math, roundings and layouts as moe.py's pointer kernels (`_gate_up_kernel`, `_down_kernel`; routed tiles only,
no dense pseudo-experts, no atomic mode): moe.py picks these from `TMA_MIN_PAIRS` pairs up (`moe(..., tma=)`).

Why: at ~128 rows per expert (batch 8) the pointer kernels reach ~290 / ~230 TFLOP/s; TMA loads of the weights
(2-D views [E·2I, H] and [E·H, I]) and of down's input (act, already in slot order) take the address arithmetic off
the warps and allow 128 × 256 tiles. On an H200 (benchmarks/results/session5) down runs 287 → 217 µs at 2,048
tokens, gate_up 445 → 421 µs; its rows stay gathered by pointer loads (a pre-gathered copy read by TMA,
`gathered=True`, cost more to make than it saved). Descriptors are built on the host at each launch: CUDA graphs
capture them with the launch. The grid is 1-D with an expert's tiles next to each other, so they share its weights
in L2; `persistent` runs one program per SM over the tiles. TMA gate_up writes act's padding rows too (zeros),
since down reads whole tiles by TMA.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from dgemma.kernels.fmath import INTERPRET, MODES, gelu_tanh, pdl, pdl_start, precision, round_to


class TmaTile(NamedTuple):
    """A TMA-fed routed GEMM's launch, taken by `gate_up_launch` / `down_launch` in place of a Tile: BLOCK_N, BLOCK_K,
    warps, stages as there; `gathered`: gate_up's A rows from a copy in slot order (`gather_rows`) read by TMA, else
    gathered by pointer loads in the GEMM (down ignores it); `persistent`: one program per SM looping over the tiles;
    `flatten`: tl.range(flatten=True) on that loop (the next tile's loads overlap this one's epilogue). (Triton's
    automatic warp specialization of the K loop was tried too: with triton 3.6 on an H200 it changed nothing at 8
    warps and gave wrong gate_up rows at 4, so it is not offered.)"""
    n: int
    k: int
    warps: int
    stages: int
    gathered: bool = True
    persistent: bool = False
    flatten: bool = False


@triton.jit
def _tma_tiles_end(block_expert_ptr, n_blocks, E, NT: tl.constexpr, NB_P2: tl.constexpr, PERSISTENT: tl.constexpr):
    """End of this program's loop over tiles t = pid, pid + grid, .. (M-block t // NT, N-block t % NT: an expert's
    tiles are consecutive, so they run together and share its weights in L2). Persistent: all live tiles (the
    M-blocks before the unused ones, block_expert < E); else (grid = all tiles) pid's tile if its M-block is live."""
    pid = tl.program_id(0)
    if PERSISTENT:
        r = tl.arange(0, NB_P2)
        end = tl.sum((tl.load(block_expert_ptr + r, mask=r < n_blocks, other=E) < E).to(tl.int32), axis=0) * NT
    else:
        end = tl.where(tl.load(block_expert_ptr + pid // NT) < E, pid + 1, pid)
    return end


@triton.jit
def _gate_up_tma_tile(t, x_ptr, xs_desc, w_desc, slots_ptr, block_expert_ptr, act_ptr, P, stride_x, stride_a,
                      I: tl.constexpr, H: tl.constexpr, NT: tl.constexpr, TOP_K: tl.constexpr, MODE: tl.constexpr,
                      UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GATHERED: tl.constexpr):
    """`_gate_up_kernel`'s routed tile t, the weights (and with GATHERED the pre-gathered rows) read by TMA."""
    b, n0 = t // NT, t % NT * BLOCK_N
    e = tl.load(block_expert_ptr + b)
    rows = b * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(slots_ptr + rows)
    valid = pair < P
    a_rows = x_ptr + tl.where(valid, pair // TOP_K, 0).to(tl.int64)[:, None] * stride_x
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, H, BLOCK_K):
        if GATHERED:
            a = xs_desc.load([b * BLOCK_M, k0])
        else:
            k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_rows + k[None, :], mask=valid[:, None] & (k < H)[None, :], other=0.0)
        # Gate rows e·2I + n, up rows e·2I + I + n; the last N-block's rows past I (up's, the next expert's, TMA's
        # zeros) only reach columns n >= I, which are not stored.
        bg, bu = w_desc.load([e * (2 * I) + n0, k0]), w_desc.load([e * (2 * I) + I + n0, k0])
        if UPCAST:
            a, bg, bu = a.to(tl.float32), bg.to(tl.float32), bu.to(tl.float32)
        acc_g = tl.dot(a, tl.trans(bg), acc_g, input_precision=PREC)
        acc_u = tl.dot(a, tl.trans(bu), acc_u, input_precision=PREC)
    gate, up = round_to(acc_g, MODE), round_to(acc_u, MODE)
    h = round_to(round_to(gelu_tanh(gate), MODE) * up, MODE)
    n = n0 + tl.arange(0, BLOCK_N)
    out = act_ptr + rows.to(tl.int64)[:, None] * stride_a + n[None, :]
    tl.store(out, h.to(act_ptr.dtype.element_ty), mask=(n < I)[None, :])  # padding rows too: zeros for down's TMA


@triton.jit(do_not_specialize=["n_blocks"])
def _gate_up_tma_kernel(x_ptr, xs_desc, w_desc, slots_ptr, block_expert_ptr, act_ptr, P, E, n_blocks, stride_x,
                        stride_a, I: tl.constexpr, H: tl.constexpr, NT: tl.constexpr, TOP_K: tl.constexpr,
                        MODE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NB_P2: tl.constexpr, PERSISTENT: tl.constexpr,
                        FLATTEN: tl.constexpr, GATHERED: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL)
    pid, step = tl.program_id(0), tl.num_programs(0)
    end = _tma_tiles_end(block_expert_ptr, n_blocks, E, NT, NB_P2, PERSISTENT)
    if INTERPRET:  # its range() takes no tensor bound (numpy >= 2.4): the same loop as a while
        t = pid
        while t < end:
            _gate_up_tma_tile(t, x_ptr, xs_desc, w_desc, slots_ptr, block_expert_ptr, act_ptr, P, stride_x, stride_a,
                              I, H, NT, TOP_K, MODE, UPCAST, PREC, BLOCK_M, BLOCK_N, BLOCK_K, GATHERED)
            t += step
    else:
        for t in tl.range(pid, end, step, flatten=FLATTEN):
            _gate_up_tma_tile(t, x_ptr, xs_desc, w_desc, slots_ptr, block_expert_ptr, act_ptr, P, stride_x, stride_a,
                              I, H, NT, TOP_K, MODE, UPCAST, PREC, BLOCK_M, BLOCK_N, BLOCK_K, GATHERED)


@triton.jit
def _down_tma_tile(t, a_desc, w_desc, slots_ptr, block_expert_ptr, out_ptr, P, stride_o, I: tl.constexpr,
                   H: tl.constexpr, NT: tl.constexpr, MODE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """`_down_kernel`'s routed tile t (not atomic), act and the weights read by TMA."""
    b, n0 = t // NT, t % NT * BLOCK_N
    e = tl.load(block_expert_ptr + b)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, I, BLOCK_K):
        a, w = a_desc.load([b * BLOCK_M, k0]), w_desc.load([e * H + n0, k0])  # w rows past H: unstored columns
        if UPCAST:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, tl.trans(w), acc, input_precision=PREC)
    pair = tl.load(slots_ptr + b * BLOCK_M + tl.arange(0, BLOCK_M))
    n = n0 + tl.arange(0, BLOCK_N)
    tl.store(out_ptr + pair.to(tl.int64)[:, None] * stride_o + n[None, :],
             round_to(acc, MODE).to(out_ptr.dtype.element_ty), mask=(pair < P)[:, None] & (n < H)[None, :])


@triton.jit(do_not_specialize=["n_blocks"])
def _down_tma_kernel(a_desc, w_desc, slots_ptr, block_expert_ptr, out_ptr, P, E, n_blocks, stride_o,
                     I: tl.constexpr, H: tl.constexpr, NT: tl.constexpr, MODE: tl.constexpr, UPCAST: tl.constexpr,
                     PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     NB_P2: tl.constexpr, PERSISTENT: tl.constexpr, FLATTEN: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL)
    pid, step = tl.program_id(0), tl.num_programs(0)
    end = _tma_tiles_end(block_expert_ptr, n_blocks, E, NT, NB_P2, PERSISTENT)
    if INTERPRET:
        t = pid
        while t < end:
            _down_tma_tile(t, a_desc, w_desc, slots_ptr, block_expert_ptr, out_ptr, P, stride_o, I, H, NT, MODE,
                           UPCAST, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
            t += step
    else:
        for t in tl.range(pid, end, step, flatten=FLATTEN):
            _down_tma_tile(t, a_desc, w_desc, slots_ptr, block_expert_ptr, out_ptr, P, stride_o, I, H, NT, MODE,
                           UPCAST, PREC, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _gather_kernel(x_ptr, slots_ptr, block_expert_ptr, xs_ptr, P, E, stride_x, H: tl.constexpr, TOP_K: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr = False):
    """`gather_rows`: M-block b's rows, columns BLOCK_H · program_id(1) .., padding rows zero."""
    pdl_start(PDL)
    b = tl.program_id(0)
    if tl.load(block_expert_ptr + b) >= E:
        return
    rows = b * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(slots_ptr + rows)
    valid = pair < P
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    v = tl.load(x_ptr + tl.where(valid, pair // TOP_K, 0).to(tl.int64)[:, None] * stride_x + h[None, :],
                mask=valid[:, None] & (h < H)[None, :], other=0.0)
    tl.store(xs_ptr + rows.to(tl.int64)[:, None] * H + h[None, :], v, mask=(h < H)[None, :])


def tma_ok(gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """Whether TMA can read the weights as 2-D [E·2I, H] and [E·H, I] views and the [rows, H] / [rows, I] copies the
    kernels make: contiguous weights, 16-byte aligned bases and rows (true at 26B-A4B's H 2816, I 704)."""
    _, H, I = down.shape
    size = down.element_size()
    return (gate_up.is_contiguous() and down.is_contiguous() and gate_up.data_ptr() % 16 == 0
            and down.data_ptr() % 16 == 0 and H * size % 16 == 0 and I * size % 16 == 0)


@functools.cache
def num_sms(device: torch.device) -> int:
    """A persistent launch's programs: the SMs on CUDA; 3 under the interpreter (its tests then run the tile loop)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 3


def tma_launch(tiles: int, n_blocks: int, bm: int, tile: TmaTile, dtype: torch.dtype, device: torch.device
               ) -> tuple[tuple[int], dict]:
    """Grid and the shared launch arguments of the TMA kernels over `tiles` tiles (n_blocks M-blocks of bm rows).
    NB_P2 (the block_expert read of a persistent program) has a floor so that token counts share one compile."""
    grid = min(tiles, num_sms(device)) if tile.persistent else tiles
    return (grid,), dict(MODE=MODES[dtype], UPCAST=device.type != "cuda", PREC=precision(dtype), BLOCK_M=bm,
                         BLOCK_N=tile.n, BLOCK_K=tile.k, NB_P2=max(1024, triton.next_power_of_2(n_blocks)),
                         PERSISTENT=tile.persistent, FLATTEN=tile.flatten, num_warps=tile.warps,
                         num_stages=tile.stages, **pdl(device))


def gather_rows(x: torch.Tensor, slots: torch.Tensor, block_expert: torch.Tensor, k: int, bm: int,
                num_experts: int) -> torch.Tensor:
    """xs [n_blocks·bm, H] in slot order: row r = x[slots[r] // k], zeros for padding rows; the rows of the unused
    M-blocks (past the last expert's) are not written, and no TMA tile reads them."""
    N, H = x.shape
    n_blocks = block_expert.numel()
    xs = torch.empty(n_blocks * bm, H, dtype=x.dtype, device=x.device)
    block_h = min(triton.next_power_of_2(H), 16384 // bm)  # 64 elements a thread at 4 warps
    _gather_kernel[(n_blocks, triton.cdiv(H, block_h))](x, slots, block_expert, xs, N * k, num_experts, x.stride(0),
                                                         H=H, TOP_K=k, BLOCK_M=bm, BLOCK_H=block_h,
                                                         num_warps=4 if x.is_cuda else 1, **pdl(x.device))
    return xs


def gate_up_tma_launch(x, gate_up, slots, block_expert, k: int, bm: int, tile: TmaTile, xs=None) -> torch.Tensor:
    """`gate_up_launch`'s act (routed rows) from `_gate_up_tma_kernel`: the weights read by TMA as [E·2I, H]; the
    token rows from xs by TMA if tile.gathered (`gather_rows`' copy, made here unless given), else gathered by
    pointer loads."""
    N, H = x.shape
    E, two_i, _ = gate_up.shape
    I, n_blocks, nt = two_i // 2, block_expert.numel(), triton.cdiv(two_i // 2, tile.n)
    if tile.gathered and xs is None:
        xs = gather_rows(x, slots, block_expert, k, bm, E)
    act = torch.empty(n_blocks * bm, I, dtype=x.dtype, device=x.device)
    w = TensorDescriptor.from_tensor(gate_up.view(E * two_i, H), [tile.n, tile.k])
    a = TensorDescriptor.from_tensor(xs, [bm, tile.k]) if tile.gathered else None
    grid, meta = tma_launch(n_blocks * nt, n_blocks, bm, tile, x.dtype, x.device)
    _gate_up_tma_kernel[grid](x, a, w, slots, block_expert, act, N * k, E, n_blocks, x.stride(0), act.stride(0), I=I,
                              H=H, NT=nt, TOP_K=k, GATHERED=tile.gathered, **meta)
    return act


def down_tma_launch(act, down, slots, block_expert, P: int, bm: int, tile: TmaTile) -> torch.Tensor:
    """`down_launch`'s routed rows [P, H] (pair order, act's dtype, unweighted) from `_down_tma_kernel`: act and the
    weights (as [E·H, I]) read by TMA."""
    E, H, I = down.shape
    n_blocks, nt = block_expert.numel(), triton.cdiv(H, tile.n)
    out = torch.empty(P, H, dtype=act.dtype, device=act.device)
    a = TensorDescriptor.from_tensor(act, [bm, tile.k])
    w = TensorDescriptor.from_tensor(down.view(E * H, I), [tile.n, tile.k])
    grid, meta = tma_launch(n_blocks * nt, n_blocks, bm, tile, act.dtype, act.device)
    _down_tma_kernel[grid](a, w, slots, block_expert, out, P, E, n_blocks, out.stride(0), I=I, H=H, NT=nt, **meta)
    return out

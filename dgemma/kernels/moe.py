"""Routed experts as two grouped GEMMs with the gather, the gated activation and the weighted scatter fused in.

    gate_up:  act[p] = gelu_tanh(x[t] @ Wgu[e, :I].T) * (x[t] @ Wgu[e, I:].T)   per pair p = (token t, expert e)
    down:     out[t] += w[p] * (act[p] @ Wd[e].T)                               over the token's k pairs, in fp32

Same math and roundings as models/diffusion_gemma.py `Experts.forward` (grouped_mm outputs, gelu and the product
rounded to the model dtype; y * w and the sum over k in fp32, cast once).

Notable choices:
- Routing stays on the device (`align`): pairs are sorted by expert and each expert's run is padded to a multiple
  of BLOCK_M, so every M-tile belongs to one expert (the layout of vLLM's `moe_align_block_size`). The grid is the
  static upper bound cdiv(pairs, BLOCK_M) + experts; tiles past the end exit at once. No host sync: capturable.
- The first GEMM gathers its token rows by index (no [pairs, hidden] copy); gate and up tiles share the A tile.
- The second GEMM multiplies by the router weight and writes fp32 rows in pair order; `.view(N, k, H).sum(1)`
  then adds the k rows in the reference's order (deterministic). `atomic=True` adds into [N, H] fp32 with atomics
  instead (less memory traffic, summation order not deterministic).
- BLOCK_M follows the tokens per expert (N·k / E ≈ 16 at batch 1); BLOCK_N, BLOCK_K, warps and stages are autotuned
  on CUDA from a small H100-oriented set, UNTUNED: none of it has been measured yet.
- Under TRITON_INTERPRET=1 the tiles are upcast to fp32 before tl.dot: the interpreter multiplies bf16 tiles as
  raw uint16. On GPU the dot takes bf16 and accumulates in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dgemma.kernels.fmath import MODES, round_to, tanh


def _configs(warps_stages):
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for n in (64, 128) for k in (64, 128) for w, s in warps_stages]


CONFIGS = _configs([(4, 3), (4, 4), (8, 3)])
DEFAULT = {"BLOCK_N": 32, "BLOCK_K": 32}  # the interpreter's tile (no autotuning there)


@triton.jit
def gelu_tanh(x):
    """F.gelu(x, approximate="tanh") as torch computes it in fp32."""
    inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return 0.5 * x * (1.0 + tanh(inner))


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, slots_ptr, block_expert_ptr, act_ptr, P, E,
                    stride_x, stride_we, stride_wn, stride_a,
                    I: tl.constexpr, H: tl.constexpr, TOP_K: tl.constexpr, MODE: tl.constexpr,
                    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0)
    e = tl.load(block_expert_ptr + b)
    if e >= E:  # past the last expert's tiles
        return
    rows = b * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(slots_ptr + rows)
    valid = pair < P
    tok = tl.where(valid, pair // TOP_K, 0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w_gate = w_ptr + e.to(tl.int64) * stride_we + n[:, None] * stride_wn
    w_up = w_gate + I * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + tok[:, None] * stride_x + k[None, :], mask=valid[:, None] & (k < H)[None, :], other=0.0)
        wmask = (n < I)[:, None] & (k < H)[None, :]
        bg = tl.load(w_gate + k[None, :], mask=wmask, other=0.0)
        bu = tl.load(w_up + k[None, :], mask=wmask, other=0.0)
        if UPCAST:
            a, bg, bu = a.to(tl.float32), bg.to(tl.float32), bu.to(tl.float32)
        acc_g = tl.dot(a, tl.trans(bg), acc_g)
        acc_u = tl.dot(a, tl.trans(bu), acc_u)
    gate, up = round_to(acc_g, MODE), round_to(acc_u, MODE)  # the grouped GEMM's output dtype
    h = round_to(round_to(gelu_tanh(gate), MODE) * up, MODE)
    out = act_ptr + rows.to(tl.int64)[:, None] * stride_a + n[None, :]
    tl.store(out, h.to(act_ptr.dtype.element_ty), mask=valid[:, None] & (n < I)[None, :])


@triton.jit
def _down_kernel(act_ptr, w_ptr, slots_ptr, block_expert_ptr, rw_ptr, out_ptr, P, E,
                 stride_a, stride_we, stride_wn, stride_o,
                 I: tl.constexpr, H: tl.constexpr, TOP_K: tl.constexpr, MODE: tl.constexpr, ATOMIC: tl.constexpr,
                 UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0)
    e = tl.load(block_expert_ptr + b)
    if e >= E:
        return
    rows = b * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(slots_ptr + rows)
    valid = pair < P
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w_down = w_ptr + e.to(tl.int64) * stride_we + n[:, None] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(act_ptr + rows.to(tl.int64)[:, None] * stride_a + k[None, :],
                    mask=valid[:, None] & (k < I)[None, :], other=0.0)
        bw = tl.load(w_down + k[None, :], mask=(n < H)[:, None] & (k < I)[None, :], other=0.0)
        if UPCAST:
            a, bw = a.to(tl.float32), bw.to(tl.float32)
        acc = tl.dot(a, tl.trans(bw), acc)
    y = round_to(acc, MODE) * tl.load(rw_ptr + pair, mask=valid, other=0.0)[:, None]  # bf16 y × fp32 w → fp32
    mask = valid[:, None] & (n < H)[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptr + (pair // TOP_K).to(tl.int64)[:, None] * stride_o + n[None, :], y, mask=mask)
    else:
        tl.store(out_ptr + pair.to(tl.int64)[:, None] * stride_o + n[None, :], y, mask=mask)


_TUNED: dict[str, object] = {}


def _kernel(name: str, fn, device: torch.device):
    """The autotuned kernel on CUDA; the plain one (fixed DEFAULT tile) under the interpreter."""
    if device.type != "cuda":
        return fn, DEFAULT
    if name not in _TUNED:
        # reset_to_zero: tuning runs the kernel several times, and the atomic variant accumulates into out.
        reset = ["out_ptr"] if name == "down" else None
        _TUNED[name] = triton.autotune(CONFIGS, key=["I", "H", "BLOCK_M"], reset_to_zero=reset)(fn)
    return _TUNED[name], {}


def block_m_for(pairs: int, num_experts: int) -> int:
    """M-tile height from the mean rows per expert (16 at batch 1: 256 tokens × 8 / 128 experts)."""
    mean = pairs / num_experts
    return 16 if mean <= 24 else 32 if mean <= 48 else 64


def align(idx: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
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
    n_blocks = triton.cdiv(P, block_m) + E  # upper bound on Σ ceil(count_e / block_m)
    slots = torch.full((n_blocks * block_m,), P, dtype=torch.int64, device=idx.device)
    slots[pos] = perm
    tile_start = torch.arange(n_blocks, device=idx.device) * block_m
    block_expert = torch.searchsorted(pad_end, tile_start, right=True).to(torch.int32)
    return slots, block_expert


def moe(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
        atomic: bool = False) -> torch.Tensor:
    """Routed experts: x [N, H] (model dtype), router weights [N, k] fp32 and indices [N, k], gate_up [E, 2I, H]
    (gate rows first), down [E, H, I] → [N, H] in x's dtype. Drop-in for `Experts.forward(x, weights, idx)`."""
    N, H = x.shape
    E, two_i, _ = gate_up.shape
    I, k = two_i // 2, idx.shape[1]
    if gate_up.shape != (E, 2 * I, H) or down.shape != (E, H, I) or weights.shape != idx.shape:
        raise ValueError("moe: shapes do not match")
    if x.dtype not in MODES or gate_up.dtype != x.dtype or down.dtype != x.dtype:
        raise ValueError("moe: x and the expert weights must share one of fp32, bf16, fp16")
    if x.stride(1) != 1 or gate_up.stride(2) != 1 or down.stride(2) != 1:
        raise ValueError("moe: x and the expert weights need unit stride along their last dim")
    P = N * k
    bm = block_m_for(P, E)
    slots, block_expert = align(idx, E, bm)
    n_blocks = block_expert.numel()
    act = torch.empty(n_blocks * bm, I, dtype=x.dtype, device=x.device)
    rw = weights.reshape(-1).float()
    common = dict(TOP_K=k, MODE=MODES[x.dtype], UPCAST=x.device.type != "cuda", BLOCK_M=bm)
    kern, meta = _kernel("gate_up", _gate_up_kernel, x.device)
    kern[lambda m: (n_blocks, triton.cdiv(I, m["BLOCK_N"]))](
        x, gate_up, slots, block_expert, act, P, E, x.stride(0), gate_up.stride(0), gate_up.stride(1), act.stride(0),
        I=I, H=H, **common, **meta)
    out = torch.zeros(N, H, dtype=torch.float32, device=x.device) if atomic else \
        torch.empty(P, H, dtype=torch.float32, device=x.device)
    kern, meta = _kernel("down", _down_kernel, x.device)
    kern[lambda m: (n_blocks, triton.cdiv(H, m["BLOCK_N"]))](
        act, down, slots, block_expert, rw, out, P, E, act.stride(0), down.stride(0), down.stride(1), out.stride(0),
        I=I, H=H, ATOMIC=atomic, **common, **meta)
    return (out if atomic else out.view(N, k, H).sum(dim=1)).to(x.dtype)


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

"""Fused sampler: temperature, race sample, argmax, entropy and the self-conditioning softmax, two passes over V.

What it computes per row r of logits [R, V] (x = the row, optionally softcapped first, then divided by its
temperature: exactly `fast.scores` on `logits / temp`):
    sample   argmax(softmax(x) / E) with E ~ Exp(1) i.i.d. (the exponential race, = torch.multinomial(p, 1))
    argmax   argmax(x), the first index on ties (as torch.argmax)
    entropy  Categorical(logits=x).entropy()
    probs    softmax(x rounded to probs_dtype) in fp32, written once in probs_dtype (what `soft_from_probs` feeds
             the embedding matmul; upstream takes the self-conditioning softmax of the scores in the model dtype)

Notable choices:
- Pass 1 (grid rows × splits) streams a chunk of the row once with an online softmax: running max m,
  Z = Σ exp(x - m), S = Σ exp(x - m)(x - m) (so H = log Z - S / Z), the bf16 sum Zb, the argmax and the race
  winner, and writes 6 floats + 2 ints per (row, split). The sums and winners are kept per lane and reduced once
  at the end of the chunk; only the max is shared by the lanes (one reduction per block, not five). Pass 2
  combines the splits of its row (a few values), writes sample/argmax/entropy once per row, and writes probs over
  its chunk. Splitting V keeps ~4 programs per SM at batch 1 (256 rows) without a third launch.
- The race is compared in log space, argmax(x - log E): the same winner as argmax(p / E) without needing the final
  max and sum, so no rescaling. Rounding can only flip exact near-ties between the two forms.
- Noise is Philox4x32-10 (`tl.philox`): key = seed[r // G] (G = R / len(seed)), counter = (column quad, r % G,
  offset lo, offset hi), offset = offset[r // G] or the single offset. It is read from a device tensor, so a CUDA
  graph advances it without recapture (bump it in place, or pass the rows' own step counters). One Philox call
  gives 4 words, used by 4 sub-blocks of NOISE_Q columns, so the noise of (row, column) does not depend on the
  split or block sizes.
- E = -log1p(-W) with W uniform from all 32 bits (resolution 2^-32 near 0, where the race winners are), log1p
  (`fmath.log1p`; libdevice is not available under TRITON_INTERPRET).
- Rounding to bf16 goes through `fmath.round_to` (on the bits), so the interpreter matches the GPU.
- `noise=` takes explicit exponentials [R, V] instead of Philox (tests; the drop-in for `fast.scores`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dgemma.kernels.fmath import MODES, log1p, round_to, tanh

NOISE_Q = 1024  # columns per sub-block; a tile is 4 sub-blocks sharing one Philox call. Fixed: it defines the noise.
TILE = 4 * NOISE_Q


# --- device helpers ---------------------------------------------------------------------------------------------
@triton.jit
def _scores(row_ptr, cols, V, temp, cap, SOFTCAP: tl.constexpr, HAS_TEMP: tl.constexpr):
    """The processed scores of columns `cols` (fp32, -inf past V): softcap(x) / temperature."""
    x = tl.load(row_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
    if SOFTCAP:
        x = tanh(x / cap) * cap  # lm_head: tanh(logits / cap) * cap
    if HAS_TEMP:
        x = x / temp
    return tl.where(cols < V, x, float("-inf"))


@triton.jit
def _exponential(word):
    """Exp(1) from a uint32 Philox word: W = (word + 1/2) / 2^32 in (0, 1), E = -log1p(-W), always in (0, 17)."""
    w = tl.minimum(word.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10, 0.99999994)
    return -log1p(-w)


@triton.jit
def _tile_noise(key, lane_in_row, sub_row, off_lo, off_hi):
    """Four blocks of Exp(1) for the tile whose quad counters are `lane_in_row` ([NOISE_Q] uint32)."""
    c1 = tl.zeros_like(lane_in_row) + sub_row
    c2 = tl.zeros_like(lane_in_row) + off_lo
    c3 = tl.zeros_like(lane_in_row) + off_hi
    r0, r1, r2, r3 = tl.philox(key, lane_in_row, c1, c2, c3)
    return _exponential(r0), _exponential(r1), _exponential(r2), _exponential(r3)


@triton.jit
def _update(st, x, e, cols, ROUND: tl.constexpr):
    """Fold one block of scores x (with race noise e) into the running state of a chunk. The state is per lane
    (vectors over the block's lanes) except the max m, which the lanes share: one reduction per block, the sums and
    winners are reduced across lanes once, in `_reduce_lanes`."""
    m, z, s, zb, best, best_i, top, top_i = st
    m_new = tl.maximum(m, tl.max(x, 0))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing finite yet: keep exp() away from nan
    alpha = tl.exp(m - m_ref)
    p = tl.exp(x - m_ref)
    d = tl.where(p > 0, x - m_ref, 0.0)  # x = -inf contributes nothing to S (Categorical clamps logp)
    s = alpha * (s + tl.where(z > 0, m - m_ref, 0.0) * z) + p * d
    z = alpha * z + p
    if ROUND != 0:  # Zb is relative to round(m): exp(xb - mb) then matches softmax(x.to(bf16)) term by term
        mb_old = round_to(tl.where(m == float("-inf"), 0.0, m), ROUND)
        mb_new = round_to(m_ref, ROUND)
        zb = tl.where(zb > 0, zb * tl.exp(mb_old - mb_new), 0.0) + tl.exp(round_to(x, ROUND) - mb_new)
    key = x - tl.log(e)
    take = key > best  # strict: a lane meets its columns in increasing order, so it keeps the first of a tie
    best = tl.where(take, key, best)
    best_i = tl.where(take, cols, best_i)
    take = x > top
    top = tl.where(take, x, top)
    top_i = tl.where(take, cols, top_i)
    return m_new, z, s, zb, best, best_i, top, top_i


@triton.jit
def _reduce_lanes(st):
    """The per-lane state of a chunk → (m, Z, S, Zb, race best, its column, max, its column); ties → first column."""
    m, z, s, zb, best, best_i, top, top_i = st
    big = 2147483647
    b = tl.max(best, 0)
    bi = tl.min(tl.where(best == b, best_i, big), 0)
    t = tl.max(top, 0)
    ti = tl.min(tl.where(top == t, top_i, big), 0)
    return m, tl.sum(z, 0), tl.sum(s, 0), tl.sum(zb, 0), b, bi, t, ti


# --- kernels ----------------------------------------------------------------------------------------------------
@triton.jit
def _stats_kernel(x_ptr, stride_x, temp_ptr, temp_stride, temp_group, cap, seed_ptr, offset_ptr, off_stride, group,
                  noise_ptr, stride_n,
                  wf_ptr, wi_ptr, V, chunk, n_split,
                  SOFTCAP: tl.constexpr, HAS_TEMP: tl.constexpr, HAS_NOISE: tl.constexpr, ROUND: tl.constexpr,
                  Q: tl.constexpr, N_TILES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    x_row = x_ptr + row * stride_x
    temp = tl.load(temp_ptr + (row // temp_group) * temp_stride) if HAS_TEMP else 1.0
    if not HAS_NOISE:
        key = tl.load(seed_ptr + row // group)
        off = tl.load(offset_ptr + (row // group) * off_stride).to(tl.int64).to(tl.uint64)
        off_lo, off_hi = (off & 0xFFFFFFFF).to(tl.uint32), (off >> 32).to(tl.uint32)
        sub_row = (row % group).to(tl.uint32)
    lanes = tl.arange(0, Q)
    ninf = tl.full([Q], float("-inf"), tl.float32)
    zero = tl.zeros([Q], tl.float32)
    st = (tl.full([], float("-inf"), tl.float32), zero, zero, zero, ninf, lanes, ninf, lanes)
    start = split * chunk
    for i in range(0, N_TILES):  # tiles past V are masked (only in the last split)
        t = start + i * 4 * Q
        c0, c1, c2, c3 = t + lanes, t + Q + lanes, t + 2 * Q + lanes, t + 3 * Q + lanes
        if HAS_NOISE:
            n_row = noise_ptr + row * stride_n
            e0 = tl.load(n_row + c0, mask=c0 < V, other=1.0)
            e1 = tl.load(n_row + c1, mask=c1 < V, other=1.0)
            e2 = tl.load(n_row + c2, mask=c2 < V, other=1.0)
            e3 = tl.load(n_row + c3, mask=c3 < V, other=1.0)
        else:
            e0, e1, e2, e3 = _tile_noise(key, (t // 4 + lanes).to(tl.uint32), sub_row, off_lo, off_hi)
        st = _update(st, _scores(x_row, c0, V, temp, cap, SOFTCAP, HAS_TEMP), e0, c0, ROUND)
        st = _update(st, _scores(x_row, c1, V, temp, cap, SOFTCAP, HAS_TEMP), e1, c1, ROUND)
        st = _update(st, _scores(x_row, c2, V, temp, cap, SOFTCAP, HAS_TEMP), e2, c2, ROUND)
        st = _update(st, _scores(x_row, c3, V, temp, cap, SOFTCAP, HAS_TEMP), e3, c3, ROUND)
    m, z, s, zb, best, best_i, top, top_i = _reduce_lanes(st)
    wf = wf_ptr + (row * n_split + split) * 6
    tl.store(wf + 0, m)
    tl.store(wf + 1, z)
    tl.store(wf + 2, s)
    tl.store(wf + 3, zb)
    tl.store(wf + 4, best)
    tl.store(wf + 5, top)
    wi = wi_ptr + (row * n_split + split) * 2
    tl.store(wi + 0, best_i.to(tl.int32))
    tl.store(wi + 1, top_i.to(tl.int32))


@triton.jit
def _finish_kernel(x_ptr, stride_x, temp_ptr, temp_stride, temp_group, cap, wf_ptr, wi_ptr, sample_ptr, argmax_ptr,
                   entropy_ptr, probs_ptr, stride_p, V, chunk, n_split,
                   SOFTCAP: tl.constexpr, HAS_TEMP: tl.constexpr, ROUND: tl.constexpr, SPLIT_P2: tl.constexpr,
                   BLOCK: tl.constexpr, N_TILES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    # Combine the splits of this row (every program of the row does it; it is a handful of values).
    sp = tl.arange(0, SPLIT_P2)
    ok = sp < n_split
    wf = wf_ptr + (row * n_split + sp) * 6
    ninf = float("-inf")
    m_s = tl.load(wf + 0, mask=ok, other=ninf)
    z_s = tl.load(wf + 1, mask=ok, other=0.0)
    s_s = tl.load(wf + 2, mask=ok, other=0.0)
    zb_s = tl.load(wf + 3, mask=ok, other=0.0)
    m = tl.max(m_s, 0)
    alpha = tl.where(z_s > 0, tl.exp(m_s - m), 0.0)
    z = tl.sum(alpha * z_s, 0)
    s = tl.sum(tl.where(z_s > 0, alpha * (s_s + (m_s - m) * z_s), 0.0), 0)
    if ROUND != 0:
        mb = round_to(m, ROUND)
        zb = tl.sum(tl.where(zb_s > 0, zb_s * tl.exp(round_to(m_s, ROUND) - mb), 0.0), 0)
    else:
        mb, zb = m, z
    if split == 0:
        best_s = tl.load(wf + 4, mask=ok, other=ninf)
        top_s = tl.load(wf + 5, mask=ok, other=ninf)
        wi = wi_ptr + (row * n_split + sp) * 2
        _, b = tl.max(best_s, 0, return_indices=True, return_indices_tie_break_left=True)
        _, a = tl.max(top_s, 0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(sample_ptr + row, tl.sum(tl.where(sp == b, tl.load(wi, mask=ok, other=0), 0), 0).to(tl.int64))
        tl.store(argmax_ptr + row, tl.sum(tl.where(sp == a, tl.load(wi + 1, mask=ok, other=0), 0), 0).to(tl.int64))
        tl.store(entropy_ptr + row, tl.log(z) - s / z)
    # Self-conditioning probabilities over this program's chunk, written once.
    temp = tl.load(temp_ptr + (row // temp_group) * temp_stride) if HAS_TEMP else 1.0
    x_row = x_ptr + row * stride_x
    p_row = probs_ptr + row * stride_p
    start = split * chunk
    for i in range(0, N_TILES):
        t = start + i * BLOCK
        cols = t + tl.arange(0, BLOCK)
        x = round_to(_scores(x_row, cols, V, temp, cap, SOFTCAP, HAS_TEMP), ROUND)
        p = round_to(tl.exp(x - mb) / zb, ROUND)  # exact in the output dtype, so the cast below is exact
        tl.store(p_row + cols, p.to(probs_ptr.dtype.element_ty), mask=cols < V)


@triton.jit
def _noise_kernel(seed_ptr, offset_ptr, off_stride, group, out_ptr, V, Q: tl.constexpr):
    """Writes the Exp(1) draws the fused sampler uses for (row, columns of one tile): for tests and references."""
    row = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * 4 * Q
    key = tl.load(seed_ptr + row // group)
    off = tl.load(offset_ptr + (row // group) * off_stride).to(tl.int64).to(tl.uint64)
    lanes = tl.arange(0, Q)
    e0, e1, e2, e3 = _tile_noise(key, (t // 4 + lanes).to(tl.uint32), (row % group).to(tl.uint32),
                                 (off & 0xFFFFFFFF).to(tl.uint32), (off >> 32).to(tl.uint32))
    out = out_ptr + row * V + t + lanes
    tl.store(out, e0, mask=t + lanes < V)
    tl.store(out + Q, e1, mask=t + Q + lanes < V)
    tl.store(out + 2 * Q, e2, mask=t + 2 * Q + lanes < V)
    tl.store(out + 3 * Q, e3, mask=t + 3 * Q + lanes < V)


# --- launchers --------------------------------------------------------------------------------------------------
def fused_sample(logits: torch.Tensor, temperature: torch.Tensor | None = None, seed: torch.Tensor | None = None,
                 offset: torch.Tensor | None = None, *, noise: torch.Tensor | None = None, softcap: float = 0.0,
                 probs_dtype: torch.dtype = torch.bfloat16, split: int | None = None):
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
    split: programs per row (None: enough for ~4 programs per SM on CUDA, 1 elsewhere).
    Returns sample [R] int64, argmax [R] int64, entropy [R] fp32, probs [R, V] probs_dtype.
    """
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be [R, V] with unit stride along V, got {tuple(logits.shape)}")
    if logits.dtype not in MODES or probs_dtype not in MODES:
        raise ValueError(f"unsupported dtypes: logits {logits.dtype}, probs {probs_dtype}")
    R, V = logits.shape
    dev = logits.device
    assert R * V < 2**62 and V < 2**31
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
        seed = offset = torch.zeros(1, dtype=torch.int64, device=dev)
        group, noise_arg, noise_stride = 1, noise, noise.stride(0)
    if temperature is not None:
        if temperature.dtype != torch.float32 or temperature.numel() == 0 or R % temperature.numel():
            raise ValueError("temperature must be an fp32 tensor whose length divides R")
        temperature = temperature.reshape(-1)
    temp_arg = temperature if temperature is not None else seed
    temp_stride = temperature.stride(0) if temperature is not None else 0
    temp_group = R // temperature.numel() if temperature is not None else 1
    if split is None:
        split = 1
        if dev.type == "cuda":
            sms = torch.cuda.get_device_properties(dev).multi_processor_count
            split = max(1, min(triton.next_power_of_2(triton.cdiv(4 * sms, max(R, 1))), triton.cdiv(V, TILE)))
    chunk = triton.cdiv(triton.cdiv(V, split), TILE) * TILE  # a whole number of tiles: noise stays put
    n_split = triton.cdiv(V, chunk)
    wf = torch.empty(R, n_split, 6, dtype=torch.float32, device=dev)
    wi = torch.empty(R, n_split, 2, dtype=torch.int32, device=dev)
    sample = torch.empty(R, dtype=torch.int64, device=dev)
    argmax = torch.empty(R, dtype=torch.int64, device=dev)
    entropy = torch.empty(R, dtype=torch.float32, device=dev)
    probs = torch.empty(R, V, dtype=probs_dtype, device=dev)
    if R == 0:
        return sample, argmax, entropy, probs
    # Loop trip counts are constexpr: the interpreter cannot loop over a runtime bound with numpy >= 2.4, and on GPU
    # they are fixed per (V, split) anyway.
    flags = dict(SOFTCAP=bool(softcap), HAS_TEMP=temperature is not None, ROUND=MODES[probs_dtype],
                 N_TILES=chunk // TILE)
    cap = float(softcap) or 1.0
    off_stride = offset.reshape(-1).stride(0) if offset.numel() > 1 else 0
    _stats_kernel[(R, n_split)](logits, logits.stride(0), temp_arg, temp_stride, temp_group, cap, seed, offset,
                                off_stride, group, noise_arg, noise_stride, wf, wi, V, chunk, n_split,
                                HAS_NOISE=noise is not None, Q=NOISE_Q, num_warps=4, **flags)
    _finish_kernel[(R, n_split)](logits, logits.stride(0), temp_arg, temp_stride, temp_group, cap, wf, wi, sample,
                                 argmax, entropy, probs, probs.stride(0), V, chunk, n_split,
                                 SPLIT_P2=triton.next_power_of_2(n_split), BLOCK=TILE, num_warps=8, **flags)
    return sample, argmax, entropy, probs


def philox_exponentials(seed: torch.Tensor, offset: torch.Tensor, rows: int, vocab: int) -> torch.Tensor:
    """The Exp(1) draws [rows, vocab] that `fused_sample(..., seed, offset)` uses (for tests and references)."""
    out = torch.empty(rows, vocab, dtype=torch.float32, device=seed.device)
    off_stride = offset.reshape(-1).stride(0) if offset.numel() > 1 else 0
    _noise_kernel[(rows, triton.cdiv(vocab, TILE))](seed, offset, off_stride, rows // seed.numel(), out, vocab,
                                                     Q=NOISE_Q)
    return out


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


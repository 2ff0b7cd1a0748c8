"""canvas_attention (dgemma/kernels/attention.py) against the model's masked sdpa (`attention_reference`).

Without a GPU the kernel runs under TRITON_INTERPRET=1 (set below, before triton is imported) on CPU tensors with
16 × 16 tiles, so small shapes already give key counts that are not block multiples, row blocks straddling query
heads, several key blocks per split and rows whose splits differ. Empty slots hold large garbage so that reading one
would show. The D = 512 kernel variants (column parts, prefetched K/V, lazy rescaling) run at D 512 with a 3-token
canvas. The causal mode (the encoder's commit pass) is checked against the model's own mask, `Attention.prefix_mask`
(full layers, sliding rings with and without wrap-around, windows wider and narrower than the canvas, left padding,
kv_len bounds, split and not). The `gpu` tests compile it at the real shapes and replay it in a CUDA graph as the
cache grows.

Tolerances: fp32 runs IEEE dots and fp32 softmax, so only summation order differs from sdpa (1e-5). In bf16 the
kernel rounds the probabilities to bf16 for P·V (as flash attention does: ≤ 2^-9 relative per term) and rounds the
output once (≤ 2^-8 relative; the interpreter truncates instead of rounding), so it is compared with the fp32 truth on
the same bf16 inputs at 2^-6 relative + 2^-7 absolute, and its mean error must stay within one bf16 ulp (2^-8
relative) of torch's own bf16 sdpa's (truncating p and the output doubles the mean error of rounding once).
"""

import os
from functools import partial
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from dgemma.config import ModelArgs  # noqa: E402
from dgemma.engine.cache import KVCache  # noqa: E402
from dgemma.kernels.attention import (  # noqa: E402
    CUDA_TILES,
    Config,
    Tile,
    attention_reference,
    cache_lengths,
    canvas_attention,
    default_config,
    split_count,
)
from dgemma.kernels.attention_two_pass import INTERPRET_TWO_PASS, TwoPass, batch_rows, two_pass_config  # noqa: E402
from dgemma.models.diffusion_gemma import Attention  # noqa: E402

# The interpreter evaluates both sides of tl.where (exp2 of -inf - -inf in rows with no valid key yet): numpy warns.
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|overflow|divide by zero):RuntimeWarning")

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
SPLIT = Config(16, 16, 4, 1, splits=3, blocks_per_split=2)  # interpreter tiles, split-KV forced on
GARBAGE = 50.0


def full_layout(lengths: list[int], pads: list[int], cap: int) -> torch.Tensor:
    """pos [B, cap] of a full-attention layer (slot = position): row b holds positions 0..len-1, the first pads[b]
    of them left padding (-1), and the rest of the capacity unused (-1)."""
    pos = torch.full((len(lengths), cap), -1, dtype=torch.long)
    for b, (n, pad) in enumerate(zip(lengths, pads)):
        pos[b, pad:n] = torch.arange(pad, n)
    return pos


def ring_layout(lengths: list[int], cap: int, holes: list[tuple[int, int]]) -> torch.Tensor:
    """pos [B, cap] of a sliding ring (slot = position % cap, the last cap positions kept) with slots hole[0]..hole[1]
    emptied in each row (a rollback)."""
    pos = torch.full((len(lengths), cap), -1, dtype=torch.long)
    for b, n in enumerate(lengths):
        p = torch.arange(max(0, n - cap), n)
        pos[b, p % cap] = p
        pos[b, holes[b][0]:holes[b][1]] = -1
    return pos


def make_inputs(pos: torch.Tensor, rep: int, n_kv: int, T: int, D: int, scratch: int, dtype: torch.dtype,
                seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q [B, H, T, D] (as the model lays it out: a transpose of [B, T, H, D]) and k, v [B, Hkv, C + scratch, D] whose
    empty slots hold large garbage. Scores have std ~2, so the softmax is neither flat nor one-hot."""
    g = torch.Generator().manual_seed(seed)
    B, cap = pos.shape
    q = (torch.randn(B, T, rep * n_kv, D, generator=g) * 1.4 * D**-0.25).transpose(1, 2)
    k = torch.randn(B, n_kv, cap + scratch, D, generator=g) * 1.4 * D**-0.25
    v = torch.randn(B, n_kv, cap + scratch, D, generator=g)
    empty = torch.cat([pos < 0, torch.zeros(B, scratch, dtype=torch.bool)], dim=1)[:, None, :, None]
    k = torch.where(empty, torch.full_like(k, GARBAGE), k)
    v = torch.where(empty, torch.full_like(v, -GARBAGE), v)
    return tuple(t.to(dtype).to(DEV) for t in (q, k, v)) + (pos.to(DEV),)


def check_close(out: torch.Tensor, q, k, v, pos, kv_len=None, reference=attention_reference) -> None:
    """out against sdpa: in fp32 directly; in bf16 against the fp32 truth on the same inputs, and no worse than
    torch's bf16 sdpa plus one ulp."""
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = reference(q, k, v, pos, kv_len)
    if q.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        return
    truth = reference(q.float(), k.float(), v.float(), pos, kv_len)
    torch.testing.assert_close(out.float(), truth, rtol=2**-6, atol=2**-7)
    err, ref_err = (out.float() - truth).abs().mean(), (ref.float() - truth).abs().mean()
    assert err <= ref_err + 2**-8 * truth.abs().mean(), (err, ref_err)  # + one bf16 ulp (2^-8 relative)


CASES = [(D, rep, layout, (None, SPLIT)[(D // 32 + rep + len(layout)) % 2])  # every D × rep × layout; half split
         for D in (32, 64) for rep in (1, 2, 4) for layout in ("full", "ring")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("D,rep,layout,config", CASES,
                         ids=[f"D{D}-rep{rep}-{layout}-{'split' if c else 'unsplit'}" for D, rep, layout, c in CASES])
def test_matches_reference(D, rep, layout, config, dtype):
    # T = 12: rep·T rows straddle 16-row blocks; cap 45 and scratch 12 are not block multiples.
    if layout == "full":  # rows of different lengths, left padding, unused capacity at the end
        pos = full_layout([37, 21], [0, 5], cap=45)
    else:  # one wrapped ring (all slots written) and one short one, each with a hole in the middle
        pos = ring_layout([100, 30], cap=45, holes=[(10, 19), (3, 7)])
    q, k, v, pos = make_inputs(pos, rep, n_kv=2, T=12, D=D, scratch=12, dtype=dtype)
    check_close(canvas_attention(q, k, v, pos, config=config), q, k, v, pos)
    # The layout matters: attending to every slot would give another answer (so this test can fail).
    everything = torch.zeros_like(pos)
    assert not torch.allclose(attention_reference(q, k, v, everything).float(),
                              attention_reference(q, k, v, pos).float(), atol=0.1)


@pytest.mark.parametrize("config", [None, SPLIT], ids=["unsplit", "split"])
def test_kv_len_bounds_the_slots_read(config):
    """Slots >= kv_len are never read (NaN there stays out), even where pos claims them; kv_len is clamped to C."""
    pos = full_layout([60, 60], [0, 0], cap=60)
    q, k, v, pos = make_inputs(pos, 2, 2, 8, 32, 8, torch.float32, seed=1)
    kv_len = torch.tensor([17, 99], dtype=torch.int32, device=DEV)  # row 1: past the capacity → all 60 slots
    k[0, :, 17:60], v[0, :, 17:60] = float("nan"), float("nan")
    out = canvas_attention(q, k, v, pos, kv_len, config=config)
    assert out.isfinite().all()
    ref = attention_reference(q, k.nan_to_num(), v.nan_to_num(), pos, kv_len)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_empty_cache_attends_to_the_canvas_only():
    pos = torch.full((2, 40), -1, dtype=torch.long)
    q, k, v, pos = make_inputs(pos, 2, 2, 8, 32, 8, torch.float32, seed=2)
    for kv_len in (None, torch.zeros(2, dtype=torch.int64, device=DEV), torch.full((2,), 40, device=DEV)):
        for config in (None, SPLIT):
            out = canvas_attention(q, k, v, pos, kv_len, config=config)
            canvas = torch.softmax(q @ k[:, :, 40:].repeat_interleave(2, dim=1).transpose(2, 3), dim=-1)
            torch.testing.assert_close(out, canvas @ v[:, :, 40:].repeat_interleave(2, dim=1), rtol=1e-5, atol=1e-5)


def test_more_splits_than_blocks_and_uneven_rows():
    """Rows whose working split counts differ (one unsplit, written by the attention kernel; one merged from 4)."""
    pos = full_layout([3, 70], [0, 9], cap=80)
    q, k, v, pos = make_inputs(pos, 4, 1, 6, 64, 5, torch.float32, seed=3)
    out = canvas_attention(q, k, v, pos, config=Config(16, 16, 4, 1, splits=4, blocks_per_split=1))
    check_close(out, q, k, v, pos)


def test_cache_layers_share_one_kv_len():
    """On a real KVCache (a wrapped sliding ring, a full layer, left padding, a rolled-back row), one kv_len from
    `cache_lengths` serves every layer and the result is the model's `decoder_mask` attention."""
    args = ModelArgs(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                     num_global_key_value_heads=1, global_head_dim=64, sliding_window=20,
                     layer_types=["sliding_attention", "full_attention"])
    C = 8
    cache = KVCache(args, batch=3, max_len=70, device=DEV, dtype=torch.float32, scratch=C)
    g = torch.Generator().manual_seed(4)
    L = 33
    pos = torch.arange(L).repeat(3, 1)
    valid = pos >= torch.tensor([0, 6, 0])[:, None]  # row 1 is left-padded
    for layer in range(2):
        shape = args.layer_shape(layer)
        kv = torch.randn(2, 3, shape.num_kv_heads, L, shape.head_dim, generator=g).to(DEV) * 0.3
        cache.write(layer, kv[0], kv[1], pos.to(DEV), valid.to(DEV))
    cache.truncate_row(2, 25)  # row 2 rolled back: the ring and the full layer lose positions 25..32
    kv_len = cache_lengths(cache.pos[1])
    assert kv_len.tolist() == [L, L, 25]
    for layer in range(2):
        k, v = cache.k[layer], cache.v[layer]
        k[:, :, cache.capacity[layer]:] = torch.randn(k[:, :, cache.capacity[layer]:].shape, generator=g).to(DEV)
        q = torch.randn(3, 4, C, k.shape[3], generator=g).to(DEV) * 0.3
        out = canvas_attention(q, k, v, cache.pos[layer], kv_len, config=SPLIT if layer else None)
        stacked = q.reshape(3, k.shape[1], -1, k.shape[3])
        ref = torch.nn.functional.scaled_dot_product_attention(stacked, k, v, attn_mask=cache.decoder_mask(layer),
                                                                scale=1.0)
        torch.testing.assert_close(out, ref.reshape(q.shape), rtol=1e-5, atol=1e-5)


def test_strided_inputs_and_output_layout():
    """A row view of a larger cache and a q that is a transpose; the output transposes to [B, T, H·D] for free."""
    pos = full_layout([30, 12, 25], [0, 0, 4], cap=32)
    q, k, v, pos = make_inputs(pos, 2, 2, 8, 32, 8, torch.float32, seed=5)
    q, k, v, pos = q[1:], k[1:], v[1:], pos[1:]
    assert not q.is_contiguous() and k.storage_offset() > 0
    out = canvas_attention(q, k, v, pos)
    check_close(out, q, k, v, pos)
    assert out.transpose(1, 2).is_contiguous()


def test_rejects_bad_inputs():
    pos = full_layout([10], [0], cap=16)
    q, k, v, pos = make_inputs(pos, 2, 2, 4, 32, 4, torch.float32)
    bad = [
        dict(q=q[:, :3]),  # H not a multiple of Hkv
        dict(k=k.to(torch.bfloat16)),  # mixed dtypes
        dict(q=q[..., :24], k=k[..., :24], v=v[..., :24]),  # head dim not a power of 2
        dict(pos=pos.float()),
        dict(pos=torch.full((1, 40), -1, device=DEV)),  # more slots than the buffer
        dict(kv_len=torch.tensor([1, 2], device=DEV)),
        dict(v=v[:, :, :-1]),
        dict(config=Config(16, 16, 1, 1, v_parts=3)),  # column parts must divide the head dim
    ]
    for change in bad:
        args = dict(q=q, k=k, v=v, pos=pos) | change
        with pytest.raises(ValueError, match="canvas_attention"):
            canvas_attention(**args)


# --- D = 512 variants (the full layers): column parts, prefetched K/V, lazy rescaling ------------------------------
# Tiles as the interpreter runs them (16 × 16) with each kernel variant the GPU may use (CUDA_TILES[512] and the
# bench's --sweep-full); rep 8 as in the model (16 query heads over 2 KV heads), T = 3 so 24 rows straddle row blocks.
VARIANTS = {"parts2-lazy": Tile(16, 16, 4, 1, v_parts=2, prefetch=True, lazy_rescale=True),
            "whole-lazy": Tile(16, 16, 4, 1, prefetch=True, lazy_rescale=True),
            "parts4-eager": Tile(16, 16, 4, 1, v_parts=4, prefetch=True),
            "parts2-posmask": Tile(16, 16, 4, 1, v_parts=2)}
D512 = [(name, layout, dtype) for name in VARIANTS for layout in ("full", "ring")
        for dtype in (torch.float32, torch.bfloat16)]


def d512_inputs(layout: str, dtype: torch.dtype, seed: int = 0):
    if layout == "full":  # left padding longer than a key block: a whole row block starts with nothing valid
        pos = full_layout([45, 29], [0, 20], cap=50)
    else:
        pos = ring_layout([90, 33], cap=40, holes=[(5, 14), (20, 26)])
    return make_inputs(pos, rep=8, n_kv=2, T=3, D=512, scratch=9, dtype=dtype, seed=seed)


@pytest.mark.parametrize("name,layout,dtype", D512,
                         ids=[f"{n}-{lay}-{'fp32' if d == torch.float32 else 'bf16'}" for n, lay, d in D512])
def test_d512_variants_match_reference(name, layout, dtype):
    q, k, v, pos = d512_inputs(layout, dtype)
    for splits in (1, 3):  # 3 or 4 key blocks: unsplit, or 2 working splits of 3 (one idle)
        config = Config.of(VARIANTS[name], splits=splits, blocks_per_split=2)
        check_close(canvas_attention(q, k, v, pos, config=config), q, k, v, pos)


@pytest.mark.parametrize("name", ["parts2-lazy", "parts2-posmask", "two-pass"])
def test_d512_kv_len_bounds_the_slots_read(name):
    """Prefetched or not, fused or two-pass, K/V slots >= kv_len are never loaded (NaN there stays out); kv_len is
    clamped to the capacity."""
    pos = full_layout([50, 50], [0, 0], cap=50)
    q, k, v, pos = make_inputs(pos, 8, 2, 3, 512, 9, torch.float32, seed=1)
    kv_len = torch.tensor([19, 70], dtype=torch.int32, device=DEV)
    k[0, :, 19:50], v[0, :, 19:50] = float("nan"), float("nan")
    ref = attention_reference(q, k.nan_to_num(), v.nan_to_num(), pos, kv_len)
    for splits in (1, 2):
        config = (INTERPRET_TWO_PASS._replace(splits=splits, blocks_per_split=1) if name == "two-pass" else
                  Config.of(VARIANTS[name], splits=splits, blocks_per_split=1))
        out = canvas_attention(q, k, v, pos, kv_len, config)
        assert out.isfinite().all()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_lazy_rescale_follows_a_late_jump_of_the_max():
    """Scores that jump by far more than 2^8 in a late key block (the rescaling branch) and stay within it
    elsewhere (the skipping branch): same result as rescaling every block."""
    pos = full_layout([64, 64], [0, 0], cap=64)
    q, k, v, pos = make_inputs(pos, 8, 2, 3, 512, 9, torch.float32, seed=2)
    k[:, :, 50] = 30 * q[:, 0:1, 1] / q[:, 0:1, 1].pow(2).sum(-1, keepdim=True)  # row (head 0, t 1): score 30 at
    # slot 50 (block 3), 43 in base 2, where the other blocks' scores have std ~2
    eager = dict(VARIANTS["parts2-lazy"]._asdict(), lazy_rescale=False)
    for splits in (1, 2):
        lazy = canvas_attention(q, k, v, pos, config=Config.of(VARIANTS["parts2-lazy"], splits, 1))
        check_close(lazy, q, k, v, pos)
        torch.testing.assert_close(lazy, canvas_attention(q, k, v, pos, config=Config.of(Tile(**eager), splits, 1)),
                                   rtol=1e-5, atol=1e-6)


def test_launch_parameters():
    """The CPU default runs CUDA_TILES[D]'s variant; splits fill whole waves of resident programs."""
    q = torch.zeros(1, 16, 256, 512)
    cfg = default_config(q, 2, 32768, 256)
    tile = CUDA_TILES[512]
    assert (cfg.v_parts, cfg.prefetch, cfg.lazy_rescale) == (tile.v_parts, tile.prefetch, tile.lazy_rescale)
    assert split_count(64, 132, 16) == 2  # batch 1, full layers: one wave of 128
    assert split_count(128, 2 * 132, 16) == 2  # two programs per SM
    assert split_count(32, 132, 3) == 3  # batch 1, sliding layers: as many as the ring's blocks allow
    assert split_count(512, 132, 16) == split_count(256, 132, 3) == 1  # batch 8


# --- the two-pass kernels (attention_two_pass.py): scores, then values -----------------------------------------
# Interpreter tiles: 16 rows × 16 keys per scores program, 8-key steps of the values loop (two per block), D in
# 16-column chunks, the columns in 2 (or 4) parts.
TWO_PASS = {"parts2": INTERPRET_TWO_PASS, "parts4-k16": INTERPRET_TWO_PASS._replace(v_parts=4, block_k=16)}
TWO = [(name, layout, dtype, D) for name in TWO_PASS for layout in ("full", "ring")
       for dtype in (torch.float32, torch.bfloat16) for D in (64, 512) if D == 512 or name == "parts2"]


@pytest.mark.parametrize("name,layout,dtype,D", TWO, ids=[
    f"{n}-{lay}-{'fp32' if d == torch.float32 else 'bf16'}-D{D}" for n, lay, d, D in TWO])
def test_two_pass_matches_reference(name, layout, dtype, D):
    """Left padding longer than a key block, rings with holes, rows straddling row blocks, unsplit and split (with
    idle splits): as the fused kernel, against sdpa."""
    q, k, v, pos = d512_inputs(layout, dtype) if D == 512 else make_inputs(
        full_layout([37, 21], [0, 5], cap=45) if layout == "full" else
        ring_layout([100, 30], cap=45, holes=[(10, 19), (3, 7)]), 2, 2, 12, D, 12, dtype)
    for splits in (1, 3):
        config = TWO_PASS[name]._replace(splits=splits, blocks_per_split=1)
        check_close(canvas_attention(q, k, v, pos, config=config), q, k, v, pos)


def test_two_pass_runs_a_big_batch_in_chunks(monkeypatch):
    """With P capped below one batch row's the launches go row by row (`batch_rows`): the same output bit for bit,
    causal mode included."""
    from dgemma.kernels import attention_two_pass

    pos = full_layout([40, 25, 33], [0, 4, 0], cap=40)
    q, k, v, pos = make_inputs(pos, 2, 2, 5, 64, 5, torch.float32, seed=3)
    qpos = (torch.tensor([40, 25, 33])[:, None] + torch.arange(5)).to(DEV)
    config = INTERPRET_TWO_PASS._replace(splits=2, blocks_per_split=1)
    whole = [canvas_attention(q, k, v, pos, config=config, **mode) for mode in ({}, dict(qpos=qpos))]
    assert attention_two_pass.batch_rows(q, k, pos, config) == 3
    monkeypatch.setattr(attention_two_pass, "WORKSPACE_BYTES", 1)
    assert attention_two_pass.batch_rows(q, k, pos, config) == 1
    for mode, want in zip(({}, dict(qpos=qpos)), whole):
        assert torch.equal(canvas_attention(q, k, v, pos, config=config, **mode), want)


def test_two_pass_follows_a_late_jump_of_the_max():
    """One row's score jumps by ~43 (base 2) in a late block: the block maxima rescale exactly, in one split or
    across two (the merge)."""
    pos = full_layout([64, 64], [0, 0], cap=64)
    q, k, v, pos = make_inputs(pos, 8, 2, 3, 64, 9, torch.float32, seed=2)
    k[:, :, 50] = 30 * q[:, 0:1, 1] / q[:, 0:1, 1].pow(2).sum(-1, keepdim=True)
    for splits in (1, 2):
        check_close(canvas_attention(q, k, v, pos, config=INTERPRET_TWO_PASS._replace(splits=splits,
                                                                                     blocks_per_split=1)),
                    q, k, v, pos)


def test_two_pass_rejects_what_it_cannot_run():
    q, k, v, pos = make_inputs(full_layout([20], [0], cap=20), 2, 2, 4, 64, 4, torch.float32)
    for bad in (dict(v_parts=3), dict(block_k=24), dict(block_d=48)):
        with pytest.raises(ValueError, match="two-pass config"):
            canvas_attention(q, k, v, pos, config=INTERPRET_TWO_PASS._replace(**bad))


# --- causal mode: the encoder's commit pass (Attention.encoder_static_context) -------------------------------------
PREFETCH_SPLIT = Config(16, 16, 4, 1, splits=2, blocks_per_split=1, prefetch=True)


def prefix_reference(q, k, v, pos, kv_len=None, *, qpos, window):
    """`encoder_static_context`'s sdpa path: the model's `Attention.prefix_mask` over [cache slots | T scratch slots
    at qpos] (slots >= kv_len, if given, emptied first), query heads stacked per KV head (the mask repeated, as
    repeating K/V would give)."""
    B, H, T, D = q.shape
    n_kv, cap = k.shape[1], pos.shape[1]
    if kv_len is not None:
        pos = torch.where(torch.arange(cap, device=pos.device) < kv_len[:, None], pos, -1)
    layer = SimpleNamespace(sliding=window is not None, window=window)
    mask = Attention.prefix_mask(layer, torch.cat([pos, qpos], dim=1), qpos)  # [B, T, cap + T]
    mask = mask.repeat(1, H // n_kv, 1)[:, None]  # [B, 1, rep·T, cap + T]: stacked row (head j, t) is t's
    out = torch.nn.functional.scaled_dot_product_attention(q.reshape(B, n_kv, -1, D), k, v, attn_mask=mask,
                                                           scale=1.0)
    return out.reshape(q.shape)


def causal_inputs(layout: str, rep: int, D: int, T: int, dtype: torch.dtype, seed: int = 0):
    """A cache layer as the commit pass finds it and the committed canvas at consecutive positions qpos [B, T] after
    each row's prefix → (q, k, v, pos, qpos, window)."""
    if layout == "full":  # left padding, unused capacity; row 1's canvas starts inside its cache (6 cached
        # positions after its first query, hidden from the queries before them: the rule p <= qpos)
        pos, start, window = full_layout([37, 21], [0, 5], cap=45), [37, 15], None
    elif layout == "ring":  # window 20, ring of 19: one wrapped with a hole, one short and left-padded
        pos, start, window = ring_layout([100, 10], cap=19, holes=[(3, 6), (0, 3)]), [100, 10], 20
    else:  # "narrow": window 8 < T, so the window also hides the canvas's own earlier keys
        pos, start, window = ring_layout([60, 5], cap=7, holes=[(0, 0), (0, 2)]), [60, 5], 8
    qpos = torch.tensor(start)[:, None] + torch.arange(T)
    return (*make_inputs(pos, rep, 2, T, D, T, dtype, seed), qpos.to(DEV), window)


CAUSAL = [(D, rep, layout, (None, SPLIT, PREFETCH_SPLIT)[(D // 32 + rep + i) % 3])
          for D in (32, 64) for rep in (1, 2, 4) for i, layout in enumerate(("full", "ring", "narrow"))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("D,rep,layout,config", CAUSAL, ids=[
    f"D{D}-rep{rep}-{layout}-{'unsplit' if c is None else 'prefetch' if c.prefetch else 'split'}"
    for D, rep, layout, c in CAUSAL])
def test_causal_matches_prefix_mask(D, rep, layout, config, dtype):
    # T = 17: rep·T rows straddle 16-row blocks, two scratch blocks; row blocks that skip the second one and row
    # blocks whose last query (t = 16) is the second one's only visible slot.
    q, k, v, pos, qpos, window = causal_inputs(layout, rep, D, 17, dtype)
    reference = partial(prefix_reference, qpos=qpos, window=window)
    check_close(canvas_attention(q, k, v, pos, config=config, qpos=qpos, window=window), q, k, v, pos,
                reference=reference)
    if dtype == torch.float32:  # the module's reference agrees, and causality matters (so this test can fail)
        ref = reference(q, k, v, pos)
        torch.testing.assert_close(attention_reference(q, k, v, pos, qpos=qpos, window=window), ref, rtol=1e-5,
                                   atol=1e-5)
        assert not torch.allclose(attention_reference(q, k, v, pos), ref, atol=0.1)


TWO_CAUSAL = [(layout, dtype, D) for layout in ("full", "ring", "narrow") for dtype in (torch.float32, torch.bfloat16)
              for D in (64, 512) if D == 64 or layout == "full"]


@pytest.mark.parametrize("layout,dtype,D", TWO_CAUSAL, ids=[
    f"{lay}-{'fp32' if d == torch.float32 else 'bf16'}-D{D}" for lay, d, D in TWO_CAUSAL])
def test_two_pass_causal_matches_prefix_mask(layout, dtype, D):
    """The two-pass kernels' causal mode (the commit pass of the full layers), split and not."""
    q, k, v, pos, qpos, window = causal_inputs(layout, 4 if D == 64 else 8, D, 17 if D == 64 else 3, dtype)
    reference = partial(prefix_reference, qpos=qpos, window=window)
    for splits in (1, 3):
        config = INTERPRET_TWO_PASS._replace(splits=splits, blocks_per_split=1)
        check_close(canvas_attention(q, k, v, pos, config=config, qpos=qpos, window=window), q, k, v, pos,
                    reference=reference)


@pytest.mark.parametrize("config", [None, SPLIT, PREFETCH_SPLIT], ids=["unsplit", "split", "prefetch"])
@pytest.mark.parametrize("window", [None, 25])
def test_causal_kv_len_bounds_the_slots_read(config, window):
    """Cache slots >= kv_len are never read (NaN there stays out) although their positions precede the queries."""
    pos = full_layout([60, 60], [0, 0], cap=60)
    q, k, v, pos = make_inputs(pos, 2, 2, 20, 32, 20, torch.float32, seed=1)
    qpos = (60 + torch.arange(20)).expand(2, -1).to(DEV)
    kv_len = torch.tensor([17, 99], dtype=torch.int32, device=DEV)  # row 1: past the capacity → all 60 slots
    k[0, :, 17:60], v[0, :, 17:60] = float("nan"), float("nan")
    out = canvas_attention(q, k, v, pos, kv_len, config, qpos=qpos, window=window)
    assert out.isfinite().all()
    ref = prefix_reference(q, k.nan_to_num(), v.nan_to_num(), pos, kv_len, qpos=qpos, window=window)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [None, SPLIT], ids=["unsplit", "split"])
def test_causal_skips_the_scratch_after_a_row_block(config):
    """Row block t = 0..15 never reads scratch slot 16 (a later position): NaN values there stay out of it and reach
    row block [16], which sees it."""
    pos = full_layout([30], [0], cap=32)
    q, k, v, pos = make_inputs(pos, 1, 1, 17, 32, 17, torch.float32, seed=6)
    qpos = (30 + torch.arange(17))[None].to(DEV)
    clean = v.clone()
    v[:, :, 32 + 16:] = float("nan")
    out = canvas_attention(q, k, v, pos, config=config, qpos=qpos)
    assert out[:, :, :16].isfinite().all() and out[:, :, 16:].isnan().all()
    ref = prefix_reference(q, k, clean, pos, qpos=qpos, window=None)
    torch.testing.assert_close(out[:, :, :16], ref[:, :, :16], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,dtype", [("parts2-lazy", torch.float32), ("parts2-lazy", torch.bfloat16),
                                        ("parts2-posmask", torch.float32)], ids=["parts2-lazy-fp32",
                                                                                "parts2-lazy-bf16", "parts2-posmask"])
def test_causal_d512_variants(name, dtype):
    """The full layers' kernel variants (column parts, prefetch, lazy rescaling) in causal mode, rep 8, T = 3."""
    for layout in ("full", "ring"):
        q, k, v, pos, qpos, window = causal_inputs(layout, 8, 512, 3, dtype, seed=7)
        for splits in (1, 3):
            out = canvas_attention(q, k, v, pos, None, Config.of(VARIANTS[name], splits, 1), qpos=qpos, window=window)
            check_close(out, q, k, v, pos, reference=partial(prefix_reference, qpos=qpos, window=window))


def test_causal_on_a_kv_cache_layer_matches_the_model(monkeypatch):
    """`Attention.encoder_static_context` on a real KVCache (a wrapped ring, a full layer, a left-padded row): the
    causal kernel (forced on, here in the interpreter) gives the sdpa path's output and writes the same cache."""
    from dgemma.models import diffusion_gemma as dg

    args = ModelArgs(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                     num_global_key_value_heads=1, global_head_dim=64, sliding_window=12,
                     layer_types=["sliding_attention", "full_attention"])
    B, L, C = 2, 30, 16  # the ring (11 slots) has wrapped; the canvas is wider than the window
    g = torch.Generator().manual_seed(8)
    kvs = [torch.randn(2, B, args.layer_shape(i).num_kv_heads, L + C, args.layer_shape(i).head_dim, generator=g) * 0.5
           for i in range(2)]
    qs = [torch.randn(B, 4, C, args.layer_shape(i).head_dim, generator=g) * 0.5 for i in range(2)]
    pos, enc_pos = torch.arange(L).repeat(B, 1).to(DEV), torch.arange(L, L + C).repeat(B, 1).to(DEV)
    valid = pos >= torch.tensor([0, 7], device=DEV)[:, None]  # row 1 is left-padded
    monkeypatch.setitem(dg.KERNELS, "canvas_attention", canvas_attention)
    caches, outs = [], []
    for kernel_on in (False, True):
        monkeypatch.setattr(dg, "canvas_kernel_on", lambda x, on=kernel_on: on)
        cache = KVCache(args, B, L + C, DEV, torch.float32, scratch=C)
        for layer, kv in enumerate(kvs):  # the prefill
            cache.write(layer, kv[0, :, :, :L].to(DEV), kv[1, :, :, :L].to(DEV), pos, valid)
        cache.kv_len = cache_lengths(cache.pos[0])  # as run_layers sets it for encode_static
        for layer, (kv, q) in enumerate(zip(kvs, qs)):  # the commit pass
            k, v = (t[:, :, L:].to(DEV) for t in kv)
            outs.append(Attention(args, layer).encoder_static_context(q.to(DEV), k, v, cache, enc_pos))
        caches.append(cache)
    for a, b in zip(outs[:2], outs[2:]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for layer in range(2):
        assert torch.equal(caches[0].pos[layer], caches[1].pos[layer])
        assert torch.equal(caches[0].k[layer], caches[1].k[layer])


# --- GPU: real shapes, CUDA graphs --------------------------------------------------------------------------------
REAL = [(256, 8, True), (512, 2, False)]  # (head dim, KV heads, sliding): Gemma 4 26B-A4B, 16 query heads


def real_inputs(D: int, n_kv: int, sliding: bool, cache: int, B: int = 2, seed: int = 0):
    cap = min(1023, cache) if sliding else cache
    lengths = [cache, max(1, cache // 3), max(1, cache // 2), max(1, cache - 7)][:B]
    pos = ring_layout(lengths, cap, [(0, 0)] * B) if sliding else full_layout(lengths, [0] * B, cap)
    return make_inputs(pos, 16 // n_kv, n_kv, 256, D, 256, torch.bfloat16, seed)


@pytest.mark.gpu
@pytest.mark.parametrize("cache", [512, 32768])
@pytest.mark.parametrize("D,n_kv,sliding", REAL, ids=["sliding-D256", "full-D512"])
@pytest.mark.parametrize("B", [1, 2])
def test_gpu_real_shapes(D, n_kv, sliding, cache, B):
    q, k, v, pos = real_inputs(D, n_kv, sliding, cache, B)
    check_close(canvas_attention(q, k, v, pos), q, k, v, pos)


@pytest.mark.gpu
@pytest.mark.parametrize("cache", [512, 32768])
@pytest.mark.parametrize("D,n_kv,sliding", REAL, ids=["sliding-D256", "full-D512"])
@pytest.mark.parametrize("B", [1, 2])
def test_gpu_causal_real_shapes(D, n_kv, sliding, cache, B):
    """The commit pass's encoder attention: the canvas at the positions after each row's prefix (sliding: window
    1024 over a ring of 1023 slots, wrapped at 32K), causal mode against `prefix_mask`'s sdpa."""
    q, k, v, pos = real_inputs(D, n_kv, sliding, cache, B)
    qpos = (torch.tensor([cache, max(1, cache // 3)][:B])[:, None] + torch.arange(256)).to(DEV)
    window = 1024 if sliding else None
    out = canvas_attention(q, k, v, pos, cache_lengths(pos), qpos=qpos, window=window)
    check_close(out, q, k, v, pos, reference=partial(prefix_reference, qpos=qpos, window=window))


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["decoder", "causal"])
@pytest.mark.parametrize("D,n_kv,sliding", REAL, ids=["sliding-D256", "full-D512"])
def test_gpu_graph_replay_follows_the_cache_length(D, n_kv, sliding, causal):
    """Captured once at a short length, replayed as the cache grows and shrinks (pos and kv_len updated in place;
    at batch 1 the working split count changes from 1 to the maximum across replays; causal: qpos follows)."""
    cache = 32768
    q, k, v, pos = real_inputs(D, n_kv, sliding, cache, B=1)
    kv_len = torch.tensor([300], dtype=torch.int32, device=DEV)
    pos_now = pos.clone()
    qpos = torch.zeros(1, 256, dtype=torch.long, device=DEV)
    mode = dict(qpos=qpos, window=1024 if sliding else None) if causal else {}
    lengths = [300, cache, 5000, 1, 17000]

    def set_length(n: int) -> None:
        cap = pos.shape[1]
        pos_now.copy_(ring_layout([n], cap, [(0, 0)]) if sliding else full_layout([n], [0], cap))
        kv_len.fill_(n)
        qpos.copy_(n + torch.arange(256))

    set_length(lengths[0])
    out = canvas_attention(q, k, v, pos_now, kv_len, **mode)  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = canvas_attention(q, k, v, pos_now, kv_len, **mode)
    for n in lengths:
        set_length(n)
        q.normal_(0, 1.4 * D**-0.25)  # fresh contents each replay, same storage
        graph.replay()
        torch.cuda.synchronize()
        check_close(out, q, k, v, pos_now, reference=partial(prefix_reference, **mode) if causal else
                    attention_reference)


GPU_D512 = {"before-parts": Tile(64, 32, 8, 2), "parts2": Tile(128, 32, 8, 2, v_parts=2, prefetch=True),
            "default": CUDA_TILES[512]}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_D512))
@pytest.mark.parametrize("B,cache", [(1, 32768), (2, 4096)])
def test_gpu_d512_variants(name, B, cache):
    """Each full-layer variant compiled at the real shape, split (batch 1) and not."""
    q, k, v, pos = real_inputs(512, 2, False, cache, B)
    config = default_config(q, 2, pos.shape[1], 256, GPU_D512[name])
    check_close(canvas_attention(q, k, v, pos, config=config), q, k, v, pos)


@pytest.mark.gpu
@pytest.mark.parametrize("B,cache", [(1, 32768), (2, 4096), (1, 512), (4, 32768)])
def test_gpu_two_pass_real_shapes(B, cache):
    """The two-pass kernels compiled at the full layers' real shape (TwoPass's defaults, splits as on the GPU); batch
    4 at 32K runs in two chunks of rows (3 + 1, `batch_rows`)."""
    q, k, v, pos = real_inputs(512, 2, False, cache, B)
    config = two_pass_config(q, 2, pos.shape[1], 256, TwoPass())
    assert (batch_rows(q, k, pos, config) < B) == (B == 4)
    check_close(canvas_attention(q, k, v, pos, config=config), q, k, v, pos)


@pytest.mark.gpu
def test_gpu_two_pass_graph_replay_follows_the_cache_length():
    """Captured once at a short length, replayed as the cache grows and shrinks (the split count changes)."""
    q, k, v, pos = real_inputs(512, 2, False, 32768, B=1)
    config = two_pass_config(q, 2, pos.shape[1], 256, TwoPass())
    kv_len = torch.tensor([300], dtype=torch.int32, device=DEV)
    pos_now = pos.clone()
    canvas_attention(q, k, v, pos_now, kv_len, config)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = canvas_attention(q, k, v, pos_now, kv_len, config)
    for n in [300, 32768, 5000, 1, 17000]:
        pos_now.copy_(full_layout([n], [0], pos.shape[1]))
        kv_len.fill_(n)
        q.normal_(0, 1.4 * 512**-0.25)
        graph.replay()
        torch.cuda.synchronize()
        check_close(out, q, k, v, pos_now)

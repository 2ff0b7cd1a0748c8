"""canvas_attention (dgemma/kernels/attention.py) against the model's masked sdpa (`attention_reference`).

Without a GPU the kernel runs under TRITON_INTERPRET=1 (set below, before triton is imported) on CPU tensors with
16 × 16 tiles, so small shapes already give key counts that are not block multiples, row blocks straddling query
heads, several key blocks per split and rows whose splits differ. Empty slots hold large garbage so that reading one
would show. The D = 512 kernel variants (column parts, prefetched K/V, lazy rescaling) run at D 512 with a 3-token
canvas. The `gpu` tests compile it at the real shapes and replay it in a CUDA graph as the cache grows.

Tolerances: fp32 runs IEEE dots and fp32 softmax, so only summation order differs from sdpa (1e-5). In bf16 the
kernel rounds the probabilities to bf16 for P·V (as flash attention does: ≤ 2^-9 relative per term) and rounds the
output once (≤ 2^-8 relative; the interpreter truncates instead of rounding), so it is compared with the fp32 truth on
the same bf16 inputs at 2^-6 relative + 2^-7 absolute, and its mean error must stay within one bf16 ulp (2^-8
relative) of torch's own bf16 sdpa's (truncating p and the output doubles the mean error of rounding once).
"""

import os

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


def check_close(out: torch.Tensor, q, k, v, pos, kv_len=None) -> None:
    """out against sdpa: in fp32 directly; in bf16 against the fp32 truth on the same inputs, and no worse than
    torch's bf16 sdpa plus one ulp."""
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = attention_reference(q, k, v, pos, kv_len)
    if q.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        return
    truth = attention_reference(q.float(), k.float(), v.float(), pos, kv_len)
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


@pytest.mark.parametrize("name", ["parts2-lazy", "parts2-posmask"])
def test_d512_kv_len_bounds_the_slots_read(name):
    """Prefetched or not, K/V slots >= kv_len are never loaded (NaN there stays out)."""
    pos = full_layout([50, 50], [0, 0], cap=50)
    q, k, v, pos = make_inputs(pos, 8, 2, 3, 512, 9, torch.float32, seed=1)
    kv_len = torch.tensor([19, 70], dtype=torch.int32, device=DEV)
    k[0, :, 19:50], v[0, :, 19:50] = float("nan"), float("nan")
    ref = attention_reference(q, k.nan_to_num(), v.nan_to_num(), pos, kv_len)
    for splits in (1, 2):
        out = canvas_attention(q, k, v, pos, kv_len, Config.of(VARIANTS[name], splits=splits, blocks_per_split=1))
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


# --- GPU: real shapes, CUDA graphs --------------------------------------------------------------------------------
REAL = [(256, 8, True), (512, 2, False)]  # (head dim, KV heads, sliding): Gemma 4 26B-A4B, 16 query heads


def real_inputs(D: int, n_kv: int, sliding: bool, cache: int, B: int = 2, seed: int = 0):
    cap = min(1023, cache) if sliding else cache
    lengths = [cache, max(1, cache // 3)][:B]
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
@pytest.mark.parametrize("D,n_kv,sliding", REAL, ids=["sliding-D256", "full-D512"])
def test_gpu_graph_replay_follows_the_cache_length(D, n_kv, sliding):
    """Captured once at a short length, replayed as the cache grows and shrinks (pos and kv_len updated in place;
    at batch 1 the working split count changes from 1 to the maximum across replays)."""
    cache = 32768
    q, k, v, pos = real_inputs(D, n_kv, sliding, cache, B=1)
    kv_len = torch.tensor([300], dtype=torch.int32, device=DEV)
    pos_now = pos.clone()
    lengths = [300, cache, 5000, 1, 17000]

    def set_length(n: int) -> None:
        cap = pos.shape[1]
        pos_now.copy_(ring_layout([n], cap, [(0, 0)]) if sliding else full_layout([n], [0], cap))
        kv_len.fill_(n)

    set_length(lengths[0])
    out = canvas_attention(q, k, v, pos_now, kv_len)  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = canvas_attention(q, k, v, pos_now, kv_len)
    for n in lengths:
        set_length(n)
        q.normal_(0, 1.4 * D**-0.25)  # fresh contents each replay, same storage
        graph.replay()
        torch.cuda.synchronize()
        check_close(out, q, k, v, pos_now)


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

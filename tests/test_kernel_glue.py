"""Launch shapes of the layer's glue kernels (ffn_tail, qkv_prep, attn_residual): every launch gives the same bits.

Each module's `CUDA_LAUNCH` picks rows per program and warps by row count (rms_norm.py `launch_for`); ffn_tail can
also load several routed rows at once (`TailLaunch.unroll`). None of that may move a rounding or drop a row. Under
TRITON_INTERPRET=1 (no GPU) the row sums do not depend on the launch, so these tests pin the rest: masks, row
indexing, the unrolled k-sum. On CUDA, where a row sum's fp32 order follows its layout, the `gpu` test compares
every `CUDA_LAUNCH` entry with `block_shape`'s launch at the real shape (scripts/gpu_glue_bench.py does the same for
its candidates).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from dgemma.kernels import ffn_tail as ktail  # noqa: E402
from dgemma.kernels import layer_norms as knorms  # noqa: E402
from dgemma.kernels import qkv_prep as kprep  # noqa: E402
from dgemma.kernels.fmath import pdl, pdl_start, round_to  # noqa: E402
from dgemma.kernels.rms_norm import Launch, block_shape, checked_launch, launch_for  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TailLaunch = ktail.TailLaunch


def test_launch_for_picks_by_min_rows():
    table = {4096: {0: Launch(1, 8), 512: Launch(2, 8), 2048: Launch(4, 8)}, 256: {64: Launch(8, 4)}}
    default = Launch(16, 4)
    assert [launch_for(table, 4096, R, default) for R in (1, 511, 512, 2047, 2048, 10**6)] == [
        Launch(1, 8), Launch(1, 8), Launch(2, 8), Launch(2, 8), Launch(4, 8), Launch(4, 8)]
    assert launch_for(table, 256, 63, default) == default  # below the smallest key
    assert launch_for(table, 256, 64, default) == Launch(8, 4)
    assert launch_for(table, 128, 10**6, default) == default  # no entry for this width


def test_checked_launch_and_unroll():
    assert checked_launch("k", TailLaunch(2, 8, 4)) == Launch(2, 8)
    for bad in (Launch(3, 8), Launch(0, 8), Launch(2, 3), Launch(2, 64)):
        with pytest.raises(ValueError, match="power of two"):
            checked_launch("k", bad)
    assert [ktail.unroll_for(8, u) for u in (0, 1, 2, 3, 4, 8, 16)] == [1, 1, 2, 2, 4, 8, 8]
    assert [ktail.unroll_for(3, u) for u in (0, 2, 3, 8)] == [1, 1, 3, 3]
    assert ktail.unroll_for(0, 4) == 1  # no rows to sum: any step


def test_tables_keep_the_row_sums_layout():
    """At BLOCK_D 4096 every pinned launch keeps `block_shape`'s warps (the row sums' fp32 order follows the warps
    along the row); qkv_prep keeps `block_shape`'s launch (its measured candidates changed bits, not kept)."""
    for table in (ktail.CUDA_LAUNCH[4096], knorms.CUDA_LAUNCH[4096]):
        assert 0 in table and all(launch.warps == block_shape(2816)[2] for launch in table.values())
    for D in (256, 512):
        assert kprep.CUDA_LAUNCH[D][0] == Launch(*block_shape(D)[::2])


def weights_of(D, n, dtype, g):
    return [(1 + 0.2 * torch.randn(D, generator=g)).to(dtype).to(DEV) for _ in range(n)]


def tail_case(tokens, D, dtype, unsummed, seed=0):
    g = torch.Generator().manual_seed(seed)
    R, k, J = tokens, 8, 3
    x = (torch.randn(1, R, D, generator=g) * 20).to(dtype).to(DEV)
    routed = torch.randn(R, k, D, generator=g).to(dtype).to(DEV)
    weights = torch.softmax(torch.randn(R, k, generator=g) * 2, dim=-1).to(DEV)
    if unsummed:
        dense, moe, kw = torch.randn(R, J, D, generator=g).to(DEV), routed, dict(moe_weights=weights, dense_parts=True)
    else:
        dense, moe, kw = torch.randn(1, R, D, generator=g).to(dtype).to(DEV), routed[:, 0].view_as(x), {}
    w1, w2, w, wn = weights_of(D, 4, dtype, g)
    scalar = torch.tensor([0.75], dtype=dtype, device=DEV)
    return (x, dense, moe, w1, w2, w, scalar, 1e-6), kw | dict(next_weight=wn)


@pytest.mark.parametrize("D,tokens,unsummed", [(2816, 5, True), (2816, 9, False), (48, 13, True)])
def test_ffn_tail_launches_agree(D, tokens, unsummed):
    args, kw = tail_case(tokens, D, torch.bfloat16, unsummed, seed=D + tokens)
    want = ktail.ffn_tail(*args, **kw)
    launches = [TailLaunch(1, 8, 0), TailLaunch(2, 8, 0), TailLaunch(4, 8, 2), TailLaunch(1, 8, 8),
                TailLaunch(2, 8, 4), TailLaunch(8, 4, 3), TailLaunch(64, 4, 1)]
    for launch in launches:
        for got, ref in zip(ktail.ffn_tail(*args, **kw, launch=launch), want, strict=True):
            assert torch.equal(got, ref), launch


@pytest.mark.parametrize("D,tokens", [(2816, 7), (48, 13)])
def test_attn_residual_launches_agree(D, tokens):
    g = torch.Generator().manual_seed(D)
    o, x = ((torch.randn(1, tokens, D, generator=g) * s).to(torch.bfloat16).to(DEV) for s in (1, 20))
    args = (o, x, *weights_of(D, 4, torch.bfloat16, g), D**-0.5, 1e-6)
    want = knorms.attn_residual(*args)
    for launch in (Launch(1, 8), Launch(2, 8), Launch(4, 8), Launch(32, 4), Launch(8, 2)):
        for got, ref in zip(knorms.attn_residual(*args, launch=launch), want, strict=True):
            assert torch.equal(got, ref), launch


@pytest.mark.parametrize("D,has_v", [(256, True), (512, False), (32, True)])
def test_qkv_prep_launches_agree(D, has_v):
    g = torch.Generator().manual_seed(D)
    B, T, H, Hkv = 2, 5, 4, 2
    qkv = (torch.randn(B, T, (H + (2 if has_v else 1) * Hkv) * D, generator=g) * 3).to(torch.bfloat16).to(DEV)
    angle = torch.rand(B, T, D, generator=g) * 6.3
    cos, sin = (f(angle).to(torch.bfloat16).to(DEV) for f in (torch.cos, torch.sin))
    args = (qkv, cos, sin, *weights_of(D, 2, torch.bfloat16, g), 1e-6, H, Hkv)
    want = kprep.qkv_prep(*args)
    for launch in (Launch(8, 4), Launch(4, 2), Launch(2, 1), Launch(32, 8)):
        for got, ref in zip(kprep.qkv_prep(*args, launch=launch), want, strict=True):
            assert torch.equal(got, ref), launch


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [256, 2048])
def test_cuda_launch_tables_keep_bits_cuda(tokens):
    """At the 26B-A4B shape each kernel's pinned launch for `tokens` rows gives `block_shape`'s launch's bits (the row
    sums' layout must not change: rms_norm.py)."""
    args, kw = tail_case(tokens, 2816, torch.bfloat16, tokens <= 512)
    r, _, w = block_shape(2816)
    for got, ref in zip(ktail.ffn_tail(*args, **kw), ktail.ffn_tail(*args, **kw, launch=TailLaunch(r, w)),
                        strict=True):
        assert torch.equal(got, ref)
    g = torch.Generator().manual_seed(tokens)
    o, x = ((torch.randn(1, tokens, 2816, generator=g) * s).to(torch.bfloat16).to(DEV) for s in (1, 20))
    res_args = (o, x, *weights_of(2816, 4, torch.bfloat16, g), 2816**-0.5, 1e-6)
    for got, ref in zip(knorms.attn_residual(*res_args), knorms.attn_residual(*res_args, launch=Launch(r, w)),
                        strict=True):
        assert torch.equal(got, ref)
    for D, Hkv, has_v in ((256, 8, True), (512, 2, False)):
        B, T = tokens // 256, 256
        qkv = (torch.randn(B, T, (16 + (2 if has_v else 1) * Hkv) * D, generator=g) * 3).to(torch.bfloat16).to(DEV)
        angle = torch.rand(B, T, D, generator=g) * 6.3
        cos, sin = (f(angle).to(torch.bfloat16).to(DEV) for f in (torch.cos, torch.sin))
        prep_args = (qkv, cos, sin, *weights_of(D, 2, torch.bfloat16, g), 1e-6, 16, Hkv)
        r, _, w = block_shape(D)
        for got, ref in zip(kprep.qkv_prep(*prep_args), kprep.qkv_prep(*prep_args, launch=Launch(r, w)), strict=True):
            assert torch.equal(got, ref)


@triton.jit
def _round_bf16_kernel(x_ptr, y_ptr, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + i, round_to(tl.load(x_ptr + i, mask=i < N), 1), mask=i < N)


def test_round_to_bf16_matches_torch_with_ties_infinities_and_nan():
    """fmath.round_to (MODE bf16): the hardware cast when compiled, bit rounding under the interpreter; both must give
    torch's round-to-nearest-even bits, keep ±inf, carry into the exponent, and keep NaN a NaN."""
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, 1.0, 1.00390625, 1.01171875, 1 + 2**-8 + 2**-20, 3.3895314e38, 3.4028235e38,
                            float("inf"), -float("inf"), 1e-40, -1e-40, 255.5, 256.5])
    bits = torch.randint(0, 2**31 - 1, (4096,), generator=g, dtype=torch.int64).to(torch.int32)
    x = torch.cat([special, -special, torch.randn(4096, generator=g) * 100, bits.view(torch.float32)])
    x = torch.cat([x[torch.isfinite(x) | torch.isinf(x)], torch.tensor([float("nan")])]).to(DEV)
    y = torch.empty_like(x)
    _round_bf16_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    expected = x.to(torch.bfloat16).float()
    assert torch.isnan(y[-1]) and torch.equal(y[:-1].view(torch.int32), expected[:-1].view(torch.int32))


@triton.jit
def _pdl_double_kernel(x_ptr, y_ptr, N, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < N) * 2, mask=i < N)


def test_pdl_launch_arguments(monkeypatch):
    """fmath.pdl: off on the CPU and with DGEMMA_PDL=0 (without asking CUDA anything); on a GPU of compute capability
    9+ on, and a chain of kernels launched with it and captured in a CUDA graph keeps the stream's order (each one
    reads the previous one's output)."""
    assert pdl(torch.device("cpu")) == dict(PDL=False, launch_pdl=False)
    monkeypatch.setenv("DGEMMA_PDL", "0")
    assert pdl(torch.device("cuda")) == dict(PDL=False, launch_pdl=False)
    monkeypatch.delenv("DGEMMA_PDL")
    x = torch.arange(5000, dtype=torch.float32, device=DEV)
    bufs = [torch.empty_like(x) for _ in range(8)]

    def chain():
        src = x
        for b in bufs:
            _pdl_double_kernel[(triton.cdiv(x.numel(), 256),)](src, b, x.numel(), BLOCK=256, **pdl(x.device))
            src = b

    chain()
    assert torch.equal(bufs[-1], x * 256)
    if DEV == "cuda":
        assert pdl(x.device)["PDL"] == (torch.cuda.get_device_capability()[0] >= 9)
        for b in bufs:
            b.zero_()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            chain()
        for _ in range(3):
            for b in bufs:
                b.zero_()
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(bufs[-1], x * 256)

"""The TMA-fed routed-expert GEMMs (dgemma/kernels/moe.py, `TmaTile`) against the pointer kernels.

Without a GPU they run under TRITON_INTERPRET=1 at a small shape with 16-byte aligned rows (H 64, I 48: the last
gate/up N-block reads rows past I), padding rows and an expert without tokens, and give the pointer kernels' bits:
same BLOCK_K, so the same fp32 products added in the same order. The `gpu`-marked tests run 26B-A4B's shape.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from dgemma.kernels import moe as kmoe  # noqa: E402
from dgemma.kernels.moe import Tile, TmaTile, align, moe, reference_moe  # noqa: E402

# The interpreter evaluates both sides of tl.where (expm1's 0/0 at 0 in the branch not taken): numpy warns.
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|divide by zero):RuntimeWarning")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
EMPTY = 3  # the expert no token picks


def case(N, E, k, H, I, dtype, device, seed=0):
    """x, router weights and indices (expert EMPTY never chosen), gate_up [E, 2I, H], down [E, H, I]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g).to(dtype).to(device)
    gate_up = (torch.randn(E, 2 * I, H, generator=g) * H**-0.5).to(dtype).to(device)
    down = (torch.randn(E, H, I, generator=g) * I**-0.5).to(dtype).to(device)
    logits = torch.randn(N, E, generator=g) * 3
    logits[:, EMPTY] = -torch.inf
    weights, idx = torch.softmax(logits, dim=-1).topk(k, dim=-1)
    return x, weights.to(device), idx.to(device), gate_up, down


def calls(monkeypatch) -> list[str]:
    """Names of the TMA launches that run after this (spied on in the module)."""
    seen = []
    for name in ("gate_up_tma_launch", "down_tma_launch"):
        fn = getattr(kmoe, name)
        monkeypatch.setattr(kmoe, name, lambda *a, _fn=fn, _name=name, **kw: seen.append(_name) or _fn(*a, **kw))
    return seen


OPTIONS = [{}, {"persistent": True}, {"gathered": False}, {"gathered": False, "persistent": True},
           {"persistent": True, "flatten": True}]  # flatten: a compiler hint, a no-op here


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bm", [16, 32])
@pytest.mark.parametrize("opts", OPTIONS)
def test_tma_launches_match_pointer_kernels(dtype, bm, opts):
    N, E, k, H, I = 40, 8, 2, 64, 48
    x, weights, idx, gate_up, down = case(N, E, k, H, I, dtype, DEV)
    slots, block_expert = align(idx, E, bm)
    assert EMPTY not in block_expert.tolist() and (slots == N * k).any()  # an empty expert, padding rows
    tile, tma = Tile(32, 32, 1, 1), TmaTile(32, 32, 1, 1, **opts)
    act = kmoe.gate_up_launch(x, gate_up, slots, block_expert, k, bm, tile)
    act_tma = kmoe.gate_up_launch(x, gate_up, slots, block_expert, k, bm, tma)
    pair, live = slots.view(-1, bm), (block_expert < E)[:, None]
    rows, pad = (pair < N * k).flatten(), ((pair == N * k) & live).flatten()
    assert torch.equal(act_tma[rows], act[rows])
    assert not act_tma[pad].any()  # written as zeros: down's TMA reads them
    out, _ = kmoe.down_launch(act, down, slots, block_expert, weights, N, bm, tile)
    out_tma, parts = kmoe.down_launch(act_tma, down, slots, block_expert, weights, N, bm, tma)
    assert parts is None and torch.equal(out_tma, out)


def test_gather_rows():
    N, E, k, bm = 40, 8, 2, 16
    x, _, idx, _, _ = case(N, E, k, 64, 48, torch.bfloat16, DEV)
    slots, block_expert = align(idx, E, bm)
    xs = kmoe.gather_rows(x, slots, block_expert, k, bm, E)
    live = (block_expert < E).repeat_interleave(bm)
    pair = slots.long()
    rows = pair < N * k
    assert torch.equal(xs[rows], x[pair[rows] // k])
    assert not xs[live & ~rows].any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_moe_tma_selection(dtype, monkeypatch):
    """tma=True or TMA_MIN_PAIRS picks the TMA kernels (same bits); below TMA_MIN_PAIRS the default does not; dense=,
    atomic=True and views TMA cannot read fall back to the pointer kernels."""
    N, E, k, H, I = 40, 8, 2, 64, 48
    x, weights, idx, gate_up, down = case(N, E, k, H, I, dtype, DEV)
    ref = moe(x, weights, idx, gate_up, down, tma=False)
    seen = calls(monkeypatch)
    assert kmoe.TMA_MIN_PAIRS > N * k and torch.equal(moe(x, weights, idx, gate_up, down), ref) and not seen
    assert torch.equal(moe(x, weights, idx, gate_up, down, tma=True), ref)
    assert seen == ["gate_up_tma_launch", "down_tma_launch"]
    monkeypatch.setattr(kmoe, "TMA_MIN_PAIRS", N * k)
    assert torch.equal(moe(x, weights, idx, gate_up, down), ref) and len(seen) == 4
    dense = tuple(t.to(dtype).to(DEV) for t in (torch.randn(N, H), torch.randn(2 * I, H) / 8, torch.randn(H, I) / 8))
    seen.clear()
    routed, _ = moe(x, weights, idx, gate_up, down, dense=dense)
    torch.testing.assert_close(moe(x, weights, idx, gate_up, down, atomic=True, tma=True), ref)
    assert torch.equal(routed, ref) and not seen
    x, weights, idx, gate_up, down = case(N, E, k, 36, 20, dtype, DEV)  # bf16 rows of 72 and 40 bytes
    assert kmoe.tma_ok(gate_up, down) == (dtype == torch.float32)
    assert torch.equal(moe(x, weights, idx, gate_up, down, tma=True), moe(x, weights, idx, gate_up, down, tma=False))
    assert seen == ([] if dtype == torch.bfloat16 else ["gate_up_tma_launch", "down_tma_launch"])


def test_tma_launch_checks():
    x, weights, idx, gate_up, down = case(8, 4, 2, 32, 16, torch.float32, DEV)
    slots, block_expert = align(idx, 4, 16)
    tma = TmaTile(16, 16, 1, 1)
    with pytest.raises(ValueError, match="no dense tiles"):
        kmoe.gate_up_launch(x, gate_up, slots, block_expert, 2, 16, tma, dense=(x, gate_up[0]))
    act = kmoe.gate_up_launch(x, gate_up, slots, block_expert, 2, 16, tma)
    with pytest.raises(ValueError, match="no atomic mode"):
        kmoe.down_launch(act, down, slots, block_expert, weights, 8, 16, tma, atomic=True)


# --- GPU, 26B-A4B's experts -----------------------------------------------------------------------------------------
CUDA_TMA = [(64, None), (128, None),  # CUDA_TMA_TILES (moe(tma=True))
            (64, (TmaTile(64, 64, 4, 4, gathered=False), TmaTile(128, 64, 4, 4))),
            (128, (TmaTile(64, 64, 8, 4, persistent=True), TmaTile(128, 64, 8, 4, persistent=True))),
            (128, (TmaTile(128, 64, 8, 3, persistent=True, flatten=True), TmaTile(256, 64, 8, 3, persistent=True,
                                                                                  flatten=True)))]


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [2048, 4096])
@pytest.mark.parametrize("bm,tiles", CUDA_TMA)
def test_moe_tma_real_shape_cuda(tokens, bm, tiles):
    """bf16, H 2816, I 704, 128 experts, top 8: the model's math (`reference_moe`), the pointer kernels' output up to
    the GEMMs' summation order, and the same bits replayed from a CUDA graph on new input."""
    from dgemma.engine.fast import capture_graph

    x, weights, idx, gate_up, down = case(tokens, 128, 8, 2816, 704, torch.bfloat16, "cuda", seed=tokens)

    def run():
        return moe(x, weights, idx, gate_up, down, block_m=bm, tiles=tiles, tma=True)

    out = run()
    for want in (reference_moe(x, weights, idx, gate_up, down), moe(x, weights, idx, gate_up, down, tma=False)):
        err = (out.float() - want.float()).norm() / want.float().norm()
        assert err < 5e-3, float(err)
    res = torch.empty_like(out)
    graph = capture_graph(lambda: res.copy_(run()))
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.equal(res, run())

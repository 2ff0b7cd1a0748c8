"""Triton kernels against their pure-torch references.

Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors at small shapes (set below, before triton is
imported). The `gpu`-marked tests compile them on CUDA at the real shapes (V = 262144, R = 256 and 2048 rows).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from dgemma.kernels.ffn_tail import ffn_tail, reference_ffn_tail  # noqa: E402
from dgemma.kernels.layer_norms import attn_residual, reference_attn_residual  # noqa: E402
from dgemma.kernels.moe import align, align_reference, moe, reference_moe, sum_k  # noqa: E402
from dgemma.kernels.rms_norm import reference_rms_norm, rms_norm  # noqa: E402
from dgemma.kernels.sampler import fused_sample, fused_scores, philox_exponentials, reference_sample  # noqa: E402

# The interpreter evaluates both sides of tl.where (e.g. log(0) in a branch that is not taken): numpy warns.
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|divide by zero):RuntimeWarning")

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of counts [K] against probabilities [K] (upper tail of chi-square with K - 1 dof)."""
    expected = probs.double() * counts.sum()
    stat = (((counts.double() - expected) ** 2) / expected).sum()
    dof = torch.tensor((counts.numel() - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, stat / 2))


def race_keys_margin(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per row, the gap between the best and second-best race key x - log E (fp64): rows with a gap near float
    rounding may legitimately pick either candidate."""
    top2 = (x.double() - noise.double().log()).topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


TIES = [3, 7, 5001, 8998]


def logits_for(R: int, V: int, dtype: torch.dtype, masked: bool, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, V, generator=g) * 6
    if masked:
        x[:, ::5] = float("-inf")
    # Exact ties for the argmax (the first index wins) within a block, across blocks and across splits.
    x[:, [t for t in TIES if t < V]] = x.max(dim=-1).values[:, None] + 1
    return x.to(dtype).to(DEV)


def check_sample(out, ref, x_processed: torch.Tensor, noise: torch.Tensor, probs_dtype):
    sample, amax, h, probs = out
    rs, ra, rh, rp = ref
    assert torch.equal(amax, ra)
    margin = race_keys_margin(x_processed, noise)
    assert torch.equal(sample[margin > 1e-4], rs[margin > 1e-4]) and (margin > 1e-4).float().mean() > 0.9
    torch.testing.assert_close(h, rh.float(), rtol=1e-5, atol=1e-4)
    assert probs.dtype == probs_dtype
    # Same float math up to rounding order, then one rounding to probs_dtype: at most one unit in the last place.
    rtol = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}[probs_dtype]
    torch.testing.assert_close(probs.float(), rp.float(), rtol=rtol, atol=1e-37)


@pytest.mark.parametrize("dtype,softcap,probs_dtype,split,masked,V,fast_math", [
    (torch.float32, 0.0, torch.bfloat16, 1, False, 9000, None),  # V not a multiple of the 4096-column tile
    (torch.float32, 0.0, torch.float32, 3, True, 9000, None),  # split 3 leaves the last split partly empty
    (torch.bfloat16, 30.0, torch.bfloat16, 2, False, 9000, None),
    (torch.bfloat16, 30.0, torch.float16, 1, True, 9000, None),
    (torch.bfloat16, 30.0, torch.bfloat16, 2, False, 8192, None),  # whole tiles: no masks
    # The fast formulas (exp2/rcp softcap, series/lg2 noise); under the interpreter with exact lg2 and rcp.
    (torch.bfloat16, 30.0, torch.bfloat16, 2, False, 8192, True),
    (torch.float32, 0.0, torch.bfloat16, 3, True, 9000, True),
])
def test_sampler_matches_reference(dtype, softcap, probs_dtype, split, masked, V, fast_math):
    R = 6
    x = logits_for(R, V, dtype, masked)
    temp = torch.linspace(0.4, 0.8, R, device=DEV) if split != 2 else torch.tensor([0.5, 0.7], device=DEV)
    seed = torch.tensor([11, 12, 13], dtype=torch.int64, device=DEV)  # one key per 2 rows
    offset = torch.tensor([5], dtype=torch.int64, device=DEV)
    kw = dict(softcap=softcap, probs_dtype=probs_dtype, fast_math=fast_math)
    out = fused_sample(x, temp, seed, offset, split=split, **kw)
    noise = philox_exponentials(seed, offset, R, V, fast_math=fast_math)
    ref = reference_sample(x, temp, noise, softcap=softcap, probs_dtype=probs_dtype)
    processed = (torch.tanh(x.float() / softcap) * softcap if softcap else x.float()) / temp.repeat_interleave(
        R // temp.numel())[:, None]
    check_sample(out, ref, processed, noise, probs_dtype)
    assert torch.equal(out[1], torch.full((R,), TIES[0], device=DEV))
    # The explicit-noise path gives the same results as the Philox path (same split: the same summation order).
    for a, b in zip(fused_sample(x, temp, noise=noise, split=split, **kw), out):
        assert torch.equal(a, b)
    # Another split sums in another order: the same draws and winners (the race key of a column does not depend on
    # the split), sums equal up to float rounding.
    other = fused_sample(x, temp, noise=noise, split=1, **kw)
    assert torch.equal(other[0], out[0]) and torch.equal(other[1], out[1])
    torch.testing.assert_close(other[2], out[2], rtol=1e-5, atol=1e-6)


def test_fast_noise_matches_log1p():
    """The fast E = -log1p(-W) (series below W = 1/4, lg2 above) is the accurate one to ~1e-6 relative (closer under
    the interpreter's exact lg2: there only the series' fit and float rounding differ)."""
    seed = torch.tensor([7], dtype=torch.int64, device=DEV)
    off = torch.tensor([3], dtype=torch.int64, device=DEV)
    fast = philox_exponentials(seed, off, 4, 8192, fast_math=True).double()
    exact = philox_exponentials(seed, off, 4, 8192, fast_math=False).double()
    assert ((fast / exact - 1).abs().max()) < (2e-6 if DEV == "cuda" else 1e-6)
    assert (exact < -torch.log1p(torch.tensor(-0.25, dtype=torch.float64))).any()  # both branches ran


def test_fused_scores_is_a_drop_in_for_fast_scores():
    from dgemma.engine.fast import scores

    processed = logits_for(4, 3000, torch.float32, False, seed=1).view(2, 2, 3000) / 0.55
    race = torch.empty_like(processed).exponential_(generator=torch.Generator(DEV).manual_seed(0))
    ref = scores(processed, race, torch.bfloat16)
    out = fused_scores(processed, race, torch.bfloat16)
    assert [t.shape for t in out] == [t.shape for t in ref]
    ref = (*ref[:3], ref[3].to(torch.bfloat16))  # soft_from_probs casts to the model dtype
    check_sample([t.flatten(0, 1) for t in out], [t.flatten(0, 1) for t in ref], processed.flatten(0, 1),
                 race.flatten(0, 1), torch.bfloat16)


def test_noise_streams():
    seed = torch.tensor([7, 8], dtype=torch.int64, device=DEV)
    off = torch.tensor([0], dtype=torch.int64, device=DEV)
    a = philox_exponentials(seed, off, 4, 5000)
    # A seed's rows do not depend on the other seeds (per-request noise is placement independent) ...
    assert torch.equal(a[2:], philox_exponentials(seed[1:], off, 2, 5000))
    # ... and the offset (a device tensor a CUDA graph bumps in place) gives a fresh stream.
    b = philox_exponentials(seed, off + 1, 4, 5000)
    assert not torch.isclose(a, b).any(dim=-1).all()
    big = philox_exponentials(seed, torch.tensor([2**40 + 3], dtype=torch.int64, device=DEV), 4, 5000)
    assert not torch.equal(big, a)
    # One offset per seed (e.g. each row's own step counter, int32) = each seed's rows at its own offset.
    per_seed = philox_exponentials(seed, torch.tensor([0, 1], dtype=torch.int32, device=DEV), 4, 5000)
    assert torch.equal(per_seed[:2], a[:2]) and torch.equal(per_seed[2:], b[2:])
    # Exp(1): positive, finite, Kolmogorov-Smirnov distance within the 1% critical value.
    e = torch.cat([a, b, big]).flatten().double().sort().values.cpu()
    assert e.min() > 0 and e.max() < 17
    n = e.numel()
    cdf = 1 - torch.exp(-e)
    ks = torch.maximum(torch.arange(1, n + 1) / n - cdf, cdf - torch.arange(n) / n).max()
    assert ks < 1.63 / n**0.5, float(ks)


def test_race_distribution():
    """The race over Philox draws samples softmax(x / T): chi-square over 8 categories, 7,500 draws made of
    disjoint column groups of the noise (the kernel's race equals the reference race on the same draws, above)."""
    x = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 0.3, 1.5, -3.0], device=DEV)
    T, K = 0.7, 8
    seed = torch.tensor([3], dtype=torch.int64, device=DEV)
    draws = [philox_exponentials(seed, torch.tensor([o], dtype=torch.int64, device=DEV), 2, 15000) for o in (0, 9)]
    noise = torch.cat(draws).reshape(-1, K)  # [7500, 8]
    probs = torch.softmax(x / T, dim=0)
    sample = (probs / noise).argmax(dim=-1)
    counts = torch.bincount(sample, minlength=K).cpu()
    assert chi_square_pvalue(counts, probs.cpu()) > 1e-3
    # The test can fail: the same counts against the temperature-1 distribution are rejected.
    assert chi_square_pvalue(counts, torch.softmax(x, 0).cpu()) < 1e-6


def test_sampler_validates_inputs():
    x = torch.zeros(4, 100, device=DEV)
    with pytest.raises(ValueError, match="seed and offset"):
        fused_sample(x)
    with pytest.raises(ValueError, match="length dividing R"):
        fused_sample(x, None, torch.zeros(3, dtype=torch.int64, device=DEV), torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="unit stride"):
        fused_sample(x.t(), noise=torch.ones(100, 4))


def check_rounded(out: torch.Tensor, ref: torch.Tensor):
    """fp32: float rounding. bf16/fp16: ≥ 99% bit-identical and the rest one unit in the last place, because the
    only difference from the eager ops is 1/sqrt (IEEE) against pow(·, -0.5) in the norm's fp32 scale."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        return
    assert (out == ref).float().mean() >= 0.99
    ulp = {torch.bfloat16: 2**-7, torch.float16: 2**-10}[out.dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=ulp, atol=ulp * float(ref.abs().max()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("shape,weighted,residual", [((3, 13, 2816), True, True), ((37, 4, 256), False, False),
                                                     ((9, 512), True, False)])
def test_rms_norm(dtype, shape, weighted, residual):
    g = torch.Generator().manual_seed(len(shape))
    x = (torch.randn(*shape, generator=g) * 3).to(dtype).to(DEV)
    w = (torch.rand(shape[-1], generator=g) * 2).to(dtype).to(DEV) if weighted else None
    res = (torch.randn(*shape, generator=g) * 10).to(dtype).to(DEV) if residual else None
    check_rounded(rms_norm(x, w, 1e-6, res), reference_rms_norm(x, w, 1e-6, res))


def test_rms_norm_strided_rows():
    x = torch.randn(8, 3, 512, device=DEV).to(torch.bfloat16)[:, 1]  # rows 3 * 512 apart
    w = torch.rand(512, device=DEV).to(torch.bfloat16)
    check_rounded(rms_norm(x, w, 1e-6), reference_rms_norm(x, w, 1e-6))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ffn_tail(dtype):
    g = torch.Generator().manual_seed(1)
    T, D = 40, 2816
    x, dense, moe = ((torch.randn(2, T, D, generator=g) * s).to(dtype).to(DEV) for s in (20, 1, 0.05))
    w1, w2, w = ((torch.rand(D, generator=g) * 2).to(dtype).to(DEV) for _ in range(3))
    scalar = torch.tensor([0.75], dtype=dtype, device=DEV)
    check_rounded(ffn_tail(x, dense, moe, w1, w2, w, scalar, 1e-6),
                  reference_ffn_tail(x, dense, moe, w1, w2, w, scalar, 1e-6))


def rows_of(shape, dtype, g, scale=1.0, strided=False):
    """Random rows; `strided`: a view whose rows sit two rows apart (last-dim stride 1)."""
    if not strided:
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEV)
    wide = (torch.randn(*shape[:-1], 2, shape[-1], generator=g) * scale).to(dtype).to(DEV)
    return wide[..., 1, :]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("D,split,next_norm,strided", [(2816, None, True, False), (2816, 20, True, True),
                                                       (48, 7, False, False), (48, 0, True, True),
                                                       (48, 40, True, False)])
def test_ffn_tail_options(dtype, D, split, next_norm, strided):
    g = torch.Generator().manual_seed(D + (split or 0))
    x, dense, moe = (rows_of((2, 40, D), dtype, g, s, strided) for s in (20, 1, 0.05))
    w1, w2, w, wn = ((torch.rand(D, generator=g) * 2).to(dtype).to(DEV) for _ in range(4))
    opts = {"next_weight": wn if next_norm else None}
    if split is not None:
        opts |= {"scalar2": torch.tensor([-1.5], dtype=dtype, device=DEV), "split": split}
    scalar = torch.tensor([0.75], dtype=dtype, device=DEV)
    out = ffn_tail(x, dense, moe, w1, w2, w, scalar, 1e-6, **opts)
    ref = reference_ffn_tail(x, dense, moe, w1, w2, w, scalar, 1e-6, **opts)
    for o, r in zip(out, ref) if next_norm else [(out, ref)]:
        check_rounded(o, r)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("shape,strided", [((2, 20, 2816), False), ((37, 48), False), ((3, 13, 48), True)])
def test_attn_residual(dtype, shape, strided):
    g = torch.Generator().manual_seed(shape[-1])
    D = shape[-1]
    o, x = rows_of(shape, dtype, g, 1, strided), rows_of(shape, dtype, g, 20)
    w_attn, w_dense, w_moe, scale = ((torch.rand(D, generator=g) * 2).to(dtype).to(DEV) for _ in range(4))
    args = (o, x, w_attn, w_dense, w_moe, scale, D**-0.5, 1e-6)
    for out, ref in zip(attn_residual(*args), reference_attn_residual(*args), strict=True):
        check_rounded(out, ref)


def test_layer_norms_validate_inputs():
    x = torch.randn(2, 4, 48, device=DEV).bfloat16()
    w = torch.rand(48, device=DEV).bfloat16()
    one = torch.ones(1, device=DEV).bfloat16()
    with pytest.raises(ValueError, match="share one of"):
        attn_residual(x.float(), x, w, w, w, w, 0.1, 1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        attn_residual(x[:, :3], x, w, w, w, w, 0.1, 1e-6)
    with pytest.raises(ValueError, match="w_pre_ff2 must be a contiguous"):
        attn_residual(x, x, w, w, w[:47], w, 0.1, 1e-6)
    with pytest.raises(ValueError, match="router_scale is torch.float32"):
        attn_residual(x, x, w, w, w, w.float(), 0.1, 1e-6)
    with pytest.raises(ValueError, match="next_weight must be a contiguous"):
        ffn_tail(x, x, x, w, w, w, one, 1e-6, next_weight=torch.rand(96, device=DEV)[::2])
    with pytest.raises(ValueError, match="go together"):
        ffn_tail(x, x, x, w, w, w, one, 1e-6, scalar2=one)
    with pytest.raises(ValueError, match=r"split must be an int in \[0, 4\]"):
        ffn_tail(x, x, x, w, w, w, one, 1e-6, scalar2=one, split=5)
    with pytest.raises(ValueError, match="scalar2 must have one element"):
        ffn_tail(x, x, x, w, w, w, one, 1e-6, scalar2=w, split=2)


def moe_case(N, E, k, H, I, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g).to(dtype).to(device)
    gate_up = (torch.randn(E, 2 * I, H, generator=g) * H**-0.5).to(dtype).to(device)
    down = (torch.randn(E, H, I, generator=g) * I**-0.5).to(dtype).to(device)
    weights, idx = torch.softmax(torch.randn(N, E, generator=g) * 3, dim=-1).topk(k, dim=-1)
    return x, weights.to(device), idx.to(device), gate_up, down


def real_moe_case(tokens: int):
    """26B-A4B's experts (128 × 704, top 8, hidden 2816) in bf16 on CUDA, seeded by the token count."""
    return moe_case(N=tokens, E=128, k=8, H=2816, I=704, dtype=torch.bfloat16, device="cuda", seed=tokens)


def model_experts(gate_up: torch.Tensor, down: torch.Tensor):
    from types import SimpleNamespace

    from dgemma.models.diffusion_gemma import Experts

    E, two_i, H = gate_up.shape
    experts = Experts(SimpleNamespace(num_experts=E, moe_intermediate_size=two_i // 2, hidden_size=H))
    experts.gate_up_proj.data, experts.down_proj.data = gate_up, down
    return experts


@pytest.mark.parametrize("kernel", [False, True])
def test_moe_align(kernel):
    idx = torch.tensor([[2, 0], [2, 1], [0, 2], [2, 4]], device=DEV)
    slots, block_expert = align(idx, num_experts=5, block_m=2, kernel=kernel)
    P = idx.numel()
    assert block_expert.tolist() == [0, 1, 2, 2, 4, 5, 5, 5, 5]  # expert 3 has no rows, so no tile
    tiles = slots.view(-1, 2)
    for b, e in enumerate(block_expert.tolist()):
        pairs = [p for p in tiles[b].tolist() if p < P]
        assert all(idx.flatten()[p] == e for p in pairs) and (e == 5) == (not pairs)
    assert sorted(p for p in slots.tolist() if p < P) == list(range(P))


@pytest.mark.parametrize("N,k,E,block_m", [(13, 3, 6, 16), (256, 8, 128, 16), (256, 8, 128, 32), (700, 8, 128, 64),
                                            (50, 2, 7, 4)])
def test_moe_align_kernel_matches_sort(N, k, E, block_m):
    """The one-program counting sort gives the stable sort's tables exactly (skewed routing: some experts empty)."""
    g = torch.Generator().manual_seed(N)
    logits = torch.randn(N, E, generator=g) + torch.linspace(0, 4, E)  # favour the last experts
    idx = logits.topk(k, dim=-1).indices.to(DEV)
    slots, block_expert = align(idx, E, block_m, kernel=True)
    ref_slots, ref_block_expert = align_reference(idx, E, block_m)
    assert torch.equal(slots, ref_slots) and torch.equal(block_expert, ref_block_expert)


@pytest.mark.parametrize("dtype,atomic", [(torch.bfloat16, False), (torch.float32, False), (torch.bfloat16, True)])
def test_moe_matches_model_experts(dtype, atomic):
    x, weights, idx, gate_up, down = moe_case(N=13, E=6, k=3, H=80, I=48, dtype=dtype, device=DEV)
    out = moe(x, weights, idx, gate_up, down, atomic=atomic)
    with torch.no_grad():
        ref = model_experts(gate_up, down)(x, weights, idx)
    torch.testing.assert_close(reference_moe(x, weights, idx, gate_up, down), ref)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:  # GEMM sums in another order: the bf16 roundings of gate/up/y may differ by an ulp, rarely
        assert (out == ref).float().mean() >= 0.95
        torch.testing.assert_close(out.float(), ref.float(), rtol=2**-6, atol=2**-6 * float(ref.abs().max()))


def dense_case(N, H, Id, dtype, device, seed=1):
    """The dense MLP's input (normed, so O(1)) and its stacked gate/up [2·Id, H] and down [H, Id] weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g).to(dtype).to(device)
    gate_up = (torch.randn(2 * Id, H, generator=g) * H**-0.5).to(dtype).to(device)
    down = (torch.randn(H, Id, generator=g) * Id**-0.5).to(dtype).to(device)
    return x, gate_up, down


@pytest.mark.parametrize("dtype,Id,atomic", [(torch.bfloat16, 48, False), (torch.float32, 48, False),
                                             (torch.bfloat16, 16, False), (torch.float32, 16, False),
                                             (torch.bfloat16, 48, True)])
def test_moe_dense_pseudo_experts(dtype, Id, atomic):
    """The dense MLP as Id / I pseudo-experts in moe's launches: the model's gated MLP (stacked gate/up weight), and
    the routed output exactly as without it."""
    from dgemma.kernels.moe import reference_dense
    from dgemma.models.diffusion_gemma import MLP

    N, H, I, E, k = 40, 64, 16, 8, 2
    x, weights, idx, gate_up, down = moe_case(N=N, E=E, k=k, H=H, I=I, dtype=dtype, device=DEV)
    xd, gate_up_d, down_d = dense_case(N, H, Id, dtype, DEV)
    out, dense = moe(x, weights, idx, gate_up, down, atomic=atomic, dense=(xd, gate_up_d, down_d))
    ref_dense = reference_dense(xd, gate_up_d, down_d)
    mlp = MLP(H, Id).to(DEV, dtype)
    mlp.down_proj.weight.data = down_d
    with torch.no_grad():
        assert torch.equal(mlp(xd, gate_up_d), ref_dense)  # the model's dense branch with the fused weight
        ref = model_experts(gate_up, down)(x, weights, idx)
    check_rounded(dense, ref_dense)  # fp32 parts summed in order, cast once: as one GEMM's accumulation
    routed = moe(x, weights, idx, gate_up, down, atomic=atomic)
    if atomic:  # atomics add in any order (on GPU)
        torch.testing.assert_close(out, routed)
    else:
        assert torch.equal(out, routed)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:
        assert (out == ref).float().mean() >= 0.95
        torch.testing.assert_close(out.float(), ref.float(), rtol=2**-6, atol=2**-6 * float(ref.abs().max()))


def test_moe_dense_checks():
    x, weights, idx, gate_up, down = moe_case(N=5, E=4, k=2, H=32, I=16, dtype=torch.float32, device=DEV)
    xd, gate_up_d, down_d = dense_case(5, 32, 24, torch.float32, DEV)
    with pytest.raises(ValueError, match="Id % 16 == 0"):  # 24 is not a multiple of I = 16
        moe(x, weights, idx, gate_up, down, dense=(xd, gate_up_d, down_d))
    xd, gate_up_d, down_d = dense_case(5, 32, 32, torch.float32, DEV)
    with pytest.raises(ValueError, match="dense needs x_dense"):
        moe(x, weights, idx, gate_up, down, dense=(xd[:4], gate_up_d, down_d))
    with pytest.raises(ValueError, match="x's dtype"):
        moe(x, weights, idx, gate_up, down, dense=(xd, gate_up_d.bfloat16(), down_d))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_moe_unsummed_rows(dtype):
    """summed=False: the routed rows [N, k, H] in x's dtype (unweighted) and the dense MLP's fp32 parts [N, J, H].
    `sum_k` over them is moe's own k-sum launch (moe()'s bits), as is the model's weighted fp32 sum over k."""
    N, H, I, E, k = 40, 64, 16, 8, 2
    x, weights, idx, gate_up, down = moe_case(N=N, E=E, k=k, H=H, I=I, dtype=dtype, device=DEV)
    dense = dense_case(N, H, 3 * I, dtype, DEV)
    rows, parts = moe(x, weights, idx, gate_up, down, dense=dense, summed=False)
    assert rows.dtype == dtype and rows.shape == (N, k, H) and parts.dtype == torch.float32
    assert parts.shape == (N, 3, H)
    out, out_dense = moe(x, weights, idx, gate_up, down, dense=dense)
    assert torch.equal(moe(x, weights, idx, gate_up, down, summed=False), rows)  # the dense tiles touch no row
    moe_sum, dense_sum = sum_k(rows, weights, parts)
    assert torch.equal(moe_sum, out) and torch.equal(dense_sum, out_dense)
    assert torch.equal((rows.float() * weights[..., None]).sum(1).to(dtype), out)  # `Experts.forward`'s sum
    assert torch.equal(parts.sum(1).to(dtype), out_dense)
    with pytest.raises(ValueError, match="no unsummed rows"):
        moe(x, weights, idx, gate_up, down, atomic=True, summed=False)


@pytest.mark.parametrize("dtype,T,D,split,strided", [
    (torch.bfloat16, 12, 2816, 5, True), (torch.bfloat16, 40, 48, None, False), (torch.float32, 40, 48, 7, True),
    (torch.float16, 40, 48, 0, False)])
def test_ffn_tail_sums_unsummed_rows(dtype, T, D, split, strided):
    """ffn_tail(moe_weights=, dense_parts=) sums moe(summed=False)'s routed rows and dense parts itself: the bits of
    moe's k-sum launch (`sum_k`) then ffn_tail, with either unsummed input alone or both; and the eager math."""
    g = torch.Generator().manual_seed(D + T)
    R, k, J = 2 * T, 8, 3
    x = rows_of((2, T, D), dtype, g, 20, strided)
    routed, parts = rows_of((R, k, D), dtype, g, 1, strided), rows_of((R, J, D), torch.float32, g, 0.5)
    weights = torch.softmax(torch.randn(R, k, generator=g) * 2, dim=-1).to(DEV)
    moe_sum, dense_sum = (t.view_as(x) for t in sum_k(routed.contiguous(), weights, parts))
    w1, w2, w, wn = ((torch.rand(D, generator=g) * 2).to(dtype).to(DEV) for _ in range(4))
    args = (w1, w2, w, torch.tensor([0.75], dtype=dtype, device=DEV), 1e-6)
    opts = {"next_weight": wn}
    if split is not None:
        opts |= {"scalar2": torch.tensor([-1.5], dtype=dtype, device=DEV), "split": split}
    want = ffn_tail(x, dense_sum, moe_sum, *args, **opts)
    unsummed = {"moe_weights": weights, "dense_parts": True}
    for dense, moe_in, extra in ((parts, routed, unsummed), (dense_sum, routed, {"moe_weights": weights}),
                                 (parts, moe_sum, {"dense_parts": True})):
        for got, ref in zip(ffn_tail(x, dense, moe_in, *args, **extra, **opts), want, strict=True):
            assert torch.equal(got, ref)
    ref = reference_ffn_tail(x, parts, routed, *args, **unsummed, **opts)
    for got, r in zip(want, ref, strict=True):
        check_rounded(got, r)


def test_ffn_tail_unsummed_checks():
    x = torch.randn(2, 4, 48, device=DEV).bfloat16()
    w = torch.rand(48, device=DEV).bfloat16()
    one = torch.ones(1, device=DEV).bfloat16()
    routed, parts = torch.randn(8, 3, 48, device=DEV).bfloat16(), torch.randn(8, 2, 48, device=DEV)
    weights = torch.rand(8, 3, device=DEV)
    with pytest.raises(ValueError, match="share one of"):  # the dense parts are fp32
        ffn_tail(x, parts.bfloat16(), routed, w, w, w, one, 1e-6, moe_weights=weights, dense_parts=True)
    with pytest.raises(ValueError, match=r"unsummed moe must be \[8, n, 48\]"):
        ffn_tail(x, x, routed[:7], w, w, w, one, 1e-6, moe_weights=weights)
    with pytest.raises(ValueError, match=r"moe_weights must be \[8, 3\]"):
        ffn_tail(x, x, routed, w, w, w, one, 1e-6, moe_weights=weights[:, :2])
    with pytest.raises(ValueError, match="differ in shape"):  # rows without their weights
        ffn_tail(x, x, routed, w, w, w, one, 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [256, 2048])
@pytest.mark.parametrize("atomic", [False, True])
def test_moe_dense_real_shape_cuda(tokens, atomic):
    """26B-A4B: the dense MLP (Id 2112 = 3 × 704) in the routed experts' launches against grouped_mm + F.linear."""
    from dgemma.engine.fast import capture_graph
    from dgemma.kernels.moe import reference_dense

    x, weights, idx, gate_up, down = real_moe_case(tokens)
    xd, gate_up_d, down_d = dense_case(tokens, 2816, 2112, torch.bfloat16, "cuda", seed=tokens + 1)
    with torch.no_grad():
        ref = model_experts(gate_up, down)(x, weights, idx)  # the grouped_mm path
    ref_dense = reference_dense(xd, gate_up_d, down_d)
    out, dense = moe(x, weights, idx, gate_up, down, atomic=atomic, dense=(xd, gate_up_d, down_d))
    for got, want in ((out, ref), (dense, ref_dense)):
        err = (got.float() - want.float()).norm() / want.float().norm()
        assert err < 5e-3, float(err)
    if not atomic:
        assert torch.equal(out, moe(x, weights, idx, gate_up, down))  # the routed tiles are untouched
    res = torch.empty_like(out), torch.empty_like(dense)  # graph-capturable: the grid is static in the shapes
    graph = capture_graph(lambda: [r.copy_(t) for r, t in zip(res, moe(x, weights, idx, gate_up, down,
                                                                       atomic=atomic, dense=(xd, gate_up_d, down_d)))])
    graph.replay()
    for r, t in zip(res, (out, dense)):
        if atomic:
            torch.testing.assert_close(r, t)
        else:
            assert torch.equal(r, t)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [256, 2048])
def test_ffn_tail_unsummed_real_shape_cuda(tokens):
    """26B-A4B: moe(dense=, summed=False) then the tail summing the routed rows and dense parts itself gives the bits
    of moe(dense=) then ffn_tail (its products never fused into an fma: moe.mul_rn), also replayed in a CUDA graph
    on new inputs."""
    from dgemma.engine.fast import capture_graph

    H = 2816
    x, weights, idx, gate_up, down = real_moe_case(tokens)
    dense = dense_case(tokens, H, 2112, torch.bfloat16, "cuda", seed=tokens + 1)
    g = torch.Generator("cuda").manual_seed(tokens)
    resid = (torch.randn(1, tokens, H, device="cuda", generator=g) * 20).bfloat16()
    w = [torch.rand(H, device="cuda", generator=g).bfloat16() * 2 for _ in range(4)]
    scalars = torch.tensor([0.75], device="cuda").bfloat16(), torch.tensor([0.5], device="cuda").bfloat16()
    opts = {"next_weight": w[3], "scalar2": scalars[1], "split": tokens // 2}

    def summed():
        moe_out, dense_out = moe(x, weights, idx, gate_up, down, dense=dense)
        return ffn_tail(resid, dense_out.view_as(resid), moe_out.view_as(resid), *w[:3], scalars[0], 1e-6, **opts)

    def folded():
        routed, parts = moe(x, weights, idx, gate_up, down, dense=dense, summed=False)
        return ffn_tail(resid, parts, routed, *w[:3], scalars[0], 1e-6, moe_weights=weights, dense_parts=True,
                        **opts)

    for got, want in zip(folded(), summed(), strict=True):
        assert torch.equal(got, want)
    routed, parts = moe(x, weights, idx, gate_up, down, dense=dense, summed=False)
    assert torch.equal(sum_k(routed, weights, None)[0], moe(x, weights, idx, gate_up, down))
    res = tuple(torch.empty_like(t) for t in summed())
    graph = capture_graph(lambda: [r.copy_(t) for r, t in zip(res, folded())])
    x.copy_(torch.randn(x.shape, device="cuda", generator=g).bfloat16())
    resid.copy_(torch.randn(resid.shape, device="cuda", generator=g).bfloat16() * 20)
    graph.replay()
    for got, want in zip(res, summed(), strict=True):
        assert torch.equal(got, want)


# --- GPU, real shapes ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("rows", [256, 2048])
@pytest.mark.parametrize("fast_math", [None, False])  # the default (MUFU forms) and the accurate one
def test_sampler_real_shape_cuda(rows, fast_math):
    V = 262144
    g = torch.Generator("cuda").manual_seed(rows)
    raw = (torch.randn(rows, V, device="cuda", generator=g) * 4).bfloat16()  # the LM head's bf16 output
    temp = torch.full((1,), 0.6, device="cuda")
    seed = torch.arange(rows // 256, dtype=torch.int64, device="cuda") + 100  # one seed per canvas
    offset = torch.tensor([3], dtype=torch.int64, device="cuda")
    noise = philox_exponentials(seed, offset, rows, V, fast_math=fast_math)
    logits = torch.tanh(raw.float() / 30) * 30  # what lm_head returns
    ref = reference_sample(logits, temp, noise, probs_dtype=torch.bfloat16)
    check_sample(fused_sample(logits, temp, seed, offset, fast_math=fast_math), ref, logits / temp, noise,
                 torch.bfloat16)
    # Softcap inside the kernel from the raw bf16 head output (tanh differs from torch's by a few ulps).
    out = fused_sample(raw, temp, seed, offset, softcap=30.0, fast_math=fast_math)
    assert torch.equal(out[1], ref[1])
    torch.testing.assert_close(out[2], ref[2], rtol=1e-4, atol=1e-4)
    clear = race_keys_margin(logits / temp, noise) > 1e-4
    assert torch.equal(out[0][clear], ref[0][clear])


@pytest.mark.gpu
def test_sampler_distribution_cuda():
    """Direct chi-square of the compiled kernel at V = 262144 with 8 heavy tokens, 16,384 draws over 8 offsets."""
    V, R = 262144, 2048
    x = torch.full((R, V), -30.0, device="cuda")
    heavy = torch.tensor([5, 77, 1000, 4095, 4096, 70000, 200000, 262143], device="cuda")
    x[:, heavy] = torch.linspace(-1, 2, 8, device="cuda")
    temp = torch.tensor([0.8], device="cuda")
    seed = torch.tensor([42], dtype=torch.int64, device="cuda")
    samples = [fused_sample(x, temp, seed, torch.tensor([o], dtype=torch.int64, device="cuda"))[0] for o in range(8)]
    samples = torch.cat(samples)
    p = torch.softmax(x[0] / temp, dim=0)
    counts = torch.stack([(samples == h).sum() for h in heavy] + [(~torch.isin(samples, heavy)).sum()]).cpu()
    probs = torch.cat([p[heavy], (1 - p[heavy].sum()).reshape(1)]).cpu()
    assert chi_square_pvalue(counts[:8], probs[:8] / probs[:8].sum()) > 1e-3
    assert counts[8] <= 5  # the 262,136 light tokens carry p ≈ 1e-13 each


@pytest.mark.gpu
def test_sampler_graph_replay_advances_offset():
    x = torch.randn(256, 262144, device="cuda")
    seed = torch.tensor([1], dtype=torch.int64, device="cuda")
    offset = torch.zeros(1, dtype=torch.int64, device="cuda")
    out = torch.empty(2, 256, dtype=torch.int64, device="cuda")

    def step():
        out[0].copy_(fused_sample(x, None, seed, offset)[0])
        offset.add_(1)

    from dgemma.engine.fast import capture_graph

    graph = capture_graph(step)  # two warm-up calls bump the offset to 2, the capture to 3
    offset.fill_(5)
    graph.replay()
    out[1].copy_(out[0])
    graph.replay()
    assert int(offset) == 7
    assert torch.equal(out[1], fused_sample(x, None, seed, torch.tensor([5], device="cuda"))[0])
    assert torch.equal(out[0], fused_sample(x, None, seed, torch.tensor([6], device="cuda"))[0])


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [256, 2048])
def test_norms_real_shape_cuda(tokens):
    g = torch.Generator("cuda").manual_seed(tokens)
    x, dense, moe = ((torch.randn(tokens, 2816, device="cuda", generator=g) * s).bfloat16() for s in (20, 1, 0.05))
    w1, w2, w = (torch.rand(2816, device="cuda", generator=g).bfloat16() * 2 for _ in range(3))
    scalar = torch.tensor([0.75], device="cuda").bfloat16()
    check_rounded(rms_norm(dense, w1, 1e-6, x), reference_rms_norm(dense, w1, 1e-6, x))
    check_rounded(ffn_tail(x, dense, moe, w1, w2, w, scalar, 1e-6),
                  reference_ffn_tail(x, dense, moe, w1, w2, w, scalar, 1e-6))
    q = torch.randn(tokens, 16, 256, device="cuda", generator=g).bfloat16()  # q_norm rows
    check_rounded(rms_norm(q, w1[:256], 1e-6), reference_rms_norm(q, w1[:256], 1e-6))


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [256, 512])
def test_layer_norms_real_shape_cuda(tokens):
    """attn_residual and both ffn_tail options at the real shapes, then replayed in a CUDA graph (no host sync)."""
    g = torch.Generator("cuda").manual_seed(tokens)
    D, C = 2816, tokens // 2
    o, x, dense, moe = ((torch.randn(2, tokens, D, device="cuda", generator=g) * s).bfloat16()
                        for s in (1, 20, 1, 0.05))
    w = [torch.rand(D, device="cuda", generator=g).bfloat16() * 2 for _ in range(8)]
    s1, s2 = torch.tensor([0.75], device="cuda").bfloat16(), torch.tensor([0.5], device="cuda").bfloat16()
    attn_args = (o, x, *w[:4], D**-0.5, 1e-6)
    tail_args = (x, dense, moe, *w[4:7], s1, 1e-6)
    tail_opts = {"next_weight": w[7], "scalar2": s2, "split": C}

    def check():
        for out, ref in zip(attn_residual(*attn_args), reference_attn_residual(*attn_args), strict=True):
            check_rounded(out, ref)
        for out, ref in zip(ffn_tail(*tail_args, **tail_opts), reference_ffn_tail(*tail_args, **tail_opts)):
            check_rounded(out, ref)
        check_rounded(ffn_tail(*tail_args), reference_ffn_tail(*tail_args))

    check()  # compiles both kernels
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = (*attn_residual(*attn_args), *ffn_tail(*tail_args, **tail_opts))
    for t in (o, x, dense, moe):
        t.copy_(torch.randn(t.shape, device="cuda", generator=g).bfloat16() * float(t.float().std()))
    s1.fill_(-1.25)
    graph.replay()
    refs = (*reference_attn_residual(*attn_args), *reference_ffn_tail(*tail_args, **tail_opts))
    for out, ref in zip(outs, refs, strict=True):
        check_rounded(out, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [256, 2048])
@pytest.mark.parametrize("atomic", [False, True])
def test_moe_real_shape_cuda(tokens, atomic):
    x, weights, idx, gate_up, down = real_moe_case(tokens)
    with torch.no_grad():
        ref = model_experts(gate_up, down)(x, weights, idx)  # the grouped_mm path
    out = moe(x, weights, idx, gate_up, down, atomic=atomic)
    err = (out.float() - ref.float()).norm() / ref.float().norm()
    assert err < 5e-3, float(err)
    # Graph-capturable: no host sync in routing or launch (the warm-up inside capture_graph also autotunes).
    from dgemma.engine.fast import capture_graph

    res = torch.empty_like(out)
    graph = capture_graph(lambda: res.copy_(moe(x, weights, idx, gate_up, down, atomic=atomic)))
    graph.replay()
    if atomic:  # atomics add the k rows in any order
        torch.testing.assert_close(res, out)
    else:
        assert torch.equal(res, out)


# --- router ---------------------------------------------------------------------------------------------------------

def by_expert(w: torch.Tensor, idx: torch.Tensor):
    """Each row's (experts, weights) sorted by expert: top-k orders tied probabilities in its own way."""
    order = idx.argsort(dim=-1)
    return idx.gather(-1, order), w.gather(-1, order)


@pytest.mark.parametrize("N,E,k,dtype", [(5, 6, 2, torch.float32), (37, 128, 8, torch.bfloat16),
                                         (3, 130, 4, torch.float32), (64, 128, 8, torch.float32)])
def test_route_matches_router(N, E, k, dtype):
    from dgemma.kernels.router import reference_route, route

    g = torch.Generator().manual_seed(N)
    scores = (torch.randn(N, E, generator=g) * 2).to(dtype).to(DEV)
    scale = (1 + 0.1 * torch.randn(E, generator=g)).to(dtype).to(DEV)
    w, idx = route(scores, scale, k)
    ref_w, ref_idx = reference_route(scores, scale, k)
    check_route(scores, idx, w, ref_idx, ref_w)


def check_route(scores, idx, w, ref_idx, ref_w):
    """Same selected probabilities, descending; rows that pick the same experts get the same weights. A tie at the
    k-th place (bf16 scores) may select another expert of equal probability, as either top-k is valid."""
    probs = torch.softmax(scores, -1, dtype=torch.float32)
    assert (probs.gather(-1, idx).diff(dim=-1) <= 0).all()
    torch.testing.assert_close(probs.gather(-1, idx), probs.gather(-1, ref_idx).sort(-1, descending=True).values,
                               rtol=0, atol=0)
    (i, a), (ri, b) = by_expert(w, idx), by_expert(ref_w, ref_idx)
    same = (i == ri).all(dim=-1)
    assert same.float().mean() >= 0.9
    torch.testing.assert_close(a[same], b[same], rtol=1e-6, atol=1e-7)


def test_route_rejects_bad_shapes():
    from dgemma.kernels.router import route

    with pytest.raises(ValueError, match="per_expert_scale"):
        route(torch.zeros(3, 8, device=DEV), torch.ones(7, device=DEV), 2)
    with pytest.raises(ValueError, match="k = 9"):
        route(torch.zeros(3, 8, device=DEV), torch.ones(8, device=DEV), 9)


@pytest.mark.gpu
def test_route_real_shape_cuda():
    from dgemma.kernels.router import reference_route, route

    g = torch.Generator("cuda").manual_seed(0)
    scores = torch.randn(2048, 128, device="cuda", generator=g).bfloat16()
    scale = (1 + 0.1 * torch.randn(128, device="cuda", generator=g)).bfloat16()
    w, idx = route(scores, scale, 8)
    ref_w, ref_idx = reference_route(scores, scale, 8)
    check_route(scores, idx, w, ref_idx, ref_w)


# --- q/k/v prep -----------------------------------------------------------------------------------------------------

def qkv_case(B, T, H, Hkv, D, has_v, dtype, cos_batch, device=DEV, seed=0):
    """A stacked projection output with padded rows (row stride > width), cos/sin, and the two norm weights."""
    g = torch.Generator(device).manual_seed(seed)
    W = (H + (2 if has_v else 1) * Hkv) * D
    qkv = (torch.randn(B, T, W + 8, device=device, generator=g) * 3).to(dtype)[..., :W]
    angle = torch.rand(cos_batch, T, D // 2, device=device, generator=g) * 6.3
    cos, sin = (f(torch.cat((angle, angle), -1)).to(dtype) for f in (torch.cos, torch.sin))
    qw, kw = ((torch.rand(D, device=device, generator=g) * 2).to(dtype) for _ in range(2))
    return qkv, cos, sin, qw, kw


def check_qkv(out, ref):
    for o, r in zip(out, ref):
        check_rounded(o, r)
    assert out[0].transpose(1, 2).is_contiguous()  # q: the [B, H, T, D] view of [B, T, H, D]


def slots(B, Hkv, T, D, dtype, device=DEV):
    """k/v destinations as the engine passes them: slots cap..cap+T of a [B, Hkv, S, D] cache buffer."""
    buf = torch.randn(B, Hkv, T + 11, D, device=device).to(dtype)
    return buf, buf.clone(), buf[:, :, 4:4 + T]


@pytest.mark.parametrize("D,has_v,dtype,cos_batch,strided_out", [
    (32, True, torch.bfloat16, 1, False), (32, False, torch.float32, 2, True), (256, True, torch.float32, 1, True),
    (256, False, torch.bfloat16, 2, False), (24, True, torch.bfloat16, 2, True), (64, True, torch.float16, 1, True),
    (512, False, torch.bfloat16, 1, True)])
def test_qkv_prep(D, has_v, dtype, cos_batch, strided_out):
    from dgemma.kernels.qkv_prep import qkv_prep, reference_qkv_prep

    B, T, H, Hkv = 2, 5 if D == 512 else 19, 4, 2
    args = (*qkv_case(B, T, H, Hkv, D, has_v, dtype, cos_batch, seed=D), 1e-6, H, Hkv)
    if not strided_out:
        check_qkv(qkv_prep(*args), reference_qkv_prep(*args))
        return
    (kbuf, kbefore, k_out), (vbuf, vbefore, v_out) = slots(B, Hkv, T, D, dtype), slots(B, Hkv, T, D, dtype)
    q, k, v = qkv_prep(*args, k_out=k_out, v_out=v_out)
    assert k is k_out and v is v_out
    check_qkv((q, k, v), reference_qkv_prep(*args))
    for buf, before in ((kbuf, kbefore), (vbuf, vbefore)):  # nothing outside the slots is written
        assert torch.equal(buf[:, :, :4], before[:, :, :4]) and torch.equal(buf[:, :, 4 + T:], before[:, :, 4 + T:])


@pytest.mark.parametrize("layer", [0, 1])  # sliding (v_proj), full (K=V)
def test_qkv_prep_reference_is_attention_project(layer):
    """reference_qkv_prep is `Attention._project` after its GEMM, bit for bit; the kernel matches it (bf16)."""
    from dgemma.config import ModelArgs
    from dgemma.kernels.qkv_prep import qkv_prep, reference_qkv_prep
    from dgemma.models.diffusion_gemma import Attention

    args = ModelArgs(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     num_global_key_value_heads=1, global_head_dim=32, layer_types=["sliding_attention",
                                                                                     "full_attention"])
    torch.manual_seed(layer)
    attn = Attention(args, layer)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape) * (0.2 if p.dim() > 1 else 0.3) + (1.0 if p.dim() == 1 else 0.0))
        attn.to(torch.bfloat16)
        x = torch.randn(2, 7, 48).bfloat16()
        _, cos, sin, _, _ = qkv_case(2, 7, 1, 1, attn.head_dim, False, torch.bfloat16, 1, device="cpu")
        ref = attn._project(x, cos, sin, False, None)
        qkv = torch.cat([attn.linear(name, x, False) for name in attn.qkv_names], -1)
        qkv_args = (qkv, cos, sin, attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps, attn.n_heads, attn.n_kv)
        for a, b in zip(reference_qkv_prep(*qkv_args), ref):
            assert torch.equal(a, b)
        check_qkv(qkv_prep(*(t.to(DEV) if torch.is_tensor(t) else t for t in qkv_args)), ref)


def test_qkv_prep_rejects_bad_inputs():
    from dgemma.kernels.qkv_prep import qkv_prep

    qkv, cos, sin, qw, kw = qkv_case(2, 3, 4, 2, 8, True, torch.float32, 1)
    bad = [
        (dict(qkv=qkv.bfloat16()), "share one of"),
        (dict(qkv=qkv[..., :-8]), "neither"),
        (dict(qw=qw[:7], kw=kw[:7]), "D even"),
        (dict(kw=kw[:4]), "k_weight"),
        (dict(cos=cos[:, :2]), "cos must be"),
        (dict(sin=sin.expand(3, -1, -1)), "sin must be"),
        (dict(k_out=torch.empty(2, 2, 4, 8, device=DEV)), "k_out must be"),
        (dict(v_out=torch.empty(2, 2, 8, 3, device=DEV).transpose(2, 3)), "v_out must be"),  # last stride 3
    ]
    for change, match in bad:
        a = dict(qkv=qkv, cos=cos, sin=sin, qw=qw, kw=kw, k_out=None, v_out=None) | change
        with pytest.raises(ValueError, match=match):
            qkv_prep(a["qkv"], a["cos"], a["sin"], a["qw"], a["kw"], 1e-6, 4, 2, k_out=a["k_out"], v_out=a["v_out"])


@pytest.mark.gpu
@pytest.mark.parametrize("H,Hkv,D,has_v", [(16, 8, 256, True), (16, 2, 512, False)])  # sliding, full layers
def test_qkv_prep_real_shape_cuda(H, Hkv, D, has_v):
    from dgemma.kernels.qkv_prep import qkv_prep, reference_qkv_prep

    B, T = 1, 256
    args = (*qkv_case(B, T, H, Hkv, D, has_v, torch.bfloat16, 1, device="cuda", seed=D), 1e-6, H, Hkv)
    ref = reference_qkv_prep(*args)
    check_qkv(qkv_prep(*args), ref)
    (kbuf, kbefore, k_out), (vbuf, vbefore, v_out) = (slots(B, Hkv, T, D, torch.bfloat16, "cuda") for _ in "kv")
    check_qkv(qkv_prep(*args, k_out=k_out, v_out=v_out), ref)
    for buf, before in ((kbuf, kbefore), (vbuf, vbefore)):
        assert torch.equal(buf[:, :, :4], before[:, :, :4]) and torch.equal(buf[:, :, 4 + T:], before[:, :, 4 + T:])

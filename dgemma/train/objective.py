"""The DiffusionGemma training objective (REFERENCE.md §9) as small functions.

Per example: t ~ U(0.001, 1); every *supervised* token of one randomly chosen canvas-sized block is replaced by a
uniform random vocabulary token with probability t (no mask token). The loss is

    flat mean cross-entropy over the block's supervised tokens (no 1/t weighting)
  + ar_weight × the encoder's autoregressive cross-entropy on the clean sequence (weight 1.0 upstream).

Self-conditioning: a first decoder pass without gradient; its logits feed the second pass for a random half of the
examples (p = 0.5), the other half gets a zero signal (transformers' `self_conditioning_mask`).

Design choices:
- All random draws come from one `torch.Generator` on the CPU (`draw`), so a run is reproducible and resumable
  bit for bit and the loss is a pure function of (model, batch, draws) (`loss_from_draws`), which the tests
  check against transformers 5.23.0 and against a hand computation.
- The forward reuses the inference passes. The clean sequence is encoded canvas by canvas into one KV cache;
  before encoding chunk j, the rows whose block is j are denoised against the cache as it is then (exactly the
  prefix before the block, sliding windows included), on a copy of those rows' cache. The encoder's hidden states
  of all chunks give the AR logits. Chunked causal encoding equals one causal pass (the parity tests check the
  same thing at inference), and gradients flow through the cache writes (autograd records the index writes).
- Blocks are aligned to multiples of the canvas length (data.collate left-pads each row so that its first
  supervised token starts a canvas) and chosen among the blocks holding a supervised token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dgemma.engine.cache import KVCache

T_MIN = 0.001  # REFERENCE.md §9: t ~ U(0.001, 1)


@dataclass
class Draws:
    """Every random choice of one training step (the loss is deterministic given these)."""

    block: torch.Tensor  # [B] block index of each row
    t: torch.Tensor  # [B] corruption level
    noise: torch.Tensor  # [B, C] uniform random replacement ids
    flip: torch.Tensor  # [B, C] uniform(0, 1) draws; a supervised token is corrupted where flip < t
    sc: torch.Tensor  # [B] bool: feed the first pass's logits to the second pass


@dataclass
class LossOutput:
    loss: torch.Tensor  # diffusion + ar_weight * ar (scalar, differentiable)
    diffusion: torch.Tensor  # flat mean CE over the supervised block tokens (detached)
    ar: torch.Tensor  # encoder next-token CE (detached)
    block_tokens: int  # supervised tokens in the diffusion loss
    ar_tokens: int  # supervised targets in the AR loss
    accuracy: torch.Tensor  # argmax accuracy of the denoiser on the supervised block tokens (detached)


def sample_t(batch: int, generator: torch.Generator) -> torch.Tensor:
    """t ~ U(0.001, 1) per example."""
    return T_MIN + (1.0 - T_MIN) * torch.rand(batch, generator=generator)


def corrupt(ids: torch.Tensor, supervised: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
            flip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each supervised token by `noise` where flip < t (per row). Returns (noisy ids, corrupted mask).
    A replacement may draw the original id by chance (1/V), as upstream: uniform over the whole vocabulary."""
    corrupted = supervised & (flip < t[:, None])
    return torch.where(corrupted, noise, ids), corrupted


def choose_blocks(supervised: torch.Tensor, canvas: int, generator: torch.Generator) -> torch.Tensor:
    """[B] index of one canvas-aligned block per row, uniform over the blocks holding a supervised token."""
    B, L = supervised.shape
    has = supervised.view(B, L // canvas, canvas).any(-1)  # [B, nblocks]
    if not bool(has.any(-1).all()):
        raise ValueError("an example has no supervised token; drop it before batching")
    weights = has.float()
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def draw(supervised: torch.Tensor, canvas: int, vocab_size: int, generator: torch.Generator,
         sc_prob: float = 0.5) -> Draws:
    B = supervised.shape[0]
    block = choose_blocks(supervised, canvas, generator)
    t = sample_t(B, generator)
    noise = torch.randint(0, vocab_size, (B, canvas), generator=generator)
    flip = torch.rand(B, canvas, generator=generator)
    sc = torch.rand(B, generator=generator) < sc_prob
    return Draws(block, t, noise, flip, sc)


def block_view(x: torch.Tensor, block: torch.Tensor, canvas: int) -> torch.Tensor:
    """Rows' chosen blocks: x [B, L] → [B, C]."""
    idx = block[:, None] * canvas + torch.arange(canvas, device=x.device)[None]
    return torch.gather(x, 1, idx)


def masked_ce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Flat mean cross-entropy over the positions where mask is True (0 when there are none)."""
    ce = F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), reduction="none")
    m = mask.flatten().to(ce.dtype)
    return (ce * m).sum() / m.sum().clamp(min=1)


def ar_ce(logits: torch.Tensor, ids: torch.Tensor, supervised: torch.Tensor) -> torch.Tensor:
    """Encoder next-token CE: position i predicts ids[i+1], counted where ids[i+1] is supervised."""
    return masked_ce(logits[:, :-1], ids[:, 1:], supervised[:, 1:])


class TrainCache(KVCache):
    """KVCache that casts what it stores to its own dtype: under autocast K and V arrive in mixed precisions
    (bf16 from the projections, fp32 after RoPE), and an index write needs one dtype."""

    def write(self, layer, k, v, pos, valid=None) -> None:
        super().write(layer, k.to(self.k[layer].dtype), v.to(self.v[layer].dtype), pos, valid)


def _rows(cache: KVCache, rows: torch.Tensor) -> KVCache:
    """A copy of some rows of the cache (the decoder reads it; later encoder writes do not touch the copy)."""
    sub = type(cache).__new__(type(cache))
    sub.__dict__.update(cache.__dict__)
    sub.batch = int(rows.numel())
    sub.k = [k[rows] for k in cache.k]
    sub.v = [v[rows] for v in cache.v]
    sub.pos = [p[rows] for p in cache.pos]
    return sub


def forward(model, ids: torch.Tensor, noisy: torch.Tensor, block: torch.Tensor, sc: torch.Tensor,
            ar: bool = True, diffusion: bool = True, grad_checkpoint: bool = False, valid: torch.Tensor | None = None):
    """(decoder logits [B, C, V] of the second pass, encoder logits [B, L, V] or None).

    ids [B, L] clean (L a multiple of the canvas length), noisy [B, C] corrupted blocks, block [B], sc [B] bool,
    valid [B, L] False on left padding (never attended, as at inference)."""
    if valid is None:
        valid = torch.ones_like(ids, dtype=torch.bool)
    args = model.args
    B, L = ids.shape
    C = args.canvas_length
    dtype = model.embed_tokens.weight.dtype
    cache = TrainCache(args, B, L, ids.device, dtype)
    dec = None
    hidden = []
    encode_until = L // C if ar else int(block.max())  # without the AR loss, chunks after the last block are idle
    for j in range(L // C):
        rows = (block == j).nonzero().squeeze(1) if diffusion else block[:0]
        if rows.numel():
            sub = _rows(cache, rows)
            pos = torch.arange(j * C, (j + 1) * C, device=ids.device)[None]
            with torch.no_grad():
                first = model.denoise(noisy[rows], pos, sub)
            if grad_checkpoint:
                out = checkpoint(model.denoise, noisy[rows], pos, sub, first, sc[rows], use_reentrant=False)
            else:
                out = model.denoise(noisy[rows], pos, sub, first, sc[rows])
            if dec is None:
                dec = out.new_zeros(B, C, out.shape[-1])
            dec = dec.index_copy(0, rows, out)
        if j < encode_until:
            pos = torch.arange(j * C, (j + 1) * C, device=ids.device).expand(B, -1)
            hidden.append(model.encode(ids[:, j * C:(j + 1) * C], pos, cache, valid[:, j * C:(j + 1) * C]))
            cache.advance(C)
    enc = model.lm_head(torch.cat(hidden, dim=1)) if ar else None
    return dec, enc


def loss_from_draws(model, ids: torch.Tensor, supervised: torch.Tensor, d: Draws, ar_weight: float = 1.0,
                    grad_checkpoint: bool = False, diffusion_weight: float = 1.0,
                    diffusion_mask: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> LossOutput:
    """The §9 loss for given random draws. `supervised` [B, L] marks AR targets, `diffusion_mask` the diffusion
    targets (default: the same). diffusion_weight=0 gives the autoregressive-only baseline."""
    C = model.args.canvas_length
    dev = ids.device
    dmask = supervised if diffusion_mask is None else diffusion_mask
    block, sc = d.block.to(dev), d.sc.to(dev)
    targets, sup = block_view(ids, block, C), block_view(dmask, block, C)
    noisy, _ = corrupt(targets, sup, d.t.to(dev), d.noise.to(dev), d.flip.to(dev))
    dec, enc = forward(model, ids, noisy, block, sc, ar=ar_weight > 0, diffusion=diffusion_weight > 0,
                       grad_checkpoint=grad_checkpoint, valid=valid)
    zero = torch.zeros((), device=dev)
    diff = masked_ce(dec, targets, sup) if dec is not None else zero
    arl = ar_ce(enc, ids, supervised) if enc is not None else zero
    acc = ((dec.argmax(-1) == targets) & sup).sum() / sup.sum().clamp(min=1) if dec is not None else zero
    return LossOutput(diffusion_weight * diff + ar_weight * arl, diff.detach(), arl.detach(), int(sup.sum()),
                      int(supervised[:, 1:].sum()), acc.detach())

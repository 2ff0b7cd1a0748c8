"""The CUDA fast path's decoder layer: one Gemma 4 layer in about a dozen launches instead of ~30.

`Layer.forward` written op by op costs ~30 kernels per layer at batch 1 (norms, RoPE, copies, glue around the
router and the experts, the dense MLP's three launches); each is a few microseconds of latency while the step's real
work is streaming 1.7 GB of weights. Here each layer is:

    qkv GEMM (stacked weight) → qkv_prep (q/k norms, RoPE, v norm; the canvas K/V written into the scratch slots)
    → canvas attention → o_proj GEMM → attn_residual (residual add + the dense, MoE and router input norms)
    → router GEMM → route (softmax, top-k) → moe (routing tables, gate_up, down; the dense MLP rides along as
    pseudo-experts) → ffn_tail (the weighted k-sum and the dense parts' sum, the three post norms, residual, layer
    scalar and the NEXT layer's input norm; after the last layer the model's final norm)

so the residual x and the normed input h of the next layer leave every layer together. Same math as
`Layer.forward`: every rounding the eager layer makes to the model dtype is made here (each kernel's docstring
says how it matches). Used by the static passes only (`denoise_static`, `encode_static`, `denoise_folded_static`),
on CUDA with the Triton kernels and the stacked projections (models/fusion.py); anything else (attention biases,
LoRA, gradients, an unsupported head dim) takes `Layer.forward`. `DGEMMA_FUSED_LAYERS=0` turns it off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dgemma.engine.cache import KVCache
from dgemma.kernels import ATTENTION_HEAD_DIMS
from dgemma.models.fusion import fused_weight

FUSED: dict = {}  # kernel name → launcher, set by `enable`; empty = off


def enable(enabled: bool = True, *, cpu: bool = False) -> None:
    """Turn the fused layer on (needs triton; `diffusion_gemma.use_triton_kernels` calls it, from
    `engine/fast.configure_cuda_kernels`). `cpu`: also for CPU tensors under TRITON_INTERPRET=1 (tests)."""
    FUSED.clear()
    if not enabled:
        return
    from dgemma.kernels import attention, ffn_tail, layer_norms, moe, qkv_prep, rms_norm, router

    FUSED.update(attention=attention.canvas_attention, cache_lengths=attention.cache_lengths,
                 qkv_prep=qkv_prep.qkv_prep, attn_residual=layer_norms.attn_residual, route=router.route,
                 moe=moe.moe, ffn_tail=ffn_tail.ffn_tail, rms_norm=rms_norm.rms_norm, cpu=cpu)


def active(model, x: torch.Tensor) -> bool:
    """Whether the static passes of `model` on `x` take the fused layer."""
    if not FUSED or not (x.is_cuda or FUSED["cpu"]) or torch.is_grad_enabled():
        return False
    return all(eligible(layer) for layer in model.layers)


def eligible(layer) -> bool:
    attn = layer.self_attn
    return (attn.q_proj.bias is None and attn.head_dim in ATTENTION_HEAD_DIMS
            and fused_weight(attn, "qkv") is not None and fused_weight(layer.mlp, "gate_up") is not None
            and type(attn.o_proj) is torch.nn.Linear)


# --- whole passes ---------------------------------------------------------------------------------------------
def run_static(model, x: torch.Tensor, pos: torch.Tensor, cache: KVCache, encoder: bool,
               rows: torch.Tensor | None = None) -> torch.Tensor:
    """`DiffusionGemma.run_layers(..., static=True)`: the layers over x [B, T, hidden] at positions pos, then the
    final norm. The encoder writes the new K/V into the cache (only `rows`, if given)."""
    cache.kv_len = FUSED["cache_lengths"](cache.pos[0])  # [B], set before any layer writes (read at every replay)
    rope = model.rope(pos, x.dtype)
    h = FUSED["rms_norm"](x, model.layers[0].input_layernorm.weight, model.args.rms_norm_eps)
    for i in range(len(model.layers)):
        x, h = layer_static(model, i, x, h, *rope[model.args.layer_types[i]], cache, encoder, pos, rows)
    return h


def run_folded(model, x: torch.Tensor, pos: torch.Tensor, cache: KVCache, enc_pos: torch.Tensor) -> torch.Tensor:
    """`denoise_folded_static`'s layers over x [B, 2C, hidden] (a committed canvas at enc_pos [B, C], then the next
    canvas; pos [B, 2C] both halves' positions) and the final norm → [B, 2C, hidden]."""
    # The committed slots fill in layer by layer, each before its layer's decoder half reads the cache: count them
    # in from the start (recomputed at every replay).
    cache.kv_len = torch.maximum(FUSED["cache_lengths"](cache.pos[0]), FUSED["cache_lengths"](enc_pos))
    rope = model.rope(pos, x.dtype)
    h = FUSED["rms_norm"](x, model.layers[0].input_layernorm.weight, model.args.rms_norm_eps)
    for i in range(len(model.layers)):
        x, h = layer_folded(model, i, x, h, *rope[model.args.layer_types[i]], cache, enc_pos)
    return h


# --- one layer ------------------------------------------------------------------------------------------------
def layer_static(model, i: int, x, h, cos, sin, cache: KVCache, encoder: bool, pos=None, rows=None):
    """Layer i over the residual x and its input norm h ([B, T, hidden] each) → (x, the next norm of x). The caller
    sets `cache.kv_len` once before layer 0 (`run_static`)."""
    layer = model.layers[i]
    attn = layer.self_attn
    qkv = F.linear(h, fused_weight(attn, "qkv"))  # [B, T, (H + Hkv [+ Hkv]) * D]
    if encoder:
        ctx = attn.encoder_static_context(*prep(attn, qkv, cos, sin), cache, pos, rows)
    else:
        ctx = decoder_context(attn, qkv, cos, sin, cache)
    return feed_forward(layer, x, ctx, next_norm(model, i), layer.encoder_layer_scalar if encoder
                        else layer.layer_scalar)


def layer_folded(model, i: int, x, h, cos, sin, cache: KVCache, enc_pos: torch.Tensor):
    """Layer i over x = [committed canvas, next canvas] ([B, 2C, hidden]): the encoder half attends and writes its
    K/V first, so the decoder half sees the cache as after a separate commit pass; the rest runs once over 2C."""
    layer, C = model.layers[i], enc_pos.shape[1]
    attn = layer.self_attn
    qkv = F.linear(h, fused_weight(attn, "qkv"))  # [B, 2C, (H + Hkv [+ Hkv]) * D]
    enc = attn.encoder_static_context(*prep(attn, qkv[:, :C], cos[:, :C], sin[:, :C]), cache, enc_pos)
    dec = decoder_context(attn, qkv[:, C:], cos[:, C:], sin[:, C:], cache)
    return feed_forward(layer, x, torch.cat([enc, dec], dim=1), next_norm(model, i), layer.encoder_layer_scalar,
                        layer.layer_scalar, C)


def next_norm(model, i: int) -> torch.Tensor:
    """The weight of the norm that follows layer i: the next layer's input norm, or the model's final norm."""
    return model.layers[i + 1].input_layernorm.weight if i + 1 < len(model.layers) else model.norm.weight


# --- a layer's parts ------------------------------------------------------------------------------------------
def prep(attn, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_out=None, v_out=None):
    """q [B, H, T, D], k, v [B, Hkv, T, D] from the stacked projection's output: norms and RoPE in one launch."""
    return FUSED["qkv_prep"](qkv, cos, sin, attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps, attn.n_heads,
                             attn.n_kv, k_out=k_out, v_out=v_out)  # cos/sin may be the folded pass's half views


def decoder_context(attn, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """The canvas's attention over the cache and itself → [B, T, H*D]: its K/V go straight into the scratch slots
    (`Attention.decoder_static_context` without the copies)."""
    layer, cap, T = attn.layer_idx, cache.capacity[attn.layer_idx], qkv.shape[1]
    ck, cv = cache.k[layer], cache.v[layer]
    q, _, _ = prep(attn, qkv, cos, sin, k_out=ck[:, :, cap:cap + T], v_out=cv[:, :, cap:cap + T])
    return FUSED["attention"](q, ck, cv, cache.pos[layer], cache.kv_len).transpose(1, 2).flatten(2)


def feed_forward(layer, x: torch.Tensor, ctx: torch.Tensor, next_weight: torch.Tensor, scalar: torch.Tensor,
                 scalar2: torch.Tensor | None = None, split: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """o_proj, the post-attention residual and the whole feed-forward block → (x, the next norm of x), both like x.
    Rows t >= split along dim -2 take `scalar2` (the folded pass's decoder half)."""
    eps, H = layer.post_attention_layernorm.eps, x.shape[-1]
    router, mlp, experts = layer.router, layer.mlp, layer.experts
    o = F.linear(ctx, layer.self_attn.o_proj.weight)
    x, h_dense, h_moe, h_router = FUSED["attn_residual"](
        o, x, layer.post_attention_layernorm.weight, layer.pre_feedforward_layernorm.weight,
        layer.pre_feedforward_layernorm_2.weight, router.scale, router.root, eps)
    weights, idx = FUSED["route"](F.linear(h_router.view(-1, H), router.proj.weight), router.per_expert_scale,
                                  router.top_k)
    gate_up = fused_weight(mlp, "gate_up")
    experts_in = (h_moe.view(-1, H), weights, idx, experts.gate_up_proj, experts.down_proj)
    dense_parts = dense_in_moe(layer, h_moe.numel() // H)
    if dense_parts:  # the dense MLP as pseudo-experts: its J fp32 parts [N, J, H], unsummed
        routed, dense = FUSED["moe"](*experts_in, dense=(h_dense.view(-1, H), gate_up, mlp.down_proj.weight),
                                     summed=False)
    else:  # its own GEMMs
        from dgemma.models.diffusion_gemma import gated_mlp  # (that module imports this one)

        routed, dense = FUSED["moe"](*experts_in, summed=False), gated_mlp(mlp, h_dense, gate_up)
    # routed [N, k, H], unweighted: the tail sums Σ_j w_j·y_j (and the dense parts) itself, no k-sum launch
    return FUSED["ffn_tail"](x, dense, routed, layer.post_feedforward_layernorm_1.weight,
                             layer.post_feedforward_layernorm_2.weight, layer.post_feedforward_layernorm.weight,
                             scalar, eps, moe_weights=weights, dense_parts=dense_parts, next_weight=next_weight,
                             scalar2=scalar2, split=split)


DENSE_IN_MOE_MAX_TOKENS = 512  # beyond, the dense GEMMs are compute-bound and cuBLAS wins (H200, measured below)


def dense_in_moe(layer, tokens: int) -> bool:
    """Whether the dense MLP rides in the MoE's launches: its width a whole number of experts' (2112 = 3 × 704), and
    at most DENSE_IN_MOE_MAX_TOKENS tokens. On an H200 (benchmarks/results/session4/micro_23fd678/moe_dense.log) it
    saves 2.3 µs per layer at 256 tokens and 3.2 at 512, but costs 99 µs more than cuBLAS's dense GEMMs at 2,048."""
    divides = layer.mlp.down_proj.weight.shape[1] % layer.experts.down_proj.shape[2] == 0
    return divides and tokens <= DENSE_IN_MOE_MAX_TOKENS

"""DiffusionGemma text model: one weight set, two passes.

* `encode(tokens)` is the causal encoder: it runs the prompt (or a committed canvas) and writes each layer's K/V into
  the KV cache (sliding window on sliding layers). It returns the final hidden states (used by the AR path).
* `denoise(canvas)` is the diffusion decoder: the 256-token canvas attends bidirectionally to itself and to the
  cached prefix, never writes the cache, and returns softcapped fp32 logits.
* `denoise_folded_static(committed, canvas)` is a commit pass (`encode_static`) and the next canvas's first decoder
  pass run as one forward over both canvases: token-wise work once over 2C tokens, attention split by role.

Encoder and decoder share every weight (the checkpoint only stores the decoder copy); the one exception is the
per-layer `layer_scalar`, which the checkpoint stores twice (`model.decoder...` and `model.encoder.language_model...`),
so each layer keeps both. The math mirrors transformers 5.23.0 `modeling_diffusion_gemma.py` op for op so fp32
results agree to float rounding. The vision tower is not implemented (text only).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from dgemma.config import ModelArgs
from dgemma.engine.cache import KVCache
from dgemma.kernels import ATTENTION_HEAD_DIMS  # what kernels/attention.py takes (other head dims: sdpa)
from dgemma.models import fused_layer
from dgemma.models.fusion import fused_weight
from dgemma.models.rope import apply_rope, rope_inv_freq  # noqa: F401 (rope_inv_freq: part of this module's API)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    xf = x.float()
    # pow(-0.5) rather than rsqrt: the reference does the same, keeping fp32 results bit-close.
    out = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        out = out * weight.float()
    return out.type_as(x)


# Pieces the CUDA fast path may swap for faster versions: `use_compiled_kernels()` (torch.compile'd blocks) and
# `use_triton_kernels()` (dgemma/kernels). The defaults are the reference implementations.
KERNELS = {"rms_norm": rms_norm, "feed_forward": None, "project": None, "canvas_attention": None,
           "cache_lengths": None, "moe": None, "route": None}
MOE_TRITON_MIN_TOKENS = 1  # the Triton MoE beats grouped_mm at every size measured, 256 to 4096 tokens (H200)


def canvas_kernel_on(x: torch.Tensor) -> bool:
    """Whether the static passes attend through KERNELS["canvas_attention"], which reads `cache.kv_len` (set by
    `run_layers`, `denoise_folded_static`): CUDA tensors only. Tests patch this to run the kernel on the CPU."""
    return KERNELS["canvas_attention"] is not None and x.is_cuda


def use_compiled_kernels(enabled: bool = True) -> None:
    """Fuse the elementwise work with torch.compile: every RMSNorm, the whole feed-forward block (norms, dense MLP,
    router, the glue around the experts) and the attention projections (q/k/v, their norms, RoPE). Same math; float
    results may differ in the last bits. The fast path turns it on on CUDA unless DGEMMA_COMPILE=0."""
    if enabled:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    KERNELS["rms_norm"] = torch.compile(rms_norm, dynamic=False) if enabled else rms_norm
    KERNELS["feed_forward"] = torch.compile(Layer._feed_forward, dynamic=False) if enabled else None
    KERNELS["project"] = torch.compile(Attention._project, dynamic=False) if enabled else None


def use_triton_kernels(enabled: bool = True) -> None:
    """The Triton kernels of dgemma/kernels on CUDA: canvas-over-cache attention in the static passes, the
    router's softmax/top-k and the fused MoE for passes of >= MOE_TRITON_MIN_TOKENS tokens, and the static passes'
    fused layer (models/fused_layer.py) unless DGEMMA_FUSED_LAYERS=0. Needs triton."""
    from dgemma import kernels

    if not enabled or not kernels.available("cuda"):
        KERNELS["canvas_attention"] = KERNELS["cache_lengths"] = KERNELS["moe"] = KERNELS["route"] = None
        fused_layer.enable(False)
        return
    fused_layer.enable(os.environ.get("DGEMMA_FUSED_LAYERS", "1") != "0")  # the static passes' fused layer
    from dgemma.kernels import attention, moe, router

    KERNELS["canvas_attention"] = torch.compiler.disable(attention.canvas_attention)
    KERNELS["cache_lengths"] = attention.cache_lengths
    KERNELS["moe"] = torch.compiler.disable(moe.moe)
    KERNELS["route"] = torch.compiler.disable(router.route)


class RMSNorm(nn.Module):
    """Gemma 4 RMSNorm: computed in fp32, weight used as is (no `1 + w`, unlike Gemma 1-3)."""

    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return KERNELS["rms_norm"](x, self.weight, self.eps)


class Attention(nn.Module):
    """GQA attention. Scale 1.0 because q and k are RMS-normed. Full layers have no v_proj: V is k_proj's output,
    taken before k_norm and RoPE and normalised by a weightless v_norm (K=V, "attention_k_eq_v")."""

    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        shape = args.layer_shape(layer_idx)
        self.layer_idx = layer_idx
        self.sliding = shape.sliding
        self.window = args.sliding_window
        self.head_dim = shape.head_dim
        self.n_heads = args.num_attention_heads
        self.n_kv = shape.num_kv_heads
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv * self.head_dim, bias=bias) if self.sliding else None
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        self.v_norm = RMSNorm(self.head_dim, args.rms_norm_eps, with_scale=False)
        self.qkv_names = ("q", "k", "v") if self.sliding else ("q", "k")
        self.qkv_sizes = [self.n_heads * self.head_dim] + [self.n_kv * self.head_dim] * (len(self.qkv_names) - 1)
        if bias:
            # Upstream ties encoder and decoder *weights* only: with attention_bias the encoder keeps its own biases.
            for name in (*self.qkv_names, "o"):
                proj = getattr(self, f"{name}_proj")
                self.register_parameter(f"encoder_{name}_bias", nn.Parameter(torch.zeros(proj.out_features)))
        self.fused = {}  # fusion.fuse_projections: group name → FusedRows

    def fused_qkv(self, encoder: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The stacked q/k(/v) weight and bias of this pass while the stacking holds, else None (separate GEMMs)."""
        weight, has_bias = fused_weight(self, "qkv"), self.q_proj.bias is not None
        bias = fused_weight(self, "encoder_qkv_bias" if encoder else "qkv_bias") if has_bias else None
        return None if weight is None or (has_bias and bias is None) else (weight, bias)

    def linear(self, name: str, x: torch.Tensor, encoder: bool) -> torch.Tensor:
        proj = getattr(self, f"{name}_proj")
        bias = getattr(self, f"encoder_{name}_bias") if encoder and proj.bias is not None else proj.bias
        return F.linear(x, proj.weight, bias)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, encoder: bool = False):
        """x [B, T, hidden] → q [B, H, T, D], k and v [B, Hkv, T, D]: projections, norms, RoPE."""
        fused = self.fused_qkv(encoder)  # looked up here: data pointers cannot be traced by torch.compile
        if KERNELS["project"] is not None and x.is_cuda and not torch.is_grad_enabled() \
                and not torch.compiler.is_compiling():
            return KERNELS["project"](self, x, cos, sin, encoder, fused)
        return self._project(x, cos, sin, encoder, fused)

    def _project(self, x, cos, sin, encoder: bool, fused: tuple[torch.Tensor, torch.Tensor | None] | None):
        B, T, _ = x.shape
        if fused is not None:  # one GEMM over the stacked weight, split into views
            out = F.linear(x, *fused).split(self.qkv_sizes, dim=-1)  # [B, T, H*D], [B, T, Hkv*D] (, [B, T, Hkv*D])
        else:
            out = [self.linear(name, x, encoder) for name in self.qkv_names]
        q = self.q_norm(out[0].view(B, T, self.n_heads, self.head_dim))  # [B, T, H, D]
        q = apply_rope(q, cos, sin).transpose(1, 2)  # [B, H, T, D]
        k_raw = out[1].view(B, T, self.n_kv, self.head_dim)  # [B, T, Hkv, D]
        v = out[2].view(B, T, self.n_kv, self.head_dim) if len(out) == 3 else k_raw  # K=V on full layers
        k = apply_rope(self.k_norm(k_raw), cos, sin).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.v_norm(v).transpose(1, 2)  # [B, Hkv, T, D]
        return q, k, v

    def attend(self, q, k, v, mask: torch.Tensor | None, causal: bool = False, encoder: bool = False) -> torch.Tensor:
        return self.linear("o", self.context(q, k, v, mask, causal), encoder)

    def context(self, q, k, v, mask: torch.Tensor | None, causal: bool = False) -> torch.Tensor:
        # q [B, H, T, D], k/v [B, Hkv, S, D], mask [B, 1, T, S] (True = attend) or None (all keys visible)
        # → [B, T, H*D], the input of o_proj
        B, _, T, _ = q.shape
        rep = self.n_heads // self.n_kv
        gqa = {}
        if rep > 1 and mask is None and self.head_dim <= 256:
            gqa = {"enable_gqa": True}  # flash kernels take GQA natively (same choice as transformers' sdpa path)
        elif rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=1.0, **gqa)
        return out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)

    def forward_encoder(self, x, cos, sin, cache: KVCache, pos: torch.Tensor, valid: torch.Tensor):
        """Causal attention of new tokens over the cached prefix and themselves; writes the new K/V to the cache."""
        q, k, v = self.project(x, cos, sin, encoder=True)
        ck, cv, cpos = cache.read(self.layer_idx)  # [B, Hkv, S, D], [B, S] (-1 = empty slot / padding)
        T = x.shape[1]
        if ck.shape[2] == 0 and bool(valid.all()) and (not self.sliding or T <= self.window):
            # Plain causal prefill (no cache, no padding, inside the window): no mask, a causal kernel.
            out = self.attend(q, k, v, None, causal=True, encoder=True)
        else:
            mask = self.prefix_mask(torch.cat([cpos, torch.where(valid, pos, -1)], dim=1), pos)  # [B, T, S + T]
            # A left-pad query sees no valid key; let it see itself so no row is fully masked (output unused).
            eye = torch.zeros_like(mask)
            eye[:, :, -T:] = torch.eye(T, dtype=torch.bool, device=x.device)
            mask |= eye & ~valid[:, :, None]
            out = self.attend(q, torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2), mask[:, None], encoder=True)
        cache.write(self.layer_idx, k, v, pos, valid)
        return out

    def forward_decoder(self, x, cos, sin, cache: KVCache):
        """The canvas attends to every cached prefix slot (sliding layers keep the last window-1) and to itself."""
        q, k, v = self.project(x, cos, sin)
        ck, cv, cpos = cache.read(self.layer_idx)
        B, T = x.shape[:2]
        keys, values = torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)
        if bool((cpos >= 0).all()):  # no padding: every key visible, no mask (a faster kernel)
            return self.attend(q, keys, values, None)
        keys_ok = torch.cat([cpos >= 0, torch.ones(B, T, dtype=torch.bool, device=x.device)], dim=1)
        return self.attend(q, keys, values, keys_ok[:, None, None, :].expand(B, 1, T, keys_ok.shape[1]))

    def prefix_mask(self, key_pos: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Causal (and, on sliding layers, windowed) visibility [B, T, S] of keys at key_pos [B, S] (-1 = none)
        for queries at pos [B, T]: the window holds `sliding_window` keys including the query itself."""
        qp, kp = pos[:, :, None], key_pos[:, None, :]
        mask = (kp >= 0) & (kp <= qp)
        if self.sliding:
            mask &= kp > qp - self.window
        return mask

    def forward_encoder_static(self, x, cos, sin, cache: KVCache, pos: torch.Tensor, rows=None):
        """Static-shape encoder attention for a committed canvas (no padding; CUDA-graph safe). Same math as
        `forward_encoder`; see `encoder_static_context`."""
        q, k, v = self.project(x, cos, sin, encoder=True)
        return self.linear("o", self.encoder_static_context(q, k, v, cache, pos, rows), encoder=True)

    def encoder_static_context(self, q, k, v, cache: KVCache, pos: torch.Tensor, rows=None) -> torch.Tensor:
        """The new K/V go to the scratch slots, the causal/sliding mask comes from slot positions on the device (or the
        Triton kernel's causal mode applies it), then the new K/V are stored in their cache slots (only rows set in
        `rows` [B] bool, if given). q [B, H, T, D], k/v [B, Hkv, T, D] at positions pos [B, T] → [B, T, H*D]."""
        layer, cap, T = self.layer_idx, cache.capacity[self.layer_idx], q.shape[2]
        ck, cv = cache.k[layer][:, :, :cap + T], cache.v[layer][:, :, :cap + T]  # the cache, then T scratch slots
        ck[:, :, cap:], cv[:, :, cap:] = k, v
        if canvas_kernel_on(q) and q.shape[3] in ATTENTION_HEAD_DIMS:  # prefix_mask's rule, no mask built
            out = KERNELS["canvas_attention"](q, ck, cv, cache.pos[layer], cache.kv_len, qpos=pos,
                                              window=self.window if self.sliding else None).transpose(1, 2).flatten(2)
        else:  # a [B, T, cap + T] mask
            out = self.context(q, ck, cv, self.prefix_mask(torch.cat([cache.pos[layer], pos], dim=1), pos)[:, None])
        cache.write(layer, k, v, pos, rows=rows)
        return out

    def forward_decoder_static(self, x, cos, sin, cache: KVCache):
        """Static-shape decoder attention (CUDA-graph safe). Same math as `forward_decoder`; see
        `decoder_static_context`."""
        q, k, v = self.project(x, cos, sin)
        return self.o_proj(self.decoder_static_context(q, k, v, cache))

    def decoder_static_context(self, q, k, v, cache: KVCache) -> torch.Tensor:
        """The canvas K/V go into the cache's scratch slots and the canvas attends over the whole buffer, masked on
        the device. q [B, H, T, D], k/v [B, Hkv, T, D] (T = scratch) → [B, T, H*D], before o_proj."""
        layer, cap, (B, H, T, D) = self.layer_idx, cache.capacity[self.layer_idx], q.shape
        ck, cv = cache.k[layer], cache.v[layer]
        ck[:, :, cap:], cv[:, :, cap:] = k, v
        if canvas_kernel_on(q) and D in ATTENTION_HEAD_DIMS:
            # Triton flash attention over the occupied slots only (kernels/attention.py): key blocks past the row's
            # length (`cache.kv_len`) are skipped, so the step does not pay for the cache's unused capacity.
            return KERNELS["canvas_attention"](q, ck, cv, cache.pos[layer], cache.kv_len).transpose(1, 2).flatten(2)
        # The mask does not depend on the query, so the query heads sharing a KV head can be stacked along the
        # sequence: [B, Hkv, rep*T, D] against K/V [B, Hkv, S, D]. Same math as repeating K/V, without the copy.
        q = q.reshape(B, self.n_kv, (H // self.n_kv) * T, D)
        out = F.scaled_dot_product_attention(q, ck, cv, attn_mask=cache.decoder_mask(layer), scale=1.0)
        return out.reshape(B, H, T, D).transpose(1, 2).reshape(B, T, H * D)

    def forward_folded_static(self, x, cos, sin, cache: KVCache, enc_pos: torch.Tensor) -> torch.Tensor:
        """`forward_encoder_static` over a committed canvas x[:, :C] (positions enc_pos [B, C]) and
        `forward_decoder_static` over the next canvas x[:, C:], in one call: the projections run once over all 2C
        tokens (one read of the weights). The encoder half attends first and writes the committed K/V into the
        cache, so the decoder half then sees the cache exactly as after a separate commit pass (both halves stage
        their K/V in the same scratch slots, one after the other)."""
        C = enc_pos.shape[1]
        if self.q_proj.bias is not None:  # the encoder has its own biases: project each half (not the real config)
            enc = self.project(x[:, :C], cos[:, :C], sin[:, :C], encoder=True)
            dec = self.project(x[:, C:], cos[:, C:], sin[:, C:])
            return torch.cat([self.linear("o", self.encoder_static_context(*enc, cache, enc_pos), encoder=True),
                              self.o_proj(self.decoder_static_context(*dec, cache))], dim=1)
        enc, dec = zip(*(t.split(C, dim=2) for t in self.project(x, cos, sin)))  # q, k, v [B, H|Hkv, C, D] each
        out = [self.encoder_static_context(*enc, cache, enc_pos), self.decoder_static_context(*dec, cache)]
        return self.o_proj(torch.cat(out, dim=1))  # [B, 2C, hidden]


def gated_mlp(mlp: nn.Module, x: torch.Tensor, gate_up: torch.Tensor | None = None) -> torch.Tensor:
    """down(gelu_tanh(gate(x)) * up(x)) for a module with gate_proj/up_proj/down_proj; `gate_up` [2I, hidden] is
    their stacked weight (fusion.py), one GEMM instead of two, or None."""
    if gate_up is not None:
        gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # [..., I] views
    else:
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    return mlp.down_proj(F.gelu(gate, approximate="tanh") * up)


class MLP(nn.Module):
    """Gated GELU(tanh) MLP: the dense branch of each layer, and the self-conditioning block's body."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.fused = {}  # fusion.fuse_projections: "gate_up" → FusedRows

    def forward(self, x: torch.Tensor, gate_up: torch.Tensor | None = None) -> torch.Tensor:
        return gated_mlp(self, x, gate_up)


class Router(nn.Module):
    """Top-k router over the residual stream itself (not the pre-FF-2 normed input): weightless RMSNorm, learned
    per-channel `scale`, hidden^-0.5, fp32 softmax, top-k, renormalise, learned per-expert multiplier."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.top_k_experts
        self.root = args.hidden_size**-0.5
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, with_scale=False)
        self.proj = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(args.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(args.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # x [N, hidden] → weights fp32, idx [N, k]
        scores = self.proj(self.norm(x) * self.scale * self.root)
        if KERNELS["route"] is not None and scores.is_cuda and not torch.is_grad_enabled():
            return KERNELS["route"](scores, self.per_expert_scale, self.top_k)  # the rest in one kernel
        probs = F.softmax(scores, dim=-1, dtype=torch.float32)
        weights, idx = torch.topk(probs, k=self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[idx], idx


class Experts(nn.Module):
    """Routed experts stored as 3-D tensors, as in the checkpoint: gate_up_proj [E, 2I, hidden] (gate rows first),
    down_proj [E, hidden, I]. Token-expert pairs are sorted by expert and run as grouped GEMMs; the k weighted
    outputs of a token are summed in fp32 and cast once (as transformers' grouped_mm path does; summing in bf16
    with index_add would round k times)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        E, I, H = args.num_experts, args.moe_intermediate_size, args.hidden_size
        self.num_experts = E
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        # x [N, hidden], weights/idx [N, k]
        N, k = idx.shape
        if KERNELS["moe"] is not None and x.is_cuda and N >= MOE_TRITON_MIN_TOKENS and not torch.is_grad_enabled():
            return KERNELS["moe"](x, weights, idx, self.gate_up_proj, self.down_proj)
        expert_sorted, perm = torch.sort(idx.reshape(-1))  # [N*k]
        xs = x[perm // k]  # [N*k, hidden], grouped by expert
        counts = torch.zeros(self.num_experts, dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, expert_sorted, torch.ones_like(expert_sorted, dtype=torch.int32))  # no host sync
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        gate, up = grouped_linear(xs, self.gate_up_proj, offsets).chunk(2, dim=-1)
        y = grouped_linear(F.gelu(gate, approximate="tanh") * up, self.down_proj, offsets)  # [N*k, hidden]
        y = y * weights.reshape(-1)[perm, None]  # fp32
        out = torch.empty_like(y)
        out[perm] = y  # back to token-major order
        return out.view(N, k, -1).sum(dim=1).to(x.dtype)


def grouped_linear(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [S, in] grouped by expert (group e = rows offsets[e-1]:offsets[e]) @ w[e].T, w [E, out, in] → [S, out]."""
    # Training takes the loop: grouped_mm has no CPU backward in torch 2.13 (inference never needs gradients).
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
    if hasattr(F, "grouped_mm") and _aligned16(x, w) and not needs_grad:
        return F.grouped_mm(x.to(w.dtype), w.transpose(-2, -1), offs=offsets)
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for e, end in enumerate(offsets.tolist()):  # fallback: one GEMM per expert (a host sync; reference only)
        if end > start:
            out[start:end] = F.linear(x[start:end], w[e])
        start = end
    return out


def _aligned16(*tensors: torch.Tensor) -> bool:
    """grouped_mm needs 16-byte aligned pointers and row strides (true at the real shape; tiny test dims may not be).
    Under torch.compile only the strides are checked (fresh and parameter tensors are 256-byte aligned)."""
    pointers_ok = torch.compiler.is_compiling() or all(t.data_ptr() % 16 == 0 for t in tensors)
    return pointers_ok and all((s * t.element_size()) % 16 == 0 for t in tensors for s in t.stride()[:-1])


class Layer(nn.Module):
    """Attention, then a dense MLP branch and an MoE branch side by side on the same residual, then x *= scalar."""

    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        H, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = Attention(args, layer_idx)
        self.mlp = MLP(H, args.intermediate_size)
        self.router = Router(args)
        self.experts = Experts(args)
        self.input_layernorm = RMSNorm(H, eps)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.pre_feedforward_layernorm = RMSNorm(H, eps)
        self.post_feedforward_layernorm = RMSNorm(H, eps)
        self.post_feedforward_layernorm_1 = RMSNorm(H, eps)
        self.post_feedforward_layernorm_2 = RMSNorm(H, eps)
        self.pre_feedforward_layernorm_2 = RMSNorm(H, eps)
        # Buffers are not tied between encoder and decoder in the checkpoint, so both scalars are loaded.
        self.register_buffer("layer_scalar", torch.ones(1))
        self.register_buffer("encoder_layer_scalar", torch.ones(1))

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = fused_weight(self.mlp, "gate_up")  # looked up here: data pointers cannot be traced by torch.compile
        if KERNELS["feed_forward"] is not None and x.is_cuda and not torch.is_grad_enabled() \
                and not torch.compiler.is_compiling():
            return KERNELS["feed_forward"](self, x, gate_up)
        return self._feed_forward(x, gate_up)

    def _feed_forward(self, x: torch.Tensor, gate_up: torch.Tensor | None) -> torch.Tensor:
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(x), gate_up))
        flat = x.reshape(-1, x.shape[-1])  # [B*T, hidden]
        weights, idx = self.router(flat)  # the router reads the residual, not the normed input
        moe = self.experts(self.pre_feedforward_layernorm_2(flat), weights, idx).reshape(x.shape)
        moe = self.post_feedforward_layernorm_2(moe)
        return x + self.post_feedforward_layernorm(dense + moe)

    def forward(self, x, cos, sin, cache: KVCache, encoder: bool, pos=None, valid=None, static=False,
                rows=None) -> torch.Tensor:
        h = self.input_layernorm(x)
        if encoder and static:
            h = self.self_attn.forward_encoder_static(h, cos, sin, cache, pos, rows)
        elif encoder:
            h = self.self_attn.forward_encoder(h, cos, sin, cache, pos, valid)
        elif static:
            h = self.self_attn.forward_decoder_static(h, cos, sin, cache)
        else:
            h = self.self_attn.forward_decoder(h, cos, sin, cache)
        x = x + self.post_attention_layernorm(h)
        x = self.feed_forward(x)
        return x * (self.encoder_layer_scalar if encoder else self.layer_scalar)

    def forward_folded(self, x, cos, sin, cache: KVCache, enc_pos: torch.Tensor) -> torch.Tensor:
        """The static encoder over x[:, :C] (a committed canvas at enc_pos [B, C]) and the static decoder over
        x[:, C:] (the next canvas) in one pass: norms, projections, dense MLP, router and experts run once over all
        2C tokens; only attention and the layer scalar depend on the role."""
        C = enc_pos.shape[1]
        h = self.self_attn.forward_folded_static(self.input_layernorm(x), cos, sin, cache, enc_pos)
        x = self.feed_forward(x + self.post_attention_layernorm(h))
        return torch.cat([x[:, :C] * self.encoder_layer_scalar, x[:, C:] * self.layer_scalar], dim=1)


class SelfConditioning(nn.Module):
    """Adds a signal from the previous step's prediction to the canvas embeddings: softmax(prev logits) @ E × scale
    → pre_norm → gated MLP → + embeddings → weightless post_norm. The first step uses zeros (signal 0)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        H = args.hidden_size
        self.pre_norm = RMSNorm(H, args.rms_norm_eps)
        self.post_norm = RMSNorm(H, args.rms_norm_eps, with_scale=False)
        self.gate_proj = nn.Linear(H, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(H, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, H, bias=False)
        self.fused = {}  # fusion.fuse_projections: "gate_up" → FusedRows

    def forward(self, embeds: torch.Tensor, soft: torch.Tensor | None) -> torch.Tensor:
        if soft is not None:  # with soft = 0 the MLP output is exactly 0, so skipping it is exact
            embeds = embeds + gated_mlp(self, self.pre_norm(soft), fused_weight(self, "gate_up"))
        return self.post_norm(embeds)


class DiffusionGemma(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)  # also the (tied) LM head
        self.layers = nn.ModuleList(Layer(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_conditioning = SelfConditioning(args)
        self.init_buffers()

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the non-persistent buffers; needed after building on the meta device."""
        for kind in ("sliding_attention", "full_attention"):
            self.register_buffer(f"{kind}_inv_freq", rope_inv_freq(self.args, kind).to(device), persistent=False)
        self.register_buffer("embed_scale", torch.tensor(self.args.embed_scale, device=device), persistent=False)

    # --- pieces shared by both passes -------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.embed_tokens.weight
        # The scale sqrt(hidden) is cast to the weight dtype first (in bf16 sqrt(2816)=53.07 becomes 53.0).
        return F.embedding(ids, w) * self.embed_scale.to(w.dtype)

    def rope(self, pos: torch.Tensor, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for kind in ("sliding_attention", "full_attention"):
            freqs = pos[..., None].float() * getattr(self, f"{kind}_inv_freq").float()  # [B|1, T, D/2]
            emb = torch.cat((freqs, freqs), dim=-1)  # [B|1, T, D]
            out[kind] = (emb.cos().to(dtype), emb.sin().to(dtype))
        return out

    def lm_head(self, h: torch.Tensor, raw: bool = False) -> torch.Tensor:
        """Softcapped fp32 logits; `raw`: the GEMM's output in the model dtype, for a sampler that applies the
        softcap itself while reading it (kernels/sampler.py), so no fp32 [.., V] tensor is written."""
        logits = F.linear(h, self.embed_tokens.weight)
        if raw:
            return logits
        logits = logits.float()
        cap = self.args.final_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap else logits

    def run_layers(self, x, pos, cache: KVCache, encoder: bool, valid=None, static=False, rows=None) -> torch.Tensor:
        if static and fused_layer.active(self, x):  # the CUDA fast path's layer: ~12 launches instead of ~30
            return fused_layer.run_static(self, x, pos, cache, encoder, rows)
        if static and canvas_kernel_on(x):  # the kernel's bound on the occupied slots, set before any layer writes
            cache.kv_len = KERNELS["cache_lengths"](cache.pos[0])  # [B] on the device, recomputed at every replay
        rope = self.rope(pos, x.dtype)
        for i, layer in enumerate(self.layers):
            cos, sin = rope[self.args.layer_types[i]]
            x = layer(x, cos, sin, cache, encoder, pos, valid, static, rows)
        return self.norm(x)

    # --- the two passes ---------------------------------------------------------------------------------------
    def encode(self, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache, valid: torch.Tensor | None = None):
        """Causal pass over new tokens ids [B, T] at absolute positions pos [B, T]; writes K/V for every layer.
        `valid` [B, T] marks real tokens (False = left padding, never attended). Returns hidden states [B, T, H].
        The caller advances the cache length afterwards; layers never do."""
        if valid is None:
            valid = torch.ones_like(ids, dtype=torch.bool)
        if (ids >= self.args.vocab_size).any() or (ids < 0).any():
            raise ValueError(f"token ids must lie in [0, {self.args.vocab_size}) for this model")
        if pos.numel() and int(pos.max()) >= cache.max_len:
            raise ValueError(f"KV cache is full: position {int(pos.max())} >= max_len {cache.max_len}")
        return self.run_layers(self.embed(ids), pos, cache, True, valid)

    def encode_static(self, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache,
                      rows: torch.Tensor | None = None) -> torch.Tensor:
        """`encode` for a committed canvas with fixed shapes and no host syncs (CUDA-graph capture): ids/pos [B, C],
        no padding, a cache built with scratch >= C. Writes the same cache entries as `encode`; with `rows` [B] bool
        only those rows' caches are written (the scheduler's batch commits some rows and not others)."""
        return self.run_layers(self.embed(ids), pos, cache, True, static=True, rows=rows)

    def soft_embed(self, sc_logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Self-conditioning input: softmax(previous processed logits) @ E × embed scale ([B, T, hidden])."""
        return self.soft_from_probs(sc_logits.softmax(dim=-1, dtype=torch.float32), dtype)

    def soft_from_probs(self, probs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Expected embedding under `probs` [B, T, V] (fp32): probs @ E × embed scale, as upstream."""
        w = self.embed_tokens.weight
        return torch.matmul(probs.to(w.dtype), w) * self.embed_scale.to(dtype)

    def denoise(self, canvas: torch.Tensor, pos: torch.Tensor, cache: KVCache,
                sc_logits: torch.Tensor | None = None, sc_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One decoder pass: canvas ids [B, C] at positions pos [B|1, C], previous step's temperature-scaled logits
        [B, C, V] (None on the first step). Returns fp32 softcapped logits [B, C, V]. Reads the cache only.
        `sc_mask` [B] (training): rows set False get a zero self-conditioning signal, as transformers'
        `self_conditioning_mask` does."""
        x = self.embed(canvas)
        soft = self.soft_embed(sc_logits, x.dtype) if sc_logits is not None else None
        if soft is not None and sc_mask is not None:
            soft = soft * sc_mask.to(soft.dtype)[:, None, None]
        x = self.self_conditioning(x, soft)
        return self.lm_head(self.run_layers(x, pos, cache, False))

    def denoise_static(self, canvas: torch.Tensor, pos: torch.Tensor, cache: KVCache,
                       soft: torch.Tensor, raw: bool = False) -> torch.Tensor:
        """`denoise` with fixed shapes and no host syncs, for CUDA-graph capture (engine/fast.py). Takes the
        self-conditioning soft embeddings [B, C, hidden] directly (zeros on the first step give exactly the same
        result as no self-conditioning) and needs a cache built with `scratch=canvas_length`. `raw`: see lm_head."""
        x = self.self_conditioning(self.embed(canvas), soft)
        return self.lm_head(self.run_layers(x, pos, cache, False, static=True), raw)

    def denoise_folded_static(self, ids: torch.Tensor, enc_pos: torch.Tensor, canvas: torch.Tensor,
                              pos: torch.Tensor, cache: KVCache, soft: torch.Tensor, raw: bool = False) -> torch.Tensor:
        """`encode_static(ids, enc_pos, cache)` (the commit pass of the canvas committed last) folded into
        `denoise_static(canvas, pos, cache, soft)` (the next canvas's first step): one forward over [B, 2C] tokens,
        so every layer's weights are read once for both (at batch 1 each pass streams all the weights). Writes the
        same cache entries and returns the same logits [B, C, V] as the two passes in turn."""
        B, C = canvas.shape
        x = torch.cat([self.embed(ids), self.self_conditioning(self.embed(canvas), soft)], dim=1)  # [B, 2C, hidden]
        both = torch.cat([enc_pos, pos.expand(B, -1)], dim=1)  # [B, 2C] positions
        if fused_layer.active(self, x):
            return self.lm_head(fused_layer.run_folded(self, x, both, cache, enc_pos)[:, C:], raw)
        if canvas_kernel_on(canvas):
            # The committed slots fill in layer by layer during this pass, each before its layer's decoder half
            # reads the cache: count them in from the start (recomputed at every replay).
            cache.kv_len = torch.maximum(KERNELS["cache_lengths"](cache.pos[0]), KERNELS["cache_lengths"](enc_pos))
        rope = self.rope(both, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer.forward_folded(x, *rope[self.args.layer_types[i]], cache, enc_pos)
        return self.lm_head(self.norm(x[:, C:]), raw)  # the encoder half's output is not needed (as in a commit pass)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


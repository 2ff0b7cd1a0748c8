"""RoPE for Gemma 4: inverse frequencies per layer type (plain on sliding layers, "proportional" on full layers)
and the rotation itself, as transformers 5.23.0 computes them."""

from __future__ import annotations

import torch

from dgemma.config import ModelArgs


def rope_inv_freq(args: ModelArgs, layer_type: str) -> torch.Tensor:
    """Inverse frequencies, one per pair of dims ([head_dim/2]).

    Sliding layers use plain RoPE. Full layers use "proportional" RoPE: only the first `partial_rotary_factor` of
    the angle slots rotate, with exponents over the *whole* head_dim, and the remaining slots get frequency 0
    (cos 1, sin 0), so rotate_half still spans the full head (transformers `_compute_proportional_rope_parameters`).
    """
    rope = args.rope_parameters[layer_type]
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    head_dim = args.head_dim if layer_type == "sliding_attention" else args.global_head_dim
    base = float(rope["rope_theta"])
    if rope_type == "default":
        dim = int(head_dim * float(rope.get("partial_rotary_factor", 1.0)))
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    if rope_type == "proportional":
        angles = int(float(rope.get("partial_rotary_factor", 1.0)) * head_dim // 2)
        rotated = 1.0 / (base ** (torch.arange(0, 2 * angles, 2, dtype=torch.int64).float() / head_dim))
        inv = torch.cat([rotated, torch.zeros(head_dim // 2 - angles)])
        return inv / float(rope.get("factor", 1.0))
    raise ValueError(f"config.json: rope_type {rope_type!r} for {layer_type} is not supported")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, T, H, D]; cos/sin [B|1, T, D] → broadcast over heads.
    return x * cos.unsqueeze(2) + rotate_half(x) * sin.unsqueeze(2)

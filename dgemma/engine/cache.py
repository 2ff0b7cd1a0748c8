"""Preallocated KV cache for the encoder prefix (prompt + committed canvases).

Layout, per layer l (allocated once, never grown):
    k[l], v[l]  [B, Hkv_l, C_l, D_l]   model dtype; K is RoPE'd and k_norm'ed, V is v_norm'ed
    pos[l]      [B, C_l] int64        absolute position held by each slot; -1 = empty slot or left padding
    C_l = max_len for full-attention layers;
    C_l = min(sliding_window - 1, max_len) for sliding layers, a ring buffer with slot = position % C_l.
The ring keeps exactly the last `sliding_window - 1` positions, which is what transformers' DynamicCache keeps and
what the decoder attends to on sliding layers. Masks are derived from `pos`, so slot order never matters
(attention is permutation invariant over keys) and padding needs no separate mask.

`length` is the number of positions written so far (shared by all rows; rows are left-padded). Layers write K/V
through `write`; only the engine advances `length` (`advance`), after a whole encoder pass.

With `scratch=C` every layer gets C extra slots after its capacity (k/v [B, Hkv, C_l + C, D]): the static-shape
decoder (engine/fast.py) writes the canvas K/V there and attends over the whole buffer with a mask built on the
device (`decoder_mask`), so a denoising step has fixed shapes, no host sync and no per-step concatenation.
"""

from __future__ import annotations

import torch

from dgemma.config import ModelArgs


class KVCache:
    def __init__(self, args: ModelArgs, batch: int, max_len: int, device: torch.device | str, dtype: torch.dtype,
                 scratch: int = 0):
        self.batch, self.max_len, self.length, self.scratch = batch, max_len, 0, scratch
        self.capacity: list[int] = []
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.pos: list[torch.Tensor] = []
        for i in range(args.num_hidden_layers):
            shape = args.layer_shape(i)
            cap = min(args.sliding_window - 1, max_len) if shape.sliding else max_len
            self.capacity.append(cap)
            self.k.append(torch.zeros(batch, shape.num_kv_heads, cap + scratch, shape.head_dim, device=device,
                                      dtype=dtype))
            self.v.append(torch.zeros_like(self.k[-1]))
            self.pos.append(torch.full((batch, cap), -1, dtype=torch.long, device=device))

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """K, V [B, Hkv, S, D] and slot positions [B, S] of the slots that may hold data (S <= capacity)."""
        cap = self.capacity[layer]
        if self.length <= cap:
            n = self.length
            return self.k[layer][:, :, :n], self.v[layer][:, :, :n], self.pos[layer][:, :n]
        # A wrapped ring: read it oldest-first so keys come in the same order as a growing cache (the same
        # softmax summation order as the reference, hence closer bf16 results).
        order = torch.remainder(torch.arange(cap, device=self.pos[layer].device) + self.length, cap)
        return self.k[layer][:, :, order], self.v[layer][:, :, order], self.pos[layer][:, order]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
              valid: torch.Tensor | None = None) -> None:
        """Store new K/V [B, Hkv, T, D] for positions pos [B, T] (all rows share positions; `valid` False marks
        padding, None = no padding). Only the last `capacity` positions are kept. No host sync (graph-safe); the
        caller checks positions against `max_len` (`DiffusionGemma.encode`)."""
        cap, T = self.capacity[layer], k.shape[2]
        keep = min(T, cap)
        k, v, pos = k[:, :, -keep:], v[:, :, -keep:], pos[:, -keep:]
        slots = pos[0] % cap  # [keep], distinct because positions are consecutive
        self.k[layer][:, :, slots] = k
        self.v[layer][:, :, slots] = v
        self.pos[layer][:, slots] = pos if valid is None else torch.where(valid[:, -keep:], pos, -1)

    def clear(self) -> None:
        """Forget every stored position (slots become empty; K/V contents are left as they are)."""
        self.length = 0
        for pos in self.pos:
            pos.fill_(-1)

    def advance(self, n: int) -> None:
        self.length += n

    def decoder_mask(self, layer: int) -> torch.Tensor:
        """[B, 1, 1, C_l + scratch] bool: occupied cache slots plus every scratch (canvas) slot. Device-only."""
        scratch = torch.ones(self.batch, self.scratch, dtype=torch.bool, device=self.pos[layer].device)
        return torch.cat([self.pos[layer] >= 0, scratch], dim=1)[:, None, None, :]

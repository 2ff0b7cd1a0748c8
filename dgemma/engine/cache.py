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

Rows may also hold sequences of different lengths (the scheduler's continuous batch, engine/scheduler.py): `write`
places each row's K/V by that row's own positions, the static passes mask by slot positions only, and `view(rows,
length)` gives a cache object over a slice of rows (views, so writes land in place) with its own `length`, which is
how one row is prefilled. `swap_rows` and `truncate_row` move and roll back one row's cache.

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
        # [B] occupied length per row (max position + 1), set on the device by each static decoder step for the
        # Triton attention kernel, which skips the slots past it; None until then.
        self.kv_len: torch.Tensor | None = None
        for i in range(args.num_hidden_layers):
            shape = args.layer_shape(i)
            cap = min(args.sliding_window - 1, max_len) if shape.sliding else max_len
            self.capacity.append(cap)
            self.k.append(torch.zeros(batch, shape.num_kv_heads, cap + scratch, shape.head_dim, device=device,
                                      dtype=dtype))
            self.v.append(torch.zeros_like(self.k[-1]))
            self.pos.append(torch.full((batch, cap), -1, dtype=torch.long, device=device))

    def view(self, rows: slice, length: int = 0) -> KVCache:
        """A KVCache over rows `rows` of this one, sharing storage (writes land in place), with its own `length`."""
        out = object.__new__(KVCache)
        out.max_len, out.length, out.scratch, out.capacity = self.max_len, length, self.scratch, self.capacity
        out.kv_len = None
        out.k, out.v, out.pos = ([t[rows] for t in ts] for ts in (self.k, self.v, self.pos))
        out.batch = out.pos[0].shape[0]
        return out

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
              valid: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> None:
        """Store new K/V [B, Hkv, T, D] for positions pos [B, T] (consecutive within a row; rows may differ; `valid`
        False marks padding, None = no padding). Only the last `capacity` positions are kept. `rows` [B] bool: only
        rows set True are written (the others keep their contents). No host sync (graph-safe); the caller checks
        positions against `max_len` (`DiffusionGemma.encode`)."""
        cap, T = self.capacity[layer], k.shape[2]
        keep = min(T, cap)
        k, v, pos = k[:, :, -keep:], v[:, :, -keep:], pos[:, -keep:]
        slots = pos % cap  # [B, keep], distinct within a row because its positions are consecutive
        if valid is not None:
            pos = torch.where(valid[:, -keep:], pos, -1)
        idx = slots[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])  # [B, Hkv, keep, D]
        if rows is not None:  # rows left out write back what they hold
            k = torch.where(rows[:, None, None, None], k, self.k[layer].gather(2, idx))
            v = torch.where(rows[:, None, None, None], v, self.v[layer].gather(2, idx))
            pos = torch.where(rows[:, None], pos, self.pos[layer].gather(1, slots))
        self.k[layer].scatter_(2, idx, k)
        self.v[layer].scatter_(2, idx, v)
        self.pos[layer].scatter_(1, slots, pos)

    def clear(self) -> None:
        """Forget every stored position (slots become empty; K/V contents are left as they are)."""
        self.length = 0
        for pos in self.pos:
            pos.fill_(-1)

    def swap_rows(self, a: int, b: int) -> None:
        """Exchange the whole cache (K, V, slot positions) of rows a and b (the scheduler keeps busy rows first)."""
        if a != b:
            for t in (*self.k, *self.v, *self.pos):
                t[[a, b]] = t[[b, a]]

    def rollback_ok(self, length: int, keep: int) -> bool:
        """Whether a row holding positions 0..length-1 can be cut back to 0..keep-1 exactly: a sliding ring must
        still hold the last `sliding_window - 1` positions before `keep` (the ones it overwrote are gone)."""
        for cap, full in zip(self.capacity, self._full()):
            if not full and max(0, keep - cap) < max(0, length - cap):
                return False
        return True

    def truncate_row(self, row: int, keep: int) -> None:
        """Forget positions >= keep in one row (callers check `rollback_ok` first)."""
        for pos in self.pos:
            pos[row].masked_fill_(pos[row] >= keep, -1)

    def _full(self) -> list[bool]:
        return [cap == self.max_len for cap in self.capacity]

    def advance(self, n: int) -> None:
        self.length += n

    def decoder_mask(self, layer: int) -> torch.Tensor:
        """[B, 1, 1, C_l + scratch] bool: occupied cache slots plus every scratch (canvas) slot. Device-only."""
        scratch = torch.ones(self.batch, self.scratch, dtype=torch.bool, device=self.pos[layer].device)
        return torch.cat([self.pos[layer] >= 0, scratch], dim=1)[:, None, None, :]

"""Float helpers for kernels that must give the same results on GPU and under TRITON_INTERPRET=1.

- `round_to`: the interpreter (triton 3.6) converts fp32 to bf16 by truncation, and its "rtne" mode does not carry
  into the exponent; GPUs round to nearest even. Rounding on the bits first makes the value exactly representable,
  so the final cast is exact everywhere and results match torch's `.to(torch.bfloat16)` bit for bit.
- `log1p`, `expm1`, `tanh`: libdevice has them on GPU, the interpreter does not; these are accurate to a few ulps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Codes for the constexpr `MODE` arguments below.
MODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def round_to(x, MODE: tl.constexpr):
    """fp32 x rounded (nearest even) to fp32 (MODE 0, no-op), bf16 (1) or fp16 (2), returned as fp32."""
    if MODE == 1:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    elif MODE == 2:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def log1p(x):
    """log(1 + x) accurate for small x: log(u) * x / (u - 1) with u = 1 + x rounded (Goldberg 1991, Thm. 4)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def expm1(x):
    """exp(x) - 1 accurate for small x: (u - 1) * x / log(u) with u = exp(x) rounded (Kahan)."""
    u = tl.exp(x)
    return tl.where(u == 1.0, x, tl.where(u - 1.0 == -1.0, -1.0, (u - 1.0) * (x / tl.log(u))))


@triton.jit
def tanh(y):
    """tanh through expm1 (accurate near 0, where 1 - 2 / (exp(2y) + 1) cancels)."""
    t = expm1(-2.0 * tl.abs(y))  # in (-1, 0]
    r = -t / (2.0 + t)
    return tl.where(y < 0, -r, r)

"""Rounding fp32 values to the model dtype inside kernels, identically on GPU and under TRITON_INTERPRET=1.

The interpreter (triton 3.6) converts fp32 to bf16 by truncation, and its "rtne" mode does not carry into the
exponent; GPUs round to nearest even. Rounding on the bits first makes the value exactly representable, so the
final cast is exact everywhere and kernel results match torch's `.to(torch.bfloat16)` bit for bit.
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

"""Float helpers for kernels that must give the same results on GPU and under TRITON_INTERPRET=1.

- `round_to`: the interpreter (triton 3.6) converts fp32 to bf16 by truncation, and its "rtne" mode does not carry
  into the exponent; GPUs round to nearest even. Rounding on the bits first makes the value exactly representable,
  so the final cast is exact everywhere and results match torch's `.to(torch.bfloat16)` bit for bit. Compiled,
  `x.to(tl.bfloat16).to(tl.float32)` is fewer instructions but lets LLVM narrow the fp32 ops between round trips to
  bf16 ops and then contract them: `round(round(a·b) - round(c·d))` over bf16 inputs became one
  `fma.rn.bf16x2(a, b, -c·d)` (sm_90 PTX), which skips the rounding of a·b that torch makes; qkv_prep then failed its
  real-shape test on an H200 (78% of outputs equal to torch's). With `enable_fp_fusion=False` the PTX is
  `mul.rn.bf16x2` + `sub.rn.bf16x2`, exact by the double-rounding argument, but that is not measured yet: the bit
  form stays. It cannot be narrowed (integer ops in between).
- `log1p`, `expm1`, `tanh`, `gelu_tanh`: libdevice has the first three on GPU, the interpreter does not; these are
  accurate to a few ulps. `precision`: tl.dot's input precision per dtype.
- `log2`, `rcp` with FAST: one MUFU instruction each when compiled (lg2.approx, rcp.approx) instead of a polynomial
  or a full-precision division. The interpreter has no libdevice: there (and without FAST) they are the exact ops,
  so CPU tests still run the fast formulas built on them.
- `pdl_start` / `pdl`: programmatic dependent launch (Hopper and later). A kernel launched with `**pdl(device)`
  may be started by the GPU while the kernel before it in the stream is still finishing; its first statement,
  `pdl_start(PDL)`, waits until that kernel has completed and its writes are visible, then lets the next kernel
  launch the same way. The gain is the launch latency and ramp-up of each kernel, overlapped with its
  predecessor's last wave. Since every such kernel waits before its first load or store, the stream's order
  holds exactly as without it. DGEMMA_PDL=0 turns it off.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

# Codes for the constexpr `MODE` arguments below.
MODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")
_PDL_CAPABLE: dict[int, bool] = {}


def pdl(device: torch.device) -> dict:
    """Launch arguments for a kernel that starts with `pdl_start(PDL)`: programmatic dependent launch on a CUDA
    device of compute capability 9 or more (unless DGEMMA_PDL=0), off elsewhere."""
    on = device.type == "cuda" and os.environ.get("DGEMMA_PDL", "1") != "0"
    if on:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _PDL_CAPABLE:
            _PDL_CAPABLE[index] = torch.cuda.get_device_capability(index)[0] >= 9
        on = _PDL_CAPABLE[index]
    return dict(PDL=on, launch_pdl=on)


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """The first statement of a kernel launched with `pdl(device)`: wait for the previous kernel in the stream, then
    allow the next one to launch early (see the module docstring). Nothing when PDL is off."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def round_to(x, MODE: tl.constexpr):
    """fp32 x rounded (nearest even) to fp32 (MODE 0, no-op), bf16 (1) or fp16 (2), returned as fp32."""
    if MODE == 1:  # round on the bits; NaN kept (the carry would turn it into ±0 or ±inf)
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
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


@triton.jit
def log2(x, FAST: tl.constexpr):
    """log2(x). FAST: MUFU lg2.approx, absolute error <= 2^-22 for x in [0.5, 2], 2 ulps elsewhere (the CUDA math
    guide's __log2f): fine where an absolute error is what counts, not for the small log of a value near 1."""
    if FAST and not INTERPRET:
        y = libdevice.fast_log2f(x)
    else:
        y = tl.log2(x)
    return y


@triton.jit
def rcp(x, FAST: tl.constexpr):
    """1 / x. FAST: MUFU rcp.approx (div.approx: about 1 ulp; 0 past |x| = 2^126, where 1 / x is subnormal)."""
    if FAST and not INTERPRET:
        y = libdevice.fast_dividef(1.0, x)
    else:
        y = 1.0 / x
    return y


@triton.jit
def gelu_tanh(x):
    """F.gelu(x, approximate="tanh") as torch computes it in fp32."""
    inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return 0.5 * x * (1.0 + tanh(inner))


def precision(dtype: torch.dtype) -> str | None:
    """tl.dot's input precision: IEEE fp32 products for fp32 models (Triton's default there is TF32, ~1e-3 relative
    error, which an fp32 user does not expect; torch's matmuls keep TF32 off by default), the default otherwise."""
    return "ieee" if dtype == torch.float32 else None

"""Fused projections for inference: one GEMM where the model runs several on the same input.

Each layer's attention runs q_proj, k_proj and v_proj on the same normed input (full layers: q_proj and k_proj), and
each dense MLP, like the self-conditioning block, runs gate_proj and up_proj on one input. At batch 1 these are small
GEMMs, each its own launch; stacked into one weight ([out_q + out_k + out_v, hidden], [2 * intermediate, hidden])
they read the same bytes in one launch, and the output splits into views.

Notable choices:
- The checkpoint layout is untouched (STYLE.md rule 4): each parameter keeps its module and name, only its `.data` is
  rebound to its row block of the stacked tensor. Memory is not doubled, and `state_dict()`, `named_parameters()`,
  the loader, `save_model`, optimizers and LoRA still see the same parameters with the same values.
- `fusion_groups` says what may be stacked; a module's forward asks `fused_weight` for the stacked tensor, which
  answers only while the stacking still holds: every parameter still registered under its name (a LoRA
  parametrization or a loader's reassignment removes it) and still that very view (`.to()` and LoRA's merge rebind
  `.data` elsewhere). Otherwise the forward runs the separate GEMMs, which are always right.
- Inference only: the stacked tensor is not a leaf of the parameters, so while a gradient is wanted the forward takes
  the separate GEMMs. Under torch.compile data pointers cannot be traced, so callers look the tensor up in eager code
  and pass it into the compiled function.
- The CUDA fast path stacks the weights before it captures any graph (engine/fast.py `fuse_for_cuda`); on the CPU
  nothing is stacked unless asked, so CPU results stay exactly those of the reference path.
"""

from __future__ import annotations

import torch
from torch import nn


class FusedRows:
    """Parameters stacked along dim 0 in one tensor, each parameter's `.data` rebound to its row block (a view)."""

    def __init__(self, slots: list[tuple[nn.Module, str]]):
        # The owners' parameter dicts, not the owners: an owner holds this object, so no reference cycle.
        self.slots = [(module._parameters, name) for module, name in slots]
        self.params = [module._parameters[name] for module, name in slots]
        self.tensor = torch.cat([p.detach() for p in self.params])  # [sum of rows, in] (or [sum of rows] for biases)
        start = 0
        for p in self.params:
            p.data = self.tensor[start:start + p.shape[0]]
            start += p.shape[0]
        self.views = [(p.data_ptr(), p.shape) for p in self.params]

    def valid(self) -> bool:
        """Every parameter is still registered and still its view of the stacked tensor (which this object keeps
        alive, so no other tensor can have that address)."""
        return all(params.get(name) is p and p.data_ptr() == ptr and p.shape == shape
                   for (params, name), p, (ptr, shape) in zip(self.slots, self.params, self.views))

    def get(self) -> torch.Tensor | None:
        if torch.compiler.is_compiling():
            return None  # data pointers cannot be traced: callers look the tensor up outside compiled code
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.params):
            return None  # gradients must reach the parameters, not a copy of their rows
        return self.tensor if self.valid() else None


def fused_weight(module: nn.Module, key: str) -> torch.Tensor | None:
    """The stacked tensor of `module`'s group `key` while it holds and no gradient is needed, else None."""
    group = module.fused.get(key)
    return group.get() if group is not None else None


def fusion_groups(module: nn.Module) -> dict[str, list[tuple[nn.Module, str]]]:
    """group name → (owner, parameter name) of the blocks to stack, in output order: an attention layer's q/k(/v)
    weights (full layers have no v_proj) and, with attention_bias, its decoder biases and the encoder's own biases;
    the gate/up weights of a gated MLP (each layer's dense MLP, the self-conditioning block)."""
    from dgemma.models.diffusion_gemma import MLP, Attention, SelfConditioning

    if isinstance(module, Attention):
        projs = [getattr(module, f"{name}_proj") for name in module.qkv_names]
        groups = {"qkv": [(proj, "weight") for proj in projs]}
        if module.q_proj.bias is not None:
            groups["qkv_bias"] = [(proj, "bias") for proj in projs]
            groups["encoder_qkv_bias"] = [(module, f"encoder_{name}_bias") for name in module.qkv_names]
        return groups
    if isinstance(module, (MLP, SelfConditioning)):
        return {"gate_up": [(module.gate_proj, "weight"), (module.up_proj, "weight")]}
    return {}


def fuse_projections(model: nn.Module) -> int:
    """Stack every group of `fusion_groups` in `model`. Call it once the real weights are in place (not on the meta
    device) and before capturing CUDA graphs (a capture records addresses). Idempotent: a group that still holds is
    left alone, one that was undone (`.to()`, a LoRA merge) is stacked again, one under a LoRA parametrization is
    dropped (the forward computes that weight). Returns the number of groups stacked by this call."""
    count = 0
    with torch.inference_mode(False), torch.no_grad():  # an inference tensor could not take part in training later
        for module in model.modules():
            for key, slots in fusion_groups(module).items():
                group = module.fused.pop(key, None)
                if group is not None and group.valid():
                    module.fused[key] = group
                    continue
                params = [owner._parameters.get(name) for owner, name in slots]
                if any(p is None for p in params):
                    continue  # parametrized (LoRA): nothing to stack
                if any(p.is_meta for p in params):
                    raise ValueError("fuse_projections: the weights are still on the meta device; fuse after loading")
                if len({(p.dtype, p.device) for p in params}) == 1:
                    module.fused[key] = FusedRows(slots)
                    count += 1
    return count

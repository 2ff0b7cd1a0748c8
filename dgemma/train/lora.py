"""LoRA: low-rank adapters on chosen weights, merge, and adapter files (safetensors + adapter_config.json).

W_eff = W + (alpha / rank) · B @ A, with A [r, in] random and B [out, r] zero at the start (so training starts at
the base model). Routed experts hold 3-D weights [E, out, in]; their adapters are per expert: A [E, r, in],
B [E, out, r].

Design choices:
- Adapters are `torch.nn.utils.parametrize` parametrizations of the weight tensors, not module swaps: the model
  reads `proj.weight` directly (F.linear, grouped GEMMs), and a parametrization keeps every forward unchanged.
- Targets are suffixes of module paths, e.g. `self_attn.q_proj`, `mlp.down_proj`, `experts` (both expert
  tensors). Default: attention and the dense MLP (REFERENCE.md §9), never the router.
- At inference an adapter is merged into the weights once (`load_adapter(..., merge=True)`), so the engine's
  fast paths see plain tensors. `dgemma merge-lora` writes the merged checkpoint in the official layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

DEFAULT_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
EXPERT_TARGETS = ("experts",)
ADAPTER_FILE, CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"


class LoRA(nn.Module):
    """The parametrization: weight [out, in] or [E, out, in] → weight + scale · B @ A."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        *lead, out_f, in_f = weight.shape
        self.scale = alpha / rank
        a = torch.randn(*lead, rank, in_f, generator=generator) / in_f**0.5
        self.lora_A = nn.Parameter(a.to(device=weight.device, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(*lead, out_f, rank, device=weight.device, dtype=weight.dtype))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * torch.matmul(self.lora_B, self.lora_A).to(weight.dtype)


def target_weights(model: nn.Module, targets) -> list[tuple[str, nn.Module, str]]:
    """(path, module, tensor name) of every weight an adapter goes on; raises if a target matches nothing."""
    found, used = [], set()
    for path, module in model.named_modules():
        for t in targets:
            if path == t or path.endswith("." + t):
                if t in EXPERT_TARGETS or path.endswith(".experts"):
                    found += [(f"{path}.{n}", module, n) for n in ("gate_up_proj", "down_proj")]
                elif isinstance(module, nn.Linear):
                    found.append((f"{path}.weight", module, "weight"))
                else:
                    continue
                used.add(t)
    missing = sorted(set(targets) - used)
    if missing:
        raise ValueError(f"LoRA targets {missing} match no module; examples: self_attn.q_proj, mlp.up_proj, experts")
    if any(".router" in p for p, _, _ in found):
        raise ValueError("LoRA on the router is not supported (it stays frozen)")
    return found


def apply(model: nn.Module, rank: int, alpha: float, targets=DEFAULT_TARGETS, seed: int = 0) -> list[str]:
    """Freeze the model and add trainable adapters; returns the adapted weight names."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    g = torch.Generator().manual_seed(seed)
    model.requires_grad_(False)
    names = []
    for name, module, tensor in target_weights(model, targets):
        parametrize.register_parametrization(module, tensor, LoRA(getattr(module, tensor), rank, alpha, g))
        names.append(name)
    model.lora_config = {"rank": rank, "alpha": alpha, "targets": list(targets)}
    return names


def adapters(model: nn.Module) -> dict[str, LoRA]:
    """weight name (model naming, e.g. layers.0.self_attn.q_proj.weight) → its LoRA parametrization."""
    out = {}
    for path, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for tensor, plist in module.parametrizations.items():
                for p in plist:
                    if isinstance(p, LoRA):
                        out[f"{path}.{tensor}"] = p
    return out


def merge(model: nn.Module) -> None:
    """Fold every adapter into its weight (W += scale · B @ A) and remove the parametrizations."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for tensor in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, tensor, leave_parametrized=True)
    model.requires_grad_(False)


def save_adapter(model: nn.Module, out: str | Path, base: str | None = None, dtype=torch.float32) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, p in adapters(model).items():
        tensors[f"{name}.lora_A"] = p.lora_A.detach().to("cpu", dtype).contiguous()
        tensors[f"{name}.lora_B"] = p.lora_B.detach().to("cpu", dtype).contiguous()
    save_file(tensors, str(out / ADAPTER_FILE), metadata={"format": "pt"})
    cfg = dict(getattr(model, "lora_config", {}), base_model=base, weights=sorted(adapters(model)))
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def load_adapter(model: nn.Module, path: str | Path, merge_now: bool = True) -> dict:
    """Add the adapter saved at `path` to the model (and merge it unless merge_now=False); returns its config."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / ADAPTER_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a LoRA adapter (needs {CONFIG_FILE} and {ADAPTER_FILE})")
    cfg = json.loads((path / CONFIG_FILE).read_text())
    tensors = load_file(str(path / ADAPTER_FILE))
    names = apply(model, int(cfg["rank"]), float(cfg["alpha"]), cfg["targets"])
    expected = {f"{n}.lora_{x}" for n in names for x in "AB"}
    if expected != set(tensors):
        missing, extra = sorted(expected - set(tensors))[:4], sorted(set(tensors) - expected)[:4]
        raise ValueError(f"{path}: adapter tensors do not match this model (missing {missing}, extra {extra})")
    with torch.no_grad():
        for name, p in adapters(model).items():
            for x in "AB":
                t = tensors[f"{name}.lora_{x}"]
                target = getattr(p, f"lora_{x}")
                if t.shape != target.shape:
                    raise ValueError(f"{path}: {name}.lora_{x} has shape {list(t.shape)}, the model expects "
                                     f"{list(target.shape)}")
                target.copy_(t)
    if merge_now:
        merge(model)
    return cfg

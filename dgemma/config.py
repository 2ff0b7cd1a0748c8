"""Model and sampler configuration.

`ModelArgs` mirrors the checkpoint's `config.json` (`text_config` plus the root keys the text path needs), using the
Hugging Face field names verbatim so a config reads the same here as on the hub. `from_dict` ignores unknown keys.

`DiffusionParams` holds every knob of the block-diffusion sampler, with the defaults of transformers 5.23.0's
`DiffusionGemmaGenerationConfig._get_default_generation_params`; a checkpoint's `generation_config.json` overrides
them, and a request's `SamplingParams` overrides those.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class LayerShape:
    """Attention shape of one layer (sliding and full layers differ)."""

    sliding: bool
    head_dim: int
    num_kv_heads: int
    rope_theta: float
    rotary_dim: int  # number of dims that rotate (partial RoPE rotates a fraction)


@dataclass
class ModelArgs:
    # --- text_config (HF names) ---
    vocab_size: int = 262144
    hidden_size: int = 2816
    intermediate_size: int = 2112
    moe_intermediate_size: int = 704
    num_experts: int = 128
    top_k_experts: int = 8
    num_hidden_layers: int = 30
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 256
    num_global_key_value_heads: int | None = None  # None: full layers use num_key_value_heads (as upstream)
    global_head_dim: int = 512
    sliding_window: int = 1024
    max_position_embeddings: int = 262144
    rms_norm_eps: float = 1e-6
    hidden_activation: str = "gelu_pytorch_tanh"
    final_logit_softcapping: float | None = 30.0
    attention_bias: bool = False
    use_bidirectional_attention: str | None = "vision"
    bos_token_id: int = 2
    eos_token_id: int | list[int] = 1
    pad_token_id: int = 0
    layer_types: list[str] = field(default_factory=list)
    rope_parameters: dict[str, dict[str, Any]] = field(default_factory=dict)
    # --- root config ---
    canvas_length: int = 256
    image_token_id: int = 258880
    boi_token_id: int = 255999
    eoi_token_id: int = 258882
    root_eos_token_id: list[int] = field(default_factory=list)
    has_vision: bool = False

    def __post_init__(self) -> None:
        if not self.layer_types:
            # transformers' default pattern: 5 sliding layers then one full layer.
            self.layer_types = [
                "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(self.num_hidden_layers)
            ]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"config.json: layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}"
            )
        if self.layer_types[-1] != "full_attention":
            # transformers forces the last layer to full attention; do the same so the weights line up.
            self.layer_types = [*self.layer_types[:-1], "full_attention"]
        bad = sorted({t for t in self.layer_types} - {"sliding_attention", "full_attention"})
        if bad:
            raise ValueError(f"config.json: unknown layer_types {bad}; expected sliding_attention/full_attention")
        if not self.rope_parameters:
            self.rope_parameters = {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
            }
        if self.num_global_key_value_heads is None:
            self.num_global_key_value_heads = self.num_key_value_heads
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu"):
            raise ValueError(f"config.json: hidden_activation {self.hidden_activation!r} is not supported")
        if self.use_bidirectional_attention == "all":
            raise ValueError("config.json: use_bidirectional_attention='all' (bidirectional encoder) is not supported")

    @property
    def embed_scale(self) -> float:
        return self.hidden_size**0.5

    def layer_shape(self, layer_idx: int) -> LayerShape:
        kind = self.layer_types[layer_idx]
        rope = self.rope_parameters[kind]
        if kind == "sliding_attention":
            head_dim, kv_heads = self.head_dim, self.num_key_value_heads
        else:
            head_dim, kv_heads = self.global_head_dim, self.num_global_key_value_heads
        rotary = int(head_dim * float(rope.get("partial_rotary_factor", 1.0)))
        rotary -= rotary % 2
        return LayerShape(kind == "sliding_attention", head_dim, kv_heads, float(rope["rope_theta"]), rotary)

    @property
    def eos_ids(self) -> list[int]:
        ids = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        return sorted(set(ids) | set(self.root_eos_token_id))

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelArgs:
        """Build from a full `config.json` dict (root with `text_config`) or a bare text config."""
        text = dict(cfg.get("text_config", cfg))
        # transformers' save_pretrained writes the global-layer overrides as `per_layer_config` instead of the
        # `num_global_key_value_heads` / `global_head_dim` keys of the released config.json; accept both.
        for override in (text.get("per_layer_config") or {}).values():
            if "head_dim" in override:
                text.setdefault("global_head_dim", override["head_dim"])
            if "num_key_value_heads" in override:
                text.setdefault("num_global_key_value_heads", override["num_key_value_heads"])
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in text.items() if k in names}
        for key in ("canvas_length", "image_token_id", "boi_token_id", "eoi_token_id"):
            if key in cfg and cfg is not text:
                kwargs[key] = cfg[key]
        root_eos = cfg.get("eos_token_id") if "text_config" in cfg else None
        if root_eos is not None:
            kwargs["root_eos_token_id"] = root_eos if isinstance(root_eos, list) else [root_eos]
        kwargs["has_vision"] = bool(cfg.get("vision_config"))
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelArgs:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config.json is missing; a DiffusionGemma checkpoint needs one")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: config.json is not valid JSON ({e})") from e
        if not isinstance(cfg, dict):
            raise ValueError(f"{path}: config.json must hold a JSON object")
        model_type = cfg.get("model_type")
        if model_type not in (None, "diffusion_gemma", "diffusion_gemma_text"):
            raise ValueError(f"{path}: model_type is {model_type!r}; dgemma loads 'diffusion_gemma' checkpoints")
        try:
            return cls.from_dict(cfg)
        except TypeError as e:
            raise ValueError(f"{path}: config.json has a field of the wrong type ({e})") from e


@dataclass(frozen=True)
class DiffusionParams:
    """Every knob of block-diffusion sampling. Defaults: transformers 5.23.0 / generation_config.json."""

    max_new_tokens: int = 256  # generated tokens at most, >= 1; outputs are cut to it
    max_denoising_steps: int = 48  # denoising steps per canvas at most, >= 1
    entropy_bound: float = 0.1  # accept the lowest-entropy tokens while sum(H) - max(H) <= bound, > 0
    t_min: float = 0.4  # temperature at the last step, >= 0
    t_max: float = 0.8  # temperature at the first step, > t_min
    stability_threshold: int = 1  # steps the argmax canvas must stay unchanged to stop early, >= 0
    confidence_threshold: float = 0.005  # stop early when mean token entropy is below this, > 0
    eos_token_ids: tuple[int, ...] = (1,)  # any of these ends a sequence
    pad_token_id: int = 0  # written after EOS inside a committed canvas
    seed: int | None = None  # torch.manual_seed before generation; None leaves the RNG as it is

    def validate(self) -> DiffusionParams:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"{name} must be {rule} (got {getattr(self, name)!r})")

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "an integer >= 1")
        if not isinstance(self.max_denoising_steps, int) or self.max_denoising_steps < 1:
            raise bad("max_denoising_steps", "an integer >= 1")
        if not _is_number(self.entropy_bound) or self.entropy_bound <= 0:
            raise bad("entropy_bound", "a number > 0")
        if not _is_number(self.t_min) or self.t_min < 0:
            raise bad("t_min", "a number >= 0")
        if not _is_number(self.t_max) or self.t_max <= self.t_min:
            raise bad("t_max", f"a number > t_min ({self.t_min})")
        if not isinstance(self.stability_threshold, int) or self.stability_threshold < 0:
            raise bad("stability_threshold", "an integer >= 0")
        if not _is_number(self.confidence_threshold) or self.confidence_threshold <= 0:
            raise bad("confidence_threshold", "a number > 0")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "an integer or None")
        return self

    @classmethod
    def from_generation_config(cls, path: str | Path, model_eos: list[int]) -> DiffusionParams:
        """Defaults overridden by a checkpoint's generation_config.json (missing file → defaults)."""
        path = Path(path)
        cfg: dict[str, Any] = {}
        if path.is_file():
            try:
                cfg = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: generation_config.json is not valid JSON ({e})") from e
        kw: dict[str, Any] = {}
        for name in ("max_new_tokens", "max_denoising_steps", "t_min", "t_max", "stability_threshold",
                     "confidence_threshold", "pad_token_id"):
            if cfg.get(name) is not None:
                kw[name] = cfg[name]
        sampler = cfg.get("sampler_config") or {}
        if isinstance(sampler, dict) and sampler.get("entropy_bound") is not None:
            kw["entropy_bound"] = sampler["entropy_bound"]
        gen_eos = cfg.get("eos_token_id")
        gen_eos = [] if gen_eos is None else gen_eos if isinstance(gen_eos, list) else [gen_eos]
        # EOS is the union of the model config's and the generation config's ids (REFERENCE.md §3).
        kw["eos_token_ids"] = tuple(sorted(set(model_eos) | set(gen_eos)))
        return cls(**kw).validate()


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)

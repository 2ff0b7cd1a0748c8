"""Checkpoint directory or Hugging Face model id → a ready `DiffusionGemma`.

* Resolution: a local directory is used as is; anything else is a hub id resolved through the huggingface_hub
  cache (offline first, then a download if the network allows; a clear error naming the id and the cache when not).
* Weights: safetensors only (sharded with `model.safetensors.index.json`, or one `model.safetensors`), memory-mapped.
  The model is built on the meta device and every parameter is assigned straight from the mmap'd file, cast and
  moved one tensor at a time (on CUDA, safetensors reads directly to the GPU), so host RAM stays near one tensor.
* Strict: every model parameter and buffer must come from the checkpoint and every checkpoint tensor must be used
  or explicitly skipped (vision tower: recognised, not loaded; encoder copies of tied weights), else an error
  lists the names. Shapes are checked against the config; a truncated or corrupt shard names the file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open

from dgemma.config import DiffusionParams, ModelArgs
from dgemma.models.diffusion_gemma import DiffusionGemma

DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default"
HF_MODEL_ID = "google/diffusiongemma-26B-A4B-it"

# checkpoint name → model name. Order matters: first match wins. `None` = recognised and deliberately not loaded.
NAME_RULES: list[tuple[re.Pattern, str | None]] = [
    (re.compile(r"^model\.decoder\.(.+)$"), r"\1"),
    (re.compile(r"^model\.encoder\.language_model\.layers\.(\d+)\.layer_scalar$"), r"layers.\1.encoder_layer_scalar"),
    (re.compile(r"^model\.encoder\.language_model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.bias$"),
     r"layers.\1.self_attn.encoder_\2_bias"),  # attention biases are not tied upstream
    # Encoder text weights are tied to the decoder's; a checkpoint that stores them anyway holds copies.
    (re.compile(r"^model\.encoder\.language_model\..+$"), None),
    (re.compile(r"^lm_head\.weight$"), None),  # tied to embed_tokens
    (re.compile(r"^model\.encoder\.(vision_tower|embed_vision)\..+$"), None),  # image input: not supported yet
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the tensor."""


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """A local checkpoint directory, or a hub id looked up in (or downloaded into) the huggingface_hub cache."""
    if model is None:
        return DEFAULT_MODEL_DIR
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: expected a checkpoint directory (config.json + *.safetensors)")
        return path
    if str(model).startswith((".", "/", "~")) or str(model).count("/") != 1:
        raise CheckpointError(f"{model}: no such directory, and not a hub id of the form 'owner/name'")
    return _from_hub(str(model))


def _from_hub(model_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja"]
    try:
        return Path(snapshot_download(model_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    if constants.HF_HUB_OFFLINE:
        raise CheckpointError(f"{model_id}: not in the huggingface_hub cache ({constants.HF_HUB_CACHE}) and "
                              "HF_HUB_OFFLINE is set; download it first or pass a local directory")
    try:
        return Path(snapshot_download(model_id, allow_patterns=patterns))
    except Exception as e:
        raise CheckpointError(f"{model_id}: could not download it into {constants.HF_HUB_CACHE} ({type(e).__name__}: "
                              f"{e}); check the network or pass a local checkpoint directory") from e


def map_name(ckpt_name: str) -> str | None:
    for pattern, target in NAME_RULES:
        if pattern.match(ckpt_name):
            return None if target is None else pattern.sub(target, ckpt_name)
    raise CheckpointError(f"unexpected tensor {ckpt_name!r}: not part of a DiffusionGemma checkpoint")


def weight_files(path: Path) -> dict[str, Path]:
    """Tensor name → shard file, from the index (sharded) or from the single model.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed index file ({e})") from e
        files = {name: path / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise CheckpointError(f"{shard}: shard listed in {index.name} is missing")
        return files
    single = path / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors "
                              "checkpoints are loaded)")
    _check_shard_size(single)
    with _open(single, "cpu") as f:
        return {name: single for name in f.keys()}


def _open(file: Path, device: str):
    try:
        return safe_open(str(file), framework="pt", device=device)
    except Exception as e:
        raise CheckpointError(f"{file}: cannot read safetensors file, truncated or corrupt? ({e})") from e


def _check_shard_size(file: Path) -> None:
    """safetensors validates offsets lazily; check the header against the file size up front."""
    size = file.stat().st_size
    with open(file, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{file}: truncated safetensors file ({size} bytes)")
        n = int.from_bytes(raw, "little")
        if n > size - 8:
            raise CheckpointError(f"{file}: truncated safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file}: corrupt safetensors header ({e})") from e
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{file}: truncated safetensors file: tensors need {8 + n + end} bytes, the file has "
                              f"{size}; re-download it")


def load_model(path: Path, device: torch.device | str, dtype: torch.dtype) -> DiffusionGemma:
    args = ModelArgs.from_file(path / "config.json")
    for quant_file in ("hf_quant_config.json",):
        if (path / quant_file).exists():
            raise CheckpointError(f"{path / quant_file}: quantized checkpoints are not supported yet; use the bf16 "
                                  "release")
    files = weight_files(path)
    with torch.device("meta"):
        model = DiffusionGemma(args)
    expected = dict(model.named_parameters()) | dict(model.named_buffers())
    expected = {k: v for k, v in expected.items() if not k.endswith(("_inv_freq", "embed_scale"))}
    missing = set(expected)
    skipped, unexpected = [], []
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    dev = str(torch.device(device))
    for file, names in sorted(by_file.items()):
        _check_shard_size(file)
        with _open(file, dev if dev.startswith("cuda") else "cpu") as f:
            present = set(f.keys())
            for ckpt_name in names:
                if ckpt_name not in present:
                    raise CheckpointError(f"{file}: tensor {ckpt_name!r} is listed in the index but not in the file")
                try:
                    target = map_name(ckpt_name)
                except CheckpointError:
                    unexpected.append(ckpt_name)
                    continue
                if target is None:
                    skipped.append(ckpt_name)
                    continue
                if target not in expected:
                    unexpected.append(ckpt_name)
                    continue
                _assign(model, target, f.get_slice(ckpt_name), expected[target], file, ckpt_name, device, dtype)
                missing.discard(target)
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensors for this config: {sorted(unexpected)[:20]}"
                              f"{' ...' if len(unexpected) > 20 else ''}")
    if missing:
        names = sorted(missing)
        raise CheckpointError(f"{path}: missing tensors (model names): {names[:20]}{' ...' if len(names) > 20 else ''}")
    model.init_buffers(torch.device(device))
    model.eval().requires_grad_(False)
    return model


def _assign(model, target: str, tensor_slice, meta, file: Path, ckpt_name: str, device, dtype) -> None:
    shape = tuple(tensor_slice.get_shape())
    if shape != tuple(meta.shape):
        raise CheckpointError(f"{file}: tensor {ckpt_name!r} has shape {list(shape)}, the config expects "
                              f"{list(meta.shape)}")
    tensor = tensor_slice[:]
    # Buffers (layer scalars) and norms are tiny; keep every tensor in the compute dtype like the reference.
    tensor = tensor.to(device=device, dtype=dtype)
    module_name, _, attr = target.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[attr] = tensor


def load(model: str | os.PathLike | None, device: torch.device | str, dtype: torch.dtype):
    """(model, default DiffusionParams from generation_config.json, checkpoint path)."""
    path = resolve_model_path(model)
    net = load_model(path, device, dtype)
    params = DiffusionParams.from_generation_config(path / "generation_config.json", net.args.eos_ids)
    return net, params, path


def checkpoint_name(model_name: str) -> str:
    """Model name → official checkpoint name (the inverse of `map_name`)."""
    m = re.match(r"^layers\.(\d+)\.encoder_layer_scalar$", model_name)
    if m:
        return f"model.encoder.language_model.layers.{m.group(1)}.layer_scalar"
    m = re.match(r"^layers\.(\d+)\.self_attn\.encoder_([qkvo])_bias$", model_name)
    if m:
        return f"model.encoder.language_model.layers.{m.group(1)}.self_attn.{m.group(2)}_proj.bias"
    return f"model.decoder.{model_name}"


def official_config(args: ModelArgs) -> dict:
    """config.json in the released layout (root + text_config)."""
    text = {
        "model_type": "diffusion_gemma_text", "vocab_size": args.vocab_size, "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size, "moe_intermediate_size": args.moe_intermediate_size,
        "num_experts": args.num_experts, "top_k_experts": args.top_k_experts,
        "num_hidden_layers": args.num_hidden_layers, "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_key_value_heads, "head_dim": args.head_dim,
        "num_global_key_value_heads": args.num_global_key_value_heads, "global_head_dim": args.global_head_dim,
        "sliding_window": args.sliding_window, "max_position_embeddings": args.max_position_embeddings,
        "rms_norm_eps": args.rms_norm_eps, "hidden_activation": args.hidden_activation,
        "final_logit_softcapping": args.final_logit_softcapping, "attention_bias": args.attention_bias,
        "use_bidirectional_attention": args.use_bidirectional_attention, "bos_token_id": args.bos_token_id,
        "eos_token_id": args.eos_token_id, "pad_token_id": args.pad_token_id, "layer_types": args.layer_types,
        "rope_parameters": args.rope_parameters, "tie_word_embeddings": True,
    }
    return {
        "architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": "diffusion_gemma",
        "canvas_length": args.canvas_length, "boi_token_id": args.boi_token_id, "eoi_token_id": args.eoi_token_id,
        "image_token_id": args.image_token_id, "eos_token_id": args.eos_ids, "tie_word_embeddings": True,
        "text_config": text,
    }


def save_model(model: DiffusionGemma, path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
               metadata: dict | None = None) -> None:
    """Write config.json + model.safetensors in the official layout (decoder weights, encoder layer scalars)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    skip = ("_inv_freq", "embed_scale")
    tensors = {checkpoint_name(k): v.detach().to("cpu", dtype).contiguous()
               for k, v in (dict(model.named_parameters()) | dict(model.named_buffers())).items()
               if not k.endswith(skip)}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt", **(metadata or {})})
    (path / "config.json").write_text(json.dumps(official_config(model.args), indent=2) + "\n")

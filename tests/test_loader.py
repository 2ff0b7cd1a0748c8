"""Loader strictness: every failure names the file and the tensor."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dgemma.config import ModelArgs
from dgemma.loader import CheckpointError, load, resolve_model_path


@pytest.fixture()
def ckpt(tiny_ckpt, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt("a"), dst)
    return dst


def rewrite(path, change):
    file = path / "model.safetensors"
    with safe_open(str(file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_loads_and_recognises_vision_tower(ckpt):
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert any(k.startswith("model.encoder.vision_tower.") for k in f.keys())
    model, params, _ = load(ckpt, "cpu", torch.float32)
    assert params.eos_token_ids == (1, 50, 106)  # union of config.json [1, 106] and generation_config [1, 106, 50]
    scal = [float(layer.layer_scalar) for layer in model.layers]
    enc = [float(layer.encoder_layer_scalar) for layer in model.layers]
    assert scal != enc  # both copies of the layer scalar are loaded


def test_missing_tensor(ckpt):
    rewrite(ckpt, lambda t: t.pop("model.decoder.layers.1.self_attn.q_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors.*layers\.1\.self_attn\.q_proj\.weight"):
        load(ckpt, "cpu", torch.float32)


def test_missing_encoder_layer_scalar(ckpt):
    rewrite(ckpt, lambda t: t.pop("model.encoder.language_model.layers.0.layer_scalar"))
    with pytest.raises(CheckpointError, match=r"layers\.0\.encoder_layer_scalar"):
        load(ckpt, "cpu", torch.float32)


def test_unexpected_tensor(ckpt):
    rewrite(ckpt, lambda t: t.__setitem__("model.decoder.layers.0.bogus.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensors.*layers\.0\.bogus\.weight"):
        load(ckpt, "cpu", torch.float32)


def test_foreign_tensor(ckpt):
    rewrite(ckpt, lambda t: t.__setitem__("transformer.h.0.attn.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"transformer\.h\.0\.attn\.weight"):
        load(ckpt, "cpu", torch.float32)


def test_misshaped_tensor(ckpt):
    name = "model.decoder.layers.2.self_attn.k_proj.weight"
    rewrite(ckpt, lambda t: t.__setitem__(name, torch.zeros(3, 5)))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*k_proj\.weight.*\[3, 5\].*expects \[32, 64\]"):
        load(ckpt, "cpu", torch.float32)


def test_truncated_shard(ckpt):
    file = ckpt / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        load(ckpt, "cpu", torch.float32)


def test_sharded_checkpoint_and_missing_shard(ckpt):
    file = ckpt / "model.safetensors"
    with safe_open(str(file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(ckpt / shard), metadata={"format": "pt"})
    file.unlink()
    index = {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    model, _, _ = load(ckpt, "cpu", torch.float32)
    assert model.args.num_hidden_layers == 3
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: shard listed .* missing"):
        load(ckpt, "cpu", torch.float32)


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing"):
        load(ckpt, "cpu", torch.float32)


def test_malformed_config(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        load(ckpt, "cpu", torch.float32)
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"model_type is 'llama'"):
        load(ckpt, "cpu", torch.float32)


def test_no_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        load(ckpt, "cpu", torch.float32)


def test_bad_paths(tmp_path):
    with pytest.raises(CheckpointError, match=r"no such directory"):
        resolve_model_path(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"expected a checkpoint directory"):
        (tmp_path / "f").write_text("x")
        resolve_model_path(tmp_path / "f")


def test_offline_hub_id_names_cache(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match=r"google/nonexistent-model: not in the huggingface_hub cache"):
        resolve_model_path("google/nonexistent-model")


def test_config_accepts_released_and_saved_layouts():
    released = {"text_config": {"num_global_key_value_heads": 2, "global_head_dim": 512, "num_hidden_layers": 6},
                "eos_token_id": [1, 106], "canvas_length": 256}
    saved = {"text_config": {"per_layer_config": {"5": {"head_dim": 512, "num_key_value_heads": 2}},
                             "num_hidden_layers": 6}}
    a, b = ModelArgs.from_dict(released), ModelArgs.from_dict(saved)
    assert a.layer_shape(5).head_dim == b.layer_shape(5).head_dim == 512
    assert a.layer_shape(5).num_kv_heads == b.layer_shape(5).num_kv_heads == 2
    assert a.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    assert a.layer_shape(5).rotary_dim == 128  # proportional RoPE rotates a quarter of head_dim 512

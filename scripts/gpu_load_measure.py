"""Measure loading a full-size DiffusionGemma-26B-A4B checkpoint onto a GPU: wall time and peak host RAM.

    python scripts/gpu_load_measure.py write DIR     # synthetic bf16 checkpoint in the official layout, 11 shards
    python scripts/gpu_load_measure.py load DIR      # fresh process: LLM(DIR, device="cuda"), prints JSON

The synthetic checkpoint has the released file layout (config.json, generation_config.json,
model.safetensors.index.json, model-000NN-of-00011.safetensors, every tensor BF16, decoder text weights, encoder
layer scalars, plus a stand-in vision tensor the loader must recognise and skip) with random values.
Peak host RAM is the process's VmHWM (peak resident set, which counts the mmap'd file pages being read) and the
peak of RssAnon (anonymous memory) sampled every 20 ms.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from dgemma.config import ModelArgs
from dgemma.loader import checkpoint_name, official_config
from dgemma.models.diffusion_gemma import DiffusionGemma

SHARDS = 11


def full_args() -> ModelArgs:
    sys.path.insert(0, str(Path(__file__).parent))
    from gpu_realshape_check import TEXT

    return ModelArgs.from_dict({"text_config": TEXT, "canvas_length": 256, "eos_token_id": [1, 106]})


def write(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    args = full_args()
    with torch.device("meta"):
        model = DiffusionGemma(args)
    named = {checkpoint_name(k): tuple(v.shape) for k, v in (dict(model.named_parameters()) |
                                                               dict(model.named_buffers())).items()
             if not k.endswith(("_inv_freq", "embed_scale"))}
    named["model.encoder.vision_tower.patch_embedder.input_proj.weight"] = (1152, 768)
    total = sum(torch.Size(s).numel() * 2 for s in named.values())
    per_shard, shard, size, weight_map, batch = total / SHARDS, 1, 0, {}, {}
    g = torch.Generator("cuda").manual_seed(0)
    t0 = time.perf_counter()
    for name, shape in sorted(named.items()):
        batch[name] = (torch.randn(shape, device="cuda", generator=g) * 0.02).to(torch.bfloat16).cpu()
        size += batch[name].numel() * 2
        if size >= per_shard * shard and shard < SHARDS:
            _flush(out, shard, batch, weight_map)
            shard += 1
    _flush(out, shard, batch, weight_map)
    assert shard == SHARDS, shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(official_config(args), indent=2))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 106, 50], "pad_token_id": 0}))
    print(json.dumps({"written_gb": total / 1e9, "tensors": len(named), "write_s": time.perf_counter() - t0}))


def _flush(out: Path, shard: int, batch: dict, weight_map: dict) -> None:
    fname = f"model-{shard:05d}-of-{SHARDS:05d}.safetensors"
    save_file(batch, str(out / fname), metadata={"format": "pt"})
    weight_map.update({k: fname for k in batch})
    batch.clear()


def _status() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(val.split()[0]) * 1024
    return fields


def load(path: Path) -> None:
    peak_anon, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak_anon[0] = max(peak_anon[0], _status().get("RssAnon", 0))
            time.sleep(0.02)

    torch.cuda.init()
    torch.zeros(1, device="cuda")
    before = _status()
    threading.Thread(target=sample, daemon=True).start()
    from dgemma import LLM

    t0 = time.perf_counter()
    llm = LLM(str(path), device="cuda")
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    stop.set()
    after = _status()
    from dgemma.engine.cache import KVCache

    with torch.inference_mode():  # prove the loaded model runs: one encoder pass and one decoder step
        kv = KVCache(llm.args, 1, 64 + 256, "cuda", llm.dtype)
        llm.model.encode(torch.arange(2, 66, device="cuda")[None], torch.arange(64, device="cuda")[None], kv)
        kv.advance(64)
        logits = llm.model.denoise(torch.arange(256, device="cuda")[None], torch.arange(64, 320, device="cuda")[None],
                                   kv)
    print(json.dumps({
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "load_s": load_s,
        "checkpoint_gb": sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e9,
        "peak_rss_gb_vmhwm": after["VmHWM"] / 1e9, "rss_before_load_gb": before["VmRSS"] / 1e9,
        "peak_rss_anon_gb": peak_anon[0] / 1e9, "rss_after_load_gb": after["VmRSS"] / 1e9,
        "gpu_allocated_gb": torch.cuda.memory_allocated() / 1e9, "logits_finite": bool(logits.isfinite().all()),
        "dtype": str(llm.dtype),
    }))


if __name__ == "__main__":
    {"write": write, "load": load}[sys.argv[1]](Path(sys.argv[2]))

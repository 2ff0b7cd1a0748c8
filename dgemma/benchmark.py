"""Measurements behind `dgemma bench`: random-weight models at the real shape, per-phase timings, the HBM floor.

What it measures, per (precision, batch, prompt length, steps):
- `ttft_ms`: the prefill (encoder over the prompt), i.e. time to the first canvas' first step;
- `ms_per_step`: one denoising step (decoder pass + sampling) of the fast path (CUDA graph) or the reference path;
- `ms_first_step` (fast path): a canvas's first step with the previous canvas's commit pass folded in (one forward
  over both canvases, as `generate` runs it); None on the reference path, which has no fold;
- `ms_per_commit`: what committing a canvas adds per canvas: on the fast path the fold's marginal cost
  (`ms_first_step - ms_per_step`), on the reference path the separate encoder pass;
- `ms_commit_pass`: the separate encoder pass over one committed canvas (`commit`, what the fold replaces);
- `floor_ms_per_step`: bytes a step must read (every text weight: 256 tokens × top-k touch all experts; the
  embedding twice, as LM head and as self-conditioning table) / copy bandwidth measured in the same run;
- `roofline_ms_per_step`: each GEMM and attention of the step (`step_work`) at the better of its two limits, its
  bytes at the copy bandwidth or its FLOPs at the dense GEMM rate measured in the same run (`matmul_tflops`),
  summed: at batch 1 most parts are bandwidth-bound and this is close to the floor; from batch ~4 the
  projections and vocabulary GEMMs are compute-bound and this is the better lower bound;
- tokens/s = batch × canvas / per-canvas time, with and without the prefill (one canvas per request); per canvas:
  (steps - 1) × step + first step on the fast path, steps × step + commit pass on the reference path;
- `transformers_ms_per_step` (optional): transformers 5.23.0 on the same weights (aliased, not copied), same prompt
  and steps, in the same process: its fastest path, `generate` with a static cache and torch.compile (per step =
  the difference between runs of 2N and N steps, so prefill and set-up cancel out), and its eager step.
Timings use CUDA events around many repetitions after warm-up. The adaptive stop is off (fixed steps).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dgemma.config import DiffusionParams, ModelArgs
from dgemma.engine.cache import KVCache
from dgemma.engine.fast import StaticStepper, capture_graph, fuse_for_cuda
from dgemma.engine.generate import ReferenceStepper
from dgemma.models.diffusion_gemma import DiffusionGemma

SHAPES = {
    "26b-a4b": dict(vocab_size=262144, hidden_size=2816, intermediate_size=2112, moe_intermediate_size=704,
                    num_experts=128, top_k_experts=8, num_hidden_layers=30, num_attention_heads=16,
                    num_key_value_heads=8, head_dim=256, num_global_key_value_heads=2, global_head_dim=512,
                    sliding_window=1024, eos_token_id=[1, 106], canvas_length=256),
    "tiny": dict(vocab_size=2048, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_experts=8,
                 top_k_experts=2, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 num_global_key_value_heads=1, global_head_dim=64, sliding_window=128, canvas_length=256),
}


def random_model(shape: str, device: str, dtype: torch.dtype, seed: int = 0) -> DiffusionGemma:
    """A model at a named shape with random weights made directly on `device` (no checkpoint, no host copy)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {sorted(SHAPES)}")
    args = ModelArgs(**SHAPES[shape])
    with torch.device("meta"):
        model = DiffusionGemma(args)
    check_room(model, shape, device, dtype)
    g = torch.Generator(device).manual_seed(seed)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith(("_inv_freq", "embed_scale")):
            continue
        if t.dim() < 2:  # norms, scales, layer scalars: near one
            value = 1.0 + 0.1 * torch.randn(t.shape, device=device, generator=g)
        else:
            value = torch.randn(t.shape, device=device, generator=g) * t.shape[-1] ** -0.5
        mod_name, _, attr = name.rpartition(".")
        module = model.get_submodule(mod_name)
        if attr in module._parameters:
            module._parameters[attr] = torch.nn.Parameter(value.to(dtype), requires_grad=False)
        else:
            module._buffers[attr] = value.to(dtype)
    model.init_buffers(torch.device(device))
    return model.eval()


def step_bytes(model: DiffusionGemma) -> int:
    """Bytes one denoising step must read from memory at least: all weights, the embedding table twice."""
    w = model.embed_tokens.weight
    return sum(p.numel() * p.element_size() for p in model.parameters()) + w.numel() * w.element_size()


def check_room(model: DiffusionGemma, shape: str, device: str, dtype: torch.dtype) -> None:
    """Raise a ValueError naming the sizes when `device` has no room for the random weights (plus the largest fp32
    tensor drawn before its cast), instead of an out-of-memory crash partway (or, on the CPU, the OOM killer)."""
    size = torch.empty(0, dtype=dtype).element_size()
    params = list(model.parameters())
    need = sum(p.numel() for p in params) * size + max(p.numel() for p in params) * 4
    free = free_memory(device)
    if free is not None and need > free:
        raise ValueError(f"random {shape} weights need {need / 1e9:.1f} GB in {str(dtype).removeprefix('torch.')} "
                         f"on {device}, which has {free / 1e9:.1f} GB free: use a device with more memory, "
                         f"--shape tiny, or free some memory")


def free_memory(device: str) -> int | None:
    """Free bytes on a CUDA device, or the host's available memory for the CPU (Linux); None if unknown."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def step_work(model: DiffusionGemma, batch: int, prompt_len: int) -> list[tuple[str, float, float]]:
    """(part, bytes read, FLOPs) of one denoising step over `batch` canvases after `prompt_len` cached tokens: every
    weight GEMM (each nn.Linear; the routed experts as one part per layer, all experts read, each token's k run;
    the vocabulary GEMMs: self-conditioning table and LM head), and each layer's attention over the cache and the
    canvas (K/V read, QK and PV FLOPs; sliding layers see at most the window). Norms, the sampler and other glue
    are left out: the parts every implementation must run."""
    args, C = model.args, model.args.canvas_length
    T, size = batch * C, model.embed_tokens.weight.element_size()
    V, H = model.embed_tokens.weight.shape
    parts = [("vocab: self-conditioning table", V * H * size, 2 * T * V * H),
             ("vocab: LM head", V * H * size, 2 * T * V * H)]
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            n = mod.weight.numel()
            parts.append((name, n * size, 2 * T * n))
    for i, layer in enumerate(model.layers):
        gu, dn = layer.experts.gate_up_proj, layer.experts.down_proj
        per_expert = gu[0].numel() + dn[0].numel()
        parts.append((f"layers.{i}.experts", (gu.numel() + dn.numel()) * size, 2 * T * args.top_k_experts * per_expert))
        attn = layer.self_attn
        keys = (min(prompt_len, attn.window) if attn.sliding else prompt_len) + C
        kv_tensors = 2 if attn.sliding else 1  # full layers use k as v
        parts.append((f"layers.{i}.attention", batch * keys * attn.n_kv * attn.head_dim * kv_tensors * size,
                      4 * T * attn.n_heads * attn.head_dim * keys))
    return parts


def roofline_ms(parts: list[tuple[str, float, float]], bandwidth: float, flops: float) -> float:
    """Σ over parts of max(bytes / bandwidth, FLOPs / flops) in ms: each part at the better of its two limits, no
    overlap between parts (a lower bound for an implementation that runs them one after another)."""
    return sum(max(b / bandwidth, f / flops) for _, b, f in parts) * 1e3


def matmul_flops(device: str, dtype: torch.dtype) -> float:
    """Dense GEMM throughput in FLOP/s measured with torch.matmul (cuBLAS on CUDA) at 8192³ (1024³ on CPU)."""
    n = 8192 if device.startswith("cuda") else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    ms = time_ms(lambda: a @ b, device, reps=10 if device.startswith("cuda") else 2)
    return 2 * n**3 / (ms / 1e3)


def copy_bandwidth(device: str, gib: float = 2.0) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    n = int(gib * 2**30) // 4
    a, b = torch.empty(n, device=device), torch.empty(n, device=device)
    ms = time_ms(lambda: b.copy_(a), device, reps=20)
    return 2 * n * 4 / (ms / 1e3)


def time_ms(fn, device: str, reps: int = 10, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) * 1e3 / reps


def graph_ms(fn, iters: int = 20) -> float:
    """Milliseconds per call of fn() replayed from a CUDA graph, as the engine runs a step (`capture_graph` warms fn up
    first, so compiles and autotuning stay out of the timing)."""
    graph = capture_graph(fn)
    graph.replay()
    return time_ms(graph.replay, "cuda", reps=iters, warmup=0)


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    """a, b [..., N] (logits, hidden states) compared in float64: cosine of the whole, the worst row's cosine, argmax
    agreement and the largest difference."""
    a, b = a.double().flatten(0, -2), b.double().flatten(0, -2)
    return {"cosine": F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item(),
            "min_row_cosine": F.cosine_similarity(a, b, dim=-1).min().item(),
            "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
            "max_abs_diff": (a - b).abs().max().item()}


@dataclasses.dataclass
class Config:
    batch: int
    prompt_len: int
    steps: int
    fast: bool = True


def measure(model: DiffusionGemma, cfg: Config, device: str, reps: int = 10) -> dict:
    """Prefill, step and commit timings for one configuration (fixed steps: the adaptive stop cannot fire)."""
    args, C = model.args, model.args.canvas_length
    B, L = cfg.batch, cfg.prompt_len
    params = DiffusionParams(max_denoising_steps=cfg.steps, confidence_threshold=1e-30)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(3, args.vocab_size, (B, L), device=device)
    pos = torch.arange(L + 2 * C, device=device)
    cache = KVCache(args, B, L + 2 * C, device, model.embed_tokens.weight.dtype, scratch=C if cfg.fast else 0)
    stepper = (StaticStepper if cfg.fast else ReferenceStepper)(model, cache, params, B)  # captures before prefill
    with torch.inference_mode():
        def prefill():
            cache.length = 0
            for s in range(0, L, 4096):
                e = min(s + 4096, L)
                model.encode(ids[:, s:e], pos[s:e].expand(B, -1), cache)
                cache.advance(e - s)
        ttft = time_ms(prefill, device, reps=max(1, reps // 3), warmup=1)
        canvas = torch.randint(0, args.vocab_size, (B, C), device=device)

        def commit():
            stepper.commit(canvas, pos[L:L + C].expand(B, -1))  # written, never advanced: repeatable
        ms_commit = time_ms(commit, device, reps=reps)
        stepper.start_canvas(pos[L:L + C][None])
        counter = iter(range(10**9))
        ms_step = time_ms(lambda: stepper.step(cfg.steps - next(counter) % cfg.steps), device, reps=reps * 2)
        ms_first = None
        if cfg.fast:  # generate's first step of a canvas: the same commit, folded into the step's forward
            def first_step():
                stepper.fold_commit(canvas, pos[L:L + C].expand(B, -1))
                stepper.step(cfg.steps)
            ms_first = time_ms(first_step, device, reps=reps)
    per_canvas_ms = (cfg.steps - 1) * ms_step + ms_first if cfg.fast else cfg.steps * ms_step + ms_commit
    return {"batch": B, "prompt_len": L, "steps": cfg.steps, "path": "fast" if cfg.fast else "reference",
            "ttft_ms": ttft, "ms_per_step": ms_step, "ms_first_step": ms_first,
            "ms_per_commit": ms_first - ms_step if cfg.fast else ms_commit, "ms_commit_pass": ms_commit,
            "tok_s_excl_prefill": B * C / (per_canvas_ms / 1e3),
            "tok_s_incl_prefill": B * C / ((ttft + per_canvas_ms) / 1e3),
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else None}


def measure_ar(model: DiffusionGemma, prompt_len: int, device: str, tokens: int = 64) -> dict:
    """Greedy autoregressive decoding through the causal encoder, one token per forward, batch 1: the same weights
    as the diffusion path, so the two speeds compare on one engine. On CUDA (bf16/fp16) the token step (encoder
    pass + LM head + argmax + position increment) is one CUDA graph."""
    args, dtype, L = model.args, model.embed_tokens.weight.dtype, prompt_len
    cache = KVCache(args, 1, L + tokens + 8, device, dtype, scratch=1)
    tok = torch.zeros(1, 1, dtype=torch.long, device=device)
    pos = torch.zeros(1, 1, dtype=torch.long, device=device)

    @torch.inference_mode()
    def step():
        logits = model.lm_head(model.encode_static(tok, pos, cache)[:, -1])
        tok.copy_(logits.argmax(dim=-1, keepdim=True))
        pos.add_(1)
    graph = None
    fuse_for_cuda(model, torch.device(device))  # as the steppers do: the token step gets the stacked projections
    if device.startswith("cuda") and dtype in (torch.bfloat16, torch.float16):
        graph = capture_graph(step)
        cache.clear()  # the warm-up wrote junk slots
    with torch.inference_mode():
        ids = torch.randint(3, args.vocab_size, (1, L), device=device)
        model.encode(ids, torch.arange(L, device=device)[None], cache)
    cache.advance(L)
    pos.fill_(L)
    ms = time_ms(graph.replay if graph is not None else step, device, reps=tokens - 4, warmup=2)
    return {"batch": 1, "prompt_len": L, "steps": None, "path": "ar (greedy, encoder)", "ms_per_token": ms,
            "ar_tok_s": 1e3 / ms}


def transformers_eager_step_ms(model: DiffusionGemma, batch: int, prompt_len: int, steps: int, device: str,
                               reps: int) -> float:
    """transformers 5.23.0's eager denoising step (decoder forward + its sampler, DynamicCache), same weights."""
    from transformers.cache_utils import DynamicCache

    from dgemma.reference import hf_twin

    hf, args, C = hf_twin(model), model.args, model.args.canvas_length
    gc = _hf_generation_config(steps)
    ids = torch.randint(3, args.vocab_size, (batch, prompt_len), device=device)
    with torch.inference_mode():
        cache = DynamicCache(config=hf.config.get_text_config(decoder=True))
        hf.model.encoder(input_ids=ids, past_key_values=cache)
        canvas = torch.randint(0, args.vocab_size, (batch, C), device=device)
        state = {"sc": None}
        sampler, processors = hf._prepare_sampler(gc), hf._prepare_logits_processor(gc)
        stopping = hf._prepare_diffusion_stopping_criteria(gc)
        dpos = torch.arange(prompt_len, prompt_len + C, device=device)[None]
        done = torch.zeros(batch, dtype=torch.bool, device=device)

        def step():
            _, _, state["sc"], _ = hf._denoising_step(
                decoder_forward=hf.forward, current_canvas=canvas, argmax_canvas=canvas, input_ids=ids,
                decoder_position_ids=dpos, self_conditioning_logits=state["sc"], mask_mapping=None,
                past_key_values=cache, finished_denoising=done, cur_step=steps, sampler=sampler,
                logits_processor=processors, diffusion_stopping_criteria=stopping)
        return time_ms(step, device, reps=reps)


def transformers_generate_step_ms(model: DiffusionGemma, batch: int, prompt_len: int, steps: int, device: str,
                                  compile: bool = True, reps: int = 3) -> dict:
    """transformers 5.23.0's `generate` on one canvas with `cache_implementation="static"`, which is the path it
    compiles (encoder after prefill, decoder forward, sampler and stopping criteria with torch.compile
    mode="reduce-overhead"). The adaptive stop cannot fire, so a run of N steps costs prefill + N steps + set-up;
    per step = (median time of 2N-step runs - median time of N-step runs) / N. The first run (compilation,
    CUDA-graph recording) is timed separately as `compile_s`."""
    from dgemma.reference import hf_twin

    hf, args = hf_twin(model), model.args
    ids = torch.randint(3, args.vocab_size, (batch, prompt_len), device=device)

    def run(n: int) -> float:
        gc = _hf_generation_config(n, max_new_tokens=args.canvas_length, cache_implementation="static",
                                   disable_compile=not compile, pad_token_id=0, eos_token_id=args.eos_ids)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            hf.generate(input_ids=ids, generation_config=gc)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t

    compile_s = run(steps)
    for n in (steps, 2 * steps):  # warm both step counts (their logits processors differ; graphs are shared)
        run(n)
    short = sorted(run(steps) for _ in range(reps))[reps // 2]
    long_ = sorted(run(2 * steps) for _ in range(reps))[reps // 2]
    path = "generate, StaticCache + torch.compile(mode='reduce-overhead')" if compile else "generate, StaticCache"
    return {"ms_per_step": (long_ - short) / steps * 1e3, "compile_s": compile_s, "path": path}


def _hf_generation_config(steps: int, **kw):
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        DiffusionGemmaGenerationConfig,
        EntropyBoundSamplerConfig,
    )

    return DiffusionGemmaGenerationConfig(max_denoising_steps=steps, sampler_config=EntropyBoundSamplerConfig(0.1),
                                          t_min=0.4, t_max=0.8, stability_threshold=1, confidence_threshold=1e-30,
                                          **kw)


def environment(device: str) -> dict:
    """GPU, torch, the git commit (DGEMMA_COMMIT overrides it, for runs from an exported source tree) and any
    DGEMMA_* switches set (they change which kernels run)."""
    commit = os.environ.get("DGEMMA_COMMIT") or _git_commit()
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    env = {"gpu": gpu, "torch": torch.__version__, "commit": commit}
    switches = {k: v for k, v in sorted(os.environ.items()) if k.startswith("DGEMMA_") and k != "DGEMMA_COMMIT"}
    return env | ({"switches": switches} if switches else {})


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_results(rows: list[dict], out_dir: Path, stem: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(rows, indent=2) + "\n")
    cols = ["gpu", "precision", "shape", "path", "batch", "prompt_len", "steps", "ms_per_step", "floor_ms_per_step",
            "roofline_ms_per_step",
            "ms_first_step", "ms_per_commit", "ms_commit_pass", "ttft_ms", "tok_s_excl_prefill", "tok_s_incl_prefill",
            "transformers_ms_per_step", "peak_mem_gb", "ar_tok_s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    ratios = summary(rows)
    extra = "\n\nRatios (same run):\n\n" + "\n".join(f"- {line}" for line in ratios) if ratios else ""
    md_path.write_text(f"`{rows[0]['command']}`\n\n" + "\n".join(lines) + extra + "\n" if rows else "")
    return json_path, md_path


def summary(rows: list[dict]) -> list[str]:
    """The ratios issue 3's targets are stated in, from the fast-path rows of one run: each step against the HBM
    floor and transformers, each batch's tokens/s against batch 1's, each prompt's step against the shortest prompt's
    (same GPU, precision, steps and batch or prompt)."""
    fast = [r for r in rows if r.get("path") == "fast" and r.get("ms_per_step")]
    lines = []
    for r in fast:
        line = (f"{r['precision']} batch {r['batch']}, prompt {r['prompt_len']}, {r['steps']} steps: "
                f"{r['ms_per_step'] / r['floor_ms_per_step']:.2f}× the floor")
        if r.get("transformers_ms_per_step"):
            line += f", {r['transformers_ms_per_step'] / r['ms_per_step']:.2f}× faster than transformers"
        lines.append(line)

    def key(r: dict, *drop: str) -> tuple:
        return tuple(r.get(k) for k in ("gpu", "precision", "steps", "batch", "prompt_len") if k not in drop)

    for r in fast:
        base = [b for b in fast if key(b, "batch") == key(r, "batch") and b["batch"] == 1]
        if r["batch"] > 1 and base:
            lines.append(f"{r['precision']} prompt {r['prompt_len']}, {r['steps']} steps: batch {r['batch']} gives "
                         f"{r['tok_s_excl_prefill'] / base[0]['tok_s_excl_prefill']:.2f}× batch 1's tokens/s")
        shorter = [b for b in fast
                   if key(b, "prompt_len") == key(r, "prompt_len") and b["prompt_len"] < r["prompt_len"]]
        if shorter:
            s0 = min(shorter, key=lambda b: b["prompt_len"])
            lines.append(f"{r['precision']} batch {r['batch']}, {r['steps']} steps: the prompt-{r['prompt_len']} step "
                         f"is {r['ms_per_step'] / s0['ms_per_step']:.2f}× the prompt-{s0['prompt_len']} step")
    return lines


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.1f}" if v >= 10 else f"{v:.2f}"
    return "—" if v is None else str(v)

"""The training loop: `train(TrainConfig)` runs the REFERENCE.md §9 objective (`objective.py`) on JSONL data.

Modes: `scratch` (a fresh model from a config.json), `full` (every weight of a checkpoint), `lora` (adapters on
chosen linears, base frozen). When starting from a checkpoint the MoE router is frozen (REFERENCE.md §9).

Design choices:
- AdamW, linear warmup then cosine decay to `min_lr_ratio × lr`, gradient clipping, gradient accumulation.
- bf16 autocast on CUDA only (fp32 master weights); the CPU runs fp32.
- Checkpoints hold no pickle: model and optimizer tensors in safetensors, the step, data position and
  hyperparameters in JSON, every RNG state as a uint8 tensor. Resuming restores all of them, so a resumed run
  continues bit for bit (tests/test_train.py checks it).
- `log.jsonl` gets one line per optimizer step; the loss curve PNG is drawn from it at the end (matplotlib, the
  `train` extra; skipped with a warning when missing).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dgemma.config import ModelArgs
from dgemma.loader import DEFAULT_MODEL_DIR, load, save_model
from dgemma.models.diffusion_gemma import DiffusionGemma
from dgemma.tokenizer import Tokenizer
from dgemma.train import lora as lora_mod
from dgemma.train.data import Batches, load_jsonl
from dgemma.train.objective import draw, loss_from_draws

MODES = ("scratch", "full", "lora")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


@dataclass
class TrainConfig:
    data: str  # JSONL file
    out: str  # output directory (final model or adapter, checkpoints/, log.jsonl, loss.png)
    mode: str = "lora"  # scratch | full | lora
    model: str | None = None  # base checkpoint (full/lora); None = the bundled default model
    config: str | None = None  # scratch: a config.json to build the model from
    tokenizer: str | None = None  # directory with tokenizer.json (+ chat template); default: the model's
    steps: int = 1000  # optimizer steps
    batch_size: int = 8  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr × this
    warmup: int = 50  # linear warmup steps
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    max_len: int = 256  # tokens per example at most (cut beyond)
    seed: int = 0
    ar_weight: float = 1.0  # encoder AR loss weight (REFERENCE.md §9: 1.0)
    diffusion_weight: float = 1.0  # 0 trains an autoregressive-only baseline
    sc_prob: float = 0.5  # probability of feeding the first pass's logits to the second
    bf16: bool = True  # autocast in bf16 on CUDA (ignored on CPU)
    grad_checkpoint: bool = False  # recompute the decoder pass in backward (saves activation memory)
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: list[str] = field(default_factory=lambda: list(lora_mod.DEFAULT_TARGETS))
    save_every: int = 0  # checkpoint every N steps (0: only at the end)
    device: str | None = None
    save_dtype: str = "bfloat16"  # dtype of the final weights
    progress: bool = True


def build_model(cfg: TrainConfig, device: torch.device) -> tuple[DiffusionGemma, Path | None]:
    """(model in fp32 on device, source checkpoint dir or None)."""
    if cfg.mode == "scratch":
        if cfg.config is None:
            raise ValueError("--mode scratch needs --config (a config.json giving the architecture)")
        args = ModelArgs.from_file(cfg.config)
        torch.manual_seed(cfg.seed)
        model = DiffusionGemma(args)
        init_weights(model, cfg.seed)
        return model.to(device), None
    model, _, path = load(cfg.model, device, torch.float32)
    return model, Path(path)


def init_weights(model: DiffusionGemma, seed: int) -> None:
    """Norm weights and scales 1, router and layer scalars at their neutral values, linears N(0, 1/fan_in),
    embeddings N(0, 1/hidden) (the embedding is multiplied by sqrt(hidden) on input and tied to the LM head)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            elif name == "embed_tokens.weight":
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            if name.endswith("bias") or "encoder_" in name:
                p.zero_()


def trainable(model: DiffusionGemma, cfg: TrainConfig) -> list[tuple[str, torch.nn.Parameter]]:
    model.requires_grad_(cfg.mode != "lora")
    if cfg.mode == "lora":
        lora_mod.apply(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, seed=cfg.seed)
    elif cfg.mode == "full":
        for layer in model.layers:
            layer.router.requires_grad_(False)  # REFERENCE.md §9: the router stays frozen when fine-tuning
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over `warmup` steps, then cosine from lr down to lr × min_lr_ratio at `steps`."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


class Trainer:
    def __init__(self, cfg: TrainConfig):
        if cfg.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {cfg.mode!r}")
        self.cfg = cfg
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.out = Path(cfg.out)
        self.model, self.source = build_model(cfg, self.device)
        tok_dir = Path(cfg.tokenizer) if cfg.tokenizer else self.source or DEFAULT_MODEL_DIR
        self.tok_dir = tok_dir
        self.tokenizer = Tokenizer.from_dir(tok_dir)
        if self.tokenizer.vocab_size > self.model.args.vocab_size:
            raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} ids, the model only "
                             f"{self.model.args.vocab_size}")
        self.examples = load_jsonl(cfg.data, self.tokenizer, cfg.max_len)
        self.batches = Batches(self.examples, cfg.batch_size, self.model.args.canvas_length, cfg.seed,
                               self.tokenizer.pad_id or 0)
        self.params = trainable(self.model, cfg)
        decay = [p for n, p in self.params if p.dim() >= 2]
        no_decay = [p for n, p in self.params if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
        self.gen = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.step = 0
        self.tokens = 0

    # --- one optimizer step -------------------------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg, args = self.cfg, self.model.args
        self.model.train()
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, cfg)
        totals = {"loss": 0.0, "diffusion": 0.0, "ar": 0.0, "accuracy": 0.0}
        tokens = 0
        for _ in range(cfg.grad_accum):
            ids, sup, dsup, valid = (x.to(self.device) for x in self.batches.next())
            d = draw(dsup.cpu(), args.canvas_length, args.vocab_size, self.gen, cfg.sc_prob)
            autocast = self.device.type == "cuda" and cfg.bf16
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                out = loss_from_draws(self.model, ids, sup, d, cfg.ar_weight, cfg.grad_checkpoint,
                                      cfg.diffusion_weight, dsup, valid)
            (out.loss / cfg.grad_accum).backward()
            for k in totals:
                totals[k] += float(getattr(out, k).detach()) / cfg.grad_accum
            tokens += ids.numel()
        norm = torch.nn.utils.clip_grad_norm_([p for _, p in self.params], cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += tokens
        # "tokens" counts token positions processed, padding included (the bar's tokens/s too)
        return totals | {"step": self.step, "lr": self.opt.param_groups[0]["lr"], "grad_norm": float(norm),
                         "tokens": tokens}

    # --- checkpoints ----------------------------------------------------------------------------------------------
    def save_checkpoint(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        save_file({n: p.detach().cpu().contiguous() for n, p in self.params}, str(path / "trainable.safetensors"))
        opt_tensors, opt_meta = {}, {}
        for i, (n, p) in enumerate(self.params):
            st = self.opt.state.get(p, {})
            for k, v in st.items():
                opt_tensors[f"{i}.{k}"] = v.detach().cpu().contiguous().reshape(v.shape)
            opt_meta[str(i)] = n
        rng = {"torch": torch.get_rng_state(), "gen": self.gen.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        save_file(opt_tensors, str(path / "optimizer.safetensors"))
        save_file(rng, str(path / "rng.safetensors"))
        state = {"step": self.step, "tokens": self.tokens, "data": self.batches.state(), "params": opt_meta,
                 "config": dataclasses.asdict(self.cfg)}
        (path / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")

    def load_checkpoint(self, path: Path) -> None:
        state = json.loads((path / "trainer_state.json").read_text())
        weights = load_file(str(path / "trainable.safetensors"))
        names = [n for n, _ in self.params]
        if sorted(weights) != sorted(names):
            raise ValueError(f"{path}: the checkpoint's trainable tensors do not match this run's (mode/LoRA "
                             "settings differ)")
        with torch.no_grad():
            for n, p in self.params:
                p.copy_(weights[n])
        opt = load_file(str(path / "optimizer.safetensors"), device=str(self.device))
        for i, (_, p) in enumerate(self.params):
            st = {k.split(".", 1)[1]: v for k, v in opt.items() if k.split(".", 1)[0] == str(i)}
            if st:
                self.opt.state[p] = st
        rng = load_file(str(path / "rng.safetensors"))
        torch.set_rng_state(rng["torch"])
        self.gen.set_state(rng["gen"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.step, self.tokens = state["step"], state["tokens"]
        self.batches.load_state(state["data"])

    # --- the final artefacts --------------------------------------------------------------------------------------
    def save_final(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[self.cfg.save_dtype]
        if self.cfg.mode == "lora":
            lora_mod.save_adapter(self.model, self.out, base=str(self.source), dtype=dtype)
        else:
            save_model(self.model, self.out, dtype=dtype, metadata={"dgemma_train": json.dumps(
                {"mode": self.cfg.mode, "steps": self.step, "data": str(self.cfg.data)})})
            for name in TOKENIZER_FILES:
                src = self.tok_dir / name if (self.tok_dir / name).exists() else (self.source or self.tok_dir) / name
                if src.exists() and not (self.out / name).exists():
                    shutil.copy(src, self.out / name)
        return self.out


def train(cfg: TrainConfig, resume: str | Path | None = None, log=None) -> Trainer:
    """Run (or resume) a training run to `cfg.steps` optimizer steps; returns the Trainer."""
    t = Trainer(cfg)
    if resume is not None:
        t.load_checkpoint(Path(resume))
    t.out.mkdir(parents=True, exist_ok=True)
    log_file = (t.out / "log.jsonl").open("a")
    with _Progress(cfg.steps, t.step, enabled=cfg.progress) as bar:
        t0, tok0 = time.perf_counter(), t.tokens
        while t.step < cfg.steps:
            rec = t.train_step()
            rec["tokens_per_s"] = (t.tokens - tok0) / (time.perf_counter() - t0)
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()
            bar.update(rec)
            if log is not None:
                log(rec)
            if cfg.save_every and t.step % cfg.save_every == 0 and t.step < cfg.steps:
                t.save_checkpoint(t.out / "checkpoints" / f"step-{t.step:06d}")
    log_file.close()
    t.save_checkpoint(t.out / "checkpoints" / f"step-{t.step:06d}")
    t.save_final()
    plot_loss(t.out / "log.jsonl", t.out / "loss.png")
    return t


class _Progress:
    """A rich progress bar with loss and tokens/s (or nothing when disabled)."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.enabled = enabled
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                                     TimeRemainingColumn(), transient=False)
            self.task = self.progress.add_task("train", total=total, completed=done, loss="-", tps="-")

    def __enter__(self):
        if self.enabled:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.__exit__(*exc)

    def update(self, rec: dict) -> None:
        if self.enabled:
            self.progress.update(self.task, completed=rec["step"], loss=f"{rec['loss']:.3f}",
                                 tps=f"{rec['tokens_per_s']:.0f}")


def plot_loss(log_path: Path, png: Path) -> bool:
    """Draw total, diffusion and AR loss against the step; False (with a warning) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("dgemma train: warning: matplotlib is not installed (pip install 'dgemma[train]'); no loss.png",
              file=sys.stderr)
        return False
    recs = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in recs]
    for key in ("loss", "diffusion", "ar"):
        ax.plot(steps, [r[key] for r in recs], label=key, linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return True


__all__ = ["TrainConfig", "Trainer", "train", "lr_at", "plot_loss"]

"""Entropy-bound sampler of DiffusionGemma as pure tensor functions (no host syncs).

Each function reproduces one piece of transformers 5.23.0 `generation_diffusion_gemma.py` with the same ops in the
same order, so that with the same random draws it makes identical decisions:
    temperature       LinearTemperatureScheduleLogitsProcessor: t = t_min + (t_max - t_min) * cur_step / N
    entropy           torch.distributions.Categorical(logits=...).entropy()
    accept_mask       EntropyBoundSampler.accept_canvas (Entropy-Bounded unmasking, arXiv:2505.24857)
    stop_check        StableAndConfidentStoppingCriteria
Random draws (canvas init, per-step sample, renoise) stay in the loop (`engine/generate.py`) so their order is
visible in one place.
"""

from __future__ import annotations

import torch


def temperature(cur_step: int | torch.Tensor, steps: int, t_min: float, t_max: float,
                device: torch.device) -> torch.Tensor:
    """Linear schedule over the *remaining* steps (cur_step counts down N..1), as an fp32 scalar tensor.
    `cur_step` may be an int32 device scalar (the CUDA-graph step updates it in place)."""
    cur = cur_step if torch.is_tensor(cur_step) else torch.tensor(cur_step, device=device, dtype=torch.int32)
    return t_min + (t_max - t_min) * (cur / steps)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy [..., V] → [...], the same arithmetic as `Categorical(logits=...).entropy()`."""
    logp = logits - logits.logsumexp(dim=-1, keepdim=True)
    probs = torch.softmax(logp, dim=-1)
    logp = torch.clamp(logp, min=torch.finfo(logp.dtype).min)
    return -(logp * probs).sum(-1)


def accept_mask(token_entropy: torch.Tensor, entropy_bound: float) -> torch.Tensor:
    """Accept the k lowest-entropy positions with sum(H_1..k) - max(H_1..k) <= bound ([B, C] → bool [B, C])."""
    sorted_h, order = torch.sort(token_entropy, dim=-1, descending=False)
    selected = torch.cumsum(sorted_h, dim=-1) - sorted_h <= entropy_bound
    return torch.scatter(torch.zeros_like(selected), dim=-1, index=order, src=selected)


class StopState:
    """Adaptive stop per row: the argmax canvas unchanged for `stability` steps and mean entropy < `confidence`.
    The history is updated in place, so its address stays fixed (the CUDA-graph step captures it)."""

    def __init__(self, stability: int, confidence: float, shape: tuple[int, int] | None = None, device=None):
        self.stability, self.confidence = stability, confidence
        # [stability, B, C] last argmax canvases, -1 = none yet; allocated now if the shape [B, C] is given
        # (the CUDA-graph step needs a plain tensor made outside inference mode), else on first use.
        self.history: torch.Tensor | None = None
        if shape is not None and stability > 0:
            self.history = torch.full((stability, *shape), -1, dtype=torch.long, device=device)

    def reset(self) -> None:
        if self.history is not None:
            self.history.fill_(-1)

    def stable(self, argmax_canvas: torch.Tensor) -> torch.Tensor:
        """[B] bool: this argmax canvas equals each of the last `stability` ones (records it)."""
        if self.stability == 0:
            return torch.ones(argmax_canvas.shape[0], dtype=torch.bool, device=argmax_canvas.device)
        if self.history is None:
            self.history = torch.full((self.stability, *argmax_canvas.shape), -1, dtype=argmax_canvas.dtype,
                                      device=argmax_canvas.device)
        stable = (self.history == argmax_canvas[None]).all(dim=-1).all(dim=0)
        self.history.copy_(torch.roll(self.history, shifts=-1, dims=0))
        self.history[-1].copy_(argmax_canvas)
        return stable

    def confident(self, token_entropy: torch.Tensor) -> torch.Tensor:
        return token_entropy.mean(dim=-1) < self.confidence

    def __call__(self, argmax_canvas: torch.Tensor, processed_logits: torch.Tensor) -> torch.Tensor:
        return self.stable(argmax_canvas) & self.confident(entropy(processed_logits))


def stable_rows(history: torch.Tensor, argmax_canvas: torch.Tensor, stability: torch.Tensor) -> torch.Tensor:
    """`StopState.stable` with a stability per row: [B] bool, this argmax canvas [B, C] equals each of the row's last
    `stability[b]` canvases in history [S, B, C] (newest last, -1 = none yet, S >= every stability; 0 = always
    stable). Records the canvas in place."""
    S_ = history.shape[0]
    same = (history == argmax_canvas[None]).all(dim=-1)  # [S, B]
    needed = torch.arange(S_, device=history.device)[:, None] >= S_ - stability[None, :]  # last stability[b] rows
    stable = (same | ~needed).all(dim=0)
    history.copy_(torch.roll(history, shifts=-1, dims=0))
    history[-1].copy_(argmax_canvas)
    return stable


def eos_pad_mask(canvas: torch.Tensor, eos_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a committed canvas [B, C]: (has_eos [B], after_first_eos [B, C]) — positions to overwrite with pad."""
    is_eos = torch.isin(canvas, eos_ids)
    seen = is_eos.cumsum(dim=-1)
    return is_eos.any(dim=-1), (seen > 0) & ~((seen == 1) & is_eos)

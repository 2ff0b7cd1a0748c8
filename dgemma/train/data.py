"""Training data: JSONL in three formats, tokenized into (ids, supervised) pairs, then batched per canvas.

One JSON object per line, one of:
- `{"text": "..."}`: `<bos> text <eos>`, every token after `<bos>` supervised;
- `{"messages": [{"role": "user"|"assistant"|"system", "content": "..."}, ...]}`: rendered through the model's
  chat template; only assistant turns (their content and the end-of-turn marker) are supervised. The last
  assistant turn follows the generation prompt exactly as inference renders it (with Gemma's empty thought),
  earlier ones their history form. Turns after the last assistant turn are dropped;
- `{"prompt": "...", "completion": "..."}`: `<bos> prompt completion <eos>`, only the completion and `<eos>`
  supervised (no chat template).

Design choices:
- Pieces are tokenized separately and concatenated, so a supervised span starts on a token boundary, as the
  first generated token does at inference.
- A batch row is left-padded so that its first supervised token starts a canvas (as at inference, where the
  canvas follows the prompt), and right-padded with `<pad>` to a multiple of the canvas length. Pads after the
  end of an example, up to the end of that canvas, are diffusion targets (the model writes pads after EOS inside
  a canvas, as committed canvases look at inference); they are never AR targets.
- Errors name the file and the line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dgemma.tokenizer import Tokenizer


@dataclass
class Example:
    ids: list[int]
    supervised: list[bool]


class DataError(ValueError):
    pass


def load_jsonl(path: str | Path, tokenizer: Tokenizer, max_len: int | None = None) -> list[Example]:
    """Tokenize every line; examples longer than max_len are cut (the count is in `load_jsonl.truncated`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: training data file not found")
    out, truncated = [], 0
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e})") from e
            try:
                ex = to_example(obj, tokenizer)
            except DataError as e:
                raise DataError(f"{path}:{n}: {e}") from None
            if max_len is not None and len(ex.ids) > max_len:
                ex, truncated = Example(ex.ids[:max_len], ex.supervised[:max_len]), truncated + 1
            if any(ex.supervised):
                out.append(ex)
    if not out:
        raise DataError(f"{path}: no example with a supervised token")
    load_jsonl.truncated = truncated
    return out


def to_example(obj, tok: Tokenizer) -> Example:
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        return _chat(obj["messages"], tok)
    if "prompt" in obj or "completion" in obj:
        prompt, completion = obj.get("prompt"), obj.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
            raise DataError("'prompt' and 'completion' must both be strings (completion non-empty)")
        return _pieces(tok, [([tok.bos_id], False), (prompt, False), (completion, True), ([tok.eos_id], True)])
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"]:
            raise DataError("'text' must be a non-empty string")
        return _pieces(tok, [([tok.bos_id], False), (obj["text"], True), ([tok.eos_id], True)])
    raise DataError(f"expected a 'text', 'messages' or 'prompt'/'completion' field, got keys {sorted(obj)}")


def _pieces(tok: Tokenizer, pieces: list[tuple[str | list[int], bool]]) -> Example:
    ids, sup = [], []
    for piece, supervised in pieces:
        piece_ids = piece if isinstance(piece, list) else tok.encode(piece)
        ids += piece_ids
        sup += [supervised] * len(piece_ids)
    return Example(ids, sup)


def _chat(messages, tok: Tokenizer) -> Example:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise DataError("'messages' must be a list of {'role', 'content'} objects")
    roles = [m.get("role") for m in messages]
    if any(not isinstance(m.get("content"), str) for m in messages):
        raise DataError("every message needs a string 'content'")
    assistant = [i for i, r in enumerate(roles) if r in ("assistant", "model")]
    if not assistant:
        raise DataError("'messages' has no assistant turn to supervise")
    render = tok.apply_chat_template
    pieces, done = [], ""
    for a in assistant:
        before, after = render(messages[:a], False), render(messages[:a + 1], False)
        content = messages[a]["content"]
        if not after.startswith(before) or content not in after[len(before):]:
            raise DataError("the chat template does not render turns as a growing prefix; use prompt/completion")
        span = after[len(before):]
        end = span[span.index(content) + len(content):]
        marker = end.rstrip("\n")
        context = render(messages[:a], True) if a == assistant[-1] else before + span[:span.index(content)]
        if not context.startswith(done):
            raise DataError("the chat template does not render turns as a growing prefix; use prompt/completion")
        pieces += [(context[len(done):], False), (content + marker, True)]
        done = context + content + marker + end[len(marker):]
        if a != assistant[-1]:
            pieces.append((end[len(marker):], False))
    return _pieces(tok, [(p, s) for p, s in pieces if p])


def collate(examples: list[Example], canvas: int, pad_id: int = 0) -> tuple[torch.Tensor, ...]:
    """(ids, supervised, diffusion targets, valid), each [B, L] with L a multiple of the canvas length.

    Each row is left-padded (valid False) so that its first supervised token starts a canvas: the canvases of
    training then sit where inference puts them, right after the prompt."""
    lefts = [(-e.supervised.index(True)) % canvas if any(e.supervised) else 0 for e in examples]
    longest = max(left + len(e.ids) for left, e in zip(lefts, examples))
    L = -(-longest // canvas) * canvas
    B = len(examples)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    sup = torch.zeros(B, L, dtype=torch.bool)
    dsup = torch.zeros(B, L, dtype=torch.bool)
    valid = torch.zeros(B, L, dtype=torch.bool)
    for i, (left, e) in enumerate(zip(lefts, examples)):
        end = left + len(e.ids)
        ids[i, left:end] = torch.tensor(e.ids)
        sup[i, left:end] = torch.tensor(e.supervised)
        valid[i, left:end] = True
        dsup[i] = sup[i]
        dsup[i, end:-(-end // canvas) * canvas] = True  # pads up to the end of the last canvas
    return ids, sup, dsup, valid


class Batches:
    """An endless, seeded stream of shuffled batches with an exact position (epoch, index) for resume."""

    def __init__(self, examples: list[Example], batch_size: int, canvas: int, seed: int, pad_id: int = 0):
        self.examples, self.batch_size, self.canvas, self.seed, self.pad_id = examples, batch_size, canvas, seed, pad_id
        self.epoch, self.index = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def next(self) -> tuple[torch.Tensor, ...]:
        picked = []
        while len(picked) < self.batch_size:
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation()
            picked.append(self.examples[self._order[self.index]])
            self.index += 1
        return collate(picked, self.canvas, self.pad_id)

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._permutation()

"""Showing a generation as it happens: streamed committed text, and a rich live view of the denoising canvas.

What it does:
- `CommittedText` turns each `CanvasEvent` into the new text to print: it decodes every committed id so far, cut
  the way the final output is (at max_new_tokens, after the first EOS; pads and other specials are skipped by the
  decoder), and returns the suffix not printed yet.
- `LiveView` consumes the event stream on a terminal and redraws: the committed text (its tail), the current
  canvas's argmax draft coming into focus, and a status line `canvas k/K · step s/N`.

Design choices:
- Decoding everything so far (not canvas by canvas) keeps multi-token characters and leading-space rules right
  across canvas boundaries; a trailing U+FFFD (half a UTF-8 character) is held back until more ids arrive.
- In the draft, a position is shown plainly once it is settled (accepted this step, or the same argmax as the
  previous step) and dimmed while it still changes; after the draft's first EOS everything is dimmed, as it will
  be padding. Pieces come from `Tokenizer.decode_token_pieces` (each id decoded alone: diffusion fills positions
  out of order), with control characters made visible so they cannot move the cursor.
- The live region is transient: when generation ends it is cleared and the final text is printed plainly, so the
  scrollback holds only the answer. Rendering runs on rich's refresh thread (`get_renderable`), at most ~12 times
  a second, so a fast model is not slowed by redrawing every step.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from typing import NamedTuple

import torch
from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from dgemma.config import DiffusionParams
from dgemma.engine.generate import CanvasEvent, Event, FinishedEvent, StepEvent
from dgemma.tokenizer import Tokenizer

# C0 controls (but newline and tab) and DEL → their visible "control picture" glyphs (U+2400 block).
_CONTROL = {c: 0x2400 + c for c in range(32) if chr(c) not in "\n\t"} | {0x7F: 0x2421}


class Frame(NamedTuple):
    """What the live view draws; replaced whole each step so the refresh thread never sees half an update."""

    canvas: int  # 0-based
    step: int  # steps run in this canvas so far
    draft: list[int] | None  # argmax ids of the canvas (cut to max_new_tokens); None between canvases
    settled: list[bool] | None  # accepted this step, or unchanged since the previous one
    done: bool  # this canvas stopped denoising (or generation finished)


class CommittedText:
    """Committed ids of row 0 so far, and the part of their text already handed out."""

    def __init__(self, tokenizer: Tokenizer, params: DiffusionParams):
        self.tokenizer, self.params = tokenizer, params
        self.eos = set(params.eos_token_ids)
        self.ids: list[int] = []
        self.ended = False
        self.shown = ""

    def add(self, tokens: list[int]) -> str:
        """Append a committed canvas; return the new text that is safe to print now."""
        for t in tokens:
            if self.ended or len(self.ids) >= self.params.max_new_tokens:
                break
            self.ids.append(t)
            self.ended = t in self.eos
        text = self.tokenizer.decode(self.ids)
        safe = text.rstrip("\ufffd")  # half a character: wait for the next canvas to complete it
        return self._advance(safe)

    def finish(self, token_ids: list[int]) -> str:
        """The rest of the final text (the library's own cut of the ids is authoritative)."""
        self.ids = list(token_ids)
        return self._advance(self.tokenizer.decode(self.ids))

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids)

    def _advance(self, text: str) -> str:
        # If the decoder re-reads earlier ids differently, what is printed stays printed; hand out the extra length.
        new = text[len(self.shown):]
        if new:
            self.shown = text
        return new


class LiveView:
    """Draws the generation of one prompt in a `rich.live.Live` region; returns the FinishedEvent."""

    def __init__(self, tokenizer: Tokenizer, params: DiffusionParams, canvas_length: int,
                 console: Console | None = None):
        self.tokenizer, self.params, self.C = tokenizer, params, canvas_length
        self.console = console or Console()
        self.committed = CommittedText(tokenizer, params)
        self.n_canvases = math.ceil(params.max_new_tokens / canvas_length)
        self.prev_draft: torch.Tensor | None = None
        self.frame = Frame(0, 0, None, None, False)

    def run(self, events: Iterable[Event]) -> FinishedEvent:
        final = None
        try:
            with Live(console=self.console, transient=True, refresh_per_second=12, get_renderable=self.render):
                for event in events:
                    if isinstance(event, StepEvent):
                        self._on_step(event)
                    elif isinstance(event, CanvasEvent):
                        self._on_canvas(event)
                    else:
                        final = event
        except KeyboardInterrupt:  # the live region is gone: leave what was committed on screen
            _print(self.committed.text)
            raise
        assert final is not None, "the event stream ended without a FinishedEvent"
        _print(self.tokenizer.decode(final.outputs[0].token_ids))
        return final

    def _on_step(self, event: StepEvent) -> None:
        limit = min(self.C, self.params.max_new_tokens - event.canvas * self.C)  # the last canvas is cut
        draft, done = event.draft[0, :limit], bool(event.done[0])
        settled = event.accepted[0, :limit].clone()
        if self.prev_draft is not None:
            settled |= draft == self.prev_draft
        self.prev_draft = draft
        self.frame = Frame(event.canvas, event.step, draft.tolist(), settled.tolist(), done)

    def _on_canvas(self, event: CanvasEvent) -> None:
        self.committed.add(event.tokens[0].tolist())
        self.prev_draft = None
        if bool(event.finished[0]):
            self.frame = Frame(event.canvas, event.steps, None, None, True)
        else:
            self.frame = Frame(event.canvas + 1, 0, None, None, False)

    def render(self) -> Group:
        canvas, step, draft, settled, done = self.frame
        parts = [self._committed_tail()]
        if draft is not None:
            parts.append(self._draft_text(draft, settled, done))
        status = f"canvas {canvas + 1}/{self.n_canvases} · step {step}/{self.params.max_denoising_steps}"
        if draft is not None:
            status += f" · {sum(settled)}/{len(draft)} settled" + (" · stopped" if done else "")
        elif done:
            status += " · finished"
        parts.append(Text(status, style="bold cyan"))
        return Group(*parts)

    def _draft_text(self, draft: list[int], settled: list[bool], done: bool) -> Text:
        text = Text()
        eos_seen = False
        for tok, piece, ok in zip(draft, self.tokenizer.decode_token_pieces(draft), settled):
            style = "dim" if eos_seen or not (ok or done) else ""
            text.append(piece.translate(_CONTROL), style=style)
            eos_seen = eos_seen or tok in self.committed.eos
        return text

    def _committed_tail(self) -> Text:
        """The end of the committed text, a few lines less than the terminal holds, so the canvas stays visible."""
        full = self.committed.text.translate(_CONTROL)
        lines = full.split("\n")
        height, width = self.console.size.height, self.console.size.width
        keep = max(height // 2 - 1, 1)
        tail = "\n".join(lines[-keep:])[-keep * width:]
        return Text(("…" if len(tail) < len(full) else "") + tail)


def _print(text: str) -> None:
    # Controls made visible here too: noise from a random-weight model can hold ESC and friends.
    sys.stdout.write(text.translate(_CONTROL) + "\n")
    sys.stdout.flush()

"""Token ids arriving a canvas at a time → text deltas: incremental detokenization, the thought channel, stop strings.

What it does: `TextStream.add(ids)` takes each committed canvas's new ids and returns the new reasoning and content
text that is safe to send now; `finish()` returns the rest. Streamed and non-streamed responses both go through it,
so the concatenated deltas equal the non-streamed text by construction.

Design choices:
- Each channel's text is decoded whole from its ids every time (not canvas by canvas), so byte-level pieces of
  one UTF-8 character that straddle a canvas boundary decode together; a trailing U+FFFD (a character still
  incomplete) is held back until more ids come or the stream ends.
- The thought channel is split on token ids, not text: `<|channel>` opens it and `<channel|>` closes it
  (REFERENCE.md §7); the channel name ("thought\n") that follows `<|channel>` is dropped. Only with thinking on:
  otherwise the chat template has already emitted an empty thought, and everything is content.
- Stop strings are matched in the content text, which spans canvas boundaries. Content that could still be the
  start of a stop string is held back, so nothing sent is ever taken back; on a match the text is cut before the
  stop string (OpenAI semantics) and `stopped` is set, and the caller cancels the request in the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from dgemma.tokenizer import Tokenizer

CHANNEL_NAME = "thought\n"  # what follows <|channel> in the Gemma 4 format


@dataclass
class Delta:
    reasoning: str = ""
    content: str = ""

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content)


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None, thinking: bool = False):
        self.tokenizer, self.stop, self.thinking = tokenizer, list(stop or []), thinking
        self.open_id = tokenizer.token_to_id("<|channel>") if thinking else None
        self.close_id = tokenizer.token_to_id("<channel|>") if thinking else None
        self.ids: list[int] = []
        self.reasoning = ""  # sent so far
        self.content = ""
        self.stopped = False
        self._scanned = 0  # content before this offset holds no stop string

    def add(self, ids: list[int]) -> Delta:
        if self.stopped:
            return Delta()
        self.ids.extend(ids)
        return self._advance(final=False)

    def finish(self) -> Delta:
        return Delta() if self.stopped else self._advance(final=True)

    def _advance(self, final: bool) -> Delta:
        reasoning, content = self._split()
        reasoning = self._decode(reasoning, final)
        if reasoning.startswith(CHANNEL_NAME):
            reasoning = reasoning[len(CHANNEL_NAME):]
        elif CHANNEL_NAME.startswith(reasoning) and not final:
            reasoning = ""  # the channel name may still be arriving
        content = self._cut_at_stop(self._decode(content, final), final)
        delta = Delta(_suffix(self.reasoning, reasoning), _suffix(self.content, content))
        self.reasoning += delta.reasoning
        self.content += delta.content
        return delta

    def _split(self) -> tuple[list[int], list[int]]:
        """(thought ids, content ids); the channel markers themselves are in neither."""
        ids = self.ids
        if self.open_id is None or self.open_id not in ids:
            return [], ids
        start = ids.index(self.open_id)
        end = ids.index(self.close_id, start) if self.close_id in ids[start:] else len(ids)
        return ids[start + 1:end], ids[:start] + ids[end + 1:]

    def _decode(self, ids: list[int], final: bool) -> str:
        text = self.tokenizer.decode(ids)
        return text if final else text.rstrip("\ufffd")

    def _cut_at_stop(self, text: str, final: bool) -> str:
        if not self.stop:
            return text
        longest = max(len(s) for s in self.stop)
        start = max(0, self._scanned - longest + 1)
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return text[:min(hits)]
        self._scanned = len(text)
        if final:
            return text
        # hold back the longest tail that a stop string could still start with
        for k in range(min(longest - 1, len(text)), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stop):
                return text[:-k]
        return text


def _suffix(sent: str, text: str) -> str:
    # What was sent stays sent: hand out only the part beyond it. The text is a prefix-stable decode, so `sent`
    # is a prefix of `text`; if a decoder ever re-read earlier ids differently, the extra length is still right.
    return text[len(sent):]

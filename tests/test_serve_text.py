"""TextStream (dgemma/serve/text.py): deltas over canvas boundaries, UTF-8 pieces, stop strings, the thought channel.

Ids come from the bundled byte-level BPE tokenizer, so multi-byte characters really are split over several ids.
"""

import random

import pytest

from dgemma.serve.text import TextStream
from dgemma.tokenizer import DEFAULT_DIR, Tokenizer

TEXT = "héllo wörld 😀 日本語 — a cat sat on the mat; ünïcödé again 🎉 END of it"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(DEFAULT_DIR)


def _chunks(ids, sizes):
    out, i = [], 0
    for n in sizes:
        out.append(ids[i:i + n])
        i += n
    if i < len(ids):
        out.append(ids[i:])
    return out


def _run(tok, chunks, **kw):
    ts = TextStream(tok, **kw)
    deltas = [ts.add(c) for c in chunks] + [ts.finish()]
    return ts, deltas


@pytest.mark.parametrize("seed", range(8))
def test_deltas_concatenate_to_the_whole_text_for_any_canvas_split(tok, seed):
    ids = tok.encode(TEXT)
    rng = random.Random(seed)
    chunks = _chunks(ids, [rng.randint(1, 4) for _ in range(len(ids))])
    ts, deltas = _run(tok, chunks)
    assert "".join(d.content for d in deltas) == tok.decode(ids) == TEXT
    assert all("\ufffd" not in d.content for d in deltas)  # half a character is never sent


def test_a_character_split_over_two_canvases_is_sent_whole(tok):
    ids = tok.encode("😀")
    assert len(ids) > 1  # byte-level: the emoji takes several ids
    ts = TextStream(tok)
    assert ts.add(ids[:1]).content == ""
    assert ts.add(ids[1:]).content == "😀"


def test_invalid_bytes_at_the_end_are_sent_by_finish(tok):
    ids = tok.encode("ab😀")[:-1]  # the emoji cut short: decodes to a replacement character
    ts, deltas = _run(tok, [ids])
    assert deltas[0].content == "ab" and deltas[-1].content == "\ufffd"


@pytest.mark.parametrize("seed", range(6))
def test_stop_string_across_canvas_boundaries(tok, seed):
    ids = tok.encode(TEXT)
    rng = random.Random(seed)
    chunks = _chunks(ids, [rng.randint(1, 3) for _ in range(len(ids))])
    ts, deltas = _run(tok, chunks, stop=["cat sat", "zzz"])
    assert "".join(d.content for d in deltas) == TEXT[:TEXT.index("cat sat")]
    assert ts.stopped
    assert ts.add(tok.encode(" more")).content == ""  # nothing after a stop


def test_stop_prefix_is_held_back_then_released(tok):
    ts = TextStream(tok, stop=["END!"])
    first = ts.add(tok.encode(" the END"))
    assert first.content == " the "  # " END" might still become "END!"
    assert ts.add(tok.encode(" here")).content == "END here"
    assert not ts.stopped


def test_earliest_of_several_stop_strings_wins(tok):
    ts, deltas = _run(tok, [tok.encode(" one two three")], stop=["three", "two"])
    assert "".join(d.content for d in deltas) == " one " and ts.stopped


def test_thought_channel_split_on_ids(tok):
    open_, close = tok.token_to_id("<|channel>"), tok.token_to_id("<channel|>")
    ids = [open_, *tok.encode("thought\nI think so"), close, *tok.encode(" The answer."), tok.eos_id]
    for split in range(1, len(ids)):
        ts, deltas = _run(tok, [ids[:split], ids[split:]], thinking=True)
        assert "".join(d.reasoning for d in deltas) == "I think so"
        assert "".join(d.content for d in deltas) == " The answer."


def test_unclosed_thought_is_all_reasoning_and_thinking_off_is_all_content(tok):
    open_ = tok.token_to_id("<|channel>")
    ids = [open_, *tok.encode("thought\nstill thinking")]
    ts, deltas = _run(tok, [ids], thinking=True)
    assert ts.reasoning == "still thinking" and ts.content == ""
    ts, deltas = _run(tok, [ids], thinking=False)
    assert ts.content == "thought\nstill thinking" and ts.reasoning == ""  # markers are special: skipped

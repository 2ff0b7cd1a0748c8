"""The bundled default model is trained: fails if its weights are broken (random, zeroed, shuffled, mis-loaded).

Held-out fortunes (never trained on), corrupted at t = 0.5 with a fixed seed: the denoiser must restore far more
tokens than chance (1/2048) or the most frequent token (a few percent), and the encoder's next-token loss must be
far below a uniform guess (ln 2048 = 7.6 nats). Thresholds sit well inside the measured values."""

import math

import pytest
import torch

from dgemma import LLM
from dgemma.train import objective as O
from dgemma.train.data import collate, to_example

HELD_OUT = [
    ("Share a thought on anything.", "Help stamp out and abolish redundancy and repetition."),
    ("Give me a quote about anything.", "Life is both difficult and time-consuming."),
    ("Share a thought on anything.", "Please help keep the world clean: others may wish to use it."),
    ("What do you know about work?", "Never say you know a man until you have divided an inheritance with him."),
    ("Tell me something about disclaimers.", "Not responsible for typographical errors."),
    ("Give me a quote about platitudes.", "Misery loves company, but company does not reciprocate."),
    ("Give me a quote about fortune.", "You display the wonderful traits of charm and courtesy."),
    ("Tell me something about anything.", "There is always someone worse off than yourself."),
    ("What do you know about people?", "It pays to be obvious, especially if you have a reputation for subtlety."),
    ("Give me a quote about wisdom.", "Getting there is only half as far as getting there and back."),
]


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu", dtype="float32")


def test_bundled_model_denoises_held_out_text(llm):
    model, C, V = llm.model, llm.args.canvas_length, llm.args.vocab_size
    examples = [to_example({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
                           llm.tokenizer) for q, a in HELD_OUT]
    ids, sup, _, valid = collate(examples, C)
    B = ids.shape[0]
    d = O.draw(sup, C, V, torch.Generator().manual_seed(0))
    targets, bsup = O.block_view(ids, d.block, C), O.block_view(sup, d.block, C)
    noisy, corrupted = O.corrupt(targets, bsup, torch.full((B,), 0.5), d.noise, d.flip)
    with torch.no_grad():
        dec, enc = O.forward(model, ids, noisy, d.block, torch.ones(B, dtype=torch.bool), valid=valid)
    restored = ((dec.argmax(-1) == targets) & corrupted).sum() / corrupted.sum()
    ar = O.ar_ce(enc, ids, sup)
    assert corrupted.sum() > 50
    # measured 9-11% (chance 0.05%, the most frequent token ~3%); a random or mis-loaded model restores ~0
    assert restored > 0.05, f"denoising accuracy {restored:.3f} on corrupted held-out tokens"
    assert ar < 0.7 * math.log(V), f"next-token loss {ar:.3f} nats"  # measured 4.43 nats, uniform 7.62


def test_bundled_model_generates_words(llm):
    from dgemma import SamplingParams

    out = llm.generate(["Tell me something about love."], SamplingParams(max_new_tokens=64, seed=0), chat=True)[0]
    words = out.text.split()
    assert len(words) >= 3 and sum(w.strip(".,!?;:'\"-").isalpha() for w in words) >= len(words) / 2, out.text

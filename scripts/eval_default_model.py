"""Held-out metrics of a model trained on the fortunes data (the bundled default model's model card numbers).

For a diffusion checkpoint and, optionally, an autoregressive baseline of the same size trained on the same data
(`dgemma train ... --diffusion-weight 0`), on held-out.jsonl (never trained on):
- next-token cross-entropy of the encoder (nats per supervised token), against a unigram model of the training
  tokens (add-one smoothing);
- denoising at corruption levels t = 0.25 / 0.5 / 0.75 (the block's supervised tokens replaced by uniform random
  ids with probability t, two passes with self-conditioning as in training): cross-entropy over the block and
  accuracy on the corrupted tokens, with the unigram model's cross-entropy and most-frequent-token accuracy beside.
Fixed seeds; prints a Markdown table and writes JSON.

Usage: python scripts/eval_default_model.py MODEL_DIR DATA_DIR [--ar AR_MODEL_DIR] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from dgemma.loader import load
from dgemma.tokenizer import Tokenizer
from dgemma.train import objective as O
from dgemma.train.data import collate, load_jsonl

LEVELS = (0.25, 0.5, 0.75)


def unigram(train, vocab: int) -> torch.Tensor:
    counts = torch.ones(vocab)
    for e in train:
        for i, s in zip(e.ids, e.supervised):
            if s:
                counts[i] += 1
    return (counts / counts.sum()).log()


@torch.no_grad()
def evaluate(model, examples, logp_uni: torch.Tensor, batch: int = 32, seed: int = 0) -> dict:
    C, V = model.args.canvas_length, model.args.vocab_size
    res = {"ar_ce": [0.0, 0], "uni_ar_ce": [0.0, 0]}
    for t in LEVELS:
        res |= {f"ce@{t}": [0.0, 0], f"acc@{t}": [0.0, 0], f"uni_ce@{t}": [0.0, 0], f"uni_acc@{t}": [0.0, 0]}
    top = int(logp_uni.argmax())
    for start in range(0, len(examples), batch):
        ids, sup, _, valid = collate(examples[start:start + batch], C)
        B = ids.shape[0]
        _, enc = O.forward(model, ids, ids[:, :C], torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.bool),
                           diffusion=False, valid=valid)
        m = sup[:, 1:]
        ce = torch.nn.functional.cross_entropy(enc[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        res["ar_ce"][0] += float(ce[m.flatten()].sum())
        res["ar_ce"][1] += int(m.sum())
        res["uni_ar_ce"][0] += float(-logp_uni[ids[:, 1:][m]].sum())
        res["uni_ar_ce"][1] += int(m.sum())
        for t in LEVELS:
            g = torch.Generator().manual_seed(seed * 1000 + start)
            d = O.draw(sup, C, V, g)
            targets, bsup = O.block_view(ids, d.block, C), O.block_view(sup, d.block, C)
            noisy, corrupted = O.corrupt(targets, bsup, torch.full((B,), t), d.noise, d.flip)
            dec, _ = O.forward(model, ids, noisy, d.block, torch.ones(B, dtype=torch.bool), ar=False,
                               valid=valid)
            ce = torch.nn.functional.cross_entropy(dec.flatten(0, 1), targets.flatten(), reduction="none")
            res[f"ce@{t}"][0] += float(ce[bsup.flatten()].sum())
            res[f"ce@{t}"][1] += int(bsup.sum())
            res[f"acc@{t}"][0] += int(((dec.argmax(-1) == targets) & corrupted).sum())
            res[f"acc@{t}"][1] += int(corrupted.sum())
            # unigram: corrupted positions get the unigram prediction, clean ones are copied (CE 0 is generous
            # to the baseline only if it knew which tokens are clean; it does not, so give it the unigram everywhere)
            res[f"uni_ce@{t}"][0] += float(-logp_uni[targets[bsup]].sum())
            res[f"uni_ce@{t}"][1] += int(bsup.sum())
            res[f"uni_acc@{t}"][0] += int(((targets == top) & corrupted).sum())
            res[f"uni_acc@{t}"][1] += int(corrupted.sum())
    return {k: s / max(n, 1) for k, (s, n) in res.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("data", help="directory with train.jsonl, heldout.jsonl (scripts/fortunes_data.py)")
    ap.add_argument("--ar", default=None, help="autoregressive baseline checkpoint")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    tok = Tokenizer.from_dir(args.model)
    train = load_jsonl(Path(args.data) / "train.jsonl", tok, 128)
    held = load_jsonl(Path(args.data) / "heldout.jsonl", tok, 128)
    model, _, _ = load(args.model, "cpu", torch.float32)
    logp = unigram(train, model.args.vocab_size)
    out = {"diffusion": evaluate(model, held, logp), "heldout_examples": len(held)}
    if args.ar:
        ar_model, _, _ = load(args.ar, "cpu", torch.float32)
        out["ar_baseline_ar_ce"] = evaluate(ar_model, held, logp)["ar_ce"]
    r = out["diffusion"]
    print(f"held-out: {len(held)} examples\n")
    print("| metric | diffusion model | AR baseline (same size, data, steps) | unigram |\n|---|---|---|---|")
    ar_ce = out.get("ar_baseline_ar_ce")
    print(f"| next-token CE (nats/token) | {r['ar_ce']:.3f} (ppl {math.exp(r['ar_ce']):.1f}) | "
          f"{'' if ar_ce is None else f'{ar_ce:.3f} (ppl {math.exp(ar_ce):.1f})'} | {r['uni_ar_ce']:.3f} |")
    for t in LEVELS:
        print(f"| denoising CE over the block, t = {t} | {r[f'ce@{t}']:.3f} | n/a | {r[f'uni_ce@{t}']:.3f} |")
    for t in LEVELS:
        print(f"| accuracy on corrupted tokens, t = {t} | {100 * r[f'acc@{t}']:.1f}% | n/a | "
              f"{100 * r[f'uni_acc@{t}']:.1f}% (most frequent token) |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Data for the bundled default model: Debian's `fortunes` corpus as chat JSONL, plus its BPE tokenizer.

Source: the Debian package `fortunes` (fortune-mod 1.99.1, `apt-get install fortunes`), files under
/usr/share/games/fortunes; BSD license (see /usr/share/doc/fortunes/copyright). Skipped: ascii-art (pictures),
translate-me, pratchett (quotations from in-copyright novels), and every fortune over 300 characters.

Each fortune becomes one chat example: the user asks about the fortune file's topic (one of a few fixed phrasings,
chosen by a seeded RNG), the assistant answers with the fortune. A seeded 5% of fortunes is held out
(`heldout.jsonl`). The tokenizer is a byte-level BPE of 2048 ids trained on the training fortunes, with the
special-token layout of scripts/build_default_tokenizer.py (ids 0..109, Gemma's ids where they exist).

Usage: python scripts/fortunes_data.py OUT_DIR   (writes train.jsonl, heldout.jsonl, tokenizer files)
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from build_default_tokenizer import check, train  # noqa: E402

ROOT = Path("/usr/share/games/fortunes")
SKIP = {"ascii-art", "translate-me", "pratchett"}
MAX_CHARS = 300
TOPICS = {"cookie": "life", "fortunes": "fortune", "knghtbrd": "anything", "miscellaneous": "anything",
          "men-women": "men and women", "songs-poems": "poems", "zippy": "Zippy", "linuxcookie": "Linux",
          "paradoxum": "paradoxes", "goedel": "logic", "startrek": "Star Trek", "debian": "Debian",
          "linux": "Linux", "perl": "Perl", "tao": "the Tao", "disclaimer": "disclaimers"}
PHRASES = ["Tell me something about {t}.", "Say something about {t}.", "Give me a quote about {t}.",
           "What do you know about {t}?", "Share a thought on {t}."]


def fortunes() -> list[tuple[str, str]]:
    if not ROOT.is_dir():
        raise SystemExit(f"{ROOT} not found: apt-get install fortunes")
    out = []
    for f in sorted(ROOT.iterdir()):
        if f.suffix or f.name in SKIP or not f.is_file():
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        for item in text.split("\n%\n"):
            item = item.strip("\n%").rstrip()
            if item.strip() and len(item) <= MAX_CHARS and "\b" not in item:
                out.append((TOPICS.get(f.name, f.name), item))
    return out


def main(out: Path) -> None:
    items = fortunes()
    rng = random.Random(0)
    rng.shuffle(items)
    n_held = len(items) // 20
    splits = {"heldout": items[:n_held], "train": items[n_held:]}
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        with (out / f"{name}.jsonl").open("w") as f:
            for topic, text in rows:
                prompt = rng.choice(PHRASES).format(t=topic)
                f.write(json.dumps({"messages": [{"role": "user", "content": prompt},
                                                 {"role": "assistant", "content": text}]}) + "\n")
    tok = train([f"{rng.choice(PHRASES).format(t=t)}\n{x}" for t, x in splits["train"]])
    check(tok)
    tok.save(str(out / "tokenizer.json"), pretty=False)
    print(f"{len(splits['train'])} train, {len(splits['heldout'])} held-out fortunes → {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("build/fortunes"))

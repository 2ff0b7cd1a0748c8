"""Build the bundled tokenizer of dgemma's default tiny model (dgemma/assets/default/).

A byte-level BPE trained with the `tokenizers` library to a total vocabulary of exactly 2048 ids. The low ids
copy the real Gemma 4 / DiffusionGemma layout (REFERENCE.md §7) so that code which hard-codes them (BOS=2,
<|turn>=105, ...) behaves the same on the tiny model; every other id below 110 is an `<unused{i}>` placeholder,
so BPE tokens start at id 110.

Corpus (all PSF-licensed, shipped with CPython, nothing downloaded): the Zen of Python (the `this` module, which
stores it rot13-encoded) followed by the docstrings of a fixed, sorted list of stdlib modules and of their public
classes and functions. The docstrings change slightly between Python versions; the committed files were built
with CPython 3.11 and tokenizers 0.23. Training is deterministic for a given corpus (BPE ties are broken by pair
id), and the script prints the corpus and output sha256 so a rebuild can be compared.

Usage: python scripts/build_default_tokenizer.py [--out dgemma/assets/default]
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import hashlib
import importlib
import inspect
import io
import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB_SIZE = 2048
FIRST_BPE_ID = 110
# Ids shared with the real Gemma 4 tokenizer; the rest of 0..109 become <unused{i}>.
GEMMA_SPECIAL_IDS = {
    "<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "<|tool_response>": 50, "<|think|>": 98,
    "<|channel>": 100, "<channel|>": 101, "<|turn>": 105, "<turn|>": 106,
}
CORPUS_MODULES = [
    "abc", "argparse", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "email.message", "enum", "fractions", "functools", "gettext", "glob",
    "heapq", "html", "http.client", "inspect", "ipaddress", "json", "logging", "mailbox", "operator", "optparse",
    "pathlib", "pickle", "pprint", "queue", "random", "shlex", "shutil", "statistics", "string", "subprocess",
    "tarfile", "textwrap", "threading", "typing", "unittest.case", "urllib.parse", "uuid", "zipfile",
]


def special_tokens() -> list[str]:
    by_id = {i: tok for tok, i in GEMMA_SPECIAL_IDS.items()}
    return [by_id.get(i, f"<unused{i}>") for i in range(FIRST_BPE_ID)]


def corpus() -> list[str]:
    with contextlib.redirect_stdout(io.StringIO()):  # `import this` prints the Zen
        import this
    texts = [codecs.decode(this.s, "rot13")]
    for name in CORPUS_MODULES:
        mod = importlib.import_module(name)
        texts.append(inspect.getdoc(mod) or "")
        for attr in sorted(getattr(mod, "__all__", None) or dir(mod)):
            obj = getattr(mod, attr, None)
            if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            texts.append(inspect.getdoc(obj) or "")
    return [t for t in texts if t.strip()]


def train(texts: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    # No prefix space: Gemma's tokenizer does not invent a leading space either.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in special_tokens()],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes -> any UTF-8 text round-trips
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def check(tok: Tokenizer) -> None:
    assert tok.get_vocab_size(with_added_tokens=True) == VOCAB_SIZE, tok.get_vocab_size(with_added_tokens=True)
    for i, t in enumerate(special_tokens()):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t), i)
    assert min(i for t, i in tok.get_vocab().items() if i >= FIRST_BPE_ID) == FIRST_BPE_ID
    for s in ["Why is the sky blue?", "  tabs\tand\nnewlines  ", "héllo wörld — 日本語 🙂"]:
        ids = tok.encode(s, add_special_tokens=False).ids
        assert all(i >= FIRST_BPE_ID for i in ids), ids
        assert tok.decode(ids) == s, (s, tok.decode(ids))
    ids = tok.encode("<bos><|turn>user\nhi<turn|>\n", add_special_tokens=False).ids
    assert ids[:2] == [2, 105] and 106 in ids, ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "dgemma/assets/default")
    args = ap.parse_args()
    texts = corpus()
    print(f"corpus: {len(texts)} texts, {sum(map(len, texts))} chars, "
          f"sha256 {hashlib.sha256(chr(0).join(texts).encode()).hexdigest()[:16]}")
    tok = train(texts)
    check(tok)
    args.out.mkdir(parents=True, exist_ok=True)
    tok.save(str(args.out / "tokenizer.json"), pretty=False)
    config = {
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "mask_token": "<mask>", "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096,
    }
    (args.out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        data = (args.out / name).read_bytes()
        print(f"{name}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}")


if __name__ == "__main__":
    main()

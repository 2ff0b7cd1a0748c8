"""Sudoku, the fine-tuning showcase: puzzles generated in code, a small DiffusionGemma-architecture model trained on
them with `dgemma train`, and solve rate against the number of denoising steps beside an autoregressive baseline.

    python scripts/sudoku.py data build/sudoku [--n 4]          # puzzles (JSONL) + a word-level tokenizer + config
    dgemma train build/sudoku/train.jsonl --mode scratch --config build/sudoku/config.json \\
        --tokenizer build/sudoku --out build/sudoku-diffusion ...   # see docs/finetuning.md for the exact flags
    python scripts/sudoku.py eval build/sudoku build/sudoku-diffusion --ar build/sudoku-ar

Puzzles: a random valid grid (a base pattern shuffled by digit relabelling, row/column swaps inside bands and
stacks, band/stack swaps, transposition), then cells removed in random order while the solution stays unique.
Train and held-out puzzles come from disjoint sets of solution grids, so solving held-out puzzles needs the rules,
not memory. Tokens: one per cell ("1".."n", "." for a blank), then "=", then the solution; only the solution and
<eos> are supervised. The AR baseline is the same command with --diffusion-weight 0, decoded greedily.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from build_default_tokenizer import special_tokens  # noqa: E402

from dgemma.config import ModelArgs  # noqa: E402
from dgemma.engine.cache import KVCache  # noqa: E402
from dgemma.loader import official_config  # noqa: E402


def grid(n: int, rng: random.Random) -> list[list[int]]:
    b = int(n**0.5)
    base = [[(b * (r % b) + r // b + c) % n + 1 for c in range(n)] for r in range(n)]
    digits = list(range(1, n + 1))
    rng.shuffle(digits)
    g = [[digits[v - 1] for v in row] for row in base]
    bands = list(range(b))
    rng.shuffle(bands)
    rows = [band * b + r for band in bands for r in rng.sample(range(b), b)]
    stacks = list(range(b))
    rng.shuffle(stacks)
    cols = [s * b + c for s in stacks for c in rng.sample(range(b), b)]
    g = [[g[r][c] for c in cols] for r in rows]
    return [list(x) for x in zip(*g)] if rng.random() < 0.5 else g


def count_solutions(cells: list[int], n: int, limit: int = 2) -> int:
    b = int(n**0.5)
    try:
        i = cells.index(0)
    except ValueError:
        return 1
    r, c = divmod(i, n)
    used = {cells[r * n + k] for k in range(n)} | {cells[k * n + c] for k in range(n)}
    br, bc = r - r % b, c - c % b
    used |= {cells[(br + y) * n + bc + x] for y in range(b) for x in range(b)}
    total = 0
    for v in range(1, n + 1):
        if v not in used:
            cells[i] = v
            total += count_solutions(cells, n, limit - total)
            cells[i] = 0
            if total >= limit:
                break
    return total


def puzzle(solution: list[int], n: int, blanks: int, rng: random.Random) -> list[int]:
    cells = list(solution)
    removed = 0
    for i in rng.sample(range(n * n), n * n):
        keep, cells[i] = cells[i], 0
        if count_solutions(list(cells), n) != 1:
            cells[i] = keep
        else:
            removed += 1
        if removed == blanks:
            break
    return cells


def line(p: list[int], s: list[int]) -> dict:
    return {"prompt": " ".join(str(v) if v else "." for v in p) + " =",
            "completion": " " + " ".join(map(str, s))}


def make_data(out: Path, n: int, train_size: int, test_size: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    grids = {tuple(sum(grid(n, rng), [])) for _ in range(20000)}
    grids = sorted(grids)
    rng.shuffle(grids)
    n_test = max(1, len(grids) // 5)
    test_grids, train_grids = grids[:n_test], grids[n_test:]
    lo, hi = (4, 10) if n == 4 else (30, 50)
    out.mkdir(parents=True, exist_ok=True)
    for name, pool, size in (("train", train_grids, train_size), ("test", test_grids, test_size)):
        with (out / f"{name}.jsonl").open("w") as f:
            for _ in range(size):
                s = list(rng.choice(pool))
                f.write(json.dumps(line(puzzle(s, n, rng.randint(lo, hi), rng), s)) + "\n")
    write_tokenizer(out, n)
    C = 32 if n == 4 else 96
    args = ModelArgs(vocab_size=128, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_experts=4,
                     top_k_experts=2, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                     num_global_key_value_heads=1, global_head_dim=64, sliding_window=C, eos_token_id=[1],
                     canvas_length=C, max_position_embeddings=4096, image_token_id=4, boi_token_id=4, eoi_token_id=4)
    (out / "config.json").write_text(json.dumps(official_config(args), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [1], "pad_token_id": 0}) + "\n")
    print(f"{len(train_grids)} train grids, {len(test_grids)} held-out grids → {out}")


def write_tokenizer(out: Path, n: int) -> None:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(special_tokens())}
    for t in [*map(str, range(1, n + 1)), ".", "="]:
        vocab[t] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True) for t in special_tokens()])
    tok.save(str(out / "tokenizer.json"))
    cfg = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg) + "\n")


@torch.no_grad()
def ar_solve(model, prompt: list[int], length: int) -> list[int]:
    """Greedy autoregressive decoding through the encoder (the AR baseline: one forward per token)."""
    ids = torch.tensor([prompt])
    cache = KVCache(model.args, 1, len(prompt) + length + 1, "cpu", torch.float32)
    h = model.encode(ids, torch.arange(len(prompt))[None], cache)
    cache.advance(len(prompt))
    out = []
    for _ in range(length):
        nxt = int(model.lm_head(h[:, -1]).argmax(-1))
        out.append(nxt)
        h = model.encode(torch.tensor([[nxt]]), torch.tensor([[cache.length]]), cache)
        cache.advance(1)
    return out


def evaluate(data: Path, model_dir: Path, ar_dir: Path | None, steps: list[int], limit: int) -> None:
    from dgemma import LLM, SamplingParams
    from dgemma.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(data)
    rows = [json.loads(x) for x in (data / "test.jsonl").read_text().splitlines()][:limit]
    cells = len(rows[0]["completion"].split())
    llm = LLM(model_dir, device="cpu", dtype="float32")
    prompts = [tok.encode(r["prompt"], add_bos=True) for r in rows]
    answers = [tok.encode(r["completion"]) for r in rows]
    blanks = [[i for i, c in enumerate(r["prompt"].split()[:cells]) if c == "."] for r in rows]
    n_blank = sum(map(len, blanks))

    def blank_right(outs) -> float:  # the cells the model had to fill (the others are copies of the prompt)
        return 100 * sum(sum(o[i] == a[i] for i in b if i < len(o)) for o, a, b in zip(outs, answers, blanks)) / n_blank
    print(f"{len(rows)} held-out puzzles ({cells} cells, from solution grids never seen in training)\n")
    print("| model | max denoising steps | mean steps used | solved | cells right | blank cells right |\n"
          "|---|---|---|---|---|---|")
    for s in steps:
        outs = llm.generate(prompts, SamplingParams(max_new_tokens=cells + 1, max_denoising_steps=s, seed=0))
        solved = sum(o.token_ids[:cells] == a for o, a in zip(outs, answers))
        right = sum(sum(x == y for x, y in zip(o.token_ids[:cells], a)) for o, a in zip(outs, answers))
        used = sum(o.stats["mean_steps_per_canvas"] for o in outs) / len(outs)
        print(f"| diffusion | {s} | {used:.1f} | {100 * solved / len(rows):.1f}% | "
              f"{100 * right / (cells * len(rows)):.1f}% | {blank_right([o.token_ids for o in outs]):.1f}% |",
              flush=True)
    if ar_dir is not None:
        ar = LLM(ar_dir, device="cpu", dtype="float32").model
        outs = [ar_solve(ar, p, cells) for p in prompts]
        solved = sum(o == a for o, a in zip(outs, answers))
        right = sum(sum(x == y for x, y in zip(o, a)) for o, a in zip(outs, answers))
        print(f"| autoregressive (greedy) | {cells} forwards | - | {100 * solved / len(rows):.1f}% | "
              f"{100 * right / (cells * len(rows)):.1f}% | {blank_right(outs):.1f}% |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("out", type=Path)
    d.add_argument("--n", type=int, default=4, choices=(4, 9))
    d.add_argument("--train-size", type=int, default=20000)
    d.add_argument("--test-size", type=int, default=500)
    e = sub.add_parser("eval")
    e.add_argument("data", type=Path)
    e.add_argument("model", type=Path)
    e.add_argument("--ar", type=Path, default=None)
    e.add_argument("--steps", default="1,2,4,8,16")
    e.add_argument("--limit", type=int, default=500)
    a = ap.parse_args()
    if a.cmd == "data":
        make_data(a.out, a.n, a.train_size, a.test_size)
    else:
        evaluate(a.data, a.model, a.ar, [int(x) for x in a.steps.split(",")], a.limit)


if __name__ == "__main__":
    main()

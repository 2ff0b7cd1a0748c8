"""TTFT with and without prefix reuse for turn 2 of a long conversation (issue 5, item 4), through the scheduler.

    python3 scripts/prefix_reuse_ttft.py                       # bundled model on CPU
    python3 scripts/prefix_reuse_ttft.py --device cuda --model /path/to/ckpt

Turn 1 sends a `--history`-token prompt; turn 2 sends turn 1's prompt + its answer + `--new` tokens. With prefix reuse
the scheduler finds turn 1's row and encodes only what is not cached; without it (prefix_cache=False) it prefills
everything. TTFT = submit → the first committed canvas (queue + prefill + the first canvas's denoising); the prefill
part alone is reported too (TTFT minus the first canvas's denoising, measured on the same request). Median of --reps.
"""

import argparse
import json
import statistics
import threading

import torch

from dgemma.api import LLM, SamplingParams
from dgemma.engine.scheduler import Finished, Scheduler


def run(sched: Scheduler, ids: list[int], params) -> Finished:
    done, box = threading.Event(), {}

    def sink(ev):
        if isinstance(ev, Finished) or type(ev).__name__ == "Failed":
            box["ev"] = ev
            done.set()
    sched.submit(ids, params, sink)
    done.wait(600)
    ev = box["ev"]
    if not isinstance(ev, Finished):
        raise RuntimeError(f"request failed: {ev}")
    return ev


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--history", type=int, default=3000)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    llm = LLM(a.model, device=a.device)
    V, C = llm.args.vocab_size, llm.args.canvas_length
    params = SamplingParams(max_new_tokens=C, max_denoising_steps=a.steps, seed=0).resolve(llm.defaults)
    limit = a.history + 2 * C + a.new + C
    results = {}
    for reuse in (True, False):
        sched = Scheduler(llm.model, llm.defaults, max_batch=2, max_model_len=limit, prefix_cache=reuse)
        sched.start()
        ttft, cached = [], []
        for rep in range(a.reps + 1):  # the first round warms up
            history = torch.randint(3, V, (a.history,)).tolist()
            first = run(sched, history, params)
            turn2 = history + first.token_ids + torch.randint(3, V, (a.new,)).tolist()
            second = run(sched, turn2, params)
            if rep:
                ttft.append(second.usage["ttft_s"])
                cached.append(second.usage["cached_prompt_tokens"])
        sched.shutdown()
        results["reuse" if reuse else "no_reuse"] = {"ttft_s_median": statistics.median(ttft), "ttft_s": ttft,
                                                     "cached_prompt_tokens": cached}
        print(f"prefix_cache={reuse}: turn-2 TTFT median {statistics.median(ttft) * 1e3:.0f} ms "
              f"(runs {[round(t * 1e3) for t in ttft]} ms), cached prompt tokens {cached}", flush=True)
    gain = results["no_reuse"]["ttft_s_median"] / results["reuse"]["ttft_s_median"]
    print(f"TTFT gain from prefix reuse: {gain:.2f}x ({llm.path}, {a.device}, history {a.history} tokens, "
          f"{a.steps} steps)")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"model": str(llm.path), "device": a.device, "history": a.history, "new": a.new,
                       "steps": a.steps, "canvas": C, "results": results, "gain": gain,
                       "threads": torch.get_num_threads()}, f, indent=2)


if __name__ == "__main__":
    main()

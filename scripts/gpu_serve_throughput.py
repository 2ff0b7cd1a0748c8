"""Aggregate throughput of `dgemma serve` with 1, 4 and 16 concurrent clients, and the TTFT gain of prefix reuse,
on a model with random weights at the real 26B-A4B shape (no checkpoint needed; issue 5, item 7).

    python3 scripts/gpu_serve_throughput.py --clients 1 4 16 --out serve_throughput.json
    python3 scripts/gpu_serve_throughput.py --shape tiny --device cpu --dtype fp32 --clients 1 2   (a CPU dry run)

The server is the real app (`dgemma.serve.build_app`: scheduler, HTTP, JSON) on 127.0.0.1 under uvicorn. A random
model has no tokenizer, so a word-level stand-in maps id i to the word "t<i>"; prompts are token-id lists sent to
/v1/completions (OpenAI accepts token arrays there). Every request asks for `--max-tokens` new tokens at
`--steps` fixed denoising steps (the confidence threshold is set so low that the adaptive stop cannot fire; random
weights rarely emit EOS). Aggregate tok/s = completion tokens of all requests / wall time of the round, queueing,
prefill and HTTP included.
"""

import argparse
import json
import threading
import time
import urllib.request

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

from dgemma import benchmark as bm
from dgemma.api import LLM, resolve_dtype
from dgemma.config import DiffusionParams
from dgemma.serve import build_app
from dgemma.tokenizer import Tokenizer


def stand_in_llm(shape: str, device: str, dtype: torch.dtype) -> LLM:
    model = bm.random_model(shape, device, dtype)
    V = model.args.vocab_size
    words = {"<pad>": 0, "<eos>": 1, "<bos>": 2} | {f"t{i}": i for i in range(3, V)}
    hf = HFTokenizer(WordLevel(words, unk_token="<pad>"))
    hf.pre_tokenizer = WhitespaceSplit()
    llm = object.__new__(LLM)
    llm.model, llm.args, llm.path, llm.fast, llm.lora = model, model.args, f"random-{shape}", None, None
    llm.device, llm.dtype, llm.is_default_model, llm.load_seconds = torch.device(device), dtype, False, 0.0
    llm.defaults = DiffusionParams(eos_token_ids=(1,), pad_token_id=0)
    llm.tokenizer = Tokenizer(hf, chat_template=None)
    return llm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="26b-a4b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--port", type=int, default=8791)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import uvicorn

    dtype = resolve_dtype(a.dtype, torch.device(a.device))
    t0 = time.perf_counter()
    llm = stand_in_llm(a.shape, a.device, dtype)
    app = build_app(llm, model_name="random", max_batch=a.max_batch, max_model_len=a.max_model_len)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=a.port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    base = f"http://127.0.0.1:{a.port}"
    while not server.started:
        time.sleep(0.2)
    V = llm.args.vocab_size
    gen = torch.Generator().manual_seed(0)

    def prompt(n: int) -> list[int]:
        return torch.randint(3, V, (n,), generator=gen).tolist()

    def complete(ids: list[int], seed: int, max_tokens: int | None = None) -> dict:
        body = json.dumps({"model": "random", "prompt": ids, "max_tokens": max_tokens or a.max_tokens, "seed": seed,
                           "max_denoising_steps": a.steps, "confidence_threshold": 1e-30}).encode()
        req = urllib.request.Request(f"{base}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:  # raises on 4xx/5xx
            return json.loads(r.read())

    complete(prompt(a.prompt_len), 0)  # warm-up: first canvas, lazy allocations
    print(f"server up and warm in {time.perf_counter() - t0:.1f} s ({llm.path}, {a.device}, {dtype})", flush=True)
    rows = []
    for n in a.clients:
        usages, errors = [], []
        prompts = [[prompt(a.prompt_len) for _ in range(a.requests_per_client)] for _ in range(n)]

        def client_loop(i: int, prompts=prompts, usages=usages, errors=errors) -> None:
            try:
                for j, ids in enumerate(prompts[i]):
                    usages.append(complete(ids, seed=1000 * i + j)["usage"])
            except Exception as e:  # reported below, never silently dropped
                errors.append(repr(e))
        t = time.perf_counter()
        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(n)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t
        tokens = sum(u["completion_tokens"] for u in usages)
        row = {"clients": n, "requests": len(usages), "errors": errors, "wall_s": wall,
               "completion_tokens": tokens, "aggregate_tok_s": tokens / wall,
               "mean_request_s": sum(u["total_s"] for u in usages) / max(len(usages), 1),
               "mean_ttft_s": sum(u["ttft_s"] or 0 for u in usages) / max(len(usages), 1),
               "mean_tokens_per_forward": sum(u["tokens_per_forward"] for u in usages) / max(len(usages), 1)}
        rows.append(row)
        print(f"{n:>3} clients: {row['requests']} requests, {tokens} tokens in {wall:.2f} s → "
              f"{row['aggregate_tok_s']:.0f} tok/s aggregate; mean request {row['mean_request_s']:.2f} s, "
              f"TTFT {row['mean_ttft_s'] * 1e3:.0f} ms; errors {len(errors)}", flush=True)
    # Prefix reuse: turn 2 of a conversation (turn 1's prompt + answer + a new message) against a prompt of the same
    # length that shares nothing with any cached row.
    first = prompt(a.prompt_len)
    complete(first, seed=7, max_tokens=64)
    turn2 = first + prompt(64)  # the row's cache holds `first` (its last canvas is not encoded)
    reuse = complete(turn2, seed=8, max_tokens=64)["usage"]
    fresh = complete(prompt(len(turn2)), seed=9, max_tokens=64)["usage"]
    prefix = {"prompt_tokens": reuse["prompt_tokens"],
              "cached_tokens_reuse": reuse.get("prompt_tokens_details", {}).get("cached_tokens"),
              "ttft_s_reuse": reuse["ttft_s"], "ttft_s_fresh": fresh["ttft_s"],
              "cached_tokens_fresh": fresh.get("prompt_tokens_details", {}).get("cached_tokens")}
    print(f"prefix reuse: {prefix}", flush=True)
    server.should_exit = True
    result = {"gpu": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu", "torch": torch.__version__,
              "shape": a.shape, "dtype": str(dtype), "prompt_len": a.prompt_len, "max_tokens": a.max_tokens,
              "steps": a.steps, "max_batch": a.max_batch, "max_model_len": a.max_model_len,
              "requests_per_client": a.requests_per_client, "rounds": rows, "prefix_reuse": prefix}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

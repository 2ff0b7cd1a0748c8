"""`dgemma serve`: the OpenAI-compatible HTTP server, with continuous batching and a browser playground at /.

What it does: loads a checkpoint (`LLM`), builds the batching `Scheduler` and the FastAPI app (`dgemma.serve`),
and runs it with uvicorn until Ctrl-C.

Design choices:
- Binds 127.0.0.1 unless --host says otherwise: the server has no rate limits, and an API key is opt-in.
- The API key comes from --api-key or the DGEMMA_API_KEY environment variable (the flag wins); the environment
  keeps it out of `ps` output.
- fastapi/uvicorn are the `serve` extra; without them this command says how to install them instead of failing
  on an import deep inside.
"""

from __future__ import annotations

import argparse
import os
import sys

from dgemma.cli.run import DEMO_NOTE, _device, _number

_positive = _number(int, 1, True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="checkpoint directory or Hugging Face id (default: the bundled demo model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=_number(int, 0, True), default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* and /metrics (default: $DGEMMA_API_KEY, "
                        "else no key)")
    p.add_argument("--max-batch", type=_positive, default=16, metavar="N",
                   help="requests denoised together at most; more wait in a queue (default: 16)")
    p.add_argument("--max-model-len", type=_positive, default=None, metavar="N",
                   help="prompt + generated tokens per request at most (default: the engine's choice)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id clients send and /v1/models lists (default: --model, or 'default')")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="re-encode every prompt instead of reusing a cached prefix of an earlier one")
    p.add_argument("--device", type=_device, default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the CUDA step's blocks (faster steps; compiles once per batch bucket at "
                        "start-up, minutes at the real shape; same as DGEMMA_COMPILE=1)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default: info)")


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from dgemma.serve import build_app
    except ImportError as e:
        raise ValueError(f"dgemma serve needs the server dependencies ({e.name} is missing): "
                         "pip install 'dgemma[serve]'") from e
    from dgemma.api import LLM

    # The measured serving configuration compiles nothing (docs/performance.md); --compile opts in.
    os.environ["DGEMMA_COMPILE"] = "1" if args.compile else os.environ.get("DGEMMA_COMPILE", "0")
    llm = LLM(args.model, device=args.device, dtype=args.dtype)
    if llm.is_default_model:
        print(f"dgemma: note: {DEMO_NOTE}", file=sys.stderr, flush=True)
    app = build_app(llm, model_name=args.served_model_name or args.model or "default",
                    api_key=args.api_key or os.environ.get("DGEMMA_API_KEY") or None, max_batch=args.max_batch,
                    max_model_len=args.max_model_len, prefix_cache=not args.no_prefix_cache)
    print(f"dgemma: serving {app.state.config.model_name!r} on http://{args.host}:{args.port} "
          f"(playground at /, API at /v1)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0

"""`dgemma run [PROMPT]`: generate text for one prompt.

What it does: loads a checkpoint (`LLM`), builds `SamplingParams` from the flags, consumes `LLM.stream` and shows
it one of three ways: a rich live view of the denoising canvas on a terminal; the committed text streamed canvas by
canvas when piped or with --no-visual; or one JSON object with --json. A stats line goes to stderr at the end.

Design choices:
- Every sampling flag defaults to None, meaning "the checkpoint's generation_config.json", so the CLI never
  restates a default the checkpoint owns. Values are range-checked by argparse types (a one-line usage error);
  cross-field rules (t_max > t_min against a checkpoint default) are left to `SamplingParams.resolve`.
- The prompt is the argument, or stdin when it is omitted or "-" (an interactive stdin is refused rather than
  waited on). In chat mode a piped prompt loses its trailing newline; in raw mode it is used verbatim.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Iterable

import torch

from dgemma.api import LLM, SamplingParams, resolve_device, resolve_dtype
from dgemma.cli.view import CommittedText, LiveView
from dgemma.engine.generate import CanvasEvent, Event, FinishedEvent, GenerationStats

DEMO_NOTE = ("bundled tiny demo model (5.3 M parameters, trained on fortune-cookie quotes): expect fortunes, "
             "not answers (pass --model for a real checkpoint)")
_GEN = "default: the checkpoint's generation_config.json"


# --- argument types: each turns a bad value into argparse's one-line error ---------------------------------------
def _number(kind: type, low: float, inclusive: bool):
    rule = f"{'an integer' if kind is int else 'a number'} {'>=' if inclusive else '>'} {low:g}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {rule}") from None
        if value < low or (value == low and not inclusive) or value != value:  # value != value: NaN
            raise argparse.ArgumentTypeError(f"{text!r} is not {rule}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _device(text: str) -> str:
    if re.fullmatch(r"cpu|cuda(:\d+)?", text) is None:
        raise argparse.ArgumentTypeError(f"device {text!r} is not supported; use cpu, cuda or cuda:N")
    try:
        dev = resolve_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"device {text!r}: this machine has {torch.cuda.device_count()} CUDA "
                                         "device(s)")
    return text


def _dtype(text: str) -> str:
    try:
        resolve_dtype(text, torch.device("cpu"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", default=None, help="the prompt; read from stdin when omitted or '-'")
    p.add_argument("--model", default=None, metavar="DIR_OR_ID",
                   help="checkpoint directory or Hugging Face hub id (owner/name), e.g. "
                   "google/diffusiongemma-26B-A4B-it; default: the bundled tiny demo model (trained on fortunes)")
    p.add_argument("--lora", default=None, metavar="PATH",
                   help="a LoRA adapter directory (from `dgemma train --mode lora`), merged into --model at load")
    _add_sampling(p.add_argument_group("sampling (each defaults to the checkpoint's generation_config.json)"))
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--chat", dest="chat", action="store_true", default=True,
                     help="wrap the prompt in the checkpoint's chat template as a user turn (default)")
    fmt.add_argument("--raw", dest="chat", action="store_false",
                     help="use the prompt as plain text after <bos>, no chat template")
    p.add_argument("--thinking", action="store_true",
                   help="let the model think first (the chat template's enable_thinking); default: off")
    p.add_argument("--device", type=_device, default=None, help="cpu or cuda[:N]; default: cuda if available")
    p.add_argument("--dtype", type=_dtype, default=None,
                   help="float32, bfloat16 or float16; default: bfloat16 on cuda, float32 on cpu")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true",
                     help="print one JSON object (text, token_ids, finish_reason, stats, model, params) at the end")
    out.add_argument("--no-visual", action="store_true",
                     help="stream the committed text canvas by canvas even on a terminal (no live view)")


def _add_sampling(g) -> None:
    """One flag per SamplingParams field; None (the default) means the checkpoint's generation_config.json."""
    pos_int, nonneg_int = _number(int, 1, True), _number(int, 0, True)
    g.add_argument("--max-new-tokens", type=pos_int, metavar="N", help=f"tokens to generate at most; {_GEN}")
    g.add_argument("--max-denoising-steps", type=pos_int, metavar="N",
                   help=f"denoising steps per canvas at most (fewer when the adaptive stop fires); {_GEN}")
    g.add_argument("--entropy-bound", type=_number(float, 0, False), metavar="X",
                   help="accept the lowest-entropy tokens while their entropy sum minus the max stays under this, "
                   f"> 0; {_GEN} (sampler_config.entropy_bound)")
    g.add_argument("--t-min", type=_number(float, 0, True), metavar="T",
                   help=f"temperature at the last step, >= 0; {_GEN}")
    g.add_argument("--t-max", type=_number(float, 0, False), metavar="T",
                   help=f"temperature at the first step, > t-min; {_GEN}")
    g.add_argument("--stability-threshold", type=nonneg_int, metavar="N",
                   help=f"steps the draft must stay unchanged to stop a canvas early, >= 0; {_GEN}")
    g.add_argument("--confidence-threshold", type=_number(float, 0, False), metavar="X",
                   help=f"stop a canvas early when the mean token entropy is below this, > 0; {_GEN}")
    g.add_argument("--seed", type=nonneg_int, metavar="N",
                   help="random seed for a reproducible output; default: none (a different output each run)")


def run(args: argparse.Namespace) -> int:
    _check(args)
    prompt = _read_prompt(args)
    # One-shot: skip the ~1 min torch.compile of the CUDA step unless asked for (DGEMMA_COMPILE=1); serve compiles.
    os.environ.setdefault("DGEMMA_COMPILE", "0")
    llm = LLM(args.model, device=args.device, dtype=args.dtype, lora=args.lora)
    if llm.is_default_model:
        print(f"dgemma: note: {DEMO_NOTE}", file=sys.stderr, flush=True)
    params = SamplingParams(**{k: getattr(args, k) for k in SamplingParams().to_dict()})
    resolved = params.resolve(llm.defaults)
    events = llm.stream(prompt, params, chat=args.chat, enable_thinking=args.thinking)
    if args.json:
        final = _drain(events)
        print(json.dumps(_json_result(llm, final, resolved), ensure_ascii=False))
    elif sys.stdout.isatty() and not args.no_visual:
        final = LiveView(llm.tokenizer, resolved, llm.args.canvas_length).run(events)
    else:
        final = _stream_plain(events, CommittedText(llm.tokenizer, resolved))
    print(_stats_line(final.stats, llm), file=sys.stderr)
    return 0


def _check(args: argparse.Namespace) -> None:
    if args.thinking and not args.chat:
        args._parser.error("--thinking needs the chat template; drop --raw")
    if args.t_min is not None and args.t_max is not None and args.t_max <= args.t_min:
        args._parser.error(f"--t-max ({args.t_max:g}) must be greater than --t-min ({args.t_min:g})")


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None and args.prompt != "-":
        return args.prompt
    if sys.stdin is None or sys.stdin.isatty():
        args._parser.error("no prompt: give one as an argument or pipe it on stdin")
    text = sys.stdin.read()
    text = text.rstrip("\n") if args.chat else text
    if not text.strip():
        args._parser.error("the prompt read from stdin is empty")
    return text


def _drain(events: Iterable[Event]) -> FinishedEvent:
    final = None
    for event in events:
        if isinstance(event, FinishedEvent):
            final = event
    assert final is not None, "the event stream ended without a FinishedEvent"
    return final


def _stream_plain(events: Iterable[Event], committed: CommittedText) -> FinishedEvent:
    """Print each committed canvas's new text as it arrives; the FinishedEvent's ids settle the last piece."""
    for event in events:
        if isinstance(event, FinishedEvent):
            sys.stdout.write(committed.finish(event.outputs[0].token_ids) + "\n")
            sys.stdout.flush()
            return event
        if isinstance(event, CanvasEvent):
            sys.stdout.write(committed.add(event.tokens[0].tolist()))
            sys.stdout.flush()
    raise AssertionError("the event stream ended without a FinishedEvent")


def _json_result(llm: LLM, final: FinishedEvent, resolved) -> dict:
    out, st = final.outputs[0], final.stats
    stats = dataclasses.asdict(out.stats) | {
        "mean_steps_per_canvas": st.mean_steps_per_canvas, "tokens_per_second": st.tokens_per_second,
        "prefill_s": st.prefill_s, "denoise_s": st.denoise_s, "total_s": st.total_s, "load_s": llm.load_seconds,
    } | _peak_memory(llm.device)
    result = {"text": llm.tokenizer.decode(out.token_ids), "token_ids": out.token_ids,
              "finish_reason": out.finish_reason, "stats": stats, "model": str(llm.path), "device": str(llm.device),
              "dtype": str(llm.dtype).removeprefix("torch."), "params": dataclasses.asdict(resolved)}
    if llm.is_default_model:
        result["note"] = DEMO_NOTE
    return result


def _peak_memory(device: torch.device) -> dict:
    """Peak GPU memory allocated by torch on CUDA, else the process's peak resident set size."""
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device), "peak_memory_kind": "cuda_allocated"}
    try:
        import resource
    except ImportError:  # not on Windows
        return {"peak_memory_bytes": None, "peak_memory_kind": None}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_memory_bytes": rss if sys.platform == "darwin" else rss * 1024, "peak_memory_kind": "max_rss"}


def _stats_line(st: GenerationStats, llm: LLM) -> str:
    mem = _peak_memory(llm.device)
    mem_s = "n/a" if mem["peak_memory_bytes"] is None else f"{mem['peak_memory_bytes'] / 2**20:.0f} MiB"
    where = "GPU peak" if mem["peak_memory_kind"] == "cuda_allocated" else "peak RSS"
    return (f"{st.new_tokens} new tokens · {st.canvases} canvas{'es' if st.canvases != 1 else ''} · "
            f"{st.mean_steps_per_canvas:.1f} steps/canvas · {st.tokens_per_forward:.2f} tokens/forward · "
            f"{st.tokens_per_second:.1f} tokens/s · load {llm.load_seconds:.2f} s · {where} {mem_s}")

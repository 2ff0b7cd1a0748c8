"""`dgemma <subcommand>`: the argparse dispatcher.

What it does: builds one parser with a subparser per entry of `COMMANDS`, parses, and calls the chosen module's
`run(args)`; it owns exit codes and error reporting so that subcommands only raise.

Design choices:
- One table, one module per subcommand (`add_arguments(parser)`, `run(args) -> int`); adding a subcommand is one
  row here plus its module. *mlx-lm `mlx_lm/cli.py`*
- Exit codes: 0 ok; 1 a library error (ValueError/TypeError/OSError: a bad value, a missing checkpoint), printed as
  one `dgemma: error: ...` line; 2 a usage error, one `dgemma run: error: ...` line (no usage dump, which
  buries the message); 130 on Ctrl-C.
  `DGEMMA_DEBUG=1` re-raises so the traceback shows.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand → (module, one-line help). Later: chat, serve, bench, doctor, quantize, train.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("dgemma.cli.run", "generate text for one prompt, with a live view of the denoising canvas"),
    "serve": ("dgemma.cli.serve", "an OpenAI-compatible server with batching, draft streaming and a playground"),
    "bench": ("dgemma.cli.bench", "time denoising steps, commits and prefill against the HBM floor (GPU)"),
    "train": ("dgemma.cli.train", "train or fine-tune (full or LoRA) with the block-diffusion objective"),
    "merge-lora": ("dgemma.cli.merge_lora", "merge a LoRA adapter into its base model (official layout)"),
}


class Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error (`dgemma run: error: ...`, exit 2) instead of usage + error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> Parser:
    from dgemma import __version__

    parser = Parser(prog="dgemma", description="Local inference for DiffusionGemma block-diffusion language models.")
    parser.add_argument("--version", action="version", version=f"dgemma {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (module_name, help_) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_, description=help_[0].upper() + help_[1:] + ".")
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if args.command is None:
            if extra:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            parser.print_help(sys.stderr)
            return 2
        if extra:  # report it as the subcommand's error, where the flag was meant to go
            args._parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return args._run(args)
    except SystemExit as e:  # argparse (usage errors, --help, --version): keep its code, never a traceback
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `dgemma run ... | head`: the reader left; stop quietly
        _silence_stdout()
        return 1
    except (ValueError, TypeError, OSError) as e:
        if os.environ.get("DGEMMA_DEBUG") == "1":
            raise
        print(f"dgemma: error: {e}", file=sys.stderr)
        return 1


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not raise a second BrokenPipeError."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":  # `python -m dgemma.cli.main`; `python -m dgemma.cli` needs a cli/__main__.py
    sys.exit(main())

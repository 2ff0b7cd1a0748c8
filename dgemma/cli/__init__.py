"""`dgemma` command line: a thin dispatcher, one module per subcommand."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from dgemma.cli.main import main as _main

    return _main(argv)


if __name__ == "__main__":
    sys.exit(main())

"""Command line: ``python -m lavp_core <command> ...``.

Every command that takes an image and a model shares the scenario options (``--dataset``,
``--index``, ``--arch``, ``--weights``, ``--seed``, ``--image``, ``--label``, ``--data-root``).
A :class:`~lavp_core.errors.LavpError` is printed as one line on stderr and the exit status is 2.
A command with ``--threads`` gets its torch thread count set once, before it runs, by
:func:`~lavp_core.system.choose_threads` (default 1; see there for the measured reason).
"""

from __future__ import annotations

import argparse
import sys

from .commands import COMMANDS
from .commands.progress import end_open_line
from .errors import LavpError
from .system import choose_threads


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lavp_core",
                                     description="Gradient inversion attacks and loss-aware vulnerability proxies.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, configure, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        configure(p)
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if "threads" in vars(args):  # the commands that compute (see commands.base.add_threads_arg)
            args.threads = choose_threads(args.threads)
        return int(args.run(args) or 0)
    except LavpError as exc:
        end_open_line()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        end_open_line()
        print("error: interrupted", file=sys.stderr)
        return 130

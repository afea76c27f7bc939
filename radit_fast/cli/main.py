"""The ``radit`` command line.

Adding a subcommand: write ``radit_fast/cli/<name>.py`` with ``register(subparsers)`` that calls
``subparsers.add_parser(...)`` and ``parser.set_defaults(func=handler)``, where ``handler(args)`` returns
an exit code (or None for 0); then add the module name to :data:`COMMANDS`. Import heavy libraries
(torch, transformers, faiss) inside the handler so ``radit --help`` stays fast.

User errors (:class:`radit_fast.io.RaditError`, missing files, permissions) end with one line
``radit: error: ...`` on stderr and exit code 2, never a traceback (``--verbose`` logs the traceback).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from radit_fast.io import RaditError

#: Modules (under radit_fast.cli) that register subcommands, in help order.
COMMANDS = [
    "retrieval",
    "train",
    "eval",
    "run",
]

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
logger = logging.getLogger("radit_fast.cli")


def build_parser() -> argparse.ArgumentParser:
    from radit_fast import __version__

    parser = argparse.ArgumentParser(
        prog="radit", description="radit-fast: retrieval-augmented dual instruction tuning (RA-DIT)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (and tracebacks on errors)")
    parser.add_argument("--version", action="version", version=f"radit-fast {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"radit_fast.cli.{name}").register(subparsers)
    return parser


def _setup_logging(verbose: bool) -> None:
    rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        where = f"[rank {rank}] " if rank is not None else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s {where}%(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(logging.WARNING)
    level = logging.DEBUG if verbose else logging.INFO if rank in (None, "0") else logging.WARNING
    logging.getLogger("radit_fast").setLevel(level)


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
        msg = f"{e.filename}: {msg}"
    return msg


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 user error, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        code = args.func(args)
    except (RaditError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        logger.debug("traceback", exc_info=True)
        # under torchrun, rank 0 reports failures of every rank: the others stay quiet about them
        if not (getattr(e, "quiet_on_nonzero_rank", False) and os.environ.get("RANK", "0") != "0"):
            print(f"radit: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("radit: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())

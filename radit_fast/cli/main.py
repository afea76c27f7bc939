"""The ``radit`` command line.

Adding a subcommand: write ``radit_fast/cli/<name>.py`` with ``register(subparsers)`` that calls
``subparsers.add_parser(...)`` and ``parser.set_defaults(func=handler)``, where ``handler(args)`` returns
an exit code (or None for 0); then add the module name to :data:`COMMANDS`. Import heavy libraries
(torch, transformers, faiss) inside the handler so ``radit --help`` stays fast.

User errors (:class:`radit_fast.io.RaditError`, option values argparse rejects, missing files, permissions,
a full disk, a file-size limit, a quota or a read-only file system) end with one line ``radit: error: ...``
on stderr and exit code 2, never a traceback or a usage block (``--verbose`` logs the traceback).
Ctrl-C exits with 130; SIGTERM (torchrun tearing down its workers, batch schedulers, ``kill``) is raised as
:class:`Terminated` (a SystemExit) in the main thread, so every subcommand's ``finally`` blocks and
``atomic_dir`` clean-ups run, and exits with 143. A process blocked inside a C call (e.g. a gloo
collective) only sees it when that call returns.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence

from radit_fast.io import RaditError, write_errno, write_failure

#: Modules (under radit_fast.cli) that register subcommands, in help order.
COMMANDS = [
    "retrieval",
    "train",
    "eval",
    "ask",
    "run",
]

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM
logger = logging.getLogger("radit_fast.cli")


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line ``radit: error: ...`` (no usage block), like every other
    user error; its subcommand parsers are of the same class (argparse's default ``parser_class``)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        message = " ".join(message.split())
        self.exit(EXIT_USER_ERROR, f"radit: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from radit_fast import __version__

    parser = OneLineParser(
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


class Terminated(SystemExit):
    """SIGTERM, raised in the main thread so that clean-up code runs (SystemExit: ``except Exception`` skips it)."""


def _raise_terminated(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the clean-up
    raise Terminated(EXIT_TERMINATED)


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` while the block runs (main thread only), then restore the handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 user error, 130 interrupted, 143 terminated)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        with _sigterm_as_exit():
            code = args.func(args)
    except Terminated:
        print("radit: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except (RaditError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        logger.debug("traceback", exc_info=True)
        # under torchrun, rank 0 reports failures of every rank: the others stay quiet about them
        if not (getattr(e, "quiet_on_nonzero_rank", False) and os.environ.get("RANK", "0") != "0"):
            print(f"radit: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:  # noqa: BLE001 - only write failures are handled here, the rest is re-raised
        if write_errno(e) is None:
            raise
        # a writer outside the atomic helpers (those report the bytes and remove their output themselves);
        # libraries that write by themselves (safetensors, faiss) carry the system's message in theirs
        logger.debug("traceback", exc_info=True)
        where = getattr(e, "filename", None) or getattr(args, "out", None) or "the output"
        print(f"radit: error: {_one_line(write_failure(e, where, removed=False))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("radit: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())

"""What the command-line tools share: one-line errors (exit code 2) unless `--debug`, and model folder checks."""

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")


def run_command(command: Callable[[], T], debug: bool) -> T:
    """`command()`; an error becomes one line on stderr and exit code 2 (with `debug`, the traceback)."""
    try:
        return command()
    except Exception as error:
        if debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"error: {message} (--debug shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


def model_folder(path: str | Path, flag: str = "--model") -> Path:
    """`path` if it is a folder; transformers would read a missing one as a Hub repo id and say so confusingly."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{flag}: no folder {str(path)!r}; give the path of a saved model folder.")
    return Path(path)

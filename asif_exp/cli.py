"""What the command-line entry points (`python -m asif_exp`, `asif_exp.extract`,
`asif_exp.explain`) share: a user's mistake is one line `error: ...` on stderr and exit status 1.

A user's mistake is a config value or key (`ConfigError`, Hydra's composition errors: unknown
key, wrong type, missing group option), bad data (`DataError`) or a damaged file (a saved model,
a results.json): the types of `asif_exp/errors.py`. Anything else is a bug and keeps its
traceback. `ASIF_DEBUG=1` shows the full traceback of every error.

    @hydra.main(...)
    def main(cfg):
        with user_errors_in_one_line():
            ...

    if __name__ == "__main__":
        run_cli(main)
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import NoReturn

from hydra.errors import HydraException

from asif_exp.errors import USER_ERRORS

DEBUG_VARIABLE = "ASIF_DEBUG"


def debugging() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def one_line(error: BaseException) -> str:
    """The error's message on one line: its first line, its cause's first line (Hydra wraps
    OmegaConf's "Key 'kk' not in 'AsifConfig'"), the other lines joined with "; ", and the
    indented list after a line ending in ":" (Hydra's available options) joined with commas."""
    head: list[str] = []
    items: list[str] = []
    for line in str(error).splitlines():
        if items and not line[:1].isspace():
            break  # the list is over; what follows is detail (Hydra's search path)
        if line.strip():
            listing = items or (head and head[-1].endswith(":"))
            (items if listing else head).append(line.strip())
    head = head or [type(error).__name__]
    cause = str(error.__cause__ or "").strip()
    if cause:
        head[0] = f"{head[0].rstrip('.')}: {cause.splitlines()[0]}"
    return "; ".join(head) + (" " + ", ".join(items) if items else "")


def fail(error: BaseException) -> NoReturn:
    print(f"error: {one_line(error)} ({DEBUG_VARIABLE}=1 for the traceback)", file=sys.stderr)
    raise SystemExit(1)


@contextlib.contextmanager
def user_errors_in_one_line() -> Iterator[None]:
    """Inside a Hydra job: a user's mistake leaves as one line and exit status 1. (Raised from
    the job, it would reach the console under Hydra's traceback.)"""
    try:
        yield
    except USER_ERRORS as error:
        if debugging():
            raise
        fail(error)


def run_cli(hydra_main: Callable[[], object]) -> None:
    """Call a `@hydra.main` function; a config that does not compose is one line too."""
    if not debugging():
        # Hydra then re-raises composition errors instead of printing them with a traceback.
        os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra_main()
    except HydraException as error:
        if debugging():
            raise
        fail(error)

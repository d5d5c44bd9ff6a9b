"""What the command-line entry points (`python -m asif_exp`, `asif_exp.extract`,
`asif_exp.explain`) share: a user's mistake is one line `error: ...` on stderr and exit status 1.

A user's mistake is a config value or key (`ConfigError`, Hydra's composition errors: unknown
key, wrong type, missing group option, an override Hydra cannot parse), bad data (`DataError`),
a damaged file (a saved model, a results.json): the types of `asif_exp/errors.py`; or a
file-system fault (`OSError` naming its path: a file where a folder is expected, a folder that
cannot be created or written, a full disk). Anything else is a bug and keeps its traceback.
`ASIF_DEBUG=1` shows the full traceback of every error.

In a multirun (`-m`), a job that fails goes into the job's log and the sweep goes on with the
next job; at the end, one line per failed job says which one and why, and the exit status is 1.

    @hydra.main(...)
    def main(cfg):
        with user_errors_in_one_line():
            ...

    if __name__ == "__main__":
        run_cli(main)
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NoReturn

from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, OverrideParseException
from hydra.types import RunMode

from asif_exp.errors import USER_ERRORS

DEBUG_VARIABLE = "ASIF_DEBUG"
log = logging.getLogger("asif_exp")
# What a file-system error means, where its own message does not say it.
PATH_HINTS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "no permission",
    errno.EPERM: "not permitted",
    errno.ENOTDIR: "a part of this path is a file, not a folder",
    errno.EISDIR: "a folder where a file is expected",
    errno.EEXIST: "something is already there: a file where a folder is expected?",
    errno.ENOENT: "no such file or folder",
}
OVERRIDE_HINT = (
    "quote a value holding #, =, spaces or brackets: key='a value' (in the shell, the whole "
    "override in double quotes: \"key='a value'\")"
)


def is_user_error(error: BaseException) -> bool:
    """A user's mistake (one line) rather than a bug (a traceback): the user-error types, and
    file-system errors that name their path or are about space, permissions or paths."""
    if isinstance(error, USER_ERRORS):
        return True
    return (
        isinstance(error, OSError)
        and not isinstance(error, HydraException)
        and bool(error.filename or error.errno in PATH_HINTS)
    )


def path_error_line(error: OSError) -> str:
    """`<path>: <what the system said> (<what that means>)`, the path first."""
    paths = [str(p) for p in (error.filename, error.filename2) if p]
    what = error.strerror or str(error)
    hint = PATH_HINTS.get(error.errno)
    detail = f" ({hint})" if hint and hint.lower() not in what.lower() else ""
    return f"{' -> '.join(paths) + ': ' if paths else ''}{what}{detail}"


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
    if isinstance(error, OSError) and not isinstance(error, (*USER_ERRORS, HydraException)):
        return path_error_line(error)  # (Hydra's MissingConfigException is an OSError too)
    head = head or [type(error).__name__]
    cause = str(error.__cause__ or "").strip()
    if cause:
        head[0] = f"{head[0].rstrip('.')}: {cause.splitlines()[0]}"
    return "; ".join(head) + (" " + ", ".join(items) if items else "")


def fail(error: BaseException) -> NoReturn:
    print(f"error: {one_line(error)} ({DEBUG_VARIABLE}=1 for the traceback)", file=sys.stderr)
    raise SystemExit(1)


@dataclass
class FailedJob:
    number: int
    overrides: str
    message: str
    output_dir: str
    bug: bool


class _Sweep:
    """The jobs of this process's multirun (Hydra's basic launcher runs them here, one after
    another) and those that failed."""

    jobs = 0
    failed: list[FailedJob] = []


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@contextlib.contextmanager
def user_errors_in_one_line() -> Iterator[None]:
    """Inside a Hydra job: a user's mistake leaves as one line and exit status 1. (Raised from
    the job, it would reach the console under Hydra's traceback.) In a multirun the error is
    logged and re-raised: Hydra records it and goes on with the next job, and `run_cli` lists
    the failed jobs at the end."""
    multirun = _in_multirun()
    _Sweep.jobs += multirun
    try:
        yield
    except Exception as error:
        if multirun:
            _record_failed_job(error)
            raise
        if debugging() or not is_user_error(error):
            raise
        fail(error)


def _record_failed_job(error: Exception) -> None:
    hydra = HydraConfig.get()
    bug = not is_user_error(error)
    if bug:
        log.exception("job %s failed", hydra.job.num)  # the traceback, in the job's log
    else:
        log.error("job %s failed: %s", hydra.job.num, one_line(error))
    message = f"{type(error).__name__} (a bug: traceback in its log)" if bug else one_line(error)
    # The job's own values: the overrides the command line did not give as they are (swept).
    given = {argument.lower() for argument in sys.argv[1:]}  # (Hydra writes false as False)
    overrides = " ".join(o for o in hydra.overrides.task if o.lower() not in given)
    _Sweep.failed.append(
        FailedJob(hydra.job.num, overrides, message, hydra.runtime.output_dir, bug)
    )


def _report_failed_jobs() -> NoReturn:
    for job in _Sweep.failed:
        print(f"error: job {job.number} ({job.overrides}): {job.message}", file=sys.stderr)
    done = _Sweep.jobs - len(_Sweep.failed)
    print(
        f"error: {len(_Sweep.failed)} of {_Sweep.jobs} jobs failed (listed above, each with its "
        f"output folder's log: {_Sweep.failed[0].output_dir}, ...); {done} finished",
        file=sys.stderr,
    )
    raise SystemExit(1)


def run_cli(hydra_main: Callable[[], object]) -> None:
    """Call a `@hydra.main` function; a config that does not compose is one line too, and so
    is a file-system fault before the job starts (a `hydra.run.dir` that is a file)."""
    if not debugging():
        # Hydra then re-raises composition errors instead of printing them with a traceback.
        os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra_main()
    except Exception as error:
        if _Sweep.failed and not debugging():
            _report_failed_jobs()  # Hydra re-raises the first failed job's error at the end
        if debugging() or not (isinstance(error, HydraException) or is_user_error(error)):
            raise
        if isinstance(error, OverrideParseException):
            message = f"override {error.override!r} cannot be parsed: {one_line(error)}"
            print(f"error: {message}; {OVERRIDE_HINT}", file=sys.stderr)
            raise SystemExit(1) from None
        fail(error)
    if _Sweep.failed:
        _report_failed_jobs()

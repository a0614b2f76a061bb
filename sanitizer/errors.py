"""Errors a user can cause and fix; the CLI prints them as one line, never a traceback."""

from __future__ import annotations

from collections.abc import Sequence


def shortlist(items: Sequence[str], n: int = 3) -> str:
    """The first `n` of a list, for a message that must stay one line; ', ...' where more follow."""
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


class SanitizerError(Exception):
    """A user-facing failure: bad input, bad configuration, mismatched files."""


class UsageError(SanitizerError):
    """The command line or a file it names cannot be used as given."""


class EncoderError(SanitizerError):
    """The victim encoder cannot be built or its weights cannot be loaded."""


class CheckpointError(SanitizerError):
    """A decoder directory is missing, unreadable, unsafe, or made for another encoder."""


class TrainingError(SanitizerError):
    """Training went wrong in a way its settings explain (a loss that is no longer a number)."""


class Busy(SanitizerError):
    """Another job holds the directory's lock: no mistake, and nothing wrong with the job, so the CLI
    exits 75 (sysexits' EX_TEMPFAIL), which a scheduler can tell from a broken job and retry later."""


class ReadFailed(SanitizerError):
    """An input that could be read before failed to read now (a reset connection, EIO): no mistake of
    the user's, so the CLI exits 1, as for a full disk, and running the command again may succeed."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `ray job stop`, `kill`): the job stops as on Ctrl-C, its temp files
    removed and its finished shards kept for the re-run, instead of dying wherever it was."""

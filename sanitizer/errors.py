"""Errors a user can cause and fix; the CLI prints them as one line, never a traceback."""

from __future__ import annotations

import re
from collections.abc import Sequence

# Characters that print nothing yet change what is seen: control characters (a newline, an escape
# sequence that clears a terminal), the line and paragraph separators, and the bidirectional controls
# (U+202E turns `photo_gpj.exe` into `photo_exe.jpg` on screen). Other text, ideographic spaces and
# emoji included, is shown as it is.
_UNSEEN = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def shortlist(items: Sequence[str], n: int = 3) -> str:
    """The first `n` of a list, for a message that must stay one line; ', ...' where more follow."""
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def visible(text: str, keep: str = "") -> str:
    """`text` with what a dataset names in it (shard paths, keys, captions, errors that quote them)
    unable to drive a terminal or hide and reorder what is around it: each character of _UNSEEN but
    those in `keep` (the newlines of a message of several lines) shown as its escape (`\\x1b`)."""

    def escape(m: re.Match) -> str:
        return m.group() if m.group() in keep else m.group().encode("unicode_escape").decode("ascii")

    return _UNSEEN.sub(escape, text)


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


class OutOfMemory(SanitizerError):
    """The GPU or the host ran out of memory at the batch sizes given: nothing wrong with the input,
    so the CLI exits 1, as for a full disk; smaller batches may fit, and finished work is kept."""


class WorkerDied(SanitizerError):
    """A scoring actor's process died again and again (most often the kernel's OOM killer): no mistake
    in the input known, so the CLI exits 1, as for memory that ran out; finished work is kept."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `ray job stop`, `kill`): the job stops as on Ctrl-C, its temp files
    removed and its finished shards kept for the re-run, instead of dying wherever it was."""

"""The one exception type that means "the user's input is wrong" (exit code 2), and the one
that means "the filesystem refused a write" (:class:`StorageError`)."""

import errno
import re

# characters that never belong in a name, path or message line: C0, DEL and C1 controls
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def one_line(text: str) -> str:
    """``text`` with every control character (newline, tab, NUL, escape...) written as its
    Python escape, so that it prints as exactly one line. Pure."""
    return CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


class UsageError(Exception):
    """Bad input: a malformed job file, an impossible value, a missing data set.

    The message is one line that names the offending field and how to fix it. Entry points turn it
    into ``hpcml: error: <message>`` on stderr and exit code 2. ``str()`` of it is always one line
    (:func:`one_line`), whatever user text (a path, a key) the message quotes.
    """

    def __str__(self) -> str:
        return one_line(super().__str__())


class ConfigError(UsageError):
    """A job-file value that fails validation; ``key`` is its dotted path (``train.lr``)."""

    def __init__(self, key: str, problem: str, fix: str = "") -> None:
        self.key = key
        text = f"{key}: {problem}"
        if fix:
            text += f" ({fix})"
        super().__init__(text)


class StorageError(Exception):
    """The filesystem refused a write the run needs (full, read-only, over quota). Raised on
    every rank together where the write is collective (a checkpoint); the message is one line
    naming the path and the errno. A run that meets it mid-run ends with exit code 1 and a
    ``failed`` summary where one can still be written."""


# the filesystem refusing a write: full, over quota, file too large (RLIMIT_FSIZE), read-only, I/O
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO})


def describe_os_error(path: object, exc: OSError) -> str:
    """``"<path>: cannot write (ENOSPC: No space left on device)"`` (pure)."""
    name = errno.errorcode.get(exc.errno or 0, f"errno {exc.errno}")
    return f"{path}: cannot write ({name}: {exc.strerror or exc})"

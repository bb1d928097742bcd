"""The one exception type that means "the user's input is wrong" (exit code 2)."""


class UsageError(Exception):
    """Bad input: a malformed job file, an impossible value, a missing data set.

    The message is one line that names the offending field and how to fix it. Entry points turn it
    into ``hpcml: error: <message>`` on stderr and exit code 2.
    """


class ConfigError(UsageError):
    """A job-file value that fails validation; ``key`` is its dotted path (``train.lr``)."""

    def __init__(self, key: str, problem: str, fix: str = "") -> None:
        self.key = key
        text = f"{key}: {problem}"
        if fix:
            text += f" ({fix})"
        super().__init__(text)

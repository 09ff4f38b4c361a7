"""The errors streambars raises on purpose: each says what was wrong, and carries its exit code.

The CLI prints ``str(error)`` as one line (secrets scrubbed) and exits with ``exit_code``:
2 when the user must change something (arguments, configuration, key, dataset), 1 when
the work failed. Anything else that escapes is a bug: the CLI still prints one line and
exits 1, and shows the traceback only with ``--log-level debug``.
"""

from __future__ import annotations

from typing import Any

#: The process exit codes (README "Troubleshooting", docs/daemon.md).
EXIT_OK = 0
EXIT_FAILED = 1  # the work failed (systemd restarts the daemon)
EXIT_USAGE = 2  # the user must change something: arguments, configuration, key, dataset
EXIT_INTERRUPTED = 130  # SIGTERM / SIGINT of a one-shot command

#: What each exit code means, as README "Troubleshooting" states it (tests/test_docs.py
#: keeps that table equal to this one).
EXIT_MEANINGS: dict[int, str] = {
    EXIT_OK: "done",
    EXIT_FAILED: "the work failed (validate: an error-severity rule failed; check: a gateway unreachable)",
    EXIT_USAGE: "you must change something: arguments, configuration, key, dataset, symbol",
    EXIT_INTERRUPTED: "stopped by SIGINT (Ctrl-C) or SIGTERM (one-shot commands)",
}


class StreambarsError(Exception):
    """Base class: a failure with a message meant for the user."""

    exit_code: int = 1


class UsageError(StreambarsError):
    """Bad arguments that argparse could not catch (e.g. a date range that is empty)."""

    exit_code = 2


class ConfigError(StreambarsError, ValueError):
    """A configuration value that is not allowed: names key, value and what is allowed."""

    exit_code = 2

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config {key} = {value!r} is not allowed: {allowed}")


class StoreError(StreambarsError):
    """The store cannot be written or read: names the path and the cause."""


class StoreLockedError(StoreError):
    """Another process (named in the message) is writing the same file."""


class DamagedFileError(StoreError):
    """A store file is damaged (truncated, bad checksum, garbage rows): bad input, exit 2.

    ``path`` and ``what`` are kept apart so `inspect` and `validate` can show a row for the
    file and go on with the rest of the store."""

    exit_code = 2

    def __init__(self, path: object, what: str, suffix: str = ""):
        self.path, self.what = path, what
        super().__init__(f"{path} is damaged: {what}{suffix}")


class FileBusyError(StoreError):
    """A store file cannot be opened for reading right now: a writer is opening it, or a
    writer was killed while opening it (the next writer repairs it)."""


class SourceError(StreambarsError):
    """Databento or a DBN file did not give what was asked: names the request and the cause."""


class DamagedInputError(SourceError):
    """A ``--from-dbn`` input's records are damaged (cut off, corrupt). ``archive_copy``: the
    copy in the raw archive the run read instead of the user's file (a cluster worker), so
    that the process that made the copy removes it; empty when the user's file was read."""

    def __init__(self, message: str, archive_copy: str = ""):
        super().__init__(message)
        self.archive_copy = archive_copy


class AuthenticationError(SourceError):
    """The API key was refused; retrying cannot help (exit 2, like the daemon: fix the key)."""

    exit_code = 2


class DatasetError(SourceError):
    """Databento does not serve the dataset asked for (or not to this key): the user's
    configuration is wrong, not the key and not the network, so exit 2."""

    exit_code = 2


class CostLimitError(StreambarsError):
    """The Historical request would cost more than the configured limit."""


class RuleViolationError(StreambarsError):
    """A validation rule with policy 'fail' was broken while aggregating."""

    def __init__(self, rule: str, series: str, ts_event: int, detail: str = ""):
        self.rule, self.series, self.ts_event = rule, series, ts_event
        from datetime import UTC, datetime

        when = datetime.fromtimestamp(ts_event / 1e9, UTC).isoformat()
        super().__init__(
            f"validation rule {rule} (policy fail) broken by {series} at {when} "
            f"(ts_event={ts_event}){': ' + detail if detail else ''}"
        )


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT of a one-shot command, as the same exception as Ctrl-C (so every
    ``finally`` closes its files) but naming the signal; the CLI exits 130."""

    def __init__(self, signame: str = "SIGINT"):
        super().__init__(signame)
        self.signame = signame

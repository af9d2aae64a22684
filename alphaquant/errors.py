"""Errors a user can fix: a bad config key, a missing file, data too short for one window.

The CLI catches `UserError`, prints its message (one sentence naming the bad key, file or
value and what is allowed; no traceback) and exits with code 2 without writing anything.
Everything else is a bug and keeps its traceback.

    try:
        cfg = load_config("configs/olmoe.yaml", sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user; the message says what is wrong and what is allowed."""

    exit_code = 2


class ConfigError(UserError):
    """A config file or command-line override that does not fit the schema or the model."""


class DataError(UserError):
    """A calibration/evaluation source that is missing, unreadable, empty or too short."""

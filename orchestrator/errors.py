"""The one base class of the errors a user sees, and the exit code each kind ends a command with.

Every error the product raises for a person to read (a bad manifest, a ledger it cannot use, a plan
that cannot be made, an executor that cannot start, a broken checkpoint, a failed download…) derives
from `WanSweepError`; the command line turns any of them into `error: <message>` and its `exit_code`,
in one place. Raise them with a message that says what is wrong and what to do.
"""
from __future__ import annotations


class WanSweepError(Exception):
    """A problem the user can act on: its message says what and how; `exit_code` ends the command."""

    exit_code: int = 2


class UserError(WanSweepError, RuntimeError):
    """Something about the command's arguments or the machine that the user must change."""


__all__ = ["UserError", "WanSweepError"]

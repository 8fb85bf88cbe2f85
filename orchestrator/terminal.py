"""Text from manifests and programs made safe to print on a terminal (a tmux pane, a log `tail -f`).

A prompt may hold raw escape sequences (`ESC ] 2 ; title BEL` retitles a tmux pane, `ESC [ 2 J`
clears it); printed as they are, the terminal obeys them. Every line a worker, supervisor or driver
prints or logs, and the text report, goes through `printable`: control characters are written as
Python escapes (`\\x1b`, `\\r`), newlines and tabs stay.
"""
from __future__ import annotations

import logging
import re

# C0 controls but tab and newline, DEL, and the C1 controls (U+0080-U+009F: U+009B is a one-character CSI)
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` with each terminal control character written as its Python escape (`\\x1b`)."""
    return _CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)


class PrintableFormatter(logging.Formatter):
    """A log formatter whose lines hold no terminal control characters (tracebacks included)."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))

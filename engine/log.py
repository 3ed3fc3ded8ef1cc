"""Where engine and export code send one-line progress messages: a callable the caller passes.

Engine code never prints; a job's front end (the CLI's stderr logger, a test's list) decides.
"""

from __future__ import annotations

from typing import Callable

Log = Callable[[str], None]


def no_log(message: str) -> None:
    """The default Log: say nothing."""

"""User-facing errors.

Anything a user can get wrong (a name, a file, a value) raises :class:`SharpscopeError` with a message that says
what was expected, what was found and how to fix it. The CLI prints it on one line and exits non-zero (2 for a
:class:`UsageError`, click's code for bad usage; 1 otherwise); library users catch it like any ``ValueError``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SharpscopeError(ValueError):
    """A problem with the user's input, files or environment, explained in one line."""


class UsageError(SharpscopeError):
    """A name or value the user gave that is not valid (an unknown dataset, a device that does not exist): bad
    usage, exit code 2 on the command line, like the option checks click does itself."""


def unknown_name_error(kind: str, name: str, choices: Iterable[str]) -> UsageError:
    """Build the error for an unknown registry name, suggesting close matches.

    >>> str(unknown_name_error("dataset", "digts", ["digits", "mnist"]))
    "unknown dataset 'digts'; did you mean 'digits'? (choices: digits, mnist)"
    """
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return UsageError(f"unknown {kind} {name!r}{hint} (choices: {', '.join(choices)})")

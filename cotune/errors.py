"""The one exception type for a user's mistake (bad file, field or flag)."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input. The CLI prints the message as one sentence and exits 2.

    Bugs raise anything else and keep their traceback.
    """

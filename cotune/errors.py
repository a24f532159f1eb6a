"""The one exception type for a user's mistake (bad file, field or flag), and the search's SIGTERM."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input. The CLI prints the message as one sentence and exits 2.

    Bugs raise anything else and keep their traceback.
    """


class Terminated(KeyboardInterrupt):
    """A SIGTERM (a scheduler ending the job) turned into an interrupt, so it unwinds the way Ctrl-C does:
    the running trial's tree is killed and the trial recorded as interrupted."""

    def __str__(self) -> str:
        return "terminated (SIGTERM)"

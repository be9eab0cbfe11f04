"""User-facing errors: one exception type the CLI prints without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (file, config, request), not a bug.

    The message names where the problem is: `file:line: field: what is wrong`, as far as each is known.
    """

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None, field: str | None = None):
        self.file, self.line, self.field, self.reason = file, line, field, message
        where = ""
        if file is not None:
            where = f"{file}:{line}: " if line is not None else f"{file}: "
        if field is not None:
            where += f"{field}: "
        super().__init__(where + message)

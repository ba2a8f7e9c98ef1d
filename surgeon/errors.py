"""Errors a user can cause, and how they are shown.

Every mistake in a recipe, an override, a data source or a checkpoint is raised as a
:class:`UserError`. The CLI prints it (no traceback) and exits with code 2. Anything else is a
bug in surgeon: the CLI exits 1 and asks for a report.
"""
from __future__ import annotations

#: What the CLI asks for when surgeon itself fails (no address: the project publishes none yet).
REPORT_REQUEST = ("please report it to the surgeon maintainers with the command you ran and the traceback "
                  "above")


class UserError(Exception):
    """A mistake the user can fix.

    Args:
        message: what is wrong, naming the bad value.
        where: where it is, e.g. ``recipes/x.yaml:12:5`` or a file path; printed first.
        hint: what to do about it; printed on its own line.
    """

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.where = where
        self.hint = hint

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class SurgeonWarning(UserWarning):
    """A warning about the user's input that must reach them (the CLI shows these even where it
    silences library warnings): a size that works but is almost certainly not meant."""


class RecipeError(UserError):
    """One or more problems in a recipe, all reported at once.

    Args:
        problems: ``(where, field_path, message, hint)`` tuples, one per problem.
    """

    def __init__(self, problems: list[tuple[str, str, str, str | None]]):
        self.problems = problems
        lines = []
        for where, path, message, hint in problems:
            prefix = f"{where}: {path}: " if path else f"{where}: "
            lines.append(prefix + message + (f"\n  hint: {hint}" if hint else ""))
        super().__init__("\n".join(lines))

    def __str__(self) -> str:
        return self.message

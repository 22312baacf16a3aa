"""Exceptions the command line turns into exit codes and messages. No torch import here."""

from __future__ import annotations


class LauncherError(Exception):
    """An error the user can act on; `launch` prints it without a stack trace."""

    exit_code = 1


class UsageError(LauncherError):
    """Bad input (recipe, override, flag): nothing was started. Exit code 2."""

    exit_code = 2


class RecipeError(UsageError):
    """One or more problems in a recipe and its overrides, reported together."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        n = len(self.problems)
        head = f"the recipe has {n} problem{'s' if n != 1 else ''}; nothing was started:"
        super().__init__("\n".join([head] + [f"  - {p}" for p in self.problems]))

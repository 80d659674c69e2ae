"""One root for every error a user can cause.

Everything modelfold raises because of its input (a bad option, an unknown pass, a model it does
not support, a corrupt file, a destination it may not write) is a ``ModelfoldError``. The CLI
prints such an error as one ``modelfold: error: ...`` line and exits with status 2; any other
exception is a bug in modelfold and is shown with its traceback (exit status 1).

The concrete classes also derive from the built-in type their callers used to catch
(``ValueError`` for bad values, ``RuntimeError`` for a step that could not be done), so
``except ValueError`` around an option keeps working.
"""

from __future__ import annotations


class ModelfoldError(Exception):
    """Base class of the errors a user can cause (one clear line, exit status 2 in the CLI)."""


class OptionError(ModelfoldError, ValueError):
    """An option (of a pass, an export, a command, a training run) has a bad value."""


class UsageError(ModelfoldError, ValueError):
    """A command or API call that cannot work as asked (wrong kind of input, missing file)."""


__all__ = ["ModelfoldError", "OptionError", "UsageError"]

"""The contracts subsystem's one exception: a template, parameter, expansion or placement
problem, with where in the template file it was found when that is known."""

from __future__ import annotations


class TemplateError(ValueError):
    """A template or a request made from it that cannot be honoured, said so a user can act.

    `line` and `column` (1-based) point into the template's YAML source when known."""

    def __init__(self, message: str, *, line: int | None = None, column: int | None = None,
                 path: str = "") -> None:
        self.message = message
        self.line = line
        self.column = column
        self.path = path
        super().__init__(self.render())

    def render(self, filename: str = "") -> str:
        where = ""
        if self.line is not None:
            where = f"{filename or 'template'}:{self.line}:{self.column or 1}: "
        elif filename:
            where = f"{filename}: "
        at = f"{self.path}: " if self.path else ""
        return f"{where}{at}{self.message}"


class PlacementError(TemplateError):
    """No set of nodes meets the template's placement rules; the message names the rule."""

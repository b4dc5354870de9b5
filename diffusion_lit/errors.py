"""The one exception type whose message is shown to the user as a single line, and parsers that raise it."""

import re


class UserError(Exception):
    """Bad input or environment that the user can fix; the CLI prints its message and exits non-zero.

    `latest` is the last one made: jsonargparse reports a constructor's error of a setting whose type is a union
    (a subclass among several) in a paragraph about the union's types, without the exception itself."""

    latest: "UserError | None" = None

    def __init__(self, *args) -> None:
        super().__init__(*args)
        UserError.latest = self


class OneLineErrors:
    """For an argparse parser (jsonargparse's too): a final error (unknown option, wrong value) is one UserError
    line that points to --help, instead of a usage block plus the message."""

    def error(self, message: str, ex: Exception | None = None):
        """Raise UserError for errors that would exit; errors the parser handles itself stay as they are."""
        if not getattr(self, "exit_on_error", True):
            super().error(message, ex)
        raise UserError(f"{_short(message)} (`{self.prog.split(' [')[0]} --help` lists the options)")


def _short(message: str) -> str:
    """A parser's message on one line; jsonargparse's report of a value that fits none of a setting's types (a
    paragraph of typing.Literal[...] and Union subtypes) as what was given and what is allowed."""
    key = re.search(r'^Parser key "([^"]+)":', message)
    given = re.search(r"(?:Given value|Got value): (.*)$", message, re.MULTILINE)
    choices = [c.strip(" '\"") for group in re.findall(r"Literal\[([^\]]*)\]", message) for c in group.split(",")]
    types = re.findall(r"Expected a <class '(\w+)'>", message)
    if key and given and choices:
        return f"--{key[1]}: {given[1]!r} is not one of {', '.join(dict.fromkeys(choices))}"
    if key and given and len(types) > 1:
        allowed = " or ".join("None" if name == "NoneType" else name for name in dict.fromkeys(types))
        return f"--{key[1]}: expected {allowed}, got {given[1]!r}"
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def check_range(owner: str, low: float | None = None, high: float | None = None, **values: float | None) -> None:
    """One line for a setting out of [low, high] (an end that is None is open): `owner.name must be at least 1,
    got -3`. `owner` is the class whose argument it is, as Python spells it; None values are not checked."""
    for name, value in values.items():
        if value is None or ((low is None or value >= low) and (high is None or value <= high)):
            continue
        bound = f"between {low} and {high}" if low is not None and high is not None else (
            f"at least {low}" if low is not None else f"at most {high}")  # fmt: skip
        raise UserError(f"{owner}.{name} must be {bound}, got {value}")

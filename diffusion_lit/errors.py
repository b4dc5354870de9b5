"""The one exception type whose message is shown to the user as a single line."""


class UserError(Exception):
    """Bad input or environment that the user can fix; the CLI prints its message and exits non-zero."""

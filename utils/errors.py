"""The one exception type for mistakes in what the user gave us."""


class UserError(Exception):
    """A bad path, image, config or checkpoint. Entry points print it as one line and exit 2,
    instead of a traceback, because the fix is on the user's side."""

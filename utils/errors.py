"""The one exception type for mistakes in what the user gave us, and how entry points end on one."""
import sys


class UserError(Exception):
    """A bad path, image, config or checkpoint. Entry points print it as one line and exit 2,
    instead of a traceback, because the fix is on the user's side."""


def exit_on_user_error(run):
    """`run()`; a UserError ends the program with its one line on stderr and exit status 2."""
    try:
        return run()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)

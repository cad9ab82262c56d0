"""The one exception type for mistakes in what the user gave us, and how entry points end on one."""
import sys

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # what a shell reports for a program stopped by Ctrl-C (128 + SIGINT)


class UserError(Exception):
    """A bad path, image, config or checkpoint. Entry points print it as one line and exit 2,
    instead of a traceback, because the fix is on the user's side."""


def printable(text):
    """`text` as it can be printed: a file name's bytes that are not UTF-8 (which Python holds as
    lone surrogates) written as \\x escapes, so that naming a file never ends the run with a
    UnicodeEncodeError."""
    return str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def warn(line):
    """A line on stderr about work that goes on without something (a skipped file)."""
    print(printable(line), file=sys.stderr)


def first_sentence(err):
    """The first sentence of an exception's message: it says what is wrong, where torch's
    following ones speculate why (and advise loading untrusted files with weights_only=False)."""
    text = str(err).strip()
    return text.splitlines()[0].split(". ")[0] if text else type(err).__name__


def exit_on_user_error(run, interrupted=None, say=True, before_exit=None):
    """run()'s result; a UserError ends the program with its one line on stderr and exit status 2.

    With `interrupted`, Ctrl-C ends it with that one line and status 130 instead of a traceback.
    `say` False leaves the line to another process (torchrun's rank 0 speaks for all), and
    `before_exit` runs before a UserError's exit, so that those processes can wait for it."""
    try:
        return run()
    except UserError as err:
        if say:
            print(f"error: {printable(err)}", file=sys.stderr)
        if before_exit is not None:
            before_exit()
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        if say:
            print(f"interrupted: {interrupted}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)

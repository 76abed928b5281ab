"""One error type for everything a user can get wrong.

Entry points catch :class:`UserError`, print its message on one line and exit with
status 2. Library code raises it with a message that says what is wrong and what to do.
"""
import functools
import sys


class UserError(Exception):
    """Bad input from the user: missing data, wrong checkpoint, bad flag."""


def exit_on_user_error(main):
    """Decorate a CLI ``main``: a :class:`UserError` becomes one line on stderr and exit 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            msg = " ".join(str(exc).split())
            print(f"error: {msg}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper

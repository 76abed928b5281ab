"""One error type for everything a user can get wrong.

Entry points catch :class:`UserError` (and ``utils.WriteError``, a file that could not be
written), print its message on one line and exit with status 2. Library code raises it with a message that says what is wrong and what to do.
"""
import functools
import sys

from utils import WriteError


class UserError(Exception):
    """Bad input from the user: missing data, wrong checkpoint, bad flag."""


def exit_on_user_error(main):
    """Decorate a CLI ``main``: a :class:`UserError` or ``utils.WriteError`` becomes one line on stderr
    and exit 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (UserError, WriteError) as exc:
            msg = " ".join(str(exc).split())
            print(f"error: {msg}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper


class SettingError(UserError, ValueError):
    """A setting a library function cannot work with, named as the function's argument.

    ``template`` writes each setting's name as ``{name}`` (``settings`` lists those names): the
    error's own message shows the argument names, and a program that took the settings from its
    command line rewords it in its flags with ``worded({name: flag})``."""

    def __init__(self, template, *settings):
        self.template, self.settings = template, tuple(settings)
        super().__init__(self.worded({}))

    def worded(self, names):
        """The message with each setting called ``names.get(name, name)``."""
        text = self.template
        for name in self.settings:
            text = text.replace("{" + name + "}", names.get(name, name))
        return text

    def renamed(self, names):
        """The same error with each setting named ``names.get(name, name)``: for a caller that
        took the setting under another name."""
        new = [names.get(name, name) for name in self.settings]
        return SettingError(self.worded({name: "{" + other + "}" for name, other in zip(self.settings, new)}), *new)

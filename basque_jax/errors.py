"""The one user-error base class.

Everything a user can get wrong -- a config key, an input file, a model folder, a data record
over the limit -- raises a :class:`UserError` (or a subclass) whose message names the file,
line or key. ``basque_jax.cli.main`` prints it as one line ``basque-jax COMMAND: message`` and
exits with status 2; any other exception is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input from the user; the message names the file, line or key and says what to do."""


class ConfigError(UserError):
    """A configuration value is unknown, mistyped or invalid; the message names the key."""


class InputNotFound(UserError):
    """A file or folder the user named does not exist (the message names it)."""


class MissingDependency(UserError):
    """An optional package a feature needs is not installed (the message says what to install)."""

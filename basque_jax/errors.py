"""Exceptions shared across the package."""


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or invalid; the message names the key."""

"""Errors that stemdist reports to the user as one clear line (the CLI exits with status 2)."""


class StemdistError(Exception):
    """Base class of the errors the user can fix."""


class InputError(StemdistError):
    """The input cube or file is unusable: the message names the problem."""


class ConfigError(StemdistError, ValueError):
    """A configuration key or value is wrong: the message names the key and why."""

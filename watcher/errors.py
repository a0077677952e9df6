"""Exceptions shared by the command line and the modules behind it (import-light)."""


class UsageError(Exception):
    """Something the user can fix in how the command was called or configured: exit 2."""

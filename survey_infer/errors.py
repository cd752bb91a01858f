"""Exceptions with a meaning for the exit status of the command line."""


class RefusedError(Exception):
    """Input or arguments refused before any work started (exit status 2).

    The message names the file, array or column at fault and what was expected.
    """


class BundleError(RefusedError):
    """A model bundle is missing, tampered with, or does not match its task or spec."""


class StoreError(RefusedError):
    """A survey store has the wrong kind, format, shape or dtype."""

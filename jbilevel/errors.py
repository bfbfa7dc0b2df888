"""The one error type a user can fix: bad data, configs, paths and run directories.

The data, config and input layers raise subclasses of :class:`UserError` whose message names
the file, line or field and the fix; ``jbilevel`` prints that message alone (no traceback) and
exits with status 2. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An input the user can correct; ``str(error)`` is the whole message they need."""

"""The error types every door (CLI, jobs, HTTP) turns into a clear one-line message.

``InputError``: input from a user that cannot be used as given; messages name the file, field or
limit concerned. ``StorageError``: object storage that cannot be used (unreachable, credentials
refused, missing bucket, corrupted data); messages name the location. No message ever contains
credentials. Anything that is neither is a bug and keeps its traceback.
"""


class OnewordError(Exception):
    """Base of the errors that are reported to users as one line, without a traceback."""


class InputError(OnewordError, ValueError):
    """Input from a user (file, field, name, prompt) that cannot be used as given."""


class StorageError(OnewordError):
    """Object storage or a local folder that cannot be read or written as asked."""

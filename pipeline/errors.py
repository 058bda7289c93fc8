"""The one error type for bad input: every door (CLI, jobs, HTTP) turns it into a clear message.

Subclasses say what was wrong; messages name the file, field or limit concerned and never
contain credentials. Anything that is not an ``InputError`` is a bug and keeps its traceback.
"""


class InputError(ValueError):
    """Input from a user (file, field, name, prompt) that cannot be used as given."""

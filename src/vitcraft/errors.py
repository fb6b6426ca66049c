"""The one exception type for a user's mistake (bad path, bad file, bad flag).

The CLI prints its message and exits non-zero without a traceback; anything
else that escapes is a bug and keeps its traceback.
"""


class VitcraftError(ValueError):
    """A problem with what the user asked for, explained in one sentence."""

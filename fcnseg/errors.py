"""The one exception type that means "the user gave us something wrong".

Scripts turn it into a single sentence on stderr and a non-zero exit; everything else is a bug
and keeps its stack trace.
"""


class UserError(Exception):
    """Bad input from the user: a path, a config value, a file. The message names the culprit."""

"""The one error type the CLI turns into a single clear line and a non-zero exit."""


class QwenEdgeError(Exception):
    """A problem with the user's input: the message names the problem and the fix."""
